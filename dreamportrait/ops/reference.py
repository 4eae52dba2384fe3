"""Pure-PyTorch implementations of the ops: the executable specification.

Every kernel (C++ CPU, CUDA, Triton) is tested against these. They favour clarity over speed and
memory; autograd provides their gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def triplane_sample(
    planes: Tensor, points: Tensor, box_warp: float, axes: Sequence[int], reduce: str
) -> Tensor:
    """Bilinearly sample three feature planes at the projections of 3D points.

    planes ``(B, 3, C, H, W)``, points ``(B, N, 3)``. Plane ``p`` is sampled with
    ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` at
    ``u = points[..., axes[2p]] * 2 / box_warp`` (along W) and ``v = points[..., axes[2p + 1]] *
    2 / box_warp`` (along H). Returns ``(B, N, C)`` for ``reduce="mean"``/``"sum"`` over the planes,
    ``(B, N, 3, C)`` for ``"none"``.
    """
    if 0 in planes.shape[-2:]:
        # grid_sample refuses empty planes; every point lies outside them and samples zeros, as it
        # does from a plane of zeros (whose gradients are zero too).
        planes = F.pad(planes, (0, int(planes.shape[-1] == 0), 0, int(planes.shape[-2] == 0)))
    samples = []
    for plane in range(3):
        uv = points[..., [axes[2 * plane], axes[2 * plane + 1]]] * (2.0 / box_warp)  # (B, N, 2)
        sampled = F.grid_sample(
            planes[:, plane], uv.unsqueeze(1), mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B, C, 1, N)
        samples.append(sampled.squeeze(2).transpose(1, 2))  # (B, N, C)
    stacked = torch.stack(samples, dim=2)  # (B, N, 3, C)
    if reduce == "mean":
        return stacked.mean(dim=2)
    if reduce == "sum":
        return stacked.sum(dim=2)
    return stacked


def composite_rays(
    densities: Tensor, colors: Tensor, depths: Tensor, deltas: Tensor, transmittance_threshold: float = 0.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Alpha-composite samples along rays (the volume rendering quadrature).

    densities, depths, deltas ``(R, S)``, colors ``(R, S, C)``. With ``tau = densities * deltas``,
    ``T_i = exp(-sum_{j<i} tau_j)``, ``alpha_i = 1 - exp(-tau_i)`` and ``w_i = T_i alpha_i``, returns
    ``rgb (R, C) = sum w_i c_i``, ``depth (R,) = sum w_i t_i``, ``opacity (R,) = sum w_i`` and
    ``weights (R, S)``. Samples whose ``T_i`` is below ``transmittance_threshold`` get weight 0.
    """
    tau = densities * deltas
    optical_depth = torch.cat([torch.zeros_like(tau[:, :1]), torch.cumsum(tau, dim=1)[:, :-1]], dim=1)
    transmittance = torch.exp(-optical_depth)
    weights = transmittance * -torch.expm1(-tau)
    if transmittance_threshold > 0:
        weights = torch.where(transmittance < transmittance_threshold, torch.zeros_like(weights), weights)
    rgb = (weights.unsqueeze(-1) * colors).sum(dim=1)
    return rgb, (weights * depths).sum(dim=1), weights.sum(dim=1), weights


def gated_cross_attention(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor, key_padding_mask: Tensor | None, scale: float
) -> Tensor:
    """``tanh(gate)[h] * softmax(q k^T * scale + mask) v`` with an explicit softmax.

    q ``(B, H, Lq, D)``, k and v ``(B, H, Lk, D)``, gate ``(H,)``, key_padding_mask ``(B, Lk)`` bool
    (True = attend) or None. A query whose keys are all masked gets zeros.
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
    if key_padding_mask is not None:
        attend = key_padding_mask[:, None, None, :]
        scores = scores.masked_fill(~attend, float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        probabilities = torch.where(attend.any(dim=-1, keepdim=True), probabilities, torch.zeros_like(probabilities))
    else:
        probabilities = torch.softmax(scores, dim=-1)
    return torch.tanh(gate).view(1, -1, 1, 1) * torch.matmul(probabilities, v)
