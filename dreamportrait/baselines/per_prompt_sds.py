"""The per-prompt SDS baseline (DreamFusion-style): optimise one tri-plane scene for one prompt.

The scene is what one sample of the generator is: three feature planes and an OSG decoder, rendered
by the same importance renderer; it is optimised from scratch with the same SDS guidance, at
random cameras of the same portrait prior. DreamPortrait replaces this whole optimisation by one
forward pass.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..defaults import BASELINE_STEPS
from ..guidance import StableDiffusionGuidance
from ..models import camera_rays, sample_camera_labels, split_camera_labels, view_cameras
from ..models.cameras import FFHQ_FOV_DEGREES, FFHQ_PIVOT, FFHQ_RADIUS
from ..models.presets import preset_kwargs
from ..models.renderer import ImportanceRenderer, OSGDecoder
from ..models.triplane_generator import PLANE_CHANNELS
from ..outputs import grid, to_uint8, write_image
from ..weights import save_weights

DEFAULT_STEPS = BASELINE_STEPS
"""threestudio's DreamFusion default (the paper optimises 15,000 steps)."""


class TriplaneScene(nn.Module):
    """One radiance field: planes ``(1, 3, 32, R, R)`` (small random init) + an OSG decoder."""

    def __init__(self, resolution: int = 64, rendering_kwargs: Mapping | None = None, backend: str | None = None):
        super().__init__()
        self.rendering_kwargs = copy.deepcopy(dict(rendering_kwargs or preset_kwargs("tiny", "generator")["rendering_kwargs"]))
        self.planes = nn.Parameter(torch.randn(1, 3, PLANE_CHANNELS, resolution, resolution) * 0.1)
        self.decoder = OSGDecoder(PLANE_CHANNELS, {"decoder_lr_mul": 1, "decoder_output_dim": PLANE_CHANNELS})
        self.renderer = ImportanceRenderer(backend)

    def forward(self, c: Tensor, resolution: int) -> dict[str, Tensor]:
        """Render cameras ``c`` ``(N, 25)``: ``image`` ``(N, 3, r, r)`` in [-1, 1] and ``image_depth``."""
        count = c.shape[0]
        origins, directions = camera_rays(*split_camera_labels(c), resolution)
        features, depth, _ = self.renderer(self.planes.expand(count, -1, -1, -1, -1), self.decoder, origins,
                                           directions, self.rendering_kwargs)
        image = features[..., :3].permute(0, 2, 1).reshape(count, 3, resolution, resolution)
        return {"image": image, "image_depth": depth.permute(0, 2, 1).reshape(count, 1, resolution, resolution)}


@dataclass
class BaselineResult:
    scene: TriplaneScene
    seconds: float
    losses: list[float]


def optimise_scene(guidance: StableDiffusionGuidance, prompt: str, steps: int = DEFAULT_STEPS, batch_size: int = 1,
                   render_resolution: int = 32, lr: float = 0.01, yaw_range_degrees: float = 45.0,
                   pitch_range_degrees: float = 20.0, radius: float = FFHQ_RADIUS, pivot=FFHQ_PIVOT,
                   fov_degrees: float = FFHQ_FOV_DEGREES, seed: int = 0, backend: str | None = None,
                   progress: bool = True, callback=None) -> BaselineResult:
    """Optimise a :class:`TriplaneScene` for ``prompt`` with SDS for ``steps`` steps of
    ``batch_size`` random views. ``callback(step, scene)`` (optional) runs after each step."""
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    sampler = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = guidance.device
    scene = TriplaneScene(backend=backend).to(device)
    optimiser = torch.optim.Adam(scene.parameters(), lr=lr, betas=(0.9, 0.99))
    losses, start = [], time.perf_counter()
    for step in tqdm(range(steps), desc=f"per-prompt SDS: {prompt[:40]}", disable=not progress):
        c, yaws = sample_camera_labels(batch_size, math.radians(yaw_range_degrees), math.radians(pitch_range_degrees),
                                       radius, pivot, fov_degrees, sampler)
        c = c.to(device)
        images = scene(c, render_resolution)["image"]
        sds = guidance.sds_loss(images, [prompt] * batch_size, yaws=yaws, step_ratio=step / max(steps, 1),
                                generator=sampler)
        optimiser.zero_grad(set_to_none=True)
        sds.loss.backward()
        optimiser.step()
        losses.append(sds.loss.item())
        if callback is not None:
            callback(step, scene)
    return BaselineResult(scene, time.perf_counter() - start, losses)


def save_scene(scene: TriplaneScene, path: str | Path) -> Path:
    """The scene's planes and decoder as safetensors, written atomically."""
    return save_weights(scene, path)


def write_baseline(result: BaselineResult, out_dir: str | Path, prompt: str, steps: int, views: int = 8,
                   resolution: int = 32) -> Path:
    """What ``dreamportrait baseline`` writes to ``out_dir``: ``scene.safetensors``, ``views`` renders
    (``viewNN.png``) on the generator's default orbit and their ``grid.png``, and ``timing.json``
    (prompt, steps, seconds, final SDS loss)."""
    out_dir = Path(out_dir)
    save_scene(result.scene, out_dir / "scene.safetensors")
    device = result.scene.planes.device
    with torch.no_grad():
        images = result.scene(view_cameras(views, 0.6, FFHQ_RADIUS, FFHQ_PIVOT, FFHQ_FOV_DEGREES).to(device), resolution)["image"]
    for index, image in enumerate(images):
        write_image(out_dir / f"view{index:02d}.png", to_uint8(image))
    write_image(out_dir / "grid.png", to_uint8(grid(images, views)))
    (out_dir / "timing.json").write_text(json.dumps({"prompt": prompt, "steps": steps, "seconds": result.seconds,
                                                     "final_sds_loss": result.losses[-1] if result.losses else None},
                                                    indent=2) + "\n")
    return out_dir
