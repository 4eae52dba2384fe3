"""The GAN regulariser's losses (StyleGAN2/EG3D): non-saturating logistic loss and lazy R1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def generator_adversarial_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss ``softplus(-D(G(z)))``, averaged."""
    return F.softplus(-fake_logits).mean()


def discriminator_loss(fake_logits: Tensor, real_logits: Tensor) -> Tensor:
    """Logistic discriminator loss ``softplus(D(fake)) + softplus(-D(real))``, averaged."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()


def r1_penalty(real_logits: Tensor, real_inputs: list[Tensor]) -> Tensor:
    """``|grad_x D(x)|²`` per sample over all ``real_inputs`` (EG3D: the image and the raw image),
    averaged; differentiable (for the discriminator's update)."""
    gradients = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return sum(g.square().flatten(1).sum(1) for g in gradients).mean()


@torch.no_grad()
def update_ema(ema: torch.nn.Module, current: torch.nn.Module, beta: float) -> None:
    """``ema <- beta * ema + (1 - beta) * current`` for parameters; buffers are copied."""
    for average, value in zip(ema.parameters(), current.parameters()):
        average.lerp_(value, 1 - beta)
    for average, value in zip(ema.buffers(), current.buffers()):
        average.copy_(value)
