"""EG3D's ray marcher (``MipRayMarcher2``) computed with :func:`dreamportrait.ops.composite_rays`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import composite_rays


def eg3d_ray_march(
    colors: Tensor, densities: Tensor, depths: Tensor, options: Mapping, *, backend: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Composite EG3D's per-sample outputs into pixels, as EG3D's ``MipRayMarcher2`` does.

    Consecutive samples are merged into intervals: the interval's colour, raw density and depth
    are the midpoints of its two samples, its density ``softplus(sigma_mid - 1)`` and its length
    the depth difference. The depth is ``sum w t / sum w`` (NaN -> inf), clamped to the range of
    all ``depths``; ``options["white_back"]`` adds ``1 - sum w`` to the colour, and
    ``options["background"]`` (ours, not EG3D's: a grey level ``b`` in [0, 1]) adds ``b (1 - sum w)``,
    so empty space shows that background instead of black; colour is finally mapped from [0, 1] to
    [-1, 1]. EG3D computes transmittance as ``cumprod(1 - alpha + 1e-10)``;
    here it is ``exp(-sum sigma delta)``, equal up to that 1e-10 term.

    Args:
        colors: ``(B, R, S, C)``; densities, depths: ``(B, R, S, 1)`` raw densities and sorted depths.
        options: ``clamp_mode`` (only ``"softplus"``) and optional ``white_back`` or ``background``.
        backend: passed to :func:`~dreamportrait.ops.composite_rays`.

    Returns:
        rgb ``(B, R, C)``, depth ``(B, R, 1)``, weights ``(B, R, S - 1, 1)``.
    """
    background = _background(options)
    if options.get("clamp_mode") != "softplus":
        raise ValueError(f"eg3d_ray_march: options['clamp_mode'] must be 'softplus', got {options.get('clamp_mode')!r}")
    for name, tensor in (("densities", densities), ("depths", depths)):
        if tensor.dim() != 4 or tensor.shape[-1] != 1 or tensor.shape[:3] != colors.shape[:3]:
            raise ValueError(
                f"eg3d_ray_march: {name} must have shape {tuple(colors.shape[:3]) + (1,)}, got {tuple(tensor.shape)}"
            )
    deltas = depths[:, :, 1:] - depths[:, :, :-1]
    colors_mid = (colors[:, :, :-1] + colors[:, :, 1:]) / 2
    densities_mid = F.softplus((densities[:, :, :-1] + densities[:, :, 1:]) / 2 - 1)
    depths_mid = (depths[:, :, :-1] + depths[:, :, 1:]) / 2
    rgb, depth_sum, opacity, weights = composite_rays(
        densities_mid.squeeze(-1), colors_mid, depths_mid.squeeze(-1), deltas.squeeze(-1), backend=backend
    )
    depth = torch.nan_to_num(depth_sum / opacity, float("inf"))
    depth = torch.clamp(depth, torch.min(depths), torch.max(depths)).unsqueeze(-1)
    if background:
        rgb = rgb + background * (1 - opacity.unsqueeze(-1))
    return rgb * 2 - 1, depth, weights.unsqueeze(-1)


def _background(options: Mapping) -> float:
    """The colour of empty space in [0, 1]: ``background``, 1 for ``white_back``, else 0 (black)."""
    background = options.get("background")
    if background is None:
        return 1.0 if options.get("white_back", False) else 0.0
    if options.get("white_back", False):
        raise ValueError("eg3d_ray_march: give options['white_back'] or options['background'], not both")
    if isinstance(background, bool) or not isinstance(background, (int, float)) or not 0 <= background <= 1:
        raise ValueError(f"eg3d_ray_march: options['background'] must be a number in [0, 1], got {background!r}")
    return float(background)
