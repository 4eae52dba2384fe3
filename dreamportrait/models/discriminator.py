"""EG3D's dual discriminator: judges the final image together with the raw neural rendering
(resized to the same size), conditioned on the camera."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resampling import setup_filter
from .stylegan2 import DiscriminatorBlock, DiscriminatorEpilogue, MappingNetwork, channels_per_resolution
from .stylegan2 import check_resolution, fp16_resolution


def resize_raw_image(image_raw: Tensor, size: int) -> Tensor:
    """EG3D's ``filtered_resizing`` in its default (antialiased bilinear) mode."""
    return F.interpolate(image_raw, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class DualDiscriminator(nn.Module):
    """``D({"image", "image_raw"}, c)`` -> logits ``(N, 1)``: a ResNet StyleGAN2 discriminator on
    the 6 channels of the image and the up-sampled raw image, with the camera label projected in
    at the end (``mapping`` embeds c). EG3D's constructor arguments and parameter names."""

    def __init__(self, c_dim: int, img_resolution: int, img_channels: int, architecture: str = "resnet",
                 channel_base: int = 32768, channel_max: int = 512, num_fp16_res: int = 4,
                 conv_clamp: float | None = 256, cmap_dim: int | None = None, disc_c_noise: float = 0.0,
                 block_kwargs: Mapping | None = None, mapping_kwargs: Mapping | None = None,
                 epilogue_kwargs: Mapping | None = None):
        check_resolution("DualDiscriminator", img_resolution)
        super().__init__()
        self.init_kwargs = copy.deepcopy(dict(
            c_dim=c_dim, img_resolution=img_resolution, img_channels=img_channels, architecture=architecture,
            channel_base=channel_base, channel_max=channel_max, num_fp16_res=num_fp16_res, conv_clamp=conv_clamp,
            cmap_dim=cmap_dim, disc_c_noise=disc_c_noise, block_kwargs=dict(block_kwargs or {}),
            mapping_kwargs=dict(mapping_kwargs or {}), epilogue_kwargs=dict(epilogue_kwargs or {})))
        """The constructor's arguments: what a saved checkpoint records."""
        img_channels *= 2
        self.c_dim, self.img_resolution, self.img_channels = c_dim, img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(int(math.log2(img_resolution)), 2, -1)]
        channels = channels_per_resolution(self.block_resolutions + [4], channel_base, channel_max)
        lowest_fp16 = fp16_resolution(img_resolution, num_fp16_res)
        cmap_dim = 0 if c_dim == 0 else (channels[4] if cmap_dim is None else cmap_dim)
        common = dict(img_channels=img_channels, architecture=architecture, conv_clamp=conv_clamp)
        layer_index = 0
        for res in self.block_resolutions:
            block = DiscriminatorBlock(channels[res] if res < img_resolution else 0, channels[res], channels[res // 2],
                                       resolution=res, first_layer_idx=layer_index, use_fp16=res >= lowest_fp16,
                                       **dict(block_kwargs or {}), **common)
            setattr(self, f"b{res}", block)
            layer_index += block.num_layers
        if c_dim > 0:
            self.mapping = MappingNetwork(z_dim=0, c_dim=c_dim, w_dim=cmap_dim, num_ws=None, w_avg_beta=None,
                                          **dict(mapping_kwargs or {}))
        self.b4 = DiscriminatorEpilogue(channels[4], cmap_dim=cmap_dim, resolution=4, **dict(epilogue_kwargs or {}),
                                        **common)
        self.register_buffer("resample_filter", setup_filter((1, 3, 3, 1)))
        self.disc_c_noise = disc_c_noise

    def forward(self, img: Mapping[str, Tensor], c: Tensor, update_emas: bool = False) -> Tensor:
        """img: ``{"image": (N, 3, R, R), "image_raw": (N, 3, r, r)}``; c: ``(N, c_dim)`` -> ``(N, 1)``."""
        del update_emas  # accepted for EG3D's call signature; nothing to update
        image, image_raw = self._check_images(img)
        x = torch.cat([image, resize_raw_image(image_raw, image.shape[-1])], dim=1)
        features = None
        for res in self.block_resolutions:
            features, x = getattr(self, f"b{res}")(features, x)
        cmap = None
        if self.c_dim > 0:
            if not isinstance(c, Tensor) or c.dim() != 2 or tuple(c.shape) != (image.shape[0], self.c_dim):
                shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
                raise ValueError(f"c must have shape ({image.shape[0]}, {self.c_dim}) (one camera label per image), "
                                 f"got {shape}")
            if self.disc_c_noise > 0:
                c = c + torch.randn_like(c) * c.std(0) * self.disc_c_noise
            cmap = self.mapping(None, c)
        return self.b4(features, x, cmap)

    def _check_images(self, img) -> tuple[Tensor, Tensor]:
        if not isinstance(img, Mapping) or "image" not in img or "image_raw" not in img:
            raise ValueError("img must be a mapping with 'image' and 'image_raw' tensors (a generator's output)")
        image, image_raw = img["image"], img["image_raw"]
        expected = (self.img_channels // 2, self.img_resolution, self.img_resolution)
        if image.dim() != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(f"img['image'] must have shape (N, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(image.shape)}")
        if image_raw.dim() != 4 or image_raw.shape[:2] != image.shape[:2]:
            raise ValueError(f"img['image_raw'] must have shape ({image.shape[0]}, {image.shape[1]}, r, r), "
                             f"got {tuple(image_raw.shape)}")
        return image, image_raw

    def extra_repr(self) -> str:
        return f"c_dim={self.c_dim}, img_resolution={self.img_resolution}, img_channels={self.img_channels}"
