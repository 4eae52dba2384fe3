"""EG3D's own renderer with and without ``dreamportrait.integrations.eg3d.install()``, and the fused
sample-and-decode op against the unfused compositions (EG3D's own code; EG3D's order on our sampling
kernel; and the sampling kernel's own mean followed by the MLP).

EG3D's code cannot be copied into the project; its renderer is re-stated (from EG3D's published
math) in ``tests/eg3d_restated`` and imported under EG3D's module paths, exactly as an EG3D code
base holds it. Both sides render the same planes with the same decoder and the same seed.

    python -m pytest benchmarks/test_eg3d_integration.py --benchmark-only

Shapes (EG3D's FFHQ configuration: 3 x 32 x 256² planes, 48 stratified + 48 importance samples per
ray, 64² rays): **inference** one image; **training** a batch of 4 images (EG3D's per-GPU batch).
fwd+bwd computes the gradients of the rendered colours, depths and opacities with respect to the
planes and the decoder's parameters.
"""

from __future__ import annotations

import pytest
import torch

from dreamportrait.integrations import eg3d as integration
from dreamportrait.models import camera_labels, fov_to_intrinsics, orbit_poses
from dreamportrait.models.cameras import FRONTAL, camera_rays
from dreamportrait.ops import EG3D_AXES, sample_and_decode, triplane_sample
from dreamportrait.ops.sample_and_decode import decode

SHAPES = {"inference": 1, "training": 4}
ROUNDS = {"inference": 3, "training": 2}
OPTIONS = dict(ray_start=2.25, ray_end=3.3, depth_resolution=48, depth_resolution_importance=48, box_warp=1.0,
               clamp_mode="softplus", disparity_space_sampling=False, white_back=False, density_noise=0)
RESOLUTION = 64


@pytest.fixture(scope="module")
def eg3d():
    from eg3d_restated import eg3d_code

    with eg3d_code() as modules:
        yield modules
    integration.uninstall()


def render_call(eg3d, batch: int, backward: bool):
    torch.manual_seed(0)
    decoder = eg3d.triplane.OSGDecoder(32, {"decoder_lr_mul": 1, "decoder_output_dim": 32})
    planes = torch.randn(batch, 3, 32, 256, 256).requires_grad_(backward)
    yaw = torch.linspace(-0.4, 0.4, batch) + FRONTAL
    c = camera_labels(orbit_poses(yaw, torch.full((batch,), FRONTAL - 0.1)), fov_to_intrinsics(18.837))
    origins, directions = eg3d.ray_sampler.RaySampler()(c[:, :16].view(-1, 4, 4), c[:, 16:25].view(-1, 3, 3),
                                                        RESOLUTION)
    renderer = eg3d.renderer.ImportanceRenderer()
    inputs = [planes, *decoder.parameters()]

    def call():
        torch.manual_seed(1)
        with torch.set_grad_enabled(backward):
            rgb, depth, opacity = renderer(planes, decoder, origins, directions, OPTIONS)
            if backward:
                torch.autograd.grad(rgb.sum() + depth.sum() + opacity.sum(), inputs)

    return call


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("implementation", ["baseline", "installed"])
def test_eg3d_renderer(benchmark, record, eg3d, implementation, shape, direction):
    call = render_call(eg3d, SHAPES[shape], direction == "fwd+bwd")
    integration.uninstall()
    if implementation == "installed":
        integration.install()
    try:
        call()  # warm-up (loads the extension)
        benchmark.pedantic(call, rounds=ROUNDS[shape], iterations=1)
    finally:
        integration.uninstall()
    record(f"eg3d-renderer/{shape}/{direction}", implementation, benchmark)


POINTS = ("rays", "uniform")
"""Where the fused op's points lie: ``rays``, EG3D's coarse pass (48 stratified depths on each of the
64² rays of the renderer benchmark's cameras); ``uniform``, as many points spread uniformly over the
box, the worst case for the caches (every point's corner rows in a different part of the planes)."""


def decode_inputs(batch: int, backward: bool, points: str = "rays"):
    """Planes, points (``points``: one of :data:`POINTS`) and decoder weights for the fused-op comparison."""
    torch.manual_seed(0)
    planes = torch.randn(batch, 3, 32, 256, 256)
    samples = RESOLUTION * RESOLUTION * OPTIONS["depth_resolution"]
    if points == "uniform":
        xyz = (torch.rand(batch, samples, 3) - 0.5) * 0.9
    else:
        yaw = torch.linspace(-0.4, 0.4, batch) + FRONTAL
        origins, directions = camera_rays(orbit_poses(yaw, torch.full((batch,), FRONTAL - 0.1)),
                                          fov_to_intrinsics(18.837).expand(batch, 3, 3), RESOLUTION)
        step = (OPTIONS["ray_end"] - OPTIONS["ray_start"]) / OPTIONS["depth_resolution"]
        depths = OPTIONS["ray_start"] + step * (torch.arange(OPTIONS["depth_resolution"]) + torch.rand(
            batch, RESOLUTION * RESOLUTION, OPTIONS["depth_resolution"]))
        xyz = (origins[:, :, None] + directions[:, :, None] * depths[..., None]).reshape(batch, samples, 3)
    weights = [torch.randn(64, 32) / 32 ** 0.5, torch.zeros(64), torch.randn(33, 64) / 8, torch.zeros(33)]
    return [t.requires_grad_(backward) for t in (planes, xyz.contiguous(), *weights)]


UNFUSED = {
    "eg3d-code": None,
    "baseline": "none",
    "sample-mean": "mean",
}
"""The unfused compositions the fused op is timed against, by the ``reduce`` their sampling kernel
runs: ``eg3d-code``, what an EG3D code base runs without our ops (EG3D's ``sample_from_planes``, three
``grid_sample`` calls, its ``(B, 3, N, C)`` samples' mean in PyTorch, then the MLP in PyTorch);
``baseline``, EG3D's order on our sampling kernel (the three planes' samples ``(B, N, 3, C)`` written
out, their mean taken in PyTorch, then the MLP); ``sample-mean``, the mean taken inside the sampling
kernel (only the ``(B, N, C)`` features written out), then the MLP."""


def decode_call(implementation: str, inputs: list, backward: bool, eg3d=None):
    """One forward (and with ``backward`` one backward) of the fused op (``implementation`` "cpu") or
    of an :data:`UNFUSED` composition on ``inputs`` (:func:`decode_inputs`); ``eg3d`` is EG3D's
    modules (the ``eg3d`` fixture), which ``eg3d-code`` runs."""
    planes, points, w1, b1, w2, b2 = inputs

    def run():
        if implementation == "cpu":
            return sample_and_decode(planes, points, 1.0, w1, b1, w2, b2, EG3D_AXES, backend="cpu")
        if implementation == "eg3d-code":
            features = eg3d.renderer.sample_from_planes(eg3d.renderer.generate_planes(), planes, points,
                                                        padding_mode="zeros", box_warp=1.0)
            return decode(features.mean(1), w1, b1, w2, b2)
        reduce = UNFUSED[implementation]
        features = triplane_sample(planes, points, 1.0, EG3D_AXES, reduce, backend="cpu")
        return decode(features.mean(2) if reduce == "none" else features, w1, b1, w2, b2)

    def call():
        with torch.set_grad_enabled(backward):
            out = run()
            if backward:
                torch.autograd.grad(out.sum(), inputs)

    return call


@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("where", POINTS)
@pytest.mark.parametrize("implementation", [*UNFUSED, "cpu"])
def test_sample_and_decode(benchmark, record, eg3d, implementation, where, shape, direction):
    call = decode_call(implementation, decode_inputs(SHAPES[shape], direction == "fwd+bwd", where),
                       direction == "fwd+bwd", eg3d)
    call()
    benchmark.pedantic(call, rounds=ROUNDS[shape], iterations=1)
    record(f"sample_and_decode/{where}/{shape}/{direction}", implementation, benchmark)


def interleaved(batch: int = 1, rounds: int = 3, renderer: bool = True) -> None:
    """Both sides of each comparison timed alternately (best of ``rounds`` each), so a change in the
    machine's load affects both alike: ``python benchmarks/test_eg3d_integration.py [BATCH [ROUNDS
    [decode]]]`` (``decode``: the fused op against the unfused composition only, not the renderer)."""
    import itertools
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from eg3d_restated import eg3d_code

    def best_of(calls: dict) -> dict:
        best = dict.fromkeys(calls, float("inf"))
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                best[name] = min(best[name], time.perf_counter() - start)
        return best

    with eg3d_code() as eg3d:
        for direction in ("fwd", "fwd+bwd") if renderer else ():
            backward = direction == "fwd+bwd"
            render = render_call(eg3d, batch, backward)

            def installed():
                with integration.installed():
                    render()

            render()
            installed()
            best = best_of({"baseline": render, "installed": installed})
            print(f"EG3D renderer  batch {batch} {direction:8} baseline {best['baseline'] * 1e3:8.0f} ms  installed "
                  f"{best['installed'] * 1e3:8.0f} ms  {best['baseline'] / best['installed']:.2f}x")
        for where, direction in itertools.product(POINTS, ("fwd", "fwd+bwd")):
            backward = direction == "fwd+bwd"
            inputs = decode_inputs(batch, backward, where)
            calls = {name: decode_call(name, inputs, backward, eg3d) for name in (*UNFUSED, "cpu")}
            for call in calls.values():
                call()
            best = best_of(calls)
            print(f"sample_and_decode {where:7} batch {batch} {direction:8} fused {best['cpu'] * 1e3:6.0f} ms | "
                  + " | ".join(f"{name} {best[name] * 1e3:6.0f} ms {best[name] / best['cpu']:.2f}x" for name in UNFUSED))

if __name__ == "__main__":
    import sys

    interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 1, int(sys.argv[2]) if len(sys.argv) > 2 else 3,
                renderer=sys.argv[3:] != ["decode"])
