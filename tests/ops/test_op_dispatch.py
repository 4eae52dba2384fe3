"""The ops' Python layer without running a kernel: which implementation each backend calls and with
which arguments (recording stand-ins for the reference, the C++ and the Triton operators), what comes
back, every argument check's message word for word, and small cases worked by hand."""

import importlib
import math
import os

import pytest
import torch

from dreamportrait.ops import _backend, composite_rays, gated_cross_attention, reference, sample_and_decode
from dreamportrait.ops import triplane_sample
from dreamportrait.ops._checks import backend_dtypes, require_backend_dtype, require_like, require_real
from dreamportrait.ops.triplane_sample import EG3D_AXES, ORTHOGONAL_AXES
from support import requires_extension

# The module (the package's `sample_and_decode` is the function).
sample_and_decode_module = importlib.import_module("dreamportrait.ops.sample_and_decode")


class Recorder:
    """Stands in for an implementation: keeps its arguments, returns ``result``."""

    def __init__(self, result):
        self.result, self.calls = result, []

    def __call__(self, *args):
        self.calls.append(args)
        return self.result


def same(a, b):
    return a is b or (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                      and torch.equal(a, b))


def assert_args(call, expected):
    assert len(call) == len(expected)
    for got, want in zip(call, expected):
        assert same(got, want) if isinstance(want, torch.Tensor) else got == want and type(got) is type(want), \
            (got, want)


@pytest.fixture
def triton_here(monkeypatch):
    """The triton backend selectable on CPU tensors (the interpreter), whatever is installed."""
    monkeypatch.setattr(_backend, "triton_importable", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# --- composite_rays ---------------------------------------------------------------------------------------

def rays(leading=(2, 3), samples=4, channels=5):
    generator = torch.Generator().manual_seed(0)
    densities = torch.rand(*leading, samples, generator=generator)
    colors = torch.rand(*leading, samples, channels, generator=generator)
    depths = torch.rand(*leading, samples, generator=generator)
    deltas = torch.rand(*leading, samples, generator=generator)
    return densities, colors, depths, deltas


def flat_outputs(rays_count=6, samples=4, channels=5):
    """Distinct numbers in the flat layout every implementation returns."""
    return (torch.arange(rays_count * channels, dtype=torch.float32).reshape(rays_count, channels),
            torch.arange(rays_count, dtype=torch.float32) + 100, torch.arange(rays_count, dtype=torch.float32) + 200,
            torch.arange(rays_count * samples, dtype=torch.float32).reshape(rays_count, samples) + 300)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_composite_rays_flattens_the_rays_for_its_backend_and_restores_their_shape(backend, monkeypatch, triton_here):
    densities, colors, depths, deltas = rays()
    recorder = Recorder(flat_outputs())
    if backend == "reference":
        monkeypatch.setattr(reference, "composite_rays", recorder)
    else:
        name = "composite_rays" if backend == "cpu" else "composite_rays_triton"
        monkeypatch.setattr(torch.ops.dreamportrait, name, recorder)
        monkeypatch.setattr(_backend._extension, "status", lambda: type("S", (), {"available": True, "has_cuda": False})())
    with torch.no_grad():
        rgb, depth, opacity, weights = composite_rays(densities, colors, depths, deltas, 0.25, backend=backend)
    assert len(recorder.calls) == 1
    assert_args(recorder.calls[0], (densities.reshape(6, 4), colors.reshape(6, 4, 5), depths.reshape(6, 4),
                                    deltas.reshape(6, 4), 0.25))
    expected = flat_outputs()
    assert torch.equal(rgb, expected[0].reshape(2, 3, 5)) and torch.equal(depth, expected[1].reshape(2, 3))
    assert torch.equal(opacity, expected[2].reshape(2, 3)) and torch.equal(weights, expected[3].reshape(2, 3, 4))
    # No threshold: 0.0 is passed on.
    composite_rays(densities, colors, depths, deltas, backend=backend)
    assert recorder.calls[1][4] == 0.0 and type(recorder.calls[1][4]) is float


def test_one_ray_by_hand():
    # tau = (ln 2, ln 2): T = (1, 1/2), alpha = (1/2, 1/2), w = (1/2, 1/4).
    densities = torch.tensor([math.log(2), 2 * math.log(2)], dtype=torch.float64)
    deltas = torch.tensor([1.0, 0.5], dtype=torch.float64)
    colors = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    depths = torch.tensor([2.0, 3.0], dtype=torch.float64)
    for backend in ("reference", "cpu"):
        if backend == "cpu" and not _backend._extension.status().available:
            continue
        rgb, depth, opacity, weights = composite_rays(densities, colors, depths, deltas, backend=backend)
        assert rgb.shape == (2,) and depth.shape == () and opacity.shape == () and weights.shape == (2,)
        torch.testing.assert_close(weights, torch.tensor([0.5, 0.25], dtype=torch.float64))
        torch.testing.assert_close(rgb, torch.tensor([0.5, 1.0], dtype=torch.float64))
        torch.testing.assert_close(depth, torch.tensor(0.5 * 2 + 0.25 * 3, dtype=torch.float64))
        torch.testing.assert_close(opacity, torch.tensor(0.75, dtype=torch.float64))
        # A threshold of 0.6 stops the ray after the first sample (T = 1/2 < 0.6 at the second).
        with torch.no_grad():
            _, _, opacity, weights = composite_rays(densities, colors, depths, deltas, 0.6, backend=backend)
        torch.testing.assert_close(weights, torch.tensor([0.5, 0.0], dtype=torch.float64))
        # At exactly 1/2 the second sample is not below the threshold: it keeps its weight.
        with torch.no_grad():
            _, _, _, weights = composite_rays(densities, colors, depths, deltas, 0.5, backend=backend)
        torch.testing.assert_close(weights, torch.tensor([0.5, 0.25], dtype=torch.float64))


def composite_call(**overrides):
    densities, colors, depths, deltas = rays()
    arguments = dict(densities=densities, colors=colors, depths=depths, deltas=deltas)
    arguments.update(overrides)
    return composite_rays(**arguments)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(densities=[1.0]), TypeError, "composite_rays: densities must be a Tensor, got list"),
    (dict(colors=(1,)), TypeError, "composite_rays: colors must be a Tensor, got tuple"),
    (dict(depths=None), TypeError, "composite_rays: depths must be a Tensor, got NoneType"),
    (dict(deltas=2.0), TypeError, "composite_rays: deltas must be a Tensor, got float"),
    (dict(densities=torch.tensor(1.0)), ValueError, r"composite_rays: densities must have shape \(..., S\), got a scalar"),
    (dict(colors=torch.rand(2, 3, 4)), ValueError, r"composite_rays: colors must have shape \(2, 3, 4, 'C'\), got \(2, 3, 4\)"),
    (dict(depths=torch.rand(2, 3, 5)), ValueError, r"composite_rays: depths must have the shape of densities \(2, 3, 4\), got \(2, 3, 5\)"),
    (dict(deltas=torch.rand(2, 4)), ValueError, r"composite_rays: deltas must have the shape of densities \(2, 3, 4\), got \(2, 4\)"),
    (dict(densities=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError,
     "composite_rays: densities must be a floating-point tensor, got torch.int64"),
    (dict(depths=torch.rand(2, 3, 4, dtype=torch.float64)), TypeError,
     "composite_rays: depths dtype torch.float64 does not match densities dtype torch.float32"),
    (dict(deltas=torch.rand(2, 3, 4, dtype=torch.float64)), TypeError,
     "composite_rays: deltas dtype torch.float64 does not match densities dtype torch.float32"),
    (dict(deltas=torch.rand(2, 3, 4, device="meta")), ValueError, "composite_rays: deltas is on meta but densities is on cpu"),
    (dict(transmittance_threshold=0.0), ValueError, r"composite_rays: transmittance_threshold must be in \(0, 1\), got 0.0"),
    (dict(transmittance_threshold=1), ValueError, r"composite_rays: transmittance_threshold must be in \(0, 1\), got 1.0"),
    (dict(transmittance_threshold=True), TypeError, "composite_rays: transmittance_threshold must be a real number, got bool"),
    (dict(transmittance_threshold=math.inf), ValueError, "composite_rays: transmittance_threshold must be finite, got inf"),
    (dict(densities=torch.rand(2, 3, 4).requires_grad_(), transmittance_threshold=0.5), ValueError,
     r"^composite_rays: transmittance_threshold is for inference \(it has no gradient\); call under torch.no_grad\(\) "
     r"or drop it$"),
    (dict(backend="gpu"), ValueError, "composite_rays: backend must be one of reference, cpu, cuda, triton; got 'gpu'"),
    (dict(colors=torch.rand(2, 3, 4, 5, dtype=torch.float16), densities=torch.rand(2, 3, 4, dtype=torch.float16),
          depths=torch.rand(2, 3, 4, dtype=torch.float16), deltas=torch.rand(2, 3, 4, dtype=torch.float16),
          backend="cpu"), TypeError,
     "composite_rays: the cpu backend takes densities of dtype float32, float64; got torch.float16"),
])
def test_composite_rays_argument_errors_word_for_word(overrides, error, message):
    with pytest.raises(error, match=message if message.startswith("^") else "^" + message):
        composite_call(**overrides)


def test_a_threshold_with_gradients_enabled_but_none_needed_is_accepted():
    assert torch.is_grad_enabled()
    densities, colors, depths, deltas = rays(leading=(3,))
    out = composite_rays(densities, colors, depths, deltas, 0.5, backend="reference")
    assert out[0].shape == (3, 5)


# --- gated_cross_attention ------------------------------------------------------------------------------

def attention_inputs(batch=2, heads=3, queries=5, keys=7, dim=4, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, queries, dim, generator=generator, dtype=dtype)
    k = torch.randn(batch, heads, keys, dim, generator=generator, dtype=dtype)
    v = torch.randn(batch, heads, keys, dim, generator=generator, dtype=dtype)
    gate = torch.randn(heads, generator=generator, dtype=dtype)
    return q, k, v, gate


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("scalar_gate", [False, True])
def test_gated_cross_attention_passes_its_arguments_to_its_backend(backend, scalar_gate, monkeypatch, triton_here):
    q, k, v, gate = attention_inputs()
    gate = gate[0] if scalar_gate else gate
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    out, lse = torch.full(q.shape, 7.0), torch.full(q.shape[:3], -1.0)
    if backend == "reference":
        recorder = Recorder(out)
        monkeypatch.setattr(reference, "gated_cross_attention", recorder)
    else:
        recorder = Recorder((out, lse))
        name = "gated_cross_attention" if backend == "cpu" else "gated_cross_attention_triton"
        monkeypatch.setattr(torch.ops.dreamportrait, name, recorder)
        monkeypatch.setattr(_backend._extension, "status", lambda: type("S", (), {"available": True, "has_cuda": False})())
    result = gated_cross_attention(q, k, v, gate, mask, 0.3, backend=backend)
    assert result is out
    expanded = gate.expand(3) if scalar_gate else gate
    assert_args(recorder.calls[0], (q, k, v, expanded, mask, 0.3))
    # Default scale 1/sqrt(D) = 1/2, no mask.
    gated_cross_attention(q, k, v, gate, backend=backend)
    assert recorder.calls[1][4] is None and recorder.calls[1][5] == 0.5


def test_attention_by_hand_and_without_head_dimensions():
    # One query, two keys with scores (0, ln 3) at scale 1: probabilities (1/4, 3/4).
    q = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[0.0, 5.0], [math.log(3), 0.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[4.0, 0.0], [0.0, 8.0]]]], dtype=torch.float64)
    gate = torch.tensor(math.atanh(0.5), dtype=torch.float64)
    out = gated_cross_attention(q, k, v, gate, scale=1.0, backend="reference")
    torch.testing.assert_close(out, torch.tensor([[[[0.5, 3.0]]]], dtype=torch.float64))
    # D = 0: nothing to scale by (no division by zero), an empty output.
    q, k, v, gate = attention_inputs(dim=0)
    assert gated_cross_attention(q, k, v, gate, backend="reference").shape == (2, 3, 5, 0)


def attention_call(**overrides):
    q, k, v, gate = attention_inputs()
    arguments = dict(q=q, k=k, v=v, gate=gate)
    arguments.update(overrides)
    return gated_cross_attention(**arguments)


@pytest.mark.parametrize("overrides, error, message", [
    (dict(q=[1.0]), TypeError, "gated_cross_attention: q must be a Tensor, got list"),
    (dict(k=None), TypeError, "gated_cross_attention: k must be a Tensor, got NoneType"),
    (dict(v=1), TypeError, "gated_cross_attention: v must be a Tensor, got int"),
    (dict(gate=0.5), TypeError, "gated_cross_attention: gate must be a Tensor, got float"),
    (dict(k=torch.randn(2, 3, 7)), ValueError, r"gated_cross_attention: k must have shape \(2, 3, Lk, 4\), got \(2, 3, 7\)"),
    (dict(k=torch.randn(1, 3, 7, 4)), ValueError, r"gated_cross_attention: k must have shape \(2, 3, Lk, 4\), got \(1, 3, 7, 4\)"),
    (dict(q=torch.ones(2, 3, 5, 4, dtype=torch.int32), k=torch.ones(2, 3, 7, 4, dtype=torch.int32),
          v=torch.ones(2, 3, 7, 4, dtype=torch.int32), gate=torch.ones(3, dtype=torch.int32)), TypeError,
     "gated_cross_attention: q must be a floating-point tensor, got torch.int32"),
    (dict(gate=torch.ones(3, dtype=torch.float64)), TypeError,
     "gated_cross_attention: gate dtype torch.float64 does not match q dtype torch.float32"),
    (dict(key_padding_mask=[True] * 7), TypeError, "gated_cross_attention: key_padding_mask must be a Tensor, got list"),
    (dict(key_padding_mask=torch.ones(2, 7, dtype=torch.bool, device="meta")), ValueError,
     "gated_cross_attention: key_padding_mask is on meta but q is on cpu"),
    (dict(scale=math.nan), ValueError, "gated_cross_attention: scale must be finite, got nan"),
    (dict(scale=None, backend="triton-ish"), ValueError, "gated_cross_attention: backend must be one of"),
    (dict(q=torch.randn(2, 3, 5, 4, dtype=torch.float16), k=torch.randn(2, 3, 7, 4, dtype=torch.float16),
          v=torch.randn(2, 3, 7, 4, dtype=torch.float16), gate=torch.randn(3, dtype=torch.float16), backend="cpu"),
     TypeError, "gated_cross_attention: the cpu backend takes q of dtype float32, float64; got torch.float16"),
])
def test_gated_cross_attention_argument_errors_word_for_word(overrides, error, message):
    with pytest.raises(error, match="^" + message):
        attention_call(**overrides)


# --- triplane_sample ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_triplane_sample_passes_its_arguments_to_its_backend(backend, monkeypatch, triton_here):
    planes, points = torch.randn(2, 3, 4, 5, 6), torch.rand(2, 7, 3)
    out = torch.full((2, 7, 4), 3.0)
    recorder = Recorder(out)
    if backend == "reference":
        monkeypatch.setattr(reference, "triplane_sample", recorder)
    else:
        name = "triplane_sample" if backend == "cpu" else "triplane_sample_triton"
        monkeypatch.setattr(torch.ops.dreamportrait, name, recorder)
        monkeypatch.setattr(_backend._extension, "status", lambda: type("S", (), {"available": True, "has_cuda": False})())
    assert triplane_sample(planes, points, 2, (0, 1, 0, 2, 1, 2), "sum", backend=backend) is out
    assert_args(recorder.calls[0], (planes, points, 2.0, [0, 1, 0, 2, 1, 2], "sum"))
    triplane_sample(planes, points, backend=backend)
    assert_args(recorder.calls[1], (planes, points, 1.0, list(EG3D_AXES), "mean"))


@pytest.mark.parametrize("overrides, error, message", [
    (dict(planes=None), TypeError, "triplane_sample: planes must be a Tensor, got NoneType"),
    (dict(points=[0.0]), TypeError, "triplane_sample: points must be a Tensor, got list"),
    (dict(planes=torch.randn(2, 3, 4, 5)), ValueError, r"triplane_sample: planes must have shape \(B, 3, C, H, W\), got \(2, 3, 4, 5\)"),
    (dict(planes=torch.randn(2, 2, 4, 5, 6)), ValueError, r"triplane_sample: planes must have shape \(B, 3, C, H, W\), got \(2, 2, 4, 5, 6\)"),
    (dict(points=torch.rand(2, 7)), ValueError, r"triplane_sample: points must have shape \(B, N, 3\), got \(2, 7\)"),
    (dict(points=torch.rand(2, 7, 2)), ValueError, r"triplane_sample: points must have shape \(B, N, 3\), got \(2, 7, 2\)"),
    (dict(points=torch.rand(3, 7, 3)), ValueError, "triplane_sample: points has batch size 3 but planes has 2"),
    (dict(box_warp=0), ValueError, "triplane_sample: box_warp must be positive, got 0"),
    (dict(axes=(0, 1, 0, 2, 1, 2, 0)), ValueError,
     r"triplane_sample: axes must be a sequence of six ints \(u0, v0, u1, v1, u2, v2\), got \(0, 1, 0, 2, 1, 2, 0\)"),
    (dict(axes={0, 1, 2, 3, 4, 5}), ValueError, "triplane_sample: axes must be a sequence of six ints"),
    (dict(axes=b"\x00\x01\x00\x02\x01\x02"), ValueError, "triplane_sample: axes must be a sequence of six ints"),
    (dict(axes=(0, 1, 0, 2, 1, -1)), ValueError, r"triplane_sample: axes entries must be 0, 1 or 2, got \(0, 1, 0, 2, 1, -1\)"),
    (dict(axes=(0, 1, 0, 2, 1, 3)), ValueError, r"triplane_sample: axes entries must be 0, 1 or 2, got \(0, 1, 0, 2, 1, 3\)"),
    (dict(axes=(0, 1, 0, True, 1, 2)), ValueError, "triplane_sample: axes entries must be 0, 1 or 2"),
    (dict(axes=(1, 1, 0, 2, 1, 2)), ValueError,
     r"triplane_sample: axes gives plane 0 the same axis 1 for u and v, got \(1, 1, 0, 2, 1, 2\)"),
    (dict(axes=(0, 1, 0, 2, 2, 2)), ValueError, "triplane_sample: axes gives plane 2 the same axis 2 for u and v"),
    (dict(reduce="max"), ValueError, r"triplane_sample: reduce must be one of \('mean', 'sum', 'none'\), got 'max'"),
    (dict(planes=torch.ones(2, 3, 4, 5, 6, dtype=torch.int64), points=torch.ones(2, 7, 3, dtype=torch.int64)), TypeError,
     "triplane_sample: planes must be a floating-point tensor, got torch.int64"),
    (dict(points=torch.rand(2, 7, 3, dtype=torch.float64)), TypeError,
     "triplane_sample: points dtype torch.float64 does not match planes dtype torch.float32"),
    (dict(box_warp="1"), TypeError, "triplane_sample: box_warp must be a real number, got str"),
    (dict(backend="fast"), ValueError, "triplane_sample: backend must be one of reference, cpu, cuda, triton; got 'fast'"),
    (dict(planes=torch.randn(2, 3, 4, 5, 6, dtype=torch.float16), points=torch.rand(2, 7, 3, dtype=torch.float16),
          backend="cpu"), TypeError, "triplane_sample: the cpu backend takes planes of dtype float32, float64; got torch.float16"),
])
def test_triplane_sample_argument_errors_word_for_word(overrides, error, message):
    arguments = dict(planes=torch.randn(2, 3, 4, 5, 6), points=torch.rand(2, 7, 3))
    arguments.update(overrides)
    with pytest.raises(error, match="^" + message):
        triplane_sample(**arguments)


def test_axes_of_any_integer_type_and_both_published_layouts_are_accepted():
    import numpy as np

    planes, points = torch.randn(1, 3, 2, 4, 4), torch.rand(1, 5, 3) - 0.5
    expected = triplane_sample(planes, points, axes=[0, 1, 0, 2, 1, 2], backend="reference")
    got = triplane_sample(planes, points, axes=tuple(np.array([0, 1, 0, 2, 1, 2])), backend="reference")
    torch.testing.assert_close(got, expected)
    for axes in (EG3D_AXES, ORTHOGONAL_AXES):
        assert triplane_sample(planes, points, axes=axes, reduce="none", backend="reference").shape == (1, 5, 3, 2)


def test_a_point_at_a_texel_centre_samples_that_texel_on_each_plane():
    # 4x4 planes over the box [-1/2, 1/2]: texel centres at -3/8, -1/8, 1/8, 3/8 (align_corners=False).
    planes = torch.arange(3 * 16, dtype=torch.float64).reshape(1, 3, 1, 4, 4)
    point = torch.tensor([[[3 / 8, -1 / 8, 1 / 8]]], dtype=torch.float64)  # x in column 3, y in row 1, z in 2
    columns = {0: 3, 1: 1, 2: 2}
    for axes in (EG3D_AXES, ORTHOGONAL_AXES):
        got = triplane_sample(planes, point, 1.0, axes, "none", backend="reference")[0, 0, :, 0]
        expected = [planes[0, p, 0, columns[axes[2 * p + 1]], columns[axes[2 * p]]] for p in range(3)]
        torch.testing.assert_close(got, torch.stack(expected))
    # box_warp 2 halves the coordinates: (3/16, ...) lands where (3/8, ...) did.
    got = triplane_sample(planes, point * 2, 2.0, EG3D_AXES, "sum", backend="reference")
    torch.testing.assert_close(got, triplane_sample(planes, point, 1.0, EG3D_AXES, "sum", backend="reference"))
    # Outside the box: zeros.
    assert triplane_sample(planes, point + 2, 1.0, EG3D_AXES, backend="reference").abs().max() == 0


# --- sample_and_decode ------------------------------------------------------------------------------------------

def decoder_inputs(channels=16, hidden=16, out=3):
    generator = torch.Generator().manual_seed(2)
    planes = torch.randn(2, 3, channels, 4, 4, generator=generator)
    points = torch.rand(2, 5, 3, generator=generator) - 0.5
    weight1, bias1 = torch.randn(hidden, channels, generator=generator), torch.randn(hidden, generator=generator)
    weight2, bias2 = torch.randn(out, hidden, generator=generator), torch.randn(out, generator=generator)
    return planes, points, weight1, bias1, weight2, bias2


def test_decode_is_the_softplus_mlp_with_the_widened_sigmoid_by_hand():
    features = torch.tensor([[[1.0, -2.0]]], dtype=torch.float64)
    weight1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [30.0, 0.0]], dtype=torch.float64)
    bias1 = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    weight2 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.01]], dtype=torch.float64)
    bias2 = torch.tensor([0.5, 0.0, 0.0], dtype=torch.float64)
    out = sample_and_decode_module.decode(features, weight1, bias1, weight2, bias2)
    hidden = [math.log1p(math.e), math.log1p(math.exp(-2.0)), 30.0]  # softplus, linear above 20
    raw = [hidden[0] + hidden[1] + 0.5, 0.0, 0.3]
    expected = [raw[0], 0.5 * 1.002 - 0.001, 1.002 / (1 + math.exp(-0.3)) - 0.001]
    torch.testing.assert_close(out, torch.tensor([[expected]], dtype=torch.float64))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_sample_and_decode_passes_its_arguments_to_its_backend(backend, monkeypatch):
    inputs = decoder_inputs()
    out = torch.full((2, 5, 3), 4.0)
    recorder = Recorder(out)
    if backend == "reference":
        monkeypatch.setattr(sample_and_decode_module, "reference", recorder)
    else:
        monkeypatch.setattr(sample_and_decode_module, "_register_compiled", lambda: None)
        monkeypatch.setattr(torch.ops.dreamportrait, "sample_and_decode", recorder)
        monkeypatch.setattr(_backend._extension, "status", lambda: type("S", (), {"available": True, "has_cuda": False})())
    planes, points, w1, b1, w2, b2 = inputs
    assert sample_and_decode(planes, points, 2, w1, b1, w2, b2, ORTHOGONAL_AXES, backend=backend) is out
    assert_args(recorder.calls[0], (planes, points, 2.0, list(ORTHOGONAL_AXES), w1, b1, w2, b2))


@pytest.mark.parametrize("sizes, fused", [((16, 16, 2), True), ((128, 128, 128), True), ((32, 64, 33), True),
                                          ((8, 16, 3), False), ((16, 256, 3), False), ((24, 16, 3), False),
                                          ((16, 48, 3), False), ((16, 16, 129), False)])
def test_the_triton_backend_fuses_power_of_two_sizes_and_composes_the_others(sizes, fused, monkeypatch, triton_here):
    planes, points, w1, b1, w2, b2 = decoder_inputs(*sizes)
    fused_op = Recorder(torch.full((2, 5, sizes[2]), 4.0))
    monkeypatch.setattr(torch.ops.dreamportrait, "sample_and_decode_triton", fused_op)
    features = torch.randn(2, 5, sizes[0])
    sampled = []

    def sampler(*args, **kwargs):
        sampled.append((args, kwargs))
        return features

    monkeypatch.setattr(sample_and_decode_module, "triplane_sample", sampler)
    out = sample_and_decode(planes, points, 0.5, w1, b1, w2, b2, backend="triton")
    if fused:
        assert out is fused_op.result and not sampled
        assert_args(fused_op.calls[0], (planes, points, 0.5, list(EG3D_AXES), w1, b1, w2, b2))
    else:
        assert not fused_op.calls
        assert_args(sampled[0][0], (planes, points, 0.5, list(EG3D_AXES), "mean"))
        assert sampled[0][1] == {"backend": "triton"}
        torch.testing.assert_close(out, sample_and_decode_module.decode(features, w1, b1, w2, b2))


def test_the_reference_is_sampling_then_decoding():
    planes, points, w1, b1, w2, b2 = (t.double() for t in decoder_inputs())
    features = reference.triplane_sample(planes, points, 1.0, EG3D_AXES, "mean")
    expected = sample_and_decode_module.decode(features, w1, b1, w2, b2)
    torch.testing.assert_close(sample_and_decode(planes, points, 1.0, w1, b1, w2, b2, backend="reference"), expected)


@pytest.mark.parametrize("position, value, error, message", [
    (2, None, TypeError, "sample_and_decode: weight1 must be a Tensor, got NoneType"),
    (3, [0.0], TypeError, "sample_and_decode: bias1 must be a Tensor, got list"),
    (4, torch.randn(3, 16, dtype=torch.float64), TypeError,
     "sample_and_decode: weight2 dtype torch.float64 does not match planes dtype torch.float32"),
    (5, torch.randn(3, device="meta"), ValueError, "sample_and_decode: bias2 is on meta but planes is on cpu"),
    (2, torch.randn(16 * 16), ValueError, r"sample_and_decode: weight1 must have 2 dimensions, got shape \(256,\)"),
    (3, torch.randn(16, 1), ValueError, r"sample_and_decode: bias1 must have 1 dimension, got shape \(16, 1\)"),
    (2, torch.randn(16, 15), ValueError,
     r"sample_and_decode: weight1 must have shape \(K, 16\) for planes of 16 channels, got \(16, 15\)"),
    (3, torch.randn(15), ValueError, r"sample_and_decode: bias1 must have shape \(16,\) to match weight1, got \(15,\)"),
    (4, torch.randn(1, 16), ValueError, r"sample_and_decode: weight2 must have shape \(O, 16\) with O >= 2, got \(1, 16\)"),
    (4, torch.randn(3, 15), ValueError, r"sample_and_decode: weight2 must have shape \(O, 16\) with O >= 2, got \(3, 15\)"),
    (5, torch.randn(4), ValueError, r"sample_and_decode: bias2 must have shape \(3,\) to match weight2, got \(4,\)"),
])
def test_sample_and_decode_weight_errors_word_for_word(position, value, error, message):
    inputs = list(decoder_inputs())
    inputs[position] = value
    with pytest.raises(error, match="^" + message):
        sample_and_decode(inputs[0], inputs[1], 1.0, *inputs[2:])


def test_a_decoder_without_hidden_units_is_refused_and_two_outputs_are_enough():
    planes, points, w1, b1, w2, b2 = decoder_inputs()
    with pytest.raises(ValueError, match=r"^sample_and_decode: bias1 must have shape \(0,\) to match weight1"):
        sample_and_decode(planes, points, 1.0, w1[:0], b1[:0], w2[:, :0], b2)
    out = sample_and_decode(planes, points, 1.0, w1, b1, w2[:2], b2[:2], backend="reference")
    assert out.shape == (2, 5, 2)


def test_sample_and_decode_refuses_a_dtype_its_backend_does_not_take():
    inputs = [t.half() for t in decoder_inputs()]
    with pytest.raises(TypeError, match="^sample_and_decode: the cpu backend takes planes of dtype float32, float64; "
                                        "got torch.float16"):
        sample_and_decode(inputs[0], inputs[1], 1.0, *inputs[2:], backend="cpu")
    with pytest.raises(ValueError, match="^sample_and_decode: backend must be one of"):
        sample_and_decode(*decoder_inputs()[:2], 1.0, *decoder_inputs()[2:], backend="fast")


@requires_extension
def test_the_compiled_decoder_gets_its_python_registrations_on_first_use(monkeypatch):
    registered = []
    monkeypatch.setattr(sample_and_decode_module, "_register", lambda *names: registered.append(names))
    inputs = decoder_inputs()
    sample_and_decode(inputs[0], inputs[1], 1.0, *inputs[2:], backend="cpu")
    assert registered == [("dreamportrait::sample_and_decode", "dreamportrait::sample_and_decode_backward")]


# --- backend choice and the shared checks -----------------------------------------------------------------------

def test_the_triton_backend_needs_the_package_and_on_cpu_the_interpreter(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    assert _backend.triton_importable() is (real_find_spec("triton") is not None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    assert _backend.triton_importable() is False
    with pytest.raises(RuntimeError, match="^op: backend='triton' but the triton package is not installed$"):
        _backend.select_backend("op", "cpu", "triton")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "triton" else None)
    assert _backend.triton_importable() is True
    for value, interpreted in (("1", True), ("0", False), ("", False), ("true", False), ("11", False)):
        monkeypatch.setenv("TRITON_INTERPRET", value)
        assert _backend.triton_interpreted() is interpreted
        if interpreted:
            assert _backend.select_backend("op", "cpu", "triton") == "triton"
        else:
            with pytest.raises(ValueError, match=r"^op: backend='triton' runs on CPU tensors only under TRITON_INTERPRET=1$"):
                _backend.select_backend("op", "cpu", "triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert _backend.triton_interpreted() is False
    assert _backend.select_backend("op", "cuda", "triton") == "triton"


def test_the_shared_checks_messages():
    assert backend_dtypes("cpu") == (torch.float32, torch.float64)
    assert backend_dtypes("triton") == (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    require_backend_dtype("op", "reference", "x", torch.zeros(1, dtype=torch.int8))  # the reference takes any
    with pytest.raises(TypeError, match=r"^op: the cuda backend takes x of dtype float16, bfloat16, float32, float64; "
                                        r"got torch.int64$"):
        require_backend_dtype("op", "cuda", "x", torch.zeros(1, dtype=torch.int64))
    assert require_real("op", "r", 3) == 3.0 and type(require_real("op", "r", 3)) is float
    with pytest.raises(ValueError, match="^op: r must be finite, got -inf$"):
        require_real("op", "r", -math.inf)
    with pytest.raises(TypeError, match="^op: r must be a real number, got complex$"):
        require_real("op", "r", 1j)
    require_like("op", "a", torch.zeros(1), "b", torch.ones(2))


# --- the decoder operators' registrations ------------------------------------------------------------------------

BACKWARD_CALLS = []


def _decode_forward(planes: torch.Tensor, points: torch.Tensor, box_warp: float, axes: list[int],
                    weight1: torch.Tensor, bias1: torch.Tensor, weight2: torch.Tensor, bias2: torch.Tensor
                    ) -> torch.Tensor:
    return sample_and_decode_module.reference(planes, points, box_warp, axes, weight1, bias1, weight2, bias2)


def _decode_backward(grad_output: torch.Tensor, planes: torch.Tensor, points: torch.Tensor, box_warp: float,
                     axes: list[int], weight1: torch.Tensor, bias1: torch.Tensor, weight2: torch.Tensor,
                     bias2: torch.Tensor, needs_planes: bool, needs_points: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's gradients, in the layout the compiled backward operators return."""
    BACKWARD_CALLS.append((needs_planes, needs_points, grad_output.is_contiguous(), box_warp, axes))

    def function(*tensors):
        return sample_and_decode_module.reference(tensors[0], tensors[1], box_warp, axes, *tensors[2:])

    _, vjp = torch.func.vjp(function, planes, points, weight1, bias1, weight2, bias2)
    grads = vjp(grad_output)
    return (grads[0] if needs_planes else planes.new_empty(0), grads[1] if needs_points else points.new_empty(0),
            *grads[2:])


def fresh_decoder_operators():
    """A new operator pair computing the reference (new names in every process and call: nothing of an
    earlier registration carries over, in a forked process either)."""
    name = f"decode_{os.getpid()}_{len(_OPERATORS)}"
    _OPERATORS.append(name)
    torch.library.custom_op(f"dreamportrait_test::{name}", _decode_forward, mutates_args=())
    torch.library.custom_op(f"dreamportrait_test::{name}_backward", _decode_backward, mutates_args=())
    return f"dreamportrait_test::{name}", f"dreamportrait_test::{name}_backward", name


_OPERATORS = []


def test_register_gives_a_decoder_operator_pair_autograd_and_fake_kernels():
    forward, backward_name, op_name = fresh_decoder_operators()
    sample_and_decode_module._register(forward, backward_name)
    sample_and_decode_module._register(forward, backward_name)  # once
    assert forward in sample_and_decode_module._registered
    op = getattr(torch.ops.dreamportrait_test, op_name)
    inputs = [t.double().requires_grad_() for t in decoder_inputs()]
    weights = torch.randn(2, 5, 3, dtype=torch.float64)
    expected_out = sample_and_decode_module.reference(inputs[0], inputs[1], 1.5, [0, 1, 0, 2, 1, 2], *inputs[2:])
    expected = torch.autograd.grad((expected_out * weights).sum(), inputs, retain_graph=True)
    BACKWARD_CALLS.clear()
    out = op(inputs[0], inputs[1], 1.5, [0, 1, 0, 2, 1, 2], *inputs[2:])
    torch.testing.assert_close(out, expected_out)
    got = torch.autograd.grad((out * weights).sum(), inputs)
    for name, g, e in zip(["planes", "points", "weight1", "bias1", "weight2", "bias2"], got, expected):
        torch.testing.assert_close(g, e, msg=lambda m: f"{name}: {m}")
    assert BACKWARD_CALLS == [(True, True, True, 1.5, [0, 1, 0, 2, 1, 2])]
    # Only what is asked for: the planes' and points' gradients are neither computed nor returned.
    for wanted in ([2, 3, 4, 5], [0, 2], [1]):
        BACKWARD_CALLS.clear()
        fresh = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
        out = op(fresh[0], fresh[1], 1.5, [0, 1, 0, 2, 1, 2], *fresh[2:])
        # A gradient that is not contiguous reaches the backward operator contiguous.
        grad_output = torch.randn(3, 5, 2, dtype=torch.float64).permute(2, 1, 0)
        grads = torch.autograd.grad(out, [fresh[i] for i in wanted], grad_output)
        expected = torch.autograd.grad(expected_out, [inputs[i] for i in wanted], grad_output, retain_graph=True)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e)
        assert BACKWARD_CALLS == [(0 in wanted, 1 in wanted, True, 1.5, [0, 1, 0, 2, 1, 2])]
    # Fake kernels: shapes on meta tensors, and the arguments checked there too.
    meta = [t.detach().to("meta") for t in inputs]
    assert op(meta[0], meta[1], 1.5, [0, 1, 0, 2, 1, 2], *meta[2:]).shape == (2, 5, 3)
    backward = getattr(torch.ops.dreamportrait_test, op_name + "_backward")
    grad_meta = torch.empty(2, 5, 3, device="meta", dtype=torch.float64)
    shapes = [tuple(t.shape) for t in backward(grad_meta, meta[0], meta[1], 1.5, [0, 1, 0, 2, 1, 2], *meta[2:], True, False)]
    assert shapes == [(2, 3, 16, 4, 4), (0,), (16, 16), (16,), (3, 16), (3,)]
    shapes = [tuple(t.shape) for t in backward(grad_meta, meta[0], meta[1], 1.5, [0, 1, 0, 2, 1, 2], *meta[2:], False, True)]
    assert shapes[:2] == [(0,), (2, 5, 3)]
    with pytest.raises(Exception, match="weight2"):
        op(meta[0], meta[1], 1.5, [0, 1, 0, 2, 1, 2], meta[2], meta[3], meta[4][:, :3], meta[5])
    with pytest.raises(Exception, match="grad_output"):
        backward(grad_meta[:, :2], meta[0], meta[1], 1.5, [0, 1, 0, 2, 1, 2], *meta[2:], True, True)


def test_the_smallest_box_is_where_two_over_it_is_the_largest_float():
    planes, points = torch.randn(1, 3, 2, 4, 4), torch.zeros(1, 2, 3)
    largest = torch.finfo(torch.float32).max
    assert 2.0 / (2.0 / largest) == largest  # exactly at the bound: still finite
    for box_warp in (2.0 / largest, 1.2 * 2.0 / largest):
        assert torch.isfinite(triplane_sample(planes, points, box_warp, backend="reference")).all()
    with pytest.raises(ValueError, match="box_warp must be at least"):
        triplane_sample(planes, points, 0.9 * 2.0 / largest, backend="reference")


def test_a_decoder_with_one_hidden_unit():
    planes, points, w1, b1, w2, b2 = decoder_inputs()
    out = sample_and_decode(planes, points, 1.0, w1[:1], b1[:1], w2[:, :1], b2, backend="reference")
    features = reference.triplane_sample(planes, points, 1.0, EG3D_AXES, "mean")
    torch.testing.assert_close(out, sample_and_decode_module.decode(features, w1[:1], b1[:1], w2[:, :1], b2))
