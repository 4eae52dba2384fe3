"""Which of the teacher's two ways of reading the caption paints *red hair under a blue hat*'s hat
red (README, *the ninth attempt*): the cross-attention over the caption's states, or the pooled
caption added to the timestep embedding (``addition_embed_type="text"``).

    python docs/world/experiments/caption_channels.py [TEACHER_DIR]   # default: the packaged teacher

For the 30 held-out captions of that rule (two DDIM-25 samples each, CFG 3, seed 0, one batch) it
judges the samples with the caption as written, with the pooled caption taken from the same
caption with the hair made brown, and with the cross-attention's states taken from it instead.
"""
import dataclasses
import sys

import torch

from dreamportrait.world.assets import asset_dir
from dreamportrait.world.attributes import caption, held_out_combinations
from dreamportrait.world.dataset import ATTRIBUTE_CLASSES
from dreamportrait.world.judge import load_judge
from dreamportrait.world.teacher import Teacher

SAMPLES_PER_HEAD, STEPS, GUIDANCE = 2, 25, 3.0


def sample(teacher: Teacher, attention_prompts: list[str], pooled_prompts: list[str]) -> torch.Tensor:
    """:meth:`Teacher.sample` of ``attention_prompts`` (DDIM + CFG; seed 0) with the pooled caption
    that of ``pooled_prompts`` (the unconditional half reads "" for both)."""
    unet = teacher.unet
    with torch.no_grad():
        pooled_context = torch.cat([teacher.encode(pooled_prompts), teacher.encode([""] * len(pooled_prompts))])
    pool = unet.add_embedding.forward
    unet.add_embedding.forward = lambda states: pool(pooled_context)  # the UNet pools what we say
    try:
        return teacher.sample(attention_prompts, STEPS, GUIDANCE, torch.Generator().manual_seed(0))
    finally:
        del unet.add_embedding.forward


def main(directory: str) -> None:
    teacher, judge = Teacher(directory), load_judge(asset_dir("judge"))
    heads = [h for h in held_out_combinations() if h.hair_color == "red" and h.hat == "blue"]
    red = [caption(h, 0) for h in heads for _ in range(SAMPLES_PER_HEAD)]
    brown = [caption(dataclasses.replace(h, hair_color="brown"), 0) for h in heads for _ in range(SAMPLES_PER_HEAD)]
    columns = list(ATTRIBUTE_CLASSES)
    for name, attention, pooled in (("as written", red, red), ("pooled caption from brown", red, brown),
                                    ("cross-attention from brown", brown, red)):
        verdicts = judge.predict(sample(teacher, attention, pooled))
        hats = [ATTRIBUTE_CLASSES["hat"][int(i)] for i in verdicts[:, columns.index("hat")]]
        hair = [ATTRIBUTE_CLASSES["hair_color"][int(i)] for i in verdicts[:, columns.index("hair_color")]]
        print(f"{name}: blue hat {hats.count('blue')} / red hat {hats.count('red')} / none {hats.count('none')}; "
              f"red hair {hair.count('red')}, brown {hair.count('brown')} (of {len(hats)})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else asset_dir("teacher"))
