"""The evaluation harness on the per-prompt baseline and the generator, with tiny models."""

import json
import math

import pytest
import torch

from dreamportrait.cli import main
from dreamportrait.world import caption, held_out_combinations, training_combinations
from dreamportrait.world.dataset import build_dataset
from dreamportrait.world.evaluate import (consistency_table, evaluate, frechet_distance, markdown_table, spread,
                                          view_turn_table)
from dreamportrait.world.judge import save_judge, train_judge


def test_frechet_distance():
    a = torch.randn(4000, 3)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    shifted = frechet_distance(a, a + torch.tensor([1.0, 0, 0]))
    assert shifted == pytest.approx(1.0, rel=1e-6)
    # 1-D, b = 2a: (m - 2m)² + (s - 2s)² = m² + s² (the sample mean m is not exactly 0)
    wider = frechet_distance(a[:, :1], 2 * a[:, :1])
    x = a[:, 0].double()
    assert wider == pytest.approx((x.mean() ** 2 + x.var()).item(), rel=1e-9)


def test_spread_picks_evenly():
    assert spread(list(range(10)), 3) == [0, 3, 6]
    assert spread([1, 2], 5) == [1, 2]
    held_out = held_out_combinations()
    picked = spread(held_out, 6)
    assert len(set(picked)) == 6 and picked[0] == held_out[0] and picked[-1] != held_out[5]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    real = build_dataset(root / "real", training_combinations(), 64, 32, seed=0, progress=False)
    save_judge(train_judge(real, steps=3, batch_size=16, progress=False), root / "judge")
    return root


def test_harness_measures_a_method(world):
    from dreamportrait.world.dataset import load_dataset
    from dreamportrait.world.judge import load_judge

    prompts = [caption(head, 0) for head in held_out_combinations()[:2]]
    calls = []

    def constant_method(prompt, seed):  # the same grey views whatever the prompt: no diversity
        calls.append((prompt, seed))
        return {"image": torch.zeros(3, 3, 32, 32)}

    result = evaluate(constant_method, prompts, [0, 1], load_judge(world / "judge"), load_dataset(world / "real"),
                      name="constant", progress=False)
    assert calls == [(p, s) for p in prompts for s in (0, 1)]
    assert result["multi_view_consistency"] == 1.0 and result["diversity"] == 0.0
    assert set(result["text_alignment"]) == {"hair_color", "skin_tone", "hair_style", "beard", "glasses", "hat"}
    assert result["world_fid"] > 0 and result["seconds_per_prompt"] >= 0
    table = markdown_table([result])
    assert table.splitlines()[2].startswith("| constant | ")
    # Results written before per-attribute consistency existed are left out of that table only.
    older = {key: value for key, value in result.items() if key != "consistency_per_attribute"} | {"method": "older"}
    table = consistency_table([result, older])
    assert table.splitlines()[-1] == "| constant |" + " 100.0 % |" * 7 and "older" not in table
    assert result["view_change"] == 0 and result["view_mirror_residual"] == 0  # grey views do not move
    assert "depth_error" not in result  # a method without depth
    older = {key: value for key, value in result.items() if not key.startswith("view_")} | {"method": "older"}
    table = view_turn_table([result, older])
    assert table.splitlines()[-1] == "| constant | 0.000 | 0.000 | – |" and "older" not in table


def test_view_turn_compares_the_outer_views_directly_and_mirrored(world):
    from dreamportrait.world.dataset import load_dataset
    from dreamportrait.world.judge import load_judge

    prompt, judge, real = caption(held_out_combinations()[0], 0), load_judge(world / "judge"), load_dataset(world / "real")
    left = torch.rand(3, 32, 32) * 2 - 1
    turning = torch.stack([left, torch.rand(3, 32, 32), left.flip(-1)])  # +30° is -30° mirrored: a symmetric head
    result = evaluate(lambda p, s: {"image": turning}, [prompt], [0, 1], judge, real, progress=False)
    assert result["view_mirror_residual"] == 0
    assert result["view_change"] == pytest.approx((left - left.flip(-1)).abs().mean().item(), rel=1e-6)
    painted = left.expand(3, -1, -1, -1)  # the same picture from every camera
    result = evaluate(lambda p, s: {"image": painted}, [prompt], [0], judge, real, progress=False)
    assert result["view_change"] == 0
    assert result["view_mirror_residual"] == pytest.approx((left - left.flip(-1)).abs().mean().item(), rel=1e-6)
    single = evaluate(lambda p, s: {"image": left[None]}, [prompt], [0, 1], judge, real, progress=False)
    assert "view_change" not in single and "view_mirror_residual" not in single  # one view: nothing to compare


def test_depth_error_is_measured_against_the_prompts_world_head_where_it_covers_the_frame(world):
    from dreamportrait.world.dataset import load_dataset
    from dreamportrait.world.evaluate import FOREGROUND_OPACITY, evaluation_cameras, world_head
    from dreamportrait.world.heads import render_heads
    from dreamportrait.world.judge import load_judge

    prompts = [caption(head, 0) for head in held_out_combinations()[:2]]
    offsets = {(prompt, seed): torch.rand(()).item() for prompt in prompts for seed in (0, 1)}

    def shifted_world(prompt, seed):
        # The prompt's own head at 16² depth (a coarser grid than its 32² image), moved back by a
        # random offset; every pixel the head does not cover is poisoned.
        cameras = evaluation_cameras(3)
        image = render_heads(world_head(prompt, seed).repeat_interleave(3), cameras, 32)[0]
        _, depth, opacity = render_heads(world_head(prompt, seed).repeat_interleave(3), cameras, 16)
        depth = torch.where(opacity > FOREGROUND_OPACITY, depth + offsets[prompt, seed], torch.nan)
        return {"image": image, "depth": depth}

    result = evaluate(shifted_world, prompts, [0, 1], load_judge(world / "judge"), load_dataset(world / "real"),
                      progress=False)
    assert result["depth_error"] == pytest.approx(sum(offsets.values()) / 4, rel=1e-5)
    other_seed = evaluate(lambda p, s: shifted_world(p, s + 1), prompts, [0], load_judge(world / "judge"),
                          load_dataset(world / "real"), progress=False)
    assert math.isnan(other_seed["depth_error"])  # another head: poisoned pixels now count
    assert view_turn_table([result]).splitlines()[-1].endswith(f" | {result['depth_error']:.3f} |")


def test_evaluate_cli_on_the_per_prompt_baseline(world, tiny_pixel_sd, tmp_path):
    guidance = tiny_pixel_sd
    assert main(["evaluate", "--method", "baseline", "--guidance", str(guidance), "--baseline-steps", "2",
                 "--baseline-checkpoints", "1,2", "--held-out", "2", "--seeds", "0-1", "--views", "2",
                 "--judge", str(world / "judge"), "--real", str(world / "real"), "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "baseline.json").read_text())
    assert 0 <= result["multi_view_consistency"] <= 1 and result["diversity"] > 0
    assert [row["steps"] for row in result["progress"]] == [1, 2]
    assert all(0 <= row["mean_alignment"] <= 1 and row["seconds_per_prompt"] > 0 for row in result["progress"])
    assert len(list((tmp_path / "out" / "baseline").glob("*.png"))) == 2
    # A second method into the same directory: results.md tabulates both.
    assert main(["evaluate", "--method", "baseline", "--guidance", str(guidance), "--baseline-steps", "1",
                 "--held-out", "1", "--seeds", "0", "--views", "2", "--judge", str(world / "judge"),
                 "--real-count", "16", "--name", "short-baseline", "--out", str(tmp_path / "out")]) == 0
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.count("| short-baseline |") == 3  # alignment, consistency and view-turn tables
    assert "baseline: text alignment after N optimisation steps" in table and table.count("\n| 2 | ") == 1
    # alignment, consistency, diversity (two seeds: appearance measured) and view-turn tables
    assert "multi-view consistency per attribute" in table and table.count("| baseline |") == 4
    assert main(["evaluate", "--method", "gan", "--checkpoint", str(tmp_path / "nothing"), "--judge",
                 str(world / "judge"), "--real", str(world / "real"), "--held-out", "1", "--out", str(tmp_path / "x")]) == 2


def test_evaluate_cli_on_the_world_itself(world, tmp_path):
    assert main(["evaluate", "--method", "world", "--held-out", "2", "--seeds", "0-1", "--views", "2",
                 "--judge", str(world / "judge"), "--real", str(world / "real"), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "world.json").read_text())
    assert result["method"] == "world" and result["diversity"] > 0
    assert result["view_change"] > 0.1 and result["view_mirror_residual"] < 0.05  # the world's heads turn in 3D
    assert "| world | " in (tmp_path / "results.md").read_text().split("how far the views turn")[1]
    assert len(list((tmp_path / "world").glob("*.png"))) == 2


def test_evaluate_samples_generators_at_the_given_truncation(world, tmp_path):
    # Truncation 0 maps every latent to the average w: the seeds of a prompt draw one sample, whose
    # diversity is 0; generate's 0.7, the default, leaves them apart.
    common = ["--held-out", "1", "--seeds", "0-1", "--views", "2", "--judge", str(world / "judge"),
              "--real", str(world / "real"), "--out", str(tmp_path)]
    for name, truncation in (("default", []), ("average", ["--truncation", "0"])):
        assert main(["evaluate", "--method", "gan", "--name", name, *truncation, *common]) == 0
    default, average = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("default", "average"))
    assert (default["truncation_psi"], average["truncation_psi"]) == (0.7, 0.0)
    assert default["diversity"] > 0 and average["diversity"] == pytest.approx(0, abs=1e-6)


class ScriptedJudge:
    """Judges view v of call c as ``verdicts[c][v]`` (6 class indices), with random features."""

    def __init__(self, verdicts):
        self.verdicts = iter(verdicts)

    def eval(self):
        return self

    def predict(self, views):
        return torch.tensor(next(self.verdicts))

    def features(self, views):
        return torch.randn(views.shape[0], 5)


def test_consistency_counts_samples_whose_views_agree_overall_and_per_attribute(world):
    from dreamportrait.world.attributes import parse_caption
    from dreamportrait.world.dataset import attribute_indices, load_dataset

    prompt = caption(held_out_combinations()[0], 0)
    right = attribute_indices([parse_caption(prompt)])[0].tolist()
    other = [(c + 1) % 2 for c in right]  # a different class for every attribute (each has >= 2)
    flip_hat = right[:5] + other[5:]
    flip_beard_and_hat = right[:3] + other[3:4] + right[4:5] + other[5:]
    verdicts = [[right, right, right], [right, flip_hat, right], [flip_beard_and_hat, right, right], [other] * 3]
    result = evaluate(lambda p, s: {"image": torch.rand(3, 3, 32, 32) * 2 - 1}, [prompt], [0, 1, 2, 3],
                      ScriptedJudge(verdicts),
                      load_dataset(world / "real"), progress=False)
    assert result["multi_view_consistency"] == 2 / 4  # the first and the last (consistently wrong)
    assert result["consistency_per_attribute"] == {"hair_color": 1.0, "skin_tone": 1.0, "hair_style": 1.0,
                                                   "beard": 3 / 4, "glasses": 1.0, "hat": 2 / 4}
    assert result["text_alignment"]["hat"] == pytest.approx(7 / 12) and result["text_alignment"]["beard"] == pytest.approx(8 / 12)


@pytest.mark.parametrize("method, argument", [
    ("world", ["--checkpoint", "run"]), ("baseline", ["--checkpoint", "run"]), ("generator", ["--guidance", "teacher"]),
    ("gan", ["--baseline-steps", "5"]), ("world", ["--baseline-checkpoints", "1"]),
    ("generator", ["--config", "configs/world.yaml"]), ("world", ["--truncation", "1"]),
    ("baseline", ["--truncation", "1"]),
])
def test_evaluate_refuses_an_argument_its_method_ignores(method, argument, tmp_path, capsys):
    assert main(["evaluate", "--method", method, *argument, "--held-out", "1", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert f"{argument[0]} applies only to --method" in error and f"not --method {method}" in error
    assert not list(tmp_path.iterdir())  # refused before anything ran or was written
