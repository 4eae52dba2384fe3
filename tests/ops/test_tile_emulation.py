"""The CUDA kernels' tile schedules, run on the CPU by their host emulations (the same block programs
as the GPU, block after block; csrc/cpu/tile_emulation.cpp) and checked against the reference: tile
sizes, zero padding of ragged tails, the online softmax across key tiles, the per-block partial sums
of the backward and the warp scans of the compositing."""

import math

import pytest
import torch
from support import assert_close_scaled, requires_extension

from dreamportrait import _extension
from dreamportrait.ops import reference

pytestmark = requires_extension

# (B, H, Lq, Lk, D, block_q, block_k): ragged query and key tails, several key tiles (online
# softmax), one key tile larger than Lk, head dims that are not multiples of 16, up to 256.
ATTENTION_CASES = [
    pytest.param((1, 1, 1, 1, 16, 16, 16), id="one-row-one-key"),
    pytest.param((2, 3, 45, 77, 40, 16, 32), id="Lk77-three-key-tiles-D40"),
    pytest.param((1, 2, 70, 77, 64, 64, 80), id="Lk77-one-key-tile"),
    pytest.param((2, 2, 33, 200, 64, 32, 48), id="Lk200-five-key-tiles"),
    pytest.param((1, 2, 20, 9, 130, 16, 16), id="D130"),
    pytest.param((1, 1, 17, 23, 256, 16, 16), id="D256"),
    pytest.param((2, 1, 5, 0, 8, 16, 16), id="no-keys"),
    pytest.param((1, 2, 19, 30, 9, 16, 16), id="D9-element-loads"),
]


def attention_ops():
    _extension.status()
    return torch.ops.dreamportrait.attention_tile_emulation, torch.ops.dreamportrait.attention_tile_emulation_backward


def attention_inputs(case, dtype=torch.float64, masked=True, seed=0):
    batch, heads, queries, keys, dim = case[:5]
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=generator, dtype=dtype)
               for length in (queries, keys, keys))
    gate = torch.randn(heads, generator=generator, dtype=dtype)
    mask = None
    if masked:
        mask = torch.rand(batch, keys, generator=generator) > 0.3
        mask[0] = False  # a batch element whose rows attend to nothing
    return q, k, v, gate, mask


def reference_with_grads(q, k, v, gate, mask, scale, grad_out):
    inputs = [x.detach().requires_grad_() for x in (q, k, v, gate)]
    out = reference.gated_cross_attention(*inputs, mask, scale)
    return out, torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("tiles_per_block", [1, 2, 3], ids=lambda n: f"{n}-query-tiles-per-block")
def test_attention_forward_schedule_matches_reference(case, masked, tiles_per_block):
    forward, _ = attention_ops()
    q, k, v, gate, mask = attention_inputs(case, masked=masked)
    scale = 1 / math.sqrt(case[4])
    out, lse = forward(q, k, v, gate, mask, scale, case[5], case[6], tiles_per_block)
    expected = reference.gated_cross_attention(q, k, v, gate, mask, scale)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("tiles_per_block,splits", [(1, 1), (2, 2), (1, 5), (0, 0)], ids=lambda n: str(n))
def test_attention_backward_schedule_matches_reference(case, tiles_per_block, splits):
    forward, backward = attention_ops()
    q, k, v, gate, mask = attention_inputs(case)
    scale = 0.3
    grad_out = torch.randn_like(q)
    out, lse = forward(q, k, v, gate, mask, scale, case[5], case[6], 0)
    grads = backward(grad_out, q, k, v, gate, mask, lse, scale, case[5], case[6], tiles_per_block, splits)
    _, expected = reference_with_grads(q, k, v, gate, mask, scale, grad_out)
    for name, ours, ref in zip(("q", "k", "v", "gate"), grads, expected):
        assert ours.shape == ref.shape and ours.dtype == ref.dtype, name
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10, msg=f"grad {name}")
    if mask is not None and case[3] > 0:  # masked keys get exactly nothing, the closed batch element neither
        assert not grads[1][~mask[:, None, :, None].expand_as(k)].any()
        assert not grads[0][0].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_k", [48, 80], ids=["two-key-tiles", "one-key-tile"])
def test_attention_schedule_in_the_kernels_types(dtype, block_k):
    """The GPU's types: tiles staged in the input type, the weights P and dS rounded to it for the
    tile products (as the tensor cores take them), float32 accumulation."""
    forward, backward = attention_ops()
    case = (2, 2, 70, 77, 64, 32, block_k)
    q, k, v, gate, mask = attention_inputs(case, dtype=torch.float32)
    grad_out = torch.randn_like(q)
    low = [x.to(dtype) for x in (q, k, v, gate, grad_out)]
    out, lse = forward(*low[:4], mask, 0.125, case[5], case[6], 2)
    grads = backward(low[4], *low[:4], mask, lse, 0.125, case[5], case[6], 2, 0)
    assert out.dtype == dtype and lse.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    ref_out, ref_grads = reference_with_grads(*[x.float() for x in low[:4]], mask, 0.125, low[4].float())
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    for name, ours, ref in zip(("out", "q", "k", "v", "gate"), (out, *grads), (ref_out, *ref_grads)):
        assert_close_scaled(ours.float(), ref, tolerance, name)


def test_attention_schedule_reads_misaligned_tensors_element_by_element():
    """Tiles are staged with 16-byte loads where every row starts 16-byte aligned, else element by
    element; both give the same bits."""
    forward, backward = attention_ops()
    q, k, v, gate, mask = attention_inputs((2, 2, 40, 50, 32))
    shifted = [torch.empty(x.numel() + 1, dtype=x.dtype)[1:].view(x.shape).copy_(x) for x in (q, k, v)]
    assert all(x.is_contiguous() and x.data_ptr() % 16 for x in shifted)
    aligned = forward(q, k, v, gate, mask, 0.2, 16, 32, 2)
    misaligned = forward(*shifted, gate, mask, 0.2, 16, 32, 2)
    assert all(torch.equal(a, b) for a, b in zip(aligned, misaligned))
    grad_out = torch.randn_like(q)
    grads = backward(grad_out, q, k, v, gate, mask, aligned[1], 0.2, 16, 32, 2, 3)
    shifted_grads = backward(grad_out, *shifted, gate, mask, aligned[1], 0.2, 16, 32, 2, 3)
    assert all(torch.equal(a, b) for a, b in zip(grads, shifted_grads))


def test_attention_schedule_propagates_nan_to_its_row_only():
    forward, backward = attention_ops()
    case = (1, 1, 40, 50, 24, 16, 16)
    q, k, v, gate, _ = attention_inputs(case, masked=False)
    q[0, 0, 21, 3] = math.nan
    out, lse = forward(q, k, v, gate, None, 0.2, 16, 16, 2)
    assert out[0, 0, 21].isnan().all() and lse[0, 0, 21].isnan()
    rows = torch.arange(40) != 21
    assert not out[0, 0, rows].isnan().any()
    dq, dk, dv, dgate = backward(torch.ones_like(q), q, k, v, gate, None, lse, 0.2, 16, 16, 2, 3)
    assert dq[0, 0, 21].isnan().all() and not dq[0, 0, rows].isnan().any()
    assert dk.isnan().all() and dgate.isnan().all()


def test_attention_emulation_checks_its_arguments():
    forward, backward = attention_ops()
    q, k, v, gate, _ = attention_inputs((1, 2, 5, 7, 16))
    with pytest.raises(RuntimeError, match="multiples of 16"):
        forward(q, k, v, gate, None, 0.25, 24, 16, 1)
    with pytest.raises(RuntimeError, match="gate must have shape"):
        forward(q, k, v, gate[:1], None, 0.25, 16, 16, 1)
    with pytest.raises(RuntimeError, match="tiles_per_block and splits must be"):
        forward(q, k, v, gate, None, 0.25, 16, 16, -1)
    _, lse = forward(q, k, v, gate, None, 0.25, 16, 16, 1)
    with pytest.raises(RuntimeError, match="lse must be"):
        backward(torch.ones_like(q), q, k, v, gate, None, lse.float(), 0.25, 16, 16, 1, 1)
    with pytest.raises(RuntimeError, match="tiles_per_block and splits must be"):
        backward(torch.ones_like(q), q, k, v, gate, None, lse, 0.25, 16, 16, 1, -1)


# --- the tile shapes the CUDA launcher picks -------------------------------------------------------

SHARED = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_90": 227 * 1024}


@pytest.mark.parametrize("arch", SHARED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [16, 40, 64, 128, 256])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_tile_shapes_fit_every_target(arch, dtype, dim, backward):
    """16-bit tiles fit every target up to D 256, float32 ones too except the float32 backward at
    D 256 on sm_86 (99 KiB); float64 ones (twice the bytes) up to D 64. Where they do not fit the
    launcher refuses (block_q 0) instead of overrunning shared memory."""
    attention_ops()
    shape = torch.ops.dreamportrait.attention_tile_shape(backward, 77, dim, dtype, SHARED[arch])
    block_q, block_k, padded, shared = shape
    assert padded == -(-dim // 16) * 16
    fits = (dtype == torch.float16 or dim <= 64
            or (dtype == torch.float32 and not (backward and dim == 256 and arch == "sm_86")))
    assert (block_q > 0) == fits or (dtype == torch.float64 and block_q > 0)
    if block_q == 0:
        assert shared == 0
        return
    assert block_q in (16, 32, 64) and block_k % 16 == 0 and 16 <= block_k <= 80
    assert 0 < shared <= SHARED[arch]


def test_tile_shapes_hold_the_text_tokens_in_one_key_tile():
    """At the benchmark shape (77 text tokens, D 64) an H100 block holds every key of its head, and
    two blocks fit an SM."""
    attention_ops()
    for backward in (False, True):
        block_q, block_k, _, shared = torch.ops.dreamportrait.attention_tile_shape(backward, 77, 64, torch.float16,
                                                                                   SHARED["sm_90"])
        assert block_k == 80 and 2 * shared <= SHARED["sm_90"]


# --- compositing: a warp per ray, 32 samples per chunk ----------------------------------------------

COMPOSITE_SHAPES = [  # (R, S, C): ragged last chunks, one sample, several chunks, more channels than lanes
    pytest.param((3, 1, 1), id="S1"),
    pytest.param((5, 31, 3), id="S31"),
    pytest.param((4, 32, 32), id="S32-C32"),
    pytest.param((6, 33, 3), id="S33"),
    pytest.param((7, 96, 32), id="S96-C32"),
    pytest.param((3, 100, 70), id="S100-C70"),
    pytest.param((2, 0, 4), id="S0"),
]


def composite_ops():
    _extension.status()
    return torch.ops.dreamportrait.composite_warp_emulation, torch.ops.dreamportrait.composite_warp_emulation_backward


def make_rays(shape, dtype=torch.float64, density_scale=3.0, seed=0):
    rays, samples, channels = shape
    generator = torch.Generator().manual_seed(seed)
    densities = torch.rand(rays, samples, generator=generator, dtype=dtype) * density_scale
    colors = torch.rand(rays, samples, channels, generator=generator, dtype=dtype)
    depths = torch.sort(torch.rand(rays, samples, generator=generator, dtype=dtype) * 4 + 1, dim=-1).values
    deltas = torch.rand(rays, samples, generator=generator, dtype=dtype) * 0.5
    return densities, colors, depths, deltas


def composite_reference(inputs, upstream, threshold=0.0):
    inputs = [x.detach().requires_grad_() for x in inputs]
    outputs = reference.composite_rays(*inputs, threshold)
    return outputs, torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)


@pytest.mark.parametrize("shape", COMPOSITE_SHAPES)
def test_composite_warp_schedule_matches_reference(shape):
    forward, backward = composite_ops()
    inputs = make_rays(shape)
    outputs = forward(*inputs, 0.0)
    upstream = [torch.randn_like(o) for o in outputs]
    grads = backward(*upstream, *inputs)
    ref_outputs, ref_grads = composite_reference(inputs, upstream)
    for name, ours, ref in zip(("rgb", "depth", "opacity", "weights"), outputs, ref_outputs):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12, msg=name)
    for name, ours, ref in zip(("densities", "colors", "depths", "deltas"), grads, ref_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12, msg=f"grad {name}")


def test_composite_warp_schedule_stops_where_the_sequential_kernel_stops():
    """The first sample whose transmittance is below the threshold and every later one get weight
    0, wherever it falls in a chunk; the CPU kernel (sequential) is the reference here."""
    forward, _ = composite_ops()
    inputs = make_rays((24, 100, 3), density_scale=0.6)
    for threshold in (1e-4, 0.05, 0.5, 0.95):
        ours = forward(*inputs, threshold)
        expected = torch.ops.dreamportrait.composite_rays(*inputs, threshold)
        for name, a, b in zip(("rgb", "depth", "opacity", "weights"), ours, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=f"{name} at threshold {threshold}")
        assert (ours[3] == 0).any() or threshold == 1e-4, "the threshold must stop some rays"


def test_composite_warp_schedule_opaque_and_nan_samples():
    forward, backward = composite_ops()
    densities, colors, depths, deltas = make_rays((3, 70, 4))
    densities[0, 40] = 1e30  # opaque: every later transmittance exactly 0
    densities[1, 50] = math.nan
    outputs = forward(densities, colors, depths, deltas, 0.0)
    weights = outputs[3]
    assert not weights[0, 41:].any() and weights[0, 40] > 0
    assert weights[1, 50:].isnan().all() and not weights[1, :50].isnan().any()
    assert outputs[0][1].isnan().all() and not outputs[0][2].isnan().any()
    grads = backward(*[torch.ones_like(o) for o in outputs], densities, colors, depths, deltas)
    assert not grads[0][0].isnan().any() and not grads[0][0, 41:].any()
    assert grads[0][1].isnan().any() and not grads[0][2].isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_composite_warp_schedule_in_the_kernels_types(dtype):
    forward, backward = composite_ops()
    inputs = [x.to(dtype) for x in make_rays((9, 96, 32))]
    outputs = forward(*inputs, 0.0)
    upstream = [torch.randn_like(o) for o in outputs]
    grads = backward(*upstream, *inputs)
    ref_outputs, ref_grads = composite_reference([x.double() for x in inputs], [u.double() for u in upstream])
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for name, ours, ref in zip(("rgb", "depth", "opacity", "weights", "densities", "colors", "depths", "deltas"),
                               (*outputs, *grads), (*ref_outputs, *ref_grads)):
        assert ours.dtype == dtype, name
        assert_close_scaled(ours.double(), ref, tolerance, name)


def test_composite_warp_emulation_checks_its_arguments():
    forward, backward = composite_ops()
    densities, colors, depths, deltas = make_rays((4, 6, 3))
    with pytest.raises(RuntimeError, match="colors must have shape"):
        forward(densities, colors[:, :5], depths, deltas, 0.0)
    with pytest.raises(RuntimeError, match="transmittance_threshold must be in"):
        forward(densities, colors, depths, deltas, 1.5)
    with pytest.raises(RuntimeError, match="grad_rgb must have shape"):
        backward(torch.ones(4, 2), torch.ones(4), torch.ones(4), torch.ones(4, 6), densities, colors, depths, deltas)
