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


def group_spread(images: Tensor, group_size: int, pool: int = 4) -> Tensor:
    """The mean absolute difference ``(B / group_size,)`` between the members of each group of
    ``images`` ``(B, C, H, W)``, laid out member-major (image ``i`` in group ``i % (B / group_size)``,
    as the trainer's grouped batches and ``ImageFolder.sample`` are), after ``pool``x``pool`` average
    pooling: what differs between heads of one prompt (size, hairline, colour) is coarse, and the
    pooling keeps per-pixel noise (the synthesis layers' noise inputs) from counting as variety."""
    pooled = F.avg_pool2d(images, pool) if pool > 1 else images
    members = pooled.unflatten(0, (group_size, -1)).flatten(2)  # (G, B / G, C * h * w)
    distances = (members[:, None] - members[None]).abs().mean(-1)  # (G, G, B / G), zero diagonal
    return distances.sum((0, 1)) / (group_size * (group_size - 1))


def spread_loss(spread: Tensor, target: float) -> Tensor:
    """Diversity-sensitive hinge ``max(0, target - spread)`` averaged over the groups' ``spread``
    (:func:`group_spread`; DSGAN's bounded form of the mode-seeking term): it pushes the heads a
    prompt draws apart until they differ as much as real heads of one kind do, and no further."""
    return F.relu(target - spread).mean()


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
