"""Weights on disk: a module's state dict as a safetensors file, written atomically and read back
strictly. It imports nothing from the networks, so the models, the trainers, the judge and the
baseline save and load weights through it without importing the pretrained-directory format
(:mod:`dreamportrait.models.pretrained`, which builds on it)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ._atomic import atomic_path


def load_weights(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` into ``module`` strictly; a ValueError names every missing, unknown or
    wrongly shaped key (up to ten of each)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    wrong = [f"{key} {tuple(tensors[key].shape)} (expected {tuple(expected[key].shape)})"
             for key in expected if key in tensors and tuple(tensors[key].shape) != tuple(expected[key].shape)]
    problems = [f"{what}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}"
                for what, keys in (("missing keys", missing), ("unknown keys", unknown), ("wrong shapes", wrong)) if keys]
    if problems:
        raise ValueError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(dict(tensors), strict=True)


def save_weights(module: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``module``'s state dict as a safetensors file, written atomically."""
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in module.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return Path(path)


def read_weights(module: nn.Module, path: str | Path) -> None:
    """Load a safetensors file into ``module`` strictly (:func:`load_weights`); a missing file
    raises FileNotFoundError, a damaged one ValueError, both naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is damaged (not a readable safetensors file): {error}") from None
    load_weights(module, tensors, str(path))
