"""Make the README's picture, ``docs/portraits.png``, with the packaged generator on the CPU.

    python docs/make_picture.py            # ~30 s on 2 CPU cores; writes docs/portraits.png
    python docs/make_picture.py OUT.png

Each prompt is one forward pass (seed 0, truncation 0.7, as ``dreamportrait generate``) rendered from
seven cameras sweeping +-35 degrees of yaw; the last row is the first prompt's depth maps from the
same cameras (near = white). The first three prompts are held-out combinations: no training stage
saw them.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from dreamportrait.generation import orbit, render_views, sample
from dreamportrait.models import view_cameras
from dreamportrait.outputs import depth_grey, to_uint8
from dreamportrait.world.assets import load_default_generator

PROMPTS = [
    "a portrait of a light-skinned person with short red hair and a blue hat",
    "a portrait of a dark-skinned person with short blond hair and glasses",
    "a portrait of a medium-skinned person with long black hair, a beard and a red hat",
    "a portrait of a medium-skinned person with short brown hair, a beard and glasses",
]
VIEWS, SCALE, CAPTION = 7, 2, 14


def main(out: str = str(Path(__file__).with_name("portraits.png"))) -> None:
    torch.manual_seed(0)
    generator = load_default_generator("cpu").eval()
    radius, pivot = orbit(generator)
    cameras = view_cameras(VIEWS, math.radians(35), radius, pivot)
    rows, captions = [], []
    with torch.no_grad():
        for index, prompt in enumerate(PROMPTS):
            ws, sr_ws, planes = sample(generator, prompt, seed=0)
            out_views = render_views(generator, ws, sr_ws, planes, cameras)
            rows.append(np.concatenate([to_uint8(image) for image in out_views["image"]], axis=1))
            captions.append(prompt.removeprefix("a portrait of "))
            if index == 0:
                depth = out_views["image_depth"]  # one grey scale for all views, so they compare
                near, far = depth.flatten().quantile(torch.tensor([0.02, 0.9])).tolist()
                depth = depth_grey(depth, near, far)
                depth = torch.nn.functional.interpolate(depth, size=out_views["image"].shape[-2:], mode="bilinear")
                depth_row = np.concatenate([to_uint8(d) for d in depth], axis=1)
    rows.append(depth_row)
    captions.append("depth of the first row (near = white)")
    width = rows[0].shape[1] * SCALE
    canvas = Image.new("RGB", (width, sum(r.shape[0] * SCALE + CAPTION for r in rows)), (255, 255, 255))
    draw, top = ImageDraw.Draw(canvas), 0
    for row, caption in zip(rows, captions):
        draw.text((4, top + 1), caption, fill=(0, 0, 0))
        image = Image.fromarray(row).resize((width, row.shape[0] * SCALE), Image.NEAREST)
        canvas.paste(image, (0, top + CAPTION))
        top += CAPTION + image.height
    canvas.save(out, optimize=True)
    print(f"wrote {out} ({Path(out).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main(*sys.argv[1:])
