"""``dreamportrait world build``: datasets, judge and teacher of the synthetic world, resumable.

Stages, each skipped when its output exists (a dataset shard, the judge, the teacher's training
state), so an interrupted build continues where it stopped::

    OUT/data/judge-train    renders of training combinations (judge)
    OUT/data/judge-test     renders of the held-out combinations (judge accuracy)
    OUT/data/teacher-train  captioned renders of training combinations, with part masks (teacher);
                            OUT/data/teacher-train-paraphrase with ``captions="paraphrase"``: the
                            same renders, most captions paraphrased (:mod:`~dreamportrait.world.captions`)
    OUT/judge/              judge.safetensors + judge.json
    OUT/teacher/            the teacher, Stable Diffusion layout (+ training_state.pt while training)
    OUT/teacher_samples.png teacher samples of held-out captions (two combinations per row)
    OUT/report.json         judge accuracy, the judge's accuracy on teacher samples of the held-out
                            heads' canonical captions and of their held-out paraphrases (per
                            attribute), and seconds per stage
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .._atomic import atomic_path
from ..outputs import grid, to_uint8, write_image
from .attributes import held_out_combinations, training_combinations
from .captions import check_captions
from .dataset import build_dataset
from .judge import accuracy, load_judge, save_judge, train_judge
from .paraphrases import paraphrase_test_set
from .teacher import Teacher, TeacherConfig, build_teacher, judge_teacher, teacher_captions, train_teacher


@dataclass
class BuildSetting:
    resolution: int = 32
    judge_train: int = 8192
    judge_test: int = 1024
    judge_steps: int = 3000
    teacher_train: int = 16384
    teacher_steps: int = 3000
    teacher_batch: int = 32
    teacher_lr: float = 5e-4
    teacher_snr_gamma: float | None = 5.0
    teacher_samples_per_head: int = 4
    teacher_sample_steps: int = 50
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # The teacher's cross-attention is supervised by the renders' part masks: every region's
    # pixels must read the phrase naming it (docs/notes/experiments.md, *The teacher*). Without it the
    # teacher paints the hair's colour on held-out hats; the token term and larger weights cost
    # the hair colour and the glasses.
    teacher_attention_weight: float = 0.03
    teacher_attention_terms: tuple[str, ...] = ("pixels",)
    # The teacher's training captions: the canonical phrasings (every packaged teacher's) or
    # mostly paraphrases as people write them, with the tokenizer vocabulary to match.
    captions: str = "canonical"


SETTINGS = {
    "default": BuildSetting(),
    "tiny": BuildSetting(judge_train=128, judge_test=64, judge_steps=5, teacher_train=64, teacher_steps=2,
                         teacher_batch=8, teacher_samples_per_head=1, teacher_sample_steps=2,
                         teacher=TeacherConfig(channels=(32, 32), text_width=32, text_layers=2, text_heads=2,
                                               attention_head_dim=16)),
}


def build_world(out_dir: str | Path, setting: str = "default", seed: int = 0, progress: bool = True,
                captions: str | None = None) -> dict:
    """Run (or resume) every stage; returns the report also written to ``OUT/report.json``.
    ``captions`` (default: the setting's, ``"canonical"``) picks the teacher's training captions
    (:data:`~dreamportrait.world.captions.CAPTION_SETS`); a teacher in ``OUT`` built for other
    captions is refused, not resumed (ValueError naming ``--captions``)."""
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {sorted(SETTINGS)}, got {setting!r}")
    config, out = SETTINGS[setting], Path(out_dir)
    if captions is not None:
        config = replace(config, captions=check_captions(captions))
    if (out / "teacher/model_index.json").is_file() and teacher_captions(out / "teacher") != config.captions:
        raise ValueError(f"--captions {config.captions}: the teacher in {out / 'teacher'} is built for "
                         f"{teacher_captions(out / 'teacher')!r} captions; build into another --out")
    report: dict = {"setting": setting, "config": asdict(config), "seconds": {}}

    start = time.perf_counter()
    judge_train = build_dataset(out / "data/judge-train", training_combinations(), config.judge_train,
                                config.resolution, seed=seed * 10 + 1, progress=progress)
    judge_test = build_dataset(out / "data/judge-test", held_out_combinations(), config.judge_test,
                               config.resolution, seed=seed * 10 + 2, progress=progress)
    teacher_data = "data/teacher-train" if config.captions == "canonical" else f"data/teacher-train-{config.captions}"
    teacher_train = build_dataset(out / teacher_data, training_combinations(), config.teacher_train,
                                  config.resolution, seed=seed * 10 + 3, progress=progress,
                                  part_masks=config.teacher_attention_weight > 0, captions=config.captions)
    report["seconds"]["data"] = time.perf_counter() - start

    start = time.perf_counter()
    if (out / "judge/judge.json").is_file():
        judge = load_judge(out / "judge")
    else:
        judge = train_judge(judge_train, steps=config.judge_steps, seed=seed, progress=progress)
        save_judge(judge, out / "judge")
    report["judge_accuracy_held_out"] = accuracy(judge, judge_test)
    report["seconds"]["judge"] = time.perf_counter() - start

    start = time.perf_counter()
    if not (out / "teacher/model_index.json").is_file():
        build_teacher(out / "teacher", config.teacher, seed=seed, captions=config.captions)
    train_teacher(Teacher(out / "teacher"), teacher_train, steps=config.teacher_steps, batch_size=config.teacher_batch,
                  lr=config.teacher_lr, snr_gamma=config.teacher_snr_gamma, seed=seed, progress=progress,
                  attention_weight=config.teacher_attention_weight,
                  attention_terms=config.teacher_attention_terms)
    report["seconds"]["teacher"] = time.perf_counter() - start

    start = time.perf_counter()
    teacher, heads = Teacher(out / "teacher"), held_out_combinations()
    report["teacher_accuracy_held_out"], samples = judge_teacher(
        teacher, judge, heads, config.teacher_samples_per_head, steps=config.teacher_sample_steps, seed=seed)
    write_image(out / "teacher_samples.png", to_uint8(grid(samples, 2 * config.teacher_samples_per_head)))
    # The same heads in the held-out paraphrase test set's words: whether the teacher, which the
    # generator distils, reads prompts as people write them.
    report["teacher_accuracy_held_out_paraphrases"], _ = judge_teacher(
        teacher, judge, heads, config.teacher_samples_per_head, steps=config.teacher_sample_steps, seed=seed,
        captions=[held_out.text for held_out in paraphrase_test_set()])
    report["seconds"]["teacher_evaluation"] = time.perf_counter() - start

    with atomic_path(out / "report.json") as temporary:
        temporary.write_text(json.dumps(report, indent=2) + "\n")
    return report
