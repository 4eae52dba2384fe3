"""composite_rays: every backend against the PyTorch reference, all gradients, extreme rays, edge
shapes, early termination, compile, registrations and argument errors."""

import math

import pytest
import torch
from support import assert_close_scaled, assert_compiled_matches_eager, poisoned_allocations, kernel_backends, requires_cuda, requires_extension, requires_triton

from dreamportrait import _extension
from dreamportrait.ops import composite_rays, reference

SHAPES = [  # (R, S, C)
    pytest.param((1, 1, 1), id="S1-C1"),
    pytest.param((7, 2, 33), id="S2-C33"),
    pytest.param((40, 96, 3), id="S96"),
    pytest.param((13, 17, 1), id="C1"),
]
OUTPUTS = ("rgb", "depth", "opacity", "weights")


def make_rays(shape, dtype=torch.float64, device="cpu", density_scale=3.0):
    """densities, colors, depths (sorted), deltas for (R, S, C) or (*leading, S, C) shapes."""
    *leading, samples, channels = shape
    densities = torch.rand(*leading, samples, dtype=dtype, device=device) * density_scale
    colors = torch.rand(*leading, samples, channels, dtype=dtype, device=device)
    depths = torch.sort(torch.rand(*leading, samples, dtype=dtype, device=device) * 4 + 1, dim=-1).values
    deltas = torch.rand(*leading, samples, dtype=dtype, device=device) * 0.5
    return densities, colors, depths, deltas


def run(fn, inputs, upstream=None):
    """Outputs of fn and the gradients of all four inputs for random gradients of all four outputs."""
    inputs = [x.detach().requires_grad_() for x in inputs]
    outputs = fn(*inputs)
    upstream = [torch.randn_like(o) for o in outputs] if upstream is None else upstream
    grads = torch.autograd.grad(outputs, inputs, upstream)
    return outputs, grads, upstream



def check_against_reference(backend, inputs, rtol):
    outputs, grads, upstream = run(lambda *x: composite_rays(*x, backend=backend), inputs)
    flat = [x.reshape(-1, x.shape[inputs[0].dim() - 1]) if i != 1 else x.reshape(-1, *x.shape[-2:])
            for i, x in enumerate(inputs)]
    ref_outputs, ref_grads, _ = run(
        lambda *x: reference.composite_rays(*x),
        flat,
        [u.reshape(r.shape) for u, r in zip(upstream, reference.composite_rays(*flat))],
    )
    for name, ours, ref in zip(OUTPUTS, outputs, ref_outputs):
        assert_close_scaled(ours.reshape(ref.shape), ref, rtol, name)
    for name, ours, ref, x in zip(("densities", "colors", "depths", "deltas"), grads, ref_grads, inputs):
        assert ours.shape == x.shape
        assert_close_scaled(ours.reshape(ref.shape), ref, rtol, f"grad {name}")
    return outputs, grads


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_float64(backend, device, shape):
    if backend == "triton" and device == "cuda":
        pytest.skip("float64 Triton is covered on CPU")
    check_against_reference(backend, make_rays(shape, torch.float64, device), rtol=1e-10)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_matches_reference_float32(backend, device):
    check_against_reference(backend, make_rays((300, 48, 32), torch.float32, device), rtol=5e-5)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_leading_batch_dimensions(backend, device):
    outputs, _ = check_against_reference(backend, make_rays((2, 3, 5, 9, 4), torch.float64, device), rtol=1e-10)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 5, 4), (2, 3, 5), (2, 3, 5), (2, 3, 5, 9)]


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_transparent_and_opaque_rays(backend, device):
    densities, colors, depths, deltas = make_rays((4, 10, 3), torch.float64, device)
    densities[0] = 0  # fully transparent
    densities[1, 0] = 1e4  # opaque at the first sample
    densities[2] = 1e4  # opaque everywhere
    # Opaque needs density x delta >> 1: a delta drawn near 0 would leave transmittance behind (e.g.
    # delta 1e-4 gave weight 0.68, seed 499746950), so those rays' deltas are kept >= 0.01 (e^-100).
    deltas[1:3] = deltas[1:3].clamp_min(0.01)
    outputs, grads = check_against_reference(backend, (densities, colors, depths, deltas), rtol=1e-10)
    rgb, depth, opacity, weights = outputs
    assert not weights[0].any() and not rgb[0].any() and opacity[0] == 0
    torch.testing.assert_close(weights[1], torch.nn.functional.one_hot(torch.tensor(0), 10).to(weights))
    torch.testing.assert_close(rgb[1], colors[1, 0])
    torch.testing.assert_close(opacity[1:3], torch.ones(2, dtype=torch.float64, device=device))


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_densities_stay_finite(backend, device, dtype):
    densities, colors, depths, deltas = make_rays((20, 16, 3), dtype, device)
    densities[::2, 3] = 1e30 if dtype == torch.float64 else 1e20
    densities[1::2] = 1e12
    outputs, grads = check_against_reference(backend, (densities, colors, depths, deltas), rtol=1e-5)
    for tensor in (*outputs, *grads):
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_non_contiguous_inputs(backend, device):
    densities, colors, depths, deltas = make_rays((9, 12, 6), torch.float64, device)
    inputs = (
        densities.t().contiguous().t(),
        colors.transpose(0, 2).contiguous().transpose(0, 2),
        torch.cat([depths, depths], dim=1)[:, ::2],
        deltas.t().contiguous().t(),
    )
    assert not any(x.is_contiguous() for x in inputs)
    check_against_reference(backend, inputs, rtol=1e-10)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("shape", [(0, 5, 3), (4, 0, 3), (4, 5, 0)], ids=["R0", "S0", "C0"])
def test_empty_inputs(backend, device, shape):
    outputs, grads, _ = run(lambda *x: composite_rays(*x, backend=backend), make_rays(shape, torch.float64, device))
    rays, samples, channels = shape
    assert [tuple(o.shape) for o in outputs] == [(rays, channels), (rays,), (rays,), (rays, samples)]
    if samples == 0:
        assert not any(o.any() for o in outputs)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_every_output_element_is_written(backend, device):
    inputs = make_rays((33, 20, 5), torch.float32, device)
    with poisoned_allocations(device):
        outputs, grads, _ = run(lambda *x: composite_rays(*x, backend=backend), inputs)
        with torch.no_grad():
            early = composite_rays(*inputs, transmittance_threshold=0.5, backend=backend)
        for tensor in (*outputs, *grads, *early):
            assert not tensor.isnan().any()


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference"), *kernel_backends()])
def test_early_termination_changes_results_within_the_threshold(backend, device):
    inputs = make_rays((64, 40, 3), torch.float64, device, density_scale=8.0)
    threshold = 0.05
    with torch.no_grad():
        exact = composite_rays(*inputs, backend=backend)
        early = composite_rays(*inputs, transmittance_threshold=threshold, backend=backend)
    rgb, depth, opacity, weights = early
    assert (exact[3] - weights >= 0).all() and (weights < exact[3]).any(), "some rays should stop early"
    assert (exact[2] - opacity).max() <= threshold
    assert (exact[0] - rgb).abs().max() <= threshold * inputs[1].abs().max()
    assert (exact[1] - depth).abs().max() <= threshold * inputs[2].abs().max()
    # Once a weight is dropped, every later weight on that ray is too.
    stopped = ((weights == 0) & (exact[3] > 0)).cummax(dim=1).values
    assert stopped.any() and not weights[stopped].any()


@requires_extension
def test_gradcheck_cpu_kernel_through_all_outputs():
    inputs = [x.requires_grad_() for x in make_rays((3, 6, 2), torch.float64)]

    def composite(*x):
        return composite_rays(*x, backend="cpu")

    assert torch.autograd.gradcheck(composite, inputs)

    def weights_loss(*x):  # a loss on the weights alone needs the suffix-sum term
        return (composite_rays(*x, backend="cpu")[3] * torch.linspace(-1, 2, 6, dtype=torch.float64)).square().sum()

    assert torch.autograd.gradcheck(weights_loss, inputs)


@requires_triton
def test_gradcheck_triton_kernel():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = [x.requires_grad_() for x in make_rays((2, 5, 2), torch.float64, device)]
    assert torch.autograd.gradcheck(lambda *x: composite_rays(*x, backend="triton"), inputs)


@pytest.mark.parametrize("backend,device", [p for p in kernel_backends() if p.id != "triton"])
def test_torch_compile_fullgraph(backend, device):
    inputs = make_rays((2, 16, 24, 3), torch.float32, device)

    def loss(densities, colors, depths, deltas):
        rgb, depth, opacity, weights = composite_rays(densities * 1.5, colors, depths, deltas, backend=backend)
        return rgb.square().sum() + depth.sum() + opacity.sum() + weights.square().sum()

    assert_compiled_matches_eager(loss, inputs)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda(backend, dtype):
    inputs = [x.to(dtype) for x in make_rays((512, 48, 32), torch.float32, "cuda")]
    outputs, grads, upstream = run(lambda *x: composite_rays(*x, backend=backend), inputs)
    ref_outputs, ref_grads, _ = run(
        lambda *x: reference.composite_rays(*x), [x.float() for x in inputs], [u.float() for u in upstream]
    )
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    for ours, ref in zip((*outputs, *grads), (*ref_outputs, *ref_grads)):
        assert ours.dtype == dtype
        assert_close_scaled(ours.float(), ref, tol, "half")


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_opcheck_registrations(backend, device):
    _extension.status()
    name = "composite_rays_triton" if backend == "triton" else "composite_rays"
    inputs = [x.requires_grad_() for x in make_rays((6, 7, 3), torch.float64, device)]
    torch.library.opcheck(getattr(torch.ops.dreamportrait, name), (*inputs, 0.0))


# --- bad input ----------------------------------------------------------------------------------


def _bad_calls():
    densities, colors, depths, deltas = make_rays((4, 6, 3), torch.float32)
    return [
        ("densities-type", dict(densities=densities.numpy()), TypeError, "densities must be a Tensor"),
        ("densities-scalar", dict(densities=densities[0, 0]), ValueError, "densities must have shape"),
        ("colors-shape", dict(colors=colors[:, :5]), ValueError, r"colors must have shape \(4, 6, 'C'\)"),
        ("colors-rank", dict(colors=colors[..., 0]), ValueError, "colors must have shape"),
        ("depths-shape", dict(depths=depths[:3]), ValueError, "depths must have the shape of densities"),
        ("deltas-shape", dict(deltas=deltas[:, :2]), ValueError, "deltas must have the shape of densities"),
        ("deltas-negative", dict(deltas=deltas - 1), ValueError, "deltas must be non-negative"),
        ("densities-negative", dict(densities=-densities - 0.1), ValueError, "densities must be non-negative"),
        ("densities-int", dict(densities=densities.long()), TypeError, "densities must be a floating-point"),
        ("dtype", dict(colors=colors.double()), TypeError, "colors dtype torch.float64 does not match densities"),
        ("device", dict(depths=depths.to("meta")), ValueError, "depths is on meta"),
        ("threshold-range", dict(transmittance_threshold=1.5), ValueError, r"transmittance_threshold must be in \(0, 1\)"),
        ("threshold-nan", dict(transmittance_threshold=math.nan), ValueError, "transmittance_threshold must be finite"),
        ("threshold-type", dict(transmittance_threshold="0.1"), TypeError, "transmittance_threshold must be a real"),
        ("threshold-grad", dict(densities=densities.requires_grad_(), transmittance_threshold=0.1), ValueError,
         "transmittance_threshold is for inference"),
        ("backend", dict(backend="cuda"), ValueError, "backend='cuda' needs CUDA tensors"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, overrides, error, message = case
    densities, colors, depths, deltas = make_rays((4, 6, 3), torch.float32)
    arguments = dict(densities=densities, colors=colors, depths=depths, deltas=deltas)
    arguments.update(overrides)
    with pytest.raises(error, match=message):
        composite_rays(**arguments)


@requires_extension
def test_compiled_operator_checks_its_arguments():
    _extension.status()
    densities, colors, depths, deltas = make_rays((4, 6, 3), torch.float32)
    with pytest.raises(RuntimeError, match="colors must have shape"):
        torch.ops.dreamportrait.composite_rays(densities, colors[:2], depths, deltas, 0.0)
    with pytest.raises(RuntimeError, match="transmittance_threshold must be in"):
        torch.ops.dreamportrait.composite_rays(densities, colors, depths, deltas, 2.0)
