"""The judge: an attribute classifier of world renders, used only for evaluation.

A small CNN (32² input; other sizes are resized) with one attention-pooled classification head per
attribute (:data:`~dreamportrait.world.dataset.ATTRIBUTE_CLASSES`); its globally pooled features
serve the evaluation's diversity and world-FID measures.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._atomic import atomic_path
from .._manifest import verify_or_warn, write_manifest
from ..weights import read_weights, save_weights
from .dataset import ATTRIBUTE_CLASSES, WorldSamples

INPUT_RESOLUTION = 32


def _block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, padding=1), nn.GroupNorm(8, outputs), nn.SiLU(),
                         nn.Conv2d(outputs, outputs, 3, padding=1, stride=2), nn.GroupNorm(8, outputs), nn.SiLU())


class AttributeJudge(nn.Module):
    """images ``(N, 3, H, W)`` in [-1, 1] -> logits per attribute.

    Each attribute pools the final feature map with its own learned spatial attention before its
    classifier: a global average would mix, say, the hat's pixels with the hair's, and a judge
    that has never seen red hair under a blue hat then reads the red as the hat's colour."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.width = width
        self.body = nn.Sequential(_block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width))
        self.attention = nn.Conv2d(4 * width, len(ATTRIBUTE_CLASSES), 1)
        self.heads = nn.ModuleDict({name: nn.Linear(4 * width, len(values)) for name, values in ATTRIBUTE_CLASSES.items()})

    def feature_map(self, images: Tensor) -> Tensor:
        """``(N, 4 * width, h, w)`` features of images resized to 32²."""
        if images.shape[-1] != INPUT_RESOLUTION:
            images = F.interpolate(images, size=(INPUT_RESOLUTION,) * 2, mode="bilinear", align_corners=False,
                                   antialias=True)
        return self.body(images)

    def features(self, images: Tensor) -> Tensor:
        """Globally pooled features ``(N, 4 * width)`` (for diversity and world-FID)."""
        return self.feature_map(images).mean(dim=(2, 3))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        maps = self.feature_map(images).flatten(2)  # (N, C, h * w)
        weights = self.attention.weight.flatten(1) @ maps + self.attention.bias[:, None]  # (N, A, h * w)
        pooled = weights.softmax(-1) @ maps.transpose(1, 2)  # (N, A, C)
        return {name: head(pooled[:, i]) for i, (name, head) in enumerate(self.heads.items())}

    @torch.no_grad()
    def predict(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Class indices ``(N, 6)`` in :data:`ATTRIBUTE_CLASSES` order."""
        outputs = [torch.stack([logits.argmax(-1) for logits in self(chunk).values()], dim=1)
                   for chunk in images.split(batch_size)]
        return torch.cat(outputs)


def accuracy(judge: AttributeJudge, samples: WorldSamples) -> dict[str, float]:
    """Per-attribute accuracy of ``judge`` on ``samples``."""
    judge.eval()
    predicted = judge.predict(samples.float_images())
    return {name: (predicted[:, i] == samples.attributes[:, i]).float().mean().item()
            for i, name in enumerate(ATTRIBUTE_CLASSES)}


def train_judge(train: WorldSamples, steps: int = 2000, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                width: int = 32, progress: bool = True) -> AttributeJudge:
    """Train a judge on ``train`` with flips-free light augmentation (brightness/contrast jitter)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = AttributeJudge(width)
    optimiser = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=max(steps, 1))
    images = train.float_images()
    judge.train()
    for _ in tqdm(range(steps), desc="training the judge", disable=not progress):
        index = torch.randint(len(train), (batch_size,), generator=generator)
        batch = images[index]
        gain = 1 + (torch.rand(batch_size, 1, 1, 1, generator=generator) - 0.5) * 0.2
        batch = (batch * gain + (torch.rand(batch_size, 1, 1, 1, generator=generator) - 0.5) * 0.1).clamp(-1, 1)
        logits = judge(batch)
        loss = sum(F.cross_entropy(logits[name], train.attributes[index, i]) for i, name in enumerate(ATTRIBUTE_CLASSES))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return judge.eval()


def save_judge(judge: AttributeJudge, directory: str | Path) -> Path:
    directory = Path(directory)
    save_weights(judge, directory / "judge.safetensors")
    with atomic_path(directory / "judge.json") as temporary:
        temporary.write_text(json.dumps({"width": judge.width, "classes": ATTRIBUTE_CLASSES}, indent=2) + "\n")
    write_manifest(directory)
    return directory


def load_judge(directory: str | Path) -> AttributeJudge:
    directory = Path(directory)
    config_path = directory / "judge.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory}: judge.json is missing")
    verify_or_warn(directory, ("judge.json", "judge.safetensors"))
    config = json.loads(config_path.read_text())
    if {k: tuple(v) for k, v in config["classes"].items()} != ATTRIBUTE_CLASSES:
        raise ValueError(f"{config_path}: the judge was trained for other attribute classes")
    judge = AttributeJudge(config["width"])
    read_weights(judge, directory / "judge.safetensors")
    return judge.eval()
