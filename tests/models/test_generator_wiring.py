"""The tri-plane generator's Python wiring on a small generator (8² tri-planes, 4 + 4 samples a ray):
the OSG decoder written out, the renderer's two passes, the fused and unfused decoding, the density prior
and noise, the mapping's camera conditioning, synthesis options, sampling, presets and the density grid
of shape extraction. EG3D's formulation as a whole: test_triplane_generator.py."""

import copy
import math

import pytest
import torch

import dreamportrait.models.renderer as renderer_module
from dreamportrait.models import TriPlaneGenerator, camera_labels, fov_to_intrinsics, sample_orbit_poses
from dreamportrait.models.cameras import camera_rays, split_camera_labels
from dreamportrait.models.mesh import density_grid, extract_mesh
from dreamportrait.models.presets import PRESETS, build_discriminator, build_generator, preset_kwargs
from dreamportrait.models.renderer import ImportanceRenderer, OSGDecoder, density_prior, triplane_axes
from dreamportrait.ops import EG3D_AXES, ORTHOGONAL_AXES, triplane_sample
from dreamportrait.rendering import eg3d_ray_march, importance_depths, merge_samples, stratified_depths

RENDERING = {"superresolution_module": "SuperresolutionHybrid2X", "sr_antialias": True, "ray_start": 2.25,
             "ray_end": 3.3, "box_warp": 1, "depth_resolution": 4, "depth_resolution_importance": 4,
             "clamp_mode": "softplus", "c_scale": 1.0, "avg_camera_radius": 2.7, "avg_camera_pivot": [0, 0, 0.2]}


def small_generator(**rendering):
    torch.manual_seed(0)
    generator = TriPlaneGenerator(z_dim=8, c_dim=25, w_dim=8, img_resolution=16, img_channels=3,
                                  mapping_kwargs={"num_layers": 1}, rendering_kwargs={**RENDERING, **rendering},
                                  sr_kwargs={"block_channels": [4, 4]}, channel_base=64, channel_max=8,
                                  num_fp16_res=0, conv_clamp=None, neural_rendering_resolution=4,
                                  triplane_resolution=8).double()
    with torch.no_grad():
        for name, parameter in generator.named_parameters():
            if name.endswith("noise_strength"):
                parameter.fill_(0.1)
    return generator


def cameras(count=2):
    return camera_labels(sample_orbit_poses(count), fov_to_intrinsics(18.837)).double()


def fc(layer, x):
    return x @ (layer.weight * layer.bias_gain / math.sqrt(layer.in_features)).t() + layer.bias * layer.bias_gain


# --- the decoder and the renderer's helpers ---------------------------------------------------------------

def test_the_osg_decoder_written_out():
    decoder = OSGDecoder(6, {"decoder_lr_mul": 0.5, "decoder_output_dim": 3}).double()
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.normal_()
    first, activation, second = decoder.net
    assert decoder.hidden_dim == 64 and first.weight.shape == (64, 6) and second.weight.shape == (4, 64)
    assert first.bias_gain == 0.5 and second.bias_gain == 0.5 and isinstance(activation, torch.nn.Softplus)
    features = torch.randn(2, 5, 6, dtype=torch.float64)
    x = fc(second, torch.nn.functional.softplus(fc(first, features)))
    out = decoder(features)
    torch.testing.assert_close(out["sigma"], x[..., :1])
    torch.testing.assert_close(out["rgb"], torch.sigmoid(x[..., 1:]) * 1.002 - 0.001)


def test_triplane_axes_by_name():
    assert triplane_axes({}) == EG3D_AXES and triplane_axes({"triplane_axes": "eg3d"}) == EG3D_AXES
    assert triplane_axes({"triplane_axes": "orthogonal"}) == ORTHOGONAL_AXES
    with pytest.raises(ValueError, match=r"^rendering_kwargs\['triplane_axes'\] must be one of \['eg3d', "
                                         r"'orthogonal'\], got 'xyz'$"):
        triplane_axes({"triplane_axes": "xyz"})


def test_the_density_prior_is_a_ball_around_the_origin():
    points = torch.tensor([[[0.0, 0.0, 0.0], [0.3, 0.4, 0.0], [0.0, 0.0, -1.0]]])
    torch.testing.assert_close(density_prior(points, {"radius": 0.5, "strength": 20}),
                               torch.tensor([[[20.0], [0.0], [-20.0]]]))
    assert density_prior(points, {"radius": 1, "strength": 2.5}).shape == (1, 3, 1)
    for prior, name, value in (({"strength": 1}, "radius", "None"), ({"radius": 0, "strength": 1}, "radius", "0"),
                               ({"radius": 1, "strength": -2}, "strength", "-2"),
                               ({"radius": True, "strength": 1}, "radius", "True"),
                               ({"radius": "1", "strength": 1}, "radius", "'1'")):
        with pytest.raises(ValueError, match=rf"^rendering_kwargs\['density_prior'\]\['{name}'\] must be a positive "
                                             rf"number, got {value}$"):
            density_prior(points, prior)


# --- the renderer ------------------------------------------------------------------------------------------

def rays(batch=2, count=3):
    c = cameras(batch)
    origins, directions = camera_rays(*split_camera_labels(c), 2)
    return origins[:, :count], directions[:, :count]


def decode_written_out(planes, decoder, origins, directions, depths, options):
    batch, count, samples, _ = depths.shape
    points = (origins[:, :, None] + depths * directions[:, :, None]).reshape(batch, count * samples, 3)
    out = decoder(triplane_sample(planes, points, options["box_warp"], triplane_axes(options), "mean",
                                  backend="reference"))
    return out["rgb"].reshape(batch, count, samples, -1), out["sigma"].reshape(batch, count, samples, 1)


@pytest.mark.parametrize("importance", [0, 3])
def test_the_renderer_decodes_coarse_then_fine_samples_and_composites_them_all(importance):
    generator = small_generator()
    planes = torch.randn(2, 3, 32, 8, 8, dtype=torch.float64)
    origins, directions = rays()
    options = {**generator.rendering_kwargs, "depth_resolution_importance": importance,
               "deterministic_sampling": True, "box_warp": 0.8}
    depths = stratified_depths(2, 3, 2.25, 3.3, 4, jitter=False, dtype=torch.float64)
    colors, densities = decode_written_out(planes, generator.decoder, origins, directions, depths, options)
    if importance:
        _, _, weights = eg3d_ray_march(colors, densities, depths, options, backend="reference")
        fine = importance_depths(depths, weights, importance, deterministic=True)
        fine_colors, fine_densities = decode_written_out(planes, generator.decoder, origins, directions, fine, options)
        depths, colors, densities = merge_samples(depths, colors, densities, fine, fine_colors, fine_densities)
    rgb, depth, weights = eg3d_ray_march(colors, densities, depths, options, backend="reference")
    got = ImportanceRenderer("reference")(planes, generator.decoder, origins, directions, options)
    torch.testing.assert_close(got[0], rgb)
    torch.testing.assert_close(got[1], depth)
    torch.testing.assert_close(got[2], weights.sum(2))
    assert got[2].shape == (2, 3, 1)


def test_the_renderer_jitters_unless_deterministic_and_samples_in_disparity_when_asked(monkeypatch):
    calls = []
    real = renderer_module.stratified_depths

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(renderer_module, "stratified_depths", recording)
    generator = small_generator()
    planes = torch.randn(1, 3, 32, 8, 8, dtype=torch.float64)
    origins, directions = rays(1, 2)
    renderer = ImportanceRenderer("reference")
    renderer(planes, generator.decoder, origins, directions, {**generator.rendering_kwargs})
    renderer(planes, generator.decoder, origins, directions,
             {**generator.rendering_kwargs, "deterministic_sampling": True, "disparity_space_sampling": True})
    assert calls[0][0] == (1, 2, 2.25, 3.3, 4)
    assert calls[0][1] == {"jitter": True, "disparity_space": False, "device": origins.device, "dtype": torch.float64}
    assert calls[1][1]["jitter"] is False and calls[1][1]["disparity_space"] is True
    with pytest.raises(ValueError, match=r"^rendering_kwargs: ray_start/ray_end 'auto' \(ray-box limits\) is not "
                                         r"supported; give numbers$"):
        renderer(planes, generator.decoder, origins, directions, {**generator.rendering_kwargs, "ray_end": "auto"})
    with pytest.raises(ValueError, match="'auto'"):
        renderer(planes, generator.decoder, origins, directions, {**generator.rendering_kwargs, "ray_start": "auto"})


def test_run_model_fuses_an_osg_decoder_and_otherwise_samples_then_decodes(monkeypatch):
    generator = small_generator()
    planes = torch.randn(2, 3, 32, 8, 8, dtype=torch.float64)
    points = torch.rand(2, 5, 3, dtype=torch.float64) - 0.5
    options = {**generator.rendering_kwargs, "box_warp": 1.5, "triplane_axes": "orthogonal"}
    expected = generator.decoder(triplane_sample(planes, points, 1.5, ORTHOGONAL_AXES, "mean", backend="reference"))
    fused = []
    real = renderer_module.sample_and_decode
    monkeypatch.setattr(renderer_module, "sample_and_decode", lambda *a, **k: fused.append((a[2], a[7], k)) or real(*a, **k))
    renderer = ImportanceRenderer("reference")
    out = renderer.run_model(planes, generator.decoder, points, options)
    assert fused == [(1.5, ORTHOGONAL_AXES, {"backend": "reference"})]
    torch.testing.assert_close(out["sigma"], expected["sigma"])
    torch.testing.assert_close(out["rgb"], expected["rgb"])
    # Half precision is not fused; nor is a decoder with hooks.
    generator.decoder.register_forward_hook(lambda module, args, out: None)
    out = renderer.run_model(planes, generator.decoder, points, options)
    assert len(fused) == 1
    torch.testing.assert_close(out["sigma"], expected["sigma"])
    assert renderer_module.FUSED_DTYPES == (torch.float32, torch.float64)


def test_run_model_adds_the_density_prior_and_density_noise():
    generator = small_generator()
    planes = torch.randn(1, 3, 32, 8, 8, dtype=torch.float64)
    points = torch.rand(1, 6, 3, dtype=torch.float64) - 0.5
    renderer = ImportanceRenderer("reference")
    plain = renderer.run_model(planes, generator.decoder, points, generator.rendering_kwargs)
    prior = {"radius": 0.3, "strength": 5.0}
    with_prior = renderer.run_model(planes, generator.decoder, points, {**generator.rendering_kwargs, "density_prior": prior})
    torch.testing.assert_close(with_prior["sigma"], plain["sigma"] + density_prior(points, prior))
    torch.testing.assert_close(with_prior["rgb"], plain["rgb"])
    torch.manual_seed(4)
    noisy = renderer.run_model(planes, generator.decoder, points, {**generator.rendering_kwargs, "density_noise": 0.5})
    torch.manual_seed(4)
    torch.testing.assert_close(noisy["sigma"], plain["sigma"] + torch.randn_like(plain["sigma"]) * 0.5)
    off = renderer.run_model(planes, generator.decoder, points, {**generator.rendering_kwargs, "density_noise": 0})
    torch.testing.assert_close(off["sigma"], plain["sigma"])


# --- the generator -----------------------------------------------------------------------------------------

def test_construction_records_its_arguments_and_checks_them():
    rendering = dict(RENDERING)
    generator = small_generator()
    assert generator.init_kwargs["rendering_kwargs"] == RENDERING and generator.rendering_kwargs == RENDERING
    assert generator.init_kwargs["triplane_resolution"] == 8 and generator.init_kwargs["channel_base"] == 64
    assert generator.init_kwargs["neural_rendering_resolution"] == 4 and "backend" not in generator.init_kwargs
    assert generator.init_kwargs["mapping_kwargs"] == {"num_layers": 1}
    assert generator.init_kwargs["sr_kwargs"] == {"block_channels": [4, 4]}
    generator.rendering_kwargs["box_warp"] = 9
    assert generator.init_kwargs["rendering_kwargs"]["box_warp"] == 1 and rendering == RENDERING
    assert generator.backbone.synthesis.img_resolution == 8 and generator.backbone.synthesis.img_channels == 96
    assert generator.num_ws == generator.backbone.num_ws and generator.superresolution.input_resolution == 8
    assert generator.decoder.net[0].weight.shape == (64, 32) and generator.decoder.net[2].weight.shape == (33, 64)
    assert generator.renderer.backend is None
    assert TriPlaneGenerator(8, 25, 8, 16, 3, rendering_kwargs={**RENDERING, "decoder_lr_mul": 0.25},
                             channel_base=64, channel_max=8, triplane_resolution=8,
                             sr_kwargs={"block_channels": [4, 4]}, backend="reference").decoder.net[0].bias_gain == 0.25
    with pytest.raises(ValueError, match="^TriPlaneGenerator: img_channels must be 3, got 4$"):
        TriPlaneGenerator(8, 25, 8, 16, 4, rendering_kwargs=RENDERING)
    partial = {key: value for key, value in RENDERING.items() if key not in ("box_warp", "clamp_mode")}
    with pytest.raises(ValueError, match="^TriPlaneGenerator: rendering_kwargs is missing box_warp, clamp_mode$"):
        TriPlaneGenerator(8, 25, 8, 16, 3, rendering_kwargs=partial)
    with pytest.raises(ValueError, match="rendering_kwargs is missing superresolution_module, sr_antialias, ray_start"):
        TriPlaneGenerator(8, 25, 8, 16, 3)


def test_the_mapping_sees_the_camera_scaled_by_c_scale_or_zeros():
    generator = small_generator(c_scale=0.5)
    z, c = torch.randn(2, 8, dtype=torch.float64), cameras()
    torch.testing.assert_close(generator.mapping(z, c, truncation_psi=0.7, truncation_cutoff=2),
                               generator.backbone.mapping(z, c * 0.5, truncation_psi=0.7, truncation_cutoff=2))
    unscaled = small_generator()
    del unscaled.rendering_kwargs["c_scale"]  # EG3D's default: 0
    torch.testing.assert_close(unscaled.mapping(z, c), unscaled.backbone.mapping(z, c * 0))
    zeroed = small_generator(c_gen_conditioning_zero=True)
    torch.testing.assert_close(zeroed.mapping(z, c), zeroed.backbone.mapping(z, torch.zeros_like(c)))
    average = zeroed.backbone.mapping.w_avg.clone()
    zeroed.mapping(z, c, update_emas=True)
    assert not torch.equal(zeroed.backbone.mapping.w_avg, average)
    with pytest.raises(ValueError, match="c"):
        generator.mapping(z, c[:1])


def test_planes_are_the_backbone_image_as_three_32_channel_planes():
    generator = small_generator()
    ws = torch.randn(2, generator.num_ws, 8, dtype=torch.float64)
    image = generator.backbone.synthesis(ws, noise_mode="const")
    planes = generator.planes(ws, "const")
    assert planes.shape == (2, 3, 32, 8, 8)
    torch.testing.assert_close(planes, image.reshape(2, 3, 32, 8, 8))
    seen = []
    generator.planes(ws, "const", block_hook=lambda res, x, img: seen.append(res) or (x, img))
    assert seen == [4, 8]


def test_synthesis_renders_the_planes_and_super_resolves_the_raw_image():
    generator = small_generator(superresolution_noise_mode="const")
    ws = torch.randn(2, generator.num_ws, 8, dtype=torch.float64)
    c = cameras()
    out = generator.synthesis(ws, c, noise_mode="const", deterministic_sampling=True)
    planes = generator.planes(ws, "const")
    torch.testing.assert_close(out["planes"], planes)
    origins, directions = camera_rays(*split_camera_labels(c), 4)
    options = {**generator.rendering_kwargs, "deterministic_sampling": True}
    features, depth, _ = ImportanceRenderer()(planes, generator.decoder, origins, directions, options)
    feature_image = features.permute(0, 2, 1).reshape(2, 32, 4, 4)
    torch.testing.assert_close(out["image_raw"], feature_image[:, :3])
    torch.testing.assert_close(out["image_depth"], depth.permute(0, 2, 1).reshape(2, 1, 4, 4))
    expected = generator.superresolution(feature_image[:, :3], feature_image, ws, noise_mode="const")
    torch.testing.assert_close(out["image"], expected)
    # Other super-resolution ws; given planes skip the backbone.
    sr_ws = torch.randn(2, 1, 8, dtype=torch.float64)
    other = generator.synthesis(ws * 0, c, noise_mode="const", deterministic_sampling=True, planes=planes, sr_ws=sr_ws)
    torch.testing.assert_close(other["image_raw"], out["image_raw"])
    torch.testing.assert_close(other["image"], generator.superresolution(feature_image[:, :3], feature_image, sr_ws,
                                                                         noise_mode="const"))
    with pytest.raises(ValueError, match="noise_mode"):
        generator.synthesis(ws, c, noise_mode="fixed")
    with pytest.raises(ValueError, match="c"):
        generator.synthesis(ws, c[:1])


def test_the_super_resolution_noise_defaults_to_none_and_the_sampling_option_is_the_generators():
    generator = small_generator()
    ws = torch.randn(1, generator.num_ws, 8, dtype=torch.float64)
    c = cameras(1)
    first = generator.synthesis(ws, c, noise_mode="const", deterministic_sampling=True)
    again = generator.synthesis(ws, c, noise_mode="const", deterministic_sampling=True)
    torch.testing.assert_close(first["image"], again["image"], rtol=0, atol=0)  # no random noise anywhere
    generator.rendering_kwargs["deterministic_sampling"] = True
    torch.testing.assert_close(generator.synthesis(ws, c, noise_mode="const")["image"], first["image"], rtol=0, atol=0)
    assert not torch.equal(generator.synthesis(ws, c, noise_mode="const", deterministic_sampling=False)["image_raw"],
                           first["image_raw"])


def test_a_rendering_resolution_given_becomes_the_generators():
    generator = small_generator()
    ws, c = torch.randn(1, generator.num_ws, 8, dtype=torch.float64), cameras(1)
    assert generator.synthesis(ws, c, noise_mode="none")["image_raw"].shape == (1, 3, 4, 4)
    out = generator.synthesis(ws, c, neural_rendering_resolution=2, noise_mode="none")
    assert out["image_raw"].shape == (1, 3, 2, 2) and out["image_depth"].shape == (1, 1, 2, 2)
    assert out["image"].shape == (1, 3, 16, 16) and generator.neural_rendering_resolution == 2
    assert generator.synthesis(ws, c, noise_mode="none")["image_raw"].shape == (1, 3, 2, 2)


def test_forward_maps_then_synthesises():
    generator = small_generator()
    z, c = torch.randn(2, 8, dtype=torch.float64), cameras()
    out = generator(z, c, truncation_psi=0.5, truncation_cutoff=1, neural_rendering_resolution=2, noise_mode="const",
                    deterministic_sampling=True)
    ws = generator.mapping(z, c, truncation_psi=0.5, truncation_cutoff=1)
    expected = generator.synthesis(ws, c, neural_rendering_resolution=2, noise_mode="const", deterministic_sampling=True)
    for key in ("image", "image_raw", "image_depth"):
        torch.testing.assert_close(out[key], expected[key])
    average = generator.backbone.mapping.w_avg.clone()
    generator(z, c, update_emas=True, noise_mode="none")
    assert not torch.equal(generator.backbone.mapping.w_avg, average)


def test_sample_decodes_the_planes_at_given_points():
    generator = small_generator(density_prior={"radius": 0.25, "strength": 3.0})
    z, c = torch.randn(2, 8, dtype=torch.float64), cameras()
    points = torch.rand(2, 7, 3, dtype=torch.float64) - 0.5
    ws = generator.mapping(z, c, truncation_psi=0.5, truncation_cutoff=1)
    planes = generator.planes(ws, "const")
    expected = generator.renderer.run_model(planes, generator.decoder, points, generator.rendering_kwargs)
    got = generator.sample(points, z, c, truncation_psi=0.5, truncation_cutoff=1, noise_mode="const")
    torch.testing.assert_close(got["sigma"], expected["sigma"])
    torch.testing.assert_close(got["rgb"], expected["rgb"])
    torch.testing.assert_close(generator.sample_mixed(points, ws * 0, planes=planes)["sigma"], expected["sigma"])
    for bad in (points[0], points[..., :2], points[:1]):
        with pytest.raises(ValueError, match=rf"^coordinates must have shape \(2, M, 3\), got \({', '.join(map(str, bad.shape))},?\)$"):
            generator.sample_mixed(bad, ws)


# --- presets ------------------------------------------------------------------------------------------------

def test_presets_are_deep_copies_with_overrides():
    kwargs = preset_kwargs("tiny", "generator")
    kwargs["rendering_kwargs"]["box_warp"] = 99
    assert PRESETS["tiny"]["generator"]["rendering_kwargs"]["box_warp"] == 1
    assert preset_kwargs("ffhq512-128", "discriminator") == PRESETS["ffhq512-128"]["discriminator"]
    assert preset_kwargs("world", "generator")["rendering_kwargs"]["background"] == 0.85
    assert PRESETS["tiny"]["generator"]["rendering_kwargs"].get("background") is None
    with pytest.raises(ValueError, match=r"^unknown preset 'huge'; choose one of \['ffhq512-128', 'tiny', 'world'\]$"):
        preset_kwargs("huge", "generator")
    with pytest.raises(ValueError, match=r"^network must be 'generator' or 'discriminator', got 'decoder'$"):
        preset_kwargs("tiny", "decoder")
    generator = build_generator("tiny", triplane_resolution=8, neural_rendering_resolution=4, channel_base=64)
    assert generator.init_kwargs["triplane_resolution"] == 8 and generator.init_kwargs["z_dim"] == 64
    assert generator.init_kwargs["channel_base"] == 64
    discriminator = build_discriminator("tiny", channel_base=64)
    assert discriminator.init_kwargs["channel_base"] == 64 and discriminator.init_kwargs["img_resolution"] == 64


# --- shape extraction ---------------------------------------------------------------------------------------

class BallGenerator:
    """Stands in for a generator: density 1 - |p| / 0.3 (positive inside a ball), recording the chunks."""

    rendering_kwargs = {"box_warp": 1.0}

    def __init__(self):
        self.chunks, self.planes_calls = [], []

    def planes(self, ws, noise_mode):
        self.planes_calls.append(noise_mode)
        return "planes"

    def sample_mixed(self, points, ws, planes):
        assert planes in ("planes", "given")
        self.chunks.append(points.shape[1])
        return {"sigma": (1 - points.norm(dim=-1, keepdim=True) / 0.3) * 20}


def test_the_density_grid_is_indexed_z_y_x_at_cell_centres_in_chunks():
    generator = BallGenerator()
    ws = torch.zeros(1, 3, 4)
    sigma = density_grid(generator, ws, resolution=4, chunk=24, progress=False)
    assert sigma.shape == (4, 4, 4) and generator.chunks == [24, 24, 16] and generator.planes_calls == ["const"]
    centres = torch.tensor([-0.375, -0.125, 0.125, 0.375])
    for z, y, x in ((0, 1, 3), (3, 0, 2), (2, 2, 1)):
        radius = math.sqrt(centres[x] ** 2 + centres[y] ** 2 + centres[z] ** 2)
        assert sigma[z, y, x].item() == pytest.approx((1 - radius / 0.3) * 20, rel=1e-5)
    # An asymmetric density tells the axes apart: sigma = x + 2y + 4z.
    generator.sample_mixed = lambda points, ws, planes: {"sigma": points @ torch.tensor([1.0, 2.0, 4.0])}
    sigma = density_grid(generator, ws, resolution=4, progress=False, noise_mode="none", planes="given")
    assert sigma[0, 0, 3].item() == pytest.approx(0.375 - 0.375 * 2 - 0.375 * 4)
    assert sigma[3, 0, 0].item() == pytest.approx(-0.375 - 0.75 + 1.5)
    assert generator.planes_calls == ["const"]  # given planes: no synthesis
    with pytest.raises(ValueError, match=r"^ws must have shape \(1, num_ws, w_dim\) \(one sample\), got \(2, 3, 4\)$"):
        density_grid(generator, torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"^ws must have shape \(1, num_ws, w_dim\) \(one sample\), got \(3, 4\)$"):
        density_grid(generator, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="^resolution must be at least 2, got 1$"):
        density_grid(generator, ws, resolution=1)
    assert density_grid(generator, ws, resolution=2, progress=False).shape == (2, 2, 2)


def test_the_mesh_of_a_ball_lies_on_its_sphere_in_world_coordinates():
    generator = BallGenerator()
    generator.rendering_kwargs = {"box_warp": 2.0}
    mesh = extract_mesh(generator, torch.zeros(1, 3, 4), resolution=24, level=10.0, progress=False)
    # sigma = 10 where |p| = 0.15.
    radii = torch.from_numpy(mesh.vertices).norm(dim=1)
    assert radii.mean().item() == pytest.approx(0.15, abs=0.01) and mesh.volume > 0
    with pytest.raises(ValueError, match=r"^extract_mesh: density ranges over \[.*\] and never crosses level=50.0; "
                                         r"choose a level inside that range$"):
        extract_mesh(generator, torch.zeros(1, 3, 4), resolution=8, level=50.0, progress=False)


# --- defaults and checks ------------------------------------------------------------------------------------

def test_the_generators_defaults_random_noise_no_truncation_no_average_update():
    generator = small_generator()
    z, c = torch.randn(2, 8, dtype=torch.float64), cameras()
    average = generator.backbone.mapping.w_avg.clone()
    with torch.no_grad():
        generator.backbone.mapping.w_avg.normal_()
        average = generator.backbone.mapping.w_avg.clone()
    torch.manual_seed(5)
    out = generator(z, c)
    assert torch.equal(generator.backbone.mapping.w_avg, average)
    torch.manual_seed(5)
    expected = generator.synthesis(generator.mapping(z, c), c)
    torch.testing.assert_close(out["image"], expected["image"])
    ws = generator.mapping(z, c)
    assert not torch.equal(generator.planes(ws), generator.planes(ws))  # random noise
    assert not torch.equal(generator.synthesis(ws, c)["image_raw"], generator.synthesis(ws, c)["image_raw"])
    points = torch.rand(2, 4, 3, dtype=torch.float64) - 0.5
    torch.manual_seed(6)
    sampled = generator.sample(points, z, c)
    torch.manual_seed(6)
    torch.testing.assert_close(sampled["sigma"], generator.sample_mixed(points, generator.mapping(z, c))["sigma"])
    assert not torch.equal(generator.sample_mixed(points, ws)["sigma"], generator.sample_mixed(points, ws)["sigma"])


def test_camera_labels_are_checked_against_the_batch_by_name():
    generator = small_generator()
    z, c = torch.randn(2, 8, dtype=torch.float64), cameras(3)
    with pytest.raises(ValueError, match="^c has 3 camera labels but the batch has 2 samples$"):
        generator.mapping(z, c)
    ws = torch.randn(2, generator.num_ws, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="^c has 3 camera labels but the batch has 2 samples$"):
        generator.synthesis(ws, c)
    with pytest.raises(ValueError, match=r"^c must be a floating tensor of camera labels with shape \(N, 25\)"):
        generator.synthesis(ws, c[:2, :16])
    with pytest.raises(ValueError, match=r"^c must be a floating tensor of camera labels with shape \(N, 25\)"):
        generator.mapping(z, c[:2, :16])
    with pytest.raises(ValueError, match=r"^MappingNetwork: z must have shape \(N, 8\), got \(8,\)$"):
        generator.mapping(z[0], c[:1])  # a z that is not (N, z_dim) is the mapping's to name


def test_synthesis_passes_its_block_hook_to_the_backbone():
    generator = small_generator()
    ws, c = torch.randn(1, generator.num_ws, 8, dtype=torch.float64), cameras(1)
    seen = []
    generator.synthesis(ws, c, noise_mode="none", block_hook=lambda res, x, img: seen.append(res) or (x, img))
    assert seen == [4, 8]



def test_extract_mesh_defaults_and_arguments(monkeypatch, capsys):
    import dreamportrait.models.mesh as mesh_module

    calls = []
    real = mesh_module.density_grid

    def recording(G, ws, resolution, **kwargs):
        calls.append((resolution, kwargs))
        return real(G, ws, 16, **kwargs)  # a small grid whatever was asked

    monkeypatch.setattr(mesh_module, "density_grid", recording)
    generator = BallGenerator()
    extract_mesh(generator, torch.zeros(1, 3, 4))  # 128³ cells, level 10, const noise, a progress bar
    assert calls == [(128, {"noise_mode": "const", "progress": True, "planes": None})]
    assert generator.planes_calls == ["const"] and "density grid" in capsys.readouterr().err
    extract_mesh(generator, torch.zeros(1, 3, 4), resolution=8, noise_mode="none", progress=False, planes="given")
    assert calls[1] == (8, {"noise_mode": "none", "progress": False, "planes": "given"})
    monkeypatch.setattr(mesh_module, "density_grid", real)
    mesh = extract_mesh(BallGenerator(), torch.zeros(1, 3, 4), resolution=32, progress=False)
    radii = torch.from_numpy(mesh.vertices).norm(dim=1)
    assert radii.mean().item() == pytest.approx(0.15, abs=0.005)  # level 10: sigma = 10 at |p| = 0.15


def test_the_mesh_is_centred_with_outward_normals_and_its_level_must_lie_strictly_inside_the_density():
    generator = BallGenerator()
    generator.rendering_kwargs = {"box_warp": 2.0}
    mesh = extract_mesh(generator, torch.zeros(1, 3, 4), resolution=24, level=10.0, progress=False)
    vertices = torch.from_numpy(mesh.vertices)
    assert vertices.mean(0).abs().max().item() < 0.002  # cell centres: no shift of a fraction of a cell
    normals = torch.from_numpy(mesh.vertex_normals.copy())
    cosine = (normals * vertices).sum(1) / (normals.norm(dim=1) * vertices.norm(dim=1))
    assert cosine.min().item() > 0.9  # outward, along the radius
    sigma = density_grid(generator, torch.zeros(1, 3, 4), resolution=6, progress=False)
    for level in (sigma.min().item(), sigma.max().item()):
        with pytest.raises(ValueError, match="never crosses level="):
            extract_mesh(generator, torch.zeros(1, 3, 4), resolution=6, level=level, progress=False)


def test_the_generator_records_its_exact_arguments_and_keeps_its_own_rendering_options():
    rendering = {**RENDERING, "avg_camera_pivot": [0, 0, 0.2], "density_prior": {"radius": 0.3, "strength": 2.0}}
    generator = TriPlaneGenerator(z_dim=8, c_dim=25, w_dim=8, img_resolution=16, img_channels=3,
                                  mapping_kwargs={"num_layers": 1}, rendering_kwargs=rendering,
                                  sr_kwargs={"block_channels": [4, 4]}, channel_base=64, channel_max=8,
                                  sr_num_fp16_res=1, neural_rendering_resolution=4, triplane_resolution=8,
                                  backend="reference")
    assert generator.init_kwargs == {
        "z_dim": 8, "c_dim": 25, "w_dim": 8, "img_resolution": 16, "img_channels": 3, "sr_num_fp16_res": 1,
        "mapping_kwargs": {"num_layers": 1}, "rendering_kwargs": rendering, "sr_kwargs": {"block_channels": [4, 4]},
        "neural_rendering_resolution": 4, "triplane_resolution": 8, "channel_base": 64, "channel_max": 8}
    rendering["avg_camera_pivot"][2] = 9.0
    rendering["density_prior"]["radius"] = 9.0
    assert generator.rendering_kwargs["avg_camera_pivot"] == [0, 0, 0.2]
    assert generator.rendering_kwargs["density_prior"]["radius"] == 0.3
    assert generator.renderer.backend == "reference" and generator.backbone.mapping.num_layers == 1
    assert generator.superresolution.block0.use_fp16  # sr_num_fp16_res passed on
    assert generator.backbone.synthesis.b4.conv1.weight.shape[0] == 8  # channel_max passed on
    assert generator.superresolution.block0.conv1.weight.shape[0] == 4  # sr_kwargs passed on
    assert generator.superresolution.sr_antialias is True and generator.decoder.net[0].bias_gain == 1
    defaults = TriPlaneGenerator(z_dim=8, c_dim=25, w_dim=8, img_resolution=16, img_channels=3,
                                 rendering_kwargs=RENDERING, sr_kwargs={"block_channels": [4, 4]}, channel_base=2048,
                                 channel_max=2)
    assert (defaults.init_kwargs["sr_num_fp16_res"], defaults.init_kwargs["neural_rendering_resolution"],
            defaults.init_kwargs["triplane_resolution"]) == (0, 64, 256)
    assert defaults.neural_rendering_resolution == 64 and defaults.backbone.synthesis.img_resolution == 256
    assert defaults.backbone.mapping.num_layers == 8 and not defaults.superresolution.block0.use_fp16


def test_the_renderer_passes_its_backend_to_every_op_and_fuses_only_full_precision(monkeypatch):
    backends = []
    real_march, real_sample = renderer_module.eg3d_ray_march, renderer_module.triplane_sample
    real_fused = renderer_module.sample_and_decode
    monkeypatch.setattr(renderer_module, "eg3d_ray_march",
                        lambda *a, **k: backends.append(("march", k.get("backend", "unset"))) or real_march(*a, **k))
    monkeypatch.setattr(renderer_module, "triplane_sample",
                        lambda *a, **k: backends.append(("sample", k.get("backend", "unset"))) or real_sample(*a, **k))
    monkeypatch.setattr(renderer_module, "sample_and_decode",
                        lambda *a, **k: backends.append(("fused", k.get("backend", "unset"))) or real_fused(*a, **k))
    generator = small_generator()
    planes = torch.randn(1, 3, 32, 8, 8, dtype=torch.float64)
    origins, directions = rays(1, 2)
    ImportanceRenderer("reference")(planes, generator.decoder, origins, directions, generator.rendering_kwargs)
    assert backends == [("fused", "reference"), ("march", "reference"), ("fused", "reference"), ("march", "reference")]
    backends.clear()
    points = torch.rand(1, 3, 3, dtype=torch.float64) - 0.5
    decoder = copy.deepcopy(generator.decoder)
    decoder.register_forward_pre_hook(lambda module, args: None)
    ImportanceRenderer("reference").run_model(planes, decoder, points, generator.rendering_kwargs)
    assert backends == [("sample", "reference")]
    backends.clear()
    half = copy.deepcopy(generator.decoder).half()
    ImportanceRenderer("reference").run_model(planes.half(), half, points.half(), generator.rendering_kwargs)
    assert backends == [("sample", "reference")]  # float16 planes: sampled, then decoded
    # A float32 decoder on float64 planes is fused in the planes' precision.
    single = copy.deepcopy(generator.decoder).float()
    fused = ImportanceRenderer("reference").run_model(planes, single, points, generator.rendering_kwargs)
    unfused = single(real_sample(planes, points, 1, EG3D_AXES, "mean", backend="reference"))
    assert fused["sigma"].dtype == torch.float64
    torch.testing.assert_close(fused["sigma"], unfused["sigma"])


def test_one_fine_sample_still_makes_a_fine_pass(monkeypatch):
    generator = small_generator()
    planes = torch.randn(1, 3, 32, 8, 8, dtype=torch.float64)
    origins, directions = rays(1, 2)
    options = {**generator.rendering_kwargs, "depth_resolution_importance": 1, "deterministic_sampling": True}
    calls = []
    real = renderer_module.importance_depths
    monkeypatch.setattr(renderer_module, "importance_depths", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    ImportanceRenderer("reference")(planes, generator.decoder, origins, directions, options)
    assert calls == [1]
