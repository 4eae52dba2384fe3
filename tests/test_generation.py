"""dreamportrait generate and the per-prompt baseline, end to end with tiny models."""

import json

import imageio.v3 as iio
import pytest
import torch
import trimesh

from dreamportrait import generation
from dreamportrait.baselines import DEFAULT_STEPS, optimise_scene
from dreamportrait.cli import BASELINE_DEFAULT_STEPS, TRUNCATION_PSI, build_parser, main
from dreamportrait.generation import parse_seeds, sample
from dreamportrait.guidance import StableDiffusionGuidance
from dreamportrait.models import TextConditionedGenerator, TextEncoder, build_generator, density_grid
from dreamportrait.models import load_pretrained, save_pretrained


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
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", prompts[0], "--prompt", prompts[1],
                 "--seeds", "0-1", "--views", "3", "--video", "--mesh", "--mesh-level", str(level),
                 "--mesh-resolution", "24", "--out", str(tmp_path)]) == 0
    assert "s per (prompt, seed) forward pass" in capsys.readouterr().out
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
