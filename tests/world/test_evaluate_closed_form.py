"""The evaluation harness's numbers against closed forms, with a stand-in judge whose verdicts and
features are known (no trained judge, no world data set): alignment, consistency, diversity,
world-FID, the view turn, the depth error, the grids it writes, the tables and the baseline's
progress."""

import math
import re
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from dreamportrait.outputs import slug, to_uint8
from dreamportrait.world import caption, held_out_combinations
from dreamportrait.world.attributes import parse_caption
from dreamportrait.world.dataset import attribute_indices
from dreamportrait.world.evaluate import (baseline_method, baseline_progress, consistency_table, depth_error,
                                          evaluate, evaluation_cameras, frechet_distance, markdown_table,
                                          progress_table, spread, view_turn, view_turn_table, world_method,
                                          world_orbit)

ATTRIBUTES = ["hair_color", "skin_tone", "hair_style", "beard", "glasses", "hat"]


def numpy_frechet(a, b):
    """|μa - μb|² + tr(A + B - 2 (A^½ B A^½)^½) with numpy's covariances (N - 1) and eigh square roots."""
    def sqrt_psd(m):
        values, vectors = np.linalg.eigh((m + m.T) / 2)
        return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cov_a, cov_b = np.atleast_2d(np.cov(a.T)), np.atleast_2d(np.cov(b.T))
    root = sqrt_psd(cov_a)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * sqrt_psd(root @ cov_b @ root)))


def test_frechet_distance_of_small_feature_sets():
    a = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 3.0], [4.0, 1.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 2.0], [3.0, 5.0]])
    assert frechet_distance(a, b) == pytest.approx(numpy_frechet(a, b), rel=1e-9)
    # Diagonal covariances: |Δμ|² + Σ (σa - σb)²; here 1-D: a has mean 1, variance 4/3; b mean 4, variance 12.
    x, y = torch.tensor([[0.0], [1.0], [2.0], [1.0]]), torch.tensor([[2.0], [6.0], [4.0], [4.0]])
    assert np.var([0, 1, 2, 1], ddof=1) == pytest.approx(2 / 3) and np.var([2, 6, 4, 4], ddof=1) == pytest.approx(8 / 3)
    expected = (1 - 4) ** 2 + (math.sqrt(2 / 3) - math.sqrt(8 / 3)) ** 2
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)


def test_view_turn_is_the_outer_views_difference_direct_and_mirrored():
    views = torch.rand(4, 3, 2, 3)
    change, residual = view_turn(views)
    first, last = views[0].numpy(), views[-1].numpy()
    assert change == pytest.approx(np.abs(first - last).mean(), rel=1e-6)
    assert residual == pytest.approx(np.abs(first - last[..., ::-1]).mean(), rel=1e-6)


def test_evaluation_cameras_sweep_thirty_degrees_either_side_on_the_worlds_orbit():
    cameras = evaluation_cameras(3)
    assert cameras.shape == (3, 25)
    origins = cameras[:, [3, 7, 11]]
    expected = [[-2.7 * 0.5, 0, 2.7 * math.sqrt(3) / 2], [0, 0, 2.7], [2.7 * 0.5, 0, 2.7 * math.sqrt(3) / 2]]
    assert np.allclose(origins.numpy(), expected, atol=1e-5)
    assert np.allclose(cameras[:, 16].numpy(), 1 / (math.tan(math.radians(18.837) / 2) * 1.414), atol=1e-4)
    assert world_orbit() == {"radius": 2.7, "pivot": (0.0, 0.0, 0.0), "fov_degrees": 18.837,
                             "yaw_range_degrees": 45.0, "pitch_range_degrees": 20.0}


class StandInJudge:
    """Judges call k (one per (prompt, seed)) as ``verdicts[k]`` (V, 6); a view's features are its
    mean per channel, so every distance is a closed form."""

    def __init__(self, verdicts):
        self.verdicts, self.calls, self.evaluated, self.featured = list(verdicts), 0, False, []

    def eval(self):
        self.evaluated = True
        return self

    def predict(self, views):
        verdict = torch.tensor(self.verdicts[self.calls])
        self.calls += 1
        return verdict

    def features(self, views):
        self.featured.append(views.shape[0])
        return views.mean((2, 3))


class StandInReal:
    def __init__(self, images):
        self.images = images

    def float_images(self):
        return self.images


def test_evaluate_reports_its_closed_forms(tmp_path):
    prompts = [caption(head, 0) for head in held_out_combinations()[:2]]
    expected = attribute_indices([parse_caption(p) for p in prompts]).tolist()
    other = [[(c + 1) % 2 for c in row] for row in expected]  # another class for every attribute
    seeds, views = [0, 1, 2], 3
    renders = {(p, s): torch.rand(views, 3, 4, 4) * 2 - 1 for p in prompts for s in seeds}
    verdicts = [[expected[0]] * 3, [expected[0], other[0], expected[0]], [other[0]] * 3,  # prompt 0
                [expected[1]] * 3, [expected[1]] * 2 + [expected[1][:5] + other[1][5:]], [expected[1]] * 3]
    judge = StandInJudge(verdicts)
    real = StandInReal(torch.rand(300, 3, 4, 4) * 2 - 1)
    result = evaluate(lambda p, s: {"image": renders[p, s]}, prompts, seeds, judge, real, name="Stand In",
                      out_dir=tmp_path, progress=False)
    assert judge.evaluated and judge.featured[-2:] == [256, 44]  # real images in chunks of 256
    predicted = np.array(verdicts)  # (6 samples, 3 views, 6 attributes)
    truth = np.array([expected[0]] * 3 + [expected[1]] * 3)[:, None, :]
    alignment = (predicted == truth).mean((0, 1))
    assert result["text_alignment"] == pytest.approx(dict(zip(ATTRIBUTES, alignment)), rel=1e-6)
    alike = (predicted == predicted[:, :1]).all(1)  # (6, 6)
    assert result["multi_view_consistency"] == pytest.approx(alike.all(1).mean()) == 4 / 6
    assert result["consistency_per_attribute"] == pytest.approx(dict(zip(ATTRIBUTES, alike.mean(0))))
    diversity = []
    for p in prompts:  # frontal (middle) view features, mean pairwise distance between seeds
        frontal = np.stack([renders[p, s][views // 2].mean((1, 2)).numpy() for s in seeds])
        distances = np.linalg.norm(frontal[:, None] - frontal[None], axis=-1)
        diversity.append(distances.sum() / (len(seeds) * (len(seeds) - 1)))
    assert result["diversity"] == pytest.approx(np.mean(diversity), rel=1e-5)
    fake_features = np.concatenate([renders[p, s].mean((2, 3)).numpy() for p in prompts for s in seeds])
    assert result["world_fid"] == pytest.approx(numpy_frechet(fake_features, real.images.mean((2, 3)).numpy()),
                                                rel=1e-5)
    turns = [view_turn(renders[p, s]) for p in prompts for s in seeds]
    assert result["view_change"] == pytest.approx(np.mean([t[0] for t in turns]), rel=1e-6)
    assert result["view_mirror_residual"] == pytest.approx(np.mean([t[1] for t in turns]), rel=1e-6)
    assert result["method"] == "Stand In" and result["seconds_per_prompt"] >= 0 and "depth_error" not in result
    # One grid per prompt: rows are seeds, columns views.
    assert len(list((tmp_path / "stand-in").iterdir())) == 2
    for p in prompts:
        sheet = iio.imread(tmp_path / "stand-in" / f"{slug(p)}.png")  # slug: tests/test_generation_outputs.py
        assert sheet.shape == (3 * 4, 3 * 4, 3)
        for row, s in enumerate(seeds):
            for column in range(views):
                cell = sheet[row * 4:(row + 1) * 4, column * 4:(column + 1) * 4]
                assert np.array_equal(cell, to_uint8(renders[p, s][column]))
    one_seed = evaluate(lambda p, s: {"image": renders[p, 0][:1]}, prompts, [0],
                        StandInJudge([[expected[0]], [expected[1]]]), real, progress=False)
    assert math.isnan(one_seed["diversity"]) and "view_change" not in one_seed and one_seed["method"] == "method"
    for no_prompts, no_seeds in (([], [0]), (prompts, [])):
        with pytest.raises(ValueError, match="^evaluate needs at least one prompt and one seed$"):
            evaluate(lambda p, s: None, no_prompts, no_seeds, judge, real, progress=False)


def test_the_worlds_own_depth_has_no_error_and_a_shifted_one_the_shift():
    prompt = caption(held_out_combinations()[0], 0)
    rendered = world_method(3, resolution=8)(prompt, 5)
    assert rendered["image"].shape == (3, 3, 8, 8) and rendered["depth"].shape == (3, 1, 8, 8)
    assert depth_error(rendered["depth"], prompt, 5) == pytest.approx(0, abs=1e-6)
    assert depth_error(rendered["depth"] + 0.25, prompt, 5) == pytest.approx(0.25, rel=1e-5)
    assert depth_error(rendered["depth"], prompt, 6) > 0.001  # another seed's head: another shape
    judge = StandInJudge([attribute_indices([parse_caption(prompt)]).tolist() * 3])
    result = evaluate(lambda p, s: rendered, [prompt], [5], judge, StandInReal(torch.rand(4, 3, 8, 8)),
                      progress=False)
    assert result["depth_error"] == pytest.approx(0, abs=1e-6)


def result_row(name, fraction):
    return {"method": name, "text_alignment": dict.fromkeys(ATTRIBUTES, fraction), "multi_view_consistency": 0.5,
            "consistency_per_attribute": dict.fromkeys(ATTRIBUTES, 0.25), "diversity": 0.12345, "world_fid": 3.14159,
            "seconds_per_prompt": 0.0123456, "view_change": 0.5, "view_mirror_residual": 0.01}


def test_tables():
    a, b = result_row("a", 1 / 3), result_row("b", 1.0)
    b["depth_error"] = 0.0456
    assert markdown_table([a, b]) == (
        "| method | hair_color | skin_tone | hair_style | beard | glasses | hat | consistency | diversity | world-FID "
        "| s / prompt |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| a | 33.3 % | 33.3 % | 33.3 % | 33.3 % | 33.3 % | 33.3 % | 50.0 % | 0.123 | 3.14 | 0.0123 |\n"
        "| b | 100.0 % | 100.0 % | 100.0 % | 100.0 % | 100.0 % | 100.0 % | 50.0 % | 0.123 | 3.14 | 0.0123 |\n")
    assert consistency_table([a]) == (
        "multi-view consistency per attribute (samples whose views all agree on it)\n\n"
        "| method | hair_color | skin_tone | hair_style | beard | glasses | hat | all |\n"
        "|---|---|---|---|---|---|---|---|\n| a | 25.0 % | 25.0 % | 25.0 % | 25.0 % | 25.0 % | 25.0 % | 50.0 % |\n")
    table = view_turn_table([a, b])
    assert table.startswith("how far the views turn between yaw −30° and +30° (mean |Δpixel| in [−1, 1]; mirror "
                            "residual ≈ 0 for a symmetric head turning in 3D) and the depth error (mean |Δdepth| "
                            "from the prompt's world head where it covers the frame, world units)\n\n")
    assert table.endswith("| method | view change | mirror residual | depth error |\n|---|---|---|---|\n"
                          "| a | 0.500 | 0.010 | – |\n| b | 0.500 | 0.010 | 0.046 |\n")
    progress = {"method": "baseline", "progress": [
        {"steps": 10, "text_alignment": dict.fromkeys(ATTRIBUTES, 0.5), "mean_alignment": 0.5,
         "seconds_per_prompt": 1.23456}]}
    assert progress_table(progress) == (
        "baseline: text alignment after N optimisation steps\n\n"
        "| steps | hair_color | skin_tone | hair_style | beard | glasses | hat | mean | s / prompt |\n"
        "|---|---|---|---|---|---|---|---|---|\n| 10 | 50.0 % | 50.0 % | 50.0 % | 50.0 % | 50.0 % | 50.0 % | 50.0 % "
        "| 1.23 |\n")
    assert spread(list(range(7)), 7) == list(range(7)) and spread(list(range(8)), 3) == [0, 2, 5]


def test_the_baselines_progress_per_checkpoint():
    prompts = [caption(head, 0) for head in held_out_combinations()[:2]]
    expected = attribute_indices([parse_caption(p) for p in prompts]).tolist()
    wrong_hat = expected[1][:5] + [(expected[1][5] + 1) % 3]
    judge = StandInJudge([[expected[0]] * 2, [expected[1], wrong_hat], [wrong_hat] * 2])
    snapshots = {3: [(prompts[1], 4.0, torch.zeros(2, 3, 4, 4))],
                 1: [(prompts[0], 1.0, torch.zeros(2, 3, 4, 4)), (prompts[1], 2.0, torch.zeros(2, 3, 4, 4))],
                 2: []}
    rows = baseline_progress(snapshots, judge)
    assert [row["steps"] for row in rows] == [1, 3]  # in order; a checkpoint without snapshots is left out
    assert rows[0]["seconds_per_prompt"] == 1.5 and rows[1]["seconds_per_prompt"] == 4.0
    assert rows[0]["text_alignment"] == pytest.approx({**dict.fromkeys(ATTRIBUTES, 1.0), "hat": 3 / 4})
    assert rows[1]["text_alignment"] == pytest.approx({**dict.fromkeys(ATTRIBUTES, 1.0), "hat": 0.0})
    assert rows[0]["mean_alignment"] == pytest.approx((5 + 3 / 4) / 6) and rows[1]["mean_alignment"] == pytest.approx(
        5 / 6)
    guidance = SimpleNamespace(device=torch.device("cpu"))
    assert sorted(baseline_method(guidance, 2, 3, checkpoints=[1, 3]).snapshots) == [1, 3]  # both ends allowed
    for checkpoints in ([0], [4], [1, 5]):
        with pytest.raises(ValueError, match=re.escape(f"checkpoints must lie in [1, 3] (the baseline's steps), got "
                                                       f"{checkpoints}")):
            baseline_method(None, 2, 3, checkpoints=checkpoints)


def test_only_the_pixels_the_world_head_covers_count_in_the_depth_error():
    from dreamportrait.world.evaluate import FOREGROUND_OPACITY, world_head
    from dreamportrait.world.heads import render_heads

    prompt = caption(held_out_combinations()[1], 0)
    cameras = evaluation_cameras(3)
    _, depth, opacity = render_heads(world_head(prompt, 2).repeat_interleave(3), cameras, 8)
    covered = opacity > FOREGROUND_OPACITY
    assert 0 < covered.float().mean() < 1
    poisoned = torch.where(covered, depth + 0.5, torch.full_like(depth, 100.0))
    assert depth_error(poisoned, prompt, 2) == pytest.approx(0.5, rel=1e-5)
    assert world_method(2)(prompt, 0)["image"].shape == (2, 3, 64, 64)  # 64² by default


class Clock:
    """A stand-in for time.perf_counter that moves only when told."""

    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def test_the_baseline_method_optimises_one_scene_per_prompt_and_seed_and_keeps_snapshots(monkeypatch):
    import dreamportrait.baselines
    import dreamportrait.world.evaluate as evaluate_module

    clock = Clock(100.0)
    monkeypatch.setattr(evaluate_module.time, "perf_counter", clock)
    renders, optimised = [], []

    def scene(cameras, resolution):  # rendering takes 1 s
        clock.now += 1
        renders.append((cameras, resolution))
        return {"image": torch.full((len(cameras), 3, resolution, resolution), float(len(renders)),
                                    dtype=torch.float64),
                "image_depth": torch.full((len(cameras), 1, resolution, resolution), 2.0, dtype=torch.float64)}

    def optimise_scene(guidance, prompt, **kwargs):  # each step takes 10 s
        optimised.append((guidance, prompt, kwargs))
        for step in range(kwargs["steps"]):
            clock.now += 10
            kwargs["callback"](step, scene)
        return SimpleNamespace(scene=scene)

    monkeypatch.setattr(dreamportrait.baselines, "optimise_scene", optimise_scene)
    guidance = SimpleNamespace(device=torch.device("cpu"))
    method = baseline_method(guidance, views=2, steps=3, resolution=8, checkpoints=[3, 1, 2, 3])
    result = method("a bald man", 7)
    ((given, prompt, kwargs),) = optimised
    callback = kwargs.pop("callback")
    assert given is guidance and prompt == "a bald man" and callable(callback)
    assert kwargs == {"steps": 3, "render_resolution": 8, "seed": 7, "progress": False, **world_orbit()}
    assert sorted(method.snapshots) == [1, 2, 3]
    # after step k: 10 k s of optimisation, the 1 s of each earlier snapshot's rendering left out
    (first,), (second,), (third,) = method.snapshots[1], method.snapshots[2], method.snapshots[3]
    assert [first[:2], second[:2], third[:2]] == [("a bald man", 10.0), ("a bald man", 20.0), ("a bald man", 30.0)]
    assert torch.equal(first[2], torch.full((2, 3, 8, 8), 1.0)) and first[2].dtype == torch.float32
    assert torch.equal(third[2], torch.full((2, 3, 8, 8), 3.0))
    assert len(renders) == 4 and all(torch.equal(c, evaluation_cameras(2)) and r == 8 for c, r in renders)
    assert result["image"].dtype == torch.float32 and torch.equal(result["image"], torch.full((2, 3, 8, 8), 4.0))
    assert torch.equal(result["depth"], torch.full((2, 1, 8, 8), 2.0)) and result["depth"].dtype == torch.float32
    assert baseline_method(guidance, 2, 3).snapshots == {}
    baseline_method(guidance, 2, 3)("a man", 0)
    assert renders[-1][1] == 32  # the default resolution


class StandInGan(torch.nn.Module):
    """mapping(z, c, truncation_psi) = z (one w); synthesis shows the w's first value per view."""

    z_dim = 4

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def mapping(self, z, c, truncation_psi=1.0):
        self.calls.append(("mapping", z, c, truncation_psi))
        return z[:, None, :].double().expand(-1, 3, -1)  # three ws, as a real mapping has several

    def synthesis(self, ws, c, **kwargs):
        self.calls.append(("synthesis", ws, c, kwargs))
        return {"image": ws[:, :1, :1, None].expand(-1, 3, 4, 4),
                "image_depth": ws[:, :1, 1:2, None].expand(-1, 1, 2, 2), "image_raw": None}


def test_the_gan_method_draws_z_from_the_seed_and_renders_the_evaluation_views():
    from dreamportrait.world.evaluate import gan_method

    generator = StandInGan()
    result = gan_method(generator, 3, truncation_psi=0.4)("ignored prompt", 9)
    (_, z, c, psi), (_, ws, cameras, kwargs) = generator.calls
    assert torch.equal(z, torch.randn(1, 4, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(c, evaluation_cameras(1)) and psi == 0.4
    assert ws.shape == (3, 3, 4) and torch.equal(ws[2, 0], z[0].double())
    assert torch.equal(cameras, evaluation_cameras(3))
    assert kwargs == {"noise_mode": "const", "deterministic_sampling": True}
    assert result["image"].dtype == torch.float32 and result["image"].shape == (3, 3, 4, 4)
    assert torch.equal(result["image"][:, 0, 0, 0], z[0, 0].expand(3)) and set(result) == {"image", "depth"}
    assert torch.equal(result["depth"][:, 0, 0, 0], z[0, 1].expand(3)) and result["depth"].dtype == torch.float32
    generator.calls.clear()
    gan_method(generator, 2)("p", 0)
    assert generator.calls[0][3] == 0.7  # generate's truncation by default


def test_the_generator_method_is_one_sample_rendered_from_the_evaluation_views(monkeypatch):
    import dreamportrait.generation
    from dreamportrait.world.evaluate import generator_method

    calls = []
    monkeypatch.setattr(dreamportrait.generation, "sample", lambda *args: calls.append(("sample", args)) or (
        "ws", "sr_ws", "planes"))
    monkeypatch.setattr(dreamportrait.generation, "render_views", lambda *args: calls.append(("render", args)) or {
        "image": torch.ones(2, 3, 4, 4, dtype=torch.float64), "image_depth": torch.zeros(2, 1, 2, 2),
        "image_raw": None})
    generator = StandInGan()
    result = generator_method(generator, 2, truncation_psi=0.3)("a man", 4)
    (_, sample_args), (_, render_args) = calls
    assert sample_args[:4] == (generator, "a man", 4, 0.3) and torch.equal(sample_args[4], evaluation_cameras(1))
    assert render_args[:4] == (generator, "ws", "sr_ws", "planes")
    assert torch.equal(render_args[4], evaluation_cameras(2))
    assert result["image"].dtype == torch.float32 and set(result) == {"image", "depth"}
    calls.clear()
    generator_method(generator, 2)("a man", 4)
    assert calls[0][1][3] == 0.7


def test_the_methods_move_their_cameras_and_latents_to_the_models_device(monkeypatch):
    import dreamportrait.baselines
    import dreamportrait.generation
    from dreamportrait.world.evaluate import gan_method, generator_method

    generator = StandInGan().to("meta")
    generator.synthesis = lambda ws, c, **kwargs: generator.calls.append(("synthesis", ws, c, kwargs)) or {
        "image": torch.zeros(2, 3, 4, 4), "image_depth": torch.zeros(2, 1, 2, 2)}  # renders on the CPU
    gan_method(generator, 2)("p", 1)
    (_, z, c, _), (_, _, cameras, _) = generator.calls
    assert (z.device.type, c.device.type, cameras.device.type) == ("meta", "meta", "meta")
    seen = []
    monkeypatch.setattr(dreamportrait.generation, "sample", lambda *args: seen.append(args[4].device.type) or (
        None, None, None))
    monkeypatch.setattr(dreamportrait.generation, "render_views", lambda *args: seen.append(args[4].device.type) or {
        "image": torch.zeros(2, 3, 4, 4), "image_depth": torch.zeros(2, 1, 2, 2)})
    generator_method(generator, 2)("p", 1)
    assert seen == ["meta", "meta"]

    def scene(cameras, resolution):
        seen.append(cameras.device.type)
        return {"image": torch.zeros(2, 3, 4, 4), "image_depth": torch.zeros(2, 1, 2, 2)}

    monkeypatch.setattr(dreamportrait.baselines, "optimise_scene", lambda *args, **kwargs: SimpleNamespace(scene=scene))
    baseline_method(SimpleNamespace(device=torch.device("meta")), 2, 1)("p", 1)
    assert seen[-1] == "meta"
