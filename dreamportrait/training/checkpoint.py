"""Training checkpoints: written atomically, resumable to the identical state.

A checkpoint is a directory ``<out_dir>/checkpoints/step-0000100/`` that is also a pretrained
directory (``load_pretrained`` gives the EMA generator and the discriminator, ready for
``dreamportrait generate``) plus what resuming needs::

    config.json, generator.safetensors (EMA), discriminator.safetensors   (models.pretrained)
    generator_raw.safetensors     the generator's current (non-EMA) weights
    training_state.pt             step, optimiser states, RNG states, skipped-step counter
    train_config.yaml             the run's configuration

It is written to a hidden temporary directory and renamed into place, so a crash never leaves a
half-written checkpoint; ``latest`` names the newest one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from .._atomic import atomic_path
from ..models.pretrained import read_weights, save_pretrained, save_weights

RAW_WEIGHTS = "generator_raw.safetensors"
STATE_FILE = "training_state.pt"
CONFIG_FILE = "train_config.yaml"
LATEST = "latest"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir: str | Path, step: int, generator, generator_ema, discriminator, state: dict,
                    config: dict, keep: int = 3) -> Path:
    """Write step ``step``'s checkpoint; keep the newest ``keep``. Returns its directory."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        save_pretrained(temporary, generator_ema, discriminator)
        save_weights(generator, temporary / RAW_WEIGHTS)
        torch.save(state, temporary / STATE_FILE)
        (temporary / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
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


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    complete = sorted(root.glob("step-*")) if root.is_dir() else []
    return complete[-1] if complete else None


def load_checkpoint(path: str | Path, generator, generator_ema, discriminator) -> dict:
    """Load a checkpoint's weights into the given modules and return its training state.

    A damaged or incomplete checkpoint raises ValueError naming the file.
    """
    path = Path(path)
    for name in ("config.json", "generator.safetensors", RAW_WEIGHTS, STATE_FILE):
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path} is incomplete: {name} is missing")
    for module, name in ((generator, RAW_WEIGHTS), (generator_ema, "generator.safetensors"),
                         (discriminator, "discriminator.safetensors")):
        if module is not None:
            read_weights(module, path / name)
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, unpickling errors
        raise ValueError(f"checkpoint file {path / STATE_FILE} is damaged: {error}") from None
