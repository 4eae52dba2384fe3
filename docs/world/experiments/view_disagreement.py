"""Which views disagree? (RESULTS.md, *Results against the targets*)

    python docs/world/experiments/view_disagreement.py [GENERATOR_DIR] [FIRST_SEED LAST_SEED]

renders every held-out prompt with seeds 0–3 (or FIRST_SEED to LAST_SEED) from the harness's 4
evaluation cameras (yaw −30°, −10°, +10°, +30°), with the harness's own method
(``generator_method``), and prints, per attribute, the fraction of samples whose views the judge
reads differently, the fraction of wrong views per camera, and the
most common patterns of a disagreement (the judged class in each view, then the prompt's) and,
per seed, the samples with any disagreement: the harness draws seed s's latent for every prompt,
so one latent near a class boundary fails in many prompts at once (RESULTS.md: the
table's seeds 0-3 are four latents). Default: the packaged generator (about 1 min at 2 threads for 4 seeds)."""
import sys
from collections import Counter

import torch

from dreamportrait.models import load_pretrained
from dreamportrait.world import caption, held_out_combinations, parse_caption
from dreamportrait.world.assets import asset_dir, load_default_generator
from dreamportrait.world.dataset import ATTRIBUTE_CLASSES, attribute_indices
from dreamportrait.world.evaluate import generator_method
from dreamportrait.world.judge import load_judge


@torch.no_grad()
def main(directory: str | None, seeds: range) -> None:
    generator = load_pretrained(directory)[0] if directory else load_default_generator()
    method, judge = generator_method(generator, views=4), load_judge(asset_dir("judge")).eval()
    attributes = list(ATTRIBUTE_CLASSES)
    wrong, disagreeing, patterns, samples = torch.zeros(4, len(attributes)), torch.zeros(len(attributes)), Counter(), 0
    per_seed = Counter()
    for head in held_out_combinations():
        prompt = caption(head, 0)
        expected = attribute_indices([parse_caption(prompt)])[0]
        for seed in seeds:
            predicted = judge.predict(method(prompt, seed)["image"])  # (4 views, 6 attributes)
            wrong += (predicted != expected).float()
            alike = (predicted == predicted[0]).all(0)
            disagreeing += (~alike).float()
            per_seed[seed] += int(not alike.all())
            samples += 1
            patterns.update((attributes[a], tuple(predicted[:, a].tolist()), int(expected[a]))
                            for a in range(len(attributes)) if not alike[a])
    print("samples whose views disagree:", {a: f"{100 * disagreeing[i] / samples:.1f} %" for i, a in enumerate(attributes)})
    for view, yaw in enumerate((-30, -10, 10, 30)):
        print(f"wrong views at yaw {yaw:+d}°:", {a: f"{100 * wrong[view, i] / samples:.1f} %" for i, a in enumerate(attributes)})
    print("commonest disagreements (attribute, judged class per view, asked class): samples")
    for pattern, count in patterns.most_common(8):
        print(" ", pattern, count)
    print(f"samples with any disagreement per seed (of {samples // len(seeds)}):",
          {seed: per_seed[seed] for seed in seeds})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None,
         range(int(sys.argv[2]), int(sys.argv[3]) + 1) if len(sys.argv) > 3 else range(4))
