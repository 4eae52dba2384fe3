"""The EG3D generator at the ``ffhq512-128`` preset, rendering with the kernels vs the reference ops:
the rendering stage alone (both sampling passes, decoder, compositing; planes given) and the whole
forward (mapping, backbone, rendering, super-resolution), at a 64² neural rendering, batch 1.

    python -m pytest benchmarks/test_generator.py --benchmark-only

Peak memory is measured in a fresh process (``python benchmarks/test_generator.py STAGE BACKEND
DIRECTION``) as the resident-memory high-water mark a call adds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
GPU = torch.cuda.is_available()
NO_GPU = pytest.mark.skipif(not GPU, reason="no GPU")
RESOLUTION = 64
STAGES = ("render", "generator")


def make_call(stage: str, backend: str, backward: bool, device: str = "cpu"):
    """A closure running one forward (and backward, to all parameters) of ``stage``."""
    from dreamportrait.models import build_generator, camera_labels, fov_to_intrinsics, orbit_poses
    from dreamportrait.models.cameras import FRONTAL, camera_rays, split_camera_labels

    torch.manual_seed(0)
    generator = build_generator("ffhq512-128", backend=backend, neural_rendering_resolution=RESOLUTION).to(device)
    generator.requires_grad_(backward)
    z = torch.randn(1, generator.z_dim, device=device)
    c = camera_labels(orbit_poses(torch.tensor([FRONTAL + 0.3]), torch.tensor([FRONTAL - 0.1])),
                      fov_to_intrinsics(18.837)).to(device)
    with torch.no_grad():
        planes = generator.planes(generator.mapping(z, c))
    origins, directions = camera_rays(*split_camera_labels(c), RESOLUTION)
    planes.requires_grad_(backward)

    def forward():
        if stage == "render":
            return generator.renderer(planes, generator.decoder, origins, directions, generator.rendering_kwargs)[0]
        return generator(z, c)["image"]

    def call():
        with torch.set_grad_enabled(backward):
            output = forward()
            if backward:
                output.sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return call


def peak_extra_cpu(stage: str, backend: str, backward: bool) -> int:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE),
                                                                os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, __file__, stage, backend, "backward" if backward else "forward"],
                            capture_output=True, text=True, check=True, cwd=HERE.parent, env=environment)
    return int(result.stdout)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("device,backend", [
    pytest.param("cpu", "reference", id="cpu-reference"),
    pytest.param("cpu", "cpu", id="cpu-kernel"),
    pytest.param("cuda", "reference", id="cuda-reference", marks=NO_GPU),
    pytest.param("cuda", "cuda", id="cuda-kernel", marks=NO_GPU),
    pytest.param("cuda", "triton", id="cuda-triton", marks=NO_GPU),
])
def test_generator(benchmark, record, stage, backward, device, backend):
    if stage == "generator" and backward:
        pytest.skip("the whole generator's backward is the backbone's and SR's, the same for every backend")
    call = make_call(stage, backend, backward, device)
    benchmark.pedantic(call, rounds=3, warmup_rounds=1, iterations=1)
    if device == "cpu":
        extra = peak_extra_cpu(stage, backend, backward)
    else:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        extra = torch.cuda.max_memory_allocated() - base
    group = f"ffhq512-128 {stage} {RESOLUTION}² {'fwd+bwd' if backward else 'fwd'} {device}"
    record(group, backend, benchmark, peak_extra_MiB=extra / 2**20)


if __name__ == "__main__":
    from workloads import peak_rss_bytes, reset_peak_rss

    from dreamportrait.models import build_generator

    stage_name, backend_name, direction = sys.argv[1:4]
    warm_up = build_generator("tiny", backend=backend_name)  # loads the ops before the measurement
    warm_up(torch.randn(1, warm_up.z_dim), torch.randn(1, 25), neural_rendering_resolution=4)
    call_once = make_call(stage_name, backend_name, direction == "backward")
    baseline = reset_peak_rss()
    call_once()
    print(peak_rss_bytes() - baseline)
