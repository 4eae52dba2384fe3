"""Procedural 3D heads: a density + colour field per head, rendered with ``composite_rays``.

A head is a union of soft shapes (signed-distance approximations through a sigmoid): an ellipsoid
head and a neck in the skin tone, eyes and a mouth, and, by attribute, hair (a shell over the
skull; long hair adds a curtain behind the head), a beard (a shell over the lower face), glasses
(two rings, lenses and a bridge in front of the eyes) and a cap with a brim. Where shapes overlap,
colour goes to the later one in :data:`PARTS`. Small random variations (head size, hairline,
hair length, colour jitter) come from the sample's seed.

World coordinates follow EG3D: y up, the face looks along +z, the head fills the tri-plane box
``[-0.5, 0.5]³``; cameras orbit at radius 2.7 (:data:`WORLD_CAMERAS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..models.cameras import camera_rays, sample_camera_labels, split_camera_labels
from ..ops import composite_rays
from .attributes import HeadAttributes

WORLD_CAMERAS = {"radius": 2.7, "pivot": (0.0, 0.0, 0.0), "fov_degrees": 18.837,
                 "yaw_range_degrees": 45.0, "pitch_range_degrees": 20.0, "near": 2.25, "far": 3.3}
"""The portrait pose prior and ray range of the world (yaw within ±45°, pitch within ±20°)."""

SKIN = {"light": (0.93, 0.78, 0.68), "medium": (0.74, 0.53, 0.38), "dark": (0.38, 0.25, 0.18)}
HAIR = {"black": (0.07, 0.06, 0.06), "brown": (0.42, 0.25, 0.12), "blond": (0.93, 0.80, 0.42),
        "red": (0.78, 0.20, 0.08), "white": (0.94, 0.94, 0.92), "none": (0.0, 0.0, 0.0)}
HAT = {"none": (0.0, 0.0, 0.0), "red": (0.82, 0.08, 0.10), "blue": (0.10, 0.22, 0.80)}
BACKGROUND = 0.85
PARTS = ("skin", "eyes", "mouth", "beard", "hair", "hat", "lenses", "frames")
MASK_PARTS = {"skin": ("skin", "eyes", "mouth"), "hair": ("hair",), "beard": ("beard",),
              "glasses": ("lenses", "frames"), "hat": ("hat",)}
"""The regions of :func:`render_part_masks`, each a union of :data:`PARTS`: what a caption's
phrase names (the skin phrase names the face, "glasses" their lenses and frames)."""
MAX_DENSITY = 80.0
SOFTNESS = 0.006


@dataclass
class HeadBatch:
    """Per-head parameters ``(B, ...)`` of a batch of heads."""

    center: Tensor        # (B, 3)
    radii: Tensor         # (B, 3)
    skin: Tensor          # (B, 3)
    hair: Tensor          # (B, 3)
    hat_color: Tensor     # (B, 3)
    hairline: Tensor      # (B,) height of the hairline above the head centre
    hair_length: Tensor   # (B,) lowest point of long hair
    has_hair: Tensor      # (B,) 0/1
    long_hair: Tensor
    beard: Tensor
    glasses: Tensor
    hat: Tensor

    def repeat_interleave(self, count: int) -> HeadBatch:
        """Each head ``count`` times in a row ``(B * count, ...)``: the same heads, to be seen from
        several cameras."""
        return HeadBatch(**{f.name: getattr(self, f.name).repeat_interleave(count, dim=0) for f in fields(self)})

    @staticmethod
    def from_attributes(heads: list[HeadAttributes], generator: torch.Generator) -> HeadBatch:
        count = len(heads)

        def jitter(*shape, scale):
            return (torch.rand(*shape, generator=generator) * 2 - 1) * scale

        def colors(table, key):
            base = torch.tensor([table[getattr(h, key)] for h in heads])
            return (base + jitter(count, 3, scale=0.03)).clamp(0, 1)

        flag = lambda test: torch.tensor([1.0 if test(h) else 0.0 for h in heads])  # noqa: E731
        return HeadBatch(
            center=torch.tensor([0.0, 0.03, 0.0]) + jitter(count, 3, scale=0.01),
            radii=torch.tensor([0.19, 0.245, 0.21]) * (1 + jitter(count, 1, scale=0.05)) * (1 + jitter(count, 3, scale=0.03)),
            skin=colors(SKIN, "skin_tone"), hair=colors(HAIR, "hair_color"), hat_color=colors(HAT, "hat"),
            hairline=0.1 + jitter(count, scale=0.015), hair_length=-0.27 + jitter(count, scale=0.04),
            has_hair=flag(lambda h: h.hair_style != "bald"), long_hair=flag(lambda h: h.hair_style == "long"),
            beard=flag(lambda h: h.beard == "yes"), glasses=flag(lambda h: h.glasses == "yes"),
            hat=flag(lambda h: h.hat != "none"),
        )


def _occupancy(sdf: Tensor) -> Tensor:
    return torch.sigmoid(-sdf / SOFTNESS)


def _ellipsoid(p: Tensor, center: Tensor, radii: Tensor) -> Tensor:
    """Approximate signed distance to an ellipsoid; p ``(B, N, 3)``, center/radii ``(B, 3)``."""
    scaled = (p - center[:, None]) / radii[:, None]
    return (scaled.norm(dim=-1) - 1) * radii.min(dim=-1).values[:, None]


def _box(p: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Approximate signed distance to an axis-aligned box (``low``/``high`` ``(B, 3)``)."""
    return torch.maximum(low[:, None] - p, p - high[:, None]).amax(dim=-1)


def head_field(heads: HeadBatch, p: Tensor) -> tuple[Tensor, Tensor]:
    """Density ``(B, N)`` and colour ``(B, N, 3)`` in [0, 1] of each head at its points p ``(B, N, 3)``."""
    density, colour, _ = _head_field(heads, p)
    return density, colour


def _head_field(heads: HeadBatch, p: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """:func:`head_field` and each part's share ``(B, N)`` of the colour at p (the weights of the
    colour blend below; at every point they sum to 1)."""
    c, r = heads.center, heads.radii
    x, y, z = p.unbind(-1)
    cy, cz = c[:, 1:2], c[:, 2:3]
    front = cz + r[:, 2:3]
    skull = _ellipsoid(p, c, r)
    neck = torch.maximum(torch.sqrt(x**2 + (z - cz + 0.02) ** 2) - 0.085, torch.maximum(-0.45 - y, y - cy))
    parts = {"skin": torch.minimum(skull, neck)}
    eye_y = cy + 0.05
    eyes = [torch.sqrt((x - side * 0.075) ** 2 + (y - eye_y) ** 2 + (z - front + 0.025) ** 2) - 0.024
            for side in (-1, 1)]
    parts["eyes"] = torch.minimum(*eyes)
    mouth_center = c + torch.stack([torch.zeros_like(cy[:, 0]), -0.11 * torch.ones_like(cy[:, 0]),
                                    r[:, 2] * 0.88], dim=-1)
    parts["mouth"] = _ellipsoid(p, mouth_center, torch.tensor([0.055, 0.016, 0.03]).expand_as(r))
    shell = lambda scale: _ellipsoid(p, c, r * scale)  # noqa: E731
    parts["beard"] = torch.maximum(shell(1.07), torch.maximum(y - (cy - 0.06), (cz + 0.03) - z))
    # Hair covers the skull above the hairline, the back of the head and the temples (which stay
    # visible under a cap, so hair colour shows whatever the hat).
    temples = torch.maximum(0.6 * r[:, 0:1] - x.abs(), (cy - 0.03) - y)
    hair_region = torch.minimum(torch.minimum(heads.hairline[:, None] + cy - y, z - (cz - 0.03)), temples)
    hair = torch.maximum(shell(1.08), hair_region)
    curtain = _box(p, torch.stack([-r[:, 0] - 0.04, heads.hair_length, cz[:, 0] - r[:, 2] - 0.05], -1),
                   torch.stack([r[:, 0] + 0.04, cy[:, 0] + 0.1, cz[:, 0] - 0.02], -1))
    parts["hair"] = torch.where(heads.long_hair[:, None] > 0, torch.minimum(hair, curtain), hair)
    cap_bottom = cy + r[:, 1:2] * 0.68  # the cap sits on the crown, leaving a band of hair above the brow
    brim = _box(p, torch.stack([-0.15 * torch.ones_like(cz[:, 0]), cap_bottom[:, 0], cz[:, 0]], -1),
                torch.stack([0.15 * torch.ones_like(cz[:, 0]), cap_bottom[:, 0] + 0.025, front[:, 0] + 0.1], -1))
    parts["hat"] = torch.minimum(torch.maximum(shell(1.13), cap_bottom - y), brim)
    lens_z = front + 0.03
    lenses, frames = [], []
    for side in (-1, 1):
        radial = torch.sqrt((x - side * 0.075) ** 2 + (y - eye_y) ** 2)
        lenses.append(torch.maximum(radial - 0.048, (z - lens_z).abs() - 0.004))
        frames.append(torch.sqrt((radial - 0.05) ** 2 + (z - lens_z) ** 2) - 0.011)
    bridge = torch.maximum(torch.maximum(x.abs() - 0.03, (y - eye_y).abs() - 0.008), (z - lens_z).abs() - 0.008)
    parts["lenses"] = torch.minimum(*lenses)
    parts["frames"] = torch.minimum(torch.minimum(*frames), bridge)

    enabled = {"skin": None, "eyes": None, "mouth": None, "beard": heads.beard, "hair": heads.has_hair,
               "hat": heads.hat, "lenses": heads.glasses, "frames": heads.glasses}
    colours = {"skin": heads.skin, "eyes": torch.tensor([0.10, 0.08, 0.07]), "mouth": torch.tensor([0.62, 0.22, 0.22]),
               "beard": heads.hair, "hair": heads.hair, "hat": heads.hat_color,
               "lenses": torch.tensor([0.22, 0.26, 0.30]), "frames": torch.tensor([0.04, 0.04, 0.05])}
    occupancies = {}
    for name in PARTS:
        occupancies[name] = _occupancy(parts[name])
        if enabled[name] is not None:
            occupancies[name] = occupancies[name] * enabled[name][:, None]
    density = torch.stack(list(occupancies.values())).amax(dim=0)
    # Each part's share relative to the union, so a soft surface has its part's colour, not a
    # blend with whatever default lies under it. Each lerp hands ``share`` of what earlier parts
    # hold to this part, so its weight in the final colour is ``share`` times what no later part
    # takes (the base skin starts with all of it): ``shares``.
    colour = heads.skin[:, None].expand(*x.shape, 3)
    shares = {"skin": torch.ones_like(density)}
    for name in PARTS:
        tint = colours[name].expand(x.shape[0], 3) if colours[name].dim() == 1 else colours[name]
        share = (occupancies[name] / density.clamp_min(1e-6)).clamp(0, 1)
        colour = torch.lerp(colour, tint[:, None].expand_as(colour), share[..., None])
        shares = {part: value * (1 - share) for part, value in shares.items()}
        shares[name] = shares.get(name, 0) + share
    return density * MAX_DENSITY, colour, shares


def _ray_samples(c: Tensor, resolution: int, samples: int) -> tuple[Tensor, Tensor, float]:
    """Sample points ``(B, R² * S, 3)`` along each pixel's ray, their depths ``(S,)`` and spacing."""
    origins, directions = camera_rays(*split_camera_labels(c), resolution)  # (B, R², 3)
    near, far = WORLD_CAMERAS["near"], WORLD_CAMERAS["far"]
    spacing = (far - near) / samples
    depths = near + (torch.arange(samples, dtype=c.dtype) + 0.5) * spacing  # (S,)
    points = origins[:, :, None] + depths[None, None, :, None] * directions[:, :, None]  # (B, R², S, 3)
    return points.reshape(c.shape[0], -1, 3), depths, spacing


@torch.no_grad()
def render_heads(heads: HeadBatch, c: Tensor, resolution: int, samples: int = 64, backend: str | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Images ``(B, 3, R, R)`` in [-1, 1] (on the world's grey background), depth ``(B, 1, R, R)``
    (along the ray, where the ray meets the head; meaningless where the opacity is near 0) and
    opacity ``(B, 1, R, R)`` of the heads seen from camera labels c ``(B, 25)``."""
    return render_heads_and_masks(heads, c, resolution, samples, backend, part_masks=False)[:3]


@torch.no_grad()
def render_part_masks(heads: HeadBatch, c: Tensor, resolution: int, samples: int = 64) -> Tensor:
    """How much of each pixel each region of :data:`MASK_PARTS` covers, ``(B, len(MASK_PARTS), R, R)``
    in [0, 1], for the heads seen from camera labels c ``(B, 25)`` as :func:`render_heads` sees
    them: each part's share of the colour, composited along the ray with the image's weights. A
    pixel's regions sum to its opacity (0 on the background)."""
    return render_heads_and_masks(heads, c, resolution, samples)[3]


@torch.no_grad()
def render_heads_and_masks(heads: HeadBatch, c: Tensor, resolution: int, samples: int = 64,
                           backend: str | None = None, part_masks: bool = True
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`render_heads`'s outputs and, if ``part_masks``, :func:`render_part_masks`'s (else
    ``None``) from one evaluation of the heads' field: the masks are the parts' shares summed with
    the image's own compositing weights."""
    count, rays = c.shape[0], c.shape[0] * resolution * resolution
    points, depths, spacing = _ray_samples(c, resolution, samples)
    density, colour, shares = _head_field(heads, points)
    rgb, depth, opacity, weights = composite_rays(density.reshape(rays, samples), colour.reshape(rays, samples, 3),
                                                  depths.expand(rays, samples).contiguous(),
                                                  torch.full((rays, samples), spacing), backend=backend)
    image = rgb + (1 - opacity[:, None]) * BACKGROUND
    image = image.reshape(count, resolution, resolution, 3).permute(0, 3, 1, 2)
    depth = (depth / opacity.clamp_min(1e-6)).reshape(count, 1, resolution, resolution)
    masks = None
    if part_masks:
        regions = torch.stack([sum(shares[part] for part in parts) for parts in MASK_PARTS.values()], dim=-1)
        coverage = torch.einsum("rs,rsp->rp", weights, regions.reshape(rays, samples, -1))
        masks = coverage.clamp(0, 1).reshape(count, resolution, resolution, -1).permute(0, 3, 1, 2)
    return image * 2 - 1, depth, opacity.reshape(count, 1, resolution, resolution), masks


def sample_world_cameras(count: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Camera labels ``(B, 25)`` from the world's pose prior, and their yaws ``(B,)``."""
    cams = WORLD_CAMERAS
    return sample_camera_labels(count, math.radians(cams["yaw_range_degrees"]), math.radians(cams["pitch_range_degrees"]),
                                cams["radius"], cams["pivot"], cams["fov_degrees"], generator)
