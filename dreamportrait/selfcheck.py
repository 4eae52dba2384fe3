"""Prove the GPU path on a GPU: one command, one report.

    python -m dreamportrait.selfcheck [--out DIR] [--quick] [--no-tests]

On a machine with a CUDA GPU it

1. checks every op (``OPS``) on the ``cuda`` and ``triton`` backends in every dtype they
   take against the reference (forward and every input gradient, the reference run in float64 on
   the same inputs),
2. runs the repository's op tests (``tests/ops``, ``tests/test_extension.py``) on the GPU when the
   package sits in a checkout that has them,
3. times every op at the benchmark shapes (:mod:`dreamportrait.workloads`), forward and
   forward+backward, per backend and dtype, and reports achieved GB/s and TFLOP/s, their fraction of
   the GPU's peak and of the roofline floor (:mod:`dreamportrait.roofline`),
4. times the packaged generator from prompt to image,

and writes ``DIR/selfcheck.md`` and ``DIR/selfcheck.json``. It takes a few minutes on one H100.
Exit status: 0 when every check passed, 1 when one failed, 3 when no CUDA GPU is visible (it then
prints one line and does nothing else).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

NO_GPU_STATUS = 3
# Checked against the reference on every backend and dtype, and timed.
OPS = ("triplane_sample", "sample_and_decode", "composite_rays", "gated_cross_attention")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Largest error allowed against the float64 reference, relative to the reference's magnitude: the
# rounding of the dtype over a few hundred accumulated terms.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class Check:
    """One op, backend and dtype against the reference: the worst relative error over the output
    and every gradient."""

    op: str
    backend: str
    dtype: str
    max_error: float
    tolerance: float
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and self.max_error <= self.tolerance


@dataclass
class Timing:
    """One op at one shape: its median time and what it achieved against the GPU's limits."""

    op: str
    workload: str
    backend: str
    dtype: str
    direction: str
    milliseconds: float
    gigabytes_per_second: float
    teraflops: float
    bandwidth_fraction: float | None
    compute_fraction: float | None
    floor_milliseconds: float | None
    bound: str | None


@dataclass
class Report:
    environment: dict
    checks: list[Check] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    tests: dict | None = None
    generator: dict | None = None

    @property
    def passed(self) -> bool:
        tests_passed = self.tests is None or self.tests.get("returncode") == 0
        return all(c.passed for c in self.checks) and tests_passed


# --- correctness --------------------------------------------------------------------------------

def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, 1), NaN-aware: a NaN where the reference has
    none (or the reverse) is an infinite error."""
    actual, expected = actual.double(), expected.double()
    if (actual.isnan() != expected.isnan()).any():
        return math.inf
    finite = ~expected.isnan()
    if not finite.any():
        return 0.0
    scale = max(expected[finite].abs().max().item(), 1.0)
    return (actual[finite] - expected[finite]).abs().max().item() / scale


def _small_inputs(op: str, device: str, generator: torch.Generator) -> tuple[Callable, list[torch.Tensor]]:
    """The op (taking ``backend=``) and float64 inputs of a shape with ragged tiles."""
    from .ops import EG3D_AXES, composite_rays, gated_cross_attention, sample_and_decode, triplane_sample

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device)

    if op == "triplane_sample":
        points = (torch.rand(2, 300, 3, generator=generator, dtype=torch.float64) - 0.5).to(device)
        return (lambda planes, points, backend: triplane_sample(planes, points, axes=EG3D_AXES, backend=backend),
                [randn(2, 3, 24, 17, 19), points])
    if op == "composite_rays":
        densities = torch.rand(130, 40, generator=generator, dtype=torch.float64).to(device) * 3
        depths = torch.linspace(2.25, 3.3, 40, dtype=torch.float64, device=device).expand(130, 40).contiguous()
        deltas = torch.full((130, 40), 1.05 / 40, dtype=torch.float64, device=device)
        return composite_rays, [densities, randn(130, 40, 7), depths, deltas]
    if op == "gated_cross_attention":
        mask = (torch.rand(2, 77, generator=generator) < 0.8).to(device)

        def attention(q, k, v, gate, backend):
            return gated_cross_attention(q, k, v, gate, key_padding_mask=mask, backend=backend)

        return attention, [randn(2, 4, 150, 40), randn(2, 4, 77, 40), randn(2, 4, 77, 40), randn(4)]
    if op == "sample_and_decode":
        points = (torch.rand(2, 300, 3, generator=generator, dtype=torch.float64) - 0.5).to(device)

        def decoded(planes, points, w1, b1, w2, b2, backend):
            return sample_and_decode(planes, points, 1.0, w1, b1, w2, b2, EG3D_AXES, backend=backend)

        return decoded, [randn(2, 3, 24, 17, 19), points, randn(20, 24) * 0.3, randn(20), randn(7, 20) * 0.3,
                         randn(7)]
    raise ValueError(f"unknown op {op!r}")


def check_op(op: str, backend: str, dtype: torch.dtype, device: str = "cuda", seed: int = 0) -> Check:
    """``op`` on ``backend`` in ``dtype`` against the reference in float64 on the same (rounded)
    inputs: the output(s) and the gradient of every input for a random output gradient."""
    generator = torch.Generator().manual_seed(seed)
    function, inputs = _small_inputs(op, device, generator)
    rounded = [x.to(dtype).double() for x in inputs]  # what both sides see

    def run(tensors, name):
        tensors = [x.detach().requires_grad_() for x in tensors]
        outputs = function(*tensors, backend=name)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return outputs, tensors

    try:
        expected, reference_inputs = run(rounded, "reference")
        grad_outputs = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(device) for o in expected]
        expected_grads = torch.autograd.grad(expected, reference_inputs, grad_outputs)
        actual, actual_inputs = run([x.to(dtype) for x in rounded], backend)
        actual_grads = torch.autograd.grad(actual, actual_inputs, [g.to(dtype) for g in grad_outputs])
        error = max(_relative_error(a, e) for a, e in zip((*actual, *actual_grads), (*expected, *expected_grads)))
        return Check(op, backend, str(dtype).removeprefix("torch."), error, TOLERANCE[dtype])
    except Exception as failure:  # noqa: BLE001 - a failure of any kind is the result
        return Check(op, backend, str(dtype).removeprefix("torch."), math.inf, TOLERANCE[dtype],
                     f"{type(failure).__name__}: {failure}".splitlines()[0][:300])


# --- timing -------------------------------------------------------------------------------------

def time_call(call: Callable[[], object], device: str, repeats: int = 10, warm_up: int = 2) -> float:
    """Median seconds of ``call`` (CUDA events on a GPU, the wall clock on CPU)."""
    for _ in range(warm_up):
        call()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            call()
            times.append(time.perf_counter() - began)
    return sorted(times)[len(times) // 2]


def op_cost(op: str, workload_name: str, dtype: torch.dtype, backward: bool):
    """The roofline :class:`~dreamportrait.roofline.Cost` of one benchmark call."""
    from . import roofline, workloads

    if op == "triplane_sample":
        w = next(w for w in workloads.TRIPLANE_WORKLOADS if w.name == workload_name)
        return roofline.triplane_sample_cost(w.batch, w.rays_side ** 2 * w.samples, w.channels, w.resolution, dtype,
                                             backward)
    if op == "sample_and_decode":
        w = next(w for w in workloads.DECODER_WORKLOADS if w.name == workload_name)
        return roofline.sample_and_decode_cost(w.batch, w.rays_side ** 2 * w.samples, w.channels, w.resolution,
                                               w.hidden, w.outputs, dtype, backward)
    if op == "composite_rays":
        w = next(w for w in workloads.COMPOSITE_WORKLOADS if w.name == workload_name)
        return roofline.composite_rays_cost(w.rays, w.samples, w.channels, dtype, backward)
    w = next(w for w in workloads.ATTENTION_WORKLOADS if w.name == workload_name)
    return roofline.gated_cross_attention_cost(w.batch, w.heads, w.queries, w.keys, w.dim, dtype, backward)


def timing(op: str, workload_name: str, backend: str, dtype: torch.dtype, backward: bool, seconds: float,
           peak) -> Timing:
    """A measured time against the roofline of the GPU ``peak`` (None when unknown)."""
    cost = op_cost(op, workload_name, dtype, backward)
    floor = cost.floor_seconds(peak, dtype) if peak else None
    return Timing(
        op, workload_name, backend, str(dtype).removeprefix("torch."), "fwd+bwd" if backward else "fwd",
        seconds * 1e3, cost.bytes / seconds / 1e9, cost.flops / seconds / 1e12,
        cost.bytes / seconds / peak.bandwidth if peak else None,
        cost.flops / seconds / peak.rate(dtype, cost.tensor_core_flops) if peak else None,
        floor * 1e3 if floor else None, cost.bound(peak, dtype) if peak else None,
    )


def benchmark_ops(device: str, backends: tuple[str, ...], dtypes: tuple[torch.dtype, ...], peak,
                  repeats: int) -> list[Timing]:
    from . import workloads

    names = {"triplane_sample": workloads.TRIPLANE_WORKLOADS, "sample_and_decode": workloads.DECODER_WORKLOADS,
             "composite_rays": workloads.COMPOSITE_WORKLOADS, "gated_cross_attention": workloads.ATTENTION_WORKLOADS}
    results = []
    for op in OPS:
        for workload in names[op]:
            for backend in backends:
                for dtype in dtypes:
                    for backward in (False, True):
                        call, _ = workloads.make_call(op, workload.name, backend, backward, device, dtype)
                        seconds = time_call(call, device, repeats)
                        results.append(timing(op, workload.name, backend, dtype, backward, seconds, peak))
                        del call
    return results


def measured_bandwidth(device: str = "cuda", megabytes: int = 1024) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the practical bandwidth ceiling."""
    source = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = time_call(lambda: target.copy_(source), device, repeats=10)
    return 2 * source.numel() * 4 / seconds


def benchmark_generator(device: str, repeats: int = 5) -> dict:
    """Seconds from prompt to the final image with the packaged generator (batch 1, frontal view)."""
    from .generation import frontal_camera, render_views, sample
    from .world.assets import load_default_generator

    generator = load_default_generator(device).eval()
    camera = frontal_camera(generator).to(device)

    def call():
        with torch.no_grad():
            ws, sr_ws, planes = sample(generator, "a portrait of a person with short black hair", 0)
            render_views(generator, ws, sr_ws, planes, camera)

    return {"seconds_per_prompt": time_call(call, device, repeats), "model": "packaged default"}


# --- tests of the checkout ----------------------------------------------------------------------

def run_repository_tests(timeout: float = 180) -> dict | None:
    """``pytest tests/ops tests/test_extension.py`` of the checkout this package sits in, if any."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "tests" / "ops").is_dir():
        return None
    command = [sys.executable, "-m", "pytest", "tests/ops", "tests/test_extension.py", "-q", "-p", "no:cacheprovider"]
    try:
        result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command[2:]), "returncode": None, "summary": f"timed out after {timeout:.0f} s"}
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return {"command": " ".join(command[2:]), "returncode": result.returncode, "summary": lines[-1] if lines else ""}


# --- the report ---------------------------------------------------------------------------------

def environment(device: str) -> dict:
    from . import __version__, _extension

    status = _extension.status()
    info = {"dreamportrait": __version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "extension": status.origin,
            "sass_archs": list(status.cuda_archs), "ptx_archs": list(status.cuda_ptx_archs)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
    return info


def _fraction(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def write_report(report: Report, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``selfcheck.md`` and ``selfcheck.json`` into ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = {"passed": report.passed, "environment": report.environment,
            "checks": [{**asdict(c), "passed": c.passed} for c in report.checks],
            "tests": report.tests, "timings": [asdict(t) for t in report.timings], "generator": report.generator}
    json_path = out / "selfcheck.json"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    env = report.environment
    lines = [f"# DreamPortrait GPU self-check: {'passed' if report.passed else 'FAILED'}", "",
             " · ".join(f"{key} {value}" for key, value in env.items()), ""]
    if report.checks:
        lines += ["## Kernels against the reference", "",
                  "Forward and every input gradient, the reference in float64 on the same inputs; error relative "
                  "to the reference's magnitude.", "",
                  "| op | backend | dtype | max error | tolerance | result |", "|---|---|---|---|---|---|"]
        for c in report.checks:
            result = "pass" if c.passed else f"**FAIL** {c.error or ''}".strip()
            lines.append(f"| {c.op} | {c.backend} | {c.dtype} | {c.max_error:.2e} | {c.tolerance:.0e} | {result} |")
        lines.append("")
    if report.tests is not None:
        lines += ["## Repository tests", "", f"`{report.tests['command']}`: {report.tests['summary']}", ""]
    if report.timings:
        lines += ["## Speed against the roofline", "",
                  f"Peaks: {env.get('peak', 'unknown GPU: fractions omitted')}.", "",
                  "| op | workload | pass | backend | dtype | time (ms) | floor (ms) | GB/s | TFLOP/s "
                  "| of peak bandwidth | of peak compute | bound |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for t in report.timings:
            floor = "–" if t.floor_milliseconds is None else f"{t.floor_milliseconds:.3f}"
            lines.append(f"| {t.op} | {t.workload} | {t.direction} | {t.backend} | {t.dtype} | {t.milliseconds:.3f} "
                         f"| {floor} | {t.gigabytes_per_second:.0f} | {t.teraflops:.2f} "
                         f"| {_fraction(t.bandwidth_fraction)} | {_fraction(t.compute_fraction)} | {t.bound or '–'} |")
        lines.append("")
    if report.generator is not None:
        lines += ["## Generator", "", f"{report.generator['model']}: "
                  f"{report.generator['seconds_per_prompt'] * 1e3:.1f} ms per prompt (batch 1).", ""]
    md_path = out / "selfcheck.md"
    md_path.write_text("\n".join(lines))
    return md_path, json_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreamportrait.selfcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="selfcheck-report", help="report directory (default: selfcheck-report)")
    parser.add_argument("--quick", action="store_true", help="float32 and float16 timings only, fewer repeats")
    parser.add_argument("--no-tests", action="store_true", help="skip the repository's op tests")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("dreamportrait selfcheck: no CUDA GPU is visible (torch.cuda.is_available() is False); nothing checked")
        return NO_GPU_STATUS
    from . import roofline
    from .ops._backend import triton_importable

    device = "cuda"
    backends = ("cuda", "triton") if triton_importable() else ("cuda",)
    report = Report(environment(device))
    peak = roofline.gpu_peak(report.environment["gpu"])
    report.environment["peak"] = (f"{peak.name}: {peak.bandwidth / 1e12:.2f} TB/s, {peak.float16 / 1e12:.0f} TFLOP/s "
                                  "fp16 dense" if peak else None)
    report.environment["measured_copy_GBps"] = round(measured_bandwidth(device) / 1e9)
    for op in OPS:
        for backend in backends:
            for dtype in DTYPES:
                check = check_op(op, backend, dtype, device)
                report.checks.append(check)
                print(f"{op:<22} {backend:<7} {check.dtype:<9} error {check.max_error:.1e} "
                      f"{'pass' if check.passed else 'FAIL ' + (check.error or '')}", flush=True)
    if not args.no_tests:
        report.tests = run_repository_tests()
    dtypes = (torch.float32, torch.float16) if args.quick else (torch.float32, torch.float16, torch.bfloat16)
    report.timings = benchmark_ops(device, ("reference", *backends), dtypes, peak, repeats=5 if args.quick else 20)
    report.generator = benchmark_generator(device)
    md_path, json_path = write_report(report, args.out)
    print(f"{'passed' if report.passed else 'FAILED'}; report: {md_path} and {json_path}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
