"""How much one prompt's heads differ, the quantity ``gan.spread_weight`` pushes up to the real
groups' (docs/notes/experiments.md, *Training the generator*).

    python docs/world/experiments/group_spread.py GROUPS_DIR [CHECKPOINT ...]

prints τ, the mean ``group_spread`` (mean absolute difference of the 32² raw images pooled to 16²)
of 64 random groups of 4 real heads in ``GROUPS_DIR`` (``world train``'s
``RUN/data/gan-groups-images``, seed 0, as a run with seed 0 measures it), then, for each
generator (a checkpoint or model directory; ``default`` for the packaged one), the same spread of
4 latents of each of 12 training prompts
(``random.Random(0).sample`` of the world's training captions) rendered from the frontal camera
without truncation, with random and with constant noise: the spread of their raw renders, which
the term pushes up, and of their 64² images (pooled 4×4), which an earlier form of the term pushed up.
"""
import random
import sys

import torch

from dreamportrait.generation import frontal_camera
from dreamportrait.models import load_pretrained
from dreamportrait.training.losses import group_spread
from dreamportrait.training.real_images import ImageFolder
from dreamportrait.world.assets import load_default_generator
from dreamportrait.world.attributes import caption, training_combinations


def main(groups_dir: str, checkpoints: list[str]) -> None:
    folder = ImageFolder(groups_dir, 64, 32)
    print(f"real groups: tau = {folder.group_spread(4, 64, torch.Generator().manual_seed(0)):.4f}")
    prompts = random.Random(0).sample([caption(head, 0) for head in training_combinations()], 12)
    torch.manual_seed(0)
    for checkpoint in checkpoints:
        generator = load_default_generator("cpu") if checkpoint == "default" else load_pretrained(checkpoint)[0]
        front = frontal_camera(generator).expand(4, -1)
        for noise_mode in ("random", "const"):
            with torch.no_grad():
                groups = [generator(torch.randn(4, generator.base.z_dim), front, prompts=[prompt] * 4,
                                    conditioning=front, noise_mode=noise_mode) for prompt in prompts]
            spreads = {key: group_spread(torch.stack([group[key] for group in groups], dim=1).flatten(0, 1), 4)
                       for key in ("image_raw", "image")}  # member-major, as group_spread expects
            print(f"{checkpoint} ({noise_mode} noise): spread = {spreads['image_raw'].mean().item():.4f} raw, "
                  f"{spreads['image'].mean().item():.4f} image")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
