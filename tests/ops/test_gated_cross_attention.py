"""gated_cross_attention: every backend against the explicit-softmax reference, all gradients,
gates, masks, packed-projection views, compile, registrations and argument errors."""

import math

import pytest
import torch
from support import assert_close_scaled, assert_compiled_matches_eager, gate_gradient_magnitudes, poisoned_allocations, kernel_backends, requires_cuda, requires_extension, requires_triton

from dreamportrait import _extension
from dreamportrait.ops import gated_cross_attention, reference

SHAPES = [  # (B, H, Lq, Lk, D)
    pytest.param((1, 1, 1, 1, 16), id="Lq1-Lk1-D16"),
    pytest.param((2, 3, 45, 77, 40), id="Lk77-D40"),
    pytest.param((1, 2, 33, 200, 64), id="Lk200-D64"),
    pytest.param((2, 2, 20, 9, 128), id="D128"),
    # More query rows than the CPU backward gathers (64) and its forward's work items hold (1024),
    # with ragged tails; a head dim and key count that are not whole vectors.
    pytest.param((1, 2, 150, 21, 24), id="Lq150-Lk21-D24"),
    pytest.param((1, 1, 1100, 5, 8), id="Lq1100-Lk5-D8"),
]


def make_inputs(shape, dtype=torch.float64, device="cpu", per_head_gate=True):
    batch, heads, queries, keys, dim = shape
    q = torch.randn(batch, heads, queries, dim, dtype=dtype, device=device)
    k = torch.randn(batch, heads, keys, dim, dtype=dtype, device=device)
    v = torch.randn(batch, heads, keys, dim, dtype=dtype, device=device)
    gate = torch.randn(heads if per_head_gate else (), dtype=dtype, device=device)
    return q, k, v, gate


def random_mask(batch, keys, device="cpu"):
    mask = torch.rand(batch, keys, device=device) > 0.3
    mask[0] = False  # every key of the first batch element masked
    return mask


def run(fn, inputs, grad_out=None):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    return out, torch.autograd.grad(out, inputs, grad_out), grad_out



def check_against_reference(backend, inputs, mask, rtol, scale=None):
    out, grads, grad_out = run(lambda *x: gated_cross_attention(*x, key_padding_mask=mask, scale=scale, backend=backend), inputs)
    dim = inputs[0].shape[-1]
    ref_scale = 1 / math.sqrt(dim) if scale is None else scale
    heads = inputs[0].shape[1]
    ref_out, ref_grads, _ = run(
        lambda q, k, v, g: reference.gated_cross_attention(q, k, v, g.expand(heads) if g.dim() == 0 else g, mask, ref_scale),
        inputs, grad_out,
    )
    assert not out.isnan().any()
    assert_close_scaled(out, ref_out, rtol, "out")
    gate = inputs[3]
    head_sizes = gate_gradient_magnitudes(*inputs[:3], gate.expand(heads) if gate.dim() == 0 else gate, mask, ref_scale,
                                          grad_out)
    # A scalar gate's gradient sums over every head, so its terms' sizes add up over them.
    magnitudes = {"gate": (head_sizes.norm() if gate.dim() == 0 else head_sizes.max()).item()}
    for name, ours, ref in zip(("q", "k", "v", "gate"), grads, ref_grads):
        assert ours.shape == ref.shape
        assert_close_scaled(ours, ref, rtol, f"grad {name}", magnitudes.get(name, 0.0))
    return out, grads


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_matches_reference_float64(backend, device, shape, masked):
    if backend == "triton" and device == "cuda":
        pytest.skip("float64 Triton is covered on CPU")
    inputs = make_inputs(shape, torch.float64, device)
    check_against_reference(backend, inputs, random_mask(shape[0], shape[3], device) if masked else None, rtol=1e-10)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_matches_reference_float32_scalar_gate(backend, device):
    inputs = make_inputs((2, 4, 300, 77, 64), torch.float32, device, per_head_gate=False)
    out, grads = check_against_reference(backend, inputs, random_mask(2, 77, device), rtol=1e-4, scale=0.3)
    assert grads[3].shape == ()


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_closed_gate_outputs_zero_and_still_learns(backend, device):
    q, k, v, gate = make_inputs((2, 2, 10, 77, 16), torch.float64, device)
    gate = torch.zeros_like(gate)
    out, grads = check_against_reference(backend, (q, k, v, gate), None, rtol=1e-10)
    assert not out.any(), "tanh(0) = 0: the output must be exactly zero"
    assert grads[3].abs().min() > 0, "the gate's gradient must flow while it is closed"
    assert not grads[0].any() and not grads[1].any()


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_fully_masked_rows_give_zeros(backend, device):
    q, k, v, gate = make_inputs((2, 2, 8, 12, 16), torch.float64, device)
    mask = torch.zeros(2, 12, dtype=torch.bool, device=device)
    mask[1, :5] = True
    out, grads = check_against_reference(backend, (q, k, v, gate), mask, rtol=1e-10)
    assert not out[0].any() and out[1].abs().sum() > 0
    assert not grads[0][0].any() and not grads[1][0].any() and not grads[2][0].any()
    assert not grads[1][1, :, 5:].any(), "masked keys get no gradient"


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_padded_keys_do_not_matter(backend, device):
    q, k, v, gate = make_inputs((2, 2, 8, 20, 16), torch.float64, device)
    mask = torch.rand(2, 20, device=device) > 0.4
    out = gated_cross_attention(q, k, v, gate, mask, backend=backend)
    k2, v2 = k.clone(), v.clone()
    k2[~mask[:, None, :, None].expand_as(k)] = 1e3
    v2[~mask[:, None, :, None].expand_as(v)] = -7.0
    torch.testing.assert_close(gated_cross_attention(q, k2, v2, gate, mask, backend=backend), out)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_views_of_a_packed_projection(backend, device):
    batch, heads, queries, keys, dim = 2, 4, 30, 77, 16
    tokens = torch.randn(batch, queries, heads * dim, dtype=torch.float64, device=device)
    text = torch.randn(batch, keys, 2 * heads * dim, dtype=torch.float64, device=device)  # packed k and v
    q = tokens.view(batch, queries, heads, dim).transpose(1, 2)
    k, v = (t.reshape(batch, keys, heads, dim).transpose(1, 2) for t in text.split(heads * dim, dim=-1))
    assert not any(x.is_contiguous() for x in (q, k, v))
    check_against_reference(backend, (q, k, v, torch.randn(heads, dtype=torch.float64, device=device)), None, rtol=1e-10)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_empty_queries(backend, device):
    q, k, v, gate = make_inputs((2, 2, 0, 5, 16), torch.float64, device)
    out, grads, _ = run(lambda *x: gated_cross_attention(*x, backend=backend), (q, k, v, gate))
    assert out.shape == q.shape and not grads[1].any() and not grads[3].any()


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_every_output_element_is_written(backend, device):
    inputs = make_inputs((2, 3, 40, 77, 24), torch.float32, device)
    mask = random_mask(2, 77, device)
    with poisoned_allocations(device):
        out, grads, _ = run(lambda *x: gated_cross_attention(*x, key_padding_mask=mask, backend=backend), inputs)
        assert not out.isnan().any() and not any(g.isnan().any() for g in grads)


@requires_extension
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_gradcheck_cpu_kernel(masked):
    inputs = [x.requires_grad_() for x in make_inputs((2, 2, 5, 7, 8))]
    mask = random_mask(2, 7) if masked else None
    assert torch.autograd.gradcheck(lambda *x: gated_cross_attention(*x, key_padding_mask=mask, backend="cpu"), inputs)


@requires_triton
def test_gradcheck_triton_kernel():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = [x.requires_grad_() for x in make_inputs((1, 2, 4, 5, 16), torch.float64, device)]
    mask = random_mask(1, 5, device)
    mask[0, :2] = True
    assert torch.autograd.gradcheck(lambda *x: gated_cross_attention(*x, key_padding_mask=mask, backend="triton"), inputs)


@pytest.mark.parametrize("backend,device", [p for p in kernel_backends() if p.id != "triton"])
def test_torch_compile_fullgraph(backend, device):
    inputs = make_inputs((2, 2, 16, 12, 16), torch.float32, device)
    mask = random_mask(2, 12, device)

    def loss(q, k, v, gate):
        return gated_cross_attention(q * 2, k, v, gate, mask, backend=backend).square().sum()

    assert_compiled_matches_eager(loss, inputs)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda(backend, dtype):
    inputs = [x.to(dtype) for x in make_inputs((2, 8, 1024, 77, 64), torch.float32, "cuda")]
    mask = random_mask(2, 77, "cuda")
    out, grads, grad_out = run(lambda *x: gated_cross_attention(*x, key_padding_mask=mask, backend=backend), inputs)
    ref_out, ref_grads, _ = run(
        lambda q, k, v, g: reference.gated_cross_attention(q, k, v, g, mask, 1 / 8), [x.float() for x in inputs], grad_out.float()
    )
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    for ours, ref in zip((out, *grads), (ref_out, *ref_grads)):
        assert ours.dtype == dtype
        assert_close_scaled(ours.float(), ref, tol, "half")


@requires_cuda
@pytest.mark.parametrize("dim", [128, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_cuda_head_dims_up_to_256(dim, dtype):
    """Tiles sized by the GPU's shared memory: several key tiles (Lk 150) at D up to 256, the head
    dim split into column chunks where its tiles do not fit (float64; float32's backward on sm_86)."""
    inputs = [x.to(dtype) for x in make_inputs((2, 2, 100, 150, dim), torch.float32, "cuda")]
    mask = random_mask(2, 150, "cuda")
    out, grads, grad_out = run(lambda *x: gated_cross_attention(*x, key_padding_mask=mask, backend="cuda"), inputs)
    ref_out, ref_grads, _ = run(
        lambda q, k, v, g: reference.gated_cross_attention(q, k, v, g, mask, 1 / math.sqrt(dim)),
        [x.double() for x in inputs], grad_out.double(),
    )
    tol = {torch.float16: 2e-2, torch.float32: 1e-4, torch.float64: 1e-10}[dtype]
    for ours, ref in zip((out, *grads), (ref_out, *ref_grads)):
        assert_close_scaled(ours.double(), ref, tol, f"D {dim}")


@requires_cuda
def test_cuda_float32_on_tf32_tensor_cores_when_torch_allows_it(monkeypatch):
    inputs = make_inputs((2, 4, 300, 77, 64), torch.float32, "cuda")
    mask = random_mask(2, 77, "cuda")
    exact, exact_grads, grad_out = run(lambda *x: gated_cross_attention(*x, key_padding_mask=mask, backend="cuda"), inputs)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    tf32, tf32_grads, _ = run(lambda *x: gated_cross_attention(*x, key_padding_mask=mask, backend="cuda"), inputs, grad_out)
    assert not torch.equal(tf32, exact), "allow_tf32 must switch the products to TF32"
    for ours, ref in zip((tf32, *tf32_grads), (exact, *exact_grads)):
        assert_close_scaled(ours, ref, 5e-3, "tf32")


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_opcheck_registrations(backend, device, masked):
    _extension.status()
    name = "gated_cross_attention_triton" if backend == "triton" else "gated_cross_attention"
    q, k, v, gate = (x.requires_grad_() for x in make_inputs((2, 2, 6, 5, 16), torch.float64, device))
    mask = random_mask(2, 5, device) if masked else None
    torch.library.opcheck(getattr(torch.ops.dreamportrait, name), (q, k, v, gate, mask, 0.25))


# --- bad input ----------------------------------------------------------------------------------


def _bad_calls():
    q, k, v, gate = make_inputs((2, 3, 5, 7, 16), torch.float32)
    return [
        ("q-rank", dict(q=q[0]), ValueError, r"q must have shape \(B, H, Lq, D\)"),
        ("k-heads", dict(k=k[:, :2]), ValueError, r"k must have shape \(2, 3, Lk, 16\)"),
        ("k-dim", dict(k=k[..., :8]), ValueError, "k must have shape"),
        ("v-shape", dict(v=v[:, :, :6]), ValueError, "v must have the shape of k"),
        ("gate-shape", dict(gate=gate[:2]), ValueError, r"gate must have shape \(\) or \(3,\)"),
        ("q-type", dict(q=q.numpy()), TypeError, "q must be a Tensor"),
        ("q-int", dict(q=q.long()), TypeError, "q must be a floating-point"),
        ("k-dtype", dict(k=k.double()), TypeError, "k dtype torch.float64 does not match q"),
        ("v-device", dict(v=v.to("meta")), ValueError, "v is on meta"),
        ("mask-dtype", dict(key_padding_mask=torch.ones(2, 7)), TypeError, "key_padding_mask must be a bool"),
        ("mask-shape", dict(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError,
         r"key_padding_mask must have shape \(2, 7\)"),
        ("scale-nan", dict(scale=math.nan), ValueError, "scale must be finite"),
        ("scale-str", dict(scale="1"), TypeError, "scale must be a real number"),
        ("backend", dict(backend="cuda"), ValueError, "backend='cuda' needs CUDA tensors"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, overrides, error, message = case
    q, k, v, gate = make_inputs((2, 3, 5, 7, 16), torch.float32)
    arguments = dict(q=q, k=k, v=v, gate=gate)
    arguments.update(overrides)
    with pytest.raises(error, match=message):
        gated_cross_attention(**arguments)


@requires_extension
def test_compiled_operator_checks_its_arguments():
    _extension.status()
    q, k, v, gate = make_inputs((2, 3, 5, 7, 16), torch.float32)
    with pytest.raises(RuntimeError, match="gate must have shape"):
        torch.ops.dreamportrait.gated_cross_attention(q, k, v, gate[:2], None, 0.25)
    with pytest.raises(RuntimeError, match="key_padding_mask must be a bool"):
        torch.ops.dreamportrait.gated_cross_attention(q, k, v, gate, torch.ones(2, 7), 0.25)
