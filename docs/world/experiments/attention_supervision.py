"""A teacher trained with its cross-attention supervised by the renders' part masks, as the
build's is, with another weight, other terms, regions or attention levels (docs/notes/experiments.md, *The teacher*).

    python docs/world/experiments/attention_supervision.py OUT [WEIGHT] [--parts PARTS] [--terms TERMS] [--attention-levels N]

renders the build's teacher data again (the same 16,384 heads, cameras and captions as
``dreamportrait world build``'s ``data/teacher-train``) with part masks into ``OUT/data``, trains a
teacher from scratch with the build's recipe (its ``TeacherConfig``, seed 0, 3,000 steps,
batch 32; ``--attention-levels 2`` adds cross-attention at 16² to the UNet's 8²) but ``WEIGHT``
(the build's 0.03 by default) times the attention-region loss (its ``TERMS``, comma-separated:
``tokens``, ``pixels`` or both; the build's ``pixels`` by default), over every cross-attention
layer, for the phrases naming one of ``PARTS`` (comma-separated names of ``MASK_PARTS``, default
all five) into ``OUT/teacher`` (resumable), then prints the judge's per-attribute accuracy on its
samples of the held-out captions as the teacher table of that page does (74 × 2 DDIM-25 samples, CFG 3,
seed 0), overall and per held-out rule, and on 74 training combinations
(``random.Random(0).sample``); the held-out samples go to ``OUT/held_out_samples.png`` (two
combinations per row, in ``held_out_combinations()`` order)."""
import argparse
import dataclasses
import random
import time
from pathlib import Path

import torch

from dreamportrait.outputs import grid, to_uint8, write_image
from dreamportrait.world.assets import asset_dir
from dreamportrait.world.attributes import HELD_OUT_RULES, held_out_combinations, training_combinations
from dreamportrait.world.build import SETTINGS
from dreamportrait.world.dataset import ATTRIBUTE_CLASSES, build_dataset
from dreamportrait.world.heads import MASK_PARTS
from dreamportrait.world.judge import load_judge
from dreamportrait.world.teacher import Teacher, build_teacher, judge_teacher, train_teacher


def percent(scores: dict[str, float]) -> str:
    return " / ".join(f"{name} {100 * value:.1f} %" for name, value in scores.items()) + \
        f" / mean {100 * sum(scores.values()) / len(scores):.1f} %"


BUILD = SETTINGS["default"]


def main(out: Path, weight: float, parts: list[str], terms: list[str], attention_levels: int) -> None:
    setting, seed = BUILD, 0
    data = build_dataset(out / "data/teacher-train", training_combinations(), setting.teacher_train,
                         setting.resolution, seed=seed * 10 + 3, part_masks=True)
    if not (out / "teacher/model_index.json").is_file():
        build_teacher(out / "teacher", dataclasses.replace(setting.teacher, attention_levels=attention_levels),
                      seed=seed)
    start = time.time()
    train_teacher(Teacher(out / "teacher"), data, steps=setting.teacher_steps, batch_size=setting.teacher_batch,
                  lr=setting.teacher_lr, snr_gamma=setting.teacher_snr_gamma, seed=seed, attention_weight=weight,
                  attention_parts=parts, attention_terms=terms)
    print(f"trained in {time.time() - start:.0f} s", flush=True)

    teacher, judge = Teacher(out / "teacher"), load_judge(asset_dir("judge"))
    heads = held_out_combinations()
    scores, images = judge_teacher(teacher, judge, heads, samples_per_head=2, steps=25, guidance_scale=3.0, seed=0)
    print("held-out captions:", percent(scores), flush=True)
    write_image(out / "held_out_samples.png", to_uint8(grid(images, 4)))
    verdicts = judge.predict(images)
    for number, rule in enumerate(HELD_OUT_RULES, 1):
        rows = [i for i, head in enumerate(h for h in heads for _ in range(2))
                if all(getattr(head, key) == value for key, value in rule.items())]
        counts = {}
        for key in ("hair_color", "hat", "beard", "glasses"):
            column = list(ATTRIBUTE_CLASSES).index(key)
            judged = [ATTRIBUTE_CLASSES[key][int(verdicts[i, column])] for i in rows]
            counts[key] = {value: judged.count(value) for value in sorted(set(judged))}
        print(f"rule {number} {rule} ({len(rows)} samples):", counts, flush=True)
    training = random.Random(0).sample(training_combinations(), 74)
    scores, _ = judge_teacher(teacher, judge, training, samples_per_head=2, steps=25, guidance_scale=3.0, seed=0)
    print("training combinations:", percent(scores), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("weight", type=float, nargs="?", default=BUILD.teacher_attention_weight)
    parser.add_argument("--parts", type=lambda text: text.split(","), default=list(MASK_PARTS))
    parser.add_argument("--terms", type=lambda text: text.split(","), default=list(BUILD.teacher_attention_terms))
    parser.add_argument("--attention-levels", type=int, default=BUILD.teacher.attention_levels)
    arguments = parser.parse_args()
    main(arguments.out, arguments.weight, arguments.parts, arguments.terms, arguments.attention_levels)
