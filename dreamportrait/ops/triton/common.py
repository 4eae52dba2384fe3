"""Accumulation types, matmul precision and channel tiles shared by the ops' Triton kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums run in float64 for float64 inputs and in float32 for every other dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulation_type(dtype: torch.dtype):
    """:func:`accumulation_dtype` as the kernels' compile-time ``ACC`` type."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: TF32 for float32 when torch allows TF32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32``), IEEE otherwise (16-bit operands run on the tensor
    cores either way; float64 stays float64)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def channel_block(channels: int) -> int:
    """Channels per tile: the next power of two, at least 16 (the smallest tile Triton vectorises
    well) and at most 64 (more channels loop over tiles)."""
    return max(16, min(64, triton.next_power_of_2(max(channels, 1))))
