"""``dreamportrait generate``: a 3D portrait per (prompt, seed) in one forward pass, then views,
depth maps, a turntable video and a mesh of it.

Layout of the output directory, per prompt (``<slug>/``)::

    grid.png                       rows: seeds, columns: views
    seed0000/view00.png ...        each view
    seed0000/view00_depth.png ...  its depth (near = white)
    seed0000/turntable.mp4         with --video
    seed0000/mesh.ply              with --mesh
"""

from __future__ import annotations

import math
import numbers
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._atomic import atomic_path
from .defaults import TRUNCATION_PSI
from .models import camera_labels, extract_mesh, fov_to_intrinsics, orbit_poses, view_cameras
from .models.cameras import FFHQ_FOV_DEGREES, FFHQ_PIVOT, FFHQ_RADIUS, FRONTAL
from .outputs import depth_to_uint8, grid, slug, to_uint8, write_image, write_video
from .text import TextConditionedGenerator, TextFeatures


@dataclass
class GenerationResult:
    """What :func:`generate` wrote and how long the forward passes took."""

    files: list[Path] = field(default_factory=list)
    seconds_per_sample: list[float] = field(default_factory=list)


SEED_LIMIT = 2**32
"""Seeds are integers in [0, SEED_LIMIT) (numpy's and EG3D's range)."""
MAX_SEEDS = 10_000
"""The most seeds one ``--seeds`` may list: each is a forward pass and a folder of files."""
_SEED_PART = re.compile(r"(\d{1,10})(?:-(\d{1,10}))?", re.ASCII)


def parse_seeds(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``; a ValueError names ``--seeds`` and what it takes."""
    seeds = []
    for part in text.split(","):
        match = _SEED_PART.fullmatch(part.strip())
        low, high = (int(match[1]), int(match[2] or match[1])) if match else (1, 0)
        if not low <= high < SEED_LIMIT or len(seeds) + high - low + 1 > MAX_SEEDS:
            raise ValueError(f"--seeds must look like 0-3,7: integers from 0 to {SEED_LIMIT - 1} and ranges of "
                             f"them, at most {MAX_SEEDS} seeds in all; got {text[:100]!r}")
        seeds += range(low, high + 1)
    return seeds


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """``seeds`` as a list, if it is a non-empty sequence of integers in [0, SEED_LIMIT)."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or not seeds or not all(
            isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT
            for seed in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers from 0 to {SEED_LIMIT - 1}, "
                         f"got {str(seeds)[:100]}")
    return [int(seed) for seed in seeds]


@torch.no_grad()
def generate(generator: TextConditionedGenerator, prompts: Sequence[str], seeds: Sequence[int], out_dir: str | Path,
             views: int = 8, video: bool = False, mesh: bool = False, truncation_psi: float = TRUNCATION_PSI,
             yaw_range_degrees: float = 35.0, fov_degrees: float = FFHQ_FOV_DEGREES, video_frames: int = 72,
             mesh_resolution: int = 128, mesh_level: float = 10.0, progress: bool = True) -> GenerationResult:
    """Generate every (prompt, seed) and write its outputs (module docstring) under ``out_dir``.
    Cameras orbit the generator's own average camera (:func:`orbit`)."""
    if not isinstance(generator, TextConditionedGenerator):
        raise ValueError("generate needs a text-conditioned generator (a DreamPortrait checkpoint)")
    if isinstance(prompts, str) or not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of prompts with words (an empty one would render "
                         f"an unconditional head), got {str(prompts)[:100]}")
    unread = [prompt for prompt in prompts if generator.text_encoder is not None
              and not generator.text_encoder.reads_words(prompt)]
    if unread:
        raise ValueError(f"prompts: the text model reads none of the words of {unread[:3]} (its vocabulary holds none "
                         f"of them; `dreamportrait info` lists the packaged generator's), so they would render an "
                         f"unconditional head")
    seeds = check_seeds(seeds)
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    device = next(generator.parameters()).device
    out_dir, result = Path(out_dir), GenerationResult()
    radius, pivot = orbit(generator)
    cameras = view_cameras(views, math.radians(yaw_range_degrees), radius, pivot, fov_degrees).to(device)
    conditioning = view_cameras(1, 0.0, radius, pivot, fov_degrees).to(device)
    turntable = None
    if video:  # one full sweep left-right-left
        sweep = torch.sin(torch.linspace(0, 2 * math.pi, video_frames + 1)[:-1])
        yaws = FRONTAL + sweep * math.radians(yaw_range_degrees)
        pitches = FRONTAL + 0.1 * torch.cos(torch.linspace(0, 2 * math.pi, video_frames + 1)[:-1])
        turntable = camera_labels(orbit_poses(yaws, pitches, radius, pivot), fov_to_intrinsics(fov_degrees)).to(device)
    work = [(prompt, seed) for prompt in prompts for seed in seeds]
    rows: dict[str, list[Tensor]] = {}
    for prompt, seed in tqdm(work, desc="generating", disable=not progress):
        folder = out_dir / slug(prompt) / f"seed{seed:04d}"
        start = time.perf_counter()
        ws, sr_ws, planes = sample(generator, prompt, seed, truncation_psi, conditioning)
        out = render_views(generator, ws, sr_ws, planes, cameras)
        result.seconds_per_sample.append(time.perf_counter() - start)
        rows.setdefault(prompt, []).append(out["image"])
        for index in range(views):
            result.files.append(write_image(folder / f"view{index:02d}.png", to_uint8(out["image"][index])))
            result.files.append(write_image(folder / f"view{index:02d}_depth.png",
                                            depth_to_uint8(out["image_depth"][index])))
        if turntable is not None:
            frames = [to_uint8(image) for chunk in turntable.split(8)
                      for image in render_views(generator, ws, sr_ws, planes, chunk)["image"]]
            result.files.append(write_video(folder / "turntable.mp4", frames))
        if mesh:
            shape = extract_mesh(generator.base, ws, resolution=mesh_resolution, level=mesh_level, planes=planes,
                                 progress=False)
            with atomic_path(folder / "mesh.ply") as temporary:
                shape.export(temporary)
            result.files.append(folder / "mesh.ply")
    for prompt, images in rows.items():
        result.files.append(write_image(out_dir / slug(prompt) / "grid.png", to_uint8(grid(torch.cat(images), views))))
    return result


def orbit(generator: TextConditionedGenerator) -> tuple[float, tuple[float, ...]]:
    """(radius, pivot) of the camera orbit the generator was trained on: EG3D's
    ``avg_camera_radius`` / ``avg_camera_pivot`` rendering options (FFHQ's when absent)."""
    options = generator.base.rendering_kwargs
    return float(options.get("avg_camera_radius", FFHQ_RADIUS)), tuple(options.get("avg_camera_pivot", FFHQ_PIVOT))


def frontal_camera(generator: TextConditionedGenerator) -> Tensor:
    """The camera label ``(1, 25)`` generation conditions the mapping on: frontal on the generator's
    :func:`orbit`, with FFHQ's field of view (EG3D's generation scripts' convention)."""
    return view_cameras(1, 0.0, *orbit(generator), FFHQ_FOV_DEGREES)


def sample(generator: TextConditionedGenerator, prompt: str, seed: int, truncation_psi: float = TRUNCATION_PSI,
           conditioning: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The one forward pass of (prompt, seed): ws ``(1, num_ws, w_dim)``, the super-resolution's ws
    and the tri-planes ``(1, 3, 32, R, R)``. The mapping is conditioned on the frontal camera
    (``conditioning``, default: the frontal camera of the generator's :func:`orbit`), as EG3D's
    generation scripts do."""
    device = next(generator.parameters()).device
    if conditioning is None:
        conditioning = frontal_camera(generator).to(device)
    z = torch.randn(1, generator.base.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    return forward_pass(generator, z, conditioning, generator.encode([prompt]), truncation_psi)


def forward_pass(generator: TextConditionedGenerator, z: Tensor, conditioning: Tensor, text: TextFeatures,
                 truncation_psi: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """The generator's one forward pass for latents ``z`` ``(N, z_dim)``, text features ``text``
    (N prompts) and the cameras ``conditioning`` ``(N, 25)`` the mapping is conditioned on: ws
    ``(N, num_ws, w_dim)``, the super-resolution's ws ``(N, 1, w_dim)`` and the tri-planes
    ``(N, 3, 32, R, R)``, which any camera then renders (:func:`render_views`)."""
    ws, sr_ws = generator.mapping(z, conditioning, text, truncation_psi=truncation_psi)
    return ws, sr_ws, generator.base.planes(ws, "const", generator.block_hook(text))


def render_views(generator, ws, sr_ws, planes, cameras) -> dict[str, Tensor]:
    """Render one sample (ws, its super-resolution ws and planes) from cameras ``(V, 25)``."""
    count = cameras.shape[0]
    return generator.base.synthesis(ws.expand(count, -1, -1), cameras, noise_mode="const", deterministic_sampling=True,
                                    planes=planes.expand(count, -1, -1, -1, -1), sr_ws=sr_ws.expand(count, -1, -1))
