"""EG3D integration: the drop-ins against EG3D's own functions, and install() on an unmodified
EG3D renderer (EG3D's code re-stated in tests/eg3d_restated) against the same renderer without it."""

import math

import pytest
import torch

import dreamportrait.integrations._eg3d_fused as fused_module
import dreamportrait.integrations.eg3d as integration
from dreamportrait.models import camera_labels, fov_to_intrinsics, sample_orbit_poses
from eg3d_restated import eg3d_code

OPTIONS = dict(ray_start=2.25, ray_end=3.3, depth_resolution=10, depth_resolution_importance=10, box_warp=1.0,
               clamp_mode="softplus", disparity_space_sampling=False, white_back=False, density_noise=0)


@pytest.fixture
def eg3d():
    with eg3d_code() as modules:
        yield modules
    integration.uninstall()


def rotation(angle, axis):
    c, s = math.cos(angle), math.sin(angle)
    i, j = [k for k in range(3) if k != axis]
    matrix = torch.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def sampling_inputs(planes=3, batch=2, count=200):
    features = torch.randn(batch, planes, 8, 12, 10, requires_grad=True)
    coordinates = (torch.rand(batch, count, 3) * 1.2 - 0.6).requires_grad_()
    return features, coordinates


def value_and_grads(function, *inputs):
    out = function(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).sum(), [x for x in inputs if x.requires_grad])
    return out, grads


def test_sample_from_planes_matches_eg3d_on_its_planes(eg3d):
    axes = eg3d.renderer.generate_planes()
    assert integration.kernel_axes(axes) == (0, 1, 0, 2, 2, 0)
    features, coordinates = sampling_inputs()
    expected = value_and_grads(lambda f, c: eg3d.renderer.sample_from_planes(axes, f, c, box_warp=1.3),
                               features, coordinates)
    actual = value_and_grads(lambda f, c: integration.sample_from_planes(axes, f, c, box_warp=1.3),
                             features, coordinates)
    assert actual[0].shape == (2, 3, 200, 8) and actual[0].is_contiguous()
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(actual[1], expected[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["rotated", "scaled", "four-planes", "swapped", "nearest"])
def test_sample_from_planes_other_axes_give_eg3d_results(eg3d, case):
    axes = eg3d.renderer.generate_planes()
    mode = "bilinear"
    if case == "rotated":
        axes = torch.stack([rotation(0.3, 2) @ plane for plane in axes])
    elif case == "scaled":
        axes = axes * 2
    elif case == "four-planes":
        axes = torch.cat([axes, rotation(0.7, 0)[None]])
    elif case == "swapped":  # axis-aligned but not EG3D's: (y, x), (z, y), (x, z); runs on the kernel
        axes = torch.tensor([[[0, 1, 0], [1, 0, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]],
                             [[1, 0, 0], [0, 0, 1], [0, 1, 0]]], dtype=torch.float32)
        assert integration.kernel_axes(axes) == (1, 0, 2, 1, 0, 2)
    else:
        mode = "nearest"
    features, coordinates = sampling_inputs(planes=axes.shape[0])
    expected = value_and_grads(lambda f, c: eg3d.renderer.sample_from_planes(axes, f, c, mode=mode, box_warp=1.3),
                               features, coordinates)
    actual = value_and_grads(lambda f, c: integration.sample_from_planes(axes, f, c, mode=mode, box_warp=1.3),
                             features, coordinates)
    exact = case != "swapped"  # EG3D's own computation, operation for operation
    tolerance = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(actual[0], expected[0], **tolerance)
    for got, want in zip(actual[1], expected[1]):
        torch.testing.assert_close(got, want, **tolerance)


def test_sample_from_planes_rejects_bad_arguments(eg3d):
    axes = eg3d.renderer.generate_planes()
    features, coordinates = sampling_inputs()
    with pytest.raises(ValueError, match="box_warp"):
        integration.sample_from_planes(axes, features, coordinates, box_warp=0)
    with pytest.raises(TypeError, match="box_warp"):
        integration.sample_from_planes(axes, features, coordinates)  # EG3D's default None
    with pytest.raises(ValueError, match="padding_mode"):
        integration.sample_from_planes(axes, features, coordinates, padding_mode="border", box_warp=1)
    with pytest.raises(ValueError, match="plane_axes"):
        integration.sample_from_planes(axes[:2], features, coordinates, box_warp=1)
    with pytest.raises(ValueError, match="coordinates"):
        integration.sample_from_planes(axes, features, coordinates[:1], box_warp=1)
    with pytest.raises(TypeError, match="plane_features"):
        integration.sample_from_planes(axes, features.tolist(), coordinates, box_warp=1)


@pytest.mark.parametrize("white_back", [False, True])
def test_ray_marcher_matches_eg3d(eg3d, white_back):
    colors = torch.rand(2, 30, 12, 5, requires_grad=True)
    densities = (torch.randn(2, 30, 12, 1) * 3).requires_grad_()
    depths = torch.sort(torch.rand(2, 30, 12, 1) + 2.25, dim=2).values
    options = dict(OPTIONS, white_back=white_back)
    ours, theirs = integration.MipRayMarcher2(), eg3d.ray_marcher.MipRayMarcher2()
    expected, actual = theirs(colors, densities, depths, options), ours(colors, densities, depths, options)
    weights = [torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) for x in expected]
    grads = [torch.autograd.grad(sum((x * w).sum() for x, w in zip(out, weights)), [colors, densities])
             for out in (expected, actual)]
    for got, want in zip(actual, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def render(eg3d, renderer, planes, decoder, seed, options=OPTIONS):
    """EG3D's render of two views at 8x8 pixels, and the gradients of a random loss on it with
    respect to the planes and the decoder's parameters."""
    torch.manual_seed(seed)
    c = camera_labels(sample_orbit_poses(2), fov_to_intrinsics(18.837))
    origins, directions = eg3d.ray_sampler.RaySampler()(c[:, :16].view(-1, 4, 4), c[:, 16:25].view(-1, 3, 3), 8)
    rgb, depth, opacity = renderer(planes, decoder, origins, directions, options)
    generator = torch.Generator().manual_seed(seed + 1)
    loss = sum((x * torch.randn(x.shape, generator=generator)).sum() for x in (rgb, depth, opacity))
    grads = torch.autograd.grad(loss, [planes, *decoder.parameters()])
    return (rgb, depth, opacity), grads


def decoder_and_planes(eg3d):
    torch.manual_seed(0)
    decoder = eg3d.triplane.OSGDecoder(32, {"decoder_lr_mul": 0.5, "decoder_output_dim": 32})
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    planes = (torch.randn(2, 3, 32, 16, 16) * 2).requires_grad_()
    return decoder, planes


def spy(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def assert_same_render(expected, actual):
    for got, want in zip(actual[0], expected[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(actual[1], expected[1]):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("density_noise", [0, 0.5])
def test_install_renders_as_eg3d_through_our_ops(eg3d, monkeypatch, fused, density_noise):
    decoder, planes = decoder_and_planes(eg3d)
    renderer = eg3d.renderer.ImportanceRenderer()  # created before install()
    options = dict(OPTIONS, density_noise=density_noise)
    expected = render(eg3d, renderer, planes, decoder, seed=5, options=options)
    originals = (eg3d.renderer.sample_from_planes, vars(eg3d.ray_marcher.MipRayMarcher2)["run_forward"],
                 vars(eg3d.renderer.ImportanceRenderer)["run_model"])
    marches = spy(monkeypatch, integration, "eg3d_ray_march")
    fused_calls = spy(monkeypatch, fused_module, "sample_and_decode")
    samples = spy(monkeypatch, integration, "triplane_sample")
    integration.install(fused=fused)
    assert integration.is_installed()
    actual = render(eg3d, renderer, planes, decoder, seed=5, options=options)
    assert len(marches) == 2  # the coarse pass's weights and the final composite
    assert (len(fused_calls), len(samples)) == ((2, 0) if fused else (0, 2))  # coarse and fine samples
    assert_same_render(expected, actual)
    assert not torch.equal(render(eg3d, renderer, planes, decoder, seed=6, options=options)[0][0], actual[0][0])
    integration.uninstall()
    assert not integration.is_installed()
    restored = (eg3d.renderer.sample_from_planes, vars(eg3d.ray_marcher.MipRayMarcher2)["run_forward"],
                vars(eg3d.renderer.ImportanceRenderer)["run_model"])
    assert all(a is b for a, b in zip(restored, originals))
    count = len(marches) + len(fused_calls) + len(samples)
    render(eg3d, renderer, planes, decoder, seed=5, options=options)
    assert len(marches) + len(fused_calls) + len(samples) == count  # EG3D's own code again


def test_install_falls_back_for_other_decoders_and_axes(eg3d, monkeypatch):
    decoder, planes = decoder_and_planes(eg3d)

    class OSGDecoder(torch.nn.Module):  # a fork's decoder of the same name but another structure
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, features, directions):
            out = self.inner(features, directions)
            return {"rgb": out["rgb"] * 0.5, "sigma": out["sigma"]}

    renderer = eg3d.renderer.ImportanceRenderer()
    rotated = torch.stack([rotation(0.2, 1) @ p for p in eg3d.renderer.generate_planes()])
    for wrapped, plane_axes in ((OSGDecoder(decoder), None), (decoder, rotated)):
        if plane_axes is not None:
            renderer.plane_axes = plane_axes
        expected = render(eg3d, renderer, planes, wrapped, seed=3)
        fused_calls = spy(monkeypatch, fused_module, "sample_and_decode")
        with integration.installed():
            actual = render(eg3d, renderer, planes, wrapped, seed=3)
        assert fused_calls == [] and not integration.is_installed()
        assert_same_render(expected, actual)
    hooked = []
    decoder.net[1].register_forward_hook(lambda *args: hooked.append(1))
    assert fused_module.osg_decoder_layers(decoder, 32) is None  # a hook must still run


def test_install_checks_its_arguments_and_modules(eg3d):
    with pytest.raises(ImportError, match="forks.volumetric_rendering.renderer is not imported"):
        integration.install("forks")
    with pytest.raises(TypeError, match="package"):
        integration.install(3)
    with pytest.raises(TypeError, match="fused"):
        integration.install(fused="yes")
    assert not integration.is_installed()
    integration.install()
    integration.install()  # again: nothing to do
    integration.uninstall()
    assert eg3d.renderer.sample_from_planes.__module__ == "training.volumetric_rendering.renderer"


def test_restated_eg3d_agrees_with_its_formulation(eg3d):
    """The re-stated EG3D code these tests treat as EG3D's agrees with EG3D's equations as written out
    independently in tests/eg3d_formulation.py (ray marcher, ray sampler, plane axes)."""
    from eg3d_formulation import EG3D_PLANE_AXES, eg3d_rays, published_ray_march

    torch.testing.assert_close(eg3d.renderer.generate_planes(), EG3D_PLANE_AXES, rtol=0, atol=0)
    colors, densities = torch.rand(2, 20, 9, 4), torch.randn(2, 20, 9, 1) * 3
    depths = torch.sort(torch.rand(2, 20, 9, 1) + 2.25, dim=2).values
    for white_back in (False, True):
        options = dict(OPTIONS, white_back=white_back)
        for got, want in zip(eg3d.ray_marcher.MipRayMarcher2()(colors, densities, depths, options),
                             published_ray_march(colors, densities, depths, options)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    c = camera_labels(sample_orbit_poses(2), fov_to_intrinsics(18.837))
    for got, want in zip(eg3d.ray_sampler.RaySampler()(c[:, :16].view(-1, 4, 4), c[:, 16:25].view(-1, 3, 3), 6),
                         eg3d_rays(c, 6)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _detach_weight(layer):  # a layer without a weight tensor
    del layer.weight
    layer.weight = None


@pytest.mark.parametrize("change", [
    lambda d: setattr(d.net[0], "activation", "lrelu"),
    lambda d: _detach_weight(d.net[0]),
    lambda d: setattr(d.net[0], "bias", None),
    lambda d: setattr(d.net[2], "bias", torch.nn.Parameter(torch.zeros(5))),  # bias of the wrong length
    lambda d: setattr(d.net[0], "weight_gain", torch.tensor(1.0)),  # a gain that is not a number
    lambda d: setattr(d.net[2], "bias_gain", None),
    lambda d: setattr(d.net[2], "weight", torch.nn.Parameter(torch.zeros(33, 63))),  # inputs != hidden units
    lambda d: (setattr(d.net[2], "weight", torch.nn.Parameter(torch.zeros(1, 64))),
               setattr(d.net[2], "bias", torch.nn.Parameter(torch.zeros(1)))),  # fewer than 2 outputs
    lambda d: d.net.__setitem__(1, torch.nn.Softplus(beta=2)),
    lambda d: d.net.__setitem__(1, torch.nn.Softplus(threshold=10)),
    lambda d: d.register_forward_pre_hook(lambda *args: None),
    lambda d: d.net[0].register_full_backward_hook(lambda *args: None),
    lambda d: d.net[2].register_full_backward_pre_hook(lambda *args: None),
], ids=["activation", "no-weight", "no-bias", "bias-shape", "weight-gain", "bias-gain", "hidden-mismatch",
        "one-output", "softplus-beta", "softplus-threshold", "forward-pre-hook", "backward-hook",
        "backward-pre-hook"])
def test_only_eg3ds_own_decoder_structure_is_fused(eg3d, change):
    """Any departure from OSGDecoder's structure (a layer's kind, shapes, gains, the softplus, a
    hook of any kind) keeps the decoder on the unfused path, which runs it as written."""
    decoder, _ = decoder_and_planes(eg3d)
    assert fused_module.osg_decoder_layers(decoder, 32) is not None
    change(decoder)
    assert fused_module.osg_decoder_layers(decoder, 32) is None


def test_fused_decoder_weights_at_their_edges(eg3d):
    """Two outputs (density and one channel) are still fused; a layer's weights come out in the
    planes' dtype with both learning-rate gains applied, whatever the gain."""
    decoder = eg3d.triplane.OSGDecoder(32, {"decoder_lr_mul": 2.0, "decoder_output_dim": 1})
    first, second = fused_module.osg_decoder_layers(decoder, 32)
    assert second.weight.shape[0] == 2
    with torch.no_grad():
        second.bias.copy_(torch.tensor([0.5, -1.5]))  # EG3D initialises biases to zero
    weight, bias = fused_module.effective_weights(second, torch.float64)
    assert weight.dtype == bias.dtype == torch.float64
    torch.testing.assert_close(weight, second.weight.double() * second.weight_gain)
    torch.testing.assert_close(bias, second.bias.double() * 2.0)  # bias_gain is the lr multiplier
