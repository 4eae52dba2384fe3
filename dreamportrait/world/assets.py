"""The trained world models that ship inside the package (``dreamportrait/assets/world/``), so
nothing has to be trained or downloaded before generating or evaluating::

    teacher/     the text-to-image teacher (Stable Diffusion layout; ``world build``)
    judge/       the attribute judge (``world build``)
    gan/         the text-free 3D GAN of ``world train`` (EMA generator + discriminator);
                 ``world train --gan packaged`` starts DreamPortrait from it
    generator/   the DreamPortrait generator trained in the world (``world train``), with its own
                 text encoder (``tokenizer/``, ``text_encoder/``): the one it was trained with (the
                 teacher's), taught the paraphrase captions' words by ``world learn-words``; a
                 rebuilt teacher cannot change what its prompts mean
    no-gan-regulariser/
                 the generator's ablation (b): the same recipe with the GAN regulariser off, kept
                 so that every ratio RESULTS.md gives against it can be checked (``--checkpoint
                 packaged:no-gan-regulariser``)

Each is a copy of a build's output (:func:`publish` writes them) with a manifest of its files'
content hashes (``manifest.json``), checked by :func:`asset_dir` before anything is read.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from .._manifest import MANIFEST, verify_manifest, write_manifest
from ..models.pretrained import CONFIG_FILE, TEXT_ENCODER_PARTS, WEIGHT_FILES, load_pretrained, read_config
from ..text.encoder import vocabulary_words
from ..training.checkpoint import pretrained_directory

GENERATORS = ("generator", "no-gan-regulariser")
"""The packaged DreamPortrait generators: published with their own text encoder."""
NAMES = ("teacher", "judge", "gan", *GENERATORS)
PACKAGED = "packaged:"
"""How ``--checkpoint`` names a packaged model: ``packaged:NAME``, NAME one of :data:`NAMES`."""


def asset_dir(name: str) -> Path:
    """The packaged directory ``name`` (one of :data:`NAMES`); FileNotFoundError if it is absent."""
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    path = Path(str(resources.files("dreamportrait") / "assets" / "world" / name))
    if not path.is_dir():
        raise FileNotFoundError(f"the packaged world {name} is missing ({path}); reinstall dreamportrait or build it "
                                f"with `dreamportrait world build` / `dreamportrait world train`")
    _verify_once(path)
    return path


_verified: set[tuple[str, int]] = set()


def _verify_once(path: Path) -> None:
    """Check a packaged directory against its manifest (which :func:`publish` writes), whatever
    loads it (the teacher and the judge have loaders of their own); once per process while the
    manifest is unchanged. A damaged, missing or altered file is a ValueError naming it."""
    manifest = path / MANIFEST
    key = (str(path), manifest.stat().st_mtime_ns if manifest.is_file() else -1)
    if key not in _verified:
        verify_manifest(path)
        _verified.add(key)


def model_directory(checkpoint: str | Path) -> Path:
    """The model directory ``--checkpoint`` names: ``packaged:NAME`` the packaged model NAME (one of
    :data:`NAMES`, checked against its manifest), anything else a model directory or training run
    (:func:`~dreamportrait.training.checkpoint.pretrained_directory`)."""
    text = str(checkpoint)
    if text.startswith(PACKAGED):
        name = text[len(PACKAGED):]
        if name not in NAMES:
            raise ValueError(f"--checkpoint {text}: the packaged models are {', '.join(PACKAGED + n for n in NAMES)}")
        return asset_dir(name)
    return pretrained_directory(checkpoint)


def load_default_generator(device="cpu", backend: str | None = None):
    """The packaged DreamPortrait generator with the text encoder packaged beside it."""
    return load_pretrained(asset_dir("generator"), device=device, backend=backend)[0]


def generator_vocabulary() -> list[str]:
    """The words the packaged generator's text encoder reads (:func:`~dreamportrait.text.encoder.vocabulary_words`
    of its ``tokenizer/vocab.json``): a closed vocabulary, whose other words are left out
    (``generate`` warns about them)."""
    return vocabulary_words(json.loads((asset_dir("generator") / "tokenizer" / "vocab.json").read_text()))


def publish(name: str, source: str | Path, assets_root: str | Path | None = None,
            text_encoder: str | Path | None = None) -> Path:
    """Copy a trained model directory into the package's assets as ``name``, leaving out what is for
    resuming rather than using (training state, raw weights, logs). A generator is published
    without its discriminator, with the ``tokenizer/`` and ``text_encoder/`` it was trained with
    (from ``text_encoder``, default the directory its config records: the run's teacher) and
    without a recorded text-encoder path (:func:`~dreamportrait.models.load_pretrained` then loads the copy)."""
    if name not in NAMES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a directory")
    if text_encoder is not None and name not in GENERATORS:
        raise ValueError(f"text_encoder applies only to a generator, got {text_encoder!r} for {name!r}")
    root = Path(assets_root) if assets_root else Path(str(resources.files("dreamportrait"))) / "assets" / "world"
    target, temporary = root / name, root / f".{name}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    if name in GENERATORS:
        config = read_config(source)
        config.pop("discriminator", None)
        if "text_conditioning" not in config:
            raise ValueError(f"{source} holds no text-conditioned generator")
        encoder = _text_encoder_directory(text_encoder or config["text_conditioning"]["text_encoder"], source)
        config["text_conditioning"]["text_encoder"] = None
        temporary.mkdir(parents=True)
        shutil.copy2(source / WEIGHT_FILES["generator"], temporary / WEIGHT_FILES["generator"])
        (temporary / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for part in TEXT_ENCODER_PARTS:
            shutil.copytree(encoder / part, temporary / part)
    else:
        shutil.copytree(source, temporary, ignore=shutil.ignore_patterns("training_state.pt", "tensorboard", MANIFEST))
    write_manifest(temporary)  # what was left out is not listed; what was copied is checked on load
    shutil.rmtree(target, ignore_errors=True)
    temporary.rename(target)
    return target


def _text_encoder_directory(text_encoder: str | Path | None, source: Path) -> Path:
    """The local directory holding :data:`TEXT_ENCODER_PARTS` that a generator from ``source`` uses."""
    if text_encoder is None:
        raise ValueError(f"{source} records no text encoder: give text_encoder (the teacher directory it was "
                         f"trained with)")
    missing = [part for part in TEXT_ENCODER_PARTS if not (Path(text_encoder) / part).is_dir()]
    if missing:
        parts = " and ".join(f"{part}/" for part in missing)
        raise FileNotFoundError(f"text encoder {text_encoder} lacks {parts} (a local directory "
                                f"is needed)")
    return Path(text_encoder)
