"""``triplane_sample``: bilinear sampling of EG3D-style tri-plane features at 3D points."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _registration, reference
from ._backend import select_backend
from ._checks import require_backend_dtype, require_floating, require_like, require_real, require_tensor

EG3D_AXES = (0, 1, 0, 2, 2, 0)
"""The published EG3D generator's projections: planes (x, y), (x, z), (z, x). It reuses x and z
and never sees y on a third plane; imported EG3D weights need it."""

ORTHOGONAL_AXES = (0, 1, 0, 2, 1, 2)
"""Three distinct planes (x, y), (x, z), (y, z), for new models."""

OP = "triplane_sample"
REDUCTIONS = ("mean", "sum", "none")


def triplane_sample(
    planes: Tensor,
    points: Tensor,
    box_warp: float = 1.0,
    axes: Sequence[int] = EG3D_AXES,
    reduce: str = "mean",
    *,
    backend: str | None = None,
) -> Tensor:
    """Sample tri-plane features at 3D points.

    Args:
        planes: ``(B, 3, C, H, W)`` feature planes, any strides (planes stored channel-innermost,
            ``planes.permute(0, 1, 3, 4, 2).is_contiguous()``, are read without a copy).
        points: ``(B, N, 3)`` coordinates; the box ``[-box_warp/2, box_warp/2]^3`` maps onto the
            planes, points outside it sample zeros (grid_sample's zero padding).
        box_warp: side length of the box the planes cover, positive, with ``2 / box_warp`` finite in
            the points' dtype.
        axes: six axis indices ``(u0, v0, u1, v1, u2, v2)``; plane ``p`` is sampled at
            ``(points[..., u_p], points[..., v_p]) * 2 / box_warp`` with ``u`` along W and ``v``
            along H, bilinearly with ``align_corners=False``. :data:`EG3D_AXES` (default) or
            :data:`ORTHOGONAL_AXES`.
        reduce: ``"mean"`` or ``"sum"`` over the three planes -> ``(B, N, C)``; ``"none"`` ->
            ``(B, N, 3, C)``.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; default: by device, or the
            ``DREAMPORTRAIT_BACKEND`` environment variable.

    Differentiable with respect to ``planes`` and ``points``. CPU kernels take float32 and float64;
    CUDA and Triton kernels also float16 and bfloat16, accumulating in float32.
    """
    axes = _check_arguments(planes, points, box_warp, axes, reduce)
    chosen = select_backend(OP, planes.device.type, backend)
    require_backend_dtype(OP, chosen, "planes", planes)
    if chosen == "reference":
        return reference.triplane_sample(planes, points, float(box_warp), axes, reduce)
    if chosen == "triton":
        return torch.ops.dreamportrait.triplane_sample_triton(planes, points, float(box_warp), axes, reduce)
    return torch.ops.dreamportrait.triplane_sample(planes, points, float(box_warp), axes, reduce)


def _check_arguments(planes, points, box_warp, axes, reduce) -> list[int]:
    require_tensor(OP, "planes", planes)
    require_tensor(OP, "points", points)
    if planes.dim() != 5 or planes.shape[1] != 3:
        raise ValueError(f"{OP}: planes must have shape (B, 3, C, H, W), got {tuple(planes.shape)}")
    if points.dim() != 3 or points.shape[2] != 3:
        raise ValueError(f"{OP}: points must have shape (B, N, 3), got {tuple(points.shape)}")
    if points.shape[0] != planes.shape[0]:
        raise ValueError(f"{OP}: points has batch size {points.shape[0]} but planes has {planes.shape[0]}")
    require_floating(OP, "planes", planes)
    require_like(OP, "points", points, "planes", planes)
    if require_real(OP, "box_warp", box_warp) <= 0:
        raise ValueError(f"{OP}: box_warp must be positive, got {box_warp}")
    # Points are scaled by 2 / box_warp in their dtype: a box too small for it would turn every
    # coordinate into inf or NaN.
    if 2.0 / box_warp > torch.finfo(points.dtype).max:
        raise ValueError(f"{OP}: box_warp must be at least {2.0 / torch.finfo(points.dtype).max:.3g} for "
                         f"{str(points.dtype).removeprefix('torch.')} points (2 / box_warp finite), got {box_warp}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"{OP}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return _check_axes(axes)


def _check_axes(axes) -> list[int]:
    if isinstance(axes, (str, bytes)) or not isinstance(axes, Sequence) or len(axes) != 6:
        raise ValueError(f"{OP}: axes must be a sequence of six ints (u0, v0, u1, v1, u2, v2), got {axes!r}")
    checked = []
    for axis in axes:
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not 0 <= axis <= 2:
            raise ValueError(f"{OP}: axes entries must be 0, 1 or 2, got {tuple(axes)}")
        checked.append(int(axis))
    for plane in range(3):
        if checked[2 * plane] == checked[2 * plane + 1]:
            raise ValueError(
                f"{OP}: axes gives plane {plane} the same axis {checked[2 * plane]} for u and v, "
                f"got {tuple(axes)}"
            )
    return checked


# The Triton kernels as torch.library custom ops; the triton package is imported on first call.
@torch.library.custom_op("dreamportrait::triplane_sample_triton", mutates_args=())
def _triton_forward(planes: Tensor, points: Tensor, box_warp: float, axes: list[int], reduce: str) -> Tensor:
    from .triton import triplane_sample as kernels

    return kernels.forward(planes, points, box_warp, axes, reduce)


@torch.library.custom_op("dreamportrait::triplane_sample_triton_backward_planes", mutates_args=())
def _triton_backward_planes(
    grad_output: Tensor, planes: Tensor, points: Tensor, box_warp: float, axes: list[int], reduce: str
) -> Tensor:
    from .triton import triplane_sample as kernels

    return kernels.backward_planes(grad_output, planes, points, box_warp, axes, reduce)


@torch.library.custom_op("dreamportrait::triplane_sample_triton_backward_points", mutates_args=())
def _triton_backward_points(
    grad_output: Tensor, planes: Tensor, points: Tensor, box_warp: float, axes: list[int], reduce: str
) -> Tensor:
    from .triton import triplane_sample as kernels

    return kernels.backward_points(grad_output, planes, points, box_warp, axes, reduce)


_registration.register_triplane_sample(
    "dreamportrait::triplane_sample_triton",
    "dreamportrait::triplane_sample_triton_backward_planes",
    "dreamportrait::triplane_sample_triton_backward_points",
)
