"""Checks of the Triton operators' own arguments, made before any kernel touches memory.

The public ops check their arguments first, with friendlier messages; these keep direct calls of
``torch.ops.dreamportrait.*_triton`` (torch.compile graphs, other libraries) memory-safe, as the
C++ operators' host checks do: every tensor's shape, dtype and device, every scalar's range, and
sizes within the kernels' 32-bit indices and launch grids. Every operator's fake (meta) kernel runs
them too (``indexing=False``: the limits are the Triton kernels'), so a call with tensors on
different devices, one of them meta, is refused rather than given fake outputs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import backend_dtypes
from ..triplane_sample import REDUCTIONS


def require(op: str, condition: bool, message: str, error: type[Exception] = ValueError) -> None:
    if not condition:
        raise error(f"{op}: {message}")


def require_tensor(op: str, name: str, tensor, shape: tuple[int, ...] | None = None,
                   like: Tensor | None = None, dtype: torch.dtype | None = None, like_name: str = "") -> None:
    """A tensor of ``shape`` (if given), of ``dtype`` or else ``like``'s dtype, on ``like``'s device
    (``like_name``: the argument ``like`` is, for the message)."""
    require(op, isinstance(tensor, Tensor), f"{name} must be a Tensor, got {type(tensor).__name__}", TypeError)
    if shape is not None:
        require(op, tuple(tensor.shape) == tuple(shape), f"{name} must have shape {tuple(shape)}, "
                f"got {tuple(tensor.shape)}")
    source = f" (as {like_name})" if like_name else ""
    expected = dtype if dtype is not None else (like.dtype if like is not None else None)
    if expected is not None:
        require(op, tensor.dtype == expected, f"{name} must be {expected}{'' if dtype else source}, "
                f"got {tensor.dtype}", TypeError)
    if like is not None:
        require(op, tensor.device == like.device, f"{name} must be on {like.device}{source}, got {tensor.device}")


# The kernels index a dimension's elements with 32-bit program ids times a block plus an offset, and
# a CUDA grid takes at most 65535 programs along its second and third axes.
MAX_INDEXED = 2**31 - 2**16
MAX_GRID_YZ = 65535


def require_indexable(op: str, name: str, what: str, size: int, limit: int = MAX_INDEXED) -> None:
    require(op, size <= limit, f"{name} is too large: {size} {what}, more than the {limit} the Triton kernel's "
            f"32-bit indices and launch grid take")


def require_kernel_dtype(op: str, name: str, tensor: Tensor) -> None:
    supported = backend_dtypes("triton")
    require(op, isinstance(tensor, Tensor) and tensor.dtype in supported,
            f"{name} must be a tensor of dtype {', '.join(str(d) for d in supported)}, "
            f"got {getattr(tensor, 'dtype', type(tensor).__name__)}", TypeError)


def check_triplane(op: str, planes: Tensor, points: Tensor, box_warp: float, axes, reduce: str,
                   grad_output: Tensor | None = None, indexing: bool = True) -> None:
    require_kernel_dtype(op, "planes", planes)
    require(op, planes.dim() == 5 and planes.shape[1] == 3, f"planes must have shape (B, 3, C, H, W), "
            f"got {tuple(planes.shape)}")
    batch, _, channels = planes.shape[:3]
    require_tensor(op, "points", points, like=planes, like_name="planes")
    require(op, points.dim() == 3 and points.shape[0] == batch and points.shape[2] == 3,
            f"points must have shape ({batch}, N, 3), got {tuple(points.shape)}")
    if indexing:
        require_indexable(op, "planes", "batch elements", batch, MAX_GRID_YZ)
        require_indexable(op, "points", "points per batch element", points.shape[1])
        require_indexable(op, "planes", "channels", channels)
    require(op, math.isfinite(box_warp) and box_warp > 0 and math.isfinite(2.0 / box_warp),
            f"box_warp must be positive with a finite reciprocal, got {box_warp}")
    require(op, len(axes) == 6 and all(int(a) in (0, 1, 2) for a in axes), f"axes must be six of 0, 1, 2, got {axes}")
    require(op, reduce in REDUCTIONS, f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if grad_output is not None:
        count = points.shape[1]
        shape = (batch, count, 3, channels) if reduce == "none" else (batch, count, channels)
        require_tensor(op, "grad_output", grad_output, shape, like=planes, like_name="planes")


def check_decoder(op: str, planes: Tensor, points: Tensor, box_warp: float, axes, weight1: Tensor, bias1: Tensor,
                  weight2: Tensor, bias2: Tensor, grad_output: Tensor | None = None, indexing: bool = True) -> None:
    """sample_and_decode's arguments: the tri-plane half as :func:`check_triplane` ("mean"), then
    weight1 (K, C), bias1 (K,), weight2 (O, K) with O >= 2, bias2 (O,) like planes."""
    check_triplane(op, planes, points, box_warp, axes, "mean", indexing=indexing)
    channels = planes.shape[2]
    require_tensor(op, "weight1", weight1, like=planes, like_name="planes")
    require(op, weight1.dim() == 2 and weight1.shape[1] == channels and weight1.shape[0] >= 1,
            f"weight1 must have shape (K, {channels}), got {tuple(weight1.shape)}")
    hidden = weight1.shape[0]
    require_tensor(op, "bias1", bias1, (hidden,), like=planes, like_name="planes")
    require_tensor(op, "weight2", weight2, like=planes, like_name="planes")
    require(op, weight2.dim() == 2 and weight2.shape[1] == hidden and weight2.shape[0] >= 2,
            f"weight2 must have shape (O, {hidden}) with O >= 2, got {tuple(weight2.shape)}")
    outputs = weight2.shape[0]
    require_tensor(op, "bias2", bias2, (outputs,), like=planes, like_name="planes")
    if grad_output is not None:
        require_tensor(op, "grad_output", grad_output, (planes.shape[0], points.shape[1], outputs), like=planes,
                       like_name="planes")


def check_composite(op: str, densities: Tensor, colors: Tensor, depths: Tensor, deltas: Tensor,
                    indexing: bool = True) -> None:
    require_kernel_dtype(op, "densities", densities)
    require(op, densities.dim() == 2, f"densities must have shape (R, S), got {tuple(densities.shape)}")
    rays, samples = densities.shape
    require_tensor(op, "colors", colors, like=densities, like_name="densities")
    require(op, colors.dim() == 3 and colors.shape[:2] == (rays, samples),
            f"colors must have shape ({rays}, {samples}, C), got {tuple(colors.shape)}")
    require_tensor(op, "depths", depths, (rays, samples), like=densities, like_name="densities")
    require_tensor(op, "deltas", deltas, (rays, samples), like=densities, like_name="densities")
    if indexing:
        require_indexable(op, "densities", "rays", rays)


def check_composite_gradients(op: str, densities: Tensor, colors: Tensor, grad_rgb: Tensor, grad_depth: Tensor,
                              grad_opacity: Tensor, grad_weights: Tensor) -> None:
    rays, samples = densities.shape
    for name, tensor, shape in (("grad_rgb", grad_rgb, (rays, colors.shape[2])), ("grad_depth", grad_depth, (rays,)),
                                ("grad_opacity", grad_opacity, (rays,)), ("grad_weights", grad_weights, (rays, samples))):
        require_tensor(op, name, tensor, shape, like=densities, like_name="densities")


def check_attention(op: str, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, key_padding_mask: Tensor | None,
                    scale: float, indexing: bool = True) -> None:
    require_kernel_dtype(op, "q", q)
    require(op, q.dim() == 4, f"q must have shape (B, H, Lq, D), got {tuple(q.shape)}")
    batch, heads, _, dim = q.shape
    require_tensor(op, "k", k, like=q, like_name="q")
    require(op, k.dim() == 4 and (k.shape[0], k.shape[1], k.shape[3]) == (batch, heads, dim),
            f"k must have shape ({batch}, {heads}, Lk, {dim}), got {tuple(k.shape)}")
    require_tensor(op, "v", v, tuple(k.shape), like=q, like_name="q")
    require_tensor(op, "gate", gate, (heads,), like=q, like_name="q")
    if key_padding_mask is not None:
        require_tensor(op, "key_padding_mask", key_padding_mask, (batch, k.shape[2]), like=q, dtype=torch.bool,
                       like_name="q")
    if indexing:
        require_indexable(op, "q", "(batch, head) pairs", batch * heads, MAX_GRID_YZ)
        require_indexable(op, "q", "queries per head", q.shape[2])
        require_indexable(op, "k", "keys per head", k.shape[2])
    require(op, math.isfinite(scale), f"scale must be finite, got {scale}")


def check_attention_gradients(op: str, q: Tensor, grad_out: Tensor, lse: Tensor, lse_dtype: torch.dtype) -> None:
    require_tensor(op, "grad_out", grad_out, tuple(q.shape), like=q, like_name="q")
    require_tensor(op, "lse", lse, tuple(q.shape[:3]), like=q, dtype=lse_dtype, like_name="q")
