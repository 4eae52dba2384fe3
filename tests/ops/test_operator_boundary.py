"""The registered operators as a public surface: direct ``torch.ops.dreamportrait.*`` calls with
arguments the Python front end would have refused are refused before any memory is touched, and a
NaN or inf in the inputs reaches every output that depends on it, in every backend."""

import math

import pytest
import torch
from support import kernel_backends, requires_extension, requires_triton

from dreamportrait import _extension
from dreamportrait.ops import composite_rays, gated_cross_attention, reference


def attention_inputs(batch=2, heads=8, queries=6, keys=5, dim=16, dtype=torch.float64, device="cpu"):
    q = torch.randn(batch, heads, queries, dim, dtype=dtype, device=device)
    k = torch.randn(batch, heads, keys, dim, dtype=dtype, device=device)
    v = torch.randn(batch, heads, keys, dim, dtype=dtype, device=device)
    gate = torch.randn(heads, dtype=dtype, device=device)
    return q, k, v, gate


def _operators(kind):
    """(forward, backward) operator pairs of every compiled backend usable here."""
    pairs = []
    if _extension.status().available:
        pairs.append(pytest.param(f"{kind}", f"{kind}_backward", torch.float64, id="cpu"))
    pairs.append(pytest.param(f"{kind}_triton", f"{kind}_triton_backward", torch.float64, id="triton",
                              marks=requires_triton))
    return pairs


@pytest.mark.parametrize("forward,backward,lse_dtype", _operators("gated_cross_attention"))
@pytest.mark.parametrize("lse_shape", [(1, 1, 6), (2, 8, 5), (2, 8), (16, 1, 6)], ids=str)
def test_attention_backward_refuses_a_log_sum_exp_of_another_shape(forward, backward, lse_dtype, lse_shape):
    _extension.status()
    q, k, v, gate = attention_inputs()
    lse = torch.zeros(lse_shape, dtype=lse_dtype)
    with pytest.raises((RuntimeError, ValueError), match=r"lse must (be a .*|have shape )\(2, 8, 6\)"):
        getattr(torch.ops.dreamportrait, backward)(torch.ones_like(q), q, k, v, gate, None, lse, 0.25)


@pytest.mark.parametrize("forward,backward,lse_dtype", _operators("gated_cross_attention"))
def test_attention_backward_refuses_lse_and_grad_of_another_dtype_or_shape(forward, backward, lse_dtype):
    _extension.status()
    q, k, v, gate = attention_inputs()
    op = getattr(torch.ops.dreamportrait, backward)
    _, lse = getattr(torch.ops.dreamportrait, forward)(q, k, v, gate, None, 0.25)
    with pytest.raises((RuntimeError, TypeError), match="lse must be"):
        op(torch.ones_like(q), q, k, v, gate, None, lse.float(), 0.25)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="grad_out must"):
        op(torch.ones_like(q)[:, :, :3], q, k, v, gate, None, lse, 0.25)
    with pytest.raises((RuntimeError, ValueError, TypeError), match="grad_out must"):
        op(torch.ones_like(q).float(), q, k, v, gate, None, lse, 0.25)


@requires_triton
@pytest.mark.parametrize("case", ["colors", "depths", "deltas", "threshold"])
def test_triton_compositing_operator_checks_its_arguments(case):
    densities, depths, deltas = torch.rand(8, 6), torch.rand(8, 6), torch.rand(8, 6)
    colors = torch.rand(8, 6, 3)
    threshold = 0.0
    if case == "colors":
        colors = torch.rand(8, 5, 3)
    elif case == "depths":
        depths = torch.rand(8, 7)
    elif case == "deltas":
        deltas = deltas.double()
    else:
        threshold = math.nan
    with pytest.raises((ValueError, TypeError), match=case):
        torch.ops.dreamportrait.composite_rays_triton(densities, colors, depths, deltas, threshold)


@requires_triton
def test_triton_compositing_backward_checks_the_gradients():
    densities, depths, deltas, colors = torch.rand(8, 6), torch.rand(8, 6), torch.rand(8, 6), torch.rand(8, 6, 3)
    grads = [torch.ones(8, 3), torch.ones(8), torch.ones(8), torch.ones(8, 6)]
    op = torch.ops.dreamportrait.composite_rays_triton_backward
    for index, name in enumerate(("grad_rgb", "grad_depth", "grad_opacity", "grad_weights")):
        bad = list(grads)
        bad[index] = torch.ones(9, *grads[index].shape[1:])
        with pytest.raises(ValueError, match=name):
            op(*bad, densities, colors, depths, deltas)


@requires_triton
@pytest.mark.parametrize("case,match", [
    ("points-batch", "points must have shape"), ("box-warp", "box_warp"), ("axes", "axes"),
    ("grad-shape", "grad_output must have shape"), ("points-dtype", "points must be"),
])
def test_triton_sampling_operators_check_their_arguments(case, match):
    planes, points = torch.randn(2, 3, 4, 5, 5), torch.rand(2, 7, 3) - 0.5
    box_warp, axes = 1.0, [0, 1, 0, 2, 2, 0]
    grad = torch.ones(2, 7, 4)
    if case == "points-batch":
        points = points[:1]
    elif case == "box-warp":
        box_warp = 1e-320
    elif case == "axes":
        axes = [0, 1, 0, 2, 2, 3]
    elif case == "grad-shape":
        grad = torch.ones(2, 7, 3, 4)
    else:
        points = points.double()
    with pytest.raises((ValueError, TypeError), match=match):
        torch.ops.dreamportrait.triplane_sample_triton_backward_points(grad, planes, points, box_warp, axes, "mean")


# --- NaN in, NaN out ------------------------------------------------------------------------------

BACKENDS = [pytest.param("reference", "cpu", id="reference"), *kernel_backends()]


def _attention(backend, inputs, mask=None):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = gated_cross_attention(*inputs, key_padding_mask=mask, backend=backend)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    return out, grads


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_a_non_finite_query_poisons_its_row_and_what_sums_over_rows(backend, device, poison):
    q, k, v, gate = attention_inputs(batch=1, heads=2, queries=5, keys=7, device=device)
    q[0, 1, 3, 2] = poison
    out, (dq, dk, dv, dgate) = _attention(backend, (q, k, v, gate))
    assert out[0, 1, 3].isnan().all(), "the poisoned row must be NaN, not zeros"
    clean = torch.ones_like(out, dtype=torch.bool)
    clean[0, 1, 3] = False
    assert out[clean].isfinite().all() and out[0, 0].isfinite().all()
    assert dq[0, 1, 3].isnan().any() and dk[0, 1].isnan().any() and dv[0, 1].isnan().any()
    assert dgate[1].isnan() and dgate[0].isfinite()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_nan_key_poisons_every_row_of_its_head_but_not_fully_masked_ones(backend, device):
    q, k, v, gate = attention_inputs(batch=2, heads=2, queries=4, keys=6, device=device)
    k[:, 0, 2, 5] = math.nan
    mask = torch.ones(2, 6, dtype=torch.bool, device=device)
    mask[1] = False  # batch element 1 attends to nothing: zeros, whatever its keys hold
    out, grads = _attention(backend, (q, k, v, gate), mask)
    assert out[0, 0].isnan().all() and out[0, 1].isfinite().all()
    # dk and dv of the masked element are zero; its dq is 0 * k, NaN where k is, as in the reference.
    assert (out[1] == 0).all() and grads[1][1].eq(0).all() and grads[2][1].eq(0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("poison", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_padding_keys_give_the_reference_pattern(backend, device, poison):
    """Keys the mask excludes do not change the output unless they hold inf or NaN, which the
    reference multiplies by a zero probability: every backend gives the reference's NaN pattern
    and, elsewhere, its values."""
    q, k, v, gate = attention_inputs(batch=3, heads=2, queries=70, keys=20, device=device)
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(1)).to(device) > 0.4
    mask[:, 0] = True
    mask[:, 1] = False
    v[0, 1, 1, 3] = poison  # an excluded value: NaN outputs where the reference has them
    k[1, 0, 1, 2] = poison  # an excluded key: dq only
    out, grads = _attention(backend, (q, k, v, gate), mask)
    expected, expected_grads = _attention("reference", (q, k, v, gate), mask)
    for ours, theirs in zip((out, *grads), (expected, *expected_grads)):
        assert torch.equal(ours.isnan(), theirs.isnan())
        finite = theirs.isfinite()
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-7, atol=1e-9)
    assert out[0, 1, :, 3].isnan().all() and out[2].isfinite().all()
    dq, dk = grads[0], grads[1]
    assert dq[1, 0, :, 2].isnan().all()
    assert dk[0, 1][~mask[0]].eq(0).all() and dk[0, 1][mask[0]].isnan().any(), "excluded keys get no gradient"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_matches_the_reference_pattern(backend, device):
    q, k, v, gate = attention_inputs(batch=1, heads=3, queries=9, keys=8, device=device)
    q[0, 0, 1, 0] = math.nan
    k[0, 1, 4, 3] = math.nan
    v[0, 2, 6, 1] = math.nan
    out, grads = _attention(backend, (q, k, v, gate))
    expected, expected_grads = _attention("reference", (q, k, v, gate))
    assert torch.equal(out.isnan(), expected.isnan())
    for ours, theirs in zip(grads, expected_grads):
        assert torch.equal(ours.isnan(), theirs.isnan())


@requires_extension
def test_composite_reference_and_kernels_agree_on_nan():
    densities, depths, deltas, colors = torch.rand(4, 6), torch.rand(4, 6), torch.rand(4, 6), torch.rand(4, 6, 3)
    densities[1, 2] = math.nan
    ours = composite_rays(densities, colors, depths, deltas, backend="cpu")
    theirs = reference.composite_rays(densities, colors, depths, deltas, 0.0)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.isnan(), b.isnan())
