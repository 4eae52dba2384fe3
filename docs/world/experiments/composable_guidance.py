"""Composable classifier-free guidance on the packaged teacher (README, *the eighth attempt*).

    python docs/world/experiments/composable_guidance.py CAPTION_SCALE PHRASE_SCALE {features,all}

samples the 74 held-out captions twice each (DDIM-25, seed 0, as the README's teacher tables) with
    ε̂ = ε(∅) + CAPTION_SCALE (ε(caption) − ε(∅)) + PHRASE_SCALE Σ_k (ε(phrase_k) − ε(∅)),
the phrases being ``split_phrases(caption)`` (``features``: all but the first, "a portrait of a
dark-skinned person"), and prints the judge's per-attribute accuracy, overall and per held-out rule.
PHRASE_SCALE 0 is the plain CFG of :meth:`Teacher.sample`.
"""
import sys

import torch
from diffusers import DDIMScheduler

from dreamportrait.models.text_encoder import split_phrases
from dreamportrait.world.assets import asset_dir
from dreamportrait.world.attributes import HELD_OUT_RULES, caption, held_out_combinations
from dreamportrait.world.dataset import ATTRIBUTE_CLASSES, attribute_indices
from dreamportrait.world.judge import load_judge
from dreamportrait.world.teacher import Teacher

SAMPLES_PER_HEAD, STEPS, BATCH = 2, 25, 64


@torch.no_grad()
def sample(teacher: Teacher, prompts: list[str], caption_scale: float, phrase_scale: float, first_phrase: int,
           generator: torch.Generator) -> torch.Tensor:
    """Composably guided DDIM samples ``(N, 3, R, R)`` in [-1, 1]."""
    scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    scheduler.set_timesteps(STEPS)
    n, size = len(prompts), teacher.unet.config.sample_size
    x = torch.randn(n, 3, size, size, generator=generator)
    phrases = [split_phrases(prompt)[first_phrase:] if phrase_scale else [] for prompt in prompts]
    owner = torch.tensor([i for i, own in enumerate(phrases) for _ in own], dtype=torch.long)
    flat = [phrase for own in phrases for phrase in own]
    context = torch.cat([teacher.encode(prompts), teacher.encode([""] * n)] + ([teacher.encode(flat)] if flat else []))
    for t in scheduler.timesteps:
        eps = teacher.unet(torch.cat([x, x, x[owner]]), t, encoder_hidden_states=context).sample
        conditional, unconditional, per_phrase = eps[:n], eps[n:2 * n], eps[2 * n:]
        guided = unconditional + caption_scale * (conditional - unconditional)
        guided = guided.index_add(0, owner, phrase_scale * (per_phrase - unconditional[owner]))
        x = scheduler.step(guided, t, x).prev_sample
    return x.clamp(-1, 1)


def main(caption_scale: float, phrase_scale: float, which: str) -> None:
    teacher, judge = Teacher(asset_dir("teacher")), load_judge(asset_dir("judge"))
    heads = [head for head in held_out_combinations() for _ in range(SAMPLES_PER_HEAD)]
    prompts = [caption(head, 0) for head in heads]
    generator = torch.Generator().manual_seed(0)
    images = torch.cat([sample(teacher, prompts[i:i + BATCH], caption_scale, phrase_scale,
                               1 if which == "features" else 0, generator) for i in range(0, len(prompts), BATCH)])
    correct = (judge.predict(images) == attribute_indices(heads)).float()
    groups = {"all": list(range(len(heads)))}
    for number, rule in enumerate(HELD_OUT_RULES, 1):
        groups[f"rule {number}"] = [i for i, h in enumerate(heads) if all(getattr(h, k) == v for k, v in rule.items())]
    for name, rows in groups.items():
        accuracy = correct[rows].mean(0)
        print(name, {attribute: round(100 * accuracy[i].item(), 1) for i, attribute in enumerate(ATTRIBUTE_CLASSES)})


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[3] not in ("features", "all"):
        sys.exit(__doc__)
    main(float(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
