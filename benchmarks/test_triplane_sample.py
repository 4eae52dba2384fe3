"""triplane_sample: compiled kernels vs the PyTorch reference, forward and forward+backward, at
EG3D's inference shape and at a training batch; time and peak extra memory.

    python -m pytest benchmarks/ --benchmark-only
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from workloads import TRIPLANE_WORKLOADS, triplane_inputs

from dreamportrait import _extension
from dreamportrait.ops import triplane_sample

HERE = Path(__file__).resolve().parent
GPU = torch.cuda.is_available()

IMPLEMENTATIONS = [
    pytest.param("cpu", "reference", id="cpu-reference"),
    pytest.param("cpu", "cpu", id="cpu-kernel"),
    pytest.param("cuda", "reference", id="cuda-reference", marks=pytest.mark.skipif(not GPU, reason="no GPU")),
    pytest.param("cuda", "cuda", id="cuda-kernel", marks=pytest.mark.skipif(not GPU, reason="no GPU")),
    pytest.param("cuda", "triton", id="cuda-triton", marks=pytest.mark.skipif(not GPU, reason="no GPU")),
]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_peak_extra(workload: str, backend: str, backward: bool) -> tuple[int, int]:
    """Peak resident memory added by one call, measured in a fresh process."""
    result = subprocess.run(
        [sys.executable, str(HERE / "workloads.py"), workload, backend, "backward" if backward else "forward"],
        capture_output=True, text=True, check=True, cwd=HERE.parent,
    )
    extra, output = result.stdout.split()
    return int(extra), int(output)


def cuda_peak_extra(fn, inputs_bytes: int) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("workload", TRIPLANE_WORKLOADS, ids=lambda w: w.name)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("device,backend", IMPLEMENTATIONS)
def test_triplane_sample(benchmark, record, workload, backward, device, backend):
    if backend in ("cpu", "cuda"):
        assert _extension.status().available, "benchmarking the kernels needs the built extension"
    planes, points = triplane_inputs(workload, device)
    planes.requires_grad_(backward)
    points.requires_grad_(backward)

    def call():
        out = triplane_sample(planes, points, backend=backend)
        if backward:
            out.backward(torch.ones_like(out))
        synchronize(device)
        return out

    benchmark.pedantic(call, rounds=5, warmup_rounds=1, iterations=1)
    output_bytes = workload.batch * workload.points * workload.channels * planes.element_size()
    if device == "cpu":
        extra, output_bytes = cpu_peak_extra(workload.name, backend, backward)
    else:
        extra = cuda_peak_extra(call, output_bytes)
    group = f"triplane_sample {workload.name} {'fwd+bwd' if backward else 'fwd'} {device}"
    record(group, backend, benchmark, peak_extra_MiB=extra / 2**20, peak_extra_output_sizes=extra / output_bytes)
