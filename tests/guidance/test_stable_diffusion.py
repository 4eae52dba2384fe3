"""SDS guidance against an independent computation with tiny diffusers models."""

import math

import pytest
import torch
from support import assert_close_scaled
from tiny_models import write_tiny_stable_diffusion

from dreamportrait.guidance import StableDiffusionGuidance, view_of_yaw, with_view_suffix

PROMPTS = ["a portrait of a bald man", "a portrait of a woman with red hair"]


def expected_gradient(guidance, latents, noise, t, prompts, scale, weighting="sds"):
    """w(t) (ε̂ - ε), each UNet call separate, noise added from the scheduler's ᾱ by hand."""
    alpha_bar = guidance.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    encoder = guidance.text_encoder
    with torch.no_grad():
        conditional = guidance.unet(noisy, t, encoder_hidden_states=encoder(prompts).tokens).sample
        unconditional = guidance.unet(noisy, t, encoder_hidden_states=encoder([""] * len(prompts)).tokens).sample
    if guidance.prediction_type == "v_prediction":
        conditional = alpha_bar.sqrt() * conditional + (1 - alpha_bar).sqrt() * noisy
        unconditional = alpha_bar.sqrt() * unconditional + (1 - alpha_bar).sqrt() * noisy
    eps_hat = unconditional + scale * (conditional - unconditional)
    weight = {"sds": 1 - alpha_bar, "uniform": torch.ones_like(alpha_bar),
              "fantasia3d": alpha_bar.sqrt() * (1 - alpha_bar)}[weighting]
    return weight * (eps_hat - noise)


@pytest.mark.parametrize("weighting", ["sds", "uniform", "fantasia3d"])
def test_pixel_space_gradient_is_weighted_noise_residual(tiny_pixel_sd, weighting):
    guidance = StableDiffusionGuidance(tiny_pixel_sd, guidance_scale=7.5, weighting=weighting,
                                       view_dependent_prompts=False)
    images = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    t, noise = torch.tensor([120, 800]), torch.randn(2, 3, 32, 32)
    out = guidance.sds_loss(images, PROMPTS, t=t, noise=noise)
    expected = expected_gradient(guidance, images.detach(), noise, t, PROMPTS, 7.5, weighting)
    # The guidance runs both branches as one UNet batch, the reference as two calls: float32 rounding
    # then differs by up to ~3e-6 of the residual's scale (measured over 60 draws), so the tolerance is
    # relative to that scale, 10x above it and far below any real error (a wrong weight is O(1)).
    assert_close_scaled(out.grad, expected, 3e-5, "grad")
    out.loss.backward()
    # The target trick: d/dx 0.5 |x - sg(x - g)|² / B = g / B, up to float32 rounding of x - g.
    assert_close_scaled(images.grad, out.grad / 2, 1e-5, "images.grad")


def test_latent_gradient_goes_through_the_vae(tiny_latent_sd):
    guidance = StableDiffusionGuidance(tiny_latent_sd, guidance_scale=1.0, view_dependent_prompts=False)
    images = (torch.rand(2, 3, 64, 64) * 2 - 1).requires_grad_(True)  # resized to 32² first
    t, noise = torch.tensor([500, 30]), torch.randn(2, 4, 16, 16)
    out = guidance.sds_loss(images, PROMPTS, t=t, noise=noise, generator=torch.Generator().manual_seed(3))
    latents = guidance.encode_images(images.detach(), torch.Generator().manual_seed(3))
    torch.testing.assert_close(out.latents.detach(), latents)
    # Scale 1: classifier-free guidance reduces to the conditional prediction.
    assert_close_scaled(out.grad, expected_gradient(guidance, latents, noise, t, PROMPTS, 1.0), 3e-5, "grad")
    out.loss.backward()
    assert images.grad.abs().sum() > 0
    expected = torch.autograd.grad((guidance.encode_images(images, torch.Generator().manual_seed(3)) * out.grad / 2).sum(), images)[0]
    torch.testing.assert_close(images.grad, expected, rtol=1e-4, atol=1e-7)


def test_v_prediction_models_are_converted_to_noise(tmp_path):
    guidance = StableDiffusionGuidance(write_tiny_stable_diffusion(tmp_path, latent=False, prediction_type="v_prediction"),
                                       guidance_scale=3.0, view_dependent_prompts=False)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    t, noise = torch.tensor([200, 700]), torch.randn(2, 3, 32, 32)
    out = guidance.sds_loss(images, PROMPTS, t=t, noise=noise)
    assert_close_scaled(out.grad, expected_gradient(guidance, images, noise, t, PROMPTS, 3.0), 3e-5, "grad")


def test_timesteps_clipping_and_annealing(tiny_pixel_sd):
    guidance = StableDiffusionGuidance(tiny_pixel_sd, t_range=(0.2, 0.6), t_max_final=0.3, grad_clip=0.01,
                                       view_dependent_prompts=False)
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    early = guidance.sds_loss(images, PROMPTS * 4, step_ratio=0.0, generator=generator)
    late = guidance.sds_loss(images, PROMPTS * 4, step_ratio=1.0, generator=generator)
    assert early.t.min() >= 200 and early.t.max() <= 600 and early.t.max() > 300
    assert late.t.min() >= 200 and late.t.max() <= 300
    assert early.grad.abs().max() <= 0.01 + 1e-7
    with pytest.raises(ValueError, match="t_range"):
        StableDiffusionGuidance(tiny_pixel_sd, t_range=(0.5, 0.4))


def test_view_dependent_prompts(tiny_pixel_sd, monkeypatch):
    frontal = math.pi / 2
    assert view_of_yaw(torch.tensor([frontal, frontal + 0.5, frontal - 1.2, frontal + math.pi])) == \
        ["front", "front", "side", "back"]
    assert with_view_suffix(["a man", ""], ["side", "front"]) == ["a man, side view", ""]
    guidance = StableDiffusionGuidance(tiny_pixel_sd)
    seen = []
    encode = guidance.text_encoder.forward
    monkeypatch.setattr(guidance.text_encoder, "forward", lambda prompts: seen.append(list(prompts)) or encode(prompts))
    guidance.sds_loss(torch.rand(2, 3, 32, 32), PROMPTS, yaws=torch.tensor([frontal, frontal + 1.2]))
    assert seen[0] == [f"{PROMPTS[0]}, front view", f"{PROMPTS[1]}, side view"] and seen[1] == ["", ""]


def test_bad_input_is_named(tiny_pixel_sd, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing-model is not a directory"):
        StableDiffusionGuidance(tmp_path / "missing-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no unet/ directory"):
        StableDiffusionGuidance(tmp_path / "empty")
    guidance = StableDiffusionGuidance(tiny_pixel_sd)
    with pytest.raises(ValueError, match="list of 2 strings"):
        guidance.sds_loss(torch.rand(2, 3, 32, 32), PROMPTS[:1])
    with pytest.raises(ValueError, match="weighting"):
        StableDiffusionGuidance(tiny_pixel_sd, weighting="linear")
