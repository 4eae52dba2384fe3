"""EG3D's "hybrid" super-resolution modules: two StyleGAN2 synthesis blocks that turn the raw
neural rendering (RGB + 32 feature channels) into the final image, styled by the last w.

Names follow EG3D (``SuperresolutionHybrid2X`` ... ``8XDC``): the factor is relative to a 64²
neural rendering, and the module accepts any rendering size, bilinearly resizing it to its
``input_resolution`` first (antialiased when ``sr_antialias``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .resampling import setup_filter
from .stylegan2 import SynthesisBlock


class HybridSuperResolution(nn.Module):
    """Two synthesis blocks ``block0`` and ``block1``; subclasses fix the layout.

    Class attributes: ``scale`` (img_resolution / input_resolution), ``block0_upsamples``,
    ``default_channels`` (block0, block1 output channels), ``has_filter_buffer`` (EG3D registers an
    unused ``resample_filter`` buffer on all but the 8XDC module; kept for state-dict equality).
    """

    scale: int
    block0_upsamples: bool
    default_channels: tuple[int, int]
    has_filter_buffer = True
    resize_only_up = False

    def __init__(self, channels: int, img_resolution: int, sr_num_fp16_res: int, sr_antialias: bool, w_dim: int = 512,
                 block_channels: tuple[int, int] | None = None, num_fp16_res=None, conv_clamp=None, channel_base=None,
                 channel_max=None, **block_kwargs):
        # num_fp16_res, conv_clamp, channel_base and channel_max arrive with EG3D's configs and are
        # ignored there too: precision follows sr_num_fp16_res, channels follow block_channels.
        del num_fp16_res, conv_clamp, channel_base, channel_max
        super().__init__()
        if img_resolution % self.scale or img_resolution // self.scale < 4:
            raise ValueError(f"{type(self).__name__}: img_resolution must be a multiple of {self.scale} "
                             f"and at least {4 * self.scale}, got {img_resolution}")
        use_fp16 = sr_num_fp16_res > 0
        clamp = 256 if use_fp16 else None
        first, second = self.default_channels if block_channels is None else tuple(block_channels)
        self.input_resolution = img_resolution // self.scale
        self.sr_antialias = sr_antialias
        middle = img_resolution // 2
        self.block0 = SynthesisBlock(channels, first, w_dim=w_dim, resolution=middle, img_channels=3, is_last=False,
                                     use_fp16=use_fp16, conv_clamp=clamp, upsample=self.block0_upsamples, **block_kwargs)
        self.block1 = SynthesisBlock(first, second, w_dim=w_dim, resolution=img_resolution, img_channels=3,
                                     is_last=True, use_fp16=use_fp16, conv_clamp=clamp, **block_kwargs)
        if self.has_filter_buffer:
            self.register_buffer("resample_filter", setup_filter((1, 3, 3, 1)))

    def forward(self, rgb: Tensor, x: Tensor, ws: Tensor, noise_mode: str = "random", force_fp32: bool = False) -> Tensor:
        """rgb ``(N, 3, r, r)``, features x ``(N, channels, r, r)``, ws ``(N, num_ws, w_dim)`` (only the
        last w is used) -> image ``(N, 3, img_resolution, img_resolution)``."""
        ws = ws[:, -1:, :].repeat(1, 3, 1)
        size = x.shape[-1]
        if size < self.input_resolution or (size > self.input_resolution and not self.resize_only_up):
            target = (self.input_resolution, self.input_resolution)
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
            rgb = F.interpolate(rgb, size=target, mode="bilinear", align_corners=False, antialias=self.sr_antialias)
        x, rgb = self.block0(x, rgb, ws, noise_mode=noise_mode, force_fp32=force_fp32)
        x, rgb = self.block1(x, rgb, ws, noise_mode=noise_mode, force_fp32=force_fp32)
        return rgb


class SuperresolutionHybrid2X(HybridSuperResolution):
    """64² -> 128² in EG3D: a same-resolution block (128 ch), then a 2x block (64 ch)."""

    scale, block0_upsamples, default_channels = 2, False, (128, 64)


class SuperresolutionHybrid4X(HybridSuperResolution):
    """128² -> 256² in EG3D: as 2X; a larger rendering is passed through unresized (as in EG3D)."""

    scale, block0_upsamples, default_channels = 2, False, (128, 64)
    resize_only_up = True


class SuperresolutionHybrid8X(HybridSuperResolution):
    """128² -> 512² in EG3D: two 2x blocks (128, 64 ch)."""

    scale, block0_upsamples, default_channels = 4, True, (128, 64)


class SuperresolutionHybrid8XDC(HybridSuperResolution):
    """128² -> 512², double channels (256, 128): the published FFHQ-512 generator's module."""

    scale, block0_upsamples, default_channels = 4, True, (256, 128)
    has_filter_buffer = False


SUPERRESOLUTION_MODULES = {cls.__name__: cls for cls in (SuperresolutionHybrid2X, SuperresolutionHybrid4X,
                                                         SuperresolutionHybrid8X, SuperresolutionHybrid8XDC)}


def superresolution_class(name: str) -> type[HybridSuperResolution]:
    """The module for EG3D's ``rendering_kwargs['superresolution_module']`` (its dotted class path,
    e.g. ``training.superresolution.SuperresolutionHybrid8XDC``, or the bare class name)."""
    short = name.rsplit(".", 1)[-1]
    if short not in SUPERRESOLUTION_MODULES:
        raise ValueError(f"rendering_kwargs['superresolution_module'] must name one of "
                         f"{sorted(SUPERRESOLUTION_MODULES)}, got {name!r}")
    return SUPERRESOLUTION_MODULES[short]
