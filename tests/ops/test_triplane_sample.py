"""triplane_sample: every backend against the PyTorch reference, gradients, layouts, edge shapes,
compile, and argument errors."""

import math
import warnings

import pytest
import torch
from support import assert_close_scaled, assert_compiled_matches_eager, poisoned_allocations, kernel_backends, requires_cuda, requires_extension, requires_triton

import dreamportrait.ops as ops
from dreamportrait import _extension
from dreamportrait.ops import EG3D_AXES, ORTHOGONAL_AXES, _backend, reference, triplane_sample
from dreamportrait.ops.triplane_sample import REDUCTIONS

AXES = [pytest.param(EG3D_AXES, id="eg3d"), pytest.param(ORTHOGONAL_AXES, id="orthogonal")]
SHAPES = [  # (B, C, H, W, N)
    pytest.param((1, 1, 4, 4, 1), id="C1-N1"),
    pytest.param((2, 96, 8, 12, 333), id="C96-HneW"),
    pytest.param((3, 5, 16, 7, 1000), id="B3-N1000"),
    pytest.param((1, 17, 1, 1, 9), id="1x1-planes"),
]


def make_inputs(shape, dtype=torch.float64, device="cpu", box_warp=1.0, spread=0.6):
    """Planes and points; coordinates span +-spread*box_warp, so some points lie outside the box."""
    batch, channels, height, width, count = shape
    planes = torch.randn(batch, 3, channels, height, width, dtype=dtype, device=device)
    points = (torch.rand(batch, count, 3, dtype=dtype, device=device) * 2 - 1) * spread * box_warp
    return planes, points


def make_gradcheck_inputs(shape, device="cpu", box_warp=1.0, margin=1e-3):
    """:func:`make_inputs` in float64 with every coordinate at least ``margin`` texels from the
    lines where bilinear sampling's derivative jumps (the texel centres, on planes of either
    side), so that gradcheck's finite differences never straddle a kink."""
    planes, points = make_inputs(shape, torch.float64, device, box_warp)
    height, width = shape[2:4]

    def near_a_kink(x):  # align_corners=False: texel coordinate (g + 1) * size / 2 - 1/2
        texels = [(x * 2 / box_warp + 1) * size / 2 - 0.5 for size in (height, width)]
        return torch.stack([(t - t.round()).abs() < margin for t in texels]).any(0)

    while (near := near_a_kink(points)).any():
        redrawn = make_inputs(shape, torch.float64, device, box_warp)[1]
        points = torch.where(near, redrawn, points)
    return planes, points


def run(fn, planes, points, grad_seed_output=None):
    """Output and gradients of ``fn`` for a fixed random upstream gradient."""
    planes = planes.detach().requires_grad_()
    points = points.detach().requires_grad_()
    out = fn(planes, points)
    grad_output = torch.randn_like(out) if grad_seed_output is None else grad_seed_output
    grad_planes, grad_points = torch.autograd.grad(out, (planes, points), grad_output)
    return out, grad_planes, grad_points, grad_output



def check_against_reference(backend, planes, points, box_warp, axes, reduce, rtol):
    def ours(pl, pt):
        return triplane_sample(pl, pt, box_warp, axes, reduce, backend=backend)

    def spec(pl, pt):
        return reference.triplane_sample(pl, pt, box_warp, axes, reduce)

    out, grad_planes, grad_points, grad_output = run(ours, planes, points)
    ref_out, ref_planes, ref_points, _ = run(spec, planes, points, grad_output)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert grad_planes.shape == planes.shape and grad_points.shape == points.shape
    assert_close_scaled(out, ref_out, rtol)
    assert_close_scaled(grad_planes, ref_planes, rtol)
    assert_close_scaled(grad_points, ref_points, rtol)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_matches_reference_float64(backend, device, shape, axes, reduce):
    if device == "cuda" and backend == "triton":
        pytest.skip("float64 Triton is covered on CPU; on GPU float32 runs below")
    box_warp = 0.5 + torch.rand(()).item() * 2
    planes, points = make_inputs(shape, torch.float64, device, box_warp)
    check_against_reference(backend, planes, points, box_warp, axes, reduce, rtol=1e-10)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_matches_reference_float32(backend, device, reduce):
    planes, points = make_inputs((2, 32, 32, 24, 2000), torch.float32, device)
    check_against_reference(backend, planes, points, 1.0, EG3D_AXES, reduce, rtol=2e-5)


@requires_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cuda(backend, dtype):
    planes, points = make_inputs((2, 32, 64, 64, 4096), torch.float32, "cuda")
    out, grad_planes, grad_points, grad_output = run(
        lambda pl, pt: triplane_sample(pl, pt, backend=backend), planes.to(dtype), points.to(dtype)
    )
    # The reference on the same rounded inputs, in float32.
    ref_out, ref_planes, ref_points, _ = run(
        lambda pl, pt: reference.triplane_sample(pl, pt, 1.0, EG3D_AXES, "mean"),
        planes.to(dtype).float(), points.to(dtype).float(), grad_output.float(),
    )
    assert out.dtype == grad_planes.dtype == grad_points.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    assert_close_scaled(out.float(), ref_out, tol)
    assert_close_scaled(grad_planes.float(), ref_planes, tol)
    assert_close_scaled(grad_points.float(), ref_points, 10 * tol)  # position gradients amplify rounding


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_colliding_points_accumulate(backend, device):
    """Many points in the same few texels: the plane-gradient scatter must add every one."""
    planes, _ = make_inputs((2, 20, 6, 6, 1), torch.float64, device)
    points = (0.05 + 0.01 * torch.rand(2, 3000, 3, dtype=torch.float64, device=device))
    check_against_reference(backend, planes, points, 1.0, ORTHOGONAL_AXES, "sum", rtol=1e-10)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_non_contiguous_inputs(backend, device):
    big = torch.randn(2, 3, 24, 9, 20, dtype=torch.float64, device=device)
    planes = big[:, :, ::2, :, 3:14].transpose(3, 4)  # (2, 3, 12, 11, 9): sliced and transposed
    points = (torch.rand(2, 3, 500, dtype=torch.float64, device=device) * 1.2 - 0.6).transpose(1, 2)
    assert not planes.is_contiguous() and not points.is_contiguous()
    check_against_reference(backend, planes, points, 1.0, EG3D_AXES, "mean", rtol=1e-10)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_channel_innermost_planes(backend, device):
    planes, points = make_inputs((2, 8, 10, 12, 300), torch.float64, device)
    planes = planes.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    check_against_reference(backend, planes, points, 1.0, ORTHOGONAL_AXES, "none", rtol=1e-10)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("shape", [(2, 4, 5, 6, 0), (2, 0, 5, 6, 7), (0, 4, 5, 6, 7)], ids=["N0", "C0", "B0"])
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_empty_inputs(backend, device, shape, reduce):
    planes, points = make_inputs(shape, torch.float64, device)
    out, grad_planes, grad_points, _ = run(
        lambda pl, pt: triplane_sample(pl, pt, reduce=reduce, backend=backend), planes, points
    )
    batch, channels, _, _, count = shape
    assert out.shape == ((batch, count, 3, channels) if reduce == "none" else (batch, count, channels))
    assert grad_planes.shape == planes.shape and grad_points.shape == points.shape
    assert not grad_planes.any() and not grad_points.any()


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference"), *kernel_backends()])
@pytest.mark.parametrize("shape", [(2, 4, 0, 6, 7), (2, 4, 5, 0, 7), (1, 2, 0, 0, 3)], ids=["H0", "W0", "H0-W0"])
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_empty_planes_sample_zeros(backend, device, shape, reduce):
    # Every point lies outside a plane without texels; the reference, the specification, must
    # accept what the kernels accept.
    planes, points = make_inputs(shape, torch.float64, device)
    out, grad_planes, grad_points, _ = run(
        lambda pl, pt: triplane_sample(pl, pt, reduce=reduce, backend=backend), planes, points
    )
    batch, channels, _, _, count = shape
    assert out.shape == ((batch, count, 3, channels) if reduce == "none" else (batch, count, channels))
    assert not out.any() and not grad_points.any() and grad_planes.shape == planes.shape


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_every_output_element_is_written(backend, device):
    """Uninitialised memory is filled with NaN here, so an element a kernel skips shows up."""
    planes, points = make_inputs((2, 7, 6, 5, 400), torch.float32, device, spread=1.5)  # most points outside
    with poisoned_allocations(device):
        for reduce in REDUCTIONS:
            out, grad_planes, grad_points, _ = run(
                lambda pl, pt: triplane_sample(pl, pt, reduce=reduce, backend=backend), planes, points
            )
            assert not out.isnan().any() and not grad_planes.isnan().any() and not grad_points.isnan().any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in Triton's interpreter
@pytest.mark.parametrize("backend,device", kernel_backends())
def test_non_finite_and_far_points(backend, device):
    """NaN/inf points sample NaN (as grid_sample does); huge finite ones sample zeros."""
    planes, points = make_inputs((1, 4, 5, 5, 6), torch.float64, device)
    points[0, 0, 0] = math.nan
    points[0, 1, 1] = math.inf
    points[0, 2] = 1e30
    points[0, 3] = -1e30
    out = triplane_sample(planes, points, reduce="none", backend=backend)
    expected = reference.triplane_sample(planes, points, 1.0, EG3D_AXES, "none")
    assert torch.equal(out.isnan(), expected.isnan())
    assert out[0, 0].isnan().all()  # x is used by every EG3D plane
    assert out[0, 1, 0].isnan().all() and not out[0, 1, 1:].isnan().any()  # y only by the first
    assert not out[0, 2:].isnan().any() and not out[0, 2:4].any()
    torch.testing.assert_close(out.nan_to_num(), expected.nan_to_num())


@requires_extension
@pytest.mark.parametrize("axes", AXES)
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_gradcheck_cpu_kernel(axes, reduce):
    planes, points = make_gradcheck_inputs((2, 3, 5, 6, 12), box_warp=1.3)
    assert torch.autograd.gradcheck(
        lambda pl, pt: triplane_sample(pl, pt, 1.3, axes, reduce, backend="cpu"),
        (planes.requires_grad_(), points.requires_grad_()),
    )


@requires_triton
def test_gradcheck_triton_kernel():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    planes, points = make_gradcheck_inputs((1, 3, 4, 5, 6), device)
    assert torch.autograd.gradcheck(
        lambda pl, pt: triplane_sample(pl, pt, 1.0, ORTHOGONAL_AXES, "none", backend="triton"),
        (planes.requires_grad_(), points.requires_grad_()),
    )


@pytest.mark.parametrize("backend,device", [p for p in kernel_backends() if p.id != "triton"])
def test_torch_compile_fullgraph(backend, device):
    planes, points = make_inputs((2, 6, 8, 8, 100), torch.float32, device)

    def loss(pl, pt):
        features = triplane_sample(pl * 2, pt, 1.0, ORTHOGONAL_AXES, "mean", backend=backend)
        return features.square().sum()

    assert_compiled_matches_eager(loss, (planes, points))


# --- backend selection --------------------------------------------------------------------------


@requires_extension
def test_default_backend_runs_the_kernel_and_env_forces_reference(monkeypatch):
    planes, points = make_inputs((1, 4, 5, 5, 10))
    calls = []
    real = reference.triplane_sample
    monkeypatch.setattr(reference, "triplane_sample", lambda *a: calls.append(a) or real(*a))
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    kernel_out = triplane_sample(planes, points)
    assert calls == []
    monkeypatch.setenv(ops.BACKEND_ENV, "reference")
    reference_out = triplane_sample(planes, points)
    assert len(calls) == 1
    torch.testing.assert_close(kernel_out, reference_out)


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_extension, "_status", _extension.ExtensionStatus(False, "unavailable", (), "simulated"))
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.delenv(ops.BACKEND_ENV, raising=False)
    planes, points = make_inputs((1, 4, 5, 5, 10))
    with pytest.warns(RuntimeWarning, match="reference ops because the compiled extension"):
        out = triplane_sample(planes, points)
    torch.testing.assert_close(out, reference.triplane_sample(planes, points, 1.0, EG3D_AXES, "mean"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triplane_sample(planes, points)
    with pytest.raises(RuntimeError, match="backend='cpu' is unavailable"):
        triplane_sample(planes, points, backend="cpu")


# --- bad input ----------------------------------------------------------------------------------


def _bad_calls():
    p = torch.randn(2, 3, 4, 5, 6)
    x = torch.rand(2, 7, 3)
    return [
        ("planes-rank", dict(planes=p[0]), ValueError, "planes must have shape"),
        ("planes-3", dict(planes=p[:, :2]), ValueError, "planes must have shape"),
        ("planes-type", dict(planes=p.numpy()), TypeError, "planes must be a Tensor"),
        ("planes-int", dict(planes=p.long(), points=x.long()), TypeError, "planes must be a floating"),
        ("points-rank", dict(points=x[0]), ValueError, "points must have shape"),
        ("points-last", dict(points=x[..., :2]), ValueError, "points must have shape"),
        ("batch", dict(points=x[:1]), ValueError, "points has batch size 1 but planes has 2"),
        ("dtype", dict(points=x.double()), TypeError, "points dtype torch.float64 does not match"),
        ("device", dict(points=x.to("meta")), ValueError, "points is on meta"),
        ("box-nan", dict(box_warp=math.nan), ValueError, "box_warp must be finite"),
        ("box-inf", dict(box_warp=math.inf), ValueError, "box_warp must be finite"),
        ("box-zero", dict(box_warp=0.0), ValueError, "box_warp must be positive"),
        ("box-negative", dict(box_warp=-1), ValueError, "box_warp must be positive"),
        ("box-str", dict(box_warp="1"), TypeError, "box_warp must be a real number"),
        ("box-bool", dict(box_warp=True), TypeError, "box_warp must be a real number"),
        ("box-subnormal", dict(box_warp=1e-320, planes=p.double(), points=x.double()), ValueError,
         r"box_warp must be at least 1.11e-308 for float64 points \(2 / box_warp finite\), got 1e-320"),
        ("box-tiny-float32", dict(box_warp=1e-39), ValueError, "box_warp must be at least 5.88e-39 for float32"),
        ("box-tiny-half", dict(box_warp=1e-5, planes=p.half(), points=x.half(), backend="reference"), ValueError,
         "box_warp must be at least 3.05e-05 for float16"),
        ("axes-len", dict(axes=(0, 1, 0, 2, 1)), ValueError, "axes must be a sequence of six ints"),
        ("axes-range", dict(axes=(0, 1, 0, 3, 1, 2)), ValueError, "axes entries must be 0, 1 or 2"),
        ("axes-float", dict(axes=(0, 1, 0, 2.0, 1, 2)), ValueError, "axes entries must be 0, 1 or 2"),
        ("axes-same", dict(axes=(0, 1, 2, 2, 1, 2)), ValueError, "axes gives plane 1 the same axis 2"),
        ("axes-str", dict(axes="010212"), ValueError, "axes must be a sequence"),
        ("reduce", dict(reduce="max"), ValueError, "reduce must be one of"),
        ("backend-name", dict(backend="gpu"), ValueError, "backend must be one of"),
        ("backend-device", dict(backend="cuda"), ValueError, "backend='cuda' needs CUDA tensors"),
        ("cpu-half", dict(planes=p.half(), points=x.half(), backend="cpu"), TypeError,
         "the cpu backend takes planes of dtype float32, float64"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, overrides, error, message = case
    arguments = dict(planes=torch.randn(2, 3, 4, 5, 6), points=torch.rand(2, 7, 3))
    arguments.update(overrides)
    with pytest.raises(error, match=message):
        triplane_sample(**arguments)


def test_bad_environment_backend_names_the_variable(monkeypatch):
    monkeypatch.setenv(ops.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="DREAMPORTRAIT_BACKEND must be one of"):
        triplane_sample(torch.randn(1, 3, 2, 4, 4), torch.rand(1, 5, 3))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_backend, "triton_interpreted", lambda: False)
    monkeypatch.setattr(_backend, "triton_importable", lambda: True)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triplane_sample(torch.randn(1, 3, 2, 4, 4), torch.rand(1, 5, 3), backend="triton")


@requires_extension
@pytest.mark.parametrize(
    "planes_shape,points_shape,axes,reduce,message",
    [
        ((2, 3, 4, 5), (2, 7, 3), [0, 1, 0, 2, 2, 0], "mean", "planes must have shape"),
        ((2, 3, 4, 5, 6), (1, 7, 3), [0, 1, 0, 2, 2, 0], "mean", "points batch"),
        ((2, 3, 4, 5, 6), (2, 7, 3), [0, 1, 0, 2, 2, 5], "mean", "axes must be in"),
        ((2, 3, 4, 5, 6), (2, 7, 3), [0, 1, 0, 2, 2, 0], "max", "reduce must be"),
    ],
)
def test_compiled_operator_checks_its_arguments(planes_shape, points_shape, axes, reduce, message):
    """Direct torch.ops calls bypass the Python checks; the C++ ones keep them memory-safe."""
    _extension.status()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.dreamportrait.triplane_sample(torch.randn(planes_shape), torch.rand(points_shape), 1.0, axes, reduce)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("reduce", REDUCTIONS)
def test_opcheck_registrations(backend, device, reduce):
    """Schema, fake kernels (shapes and strides), autograd registration and dispatch agree."""
    planes, points = make_inputs((2, 5, 6, 7, 30), torch.float64, device)
    name = "triplane_sample_triton" if backend == "triton" else "triplane_sample"
    _extension.status()
    op = getattr(torch.ops.dreamportrait, name)
    args = (planes.requires_grad_(), points.requires_grad_(), 1.0, list(ORTHOGONAL_AXES), reduce)
    torch.library.opcheck(op, args)
