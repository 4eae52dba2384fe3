"""Real portraits for the GAN regulariser: an image folder with EG3D's ``dataset.json`` labels."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.cameras import CAMERA_LABEL_SIZE
from .losses import SPREAD_RENDER, group_spread


class ImageFolder:
    """Images of a folder with their camera labels, EG3D's dataset layout::

        dataset.json   {"labels": [["00000/img00000000.png", [25 numbers]], ...],
                        "groups": [[0, 1, 2, 3], ...]}   (optional)

    ``groups`` (our addition) lists images, by index into ``labels``, that show one kind of
    portrait (for the world: one attribute combination) from one camera, varying only as the data
    varies for a fixed prompt; ``gan.group_size`` above 1 needs them.

    ``sample(n, generator)`` returns ``{"image": (n, 3, R, R), "image_raw": (n, 3, r, r)}`` in
    [-1, 1] (R = ``resolution``, r = ``raw_resolution``, antialiased resizes) and labels ``(n, 25)``.
    """

    def __init__(self, directory: str | Path, resolution: int, raw_resolution: int):
        self.directory = Path(directory)
        labels_path = self.directory / "dataset.json"
        if not labels_path.is_file():
            raise FileNotFoundError(f"gan.image_dir {self.directory}: dataset.json is missing")
        listing = json.loads(labels_path.read_text())
        entries = listing.get("labels")
        if not entries:
            raise ValueError(f"{labels_path}: 'labels' must list [file name, 25-number camera label] pairs")
        self.files, labels = [], []
        for name, label in entries:
            if len(label) != CAMERA_LABEL_SIZE:
                raise ValueError(f"{labels_path}: the label of {name} has {len(label)} numbers, expected 25")
            if not (self.directory / name).is_file():
                raise FileNotFoundError(f"{labels_path} lists {name}, which does not exist")
            self.files.append(self.directory / name)
            labels.append(label)
        self.labels = torch.tensor(labels, dtype=torch.float32)
        self.groups = self._check_groups(listing.get("groups", []), labels_path)
        self.resolution, self.raw_resolution = resolution, raw_resolution

    def _check_groups(self, groups, labels_path: Path) -> list[list[int]]:
        if not isinstance(groups, list) or not all(
                isinstance(group, list) and len(group) >= 2 and
                all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(self.files) for i in group)
                for group in groups):
            raise ValueError(f"{labels_path}: 'groups' must be a list of lists of at least 2 image indices "
                             f"(0 to {len(self.files) - 1})")
        return groups

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> Tensor:
        pixels = torch.from_numpy(iio.imread(self.files[index])).float()
        if pixels.dim() == 2:
            pixels = pixels[..., None].expand(-1, -1, 3)
        image = pixels[..., :3].permute(2, 0, 1)[None] / 127.5 - 1
        return F.interpolate(image, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False,
                             antialias=True)[0]

    def sample(self, count: int, generator: torch.Generator | None = None,
               group_size: int = 1) -> tuple[dict[str, Tensor], Tensor]:
        """``count`` random images; with ``group_size`` above 1, ``count / group_size`` random groups
        of ``group_size`` distinct members each, laid out as the generator's grouped batches and the
        discriminator's minibatch-std layer expect: image ``i`` belongs to group ``i % (count /
        group_size)``."""
        indices = self._group_indices(count, group_size, generator) if group_size > 1 else \
            torch.randint(len(self), (count,), generator=generator)
        images = torch.stack([self._load(int(i)) for i in indices])
        raw = F.interpolate(images, size=(self.raw_resolution,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return {"image": images, "image_raw": raw}, self.labels[indices]

    def group_spread(self, group_size: int, groups: int = 64, generator: torch.Generator | None = None) -> float:
        """The mean :func:`~dreamportrait.training.losses.group_spread` of ``groups`` random groups of
        ``group_size``: how much real heads of one kind, seen from one camera, differ, in the render
        the trainer measures the generator's spread on (:data:`.losses.SPREAD_RENDER`)."""
        images, _ = self.sample(groups * group_size, generator, group_size=group_size)
        return group_spread(images[SPREAD_RENDER], group_size).mean().item()

    def _group_indices(self, count: int, group_size: int, generator: torch.Generator | None) -> Tensor:
        if count % group_size:
            raise ValueError(f"count ({count}) must be a multiple of group_size ({group_size})")
        groups = [group for group in self.groups if len(group) >= group_size]
        if not groups:
            raise ValueError(f"{self.directory / 'dataset.json'} has no 'groups' of {group_size} or more images, "
                             f"which gan.group_size={group_size} needs")
        chosen = [groups[int(i)] for i in torch.randint(len(groups), (count // group_size,), generator=generator)]
        members = [torch.tensor(group)[torch.randperm(len(group), generator=generator)[:group_size]]
                   for group in chosen]
        return torch.stack(members, dim=1).flatten()  # (group_size, groups) -> member-major order
