"""EG3D-style adversarial training of a tri-plane generator on posed images, without text: the
pretrained 3D GAN that DreamPortrait starts from and whose samples its GAN regulariser keeps it near.

Each step renders fakes from real camera labels (the pose distribution of the data; the
generator's pose conditioning is swapped to another label with probability ``pose_swap_prob``,
EG3D's generator pose conditioning regularisation), updates G with the non-saturating loss, then
D on fakes vs reals with lazy R1 on both the image and the raw image (the dual discriminator).
Checkpoints are :mod:`~dreamportrait.training.checkpoint` directories (resumable to the identical
state); the result is a pretrained directory with the EMA generator and the discriminator.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from ..models import build_discriminator, build_generator, view_cameras
from ..models.cameras import FFHQ_PIVOT, FFHQ_RADIUS
from ..models.pretrained import save_pretrained
from ..outputs import depth_grey, grid, to_uint8, write_image
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .losses import discriminator_loss, generator_adversarial_loss, r1_penalty, update_ema


class PosedImages(Protocol):
    """A source of real images: ``sample(n, generator)`` -> ``({"image": (n, 3, R, R), "image_raw":
    (n, 3, r, r)}`` in [-1, 1], camera labels ``(n, 25)``)."""

    def sample(self, count: int, generator: torch.Generator | None = None) -> tuple[dict[str, Tensor], Tensor]: ...


@dataclass
class GanConfig:
    preset: str = "tiny"
    steps: int = 2000
    batch_size: int = 8
    seed: int = 0
    lr_g: float = 0.0025
    lr_d: float = 0.002
    betas: tuple[float, float] = (0.0, 0.99)
    r1_gamma: float = 1.0
    r1_interval: int = 16
    pose_swap_prob: float = 0.5
    ema_half_life_steps: float = 100.0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2


class GanTrainer:
    """Trains ``build_generator(config.preset)`` / ``build_discriminator(config.preset)`` on ``images``."""

    def __init__(self, config: GanConfig, images: PosedImages, out_dir: str | Path, backend: str | None = None):
        self.config, self.images, self.out_dir = config, images, Path(out_dir)
        torch.manual_seed(config.seed)
        self.generator = build_generator(config.preset, backend=backend).train()
        self.discriminator = build_discriminator(config.preset).train()
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        self.g_optimizer = torch.optim.Adam(self.generator.parameters(), lr=config.lr_g, betas=config.betas, eps=1e-8)
        self.d_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=config.lr_d, betas=config.betas,
                                            eps=1e-8)
        self.sampler = torch.Generator().manual_seed(config.seed)
        self.ema_beta = 0.5 ** (1 / config.ema_half_life_steps) if config.ema_half_life_steps > 0 else 0.0
        self.step = 0

    def train_step(self) -> dict[str, float]:
        cfg, batch = self.config, self.config.batch_size
        real, c = self.images.sample(batch, self.sampler)
        z = torch.randn(batch, self.generator.z_dim, generator=self.sampler)
        swap = torch.rand(batch, generator=self.sampler) < cfg.pose_swap_prob
        c_pose = torch.where(swap[:, None], c[torch.randint(batch, (batch,), generator=self.sampler)], c)
        g_loss, fake = self.generator_step(z, c_pose, c)
        logs = {"g": g_loss, **self.discriminator_step(fake, real, c)}
        if not all(math.isfinite(v) for v in logs.values()):
            raise RuntimeError(f"GAN training diverged at step {self.step}: {logs}; lower lr_g/lr_d")
        self.step += 1
        return logs

    def generator_step(self, z: Tensor, c_pose: Tensor, c: Tensor) -> tuple[float, dict[str, Tensor]]:
        """One G update (non-saturating loss) on fakes of z ``(B, z_dim)`` rendered from c ``(B, 25)``
        with pose conditioning c_pose; returns the loss and the (detached) fakes; updates the EMA."""
        self.discriminator.requires_grad_(False)
        fake = self.generator.synthesis(self.generator.mapping(z, c_pose), c)
        loss = generator_adversarial_loss(self.discriminator(fake, c))
        self.g_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.g_optimizer.step()
        self.discriminator.requires_grad_(True)
        update_ema(self.generator_ema, self.generator, self.ema_beta)
        return loss.item(), {key: fake[key].detach() for key in ("image", "image_raw")}

    def discriminator_step(self, fake: dict[str, Tensor], real: dict[str, Tensor], c: Tensor) -> dict[str, float]:
        """One D update: logistic loss on fakes vs reals (both seen from c), plus lazy R1 on the reals
        every ``r1_interval`` steps (on the image and the raw image)."""
        cfg = self.config
        loss = discriminator_loss(self.discriminator(fake, c), self.discriminator(real, c))
        logs = {"d": loss.item()}
        if cfg.r1_gamma > 0 and self.step % cfg.r1_interval == 0:
            inputs = {key: value.detach().requires_grad_(True) for key, value in real.items()}
            penalty = r1_penalty(self.discriminator(inputs, c), list(inputs.values()))
            loss = loss + penalty * (cfg.r1_gamma / 2) * cfg.r1_interval
            logs["r1"] = penalty.item()
        self.d_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.d_optimizer.step()
        return logs

    def _state(self) -> dict:
        return {"step": self.step, "bad_steps": 0, "g_optimizer": self.g_optimizer.state_dict(),
                "d_optimizer": self.d_optimizer.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "sampler": self.sampler.get_state()}}

    def resume(self) -> bool:
        path = latest_checkpoint(self.out_dir)
        if path is None:
            return False
        state = load_checkpoint(path, self.generator, self.generator_ema, self.discriminator)
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.step = state["step"]
        torch.set_rng_state(state["rng"]["torch"])
        self.sampler.set_state(state["rng"]["sampler"])
        return True

    def train(self, progress: bool = True) -> Path:
        """Run (or finish) the configured steps; returns ``out_dir/final``, a pretrained directory
        (EMA generator + discriminator)."""
        cfg = self.config
        with tqdm(total=cfg.steps, initial=self.step, desc="training the 3D GAN", disable=not progress) as bar:
            while self.step < cfg.steps:
                logs = self.train_step()
                bar.update(1)
                bar.set_postfix({key: f"{value:.3g}" for key, value in logs.items()})
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    save_checkpoint(self.out_dir, self.step, self.generator, self.generator_ema, self.discriminator,
                                    self._state(), dataclasses.asdict(self.config), keep=cfg.keep_checkpoints)
                    self.write_samples(self.out_dir / "samples.png")
        return save_pretrained(self.out_dir / "final", self.generator_ema, self.discriminator)

    @torch.no_grad()
    def write_samples(self, path: Path, seeds: int = 4, views: int = 4) -> Path:
        """A grid of EMA samples (rows: fixed latents, each followed by its depth, nearest white over the
        ray range so that a flat card shows as one grey; columns: yaws over the data's pose range)."""
        options = self.generator_ema.rendering_kwargs
        cameras = view_cameras(views, math.radians(35), options.get("avg_camera_radius", FFHQ_RADIUS),
                               options.get("avg_camera_pivot", FFHQ_PIVOT))
        z = torch.randn(seeds, self.generator_ema.z_dim, generator=torch.Generator().manual_seed(0))
        ws = self.generator_ema.mapping(z.repeat_interleave(views, 0), cameras[views // 2].expand(seeds * views, -1))
        out = self.generator_ema.synthesis(ws, cameras.repeat(seeds, 1), noise_mode="const",
                                           deterministic_sampling=True)  # draws no random numbers
        images = out["image"]
        depth = depth_grey(F.interpolate(out["image_depth"], size=images.shape[-2:], mode="nearest"),
                           options["ray_start"], options["ray_end"])
        rows = torch.stack([images.unflatten(0, (seeds, views)), depth.unflatten(0, (seeds, views))], 1)
        return write_image(path, to_uint8(grid(rows.flatten(0, 2), views)))
