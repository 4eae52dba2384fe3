"""What the per-prompt baseline writes: each view is the scene rendered from the generator's
default FFHQ orbit (EG3D's radius 2.7, pivot (0, 0, 0.2), field of view 18.837, +-0.6 rad of yaw),
the grid holds the views, and timing.json is exactly the run's record."""

import json
import math

import imageio.v3 as iio
import numpy as np
import torch

from dreamportrait.baselines import BaselineResult, TriplaneScene, write_baseline
from dreamportrait.models import view_cameras
from dreamportrait.outputs import to_uint8


def test_write_baseline_views_grid_and_timing(tmp_path):
    torch.manual_seed(0)
    scene = TriplaneScene(resolution=16)
    with torch.no_grad():
        scene.planes.normal_(0, 2)  # a scene whose renders differ with the camera
    result = BaselineResult(scene=scene, seconds=12.5, losses=[3.0, 2.0, 1.25])
    torch.manual_seed(1)  # the renderer's stratified samples are drawn from torch's generator
    write_baseline(result, tmp_path, "a person with red hair", steps=3, views=4, resolution=16)

    torch.manual_seed(1)
    with torch.no_grad():
        expected = scene(view_cameras(4, 0.6, 2.7, (0.0, 0.0, 0.2), 18.837), 16)["image"]
    for index in range(4):
        view = iio.imread(tmp_path / f"view{index:02d}.png")
        np.testing.assert_array_equal(view, to_uint8(expected[index]))
    grid = iio.imread(tmp_path / "grid.png")
    assert grid.shape[0] * grid.shape[1] == 4 * 16 * 16  # four 16 x 16 views
    timing = (tmp_path / "timing.json").read_text()
    assert timing == json.dumps({"prompt": "a person with red hair", "steps": 3, "seconds": 12.5,
                                 "final_sds_loss": 1.25}, indent=2) + "\n"
    assert (tmp_path / "scene.safetensors").is_file()


def test_write_baseline_without_losses_records_none(tmp_path):
    result = BaselineResult(scene=TriplaneScene(resolution=16), seconds=0.0, losses=[])
    write_baseline(result, tmp_path, "p", steps=0, views=1)
    assert json.loads((tmp_path / "timing.json").read_text())["final_sds_loss"] is None
    assert iio.imread(tmp_path / "view00.png").shape[:2] == (32, 32)  # the default resolution


class RecordingGuidance:
    """A stand-in for Stable Diffusion guidance: records each call, loss = sum of the images."""

    device = torch.device("cpu")

    def __init__(self):
        self.calls = []

    def sds_loss(self, images, prompts, yaws, step_ratio, generator):
        self.calls.append(dict(shape=tuple(images.shape), prompts=prompts, yaws=yaws.clone(), step_ratio=step_ratio,
                               generator=generator))
        return type("SDS", (), {"loss": images.sum()})()


def test_optimise_scene_wiring(monkeypatch):
    from dreamportrait.baselines import optimise_scene, per_prompt_sds
    from dreamportrait.models import sample_camera_labels

    clock = iter([100.0, 103.5])
    monkeypatch.setattr(per_prompt_sds.time, "perf_counter", lambda: next(clock))
    guidance, seen = RecordingGuidance(), []
    torch.manual_seed(0)
    before = TriplaneScene().planes.detach().clone()  # the scene optimise_scene builds after seeding with 0
    result = optimise_scene(guidance, "a bald man", steps=3, batch_size=2, progress=False,
                            callback=lambda step, scene: seen.append((step, scene)))
    assert result.seconds == 3.5
    assert [s for s, _ in seen] == [0, 1, 2] and all(scene is result.scene for _, scene in seen)
    assert [c["step_ratio"] for c in guidance.calls] == [0.0, 1 / 3, 2 / 3]
    assert all(c["shape"] == (2, 3, 32, 32) and c["prompts"] == ["a bald man"] * 2 for c in guidance.calls)
    assert all(isinstance(c["generator"], torch.Generator) for c in guidance.calls)
    # the first views' yaws are the first draw of a generator seeded with the seed, over +-45 degrees
    _, yaws = sample_camera_labels(2, math.radians(45.0), math.radians(20.0), 2.7, (0.0, 0.0, 0.2), 18.837,
                                   torch.Generator().manual_seed(0))
    torch.testing.assert_close(guidance.calls[0]["yaws"], yaws)
    assert len(result.losses) == 3 and all(isinstance(loss, float) for loss in result.losses)
    # Adam's first steps move each parameter by about the learning rate (0.01)
    moved = (result.scene.planes.detach() - before).abs().max().item()
    assert 0.005 < moved <= 0.031
