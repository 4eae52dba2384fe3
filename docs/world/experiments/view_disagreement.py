"""Which views disagree? (RESULTS.md, *What ships* and *Multi-view consistency per attribute*)

    python docs/world/experiments/view_disagreement.py [GENERATOR_DIR]

renders every held-out prompt with seeds 0–3 from the harness's 4 evaluation cameras (yaw −30°,
−10°, +10°, +30°), with the harness's own method (``generator_method``), and prints, per attribute, the fraction of
samples whose views the judge reads differently, the fraction of wrong views per camera, and the
most common patterns of a disagreement (the judged class in each view, then the prompt's).
Default: the packaged generator (about 1 min at 2 threads)."""
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
def main(directory: str | None) -> None:
    generator = load_pretrained(directory)[0] if directory else load_default_generator()
    method, judge = generator_method(generator, views=4), load_judge(asset_dir("judge")).eval()
    attributes = list(ATTRIBUTE_CLASSES)
    wrong, disagreeing, patterns, samples = torch.zeros(4, len(attributes)), torch.zeros(len(attributes)), Counter(), 0
    for head in held_out_combinations():
        prompt = caption(head, 0)
        expected = attribute_indices([parse_caption(prompt)])[0]
        for seed in range(4):
            predicted = judge.predict(method(prompt, seed)["image"])  # (4 views, 6 attributes)
            wrong += (predicted != expected).float()
            alike = (predicted == predicted[0]).all(0)
            disagreeing += (~alike).float()
            samples += 1
            patterns.update((attributes[a], tuple(predicted[:, a].tolist()), int(expected[a]))
                            for a in range(len(attributes)) if not alike[a])
    print("samples whose views disagree:", {a: f"{100 * disagreeing[i] / samples:.1f} %" for i, a in enumerate(attributes)})
    for view, yaw in enumerate((-30, -10, 10, 30)):
        print(f"wrong views at yaw {yaw:+d}°:", {a: f"{100 * wrong[view, i] / samples:.1f} %" for i, a in enumerate(attributes)})
    print("commonest disagreements (attribute, judged class per view, asked class): samples")
    for pattern, count in patterns.most_common(8):
        print(" ", pattern, count)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
