"""``composite_rays``: alpha-compositing of samples along rays (volume rendering)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _registration, reference
from ._backend import select_backend
from ._checks import require_backend_dtype, require_floating, require_like, require_real, require_tensor

OP = "composite_rays"


def composite_rays(
    densities: Tensor,
    colors: Tensor,
    depths: Tensor,
    deltas: Tensor,
    transmittance_threshold: float | None = None,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Composite samples along rays front to back.

    With ``tau_i = densities_i * deltas_i``, transmittance ``T_i = exp(-sum_{j<i} tau_j)``,
    ``alpha_i = 1 - exp(-tau_i)`` and weights ``w_i = T_i alpha_i``:

    Args:
        densities: ``(..., S)`` non-negative, already activated densities.
        colors: ``(..., S, C)`` per-sample features.
        depths: ``(..., S)`` sample depths ``t_i``.
        deltas: ``(..., S)`` non-negative spacings ``delta_i``.
        transmittance_threshold: inference only (no gradient): stop a ray once ``T`` falls below
            it. Skipped samples had at most ``T`` weight in total, so each output changes by at
            most ``threshold`` times the largest ``|colour|`` (resp. depth, 1 for opacity).
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; default: by device, or the
            ``DREAMPORTRAIT_BACKEND`` environment variable.

    Returns:
        ``rgb (..., C) = sum w_i c_i``, ``depth (...) = sum w_i t_i``, ``opacity (...) = sum w_i``
        and ``weights (..., S)``. Differentiable with respect to all four inputs, through all four
        outputs (exactly, including the weights' own gradient). Negative densities or deltas are
        rejected in eager mode (the check is skipped under ``torch.compile``).
    """
    threshold = _check_arguments(densities, colors, depths, deltas, transmittance_threshold)
    chosen = select_backend(OP, densities.device.type, backend)
    require_backend_dtype(OP, chosen, "densities", densities)
    leading, samples, channels = densities.shape[:-1], densities.shape[-1], colors.shape[-1]
    rays = math.prod(leading)
    flat = (
        densities.reshape(rays, samples),
        colors.reshape(rays, samples, channels),
        depths.reshape(rays, samples),
        deltas.reshape(rays, samples),
    )
    if chosen == "reference":
        rgb, depth, opacity, weights = reference.composite_rays(*flat, threshold)
    elif chosen == "triton":
        rgb, depth, opacity, weights = torch.ops.dreamportrait.composite_rays_triton(*flat, threshold)
    else:
        rgb, depth, opacity, weights = torch.ops.dreamportrait.composite_rays(*flat, threshold)
    return (
        rgb.reshape(*leading, channels),
        depth.reshape(leading),
        opacity.reshape(leading),
        weights.reshape(*leading, samples),
    )


def _check_arguments(densities, colors, depths, deltas, transmittance_threshold) -> float:
    for name, value in (("densities", densities), ("colors", colors), ("depths", depths), ("deltas", deltas)):
        require_tensor(OP, name, value)
    if densities.dim() < 1:
        raise ValueError(f"{OP}: densities must have shape (..., S), got a scalar")
    shape = tuple(densities.shape)
    if colors.dim() != densities.dim() + 1 or tuple(colors.shape[:-1]) != shape:
        raise ValueError(f"{OP}: colors must have shape {shape + ('C',)}, got {tuple(colors.shape)}")
    for name, tensor in (("depths", depths), ("deltas", deltas)):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{OP}: {name} must have the shape of densities {shape}, got {tuple(tensor.shape)}")
    require_floating(OP, "densities", densities)
    for name, tensor in (("colors", colors), ("depths", depths), ("deltas", deltas)):
        require_like(OP, name, tensor, "densities", densities)
    if not torch.compiler.is_compiling():
        # Data-dependent checks (one reduction each); NaN passes and propagates.
        for name, tensor in (("densities", densities), ("deltas", deltas)):
            if tensor.numel() and bool((tensor < 0).any()):
                raise ValueError(f"{OP}: {name} must be non-negative, got a minimum of {tensor.min().item()}")
    if transmittance_threshold is None:
        return 0.0
    threshold = require_real(OP, "transmittance_threshold", transmittance_threshold)
    if not 0 < threshold < 1:
        raise ValueError(f"{OP}: transmittance_threshold must be in (0, 1), got {threshold}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (densities, colors, depths, deltas)):
        raise ValueError(
            f"{OP}: transmittance_threshold is for inference (it has no gradient); "
            "call under torch.no_grad() or drop it"
        )
    return threshold


# The Triton kernels as torch.library custom ops; the triton package is imported on first call.
@torch.library.custom_op("dreamportrait::composite_rays_triton", mutates_args=())
def _triton_forward(
    densities: Tensor, colors: Tensor, depths: Tensor, deltas: Tensor, transmittance_threshold: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .triton import composite_rays as kernels

    return kernels.forward(densities, colors, depths, deltas, transmittance_threshold)


@torch.library.custom_op("dreamportrait::composite_rays_triton_backward", mutates_args=())
def _triton_backward(
    grad_rgb: Tensor, grad_depth: Tensor, grad_opacity: Tensor, grad_weights: Tensor,
    densities: Tensor, colors: Tensor, depths: Tensor, deltas: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .triton import composite_rays as kernels

    return kernels.backward(grad_rgb, grad_depth, grad_opacity, grad_weights, densities, colors, depths, deltas)


_registration.register_composite_rays("dreamportrait::composite_rays_triton", "dreamportrait::composite_rays_triton_backward")
