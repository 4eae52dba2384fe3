"""Benchmark inputs shaped like EG3D's rendering, and a peak-memory probe.

Points are camera-ray samples as EG3D's renderer makes them (camera on a sphere of radius 2.7
looking at the origin, 18.84 degree field of view, depths in [2.25, 3.3]), so memory access has
the spatial coherence of real rendering rather than that of uniform noise.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TriplaneWorkload:
    name: str
    batch: int
    channels: int
    resolution: int
    rays_side: int  # rays_side x rays_side rays per image
    samples: int  # samples per ray

    @property
    def points(self) -> int:
        return self.rays_side**2 * self.samples


TRIPLANE_WORKLOADS = [
    TriplaneWorkload("eg3d-inference", batch=1, channels=32, resolution=256, rays_side=64, samples=96),
    TriplaneWorkload("training-batch", batch=4, channels=32, resolution=256, rays_side=64, samples=48),
]


def ray_points(batch: int, rays_side: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, rays_side**2 * samples, 3) points along camera rays through the unit box."""
    yaw = (torch.rand(batch, generator=generator) - 0.5) * math.radians(60)
    pitch = (torch.rand(batch, generator=generator) - 0.5) * math.radians(30)
    origin = 2.7 * torch.stack([torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch), torch.cos(yaw) * torch.cos(pitch)], -1)
    forward = -origin / origin.norm(dim=-1, keepdim=True)
    right = torch.nn.functional.normalize(torch.cross(torch.tensor([0.0, 1.0, 0.0]).expand_as(forward), forward, dim=-1), dim=-1)
    up = torch.cross(forward, right, dim=-1)
    half = math.tan(math.radians(18.837) / 2)
    grid = (torch.arange(rays_side) + 0.5) / rays_side * 2 - 1
    v, u = torch.meshgrid(grid * half, grid * half, indexing="ij")
    directions = forward[:, None] + u.reshape(1, -1, 1) * right[:, None] + v.reshape(1, -1, 1) * up[:, None]
    directions = directions / directions.norm(dim=-1, keepdim=True)  # (B, R, 3)
    depths = torch.linspace(2.25, 3.3, samples)
    points = origin[:, None, None] + directions[:, :, None] * depths[None, None, :, None]
    return points.reshape(batch, -1, 3).contiguous()


def triplane_inputs(workload: TriplaneWorkload, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    planes = torch.randn(workload.batch, 3, workload.channels, workload.resolution, workload.resolution, generator=generator)
    points = ray_points(workload.batch, workload.rays_side, workload.samples, generator)
    return planes.to(device, dtype), points.to(device, dtype)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Reset the resident-memory high-water mark to the current usage (Linux) and return it.

    (getrusage's ru_maxrss cannot be used: a child inherits its parent's peak across exec.)
    """
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def _probe(workload_name: str, backend: str, backward: bool) -> None:
    """Print the peak resident memory a call adds beyond its inputs (run in a fresh process)."""
    from dreamportrait.ops import triplane_sample

    workload = next(w for w in TRIPLANE_WORKLOADS if w.name == workload_name)
    planes, points = triplane_inputs(workload)
    planes.requires_grad_(backward)
    points.requires_grad_(backward)
    # Warm up on a tiny problem so the extension and allocator are loaded before the baseline.
    small_planes = torch.randn(1, 3, 2, 4, 4, requires_grad=backward)
    triplane_sample(small_planes, torch.rand(1, 8, 3, requires_grad=backward), backend=backend).sum()
    baseline = reset_peak_rss()
    out = triplane_sample(planes, points, backend=backend)
    if backward:
        out.backward(torch.ones_like(out))
    print(peak_rss_bytes() - baseline, out.numel() * out.element_size())


if __name__ == "__main__":
    _probe(sys.argv[1], sys.argv[2], sys.argv[3] == "backward")
