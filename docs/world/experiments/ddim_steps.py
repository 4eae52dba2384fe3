"""The packaged teacher judged at 25 and 50 DDIM steps from the same initial noise (README, *the
hat at 25 and 50 DDIM steps*): ``judge_teacher`` draws each sample's noise first and DDIM adds none,
so for a given ``samples_per_head`` and seed only the number of steps differs.

    python docs/world/experiments/ddim_steps.py
"""
import time

import torch

from dreamportrait.world.assets import asset_dir
from dreamportrait.world.attributes import held_out_combinations
from dreamportrait.world.judge import load_judge
from dreamportrait.world.teacher import Teacher, judge_teacher

judge, teacher = load_judge(asset_dir("judge")), Teacher(asset_dir("teacher"))
for samples_per_head in (2, 4):
    for steps in (25, 50):
        start = time.time()
        scores, _ = judge_teacher(teacher, judge, held_out_combinations(), samples_per_head=samples_per_head,
                                  steps=steps, guidance_scale=3.0, seed=0)
        print(f"DDIM-{steps}, {samples_per_head} per head:", {k: round(100 * v, 1) for k, v in scores.items()},
              f"mean {100 * sum(scores.values()) / len(scores):.1f}, {time.time() - start:.0f} s", flush=True)
