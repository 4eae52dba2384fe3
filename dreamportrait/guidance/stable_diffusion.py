"""Score Distillation Sampling from a frozen text-to-image diffusion model (diffusers).

For a rendered image x (VAE-encoded to latents z for latent models), SDS draws a timestep t and
noise ε, noises ``z_t = sqrt(ᾱ_t) z + sqrt(1 - ᾱ_t) ε``, predicts ε̂ with classifier-free guidance
``ε̂ = ε̂_uncond + s (ε̂_cond - ε̂_uncond)`` and pushes z along ``-w(t) (ε̂ - ε)``, without
back-propagating through the diffusion model: the loss ``0.5 ||z - sg(z - g)||² / B`` has exactly
the gradient ``g / B`` with ``g = w(t) (ε̂ - ε)``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..text.encoder import TextEncoder, TextFeatures, check_encoder_states

WEIGHTINGS = ("sds", "uniform", "fantasia3d")
VIEWS = ("front", "side", "back")
"""The view words of view-dependent prompts ("..., side view"), by :func:`view_of_yaw`."""


@dataclass
class SDSOutput:
    """loss: scalar whose gradient w.r.t. the latents is ``grad / B``; grad ``(B, C, h, w)``: the
    SDS gradient ``w(t) (ε̂ - ε)`` (after clipping); t ``(B,)``; latents ``(B, C, h, w)``."""

    loss: Tensor
    grad: Tensor
    t: Tensor
    latents: Tensor


def view_of_yaw(yaw: Tensor, front_degrees: float = 45.0, back_degrees: float = 45.0) -> list[str]:
    """"front", "side" or "back" for camera azimuths ``yaw`` (EG3D convention, pi/2 = frontal):
    front within ``front_degrees`` of frontal, back within ``back_degrees`` of behind."""
    front, side, back = VIEWS
    offset = torch.rad2deg(torch.remainder(yaw - math.pi / 2 + math.pi, 2 * math.pi) - math.pi).abs()
    return [front if a <= front_degrees else back if a >= 180 - back_degrees else side for a in offset.tolist()]


def with_view_suffix(prompts: Sequence[str], views: Sequence[str]) -> list[str]:
    """DreamFusion's view-dependent prompts: ``"<prompt>, <view> view"`` (an empty prompt stays empty)."""
    return [f"{prompt}, {view} view" if prompt else prompt for prompt, view in zip(prompts, views)]


def _component(source: str | Path, subfolder: str) -> tuple[str, dict]:
    path = Path(source)
    if path.is_dir():
        if not (path / subfolder).is_dir():
            raise FileNotFoundError(f"guidance model {source}: no {subfolder}/ directory")
        return str(path / subfolder), {}
    if path.exists() or str(source).startswith((".", "/", "~")):
        raise FileNotFoundError(f"guidance model {source} is not a directory")
    return str(source), {"subfolder": subfolder}


def encoder_states_of(source: str | Path) -> str:
    """Which text-encoder states a model directory's UNet was trained to read: ``"all"`` 77, as
    Stable Diffusion (and any hub id), or ``"words"``, the start and word states with the end
    token's and the padding's zeroed (a world teacher built with
    ``TeacherConfig(encoder_states="words")``; its ``model_index.json`` records it)."""
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return "all"
    return check_encoder_states(json.loads(index.read_text()).get("teacher_config", {}).get("encoder_states", "all"))


class StableDiffusionGuidance(nn.Module):
    """SDS guidance from a Stable Diffusion 1.x/2.x checkpoint or a pixel-space diffusion model.

    Args:
        source: a diffusers model directory (``unet/``, ``scheduler/``, ``tokenizer/``,
            ``text_encoder/``, and ``vae/`` for latent models) or a hub id.
        guidance_scale: classifier-free guidance scale s (DreamFusion uses 100).
        t_range: ``(t_min, t_max)`` as fractions of the training timesteps; t is uniform in it.
        t_max_final: with it, t_max moves linearly to this value as ``step_ratio`` goes 0 -> 1.
        weighting: w(t): ``"sds"`` (1 - ᾱ_t), ``"uniform"`` (1) or ``"fantasia3d"`` (sqrt(ᾱ_t)(1 - ᾱ_t)).
        grad_clip: clamp the SDS gradient elementwise to ±grad_clip (None: no clipping).
        view_dependent_prompts: append "front/side/back view" from the camera azimuth.
        half_precision: run the frozen models in float16 (default: on CUDA).
        encoder_states: which text-encoder states the UNet reads, ``"all"`` or ``"words"``
            (:meth:`TextFeatures.word_tokens`); default: what the model directory records
            (:func:`encoder_states_of`).
        attention_slicing, channels_last: memory/speed options of the UNet.
        text_encoder: the prompts' encoder (default: the directory's ``tokenizer/`` and
            ``text_encoder/``, which encode a prompt whole or phrase by phrase as the text
            encoder's config records: :func:`~dreamportrait.text.encoder.encode_text`).
    """

    def __init__(self, source: str | Path, guidance_scale: float = 7.5, t_range: tuple[float, float] = (0.02, 0.98),
                 t_max_final: float | None = None, weighting: str = "sds", grad_clip: float | None = None,
                 view_dependent_prompts: bool = True, half_precision: bool | None = None,
                 attention_slicing: bool = False, channels_last: bool = False, device: torch.device | str = "cpu",
                 text_encoder: TextEncoder | None = None, encoder_states: str | None = None):
        super().__init__()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.encoder_states = (encoder_states_of(source) if encoder_states is None
                               else check_encoder_states(encoder_states))
        if not 0 <= t_range[0] < t_range[1] <= 1:
            raise ValueError(f"t_range must satisfy 0 <= t_min < t_max <= 1, got {tuple(t_range)}")
        device = torch.device(device)
        half_precision = device.type == "cuda" if half_precision is None else half_precision
        self.dtype = torch.float16 if half_precision else torch.float32
        name, kwargs = _component(source, "unet")
        self.unet = UNet2DConditionModel.from_pretrained(name, torch_dtype=self.dtype, **kwargs).to(device)
        name, kwargs = _component(source, "scheduler")
        self.scheduler = DDPMScheduler.from_pretrained(name, **kwargs)
        self.vae = None
        if not Path(source).is_dir() or (Path(source) / "vae").is_dir():
            name, kwargs = _component(source, "vae")
            self.vae = AutoencoderKL.from_pretrained(name, torch_dtype=self.dtype, **kwargs).to(device)
        self.text_encoder = text_encoder or TextEncoder(source, device=device, dtype=self.dtype)
        for module in (self.unet, self.vae):
            if module is not None:
                module.requires_grad_(False).eval()
        if attention_slicing:
            self.unet.set_attention_slice("auto")
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.register_buffer("alphas_cumprod", self.scheduler.alphas_cumprod.to(device, torch.float32), persistent=False)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.guidance_scale, self.weighting, self.grad_clip = guidance_scale, weighting, grad_clip
        self.t_range, self.t_max_final = tuple(t_range), t_max_final
        self.view_dependent_prompts = view_dependent_prompts
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"guidance model predicts {self.prediction_type!r}; supported: 'epsilon', 'v_prediction'")

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    @property
    def image_resolution(self) -> int:
        """The image size the model works at (renders are resized to it)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        return self.unet.config.sample_size * factor

    def timestep_range(self, step_ratio: float | None = None) -> tuple[int, int]:
        t_min, t_max = self.t_range
        if self.t_max_final is not None and step_ratio is not None:
            t_max = t_max + (self.t_max_final - t_max) * min(max(step_ratio, 0.0), 1.0)
        low = int(t_min * self.num_train_timesteps)
        return low, max(low, min(int(t_max * self.num_train_timesteps), self.num_train_timesteps - 1))

    def weights(self, t: Tensor) -> Tensor:
        alpha_bar = self.alphas_cumprod[t]
        if self.weighting == "sds":
            return 1 - alpha_bar
        if self.weighting == "fantasia3d":
            return alpha_bar.sqrt() * (1 - alpha_bar)
        return torch.ones_like(alpha_bar)

    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> what the UNet denoises (VAE latents or pixels)."""
        size = self.image_resolution
        if images.shape[-2:] != (size, size):
            antialias = images.shape[-1] > size
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
        if self.vae is None:
            return images
        posterior = self.vae.encode(images.to(self.dtype)).latent_dist
        return posterior.sample(generator=generator).float() * self.vae.config.scaling_factor

    def text_features(self, prompts: Sequence[str], yaws: Tensor | None = None) -> tuple[TextFeatures, TextFeatures]:
        """Conditional (view-suffixed when enabled and yaws are given) and unconditional features."""
        if self.view_dependent_prompts and yaws is not None:
            prompts = with_view_suffix(prompts, view_of_yaw(yaws))
        return self.text_encoder(list(prompts)), self.text_encoder([""] * len(prompts))

    @torch.no_grad()
    def predict_noise(self, noisy: Tensor, t: Tensor, conditional: TextFeatures, unconditional: TextFeatures) -> Tensor:
        """Classifier-free-guided ε̂ for ``noisy`` latents at timesteps t (both in one UNet call)."""
        model_input = torch.cat([noisy, noisy]).to(self.dtype)
        context = torch.cat([text.unet_context(self.encoder_states) for text in (conditional, unconditional)])
        context = context.to(self.dtype)
        output = self.unet(model_input, torch.cat([t, t]), encoder_hidden_states=context).sample.float()
        if self.prediction_type == "v_prediction":  # v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0  =>  ε = sqrt(ᾱ) v + sqrt(1 - ᾱ) x_t
            alpha_bar = self.alphas_cumprod[torch.cat([t, t])].view(-1, 1, 1, 1)
            output = alpha_bar.sqrt() * output + (1 - alpha_bar).sqrt() * model_input.float()
        conditional_eps, unconditional_eps = output.chunk(2)
        return unconditional_eps + self.guidance_scale * (conditional_eps - unconditional_eps)

    def sds_loss(self, images: Tensor, prompts: Sequence[str], yaws: Tensor | None = None,
                 step_ratio: float | None = None, t: Tensor | None = None, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> SDSOutput:
        """The SDS loss of rendered ``images`` ``(B, 3, H, W)`` in [-1, 1] for ``prompts`` (one each).

        ``yaws`` ``(B,)`` (camera azimuths) select view suffixes; ``t`` and ``noise`` may be given,
        else they are drawn (with ``generator``); ``step_ratio`` in [0, 1] anneals t_max.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        if isinstance(prompts, str) or len(prompts) != images.shape[0]:
            raise ValueError(f"prompts must be a list of {images.shape[0]} strings (one per image)")
        batch = images.shape[0]
        latents = self.encode_images(images, generator)
        if t is None:
            low, high = self.timestep_range(step_ratio)
            t = torch.randint(low, high + 1, (batch,), generator=generator, device=generator.device if generator else "cpu")
        t = t.to(self.device, torch.long)
        if noise is None:
            noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else "cpu")
        noise = noise.to(latents.device, latents.dtype)
        conditional, unconditional = self.text_features(prompts, yaws)
        noisy = self.scheduler.add_noise(latents.detach(), noise, t)
        eps_hat = self.predict_noise(noisy, t, conditional, unconditional)
        grad = self.weights(t).view(-1, 1, 1, 1) * (eps_hat - noise)
        grad = torch.nan_to_num(grad)
        if self.grad_clip is not None:
            grad = grad.clamp(-self.grad_clip, self.grad_clip)
        target = (latents - grad).detach()
        loss = 0.5 * F.mse_loss(latents, target, reduction="sum") / batch
        return SDSOutput(loss, grad, t, latents)
