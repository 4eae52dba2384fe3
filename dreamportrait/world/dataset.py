"""Rendered datasets of the world: images, camera labels, attributes and captions, on disk in
shards so that a long build resumes where it stopped."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import imageio.v3 as iio
from torch import Tensor
from tqdm.auto import tqdm

from .._atomic import atomic_path, temporary_directory
from .attributes import ATTRIBUTES, HeadAttributes, caption
from .captions import check_captions, training_text
from .heads import HeadBatch, render_heads_and_masks, sample_world_cameras

SHARD_SIZE = 512
ATTRIBUTE_CLASSES = {name: values + (("none",) if name == "hair_color" else ()) for name, values in ATTRIBUTES.items()}
"""The judge's classes per attribute (hair colour has a "none" class for bald, beardless heads)."""


def attribute_indices(heads: Sequence[HeadAttributes]) -> Tensor:
    """``(B, 6)`` class indices (:data:`ATTRIBUTE_CLASSES` order) of ``heads``."""
    return torch.tensor([[ATTRIBUTE_CLASSES[name].index(getattr(h, name)) for name in ATTRIBUTE_CLASSES] for h in heads])


def heads_from_indices(indices: Tensor) -> list[HeadAttributes]:
    return [HeadAttributes(**{name: ATTRIBUTE_CLASSES[name][int(i)] for name, i in zip(ATTRIBUTE_CLASSES, row)})
            for row in indices]


@dataclass
class WorldSamples:
    """images ``(N, 3, R, R)`` uint8, labels ``(N, 25)``, attributes ``(N, 6)`` class indices,
    captions, and optionally part masks ``(N, len(MASK_PARTS), R, R)`` uint8 (each region's
    coverage of each pixel, :func:`~dreamportrait.world.heads.render_part_masks`, times 255)."""

    images: Tensor
    labels: Tensor
    attributes: Tensor
    captions: list[str]
    masks: Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def float_images(self) -> Tensor:
        """The images in [-1, 1], float32."""
        return self.images.float() / 127.5 - 1

    def sample(self, count: int, generator: torch.Generator | None = None,
               raw_resolution: int = 32) -> tuple[dict[str, Tensor], Tensor]:
        """Random real images for GAN training (:class:`~dreamportrait.training.gan.PosedImages`):
        ``{"image": (n, 3, R, R), "image_raw": (n, 3, raw, raw)}`` in [-1, 1] and labels ``(n, 25)``."""
        index = torch.randint(len(self), (count,), generator=generator)
        image = self.images[index].float() / 127.5 - 1
        raw = F.interpolate(image, size=(raw_resolution,) * 2, mode="bilinear", align_corners=False, antialias=True)
        return {"image": image, "image_raw": raw}, self.labels[index]


def render_samples(combinations: Sequence[HeadAttributes], count: int, resolution: int, seed: int,
                   batch_size: int = 64, part_masks: bool = False, group_size: int = 1,
                   captions: str = "canonical") -> WorldSamples:
    """``count`` heads drawn uniformly from ``combinations``, each from a random camera of the pose
    prior, captioned in a random phrasing, with their part masks if ``part_masks``; deterministic
    given ``seed`` (the masks change no random draw, so the rest is the same either way). With
    ``group_size`` above 1, each run of ``group_size`` consecutive heads is one combination seen
    from one camera, differing only in each head's small random variations (and caption phrasing).

    ``captions="paraphrase"`` replaces all but :data:`~dreamportrait.world.captions.CANONICAL_SHARE`
    of the canonical captions by paraphrases (:func:`~dreamportrait.world.captions.paraphrase`), drawn from a
    random stream of their own: the images, attributes and remaining captions are those of
    ``captions="canonical"``, so the two data sets differ in their words only."""
    check_captions(captions)
    if count % group_size or batch_size % group_size:
        raise ValueError(f"count ({count}) and batch_size ({batch_size}) must be multiples of group_size ({group_size})")
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    images, labels, heads, texts, masks = [], [], [], [], []
    for start in range(0, count, batch_size):
        groups = min(batch_size, count - start) // group_size
        chunk = [head for _ in range(groups) for head in [rng.choice(list(combinations))] * group_size]
        batch = HeadBatch.from_attributes(chunk, generator)
        c, _ = sample_world_cameras(groups, generator)
        c = c.repeat_interleave(group_size, dim=0)
        rendered, _, _, coverage = render_heads_and_masks(batch, c, resolution, part_masks=part_masks)
        images.append(((rendered + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        if part_masks:
            masks.append((coverage * 255).round().to(torch.uint8))
        labels.append(c)
        heads += chunk
        texts += [caption(h, rng=rng) for h in chunk]
    if captions == "paraphrase":
        wording = random.Random(f"paraphrase-{seed}")
        texts = [training_text(text, head, wording) for text, head in zip(texts, heads)]
    return WorldSamples(torch.cat(images), torch.cat(labels), attribute_indices(heads), texts,
                        torch.cat(masks) if part_masks else None)


def build_dataset(directory: str | Path, combinations: Sequence[HeadAttributes], count: int, resolution: int,
                  seed: int, progress: bool = True, part_masks: bool = False, group_size: int = 1,
                  captions: str = "canonical") -> WorldSamples:
    """Render (or finish rendering) a dataset of ``count`` samples (with part masks if
    ``part_masks``, in groups of ``group_size``, captioned from ``captions``, as
    :func:`render_samples` draws them) into
    ``directory`` as shards of :data:`SHARD_SIZE`; each shard is written atomically and skipped
    when present, so an interrupted build resumes. Returns the whole dataset; a dataset asked for
    with masks whose shards hold none is an error."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards = range((count + SHARD_SIZE - 1) // SHARD_SIZE)
    for shard in tqdm(shards, desc=f"rendering {directory.name}", disable=not progress):
        path = directory / f"shard-{shard:05d}.pt"
        if path.is_file():
            continue
        size = min(SHARD_SIZE, count - shard * SHARD_SIZE)
        samples = render_samples(combinations, size, resolution, seed=seed * 100_003 + shard, part_masks=part_masks,
                                 group_size=group_size, captions=captions)
        with atomic_path(path) as temporary:
            torch.save({key: value for key, value in vars(samples).items() if value is not None}, temporary)
    dataset = load_dataset(directory)
    if part_masks and dataset.masks is None:
        raise ValueError(f"{directory} was rendered without part masks; render it again into another directory")
    return dataset


def load_dataset(directory: str | Path) -> WorldSamples:
    """The dataset of ``directory``'s shards (with part masks when every shard has them)."""
    parts = [torch.load(path, weights_only=True) for path in sorted(Path(directory).glob("shard-*.pt"))]
    if not parts:
        raise FileNotFoundError(f"{directory} holds no dataset shards")
    masks = torch.cat([p["masks"] for p in parts]) if all("masks" in p for p in parts) else None
    return WorldSamples(torch.cat([p["images"] for p in parts]), torch.cat([p["labels"] for p in parts]),
                        torch.cat([p["attributes"] for p in parts]), [c for p in parts for c in p["captions"]], masks)


def export_image_folder(samples: WorldSamples, directory: str | Path, progress: bool = True,
                        group_size: int = 1) -> Path:
    """Write ``samples`` as EG3D's image-folder dataset (what ``gan.real: images`` reads, and what
    EG3D's own training reads)::

        directory/00000/img00000000.png ...   1,000 PNGs per folder
        directory/dataset.json                {"labels": [["00000/img00000000.png", [25 numbers]], ...]}

    Samples rendered in groups (``group_size`` above 1, :func:`render_samples`) are listed as such
    under ``"groups"`` (what ``gan.group_size`` reads: :class:`~dreamportrait.training.real_images.ImageFolder`).

    The folder is filled under a temporary name and renamed when complete, so it is either whole or
    absent; when ``directory/dataset.json`` already exists the export is skipped."""
    directory = Path(directory)
    if (directory / "dataset.json").is_file():
        return directory
    if directory.exists():
        raise FileExistsError(f"{directory} exists but holds no dataset.json; remove it or choose another directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_directory(directory.parent, prefix=f".{directory.name}.")
    try:
        labels = []
        for index in tqdm(range(len(samples)), desc=f"exporting {directory.name}", disable=not progress):
            name = f"{index // 1000:05d}/img{index:08d}.png"
            (temporary / name).parent.mkdir(exist_ok=True)
            iio.imwrite(temporary / name, samples.images[index].permute(1, 2, 0).numpy())
            labels.append([name, samples.labels[index].tolist()])
        listing = {"labels": labels}
        if group_size > 1:
            listing["groups"] = [list(range(start, start + group_size)) for start in range(0, len(samples), group_size)]
        (temporary / "dataset.json").write_text(json.dumps(listing))
        os.replace(temporary, directory)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return directory
