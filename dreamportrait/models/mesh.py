"""Shape extraction: the generator's density on a grid, turned into a triangle mesh."""

from __future__ import annotations

import numpy as np
import torch
import trimesh
from skimage import measure
from torch import Tensor
from tqdm.auto import tqdm

from .triplane_generator import TriPlaneGenerator


@torch.no_grad()
def density_grid(G: TriPlaneGenerator, ws: Tensor, resolution: int = 128, chunk: int = 1 << 18,
                 noise_mode: str = "const", progress: bool = True, planes: Tensor | None = None) -> Tensor:
    """Raw density ``sigma`` of the sample ``ws`` ``(1, num_ws, w_dim)`` at the centres of a
    ``resolution``³ grid over the tri-planes' box ``[-box_warp/2, box_warp/2]³``, ``(D, H, W)``
    indexed ``[z, y, x]``. Points are decoded ``chunk`` at a time to bound memory. ``planes``
    (the sample's, e.g. from a text-conditioned synthesis) replace the synthesis from ws."""
    if ws.dim() != 3 or ws.shape[0] != 1:
        raise ValueError(f"ws must have shape (1, num_ws, w_dim) (one sample), got {tuple(ws.shape)}")
    if resolution < 2:
        raise ValueError(f"resolution must be at least 2, got {resolution}")
    half = G.rendering_kwargs["box_warp"] / 2
    axis = (torch.arange(resolution, device=ws.device, dtype=torch.float32) + 0.5) / resolution * 2 * half - half
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    points = torch.stack((x, y, z), dim=-1).reshape(1, -1, 3)
    planes = G.planes(ws, noise_mode) if planes is None else planes
    sigma = torch.empty(points.shape[1], device=ws.device)
    for start in tqdm(range(0, points.shape[1], chunk), desc="density grid", disable=not progress, leave=False):
        part = points[:, start : start + chunk]
        sigma[start : start + part.shape[1]] = G.sample_mixed(part, ws, planes=planes)["sigma"].reshape(-1)
    return sigma.reshape(resolution, resolution, resolution)


def extract_mesh(G: TriPlaneGenerator, ws: Tensor, resolution: int = 128, level: float = 10.0,
                 noise_mode: str = "const", progress: bool = True, planes: Tensor | None = None) -> trimesh.Trimesh:
    """The ``sigma = level`` iso-surface of the sample ``ws`` ``(1, num_ws, w_dim)`` by marching
    cubes (scikit-image), as a ``trimesh.Trimesh`` in world coordinates (EG3D's shape extraction
    uses level 10). Export with ``mesh.export("head.ply")`` (or ``.obj``, ``.glb``).

    Raises ValueError when the density never crosses ``level`` (no surface in the box). ``planes``:
    see :func:`density_grid`.
    """
    sigma = density_grid(G, ws, resolution, noise_mode=noise_mode, progress=progress, planes=planes).cpu().numpy()
    if not sigma.min() < level < sigma.max():
        raise ValueError(f"extract_mesh: density ranges over [{sigma.min():.3g}, {sigma.max():.3g}] and never "
                         f"crosses level={level}; choose a level inside that range")
    box = G.rendering_kwargs["box_warp"]
    spacing = box / resolution
    vertices, faces, normals, _ = measure.marching_cubes(sigma, level=level, spacing=(spacing,) * 3)
    # marching_cubes works in [z, y, x] index space; reversing to (x, y, z) world coordinates also
    # mirrors the triangles' winding, which makes them face outwards (positive volume).
    vertices = vertices[:, ::-1] + (spacing / 2 - box / 2)
    return trimesh.Trimesh(vertices=np.ascontiguousarray(vertices), faces=faces,
                           vertex_normals=np.ascontiguousarray(normals[:, ::-1]), process=False)
