"""Pretrained tri-plane GANs on disk: a directory with ``config.json`` (constructor kwargs) and
safetensors weights, and the import of EG3D network pickles into that form.

Layout of a pretrained directory::

    config.json                  {"format": "dreamportrait.triplane-gan", "version": 1,
                                  "generator": {TriPlaneGenerator kwargs},
                                  "text_conditioning": {TextConditionedGenerator kwargs,
                                                        "text_encoder": its source} (optional),
                                  "discriminator": {DualDiscriminator kwargs} (optional)}
    generator.safetensors        (the text-conditioned generator's, base included, when conditioned)
    discriminator.safetensors    (when the config has a discriminator)
    manifest.json                every other file's SHA-256 and size, written last
                                 (:mod:`dreamportrait._manifest`)

Loading checks every file against the manifest first and refuses a directory whose manifest does
not match (naming the file), or that reads a file the manifest does not list. A directory without
a manifest (converted or assembled by hand) loads with a warning that it is unverified.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_path
from .._manifest import require_listed, verify_or_warn, write_manifest
from ..text import TextConditionedGenerator, TextEncoder
from ..weights import load_weights, read_weights, save_weights  # noqa: F401  (re-exported)
from .discriminator import DualDiscriminator
from .safe_pickle import PickledObject, load_network_pickle
from .triplane_generator import TriPlaneGenerator

FORMAT = "dreamportrait.triplane-gan"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHT_FILES = {"generator": "generator.safetensors", "discriminator": "discriminator.safetensors"}
NETWORK_CLASSES = {"generator": TriPlaneGenerator, "discriminator": DualDiscriminator}


def save_pretrained(directory: str | Path, generator: TriPlaneGenerator | TextConditionedGenerator,
                    discriminator: DualDiscriminator | None = None) -> Path:
    """Write ``generator`` (and ``discriminator``) to ``directory``; every file is written atomically,
    the config after the weights, so an interrupted save leaves no config pointing at missing weights,
    and the manifest of every file below ``directory`` last (an interrupted save into a directory
    that had one leaves it not matching: loading refuses the mix)."""
    directory = Path(directory)
    base = generator.base if isinstance(generator, TextConditionedGenerator) else generator
    config = {"format": FORMAT, "version": VERSION,
              "generator": {**base.init_kwargs, "neural_rendering_resolution": base.neural_rendering_resolution}}
    if isinstance(generator, TextConditionedGenerator):
        source = getattr(generator.text_encoder, "source", None)
        config["text_conditioning"] = {**generator.init_kwargs, "text_encoder": source}
    networks = {"generator": generator, "discriminator": discriminator}
    for role, network in networks.items():
        if network is None:
            continue
        if role == "discriminator":
            config[role] = dict(network.init_kwargs)
        save_weights(network, directory / WEIGHT_FILES[role], metadata={"format": FORMAT, "role": role})
    with atomic_path(directory / CONFIG_FILE) as temporary:
        temporary.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_manifest(directory)
    return directory


def read_config(directory: str | Path) -> dict:
    """A pretrained directory's checked ``config.json``."""
    config_path = Path(directory) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a pretrained model directory: {CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or "generator" not in config:
        raise ValueError(f"{config_path}: not a {FORMAT} config (needs 'format': {FORMAT!r} and a 'generator' entry)")
    unknown = sorted(set(config) - {"format", "version", "text_conditioning", *NETWORK_CLASSES})
    if unknown:
        raise ValueError(f"{config_path}: unknown entries {unknown}")
    return config


def _construct(cls, kwargs: dict, what: str, **extra):
    try:
        return cls(**kwargs, **extra)
    except TypeError as error:
        raise ValueError(f"{what} does not fit {cls.__name__}: {error}") from None


TEXT_ENCODER_PARTS = ("tokenizer", "text_encoder")  # a Stable Diffusion layout's text half, copied beside a generator


def load_pretrained(directory: str | Path, device: torch.device | str = "cpu", backend: str | None = None,
                    text_encoder: TextEncoder | str | Path | None = None,
                    ) -> tuple[TriPlaneGenerator | TextConditionedGenerator, DualDiscriminator | None]:
    """The generator (in eval mode) and the discriminator (None when not saved) of a pretrained
    directory; ``backend`` selects the generator's rendering ops. A text-conditioned generator gets
    ``text_encoder`` (an encoder or its source; default: the source recorded when it was saved, or,
    where none is recorded, the :data:`TEXT_ENCODER_PARTS` beside it, as a published generator has).
    Every file is checked against the directory's manifest first (ValueError naming a damaged,
    missing or unlisted file); a directory without one loads with an
    :class:`~dreamportrait._manifest.UnverifiedDirectoryWarning`."""
    directory = Path(directory)
    listed = verify_or_warn(directory, (CONFIG_FILE, WEIGHT_FILES["generator"]))
    config = read_config(directory)
    what = f"{directory / CONFIG_FILE}: the generator config"
    generator = _construct(TriPlaneGenerator, config["generator"], what, backend=backend)
    if "text_conditioning" in config:
        kwargs = dict(config["text_conditioning"])
        source = kwargs.pop("text_encoder", None)
        if source is None and all((directory / part).is_dir() for part in TEXT_ENCODER_PARTS):
            source = directory
        if source is not None and text_encoder is None and Path(source).resolve() == directory.resolve():
            require_listed(directory, listed, (path.relative_to(directory).as_posix()
                                               for part in TEXT_ENCODER_PARTS
                                               for path in sorted((directory / part).rglob("*")) if path.is_file()))
        encoder = text_encoder if text_encoder is not None else source
        if encoder is not None and not isinstance(encoder, TextEncoder):
            encoder = TextEncoder(encoder, device=device)
        generator = _construct(TextConditionedGenerator, kwargs, f"{directory / CONFIG_FILE}: text_conditioning",
                               base=generator, text_encoder=encoder)
    read_weights(generator, directory / WEIGHT_FILES["generator"])
    discriminator = None
    if "discriminator" in config:
        require_listed(directory, listed, (WEIGHT_FILES["discriminator"],))
        discriminator = _construct(DualDiscriminator, config["discriminator"],
                                   f"{directory / CONFIG_FILE}: the discriminator config")
        read_weights(discriminator, directory / WEIGHT_FILES["discriminator"])
        discriminator = discriminator.to(device).eval()
    return generator.to(device).eval(), discriminator


def plain_config(value, where: str = "init_kwargs"):
    """A pickled config value as JSON-ready data (dicts, lists, str, numbers, bools, None)."""
    if isinstance(value, Mapping):
        return {str(key): plain_config(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, numbers.Number):
        return value
    raise ValueError(f"{where}: cannot express a {type(value).__name__} in a JSON config")


TRAINING_ONLY_BUFFERS = ("dataset_label_std",)
"""Buffers EG3D's training loop registers on ``G`` and ``G_ema`` (the spread of the training set's
camera labels, for its own sampling); rendering never reads them, so the import drops them."""


def network_from_record(record, role: str, source: str) -> nn.Module:
    """Build our network from a pickled EG3D network and load its weights strictly."""
    cls = NETWORK_CLASSES[role]
    if not isinstance(record, PickledObject) or record.class_name != cls.__name__:
        found = record.class_name if isinstance(record, PickledObject) else type(record).__name__
        raise ValueError(f"{source}: expected an EG3D {cls.__name__}, found {found!r}")
    if record.state.get("_init_args"):
        raise ValueError(f"{source}: {cls.__name__} pickled with positional init args; expected keyword args only")
    kwargs = plain_config(record.state.get("_init_kwargs", {}), f"{source} init_kwargs")
    if role == "generator" and "neural_rendering_resolution" in record.state:
        kwargs["neural_rendering_resolution"] = int(record.state["neural_rendering_resolution"])
    try:
        network = cls(**kwargs)
    except TypeError as error:
        raise ValueError(f"{source}: its init kwargs do not fit {cls.__name__}: {error}") from None
    tensors = {key: torch.as_tensor(value).to(torch.float32) for key, value in record.named_tensors().items()
               if not (role == "generator" and key in TRAINING_ONLY_BUFFERS)}
    load_weights(network, tensors, source)
    return network


def import_eg3d(pickle_path: str | Path, out_dir: str | Path) -> Path:
    """Convert an EG3D network pickle (``G_ema`` and ``D``) into a pretrained directory, without
    executing code from the pickle (:mod:`~dreamportrait.models.safe_pickle`)."""
    data = load_network_pickle(pickle_path)
    if "G_ema" not in data:
        raise ValueError(f"{pickle_path}: no 'G_ema' network in the pickle (found {sorted(data)})")
    generator = network_from_record(data["G_ema"], "generator", f"{pickle_path}:G_ema")
    discriminator = network_from_record(data["D"], "discriminator", f"{pickle_path}:D") if "D" in data else None
    return save_pretrained(out_dir, generator, discriminator)
