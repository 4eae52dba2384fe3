"""Where to sample along rays: EG3D's stratified and importance sampling, and merging sample sets.

Shapes follow EG3D's renderer: per-sample tensors are ``(B, R, S, K)`` (K = 1 for depths and
densities, C for colours).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def stratified_depths(
    batch: int,
    rays: int,
    ray_start: float | Tensor,
    ray_end: float | Tensor,
    samples: int,
    *,
    jitter: bool = True,
    disparity_space: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``samples`` depths per ray from ``ray_start`` to ``ray_end``, ``(B, R, S, 1)``.

    Evenly spaced (in depth, or in disparity with ``disparity_space``), each moved forward by a
    uniform fraction of the spacing when ``jitter`` (EG3D's stratified sampling; ``jitter=False``
    gives deterministic samples). ``ray_start``/``ray_end`` are floats or ``(B, R, 1)`` tensors.
    """
    if samples < 2:
        raise ValueError(f"stratified_depths: samples must be at least 2, got {samples}")
    steps = torch.linspace(0, 1, samples, device=device, dtype=dtype).reshape(1, 1, samples, 1)
    steps = steps.expand(batch, rays, samples, 1)
    if jitter:
        noise = torch.rand(steps.shape, device=steps.device, dtype=dtype, generator=generator)
        steps = steps + noise / (samples - 1)
    start = ray_start.unsqueeze(-2) if isinstance(ray_start, Tensor) else ray_start
    end = ray_end.unsqueeze(-2) if isinstance(ray_end, Tensor) else ray_end
    if disparity_space:
        return 1.0 / (1.0 / start * (1.0 - steps) + 1.0 / end * steps)
    return start + steps * (end - start)


def sample_pdf(
    bins: Tensor,
    weights: Tensor,
    count: int,
    *,
    deterministic: bool = False,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``count`` values per row by inverse-CDF sampling of a piecewise-constant density.

    bins ``(N, M + 1)`` (at least), weights ``(N, M)``: bin ``j`` spans ``[bins[:, j], bins[:, j+1]]``
    with mass proportional to ``weights[:, j] + eps``. ``deterministic`` uses evenly spaced
    quantiles instead of uniform random ones. Returns ``(N, count)``.
    """
    rows, bin_count = weights.shape
    weights = weights + eps
    cdf = torch.cumsum(weights / weights.sum(dim=-1, keepdim=True), dim=-1)
    cdf = torch.cat([torch.zeros_like(cdf[:, :1]), cdf], dim=-1)  # (N, M + 1), from 0 to 1
    if deterministic:
        u = torch.linspace(0, 1, count, device=bins.device, dtype=cdf.dtype).expand(rows, count)
    else:
        u = torch.rand(rows, count, device=bins.device, dtype=cdf.dtype, generator=generator)
    u = u.contiguous()
    index = torch.searchsorted(cdf, u, right=True)
    below = torch.clamp_min(index - 1, 0)
    above = torch.clamp_max(index, bin_count)
    around = torch.stack([below, above], dim=-1).view(rows, 2 * count)
    cdf_pair = torch.gather(cdf, 1, around).view(rows, count, 2)
    bins_pair = torch.gather(bins, 1, around).view(rows, count, 2)
    span = cdf_pair[..., 1] - cdf_pair[..., 0]
    span = torch.where(span < eps, torch.ones_like(span), span)  # an empty bin is never drawn
    return bins_pair[..., 0] + (u - cdf_pair[..., 0]) / span * (bins_pair[..., 1] - bins_pair[..., 0])


@torch.no_grad()
def importance_depths(
    depths: Tensor,
    weights: Tensor,
    count: int,
    *,
    deterministic: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """EG3D's fine-pass depths: ``count`` per ray drawn where the coarse pass put its weight.

    depths ``(B, R, S, 1)`` of the coarse samples, weights ``(B, R, S - 1, 1)`` from
    :func:`~dreamportrait.rendering.eg3d_ray_march`. The weights are smoothed as EG3D does (max-pool
    over neighbours, then average-pool, then + 0.01 so every interval keeps some chance) and
    sampled between the coarse intervals' midpoints. No gradient. Returns ``(B, R, count, 1)``.
    """
    batch, rays, samples, _ = depths.shape
    flat_depths = depths.reshape(batch * rays, samples)
    flat_weights = weights.reshape(batch * rays, 1, -1).float()
    smoothed = F.max_pool1d(flat_weights, 2, 1, padding=1)
    smoothed = F.avg_pool1d(smoothed, 2, 1).squeeze(1) + 0.01
    midpoints = 0.5 * (flat_depths[:, :-1] + flat_depths[:, 1:])
    drawn = sample_pdf(midpoints, smoothed[:, 1:-1].to(depths.dtype), count, deterministic=deterministic, generator=generator)
    return drawn.reshape(batch, rays, count, 1)


def merge_samples(
    depths_a: Tensor, colors_a: Tensor, densities_a: Tensor, depths_b: Tensor, colors_b: Tensor, densities_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge two sample sets of the same rays and sort them by depth (EG3D's ``unify_samples``).

    depths, densities ``(B, R, S_x, 1)``, colors ``(B, R, S_x, C)``; returns the merged
    ``(B, R, S_a + S_b, ·)`` tensors, colours and densities permuted with their depths.
    """
    depths = torch.cat([depths_a, depths_b], dim=-2)
    colors = torch.cat([colors_a, colors_b], dim=-2)
    densities = torch.cat([densities_a, densities_b], dim=-2)
    order = torch.argsort(depths, dim=-2)
    return (
        torch.gather(depths, -2, order),
        torch.gather(colors, -2, order.expand(-1, -1, -1, colors.shape[-1])),
        torch.gather(densities, -2, order),
    )
