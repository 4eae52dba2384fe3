"""sample_and_decode against an independent composition: EG3D's per-plane grid_sample, the mean and
the two-layer MLP written out, values and gradients to every tensor argument."""

import pytest
import torch
import torch.nn.functional as F

from dreamportrait.ops import EG3D_AXES, ORTHOGONAL_AXES, sample_and_decode
from support import assert_close_scaled, kernel_backends, requires_extension


def written_out(planes, points, box_warp, axes, weight1, bias1, weight2, bias2):
    samples = []
    for plane in range(3):
        grid = points[..., [axes[2 * plane], axes[2 * plane + 1]]] * (2 / box_warp)
        samples.append(F.grid_sample(planes[:, plane], grid[:, None], align_corners=False)[:, :, 0].transpose(1, 2))
    features = (samples[0] + samples[1] + samples[2]) / 3
    pre = features @ weight1.T + bias1
    hidden = torch.where(pre > 20, pre, torch.log1p(torch.exp(pre)))
    raw = hidden @ weight2.T + bias2
    return torch.cat([raw[..., :1], torch.sigmoid(raw[..., 1:]) * 1.002 - 0.001], -1)


def make_inputs(dtype, device="cpu", batch=2, count=700, channels=16, hidden=16, out=5, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * scale).to(device).requires_grad_()

    planes = randn(batch, 3, channels, 9, 11)
    points = ((torch.rand(batch, count, 3, generator=generator, dtype=dtype) * 1.3 - 0.65) * 1.2).to(device)
    points.requires_grad_()
    # Pre-activations spread over softplus' threshold (20) and beyond the sigmoid's flat ends.
    return planes, points, randn(hidden, channels, scale=4), randn(hidden, scale=8), randn(out, hidden), randn(out)


def values_and_grads(function, inputs, box_warp, axes):
    out = function(inputs[0], inputs[1], box_warp, axes, *inputs[2:])
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype).to(out.device)
    return (out, *torch.autograd.grad((out * weights).sum(), inputs))


def ours(backend):
    def run(planes, points, box_warp, axes, w1, b1, w2, b2):
        return sample_and_decode(planes, points, box_warp, w1, b1, w2, b2, axes, backend=backend)
    return run


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference"), *kernel_backends()])
@pytest.mark.parametrize("axes", [EG3D_AXES, ORTHOGONAL_AXES])
def test_matches_written_out_float64(backend, device, axes):
    inputs = make_inputs(torch.float64, device)
    expected = values_and_grads(written_out, inputs, 1.2, axes)
    actual = values_and_grads(ours(backend), inputs, 1.2, axes)
    names = ["output", "planes", "points", "weight1", "bias1", "weight2", "bias2"]
    for name, got, want in zip(names, actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_matches_written_out_float32(backend, device):
    inputs = make_inputs(torch.float32, device, count=3000, channels=32, hidden=64, out=33)
    expected = values_and_grads(written_out, inputs, 1.0, EG3D_AXES)
    actual = values_and_grads(ours(backend), inputs, 1.0, EG3D_AXES)
    for got, want in zip(actual, expected):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * max(scale, 1))


@pytest.mark.parametrize("backend,device", [p for p in kernel_backends() if p.id != "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, device, dtype):
    """Half inputs against the written-out composition of the same rounded values in float32: the
    layers multiply in the inputs' dtype (tensor cores) with float32 sums, as a half nn.Linear does."""
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("Triton's interpreter computes bfloat16 tl.dot wrongly; checked on a GPU")
    inputs = [t.detach().to(dtype) for t in make_inputs(torch.float32, count=300, channels=32, hidden=64, out=33)]
    rounded = [t.float().to(device).requires_grad_() for t in inputs]
    inputs = [t.to(device).requires_grad_() for t in inputs]
    actual = values_and_grads(ours(backend), inputs, 1.0, EG3D_AXES)
    expected = values_and_grads(written_out, rounded, 1.0, EG3D_AXES)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    names = ["output", "planes", "points", "weight1", "bias1", "weight2", "bias2"]
    for name, got, want in zip(names, actual, expected):
        assert got.dtype == dtype
        # position gradients amplify rounding (a difference of corner values over a texel)
        assert_close_scaled(got.float(), want, 10 * tol if name == "points" else tol, name)


@requires_extension
def test_gradcheck_cpu_kernel():
    inputs = make_inputs(torch.float64, count=40, channels=4, hidden=6, out=3)

    def function(*tensors):
        return sample_and_decode(tensors[0], tensors[1], 1.2, *tensors[2:], EG3D_AXES, backend="cpu")

    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-6)


@requires_extension
def test_only_requested_gradients_and_empty_inputs():
    planes, points, *weights = make_inputs(torch.float32, count=50)
    out = sample_and_decode(planes.detach(), points.detach(), 1.0, *weights, backend="cpu")
    grads = torch.autograd.grad(out.sum(), weights)
    assert all(g.shape == w.shape for g, w in zip(grads, weights))
    empty = sample_and_decode(planes, points[:, :0], 1.0, *weights, backend="cpu")
    assert empty.shape == (2, 0, 5)
    empty.sum().backward()
    assert planes.grad.abs().sum() == 0 and weights[0].grad.abs().sum() == 0


def test_bad_arguments_are_named():
    planes, points, w1, b1, w2, b2 = make_inputs(torch.float32, count=10)
    with pytest.raises(ValueError, match="weight1"):
        sample_and_decode(planes, points, 1.0, w1[:, :3], b1, w2, b2)
    with pytest.raises(ValueError, match="bias1"):
        sample_and_decode(planes, points, 1.0, w1, b1[:3], w2, b2)
    with pytest.raises(ValueError, match="weight2"):
        sample_and_decode(planes, points, 1.0, w1, b1, w2[:1], b2)
    with pytest.raises(ValueError, match="bias2"):
        sample_and_decode(planes, points, 1.0, w1, b1, w2, b2[:2])
    with pytest.raises(TypeError, match="weight2 dtype"):
        sample_and_decode(planes, points, 1.0, w1, b1, w2.double(), b2)
    with pytest.raises(TypeError, match="bias1 must be a Tensor"):
        sample_and_decode(planes, points, 1.0, w1, None, w2, b2)
    with pytest.raises(ValueError, match="box_warp"):
        sample_and_decode(planes, points, -1.0, w1, b1, w2, b2)


@requires_extension
def test_registered_op_checks_shapes_itself():
    planes, points, w1, b1, w2, b2 = (t.detach() for t in make_inputs(torch.float32, count=10))
    op = torch.ops.dreamportrait.sample_and_decode
    with pytest.raises(RuntimeError, match="weight2 must have shape"):
        op(planes, points, 1.0, list(EG3D_AXES), w1, b1, w2[:, :3], b2)
    out = op(planes, points, 1.0, list(EG3D_AXES), w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        torch.ops.dreamportrait.sample_and_decode_backward(out[:, :5], planes, points, 1.0, list(EG3D_AXES),
                                                          w1, b1, w2, b2, True, True)
