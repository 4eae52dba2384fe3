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


SPREAD_RENDER = "image_raw"
"""The render whose group spread ``gan.spread_weight`` pushes up, for the generator and the real
groups alike: the raw volume render, whose variety is the 3D head's and so shows alike from every
view, where variety the super-resolution adds to one view's image need not
(docs/notes/experiments.md, *Training the generator*)."""

SPREAD_RESOLUTION = 16
"""The side :func:`group_spread` pools renders to before comparing them: 4x4 pooling of the world's
64² images, 2x2 of its 32² raw renders."""


def group_spread(images: Tensor, group_size: int, size: int = SPREAD_RESOLUTION) -> Tensor:
    """The mean absolute difference ``(B / group_size,)`` between the members of each group of
    ``images`` ``(B, C, H, W)``, laid out member-major (image ``i`` in group ``i % (B / group_size)``,
    as the trainer's grouped batches and ``ImageFolder.sample`` are), after average pooling to
    ``size``x``size`` (H and W multiples of it; smaller images are compared as they are): what
    differs between heads of one prompt (size, hairline, colour) is coarse, and the pooling keeps
    per-pixel noise (the synthesis layers' noise inputs) from counting as variety."""
    height, width = images.shape[-2:]
    if height > size or width > size:
        if height % size or width % size:
            raise ValueError(f"images of {height}x{width} pixels do not pool evenly to {size}x{size}")
        images = F.adaptive_avg_pool2d(images, size)
    members = images.unflatten(0, (group_size, -1)).flatten(2)  # (G, B / G, C * h * w)
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
