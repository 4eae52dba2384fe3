"""Writing what people look at: images, image grids, depth maps and turntable videos."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor

from ._atomic import atomic_path


def to_uint8(image: Tensor) -> np.ndarray:
    """``(3, H, W)`` in [-1, 1] -> ``(H, W, 3)`` uint8."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def depth_to_uint8(depth: Tensor) -> np.ndarray:
    """``(1, H, W)`` depths -> ``(H, W)`` uint8, nearest white, farthest black (per image)."""
    depth = depth.detach().float().cpu()[0]
    finite = depth[torch.isfinite(depth)]
    near, far = (finite.min(), finite.max()) if finite.numel() else (torch.tensor(0.0), torch.tensor(1.0))
    scaled = ((far - depth) / (far - near).clamp_min(1e-8)).nan_to_num(0).clamp(0, 1)
    return (scaled * 255).round().byte().numpy()


def depth_grey(depth: Tensor, near: float, far: float) -> Tensor:
    """Depths ``(N, 1, h, w)`` -> grey images ``(N, 3, h, w)`` in [-1, 1], ``near`` white and ``far``
    black on one fixed scale (unlike :func:`depth_to_uint8`), so a flat card shows as one grey."""
    return ((far - depth) / (far - near) * 2 - 1).clamp(-1, 1).expand(-1, 3, -1, -1)


def grid(images: Tensor, columns: int) -> Tensor:
    """``(N, 3, H, W)`` -> one ``(3, rows * H, columns * W)`` image (missing cells black)."""
    count, channels, height, width = images.shape
    rows = math.ceil(count / columns)
    padded = torch.cat([images, images.new_full((rows * columns - count, channels, height, width), -1)])
    return padded.view(rows, columns, channels, height, width).permute(2, 0, 3, 1, 4).reshape(
        channels, rows * height, columns * width)


def write_image(path: str | Path, pixels: np.ndarray) -> Path:
    """Write a PNG atomically."""
    with atomic_path(path) as temporary:
        iio.imwrite(temporary, pixels, extension=".png")
    return Path(path)


def write_video(path: str | Path, frames: list[np.ndarray], fps: int = 24) -> Path:
    """Write an MP4 (H.264 through imageio's ffmpeg) atomically."""
    with atomic_path(path) as temporary:
        iio.imwrite(temporary, np.stack(frames), extension=".mp4", fps=fps, codec="libx264",
                    macro_block_size=1)
    return Path(path)


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe version of a prompt; a long one is cut and ends with a hash of the whole
    text, so prompts sharing a beginning get different names."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "empty-prompt"
    if len(name) <= limit:
        return name
    return f"{name[: limit - 9].rstrip('-')}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"
