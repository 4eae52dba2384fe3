"""A trained world generator learns the paraphrase captions' words (dreamportrait.world.new_words):
the widened vocabulary reads every old word exactly as before, only new words are learnt, the
generator is copied untouched, and the output is written whole or not at all."""

import json
import random
import shutil

import pytest
import torch

from dreamportrait._manifest import write_manifest
from dreamportrait.cli import main
from dreamportrait.defaults import LEARN_WORDS_CANONICAL_WEIGHT as CANONICAL_WEIGHT
from dreamportrait.models.pretrained import WEIGHT_FILES, load_pretrained
from dreamportrait.text.encoder import TextEncoder, encode_text
from dreamportrait.world import new_words
from dreamportrait.world.assets import asset_dir
from dreamportrait.world.attributes import PHRASINGS, caption, training_combinations
from dreamportrait.world.captions import paraphrase
from dreamportrait.generation import forward_pass
from dreamportrait.world.new_words import REPORT, learn_words, relative_squared_error, widen_vocabulary
from dreamportrait.world.teacher import caption_words


def trained_generator():
    """The packaged generator's weights with the text encoder they were trained with: the packaged
    teacher's, which reads the canonical words only."""
    return load_pretrained(asset_dir("generator"), text_encoder=asset_dir("teacher"))[0]


def source(**settings) -> dict:
    """:func:`learn_words`'s source arguments for :func:`trained_generator`, with ``settings``."""
    return {"source": asset_dir("generator"), "text_encoder": asset_dir("teacher"), "progress": False, **settings}


def canonical_captions(rng: random.Random, count: int) -> list[str]:
    heads = training_combinations()
    return [caption(rng.choice(heads), rng.randrange(len(PHRASINGS))) for _ in range(count)]


def test_a_widened_vocabulary_reads_every_old_word_exactly_as_before(tmp_path, seed):
    encoder = TextEncoder(asset_dir("teacher"))  # the packaged generator was trained with it: closed, phrases
    words = caption_words("paraphrase")
    tokenizer, model, new = widen_vocabulary(encoder.tokenizer, encoder.model, words, tmp_path, seed=seed)
    old_vocabulary, vocabulary = encoder.tokenizer.get_vocab(), tokenizer.get_vocab()
    assert set(old_vocabulary) < set(vocabulary) and model.config.vocab_size == len(vocabulary) == len(new)
    assert int(new.sum()) == len(vocabulary) - len(old_vocabulary)
    assert not any(new[vocabulary[token]] for token in old_vocabulary)
    for word in words:  # every paraphrase word is one token
        assert len(tokenizer(word)["input_ids"]) == 3, word
    prompts = canonical_captions(random.Random(seed), 12) + ["", "a portrait of a bald person"]
    with torch.no_grad():
        before = encode_text(encoder.tokenizer, encoder.model, prompts, warn=False)
        after = encode_text(tokenizer, model, prompts, warn=False)
    for name in ("tokens", "mask", "pooled"):
        assert torch.equal(getattr(after, name), getattr(before, name)), name
    assert model.config.closed_vocabulary and model.config.text_encoding == "phrases"
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_new_words_are_drawn_with_the_spread_of_the_old_and_the_seed_fixes_them(tmp_path, seed):
    encoder = TextEncoder(asset_dir("teacher"))
    _, model, new = widen_vocabulary(encoder.tokenizer, encoder.model, ["spectacles", "ginger"], tmp_path / "a", seed)
    _, again, _ = widen_vocabulary(encoder.tokenizer, encoder.model, ["spectacles", "ginger"], tmp_path / "b", seed)
    _, other, _ = widen_vocabulary(encoder.tokenizer, encoder.model, ["spectacles", "ginger"], tmp_path / "c", seed + 1)
    fresh = model.get_input_embeddings().weight[new]
    old_spread = encoder.model.get_input_embeddings().weight.std().item()
    assert len(fresh) > 2 and 0.7 * old_spread < fresh.std().item() < 1.3 * old_spread
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert not torch.equal(other.get_input_embeddings().weight[new], fresh)


def test_relative_squared_error_is_each_part_s_squared_error_over_its_targets_variance(seed):
    targets = (torch.randn(4, 6, 8), torch.randn(4, 1, 8) * 3, torch.randn(4, 3, 2, 5, 5) + 2)
    offsets = (0.5, -0.25, 2.0)
    outputs = tuple(target + offset for target, offset in zip(targets, offsets))
    expected = sum(offset ** 2 / target.var() for offset, target in zip(offsets, targets))
    torch.testing.assert_close(relative_squared_error(outputs, targets), expected)
    assert relative_squared_error(targets, targets) == 0


def test_learn_words_trains_the_text_encoder_and_copies_the_generator(tmp_path, seed):
    report = learn_words(out_dir=tmp_path / "out", **source(steps=4, batch_size=2, seed=seed % 1000))
    out, weights = tmp_path / "out", WEIGHT_FILES["generator"]
    assert (out / weights).read_bytes() == (asset_dir("generator") / weights).read_bytes()
    assert json.loads((out / REPORT).read_text()) == report and (report["steps"], report["batch_size"]) == (4, 2)
    assert {"spectacles", "ginger", "cap", "woman", "bearded", "an"} <= set(report["words_learnt"])
    assert (out / REPORT).read_text() == json.dumps(report, indent=2) + "\n"
    assert {key: report[key] for key in ("source", "text_encoder", "lr", "canonical_weight", "seed")} == {
        "source": str(asset_dir("generator")), "text_encoder": str(asset_dir("teacher")), "lr": 1e-3,
        "canonical_weight": CANONICAL_WEIGHT, "seed": seed % 1000}
    assert 0 < report["seconds"] < 600
    for name in ("distillation", "canonical"):  # four steps: both windows are every step's mean
        assert report[f"{name}_loss_first_100"] == report[f"{name}_loss_last_100"]
    assert 0 < report["distillation_loss_first_100"] < 1
    assert "glasses" not in report["words_learnt"]  # the packaged vocabulary holds it
    learnt, packaged = load_pretrained(out)[0], trained_generator()  # checked against the manifest
    assert learnt.text_encoder.reads_words("spectacles") and not packaged.text_encoder.reads_words("spectacles")
    assert learnt.text_encoder.model.config.closed_vocabulary
    drawn = widen_vocabulary(packaged.text_encoder.tokenizer, packaged.text_encoder.model,
                             caption_words("paraphrase"), tmp_path / "drawn", seed % 1000)[1].state_dict()
    for name, value in learnt.text_encoder.model.state_dict().items():  # every tensor trained
        assert value.shape == drawn[name].shape, name
        assert name.endswith("position_ids") or not torch.equal(value, drawn[name]), name


def test_a_source_recording_its_text_encoder_elsewhere_gets_the_learnt_one_beside_it(tmp_path):
    # A training run's checkpoint records the teacher it was trained with instead of holding a copy.
    run = tmp_path / "checkpoint"
    run.mkdir()
    shutil.copy2(asset_dir("generator") / WEIGHT_FILES["generator"], run)
    config = json.loads((asset_dir("generator") / "config.json").read_text())
    config["text_conditioning"]["text_encoder"] = str(asset_dir("teacher"))
    # with the discriminator a training run saves beside it (here the packaged 3D GAN's)
    config["discriminator"] = json.loads((asset_dir("gan") / "config.json").read_text())["discriminator"]
    shutil.copy2(asset_dir("gan") / WEIGHT_FILES["discriminator"], run)
    (run / "config.json").write_text(json.dumps(config))
    write_manifest(run)
    learn_words(run, tmp_path / "out", steps=2, batch_size=2, progress=False)
    text = (tmp_path / "out" / "config.json").read_text()
    written = json.loads(text)
    assert written["text_conditioning"]["text_encoder"] is None and "discriminator" not in written
    assert text == json.dumps(written, indent=2, sort_keys=True) + "\n"  # as save_pretrained writes it
    assert load_pretrained(tmp_path / "out")[0].text_encoder.reads_words("spectacles")


def reading_errors(encode, packaged) -> tuple[float, float]:
    """How far the packaged generator's output for paraphrases of training combinations (another
    draw than training's) read by ``encode`` is from its output for their canonical captions read
    by its own encoder, and how far ``encode``'s reading of those canonical captions is from its own
    encoder's (:func:`relative_squared_error`)."""
    rng = random.Random(12345)
    heads = [rng.choice(training_combinations()) for _ in range(16)]
    canonical = [caption(head, rng.randrange(len(PHRASINGS))) for head in heads]
    paraphrases = [paraphrase(head, rng).text for head in heads]
    z = torch.randn(16, packaged.base.z_dim, generator=torch.Generator().manual_seed(7))
    camera = torch.zeros(16, 25)
    with torch.no_grad():
        reference = packaged.encode(canonical)
        targets = forward_pass(packaged, z, camera, reference)
        distillation = relative_squared_error(forward_pass(packaged, z, camera, encode(paraphrases)), targets)
        read = encode(canonical)
        kept = relative_squared_error((read.tokens, read.pooled), (reference.tokens, reference.pooled))
    return distillation.item(), kept.item()


def test_learning_brings_paraphrases_to_their_canonical_output_and_its_canonical_term_holds_canonical_reading(
        tmp_path):
    packaged = trained_generator()
    tokenizer, drawn, _ = widen_vocabulary(packaged.text_encoder.tokenizer, packaged.text_encoder.model,
                                           caption_words("paraphrase"), tmp_path / "drawn", seed=0)
    before, _ = reading_errors(lambda prompts: encode_text(tokenizer, drawn, prompts, warn=False), packaged)
    errors = {}
    for weight in (CANONICAL_WEIGHT, 0.0):
        learn_words(out_dir=tmp_path / str(weight), **source(steps=30, batch_size=4, lr=3e-3, canonical_weight=weight))
        errors[weight] = reading_errors(load_pretrained(tmp_path / str(weight))[0].encode, packaged)
    # 30 steps on this machine: 0.36 -> 0.24 (0.30 without the canonical term), the canonical
    # reading 0.02 from where it was (0.50 without)
    assert errors[CANONICAL_WEIGHT][0] < 0.8 * before and errors[0.0][0] < before
    assert errors[CANONICAL_WEIGHT][1] < 0.2 * errors[0.0][1]


@pytest.mark.parametrize("argument, value, message", [
    ("steps", 0, r"^steps must be an integer >= 1, got 0$"),
    ("steps", 2.0, r"^steps must be an integer >= 1, got 2.0$"),
    ("batch_size", 0, r"^batch_size must be an integer >= 1, got 0$"),
    ("seed", -1, r"^seed must be an integer >= 0, got -1$"),
    ("seed", "0", r"^seed must be an integer >= 0, got '0'$"),
    ("lr", 0.0, r"^lr must be a finite number > 0, got 0.0$"),
    ("lr", -1e-3, r"^lr must be a finite number > 0, got -0.001$"),
    ("lr", float("nan"), r"^lr must be a finite number > 0, got nan$"),
    ("lr", float("inf"), r"^lr must be a finite number > 0, got inf$"),
    ("lr", "1e-3", r"^lr must be a finite number > 0, got '1e-3'$"),
    ("canonical_weight", -1.0, r"^canonical_weight must be a finite number >= 0, got -1.0$"),
    ("canonical_weight", float("nan"), r"^canonical_weight must be a finite number >= 0, got nan$"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, argument, value, message):
    with pytest.raises(ValueError, match=message):
        learn_words(out_dir=tmp_path / "out", **source(**{"steps": 1, "batch_size": 1, argument: value}))
    assert not any(tmp_path.iterdir())


def test_sources_it_cannot_widen_and_an_existing_out_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"holds no text-conditioned generator with its text encoder$"):
        learn_words(asset_dir("gan"), tmp_path / "out", progress=False)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match=r"^out_dir .*taken exists: give a new directory$"):
        learn_words(out_dir=tmp_path / "taken", **source(steps=1, batch_size=1))
    open_vocabulary = tmp_path / "open"  # the packaged generator, its text encoder's config without the entry
    shutil.copytree(asset_dir("generator"), open_vocabulary)
    config_path = open_vocabulary / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    del config["closed_vocabulary"]
    config_path.write_text(json.dumps(config))
    write_manifest(open_vocabulary)
    with pytest.raises(ValueError, match=r"its text encoder is not trained on a closed vocabulary"):
        learn_words(open_vocabulary, tmp_path / "out", steps=1, batch_size=1, progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["open", "taken"]


def test_a_failed_run_leaves_nothing(tmp_path, monkeypatch):
    def fail(outputs, targets):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(new_words, "relative_squared_error", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        learn_words(out_dir=tmp_path / "models" / "out", **source())
    assert list((tmp_path / "models").iterdir()) == []


def test_the_command_writes_a_model_and_reports_bad_input(tmp_path, capsys):
    command = ["world", "learn-words", "--checkpoint", "packaged:generator", "--text-encoder", "packaged:teacher",
               "--out", str(tmp_path / "out")]
    assert main([*command, "--steps", "2", "--batch-size", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert report["text_encoder"] == str(asset_dir("teacher")) and "spectacles" in report["words_learnt"]
    assert load_pretrained(tmp_path / "out")[0].text_encoder.reads_words("cap")
    assert main([*command, "--steps", "2"]) == 2
    assert "dreamportrait world learn-words: out_dir" in capsys.readouterr().err


def test_a_run_is_fixed_by_its_seed_and_leaves_the_words_it_did_not_draw_where_the_seed_put_them(tmp_path, seed):
    seed = seed % 1000 + 1
    for name, run_seed in (("a", seed), ("b", seed), ("c", seed + 1)):
        learn_words(out_dir=tmp_path / name, **source(steps=1, batch_size=2, seed=run_seed, canonical_weight=0.0))
    rows = {name: load_pretrained(tmp_path / name)[0].text_encoder.model.get_input_embeddings().weight
            for name in "abc"}
    assert torch.equal(rows["a"], rows["b"]) and not torch.equal(rows["a"], rows["c"])
    old = TextEncoder(asset_dir("teacher"))
    drawn = widen_vocabulary(old.tokenizer, old.model, caption_words("paraphrase"), tmp_path / "drawn", seed)[1]
    drawn_rows = drawn.get_input_embeddings().weight
    untouched = (rows["a"] == drawn_rows).all(dim=1)  # one step of two captions leaves most new words alone
    assert untouched.sum() > len(untouched) - 60


def test_the_command_line_and_the_function_share_their_defaults():
    import inspect

    from dreamportrait.cli import build_parser

    parser = build_parser()
    arguments = parser.parse_args(["world", "learn-words", "--checkpoint", "x", "--out", "y"])
    defaults = {name: value.default for name, value in inspect.signature(learn_words).parameters.items()}
    for name in ("steps", "batch_size", "lr", "canonical_weight", "seed"):
        assert getattr(arguments, name) == defaults[name], name
    assert defaults["progress"] is True and defaults["text_encoder"] is None


def test_a_stale_temporary_directory_is_replaced(tmp_path):
    (tmp_path / ".out.tmp").mkdir()
    (tmp_path / ".out.tmp" / "stale.txt").write_text("from an interrupted run")
    learn_words(out_dir=tmp_path / "out", **source(steps=1, batch_size=1))
    assert not (tmp_path / "out" / "stale.txt").exists() and not (tmp_path / ".out.tmp").exists()
