"""``dreamportrait evaluate``: a method chosen by name, measured by the harness
(:mod:`dreamportrait.world.evaluate`) into a report directory that the methods it is compared
with share::

    OUT/NAME/<prompt>.png    a grid per prompt (rows: seeds, columns: views)
    OUT/NAME.json            the method's metrics
    OUT/results.md           Markdown tables of every method evaluated into OUT

The methods: ``generator`` (DreamPortrait), ``gan`` (a text-free 3D GAN), ``baseline`` (per-prompt
SDS) and ``world`` (the world's own renders: the ceiling of every metric). Two generators are
compared by evaluating each (``checkpoint``) under its own ``name`` into one ``OUT``.

The held-out prompts come from one of :data:`PROMPT_SETS`: the held-out combinations' canonical
captions or their held-out paraphrases (:mod:`~dreamportrait.world.paraphrases`); either way each
prompt is scored against the attributes it was written from.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..defaults import TRUNCATION_PSI, WORLD_CONFIG
from . import evaluate as harness
from .assets import asset_dir, model_directory
from .attributes import HeadAttributes, caption, held_out_combinations, parse_caption
from .captions import Caption
from .dataset import load_dataset, render_samples
from .judge import load_judge

METHODS = ("generator", "gan", "baseline", "world")

METHOD_OPTIONS = {"checkpoint": ("generator", "gan"), "guidance": ("baseline",), "config": ("baseline",),
                  "baseline_steps": ("baseline",), "baseline_checkpoints": ("baseline",),
                  "truncation": ("generator", "gan")}
"""The options that only some methods read, and those methods. Given with another method they are
refused, not ignored (a checkpoint passed to the baseline would otherwise be silently unused)."""


def check_options(method: str, **options) -> None:
    """ValueError if an option of :data:`METHOD_OPTIONS` that is given (not None) does not apply to ``method``."""
    for option, methods in METHOD_OPTIONS.items():
        if options.get(option) is not None and method not in methods:
            raise ValueError(f"--{option.replace('_', '-')} applies only to --method {' or '.join(methods)}, "
                             f"not --method {method}")


PROMPT_SETS = ("canonical", "paraphrase")
"""Where ``--held-out N`` takes its prompts from: the held-out combinations' canonical captions, or
the held-out paraphrase test set (:func:`~dreamportrait.world.paraphrases.paraphrase_test_set`)."""


def evaluation_prompts(prompts: Sequence[str] = (), held_out: int = 0) -> list[str]:
    """``prompts`` and the captions of ``held_out`` held-out combinations spread over their list."""
    return [c.text for c in evaluation_captions(prompts, held_out)]


def evaluation_captions(prompts: Sequence[str] = (), held_out: int = 0,
                        prompt_set: str = "canonical") -> list[Caption]:
    """``prompts`` (canonical captions, parsed for their attributes) and ``held_out`` prompts of
    ``prompt_set`` (:data:`PROMPT_SETS`), one per held-out combination spread over their list (the
    same combinations for either set), each with its attributes."""
    if prompt_set not in PROMPT_SETS:
        raise ValueError(f"--prompt-set must be one of {PROMPT_SETS}, got {prompt_set!r}")
    if prompt_set != "canonical" and held_out < 1:
        raise ValueError(f"--prompt-set {prompt_set} picks the held-out prompts: give --held-out N (1 to "
                         f"{len(held_out_combinations())})")
    captions = [Caption(text, parse_caption(text)) for text in prompts]
    if prompt_set == "canonical":
        captions += [Caption(caption(head, 0), head) for head in harness.spread(held_out_combinations(), held_out)]
    else:
        from .paraphrases import paraphrase_test_set

        captions += harness.spread(paraphrase_test_set(), held_out)
    if not captions:
        raise ValueError("give prompts with --prompt or --held-out N")
    return captions


def build_method(method: str, views: int, device: str, checkpoint: str | Path | None = None,
                 guidance: str | Path | None = None, config: str | Path | None = None,
                 baseline_steps: int | None = None, baseline_checkpoints: Sequence[int] = (),
                 truncation: float = TRUNCATION_PSI,
                 attributes: dict[str, HeadAttributes] | None = None) -> harness.Method:
    """The harness method ``method`` (one of :data:`METHODS`), its models loaded onto ``device``.

    ``generator`` and ``gan`` load ``checkpoint`` (a model directory or a training run; default: the
    packaged model) and sample at ``truncation``; ``baseline`` guides with ``guidance`` (default:
    the packaged teacher) under the guidance settings of the training ``config`` it is compared
    with (default: ``configs/world.yaml``) for ``baseline_steps``, keeping snapshots after
    ``baseline_checkpoints`` steps; ``world`` renders each prompt's head from its ``attributes``
    (default: the prompt, a canonical caption, parsed).
    """
    if method == "baseline":
        from ..baselines import DEFAULT_STEPS
        from ..training import load_config
        from ..training.trainer import build_guidance

        # The same guidance settings as the DreamPortrait run it is compared with.
        source = guidance or asset_dir("teacher")
        settings = load_config(config or WORLD_CONFIG, [f"guidance.source={source}"]).guidance
        steps = DEFAULT_STEPS if baseline_steps is None else baseline_steps
        return harness.baseline_method(build_guidance(settings, device), views, steps, checkpoints=baseline_checkpoints)
    if method == "world":
        return harness.world_method(views, attributes=attributes)
    if method not in ("generator", "gan"):
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if checkpoint is None and method == "generator":
        from .assets import load_default_generator

        return harness.generator_method(load_default_generator(device), views, truncation)
    from ..models.pretrained import load_pretrained
    from ..text import TextConditionedGenerator

    source = model_directory(checkpoint) if checkpoint else asset_dir("gan")
    generator = load_pretrained(source, device=device)[0]
    if isinstance(generator, TextConditionedGenerator) != (method == "generator"):
        wanted = "a text-conditioned" if method == "generator" else "a text-free"
        raise ValueError(f"--method {method} needs {wanted} generator; {source} holds the other kind")
    factory = harness.generator_method if method == "generator" else harness.gan_method
    return factory(generator, views, truncation)


def compare(method: str, out_dir: str | Path, prompts: Sequence[str] = (), held_out: int = 0,
            seeds: Sequence[int] = (0, 1, 2, 3), views: int = 4, name: str | None = None,
            judge: str | Path | None = None, real: str | Path | None = None, real_count: int = 1024,
            device: str | None = None, checkpoint: str | Path | None = None, guidance: str | Path | None = None,
            config: str | Path | None = None, baseline_steps: int | None = None,
            baseline_checkpoints: Sequence[int] | None = None, truncation: float | None = None,
            prompt_set: str = "canonical") -> dict:
    """Measure ``method`` (:func:`build_method`) on ``prompts`` plus ``held_out`` held-out prompts
    of ``prompt_set`` (:func:`evaluation_captions`; each scored against its own attributes; the
    result's ``prompt_set`` names the set, ``"custom"`` when ``prompts`` are given) with ``judge``
    (default: the packaged judge) against ``real``, a rendered dataset directory (default:
    ``real_count`` renders of the prompts' attribute combinations, the same for every method), and
    write the report (:func:`write_report`) as ``name`` (default: ``method``). Options that
    ``method`` does not read are refused before anything runs (:func:`check_options`). Returns
    the metrics."""
    check_options(method, checkpoint=checkpoint, guidance=guidance, config=config, baseline_steps=baseline_steps,
                  baseline_checkpoints=baseline_checkpoints, truncation=truncation)
    captions = evaluation_captions(prompts, held_out, prompt_set)
    heads = [c.attributes for c in captions]
    attributes = {c.text: c.attributes for c in captions}
    attribute_judge = load_judge(judge or asset_dir("judge"))
    if real:
        real_samples = load_dataset(real)
    else:
        real_samples = render_samples(sorted(set(heads), key=str), real_count, 32, seed=0)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    truncation = TRUNCATION_PSI if truncation is None else truncation
    measured = build_method(method, views, device, checkpoint=checkpoint, guidance=guidance, config=config,
                            baseline_steps=baseline_steps, baseline_checkpoints=baseline_checkpoints or (),
                            truncation=truncation, attributes=attributes)
    name = name or method
    result = harness.evaluate(measured, [c.text for c in captions], seeds, attribute_judge, real_samples, name=name,
                              out_dir=out_dir, attributes=heads)
    result["prompt_set"] = "custom" if prompts else prompt_set
    if method in METHOD_OPTIONS["truncation"]:
        result["truncation_psi"] = truncation
    if method == "baseline" and baseline_checkpoints:
        result["progress"] = harness.baseline_progress(measured.snapshots, attribute_judge, attributes)
    write_report(out_dir, name, result)
    return result


def write_report(out_dir: str | Path, name: str, result: dict) -> Path:
    """Write ``result`` to ``out_dir/name.json`` and tabulate every method's JSON in ``out_dir``
    into ``out_dir/results.md``; returns the JSON's path."""
    out_dir = Path(out_dir)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    rows = [json.loads(report.read_text()) for report in sorted(out_dir.glob("*.json"))]
    tables = [harness.markdown_table(rows), harness.consistency_table(rows), harness.diversity_table(rows),
              harness.view_turn_table(rows)]
    tables += [harness.progress_table(row) for row in rows if "progress" in row]
    (out_dir / "results.md").write_text("\n".join(tables))
    return path
