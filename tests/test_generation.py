"""dreamportrait generate and the per-prompt baseline, end to end with tiny models."""

import json
import os

import imageio.v3 as iio
import pytest
import torch
import trimesh

from dreamportrait import generation
from dreamportrait.baselines import DEFAULT_STEPS, optimise_scene
from dreamportrait.cli import build_parser, main
from dreamportrait.defaults import BASELINE_STEPS as BASELINE_DEFAULT_STEPS
from dreamportrait.defaults import TRUNCATION_PSI
from dreamportrait.generation import parse_seeds, sample
from dreamportrait.guidance import StableDiffusionGuidance
from dreamportrait.models import TextConditionedGenerator, TextEncoder, build_generator, density_grid
from dreamportrait.models import load_pretrained, save_pretrained
from dreamportrait.world.assets import asset_dir


@pytest.fixture(scope="module")
def checkpoint(tiny_pixel_sd, tmp_path_factory):
    generator = TextConditionedGenerator(build_generator("tiny", neural_rendering_resolution=16), 32,
                                         text_encoder=TextEncoder(tiny_pixel_sd), attention_resolutions=(16,),
                                         attention_heads=2, attention_head_dim=8)
    with torch.no_grad():  # an "trained" state: open gates and adapters
        generator.cross_attention["16"].gate.fill_(1.0)
        for mlp in generator.adapters.groups.values():
            mlp[2].weight.normal_(std=0.1)
    return save_pretrained(tmp_path_factory.mktemp("model"), generator)


def mesh_level(checkpoint, prompts, seeds):
    """A density level every sample's density crosses (an untrained model has no level-10 surface)."""
    generator, _ = load_pretrained(checkpoint)
    ranges = []
    for prompt in prompts:
        for seed in seeds:
            ws, _, planes = sample(generator, prompt, seed)
            sigma = density_grid(generator.base, ws, resolution=24, planes=planes, progress=False)
            ranges.append((sigma.min().item(), sigma.max().item()))
    low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
    assert low < high, "the samples' density ranges do not overlap"
    return (low + high) / 2


def test_generate_writes_every_promised_file(checkpoint, tmp_path, capsys):
    prompts = ["a portrait of a bald man with glasses", "a woman with red hair"]
    level = mesh_level(checkpoint, prompts, [0, 1])
    umask = os.umask(0o027)  # files and folders readable by the group, as a plain open()/mkdir() makes them
    try:
        assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", prompts[0], "--prompt", prompts[1],
                     "--seeds", "0-1", "--views", "3", "--video", "--mesh", "--mesh-level", str(level),
                     "--mesh-resolution", "24", "--out", str(tmp_path)]) == 0
    finally:
        os.umask(umask)
    assert "s per (prompt, seed) forward pass" in capsys.readouterr().out
    written = list(tmp_path.rglob("*"))
    assert len(written) == 2 * (1 + 1 + 2 * (1 + 3 * 2 + 2))  # per prompt: folder, grid, per seed: folder, files
    for path in written:
        assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path
    for slug in ("a-portrait-of-a-bald-man-with-glasses", "a-woman-with-red-hair"):
        grid = iio.imread(tmp_path / slug / "grid.png")
        assert grid.shape == (2 * 64, 3 * 64, 3)
        for seed in ("seed0000", "seed0001"):
            folder = tmp_path / slug / seed
            for view in range(3):
                assert iio.imread(folder / f"view{view:02d}.png").shape == (64, 64, 3)
                assert iio.imread(folder / f"view{view:02d}_depth.png").shape == (16, 16)
            frames = iio.imread(folder / "turntable.mp4")
            assert frames.shape[0] == 72 and frames.shape[1:] == (64, 64, 3)
            assert len(trimesh.load(folder / "mesh.ply", force="mesh").faces) > 0
    # Different seeds and different prompts give different portraits.
    first = tmp_path / "a-portrait-of-a-bald-man-with-glasses"
    assert (iio.imread(first / "seed0000/view00.png") != iio.imread(first / "seed0001/view00.png")).any()
    assert (iio.imread(first / "seed0000/view00.png") !=
            iio.imread(tmp_path / "a-woman-with-red-hair/seed0000/view00.png")).any()


def test_generate_errors_are_clear(checkpoint, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "nothing"), "--prompt", "a", "--out", str(tmp_path)]) == 2
    assert "neither a model directory" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a", "--seeds", "3-1",
                 "--out", str(tmp_path)]) == 2
    assert "--seeds must look like" in capsys.readouterr().err
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]


@pytest.mark.parametrize("text", ["0-1000000000000", "18446744073709551616", "4294967296", "0-4294967296", "-1",
                                  "1--2", "", "0,,1", "a", "1.5", "0x10", "3-1", "0-10000", "0-5000,5001-10000",
                                  "1" * 5000, "\u0663"], ids=lambda text: text[:20] or "empty")
def test_seeds_out_of_range_or_too_many_are_refused_naming_the_option(text):
    with pytest.raises(ValueError, match="--seeds must look like 0-3,7: integers from 0 to 4294967295 and ranges "
                                         "of them, at most 10000 seeds in all"):
        parse_seeds(text)


def test_seeds_take_the_whole_range(checkpoint, tmp_path, capsys):
    assert parse_seeds(" 0-2, 7 ") == [0, 1, 2, 7] and parse_seeds("4294967295") == [4294967295]
    assert parse_seeds("0-9998,4294967295") == [*range(9999), 4294967295]
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "a", "--seeds", "18446744073709551616",
                 "--out", str(tmp_path)]) == 2
    assert "--seeds must look like" in capsys.readouterr().err
    generator = load_pretrained(checkpoint)[0]
    for seeds in ([], [-1], [2**32], [True], [0.0], "0", None):
        with pytest.raises(ValueError, match="seeds must be a non-empty list of integers from 0 to 4294967295"):
            generation.generate(generator, ["a bald man"], seeds, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("prompt", ["", " ", "\t\n"])
def test_an_empty_prompt_is_an_error(checkpoint, tmp_path, capsys, prompt):
    generator = load_pretrained(checkpoint)[0]
    for prompts in ([prompt], ["a bald man", prompt], prompt, []):
        with pytest.raises(ValueError, match="prompts must be a non-empty list of prompts with words"):
            generation.generate(generator, prompts, [0], tmp_path, progress=False)
    for command in (["generate", "--out", str(tmp_path), "--prompt", "a man"], ["evaluate", "--method", "world",
                    "--out", str(tmp_path)], ["baseline", "--guidance", "x", "--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit:
            main([*command, "--prompt", prompt])
        assert exit.value.code == 2 and "argument --prompt: a prompt must have words" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_prompt_of_words_outside_a_closed_vocabulary_is_an_error(tmp_path, capsys):
    generator = load_pretrained(asset_dir("generator"))[0]  # its text encoder: closed_vocabulary
    assert generator.text_encoder.reads_words("a gentleman with very long red hair")  # "a", "long red hair"
    for prompt in ("gentleman", "very zorbly gentleman", "gentleman, sporting monocles"):
        assert not generator.text_encoder.reads_words(prompt)
    for prompts in (["gentleman"], ["a bald man", "gentleman, sporting monocles"]):
        with pytest.raises(ValueError, match=r"^prompts: the text model reads none of the words of \['gentleman"):
            generation.generate(generator, prompts, [0], tmp_path, progress=False)
    assert main(["generate", "--out", str(tmp_path), "--prompt", "zorbly", "--seeds", "0"]) == 2
    assert "the text model reads none of the words of ['zorbly']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_info_lists_the_packaged_generators_vocabulary(capsys):
    assert main(["info"]) == 0
    listed = capsys.readouterr().out.split("the packaged generator's prompts read these words")[1]
    words = [word.strip() for word in listed.split(":", 1)[1].replace("\n", " ").split(",")]
    assert len(words) > 20 and {"bald", "glasses", "portrait", "red", "with"} <= set(words) and "gentleman" not in words
    generator_words = TextEncoder(asset_dir("generator")).tokenizer
    for word in words:  # each one token of the packaged generator's tokenizer
        assert len(generator_words(word)["input_ids"]) == 3, word


def test_per_prompt_baseline_optimises_one_scene(tiny_pixel_sd, tmp_path):
    guidance = StableDiffusionGuidance(tiny_pixel_sd)
    result = optimise_scene(guidance, "a portrait of a bald man", steps=3, render_resolution=8, progress=False)
    assert len(result.losses) == 3 and result.seconds > 0
    initial = optimise_scene(guidance, "a portrait of a bald man", steps=0, progress=False).scene  # same seed
    assert not torch.equal(result.scene.planes, initial.planes)  # the steps moved the scene
    assert main(["baseline", "--prompt", "a portrait of a bald man", "--guidance", str(tiny_pixel_sd), "--steps", "2",
                 "--resolution", "8", "--views", "2", "--out", str(tmp_path)]) == 0
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert timing["steps"] == 2 and timing["seconds"] > 0
    assert iio.imread(tmp_path / "grid.png").shape == (8, 16, 3)
    assert (tmp_path / "scene.safetensors").is_file()


def test_help_names_the_baselines_default_steps(capsys):
    """The CLI spells the baseline's default step count and generation's truncation out (so --help
    imports no torch): they must be the real ones."""
    assert BASELINE_DEFAULT_STEPS == DEFAULT_STEPS
    assert TRUNCATION_PSI == generation.TRUNCATION_PSI
    with pytest.raises(SystemExit):
        build_parser().parse_args(["baseline", "--help"])
    assert f"the baseline's, {DEFAULT_STEPS}" in " ".join(capsys.readouterr().out.split())
