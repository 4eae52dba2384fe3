"""Argument checks shared by the ops' public functions: every error names the op and the argument."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
}


def backend_dtypes(backend: str) -> tuple[torch.dtype, ...]:
    """The dtypes a compiled backend (``cpu``, ``cuda``, ``triton``) takes."""
    return _DTYPES[backend]


def require_tensor(op: str, name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")
    return value


def require_floating(op: str, name: str, tensor: Tensor) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {tensor.dtype}")


def require_like(op: str, name: str, tensor: Tensor, reference_name: str, reference: Tensor) -> None:
    """Same dtype and device as ``reference``."""
    if tensor.dtype != reference.dtype:
        raise TypeError(f"{op}: {name} dtype {tensor.dtype} does not match {reference_name} dtype {reference.dtype}")
    if tensor.device != reference.device:
        raise ValueError(f"{op}: {name} is on {tensor.device} but {reference_name} is on {reference.device}")


def require_real(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return float(value)


def require_backend_dtype(op: str, backend: str, name: str, tensor: Tensor) -> None:
    supported = _DTYPES.get(backend)
    if supported is not None and tensor.dtype not in supported:
        names = ", ".join(str(d).removeprefix("torch.") for d in supported)
        raise TypeError(f"{op}: the {backend} backend takes {name} of dtype {names}; got {tensor.dtype}")
