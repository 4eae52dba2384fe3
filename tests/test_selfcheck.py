"""The GPU self-check's parts that run without a GPU: the no-GPU exit, the correctness check, the
timing, the roofline arithmetic and the report writer."""

import json
import math
import subprocess
import sys

import pytest
import torch
from support import requires_extension

from dreamportrait import roofline, selfcheck

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the path without a GPU")


@no_gpu
def test_without_a_gpu_it_says_so_and_exits_with_its_own_status(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dreamportrait.selfcheck", "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == selfcheck.NO_GPU_STATUS == 3
    assert result.stdout.strip().count("\n") == 0 and "no CUDA GPU" in result.stdout
    assert not (tmp_path / "report").exists()


@requires_extension
@pytest.mark.parametrize("op", selfcheck.OPS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_check_op_passes_a_correct_kernel(op, dtype):
    check = selfcheck.check_op(op, "cpu", dtype, device="cpu")
    assert check.passed, check
    assert 0 <= check.max_error <= selfcheck.TOLERANCE[dtype]


def test_check_op_catches_a_wrong_kernel(monkeypatch):
    real = selfcheck._small_inputs

    def off_by_a_little(op, device, generator):
        function, inputs = real(op, device, generator)

        def wrong(*args, backend):
            out = function(*args, backend="reference")
            return out * (1 + 1e-3) if backend != "reference" else out

        return wrong, inputs

    monkeypatch.setattr(selfcheck, "_small_inputs", off_by_a_little)
    check = selfcheck.check_op("triplane_sample", "cpu", torch.float32, device="cpu")
    assert not check.passed and 5e-4 < check.max_error < 2e-3


def test_check_op_reports_a_crash_as_a_failure():
    check = selfcheck.check_op("triplane_sample", "no-such-backend", torch.float32, device="cpu")
    assert not check.passed and "backend must be one of" in check.error


def test_relative_error_counts_a_nan_the_reference_lacks_as_infinite():
    expected = torch.tensor([1.0, -4.0, 0.5])
    assert selfcheck._relative_error(expected + torch.tensor([0.0, 0.02, 0.0]), expected) == pytest.approx(0.005)
    assert selfcheck._relative_error(torch.tensor([1.0, math.nan, 0.5]), expected) == math.inf
    assert selfcheck._relative_error(torch.tensor([math.nan]), torch.tensor([math.nan])) == 0.0
    assert selfcheck._relative_error(torch.tensor([0.3]), torch.tensor([0.1])) == pytest.approx(0.2)  # scale >= 1


def test_time_call_warms_up_then_takes_the_median():
    calls = []
    durations = iter([0.0, 0.0, 0.03, 0.01, 0.02])

    def call():
        import time

        calls.append(1)
        time.sleep(next(durations))

    seconds = selfcheck.time_call(call, "cpu", repeats=3, warm_up=2)
    assert len(calls) == 5 and 0.02 <= seconds < 0.03


def test_roofline_of_the_attention_benchmark_on_an_h100():
    # B 2, H 8, Lq 12,288, Lk 77, D 64 in float16: QK^T and PV are 2 * 2 * B*H*Lq*Lk*D flops.
    cost = roofline.gated_cross_attention_cost(2, 8, 12288, 77, 64, torch.float16, backward=False)
    products = 2 * 8 * 12288 * 77 * 64
    assert cost.flops == 4 * products
    assert cost.bytes == 2 * (2 * 8 * 12288 * 64 * 2) + 2 * 8 * 77 * 64 * 2 * 2 + 2 * 8 * 12288 * 4
    h100 = roofline.H100
    assert cost.floor_seconds(h100, torch.float16) == pytest.approx(max(cost.bytes / 3.35e12, cost.flops / 989e12))
    assert cost.bound(h100, torch.float16) == "memory"
    backward = roofline.gated_cross_attention_cost(2, 8, 12288, 77, 64, torch.float16, backward=True)
    assert backward.flops == 14 * products


def test_roofline_of_sampling_and_compositing_counts_every_input_and_output_once():
    cost = roofline.triplane_sample_cost(1, 1000, 32, 256, torch.float32, backward=False)
    assert cost.bytes == 4 * (3 * 32 * 256 * 256 + 1000 * 3 + 1000 * 32)
    assert cost.flops == 1000 * 3 * 4 * 32 * 2
    composite = roofline.composite_rays_cost(10, 5, 3, torch.float16, backward=False)
    assert composite.bytes == 2 * (3 * 50 + 150 + 30 + 20 + 50)


def test_roofline_of_the_fused_decoder_writes_outputs_instead_of_features():
    # 1,000 points, 32 channels on 256^2 planes, EG3D's decoder 32 -> 64 -> 33, float32.
    cost = roofline.sample_and_decode_cost(1, 1000, 32, 256, 64, 33, torch.float32, backward=False)
    assert cost.bytes == 4 * (3 * 32 * 256 * 256 + 1000 * 3 + 1000 * 33)
    assert cost.flops == 1000 * 2 * (3 * 4 * 32 + 32 * 64 + 64 * 33) and cost.tensor_core_flops
    backward = roofline.sample_and_decode_cost(1, 1000, 32, 256, 64, 33, torch.float16, backward=True)
    planes, points, outputs = 2 * 3 * 32 * 256 * 256, 2 * 1000 * 3, 2 * 1000 * 33
    grad_planes = (4 + 2) * 3 * 32 * 256 * 256  # accumulated in float32, then converted
    assert backward.bytes == (planes + points + outputs) + (outputs + planes + points + grad_planes + points)
    assert backward.flops == 3 * cost.flops


@pytest.mark.parametrize("backward", [False, True])
def test_the_fused_decoder_is_timed_like_the_other_ops(backward):
    from dreamportrait import workloads

    call, required = workloads.make_call("sample_and_decode", "warm-up", "reference", backward)
    outputs = call()
    assert outputs[0].shape == (1, 4 * 2, 3)
    assert required == outputs[0].numel() * 4 + (sum(4 * n for n in (3 * 2 * 16, 8 * 3, 4 * 2, 4, 3 * 4, 3))
                                                  if backward else 0)
    result = selfcheck.timing("sample_and_decode", "eg3d-inference", "cuda", torch.float16, backward, 1e-3,
                              roofline.H100)
    cost = roofline.sample_and_decode_cost(1, 64 * 64 * 96, 32, 256, 64, 33, torch.float16, backward)
    assert result.floor_milliseconds == pytest.approx(cost.floor_seconds(roofline.H100, torch.float16) * 1e3)
    assert result.bound == "memory"


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"), ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA A10", "A10"),
    ("Tesla T4", None),
])
def test_gpu_peaks_by_device_name(name, expected):
    peak = roofline.gpu_peak(name)
    assert (peak.name if peak else None) == expected


def test_timing_against_the_peak():
    seconds = 2e-3
    result = selfcheck.timing("gated_cross_attention", "triplane-text", "cuda", torch.float16, False, seconds,
                              roofline.H100)
    cost = roofline.gated_cross_attention_cost(2, 8, 3 * 64 * 64, 77, 64, torch.float16, False)
    assert result.milliseconds == pytest.approx(2.0)
    assert result.gigabytes_per_second == pytest.approx(cost.bytes / seconds / 1e9)
    assert result.bandwidth_fraction == pytest.approx(cost.bytes / seconds / 3.35e12)
    assert result.compute_fraction == pytest.approx(cost.flops / seconds / 989e12)
    assert result.floor_milliseconds == pytest.approx(cost.floor_seconds(roofline.H100, torch.float16) * 1e3)
    unknown = selfcheck.timing("composite_rays", "eg3d-inference", "cuda", torch.float32, True, seconds, None)
    assert unknown.bandwidth_fraction is None and unknown.floor_milliseconds is None


def test_report_writer(tmp_path):
    report = selfcheck.Report({"gpu": "NVIDIA H100 80GB HBM3", "peak": "H100 SXM"})
    report.checks = [selfcheck.Check("triplane_sample", "cuda", "float16", 3e-3, 2e-2),
                     selfcheck.Check("composite_rays", "triton", "float32", math.inf, 2e-4, "RuntimeError: boom")]
    report.timings = [selfcheck.timing("composite_rays", "eg3d-inference", "cuda", torch.float32, False, 1e-4,
                                       roofline.H100)]
    report.tests = {"command": "pytest tests/ops", "returncode": 0, "summary": "120 passed"}
    report.generator = {"seconds_per_prompt": 0.0123, "model": "packaged default"}
    md_path, json_path = selfcheck.write_report(report, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["passed"] is False
    assert [c["passed"] for c in data["checks"]] == [True, False]
    assert data["timings"][0]["milliseconds"] == pytest.approx(0.1)
    text = md_path.read_text()
    assert text.startswith("# DreamPortrait GPU self-check: FAILED")
    assert "**FAIL** RuntimeError: boom" in text and "12.3 ms per prompt" in text and "120 passed" in text
    report.checks.pop()
    selfcheck.write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text())["passed"] is True


def test_roofline_backward_of_sampling_and_compositing():
    # The backward reads the output gradient and the inputs again and writes the input gradients.
    cost = roofline.triplane_sample_cost(2, 1000, 32, 64, torch.float16, backward=True)
    planes, points, features = 2 * 3 * 32 * 64 * 64 * 2, 2 * 1000 * 3 * 2, 2 * 1000 * 32 * 2
    grad_planes = 2 * 3 * 32 * 64 * 64 * (4 + 2)
    assert cost.bytes == (planes + points + features) + (features + planes + points + grad_planes + points)
    assert cost.flops == 3 * 2 * 1000 * 3 * 4 * 32 * 2 and not cost.tensor_core_flops
    composite = roofline.composite_rays_cost(10, 5, 3, torch.float64, backward=True)
    per_sample, colors, outputs = 8 * 50, 8 * 150, 8 * (30 + 20 + 50)
    forward = 3 * per_sample + colors + outputs
    assert composite.bytes == forward + outputs + 3 * per_sample + colors + 3 * per_sample + colors
    assert composite.flops == 3 * 10 * 5 * (2 * 3 + 8)


def test_gpu_peaks_are_the_datasheets():
    h100 = roofline.gpu_peak("NVIDIA H100 80GB HBM3")
    assert (h100.bandwidth, h100.float16, h100.tf32, h100.float32) == (3.35e12, 989e12, 494e12, 67e12)
    assert h100.rate(torch.bfloat16) == 989e12 and h100.rate(torch.float16, tensor_cores=False) == 67e12
    assert h100.rate(torch.float32) == 494e12 and h100.rate(torch.float32, tensor_cores=False) == 67e12
    assert h100.rate(torch.float64) == h100.float64


@pytest.mark.parametrize("name,expected", [
    ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA B200", "B200"), ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
    ("NVIDIA A100-SXM4-40GB", "A100 40GB"), ("NVIDIA A100-PCIE-40GB", "A100 40GB"), ("NVIDIA L40S", "L40S"),
])
def test_more_gpu_peaks_by_device_name(name, expected):
    assert roofline.gpu_peak(name).name == expected


WARM_UP = {  # op: (its warm-up workload's output shapes, the floats of its floating-point inputs)
    "triplane_sample": ([(1, 8, 2)], 3 * 2 * 4 * 4 + 8 * 3),
    "sample_and_decode": ([(1, 8, 3)], 3 * 2 * 4 * 4 + 8 * 3 + 4 * 2 + 4 + 3 * 4 + 3),
    "composite_rays": ([(4, 2), (4,), (4,), (4, 3)], 3 * 4 * 3 + 4 * 3 * 2),
    "gated_cross_attention": ([(1, 1, 4, 8)], 4 * 8 + 2 * 3 * 8 + 1),
}


@pytest.mark.parametrize("op", list(WARM_UP))
@pytest.mark.parametrize("backward", [False, True])
def test_every_op_is_timed_with_its_workload_inputs(op, backward):
    from dreamportrait import workloads

    shapes, input_floats = WARM_UP[op]
    call, required = workloads.make_call(op, "warm-up", "reference", backward, dtype=torch.float64)
    outputs = call()
    assert [tuple(o.shape) for o in outputs] == shapes
    assert all(o.dtype == torch.float64 for o in outputs)
    output_bytes = sum(o.numel() * o.element_size() for o in outputs)
    assert required == output_bytes + (8 * input_floats if backward else 0)


def test_the_attention_baseline_is_sdpa_with_the_gate():
    from dreamportrait import workloads

    ours, _ = workloads.make_call("gated_cross_attention", "warm-up", "reference", False, dtype=torch.float64)
    sdpa, _ = workloads.make_call("gated_cross_attention", "warm-up", "sdpa", False, dtype=torch.float64)
    torch.testing.assert_close(sdpa()[0], ours()[0])
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        workloads.make_call("no_such_op", "warm-up", "reference", False)


def test_workload_rays_start_at_one_camera_and_march_through_the_box():
    """EG3D's cameras: on a sphere of radius 2.7 looking at the origin, an 18.837 degree field of
    view, depths 2.25 to 3.3 along each ray."""
    from dreamportrait import workloads

    side, samples = 8, 5
    points = workloads.ray_points(3, side, samples, torch.Generator().manual_seed(0)).double()
    assert points.shape == (3, side * side * samples, 3)
    rays = points.view(3, side * side, samples, 3)
    steps = rays.diff(dim=2)
    directions = steps[:, :, 0] / steps[:, :, 0].norm(dim=-1, keepdim=True)
    close = dict(rtol=1e-5, atol=1e-5)  # the points are float32
    torch.testing.assert_close(steps.norm(dim=-1), torch.full((3, side * side, samples - 1), 1.05 / (samples - 1),
                                                              dtype=torch.float64), **close)
    origins = rays[:, :, 0] - 2.25 * directions
    torch.testing.assert_close(origins, origins[:, :1].expand_as(origins), **close)  # one camera per image
    torch.testing.assert_close(origins[:, 0].norm(dim=-1), torch.full((3,), 2.7, dtype=torch.float64), **close)
    forward = -origins[:, 0] / 2.7
    cosines = (directions * forward[:, None]).sum(-1)
    half = math.tan(math.radians(18.837) / 2) * (1 - 1 / side)  # the corner pixel centres
    assert cosines.min() == pytest.approx(1 / math.sqrt(1 + 2 * half ** 2), rel=1e-5)
    mean = directions.mean(dim=1)
    torch.testing.assert_close(mean / mean.norm(dim=-1, keepdim=True), forward, **close)  # centred on the origin


def test_decoder_workload_weights_are_scaled_by_their_fan_in():
    from dreamportrait import workloads

    workload = workloads.DECODER_WORKLOADS[0]
    planes, points, w1, b1, w2, b2 = workloads.decoder_inputs(workload, dtype=torch.float64)
    assert planes.shape == (1, 3, 32, 256, 256) and points.shape == (1, 64 * 64 * 96, 3)
    assert w1.shape == (64, 32) and w2.shape == (33, 64) and not b1.any() and not b2.any()
    assert all(t.dtype == torch.float64 for t in (planes, points, w1, b1, w2, b2))
    assert w1.std().item() == pytest.approx(1 / math.sqrt(32), rel=0.15)
    assert w2.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.15)
