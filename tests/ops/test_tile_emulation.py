"""The CUDA kernels' tile schedules, run on the CPU by their host emulations (the same block programs
as the GPU, block after block; csrc/cpu/tile_emulation.cpp) and checked against the reference: tile
sizes, zero padding of ragged tails, the online softmax across key tiles, the per-block partial sums
of the backward and the warp scans of the compositing."""

import math

import pytest
import torch
from support import assert_close_scaled, gate_gradient_magnitudes, requires_extension

from dreamportrait import _extension
from dreamportrait.ops import reference

pytestmark = requires_extension

# (B, H, Lq, Lk, D, block_q, block_k, block_d): ragged query and key tails, several key tiles
# (online softmax), one key tile larger than Lk, head dims that are not multiples of 16, up to 256,
# head dims split into column chunks (block_d; 0: not split), a narrower last chunk among them.
ATTENTION_CASES = [
    pytest.param((1, 1, 1, 1, 16, 16, 16, 0), id="one-row-one-key"),
    pytest.param((2, 3, 45, 77, 40, 16, 32, 0), id="Lk77-three-key-tiles-D40"),
    pytest.param((1, 2, 70, 77, 64, 64, 80, 0), id="Lk77-one-key-tile"),
    pytest.param((2, 2, 33, 200, 64, 32, 48, 0), id="Lk200-five-key-tiles"),
    pytest.param((1, 2, 20, 9, 130, 16, 16, 0), id="D130"),
    pytest.param((1, 1, 17, 23, 256, 16, 16, 0), id="D256"),
    pytest.param((2, 1, 5, 0, 8, 16, 16, 0), id="no-keys"),
    pytest.param((1, 2, 19, 30, 9, 16, 16, 0), id="D9-element-loads"),
    pytest.param((2, 3, 45, 77, 40, 16, 32, 16), id="D40-three-column-chunks-three-key-tiles"),
    pytest.param((1, 2, 70, 77, 130, 64, 80, 64), id="D130-column-chunks-64-64-16-one-key-tile"),
    pytest.param((1, 1, 17, 40, 256, 16, 16, 96), id="D256-column-chunks-96-96-64"),
    pytest.param((2, 1, 5, 0, 40, 16, 16, 16), id="no-keys-column-chunks"),
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
    out, lse = forward(q, k, v, gate, mask, scale, case[5], case[6], tiles_per_block, case[7])
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
    out, lse = forward(q, k, v, gate, mask, scale, case[5], case[6], 0, case[7])
    grads = backward(grad_out, q, k, v, gate, mask, lse, scale, case[5], case[6], tiles_per_block, splits, case[7])
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
    magnitudes = {"gate": gate_gradient_magnitudes(*low[:4], mask, 0.125, low[4]).max().item()}
    for name, ours, ref in zip(("out", "q", "k", "v", "gate"), (out, *grads), (ref_out, *ref_grads)):
        assert_close_scaled(ours.float(), ref, tolerance, name, magnitudes.get(name, 0.0))


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
    with pytest.raises(RuntimeError, match="block_d must be 0"):
        forward(q, k, v, gate, None, 0.25, 16, 16, 1, 24)
    _, lse = forward(q, k, v, gate, None, 0.25, 16, 16, 1)
    with pytest.raises(RuntimeError, match="lse must be"):
        backward(torch.ones_like(q), q, k, v, gate, None, lse.float(), 0.25, 16, 16, 1, 1)
    with pytest.raises(RuntimeError, match="tiles_per_block and splits must be"):
        backward(torch.ones_like(q), q, k, v, gate, None, lse, 0.25, 16, 16, 1, -1)


# --- the tile shapes the CUDA launcher picks -------------------------------------------------------

SHARED = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_90": 227 * 1024}


DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def tile_shape(backward, keys, dim, dtype, arch):
    attention_ops()
    return torch.ops.dreamportrait.attention_tile_shape(backward, keys, dim, dtype, SHARED[arch])


@pytest.mark.parametrize("arch", SHARED)
def test_tile_shapes_fit_every_target(arch):
    """Every dtype, head dim 1..256 and direction gets tiles that fit the target's shared memory:
    the whole head dim in a tile where that fits, else column chunks of it; the launcher refuses
    none of them."""
    for dtype in DTYPES:
        for backward in (False, True):
            for keys in (77, 1000):
                for dim in range(1, 257):
                    block_q, block_k, padded, block_d, shared = tile_shape(backward, keys, dim, dtype, arch)
                    where = (arch, dtype, backward, keys, dim)
                    assert padded == -(-dim // 16) * 16, where
                    assert block_q in (16, 32, 64) and block_k % 16 == 0 and 16 <= block_k <= 128, where
                    assert block_d % 16 == 0 and 16 <= block_d <= padded, where
                    assert 0 < shared <= SHARED[arch], where


# The head dims from which 16 x 16 tiles of the whole head dim outgrow a block's shared memory;
# 16-bit tiles never do, float32 ones only for the backward on sm_86 (99 KiB).
SPLIT_FROM = {("sm_80", torch.float64, True): 177, ("sm_86", torch.float32, True): 209,
              ("sm_86", torch.float64, False): 177, ("sm_86", torch.float64, True): 97,
              ("sm_90", torch.float64, True): 241}


@pytest.mark.parametrize("arch", SHARED)
def test_tile_shapes_split_the_head_dim_only_where_it_does_not_fit(arch):
    for dtype in DTYPES:
        for backward in (False, True):
            split_from = SPLIT_FROM.get((arch, dtype, backward), 257)
            for dim in range(1, 257):
                _, _, padded, block_d, _ = tile_shape(backward, 77, dim, dtype, arch)
                assert (block_d < padded) == (dim >= split_from), (dtype, backward, dim)


# Shapes the old tiles refused on some target: float64 at D 128 and up, the float32 backward at D 256.
ARCH_LIMIT_CASES = [
    pytest.param(dtype, dim, backward, id=f"{str(dtype).removeprefix('torch.')}-D{dim}-{'bwd' if backward else 'fwd'}")
    for dtype, backward in ((torch.float64, False), (torch.float64, True), (torch.float32, True))
    for dim in (128, 200, 256)
]


@pytest.mark.parametrize("arch", SHARED)
@pytest.mark.parametrize("dtype,dim,backward", ARCH_LIMIT_CASES)
@pytest.mark.parametrize("keys", [77, 150], ids=["one-key-tile", "several-key-tiles"])
def test_attention_schedule_at_each_targets_tile_shapes(arch, dtype, dim, backward, keys):
    """The schedule with the tiles the launcher picks on each target (split head dims among them)
    matches the reference."""
    forward_op, backward_op = attention_ops()
    fwd_q, fwd_k, _, fwd_d, _ = tile_shape(False, keys, dim, dtype, arch)
    q, k, v, gate, mask = attention_inputs((2, 2, 40, keys, dim), dtype=dtype)
    scale = 1 / math.sqrt(dim)
    out, lse = forward_op(q, k, v, gate, mask, scale, fwd_q, fwd_k, 0, fwd_d)
    wide = [x.double() for x in (q, k, v, gate)]
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    if not backward:
        assert_close_scaled(out.double(), reference.gated_cross_attention(*wide, mask, scale), tolerance, "out")
        return
    block_q, block_k, _, block_d, _ = tile_shape(True, keys, dim, dtype, arch)
    grad_out = torch.randn_like(q)
    grads = backward_op(grad_out, q, k, v, gate, mask, lse, scale, block_q, block_k, 0, 0, block_d)
    _, expected = reference_with_grads(*wide, mask, scale, grad_out.double())
    magnitudes = {"gate": gate_gradient_magnitudes(*wide, mask, scale, grad_out).max().item()}
    for name, ours, ref in zip(("q", "k", "v", "gate"), grads, expected):
        assert ours.dtype == dtype, name
        tolerance = 1e-10 if dtype == torch.float64 else 1e-5
        assert_close_scaled(ours.double(), ref, tolerance, f"grad {name}", magnitudes.get(name, 0.0))


def test_attention_forward_is_the_same_with_the_head_dim_split():
    """The chunks' score products add the head dim's terms in the order one tile does, so the
    forward in float64 has the same bits split or not."""
    forward, _ = attention_ops()
    q, k, v, gate, mask = attention_inputs((2, 2, 40, 100, 200))
    whole = forward(q, k, v, gate, mask, 0.07, 32, 48, 1)
    for block_d in (16, 64, 96):
        split = forward(q, k, v, gate, mask, 0.07, 32, 48, 1, block_d)
        assert all(torch.equal(a, b) for a, b in zip(whole, split)), block_d


def test_tile_shapes_hold_the_text_tokens_in_one_key_tile():
    """At the benchmark shape (77 text tokens, D 64) an H100 block holds every key of its head, and
    two blocks fit an SM."""
    attention_ops()
    for backward in (False, True):
        block_q, block_k, padded, block_d, shared = tile_shape(backward, 77, 64, torch.float16, "sm_90")
        assert block_k == 80 and block_d == padded == 64 and 2 * shared <= SHARED["sm_90"]


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


# ---- The fused decoder (sample_and_decode): one warp per point for the sampling and the scatter,
# a thread per point and 8 units (1 in float64) for the MLP's products, tiles of up to 32 points,
# per-block weight-gradient sums.

H100_SHARED, H100_SMS = 227 * 1024, 132


def backward_shared_bytes(C, K, O, tile, element_size=8):
    """Shared memory of a backward block: the weights staged transposed with C, K and O padded to
    multiples of 8, and their gradient sums, then the tile's features (C), pre-activations and
    hidden units (K each) and raw-output gradients (O), each row padded by one element."""
    C8, K8, O8 = (-(-n // 8) * 8 for n in (C, K, O))
    staged = C8 * K8 + K8 + K8 * O8 + O8
    weights = K * C + K + O * K + O
    return element_size * (staged + weights + tile * ((C + 1) + 2 * (K + 1) + (O + 1)))


# (B, N, C, K, O, shared_memory, sms, threads): EG3D's decoder (C 32, K 64, O 33) in float64 on an
# H100's shared memory, with ragged last tiles and blocks that take several tiles; shared memory
# that fits the backward's tiles of 4 but not of 8 (its forward still takes tiles of 32); more
# channels than lanes (C 48) and fewer (C 5); one warp per block, and the GPU's 256 threads; batch
# elements with no points.
DECODER_CASES = [
    pytest.param((2, 100, 32, 64, 33, H100_SHARED, 1, 64), id="eg3d-decoder-ragged-tiles-several-per-block"),
    pytest.param((1, 37, 32, 64, 33, backward_shared_bytes(32, 64, 33, 4), 2, 64), id="eg3d-decoder-tiles-of-4"),
    pytest.param((2, 45, 48, 16, 2, H100_SHARED, 3, 32), id="C48-more-channels-than-lanes-one-warp"),
    pytest.param((1, 70, 5, 7, 4, H100_SHARED, H100_SMS, 256), id="C5-256-threads-a-block-per-tile"),
    pytest.param((3, 0, 8, 8, 3, H100_SHARED, 1, 64), id="no-points"),
]


def decoder_ops():
    _extension.status()
    return (torch.ops.dreamportrait.sample_and_decode_tile_emulation,
            torch.ops.dreamportrait.sample_and_decode_tile_emulation_backward)


def decoder_inputs(case, dtype=torch.float64, seed=0):
    """Planes, points (a quarter outside the box, where some taps fall off the planes) and weights
    whose pre-activations cross softplus' threshold and the sigmoid's flat ends."""
    batch, count, channels, hidden, out = case[:5]
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).mul(scale).to(dtype)

    planes = randn(batch, 3, channels, 9, 11)
    points = ((torch.rand(batch, count, 3, generator=generator, dtype=torch.float64) - 0.5) * 1.6).to(dtype)
    return [planes, points, randn(hidden, channels, scale=4), randn(hidden, scale=8), randn(out, hidden), randn(out)]


def decoder_reference(inputs, grad_output, box_warp=1.2, axes=(0, 1, 0, 2, 2, 0)):
    """Output and gradients of every tensor of ``inputs``, from the readable specification in float64."""
    from dreamportrait.ops.sample_and_decode import reference as decoder_spec

    leaves = [t.detach().double().requires_grad_() for t in inputs]
    out = decoder_spec(leaves[0], leaves[1], box_warp, list(axes), *leaves[2:])
    return out, torch.autograd.grad(out, leaves, grad_output.double(), allow_unused=True)


def run_decoder_schedule(inputs, grad_output, gpu, box_warp=1.2, axes=(0, 1, 0, 2, 2, 0)):
    forward, backward = decoder_ops()
    planes, points, *weights = inputs
    out = forward(planes, points, box_warp, list(axes), *weights, *gpu)
    grads = backward(grad_output, planes, points, box_warp, list(axes), *weights, True, True, *gpu)
    return out, grads


DECODER_NAMES = ["planes", "points", "weight1", "bias1", "weight2", "bias2"]


@pytest.mark.parametrize("case", DECODER_CASES)
def test_decoder_schedule_matches_reference(case):
    inputs = decoder_inputs(case)
    batch, count, out_width = case[0], case[1], case[4]
    grad_output = torch.randn(batch, count, out_width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, grads = run_decoder_schedule(inputs, grad_output, case[5:])
    expected, expected_grads = decoder_reference(inputs, grad_output)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, msg="output")
    for name, ours, ref in zip(DECODER_NAMES, grads, expected_grads):
        ref = torch.zeros_like(ours) if ref is None else ref
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-11, msg=lambda m: f"grad {name}: {m}")


def test_decoder_schedule_weight_gradients_do_not_depend_on_the_blocks():
    """Per-block partial sums, added in block order: the same for any block count up to rounding, and
    bit for bit the same on a repeat with the same blocks (the plane gradient, added atomically, only
    up to rounding)."""
    case = (2, 150, 32, 64, 33)
    inputs = decoder_inputs(case)
    grad_output = torch.randn(2, 150, 33, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    runs = [run_decoder_schedule(inputs, grad_output, (H100_SHARED, sms, 64))[1] for sms in (1, 2, 1)]
    for name, one, two, again in zip(DECODER_NAMES, *runs):
        torch.testing.assert_close(two, one, rtol=1e-12, atol=1e-12, msg=name)
        if name == "planes":
            torch.testing.assert_close(again, one, rtol=1e-12, atol=1e-12, msg=name)
        else:
            assert torch.equal(again, one), f"{name}: a repeat with the same blocks differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decoder_schedule_in_the_kernels_types(dtype):
    """The kernels' dtypes (float32 sums): against the float64 specification of the rounded inputs."""
    case = (2, 70, 32, 64, 33)
    inputs = decoder_inputs(case, dtype)
    grad_output = torch.randn(2, 70, 33, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, grads = run_decoder_schedule(inputs, grad_output, (H100_SHARED, 2, 64))
    expected, expected_grads = decoder_reference(inputs, grad_output)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close_scaled(out.double(), expected, tol, "output")
    for name, ours, ref in zip(DECODER_NAMES, grads, expected_grads):
        # position gradients amplify rounding (a difference of corner values over a texel)
        assert_close_scaled(ours.double(), ref, 10 * tol if name == "points" else tol, name)


def test_decoder_schedule_propagates_nan_to_its_point_only():
    """A NaN coordinate makes its point's output and position gradient NaN where the specification
    does (and reaches every weight1 gradient); the other points are untouched."""
    case = (1, 40, 32, 64, 33)
    inputs = decoder_inputs(case)
    inputs[1][0, 7] = torch.tensor([0.1, float("nan"), -0.2], dtype=torch.float64)
    inputs[1][0, 30] = torch.tensor([0.9, 0.9, 0.9], dtype=torch.float64)  # outside the box: features 0
    grad_output = torch.ones(1, 40, 33, dtype=torch.float64)
    out, grads = run_decoder_schedule(inputs, grad_output, (H100_SHARED, 1, 64))
    others = torch.arange(40) != 7
    assert torch.isnan(out[0, 7]).all() and not torch.isnan(out[0, others]).any()
    assert torch.isnan(grads[1][0, 7]).all() and not torch.isnan(grads[1][0, others]).any()
    assert torch.isnan(grads[2]).all(), "a NaN feature reaches every weight1 gradient"
    expected, expected_grads = decoder_reference(inputs, grad_output)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(grads[1], expected_grads[1], rtol=1e-10, atol=1e-11, equal_nan=True)


def test_decoder_emulation_checks_its_gpu():
    forward, backward = decoder_ops()
    planes, points, *weights = decoder_inputs((1, 5, 32, 64, 33))
    with pytest.raises(RuntimeError, match="threads must be a multiple of 32"):
        forward(planes, points, 1.2, [0, 1, 0, 2, 2, 0], *weights, H100_SHARED, 1, 48)
    with pytest.raises(RuntimeError, match="sms"):
        forward(planes, points, 1.2, [0, 1, 0, 2, 2, 0], *weights, H100_SHARED, 0, 64)
    # EG3D's decoder backward in float64 does not fit a block of 48 KiB, even in tiles of 4.
    needed = backward_shared_bytes(32, 64, 33, 4)
    with pytest.raises(RuntimeError, match=f"needs {needed} bytes of shared memory per block, more than this GPU's 49152"):
        backward(torch.ones(1, 5, 33, dtype=torch.float64), planes, points, 1.2, [0, 1, 0, 2, 2, 0], *weights, True,
                 True, 48 * 1024, 1, 64)
