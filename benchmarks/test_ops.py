"""The ops' compiled kernels vs the PyTorch reference: forward and forward+backward, time and peak
extra memory, at EG3D's inference shape and at a training batch.

    python -m pytest benchmarks/ --benchmark-only
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from workloads import ATTENTION_WORKLOADS, COMPOSITE_WORKLOADS, DECODER_WORKLOADS, TRIPLANE_WORKLOADS, make_call

from dreamportrait import _extension

HERE = Path(__file__).resolve().parent
GPU = torch.cuda.is_available()
NO_GPU = pytest.mark.skipif(not GPU, reason="no GPU")

CASES = [pytest.param("triplane_sample", w.name, id=f"triplane_sample-{w.name}") for w in TRIPLANE_WORKLOADS] + [
    pytest.param("sample_and_decode", w.name, id=f"sample_and_decode-{w.name}") for w in DECODER_WORKLOADS
] + [
    pytest.param("composite_rays", w.name, id=f"composite_rays-{w.name}") for w in COMPOSITE_WORKLOADS
] + [pytest.param("gated_cross_attention", w.name, id=f"gated_cross_attention-{w.name}") for w in ATTENTION_WORKLOADS]
IMPLEMENTATIONS = [
    pytest.param("cpu", "reference", id="cpu-reference"),
    pytest.param("cpu", "cpu", id="cpu-kernel"),
    pytest.param("cpu", "sdpa", id="cpu-sdpa"),
    pytest.param("cuda", "reference", id="cuda-reference", marks=NO_GPU),
    pytest.param("cuda", "cuda", id="cuda-kernel", marks=NO_GPU),
    pytest.param("cuda", "triton", id="cuda-triton", marks=NO_GPU),
    pytest.param("cuda", "sdpa", id="cuda-sdpa", marks=NO_GPU),
]


def cpu_peak_extra(op: str, workload: str, backend: str, backward: bool) -> int:
    """Peak resident memory one call adds, measured in a fresh process."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, str(HERE / "workloads.py"), op, workload, backend, "backward" if backward else "forward"],
        capture_output=True, text=True, check=True, cwd=HERE.parent, env=environment,
    )
    return int(result.stdout)


def cuda_peak_extra(call) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("op,workload", CASES)
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("device,backend", IMPLEMENTATIONS)
def test_op(benchmark, record, op, workload, backward, device, backend):
    if backend == "sdpa" and op != "gated_cross_attention":
        pytest.skip("torch's SDPA is a baseline for attention only")
    if backend in ("cpu", "cuda"):
        assert _extension.status().available, "benchmarking the kernels needs the built extension"
    call, required = make_call(op, workload, backend, backward, device)
    benchmark.pedantic(call, rounds=5, warmup_rounds=1, iterations=1)
    extra = cpu_peak_extra(op, workload, backend, backward) if device == "cpu" else cuda_peak_extra(call)
    group = f"{op} {workload} {'fwd+bwd' if backward else 'fwd'} {device}"
    # Temporaries: what the call held beyond what it must return (outputs, input gradients).
    record(group, backend, benchmark, peak_extra_MiB=extra / 2**20, temporaries_MiB=max(extra - required, 0) / 2**20)
