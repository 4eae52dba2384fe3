"""Cameras in EG3D's conventions.

A camera label is 25 numbers: the flattened 4x4 camera-to-world matrix (OpenCV axes: x right,
y down, z forward) followed by the flattened 3x3 intrinsics normalised by the image size (focal
lengths in image widths, principal point at 0.5). The world is y-up; portrait cameras orbit a
pivot at a fixed radius. Angles follow EG3D's pose samplers: ``yaw`` is the azimuth around the
y axis and ``pitch`` the polar angle from +y, both in radians, ``(pi/2, pi/2)`` looking along -z
from +z (the frontal view).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CAMERA_LABEL_SIZE = 25
FRONTAL = math.pi / 2
# FFHQ's camera orbit and field of view, as EG3D's FFHQ rendering options and scripts give them.
FFHQ_RADIUS = 2.7
FFHQ_PIVOT = (0.0, 0.0, 0.2)
FFHQ_FOV_DEGREES = 18.837


def fov_to_intrinsics(fov_degrees: float, device: torch.device | str = "cpu") -> Tensor:
    """Normalised ``(3, 3)`` intrinsics of a square image with field of view ``fov_degrees``.

    Uses EG3D's formula ``f = 1 / (tan(fov / 2) * 1.414)`` with its rounded constants (pi as
    3.14159, sqrt 2 as 1.414), so renders match EG3D's scripts: their FFHQ field of view 18.837
    gives 4.2634 (FFHQ's dataset labels hold 4.2647).
    """
    if not 0 < fov_degrees < 180:
        raise ValueError(f"fov_to_intrinsics: fov_degrees must be in (0, 180), got {fov_degrees}")
    focal = 1 / (math.tan(fov_degrees * 3.14159 / 360) * 1.414)
    return torch.tensor([[focal, 0, 0.5], [0, focal, 0.5], [0, 0, 1]], device=device)


def look_at(origins: Tensor, targets: Tensor) -> Tensor:
    """Camera-to-world matrices ``(N, 4, 4)`` of cameras at ``origins`` ``(N, 3)`` looking at
    ``targets`` ``(N, 3)`` (or ``(3,)``), without roll (the world's +y is up)."""
    forward = F.normalize(targets - origins, dim=-1)
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=origins.dtype, device=origins.device).expand_as(forward)
    right = -F.normalize(torch.cross(world_up, forward, dim=-1), dim=-1)
    up = F.normalize(torch.cross(forward, right, dim=-1), dim=-1)
    cam2world = torch.eye(4, dtype=origins.dtype, device=origins.device).repeat(origins.shape[0], 1, 1)
    cam2world[:, :3, :3] = torch.stack((right, up, forward), dim=-1)
    cam2world[:, :3, 3] = origins
    return cam2world


def orbit_poses(yaw: Tensor, pitch: Tensor, radius: float = FFHQ_RADIUS, pivot: Sequence[float] = FFHQ_PIVOT) -> Tensor:
    """Camera-to-world matrices ``(N, 4, 4)`` of cameras on a sphere of ``radius`` around the world
    origin at angles ``yaw``, ``pitch`` ``(N,)`` (module docstring), looking at ``pivot`` (EG3D's
    ``LookAtPoseSampler``). EG3D maps the polar angle through ``arccos(1 - 2 pitch / pi)``, as here,
    so equal steps are equal areas of the sphere."""
    pitch = pitch.clamp(1e-5, math.pi - 1e-5)
    polar = torch.arccos(1 - 2 * pitch / math.pi)
    pivot_tensor = torch.as_tensor(pivot, dtype=yaw.dtype, device=yaw.device)
    origins = torch.stack(
        (
            radius * torch.sin(polar) * torch.cos(math.pi - yaw),
            radius * torch.cos(polar),
            radius * torch.sin(polar) * torch.sin(math.pi - yaw),
        ),
        dim=-1,
    )
    return look_at(origins, pivot_tensor.expand_as(origins))


def sample_orbit_angles(
    batch_size: int,
    yaw_range: float = math.radians(45),
    pitch_range: float = math.radians(20),
    distribution: str = "uniform",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """``batch_size`` random (yaw, pitch) ``(N,)`` around the frontal view: offsets uniform in
    ``±range`` (``distribution="uniform"``) or normal with that standard deviation (``"gaussian"``)."""
    if distribution not in ("uniform", "gaussian"):
        raise ValueError(f"sample_orbit_angles: distribution must be 'uniform' or 'gaussian', got {distribution!r}")
    if distribution == "uniform":
        offsets = torch.rand(2, batch_size, generator=generator) * 2 - 1
    else:
        offsets = torch.randn(2, batch_size, generator=generator)
    return FRONTAL + offsets[0] * yaw_range, FRONTAL + offsets[1] * pitch_range


def sample_orbit_poses(
    batch_size: int,
    yaw_range: float = math.radians(45),
    pitch_range: float = math.radians(20),
    radius: float = FFHQ_RADIUS,
    pivot: Sequence[float] = FFHQ_PIVOT,
    distribution: str = "uniform",
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``batch_size`` random portrait poses ``(N, 4, 4)`` (:func:`sample_orbit_angles`)."""
    yaws, pitches = sample_orbit_angles(batch_size, yaw_range, pitch_range, distribution, generator)
    return orbit_poses(yaws.to(device), pitches.to(device), radius, pivot)


def sample_camera_labels(count: int, yaw_range: float, pitch_range: float, radius: float = FFHQ_RADIUS,
                         pivot: Sequence[float] = FFHQ_PIVOT, fov_degrees: float = FFHQ_FOV_DEGREES,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``count`` random camera labels ``(N, 25)`` of the portrait prior (uniform yaw/pitch offsets
    within ``±range`` radians) and their yaws ``(N,)`` (for view-dependent prompts)."""
    yaws, pitches = sample_orbit_angles(count, yaw_range, pitch_range, generator=generator)
    return camera_labels(orbit_poses(yaws, pitches, radius, pivot), fov_to_intrinsics(fov_degrees)), yaws


def view_cameras(count: int, yaw_range: float, radius: float = FFHQ_RADIUS, pivot: Sequence[float] = FFHQ_PIVOT,
                 fov_degrees: float = FFHQ_FOV_DEGREES, pitch: float = 0.0) -> Tensor:
    """``count`` camera labels ``(N, 25)`` sweeping yaw evenly over ``±yaw_range`` radians around the
    frontal view (one camera: the frontal one), at ``pitch`` radians from frontal."""
    yaws = FRONTAL + (torch.linspace(-1, 1, count) if count > 1 else torch.zeros(1)) * yaw_range
    poses = orbit_poses(yaws, torch.full_like(yaws, FRONTAL + pitch), radius, pivot)
    return camera_labels(poses, fov_to_intrinsics(fov_degrees))


def camera_labels(cam2world: Tensor, intrinsics: Tensor) -> Tensor:
    """The 25-value labels ``(N, 25)`` of cameras ``(N, 4, 4)`` with intrinsics ``(3, 3)`` or ``(N, 3, 3)``."""
    if cam2world.dim() != 3 or cam2world.shape[1:] != (4, 4):
        raise ValueError(f"camera_labels: cam2world must have shape (N, 4, 4), got {tuple(cam2world.shape)}")
    intrinsics = intrinsics.to(cam2world).expand(cam2world.shape[0], 3, 3)
    return torch.cat([cam2world.reshape(-1, 16), intrinsics.reshape(-1, 9)], dim=1)


def split_camera_labels(c: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, 25)`` labels -> camera-to-world ``(N, 4, 4)`` and intrinsics ``(N, 3, 3)``."""
    check_camera_labels("c", c)
    return c[:, :16].reshape(-1, 4, 4), c[:, 16:25].reshape(-1, 3, 3)


def check_camera_labels(name: str, c, batch_size: int | None = None) -> None:
    """Raise a ValueError naming ``name`` unless ``c`` is a floating ``(N, 25)`` tensor (``N ==
    batch_size`` when given)."""
    if not isinstance(c, Tensor) or c.dim() != 2 or c.shape[1] != CAMERA_LABEL_SIZE or not c.is_floating_point():
        shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
        raise ValueError(f"{name} must be a floating tensor of camera labels with shape (N, {CAMERA_LABEL_SIZE}) "
                         f"(4x4 cam2world + 3x3 intrinsics), got {shape}")
    if batch_size is not None and c.shape[0] != batch_size:
        raise ValueError(f"{name} has {c.shape[0]} camera labels but the batch has {batch_size} samples")


def camera_rays(cam2world: Tensor, intrinsics: Tensor, resolution: int) -> tuple[Tensor, Tensor]:
    """One ray through each pixel centre of a ``resolution``² image (EG3D's ``RaySampler``).

    Returns origins and unit directions ``(N, resolution², 3)``, pixels in row-major order.
    Intrinsics may include skew.
    """
    batch, pixels = cam2world.shape[0], resolution * resolution
    device, dtype = cam2world.device, cam2world.dtype
    centres = (torch.arange(resolution, device=device, dtype=dtype) + 0.5) / resolution
    y_cam, x_cam = torch.meshgrid(centres, centres, indexing="ij")
    x_cam, y_cam = x_cam.reshape(1, pixels), y_cam.reshape(1, pixels)
    fx, fy = intrinsics[:, 0, 0, None], intrinsics[:, 1, 1, None]
    cx, cy, skew = intrinsics[:, 0, 2, None], intrinsics[:, 1, 2, None], intrinsics[:, 0, 1, None]
    x_lift = (x_cam - cx + cy * skew / fy - skew * y_cam / fy) / fx
    y_lift = (y_cam - cy) / fy
    camera_points = torch.stack((x_lift, y_lift, torch.ones_like(x_lift)), dim=-1)  # (N, P, 3) at z = 1
    world_points = camera_points @ cam2world[:, :3, :3].transpose(1, 2) + cam2world[:, None, :3, 3]
    origins = cam2world[:, None, :3, 3].expand(batch, pixels, 3)
    directions = F.normalize(world_points - origins, dim=2)
    return origins, directions
