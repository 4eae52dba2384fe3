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
