"""The captions switch of the training commands: ``world build --captions paraphrase`` (the
teacher's data and tokenizer) and ``world train --captions paraphrase`` (the generator's prompts);
the default stays canonical."""

import json

import pytest
import torch

from dreamportrait.cli import main
from dreamportrait.defaults import WORLD_CONFIG
from dreamportrait.world import caption, training_combinations
from dreamportrait.world.assets import asset_dir
from dreamportrait.world.attributes import PHRASINGS
from dreamportrait.world.captions import CANONICAL_SHARE
from dreamportrait.world.dataset import load_dataset, render_samples
from dreamportrait.world.teacher import TeacherConfig, build_teacher, missing_words, teacher_captions
from dreamportrait.world.train import prepare_run, training_prompts

TINY_TEACHER = TeacherConfig(channels=(32, 32), text_width=32, text_layers=2, text_heads=2, attention_head_dim=16)


def test_paraphrased_samples_differ_from_canonical_ones_in_their_words_only(seed):
    heads = training_combinations()
    canonical = render_samples(heads, 96, 8, seed=seed, batch_size=32, part_masks=True)
    paraphrased = render_samples(heads, 96, 8, seed=seed, batch_size=32, part_masks=True, captions="paraphrase")
    for field in ("images", "labels", "attributes", "masks"):
        assert torch.equal(getattr(canonical, field), getattr(paraphrased, field)), field
    kept = [a == b for a, b in zip(canonical.captions, paraphrased.captions)]
    assert 0 < sum(kept) < len(kept) / 2  # about CANONICAL_SHARE of them stay canonical
    texts = {caption(h, p) for h in heads for p in range(len(PHRASINGS))}
    assert all(c in texts for c, same in zip(paraphrased.captions, kept) if same)
    assert not any(c in texts for c, same in zip(paraphrased.captions, kept) if not same)
    with pytest.raises(ValueError, match="captions must be one of"):
        render_samples(heads, 4, 8, seed=seed, captions="people")
    assert CANONICAL_SHARE < 0.5


def test_world_build_with_paraphrases_builds_a_teacher_that_holds_their_words(tmp_path, capsys):
    assert main(["world", "build", "--out", str(tmp_path), "--setting", "tiny", "--captions", "paraphrase"]) == 0
    assert teacher_captions(tmp_path / "teacher") == "paraphrase"
    assert missing_words(tmp_path / "teacher", "paraphrase") == []
    data = load_dataset(tmp_path / "data/teacher-train-paraphrase")
    assert data.masks is not None and not (tmp_path / "data/teacher-train").exists()
    canonical = {caption(h, p) for h in training_combinations() for p in range(len(PHRASINGS))}
    assert sum(c not in canonical for c in data.captions) > len(data.captions) / 2
    assert json.loads((tmp_path / "report.json").read_text())["config"]["captions"] == "paraphrase"
    # Resuming that teacher on canonical captions is refused, not done.
    capsys.readouterr()
    assert main(["world", "build", "--out", str(tmp_path), "--setting", "tiny"]) == 2
    assert "--captions canonical: the teacher in" in capsys.readouterr().err
    assert teacher_captions(asset_dir("teacher")) == "canonical"  # the packaged one records nothing: canonical


def test_world_train_with_paraphrases_writes_them_and_needs_a_teacher_that_reads_them(tmp_path):
    with pytest.raises(ValueError, match="^--teacher: the teacher .* not built for 'paraphrase' captions"):
        prepare_run(tmp_path / "run", WORLD_CONFIG, gan="packaged", setting="tiny", captions="paraphrase")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    teacher = build_teacher(tmp_path / "teacher", TINY_TEACHER, captions="paraphrase")
    config = prepare_run(tmp_path / "run", WORLD_CONFIG, teacher=teacher, gan="packaged", gan_real="pretrained",
                         setting="tiny", captions="paraphrase")
    assert config.prompt_file == str(tmp_path / "run/prompts-paraphrase.txt")
    assert (tmp_path / "run/prompts-paraphrase.txt").read_text().splitlines() == training_prompts("paraphrase")
    default = prepare_run(tmp_path / "run", WORLD_CONFIG, teacher=teacher, gan="packaged", gan_real="pretrained",
                          setting="tiny")
    assert (tmp_path / "run/prompts.txt").read_text().splitlines() == training_prompts()
    assert default.prompt_file == str(tmp_path / "run/prompts.txt")
    with pytest.raises(ValueError, match="captions must be one of"):
        prepare_run(tmp_path / "run", WORLD_CONFIG, teacher=teacher, gan="packaged", captions="both")
