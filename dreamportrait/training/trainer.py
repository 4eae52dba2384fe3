"""SDS on distribution with a GAN regulariser: the DreamPortrait trainer.

Each step draws a batch of (z, camera, prompt), renders it with the text-conditioned generator,
and updates the generator with the SDS loss of the renders (the expectation is over the
generator's whole distribution) plus ``λ_gan`` times the non-saturating adversarial loss; the
discriminator (from the pretrained one) learns to tell those renders from "real" portraits:
samples of the frozen pretrained generator, or an image folder. One process or ``torchrun``
(DistributedDataParallel, gloo on CPU, NCCL on GPUs) run the same code.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..generation import frontal_camera
from ..guidance import StableDiffusionGuidance
from ..models import build_discriminator, build_generator, sample_camera_labels, view_cameras
from ..models.pretrained import load_pretrained
from ..outputs import grid
from ..text import TextConditionedGenerator
from .checkpoint import latest_checkpoint, load_checkpoint, remove_partial_checkpoints, save_checkpoint
from .config import GuidanceConfig, TrainConfig
from .losses import (SPREAD_RENDER, discriminator_loss, generator_adversarial_loss, group_spread, r1_penalty,
                     spread_loss, update_ema)
from .real_images import ImageFolder


@dataclass
class Batch:
    """One step's random draws: latents z ``(B, z_dim)``, cameras ``(B, 25)`` and their yaws, prompts,
    the SDS timesteps and noise, and the cameras/latents of the "real" samples."""

    z: Tensor
    c: Tensor
    yaws: Tensor
    prompts: list[str]
    t: Tensor
    noise: Tensor
    real_z: Tensor
    real_c: Tensor


def build_guidance(config: GuidanceConfig, device: torch.device | str = "cpu") -> StableDiffusionGuidance:
    """The SDS guidance a config's ``guidance`` section describes (its ``weight`` is the trainer's)."""
    return StableDiffusionGuidance(
        config.source, guidance_scale=config.guidance_scale, t_range=(config.t_min, config.t_max),
        t_max_final=config.t_max_final, weighting=config.weighting, grad_clip=config.grad_clip,
        view_dependent_prompts=config.view_dependent_prompts, attention_slicing=config.attention_slicing,
        channels_last=config.channels_last, device=device)


def _distributed() -> tuple[int, int]:
    """(rank, world size), initialising the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class Trainer:
    """Builds everything from a :class:`TrainConfig` and runs :meth:`train`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.rank, self.world = _distributed()
        if config.device == "auto":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
        else:
            device = torch.device(config.device)
        self.device = device
        torch.manual_seed(config.seed)  # every process builds the same initial models
        self.sampler = torch.Generator().manual_seed(config.seed * 1000 + self.rank)
        self.prompts = config.all_prompts()

        self.guidance = build_guidance(config.guidance, device)
        model = config.model
        if model.pretrained:
            base, discriminator = load_pretrained(model.pretrained, backend=model.backend)
            if discriminator is None and config.gan.weight > 0:
                raise ValueError(f"model.pretrained {model.pretrained} has no discriminator; the GAN regulariser needs one")
        else:
            base, discriminator = build_generator(model.preset, backend=model.backend), build_discriminator(model.preset)
        if model.neural_rendering_resolution:
            base.neural_rendering_resolution = model.neural_rendering_resolution
        self.frozen = None  # the "real" distribution: a frozen copy of the pretrained generator
        if config.gan.weight > 0 and config.gan.real == "pretrained":
            self.frozen = copy.deepcopy(base).requires_grad_(False).eval().to(device)
        self.generator = TextConditionedGenerator(
            base.train(), self.guidance.text_encoder.dim, text_encoder=self.guidance.text_encoder,
            adapter_boundaries=tuple(model.adapter_boundaries), attention_resolutions=model.attention_resolutions,
            attention_heads=model.attention_heads, attention_head_dim=model.attention_head_dim,
            use_adapters=model.use_adapters, use_cross_attention=model.use_cross_attention).to(device)
        self.discriminator = discriminator.train().to(device)
        if config.gan.group_size > 1 and config.gan.weight > 0:
            mbstd = getattr(self.discriminator.b4, "mbstd", None)
            if mbstd is None:
                raise ValueError("config key 'gan.group_size' above 1 needs a discriminator with a minibatch-std layer")
            mbstd.group_size = config.gan.group_size  # it compares the spread within each prompt's group
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        self.real_images = None
        if config.gan.real_image_dir is not None:
            self.real_images = ImageFolder(config.gan.real_image_dir, base.img_resolution,
                                           base.neural_rendering_resolution)
        self.spread_target = None  # τ of gan.spread_weight: the real groups' spread, the same every run and resume
        if config.gan.weight > 0 and config.gan.spread_weight > 0:
            self.spread_target = self.real_images.group_spread(
                config.gan.group_size, generator=torch.Generator().manual_seed(config.seed))

        groups = self.generator.parameter_groups()
        rates = {"adapters": config.optim.lr_adapters, "cross_attention": config.optim.lr_cross_attention,
                 "base": config.optim.lr_base}
        if rates["base"] == 0:
            self.generator.base.requires_grad_(False)
        self.g_optimizer = torch.optim.Adam(
            [{"params": groups[name], "lr": rate, "name": name} for name, rate in rates.items() if rate > 0 and groups[name]],
            betas=tuple(config.optim.betas), eps=1e-8)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=config.gan.lr,
                                            betas=tuple(config.gan.betas), eps=1e-8)
        # The generator runs one forward and one backward per step: DistributedDataParallel. The
        # discriminator runs several forwards per backward (fake, real, R1), which DDP does not
        # allow: its gradients are averaged across processes by hand (_average_gradients).
        self.g_module = self.generator
        if self.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.g_module = DistributedDataParallel(self.generator, device_ids=ids, find_unused_parameters=True)
        torch.manual_seed(config.seed * 1000 + self.rank)  # rendering jitter and noise differ per process
        self.ema_beta = 0.5 ** (1 / config.optim.ema_half_life_steps) if config.optim.ema_half_life_steps > 0 else 0.0
        self.step = 0
        self.bad_steps = 0
        self.writer = None

    # --- one step ------------------------------------------------------------------------------

    def sample_batch(self) -> Batch:
        """Draw one step's randomness from the trainer's own generator (saved in checkpoints)."""
        cfg, size = self.config, self.config.batch_size
        z = torch.randn(size, self.generator.base.z_dim, generator=self.sampler)
        # With the regulariser on, gan.group_size latents share each prompt and camera; sample i is in
        # group i % (size / group_size), the grouping of the discriminator's minibatch-std layer (and
        # of ImageFolder.sample's groups). Without it the key changes nothing, so (b) is one run.
        group_size = cfg.gan.group_size if cfg.gan.weight > 0 else 1
        yaws, c = self._cameras(size // group_size)
        yaws, c = yaws.repeat(group_size), c.repeat(group_size, 1)
        prompts = [self.prompts[int(i)]
                   for i in torch.randint(len(self.prompts), (size // group_size,), generator=self.sampler)]
        prompts = prompts * group_size
        low, high = self.guidance.timestep_range(self.step / max(cfg.guidance.anneal_steps or cfg.steps, 1))
        t = torch.randint(low, high + 1, (size,), generator=self.sampler)
        unet = self.guidance.unet.config
        noise = torch.randn(size, unet.in_channels, unet.sample_size, unet.sample_size, generator=self.sampler)
        real_z = torch.randn(size, self.generator.base.z_dim, generator=self.sampler)
        _, real_c = self._cameras(size)
        return Batch(z, c, yaws, prompts, t, noise, real_z, real_c)

    def _cameras(self, size: int) -> tuple[Tensor, Tensor]:
        cams = self.config.cameras
        labels, yaws = sample_camera_labels(size, math.radians(cams.yaw_range_degrees),
                                            math.radians(cams.pitch_range_degrees), cams.radius, cams.pivot,
                                            cams.fov_degrees, self.sampler)
        return yaws, labels

    def _conditioning(self, c: Tensor) -> Tensor:
        """The cameras ``(N, 25)`` the mapping is conditioned on for views rendered from c
        (``cameras.conditioning``)."""
        if self.config.cameras.conditioning == "render":
            return c
        return frontal_camera(self.generator).to(c).expand(c.shape[0], -1)

    def _autocast(self):
        if self.device.type == "cuda" and self.config.optim.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def generator_loss(self, batch: Batch) -> tuple[Tensor, dict[str, float], dict[str, Tensor]]:
        """The generator's loss on ``batch`` (SDS + λ_gan · adversarial) and its renders."""
        cfg = self.config
        device = self.device
        text = self.generator.encode(batch.prompts)
        with self._autocast():
            out = self.g_module(batch.z.to(device), batch.c.to(device), text=text,
                                conditioning=self._conditioning(batch.c).to(device))
        sds = self.guidance.sds_loss(out["image"].float(), batch.prompts, yaws=batch.yaws, t=batch.t, noise=batch.noise)
        loss = cfg.guidance.weight * sds.loss
        logs = {"loss/sds": sds.loss.item(), "sds/grad_norm": sds.grad.flatten(1).norm(dim=1).mean().item()}
        if cfg.gan.weight > 0:
            self.discriminator.requires_grad_(False)  # only the generator learns from this term
            adversarial = generator_adversarial_loss(self.discriminator({"image": out["image"].float(),
                                                                         "image_raw": out["image_raw"].float()},
                                                                        batch.c.to(device)))
            self.discriminator.requires_grad_(True)
            loss = loss + cfg.gan.weight * adversarial
            logs["loss/g_adversarial"] = adversarial.item()
            if self.spread_target is not None:
                spread = group_spread(out[SPREAD_RENDER].float(), cfg.gan.group_size)
                term = spread_loss(spread, self.spread_target)
                loss = loss + cfg.gan.spread_weight * term
                logs["loss/spread"], logs["gan/group_spread"] = term.item(), spread.mean().item()
        return loss, logs, out

    def discriminator_loss(self, batch: Batch, fake: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Fake renders vs real portraits, with lazy R1 every ``r1_interval`` steps."""
        cfg, device = self.config.gan, self.device
        if self.real_images is not None:
            real, real_c = self.real_images.sample(self.config.batch_size, self.sampler, group_size=cfg.group_size)
        else:
            real_c = batch.real_c
            with torch.no_grad():
                real = self.frozen(batch.real_z.to(device), real_c.to(device))
        real = {key: real[key].detach().float().to(device) for key in ("image", "image_raw")}
        real_c = real_c.to(device)
        fake = {key: fake[key].detach().float() for key in ("image", "image_raw")}
        loss = discriminator_loss(self.discriminator(fake, batch.c.to(device)), self.discriminator(real, real_c))
        logs = {"loss/d": loss.item()}
        if cfg.r1_gamma > 0 and self.step % cfg.r1_interval == 0:
            inputs = {key: value.requires_grad_(True) for key, value in real.items()}
            penalty = r1_penalty(self.discriminator(inputs, real_c), list(inputs.values()))
            loss = loss + penalty * (cfg.r1_gamma / 2) * cfg.r1_interval
            logs["loss/r1"] = penalty.item()
        return loss, logs

    def _finite(self, loss: Tensor, parameters) -> bool:
        # One device-side reduction and one host sync per check, not one per parameter.
        flags = [torch.isfinite(loss).all()] + [torch.isfinite(p.grad).all() for p in parameters if p.grad is not None]
        ok = torch.stack(flags).all().float()
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def train_step(self) -> dict[str, float]:
        """One generator (and discriminator) update; a non-finite step is skipped."""
        batch = self.sample_batch()
        self.g_optimizer.zero_grad(set_to_none=True)
        loss, logs, out = self.generator_loss(batch)
        loss.backward()
        parameters = [p for group in self.g_optimizer.param_groups for p in group["params"]]
        if not self._finite(loss, parameters):
            return self._skip("generator", logs)
        self.g_optimizer.step()
        self._update_ema()
        if self.config.gan.weight > 0:
            self.d_optimizer.zero_grad(set_to_none=True)
            d_loss, d_logs = self.discriminator_loss(batch, out)
            d_loss.backward()
            self._average_gradients(self.discriminator.parameters())
            if not self._finite(d_loss, self.discriminator.parameters()):
                return self._skip("discriminator", {**logs, **d_logs})
            self.d_optimizer.step()
            logs.update(d_logs)
        self.bad_steps = 0
        self.step += 1
        return logs

    def _average_gradients(self, parameters) -> None:
        if self.world > 1:
            for parameter in parameters:
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= self.world

    def _skip(self, network: str, logs: dict[str, float]) -> dict[str, float]:
        self.g_optimizer.zero_grad(set_to_none=True)
        self.d_optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        tqdm.write(f"step {self.step}: non-finite {network} loss or gradient ({logs}); step skipped "
                   f"({self.bad_steps} in a row)", file=sys.stderr)
        if self.writer is not None:
            self.writer.add_scalar("skipped_steps", self.bad_steps, self.step)
        if self.bad_steps > self.config.max_bad_steps:
            raise RuntimeError(f"training stopped: {self.bad_steps} consecutive steps had a non-finite {network} loss "
                               f"or gradient (max_bad_steps={self.config.max_bad_steps}); lower the learning rates "
                               f"or guidance_scale, or set guidance.grad_clip")
        self.step += 1
        return {**logs, "skipped": 1.0}

    def _update_ema(self) -> None:
        update_ema(self.generator_ema, self.generator, self.ema_beta)

    # --- the run -------------------------------------------------------------------------------

    def training_state(self) -> dict:
        """What resuming needs besides the weights. Every process draws its own batches and noise,
        so the random states of all of them are kept (a collective call under torchrun)."""
        rng = {"torch": torch.get_rng_state(), "sampler": self.sampler.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        per_process = [rng]
        if self.world > 1:
            per_process = [None] * self.world
            dist.all_gather_object(per_process, rng)
        return {
            "step": self.step, "bad_steps": self.bad_steps,
            "g_optimizer": self.g_optimizer.state_dict(), "d_optimizer": self.d_optimizer.state_dict(),
            "rng": per_process,
        }

    def save(self, state: dict | None = None) -> Path:
        """Write a checkpoint of the current step (``state``: :meth:`training_state`'s, by default now)."""
        return save_checkpoint(self.config.out_dir, self.step, self.generator, self.generator_ema, self.discriminator,
                               self.training_state() if state is None else state, self.config.to_dict(),
                               keep=self.config.keep_checkpoints)

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` or the run's latest checkpoint; False when there is none."""
        path = Path(path) if path is not None else latest_checkpoint(self.config.out_dir)
        if path is None:
            return False
        state = load_checkpoint(path, self.generator, self.generator_ema, self.discriminator)
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.step, self.bad_steps = state["step"], state["bad_steps"]
        if len(state["rng"]) != self.world:
            warnings.warn(f"{path} was written by {len(state['rng'])} process(es) and is resumed by {self.world}: "
                          f"processes without a saved random state keep their own, so the run does not continue "
                          f"as an uninterrupted one would", stacklevel=2)
        if self.rank < len(state["rng"]):
            rng = state["rng"][self.rank]
            torch.set_rng_state(rng["torch"])
            self.sampler.set_state(rng["sampler"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        return True

    def train(self, steps: int | None = None) -> None:
        """Run until ``steps`` (default: the config's) steps are done, logging and checkpointing."""
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        main = self.rank == 0
        if main:
            remove_partial_checkpoints(cfg.out_dir)
        if main and cfg.log.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(cfg.out_dir) / "tensorboard"))
            if self.spread_target is not None:  # what gan/group_spread is pushed up to
                self.writer.add_scalar("gan/spread_target", self.spread_target, self.step)
        with tqdm(total=steps, initial=self.step, desc="training", disable=not main, dynamic_ncols=True) as progress:
            while self.step < steps:
                logs = self.train_step()
                progress.update(1)
                progress.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in logs.items()})
                if main and self.writer is not None and self.step % cfg.log.every == 0:
                    for key, value in logs.items():
                        self.writer.add_scalar(key, value, self.step)
                if main and self.writer is not None and self.step % cfg.log.image_every == 0:
                    self.log_images()
                if self.step % cfg.checkpoint_every == 0 or self.step == steps:
                    state = self.training_state()  # every process takes part
                    if main:
                        self.save(state)
                    if self.world > 1:
                        dist.barrier()
        if self.writer is not None:
            self.writer.flush()

    @torch.no_grad()
    def log_images(self) -> None:
        """A grid of EMA renders: one row per prompt (up to 4), one column per camera."""
        prompts = self.prompts[:4]
        cams = self.config.cameras
        c = view_cameras(4, math.radians(cams.yaw_range_degrees), cams.radius, cams.pivot, cams.fov_degrees).to(self.device)
        z = torch.randn(1, self.generator.base.z_dim, generator=torch.Generator().manual_seed(0)).to(self.device)
        rows = []
        for prompt in prompts:
            out = self.generator_ema(z.expand(4, -1), c, prompts=[prompt] * 4, noise_mode="const",
                                     conditioning=self._conditioning(c))
            rows.append(out["image"])
        self.writer.add_image("samples/ema", (grid(torch.cat(rows).float().cpu(), 4) + 1) / 2, self.step)
