"""sample_and_decode's compiled kernels beyond the written-out comparison: several CPU workers (their
per-worker weight-gradient sums), determinism, non-finite and out-of-plane points, and
the CUDA kernel on a GPU."""

import pytest
import torch

from dreamportrait.ops import EG3D_AXES, sample_and_decode
from support import assert_close_scaled, requires_cuda, requires_extension
from test_sample_and_decode import make_inputs, values_and_grads, written_out


def fused(backend):
    def run(planes, points, box_warp, axes, w1, b1, w2, b2):
        return sample_and_decode(planes, points, box_warp, w1, b1, w2, b2, axes, backend=backend)
    return run


@pytest.fixture
def threads():
    previous = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(previous)


@requires_extension
@pytest.mark.parametrize("channels,hidden,out", [(32, 64, 33), (16, 16, 5)])
def test_cpu_workers_agree_and_repeat_exactly(threads, channels, hidden, out):
    """Three workers (ragged last tile) give the written-out values, and the same bits twice."""
    inputs = make_inputs(torch.float64, batch=2, count=1000, channels=channels, hidden=hidden, out=out)
    expected = values_and_grads(written_out, inputs, 1.2, EG3D_AXES)
    threads(3)
    first = values_and_grads(fused("cpu"), inputs, 1.2, EG3D_AXES)
    second = values_and_grads(fused("cpu"), inputs, 1.2, EG3D_AXES)
    for name, got, again, want in zip(["output", "planes", "points", "w1", "b1", "w2", "b2"], first, second, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")
        assert torch.equal(got, again), name
    threads(1)
    one_worker = values_and_grads(fused("cpu"), inputs, 1.2, EG3D_AXES)
    # Every point's share of the plane gradient is added in point order whatever the thread count.
    assert torch.equal(one_worker[1], first[1])


def non_finite_inputs(device, dtype=torch.float64):
    planes, points, *weights = (t.detach().to(device) for t in make_inputs(dtype, batch=1, count=8))
    points[0, 0, 0] = float("nan")
    points[0, 1, 2] = float("inf")
    points[0, 2] = torch.tensor([5.0, -5.0, 5.0])  # outside every plane
    points[0, 3] = torch.tensor([0.6, 0.6, 0.6])  # partly outside (zero padding)
    return [t.requires_grad_() for t in (planes, points, *weights)]


def check_non_finite(backend, device):
    inputs = non_finite_inputs(device)
    actual = values_and_grads(fused(backend), inputs, 1.2, EG3D_AXES)
    expected = values_and_grads(written_out, inputs, 1.2, EG3D_AXES)
    out, grad_planes, grad_points = actual[:3]
    assert out[0, :2].isnan().all() and out[0, 2:].isfinite().all()
    assert grad_points[0, :2].isnan().any() and grad_points[0, 2:].isfinite().all()
    for name, got, want in zip(["output", "planes", "points", "w1", "b1", "w2", "b2"], actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, equal_nan=True, msg=lambda m: f"{name}: {m}")


@requires_extension
def test_cpu_non_finite_and_outside_points():
    check_non_finite("cpu", "cpu")


@requires_cuda
def test_cuda_non_finite_and_outside_points():
    check_non_finite("cuda", "cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu_kernel(dtype):
    inputs = make_inputs(dtype, batch=2, count=3000, channels=32, hidden=64, out=33)
    expected = values_and_grads(fused("cpu"), inputs, 1.0, EG3D_AXES)
    on_gpu = [t.detach().cuda().requires_grad_() for t in inputs]
    actual = values_and_grads(fused("cuda"), on_gpu, 1.0, EG3D_AXES)
    for name, got, want in zip(["output", "planes", "points", "w1", "b1", "w2", "b2"], actual, expected):
        assert_close_scaled(got.cpu(), want, 1e-4 if dtype == torch.float32 else 1e-10, name)
