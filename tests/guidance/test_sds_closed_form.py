"""SDS weightings, classifier-free guidance, the timestep range and the loss's gradient, pinned to
closed forms with a stand-in UNet whose outputs are known (no diffusers model involved)."""

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dreamportrait.guidance import StableDiffusionGuidance, view_of_yaw


def stable_diffusion_alphas_cumprod(steps=1000, beta_start=0.00085, beta_end=0.012):
    """Stable Diffusion's "scaled_linear" schedule: betas linear in sqrt, alpha_bar their running product."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, steps) ** 2
    return np.cumprod(1 - betas)


class Features:
    def __init__(self, value):
        self.value = value

    def unet_context(self, encoder_states):
        return torch.full((1, 2, 3), self.value)


class ConstantUNet:
    """ε̂ = context value (cond 2.0, uncond -1.0) + 0.01 t: cond and uncond told apart by their values."""

    def __call__(self, x, t, encoder_hidden_states):
        context = encoder_hidden_states[:, 0, 0].repeat_interleave(x.shape[0] // encoder_hidden_states.shape[0])
        value = context.view(-1, 1, 1, 1) + 0.01 * t.view(-1, 1, 1, 1).float()
        return SimpleNamespace(sample=value.expand_as(x).clone())


def guidance(weighting="sds", scale=7.5, grad_clip=None, prediction_type="epsilon", t_range=(0.02, 0.98),
             t_max_final=None):
    g = StableDiffusionGuidance.__new__(StableDiffusionGuidance)
    nn.Module.__init__(g)
    g.register_buffer("alphas_cumprod", torch.tensor(stable_diffusion_alphas_cumprod(), dtype=torch.float32),
                      persistent=False)
    g.num_train_timesteps, g.weighting, g.guidance_scale, g.grad_clip = 1000, weighting, scale, grad_clip
    g.t_range, g.t_max_final, g.prediction_type = t_range, t_max_final, prediction_type
    g.encoder_states, g.dtype, g.unet, g.vae = "all", torch.float32, ConstantUNet(), None
    g.view_dependent_prompts = False
    g.text_features = lambda prompts, yaws=None: (Features(2.0), Features(-1.0))
    g.encode_images = lambda images, generator=None: images
    g.scheduler = SimpleNamespace(add_noise=lambda x, noise, t: (
        g.alphas_cumprod[t].view(-1, 1, 1, 1).sqrt() * x + (1 - g.alphas_cumprod[t].view(-1, 1, 1, 1)).sqrt() * noise))
    return g


def test_weightings_are_the_published_functions_of_alpha_bar():
    alpha_bar = stable_diffusion_alphas_cumprod()
    t = torch.tensor([0, 20, 500, 979, 999])
    a = alpha_bar[t.numpy()]
    expected = {"sds": 1 - a, "uniform": np.ones_like(a), "fantasia3d": np.sqrt(a) * (1 - a)}
    for weighting, values in expected.items():
        assert np.allclose(guidance(weighting).weights(t).numpy(), values, rtol=1e-4, atol=1e-7), weighting
    # DreamFusion's w(t) = 1 - alpha_bar grows with the noise level.
    w = guidance("sds").weights(torch.arange(1000)).numpy()
    assert (np.diff(w) > 0).all() and w[0] == pytest.approx(0.00085, rel=1e-3)


@pytest.mark.parametrize("scale", [1.0, 7.5, 100.0])
def test_classifier_free_guidance_extrapolates_from_unconditional_toward_conditional(scale):
    g = guidance(scale=scale)
    t = torch.tensor([10, 400])
    eps = g.predict_noise(torch.zeros(2, 3, 4, 4), t, Features(2.0), Features(-1.0))
    for i, step in enumerate(t.tolist()):
        cond, uncond = 2.0 + 0.01 * step, -1.0 + 0.01 * step
        assert torch.allclose(eps[i], torch.tensor(uncond + scale * (cond - uncond)), rtol=1e-5)


def test_v_prediction_is_converted_to_noise_from_x_t_and_alpha_bar():
    g = guidance(scale=1.0, prediction_type="v_prediction")
    t = torch.tensor([100, 900])
    noisy = torch.randn(2, 3, 4, 4)
    eps = g.predict_noise(noisy, t, Features(2.0), Features(-1.0))
    a = torch.tensor(stable_diffusion_alphas_cumprod()[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    v = 2.0 + 0.01 * t.view(-1, 1, 1, 1).float()
    assert torch.allclose(eps, a.sqrt() * v + (1 - a).sqrt() * noisy, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighting", ["sds", "fantasia3d"])
def test_sds_gradient_is_the_weighted_guided_residual_and_the_loss_has_it_over_b(weighting):
    scale, batch = 3.0, 3
    g = guidance(weighting, scale=scale)
    images = (torch.rand(batch, 3, 4, 4) * 2 - 1).requires_grad_(True)
    t, noise = torch.tensor([50, 500, 950]), torch.randn(batch, 3, 4, 4)
    out = g.sds_loss(images, ["a"] * batch, t=t, noise=noise)
    a = stable_diffusion_alphas_cumprod()[t.numpy()]
    w = (1 - a) if weighting == "sds" else np.sqrt(a) * (1 - a)
    eps_hat = -1.0 + 0.01 * t.numpy() + scale * 3.0
    expected = w.reshape(-1, 1, 1, 1) * (eps_hat.reshape(-1, 1, 1, 1) - noise.numpy())
    assert np.allclose(out.grad.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.t, t)
    assert out.loss.item() == pytest.approx(0.5 * (out.grad**2).sum().item() / batch, rel=1e-5)
    out.loss.backward()
    assert torch.allclose(images.grad, out.grad / batch, rtol=1e-4, atol=1e-7)


def test_gradient_clipping_clamps_each_element_and_non_finite_values_become_zero():
    g = guidance("uniform", scale=100.0, grad_clip=0.5)
    images = torch.zeros(2, 3, 4, 4)
    noise = torch.zeros(2, 3, 4, 4)
    noise[0, 0, 0, 0] = float("nan")
    out = g.sds_loss(images, ["a", "b"], t=torch.tensor([0, 10]), noise=noise)
    assert out.grad.abs().max().item() == pytest.approx(0.5) and torch.isfinite(out.grad).all()
    # eps_hat = -1 + 0.01 t + 300 > 0.5 everywhere: clamped to exactly 0.5
    assert torch.equal(out.grad[1], torch.full((3, 4, 4), 0.5))
    assert out.grad[0, 0, 0, 0] == 0


def test_timestep_range_is_the_fraction_of_the_training_steps_annealed_linearly():
    assert guidance(t_range=(0.02, 0.98)).timestep_range() == (20, 980)
    g = guidance(t_range=(0.2, 0.6), t_max_final=0.3)
    assert g.timestep_range(0.0) == (200, 600)
    low, high = g.timestep_range(0.5)
    assert low == 200 and abs(high - 450) <= 1  # int() of 0.45 * 1000 in floating point
    assert g.timestep_range(1.0) == (200, 300) == g.timestep_range(2.0)
    assert g.timestep_range(-1.0) == (200, 600) and g.timestep_range(None) == (200, 600)
    assert guidance(t_range=(0.5, 1.0)).timestep_range() == (500, 999)  # t = 1000 does not exist
    assert guidance(t_range=(0.5, 0.6), t_max_final=0.1).timestep_range(1.0) == (500, 500)  # never below t_min
    draws = guidance(t_range=(0.2, 0.21)).sds_loss(torch.zeros(64, 3, 2, 2), ["a"] * 64,
                                                   generator=torch.Generator().manual_seed(0)).t
    assert set(draws.tolist()) == set(range(200, 211))  # both ends included


def test_view_of_yaw_boundaries():
    frontal = math.pi / 2
    degrees = torch.tensor([0.0, 44.9, 45.1, 134.9, 135.1, 180.0, -44.9, -45.1, -135.1, 359.0])
    views = view_of_yaw(frontal + torch.deg2rad(degrees))
    assert views == ["front", "front", "side", "side", "back", "back", "front", "side", "back", "front"]
    assert view_of_yaw(frontal + torch.deg2rad(torch.tensor([30.0, 100.0])), front_degrees=20,
                       back_degrees=90) == ["side", "back"]


def test_view_boundaries_are_inclusive():
    frontal = math.pi / 2
    exact = torch.tensor([frontal, frontal + math.pi], dtype=torch.float64)  # offsets of exactly 0 and 180 degrees
    assert view_of_yaw(exact, front_degrees=0, back_degrees=0) == ["front", "back"]


def test_renders_are_resized_bilinearly_with_antialiasing_when_shrunk():
    g = StableDiffusionGuidance.__new__(StableDiffusionGuidance)
    nn.Module.__init__(g)
    g.vae, g.unet = None, SimpleNamespace(config=SimpleNamespace(sample_size=8))  # a pixel-space model of 8²
    checkerboard = ((torch.arange(24)[:, None] + torch.arange(24)[None]) % 2 * 2 - 1.0).expand(1, 3, 24, 24)
    shrunk = g.encode_images(checkerboard)
    # Sampling every third pixel would keep the +-1 pattern; an antialiased resize averages it away.
    assert shrunk.shape == (1, 3, 8, 8) and shrunk.abs().max() < 0.2
    ramp = torch.linspace(-1, 1, 4).view(1, 1, 1, 4).expand(1, 3, 4, 4)
    grown = g.encode_images(ramp)  # half-pixel centres (align_corners=False): the ends are clamped, not stretched
    assert torch.allclose(grown[0, 0, 0], torch.tensor([-1, -5 / 6, -1 / 2, -1 / 6, 1 / 6, 1 / 2, 5 / 6, 1]) * 1.0)
    expected = torch.nn.functional.interpolate(ramp, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(grown, expected) and not torch.allclose(
        grown, torch.nn.functional.interpolate(ramp, size=(8, 8), mode="bilinear", align_corners=True))
    same = torch.rand(2, 3, 8, 8)
    assert torch.equal(g.encode_images(same), same)  # the model's size: untouched


def test_view_suffixes_only_when_enabled():
    g = guidance()
    del g.text_features  # the class's own method, with a recording encoder
    seen = []
    g.text_encoder = lambda prompts: seen.append(list(prompts)) or prompts
    yaws = torch.tensor([math.pi / 2, math.pi / 2 + 1.2])
    for enabled, expected in ((False, ["a", "b"]), (True, ["a, front view", "b, side view"])):
        g.view_dependent_prompts = enabled
        seen.clear()
        g.text_features(["a", "b"], yaws)
        assert seen == [expected, ["", ""]]
    seen.clear()
    g.text_features(["a", "b"])  # no yaws: no suffixes
    assert seen[0] == ["a", "b"]


def test_local_model_paths_that_do_not_exist_are_named_not_fetched(tmp_path):
    from dreamportrait.guidance.stable_diffusion import _component

    for source in ("./no-such-model", "/no/such/model", "~/no-such-model"):
        with pytest.raises(FileNotFoundError, match="is not a directory"):
            _component(source, "unet")
    assert _component("someone/some-model", "unet") == ("someone/some-model", {"subfolder": "unet"})
    (tmp_path / "unet").mkdir()
    assert _component(tmp_path, "unet") == (str(tmp_path / "unet"), {})


def test_encoder_states_come_from_the_model_index_or_default_to_all(tmp_path):
    import json

    from dreamportrait.guidance.stable_diffusion import encoder_states_of

    assert encoder_states_of(tmp_path) == "all"  # no model_index.json: a Stable Diffusion directory or hub id
    index = tmp_path / "model_index.json"
    for content, expected in (({}, "all"), ({"teacher_config": {}}, "all"),
                              ({"teacher_config": {"encoder_states": "words"}}, "words"),
                              ({"teacher_config": {"encoder_states": "all"}}, "all")):
        index.write_text(json.dumps(content))
        assert encoder_states_of(tmp_path) == expected, content
    index.write_text(json.dumps({"teacher_config": {"encoder_states": "some"}}))
    with pytest.raises(ValueError, match="encoder_states"):
        encoder_states_of(tmp_path)


def test_guidance_settings_as_given(tiny_pixel_sd):
    made = StableDiffusionGuidance(tiny_pixel_sd, t_range=(0.0, 1.0), encoder_states="words")
    assert made.guidance_scale == 7.5 and made.weighting == "sds" and made.grad_clip is None  # the defaults
    assert made.encoder_states == "words" and made.timestep_range() == (0, 999)
    assert made.dtype == torch.float32 and next(made.unet.parameters()).dtype == torch.float32  # CPU: full precision
    # Defaults: no attention slicing, no channels-last weights.
    assert not any("Sliced" in type(p).__name__ for p in made.unet.attn_processors.values())
    assert all(p.is_contiguous() for p in made.unet.parameters())
    half = StableDiffusionGuidance(tiny_pixel_sd, half_precision=True, attention_slicing=True)
    assert half.dtype == torch.float16 and next(half.unet.parameters()).dtype == torch.float16
    assert any("Sliced" in type(p).__name__ for p in half.unet.attn_processors.values())
    with pytest.raises(ValueError, match="encoder_states"):
        StableDiffusionGuidance(tiny_pixel_sd, encoder_states="some")
    for t_range in ((0.3, 0.3), (0.5, 1.5), (-0.1, 0.5)):
        with pytest.raises(ValueError, match="t_range"):
            StableDiffusionGuidance(tiny_pixel_sd, t_range=t_range)


def test_frozen_models_and_buffers(tiny_latent_sd, tmp_path):
    from tiny_models import write_tiny_stable_diffusion

    made = StableDiffusionGuidance(tiny_latent_sd, channels_last=True)
    for module in (made.unet, made.vae):
        assert not any(p.requires_grad for p in module.parameters()) and not module.training
    assert "alphas_cumprod" not in made.state_dict() and made.alphas_cumprod.dtype == torch.float32
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in made.unet.parameters())
    half = StableDiffusionGuidance(tiny_latent_sd, half_precision=True)
    assert next(half.vae.parameters()).dtype == torch.float16
    assert next(half.text_encoder.model.parameters()).dtype == torch.float16
    sample_model = write_tiny_stable_diffusion(tmp_path, latent=False, prediction_type="sample")
    with pytest.raises(ValueError, match=r"^guidance model predicts 'sample'; supported: 'epsilon', 'v_prediction'$"):
        StableDiffusionGuidance(sample_model)


def test_sds_draws_come_from_the_given_generator_and_timesteps_may_be_floats():
    g = guidance(t_range=(0.1, 0.9))
    images = torch.rand(3, 3, 4, 4)
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        runs.append(g.sds_loss(images, ["a"] * 3, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(runs[0].t, runs[1].t) and torch.equal(runs[0].grad, runs[1].grad)
    expected_t = torch.randint(100, 901, (3,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(runs[0].t, expected_t)
    as_floats = g.sds_loss(images, ["a"] * 3, t=expected_t.float(), noise=torch.zeros(3, 3, 4, 4))
    as_ints = g.sds_loss(images, ["a"] * 3, t=expected_t, noise=torch.zeros(3, 3, 4, 4))
    assert as_floats.t.dtype == torch.long and torch.equal(as_floats.grad, as_ints.grad)
    wide = g.sds_loss(images, ["a"] * 3, t=expected_t, noise=torch.zeros(3, 3, 4, 4, dtype=torch.float64))
    assert wide.grad.dtype == torch.float32 and torch.equal(wide.grad, as_ints.grad)  # noise in the latents' dtype
    for shape in ((2, 3, 8), (2, 4, 8, 8)):
        pattern = re.escape(f"images must have shape (B, 3, H, W), got {shape}")
        with pytest.raises(ValueError, match=f"^{pattern}$"):
            g.sds_loss(torch.zeros(shape), ["a", "b"])


def test_half_precision_latents_are_encoded_in_the_vaes_precision_and_returned_in_float32(tiny_latent_sd):
    half = StableDiffusionGuidance(tiny_latent_sd, half_precision=True)
    latents = half.encode_images(torch.rand(1, 3, 32, 32) * 2 - 1, torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float32 and latents.shape == (1, 4, 16, 16) and torch.isfinite(latents).all()
