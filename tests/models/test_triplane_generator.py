"""The tri-plane generator: EG3D's formulation, backends, parameter layout and bad input."""

import math

import pytest
import torch
from eg3d_formulation import eg3d_decode, eg3d_rays, published_ray_march
from support import assert_close_scaled, kernel_backends

from dreamportrait.models import (TriPlaneGenerator, build_generator, camera_labels, fov_to_intrinsics, orbit_poses,
                                  preset_kwargs, sample_orbit_poses)
from dreamportrait.rendering import importance_depths

def tiny_generator(**overrides):
    generator = build_generator("tiny", **overrides)
    # Give the noise and the zero-initialised strengths some effect, so every path is exercised.
    with torch.no_grad():
        for name, parameter in generator.named_parameters():
            if name.endswith("noise_strength"):
                parameter.fill_(0.1)
    return generator


def random_inputs(generator, batch=2):
    z = torch.randn(batch, generator.z_dim)
    yaw = math.pi / 2 + (torch.rand(batch) - 0.5)
    pitch = math.pi / 2 + (torch.rand(batch) - 0.5) * 0.5
    return z, camera_labels(orbit_poses(yaw, pitch), fov_to_intrinsics(18.837))


def eg3d_render(generator, ws, c, resolution):
    """EG3D's TriPlaneGenerator.synthesis with deterministic sampling, const noise."""
    options = generator.rendering_kwargs
    planes = generator.backbone.synthesis(ws, noise_mode="const")
    planes = planes.view(len(planes), 3, 32, planes.shape[-2], planes.shape[-1])
    origins, directions = eg3d_rays(c, resolution)
    batch, rays, _ = origins.shape

    def decode(depths):
        points = (origins.unsqueeze(-2) + depths * directions.unsqueeze(-2)).reshape(batch, -1, 3)
        colors, sigma = eg3d_decode(generator, planes, points, options["box_warp"])
        return colors.reshape(batch, rays, depths.shape[2], -1), sigma.reshape(batch, rays, depths.shape[2], 1)

    samples = options["depth_resolution"]
    depths = torch.linspace(options["ray_start"], options["ray_end"], samples).reshape(1, 1, samples, 1).repeat(batch, rays, 1, 1)
    colors, densities = decode(depths)
    _, _, weights = published_ray_march(colors, densities, depths, {})
    fine = importance_depths(depths, weights, options["depth_resolution_importance"], deterministic=True)
    fine_colors, fine_densities = decode(fine)
    all_depths = torch.cat([depths, fine], -2)
    order = torch.sort(all_depths, dim=-2).indices
    all_colors = torch.gather(torch.cat([colors, fine_colors], -2), -2, order.expand(-1, -1, -1, colors.shape[-1]))
    all_densities = torch.gather(torch.cat([densities, fine_densities], -2), -2, order)
    rgb, depth, _ = published_ray_march(all_colors, all_densities, torch.gather(all_depths, -2, order), {})
    feature_image = rgb.permute(0, 2, 1).reshape(batch, -1, resolution, resolution)
    image = generator.superresolution(feature_image[:, :3], feature_image, ws, noise_mode="none")
    return image, feature_image[:, :3], depth.permute(0, 2, 1).reshape(batch, 1, resolution, resolution)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_images_match_eg3d_formulation(backend):
    generator = tiny_generator(backend=backend).eval()
    z, c = random_inputs(generator)
    with torch.no_grad():
        out = generator(z, c, noise_mode="const", deterministic_sampling=True, neural_rendering_resolution=16)
        ws = generator.mapping(z, c)
        image, image_raw, depth = eg3d_render(generator, ws, c, 16)
    assert out["image"].shape == (2, 3, 64, 64) and out["image_raw"].shape == (2, 3, 16, 16)
    assert_close_scaled(out["image_raw"], image_raw, 1e-4, "image_raw")
    assert_close_scaled(out["image_depth"], depth, 1e-4, "image_depth")
    assert_close_scaled(out["image"], image, 1e-4, "image")


def test_deterministic_sampling_repeats_and_jitter_varies():
    generator = tiny_generator().eval()
    z, c = random_inputs(generator)
    with torch.no_grad():
        first = generator(z, c, noise_mode="const", deterministic_sampling=True, neural_rendering_resolution=8)
        second = generator(z, c, noise_mode="const", deterministic_sampling=True, neural_rendering_resolution=8)
        jittered = generator(z, c, noise_mode="const", neural_rendering_resolution=8)
    torch.testing.assert_close(first["image"], second["image"], rtol=0, atol=0)
    assert not torch.allclose(first["image_raw"], jittered["image_raw"])


def test_noise_modes():
    generator = tiny_generator().eval()
    z, c = random_inputs(generator)
    with torch.no_grad():
        ws = generator.mapping(z, c)
        const = generator.planes(ws, "const")
        torch.testing.assert_close(generator.planes(ws, "const"), const, rtol=0, atol=0)
        assert not torch.allclose(generator.planes(ws, "random"), const)
        assert not torch.allclose(generator.planes(ws, "none"), const)
    with pytest.raises(ValueError, match="noise_mode"):
        generator.planes(ws, "fixed")


def test_truncation_pulls_towards_w_avg():
    generator = tiny_generator()
    z, c = random_inputs(generator)
    with torch.no_grad():
        generator.backbone.mapping.w_avg.normal_()
        ws = generator.mapping(z, c, truncation_psi=0)
        torch.testing.assert_close(ws, generator.backbone.mapping.w_avg.expand_as(ws))
        half = generator.mapping(z, c, truncation_psi=0.5, truncation_cutoff=3)
        full = generator.mapping(z, c)
        torch.testing.assert_close(half[:, 3:], full[:, 3:])
        torch.testing.assert_close(half[:, :3], (full[:, :3] + generator.backbone.mapping.w_avg) / 2)
    generator.train()
    generator.mapping(z, c, update_emas=True)
    assert not torch.equal(generator.backbone.mapping.w_avg, ws[0, 0])


@pytest.mark.parametrize("backend, device", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_kernel_backends_match_reference_images_and_gradients(backend, device, dtype):
    # In float32 the parameter gradients sum many rounded terms (the camera embedding's over every
    # pixel), so kernels and reference differ by accumulated rounding: float32 checks the images,
    # float64 checks images and every parameter gradient tightly.
    reference = tiny_generator(backend="reference").to(device, dtype)
    kernels = tiny_generator(backend=backend).to(device, dtype)
    kernels.load_state_dict(reference.state_dict())
    z, c = (value.to(device, dtype) for value in random_inputs(reference))
    resolution = 8 if backend == "triton" else 16
    outputs, gradients = [], []
    for generator in (reference, kernels):
        out = generator(z, c, noise_mode="const", deterministic_sampling=True, neural_rendering_resolution=resolution)
        assert all(value.dtype == dtype for value in out.values())
        torch.manual_seed(1)  # the same projection weights for both
        loss = sum((out[key] * torch.randn_like(out[key])).sum() for key in ("image", "image_raw", "image_depth"))
        loss.backward()
        outputs.append(out)
        gradients.append({name: p.grad for name, p in generator.named_parameters() if p.grad is not None})
    tolerance = 1e-4 if dtype == torch.float32 else 1e-9
    for key in ("image", "image_raw", "image_depth"):
        assert_close_scaled(outputs[1][key], outputs[0][key], tolerance, key)
    assert gradients[0].keys() == gradients[1].keys()
    if dtype == torch.float64:
        for name, expected in gradients[0].items():
            assert_close_scaled(gradients[1][name], expected, 1e-9, name)


def test_tiny_preset_trains_every_parameter():
    generator = tiny_generator()
    parameters = sum(p.numel() for p in generator.parameters())
    assert 100_000 < parameters < 1_000_000
    z, c = random_inputs(generator, batch=3)
    out = generator(z, c)
    assert all(torch.isfinite(value).all() for value in out.values())
    (out["image"].square().mean() + out["image_raw"].mean()).backward()
    no_gradient = [name for name, p in generator.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # EG3D's FFHQ configuration runs super-resolution without noise (superresolution_noise_mode 'none').
    assert no_gradient == [name for name, _ in generator.superresolution.named_parameters(prefix="superresolution")
                           if name.endswith("noise_strength")]


def test_orthogonal_axes_give_other_images():
    eg3d = tiny_generator().eval()
    rendering = {**eg3d.rendering_kwargs, "triplane_axes": "orthogonal"}
    orthogonal = tiny_generator(rendering_kwargs=rendering).eval()
    orthogonal.load_state_dict(eg3d.state_dict())
    z, c = random_inputs(eg3d)
    with torch.no_grad():
        a = eg3d(z, c, noise_mode="const", deterministic_sampling=True, neural_rendering_resolution=8)
        b = orthogonal(z, c, noise_mode="const", deterministic_sampling=True, neural_rendering_resolution=8)
    assert not torch.allclose(a["image_raw"], b["image_raw"])
    with pytest.raises(ValueError, match="triplane_axes"):
        tiny_generator(rendering_kwargs={**rendering, "triplane_axes": "xyz"})(z, c)


def test_sample_gives_density_at_points():
    generator = tiny_generator().eval()
    z, c = random_inputs(generator)
    points = torch.rand(2, 50, 3) - 0.5
    with torch.no_grad():
        out = generator.sample(points, z, c, noise_mode="const")
        ws = generator.mapping(z, c)
        _, sigma = eg3d_decode(generator, generator.planes(ws, "const"), points, 1.0)
    assert out["sigma"].shape == (2, 50, 1) and out["rgb"].shape == (2, 50, 32)
    assert_close_scaled(out["sigma"], sigma, 1e-5, "sigma")


def test_density_prior_adds_a_ball_to_the_decoded_density():
    prior = {"radius": 0.2 + torch.rand(()).item() * 0.2, "strength": 1 + torch.rand(()).item() * 10}
    plain = tiny_generator().eval()
    rendering = {**plain.rendering_kwargs, "density_prior": prior}
    with_prior = build_generator("tiny", rendering_kwargs=rendering).eval()
    with_prior.load_state_dict(plain.state_dict())
    z, c = random_inputs(plain)
    points = torch.rand(2, 50, 3) - 0.5
    with torch.no_grad():
        base, out = (g.sample(points, z, c, noise_mode="const") for g in (plain, with_prior))
    ball = prior["strength"] * (1 - points.norm(dim=-1, keepdim=True) / prior["radius"])
    torch.testing.assert_close(out["sigma"], base["sigma"] + ball)
    torch.testing.assert_close(out["rgb"], base["rgb"])
    for bad in ({"radius": 0.3}, {"radius": -0.3, "strength": 1.0}, {"radius": 0.3, "strength": True}):
        broken = build_generator("tiny", rendering_kwargs={**plain.rendering_kwargs, "density_prior": bad})
        with pytest.raises(ValueError, match=r"density_prior'\]\['(radius|strength)'\] must be a positive number"):
            broken.sample(points, z, c)


def test_camera_rays_match_eg3d_with_skew():
    c = camera_labels(sample_orbit_poses(3), fov_to_intrinsics(18.837))
    c[:, 17] = 0.05  # intrinsics[0, 1]: skew
    from dreamportrait.models import camera_rays, split_camera_labels

    origins, directions = camera_rays(*split_camera_labels(c), 12)
    expected_origins, expected_directions = eg3d_rays(c, 12)
    torch.testing.assert_close(origins, expected_origins)
    torch.testing.assert_close(directions, expected_directions)


def test_frontal_camera_looks_at_the_pivot():
    pose = orbit_poses(torch.tensor([math.pi / 2]), torch.tensor([math.pi / 2]), radius=2.7, pivot=(0, 0, 0.2))[0]
    torch.testing.assert_close(pose[:3, 3], torch.tensor([0.0, 0.0, 2.7]), atol=1e-5, rtol=0)
    torch.testing.assert_close(pose[:3, 2], torch.tensor([0.0, 0.0, -1.0]), atol=1e-5, rtol=0)  # forward
    torch.testing.assert_close(pose[:3, 1], torch.tensor([0.0, -1.0, 0.0]), atol=1e-5, rtol=0)  # OpenCV: y down
    # EG3D's rounded formula; FFHQ's dataset labels have 4.2647.
    assert abs(fov_to_intrinsics(18.837)[0, 0].item() - 4.26339) < 1e-5


# Parameter names and shapes of EG3D's published FFHQ-512 networks (read from EG3D's constructors:
# StyleGAN2 Generator/SynthesisBlock/SynthesisLayer/ToRGBLayer, SuperresolutionHybrid8XDC,
# OSGDecoder, DualDiscriminator with an 8-layer label mapping).
EG3D_FFHQ512_GENERATOR = {
    "backbone.mapping.w_avg": (512,),
    "backbone.mapping.embed.weight": (512, 25),
    "backbone.mapping.fc0.weight": (512, 1024),
    "backbone.mapping.fc1.bias": (512,),
    "backbone.synthesis.b4.const": (512, 4, 4),
    "backbone.synthesis.b4.resample_filter": (4, 4),
    "backbone.synthesis.b4.conv1.noise_const": (4, 4),
    "backbone.synthesis.b4.conv1.noise_strength": (),
    "backbone.synthesis.b4.torgb.weight": (96, 512, 1, 1),
    "backbone.synthesis.b64.conv0.weight": (512, 512, 3, 3),
    "backbone.synthesis.b128.conv0.weight": (256, 512, 3, 3),
    "backbone.synthesis.b256.conv1.affine.weight": (128, 512),
    "backbone.synthesis.b256.conv1.noise_const": (256, 256),
    "backbone.synthesis.b256.torgb.bias": (96,),
    "superresolution.block0.conv0.weight": (256, 32, 3, 3),
    "superresolution.block0.conv0.affine.weight": (32, 512),
    "superresolution.block1.conv1.noise_const": (512, 512),
    "superresolution.block1.torgb.weight": (3, 128, 1, 1),
    "decoder.net.0.weight": (64, 32),
    "decoder.net.2.weight": (33, 64),
    "decoder.net.2.bias": (33,),
}
EG3D_FFHQ512_DISCRIMINATOR = {
    "resample_filter": (4, 4),
    "b512.fromrgb.weight": (64, 6, 1, 1),
    "b512.conv1.weight": (128, 64, 3, 3),
    "b512.skip.weight": (128, 64, 1, 1),
    "b8.conv1.weight": (512, 512, 3, 3),
    "mapping.embed.weight": (512, 25),
    "mapping.fc7.weight": (512, 512),
    "b4.conv.weight": (512, 513, 3, 3),
    "b4.fc.weight": (512, 8192),
    "b4.out.weight": (512, 512),
}


def test_ffhq512_parameter_layout_is_eg3d():
    from dreamportrait.models import build_discriminator

    generator = build_generator("ffhq512-128")
    shapes = {key: tuple(value.shape) for key, value in generator.state_dict().items()}
    for key, shape in EG3D_FFHQ512_GENERATOR.items():
        assert shapes.get(key) == shape, key
    # 7 backbone blocks (b4..b256) + 2 SR blocks; each block one resample_filter, each layer one.
    assert sum(key.endswith("noise_const") for key in shapes) == 13 + 4
    assert "superresolution.resample_filter" not in shapes  # 8XDC registers none
    assert generator.num_ws == 14 and generator.neural_rendering_resolution == 128
    discriminator = build_discriminator("ffhq512-128")
    shapes = {key: tuple(value.shape) for key, value in discriminator.state_dict().items()}
    for key, shape in EG3D_FFHQ512_DISCRIMINATOR.items():
        assert shapes.get(key) == shape, key
    assert [f"b{2 ** i}" for i in range(9, 1, -1)] == sorted({k.split(".")[0] for k in shapes if k.startswith("b")},
                                                            key=lambda b: -int(b[1:]))


def test_bad_input_is_named():
    generator = tiny_generator()
    z, c = random_inputs(generator)
    with pytest.raises(ValueError, match=r"c must be .*\(N, 25\)"):
        generator(z, c[:, :16])
    with pytest.raises(ValueError, match="2 camera labels but the batch has 3"):
        generator(torch.randn(3, generator.z_dim), c)
    with pytest.raises(ValueError, match=r"z must have shape \(N, 64\)"):
        generator(torch.randn(2, 32), c)
    with pytest.raises(ValueError, match="ws must have shape"):
        generator.synthesis(torch.randn(2, 3, generator.w_dim), c)
    with pytest.raises(ValueError, match="rendering_kwargs is missing ray_start"):
        kwargs = preset_kwargs("tiny", "generator")
        del kwargs["rendering_kwargs"]["ray_start"]
        TriPlaneGenerator(**kwargs)
    with pytest.raises(ValueError, match="superresolution_module"):
        kwargs = preset_kwargs("tiny", "generator")
        kwargs["rendering_kwargs"]["superresolution_module"] = "training.superresolution.Bicubic"
        TriPlaneGenerator(**kwargs)
    with pytest.raises(ValueError, match="unknown preset"):
        build_generator("ffhq1024")
