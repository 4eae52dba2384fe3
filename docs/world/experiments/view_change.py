"""How far a method's heads turn between the evaluation's outer views (RESULTS, *What the judge's
consistency does not see*).

For each held-out caption (phrasing 0, seed 0), two 64² views at yaw −30° and +30° (the outer
columns of the evaluation's grids), pixels in [−1, 1]:

- change: mean |view(−30°) − view(+30°)|: how much the picture changes when the camera moves;
- mirror residual: mean |view(−30°) − mirror(view(+30°))|: the world's heads and cameras are
  left-right symmetric, so a head that turns with the camera as a 3D object does gives ≈ 0.

    python docs/world/experiments/view_change.py NAME=SOURCE ...

SOURCE: ``world`` (the world's own heads), ``gan`` (the packaged 3D GAN, which ignores the
prompt), ``packaged`` (the packaged generator) or a generator checkpoint directory.
"""
import sys

import torch

from dreamportrait.models import load_pretrained
from dreamportrait.world import caption, held_out_combinations
from dreamportrait.world.assets import asset_dir, load_default_generator
from dreamportrait.world.evaluate import gan_method, generator_method, world_method


def method_for(source: str):
    if source == "world":
        return world_method(2)
    if source == "gan":
        return gan_method(load_pretrained(asset_dir("gan"))[0].eval(), 2)
    generator = load_default_generator() if source == "packaged" else load_pretrained(source)[0]
    return generator_method(generator.eval(), 2)


torch.set_grad_enabled(False)
for argument in sys.argv[1:]:
    name, source = argument.split("=", 1)
    method, change, residual = method_for(source), [], []
    for head in held_out_combinations():
        left, right = method(caption(head, 0), 0)
        change.append((left - right).abs().mean())
        residual.append((left - right.flip(-1)).abs().mean())
    print(f"{name}: change {torch.stack(change).mean():.3f}, mirror residual {torch.stack(residual).mean():.3f}",
          flush=True)
