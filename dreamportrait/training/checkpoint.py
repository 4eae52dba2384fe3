"""Training checkpoints: written atomically, resumable to the identical state.

A checkpoint is a directory ``<out_dir>/checkpoints/step-0000100/`` that is also a pretrained
directory (``load_pretrained`` gives the EMA generator and the discriminator, ready for
``dreamportrait generate``) plus what resuming needs::

    config.json, generator.safetensors (EMA), discriminator.safetensors   (models.pretrained)
    generator_raw.safetensors     the generator's current (non-EMA) weights
    training_state.pt             step, optimiser states, RNG states, skipped-step counter
    train_config.yaml             the run's configuration
    manifest.json                 every other file's SHA-256 and size (written last)

It is written to a hidden temporary directory and renamed into place, so a crash never leaves a
half-written checkpoint (a killed write leaves a ``.step-*.tmp`` directory, removed when the run
starts again); ``latest`` names the newest one. Loading checks every file against the manifest.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import yaml

from .._atomic import atomic_path, temporary_directory
from .._manifest import verify_manifest, write_manifest
from ..models.pretrained import save_pretrained
from ..weights import read_weights, save_weights

RAW_WEIGHTS = "generator_raw.safetensors"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "train_config.yaml"
LATEST = "latest"
STEP_NAME = re.compile(r"step-\d{7}")
REQUIRED_FILES = ("config.json", "generator.safetensors", "discriminator.safetensors", RAW_WEIGHTS, STATE_FILE)


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir: str | Path, step: int, generator, generator_ema, discriminator, state: dict,
                    config: dict, keep: int = 3) -> Path:
    """Write step ``step``'s checkpoint; keep the newest ``keep``. Returns its directory."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    temporary = temporary_directory(root, prefix=f".{final.name}.")
    try:
        save_pretrained(temporary, generator_ema, discriminator)
        save_weights(generator, temporary / RAW_WEIGHTS)
        torch.save(state, temporary / STATE_FILE)
        (temporary / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        write_manifest(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    with atomic_path(root / LATEST) as pointer:
        pointer.write_text(final.name + "\n")
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(out_dir: str | Path) -> None:
    """Remove what killed checkpoint writes left in a run's checkpoint directory: ``.step-*.tmp``
    directories and temporary ``latest`` pointers."""
    root = checkpoint_dir(out_dir)
    for leftover in root.glob(".step-*.tmp") if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(f".{LATEST}.*.tmp") if root.is_dir() else []:
        leftover.unlink(missing_ok=True)


def _checkpoints(root: Path) -> list[Path]:
    """The run's checkpoint directories, oldest first (symbolic links, which could lead anywhere, excluded)."""
    return sorted(path for path in root.glob("step-*")
                  if STEP_NAME.fullmatch(path.name) and path.is_dir() and not path.is_symlink())


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The run's newest checkpoint (the one ``latest`` names), or None when it has none.

    ``latest`` must name a checkpoint directory of the run (``step-NNNNNNN`` in its checkpoint
    directory; anything else is a ValueError); when the one it names is gone, the newest remaining
    one is returned with a warning.
    """
    root = checkpoint_dir(out_dir)
    pointer = root / LATEST
    complete = _checkpoints(root) if root.is_dir() else []
    if not pointer.is_file():
        return complete[-1] if complete else None
    name = pointer.read_text(errors="replace").strip()
    if not STEP_NAME.fullmatch(name):
        raise ValueError(f"{pointer} names {name[:100]!r}, not a checkpoint of this run (step-NNNNNNN in {root})")
    candidate = root / name
    if candidate in complete:
        return candidate
    if candidate.is_symlink():
        raise ValueError(f"{pointer} names {candidate}, a symbolic link: checkpoints must be directories in {root}")
    fallback = complete[-1] if complete else None
    warnings.warn(f"{pointer} names {name}, which does not exist; "
                  + (f"using the newest checkpoint, {fallback.name}" if fallback else "starting from scratch"),
                  stacklevel=2)
    return fallback


def pretrained_directory(path: str | Path) -> Path:
    """``path`` itself when it is a pretrained directory (``config.json``), else the newest
    checkpoint of the training run it is (what ``--checkpoint`` names); FileNotFoundError if neither."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"--checkpoint {path}: neither a model directory (config.json) nor a training run "
                                f"with checkpoints")
    return latest


def load_checkpoint(path: str | Path, generator, generator_ema, discriminator) -> dict:
    """Load a checkpoint's weights into the given modules and return its training state.

    Every file is checked against the checkpoint's manifest first: a damaged, incomplete or
    altered checkpoint raises ValueError naming the file.
    """
    path = Path(path)
    verify_manifest(path, REQUIRED_FILES)
    for module, name in ((generator, RAW_WEIGHTS), (generator_ema, "generator.safetensors"),
                         (discriminator, "discriminator.safetensors")):
        if module is not None:
            read_weights(module, path / name)
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors in a file whose hash matches: not one we wrote
        raise ValueError(f"checkpoint file {path / STATE_FILE} is damaged: {error}") from None
