"""StyleGAN2's mapping network, synthesis network and discriminator blocks (configs E-F), with
EG3D's parameter names: the tri-plane generator's backbone and the dual discriminator are built
from these.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .layers import ACTIVATION_GAINS, Conv2dLayer, FullyConnectedLayer, MinibatchStdLayer, bias_act, modulated_conv2d
from .layers import normalize_2nd_moment
from .resampling import downsample2d, setup_filter, upsample2d

NOISE_MODES = ("random", "const", "none")
BlockHook = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]


def check_noise_mode(noise_mode: str) -> None:
    if noise_mode not in NOISE_MODES:
        raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")


def block_dtype(use_fp16: bool, reference: Tensor, force_fp32: bool, full: torch.dtype) -> torch.dtype:
    """float16 for blocks configured for it, on CUDA only (as EG3D), else ``full``: the networks'
    full precision, their parameters' dtype (float32, or float64 for a model cast to check
    gradients in float64; EG3D hard-codes float32)."""
    return torch.float16 if use_fp16 and reference.device.type == "cuda" and not force_fp32 else full


class MappingNetwork(nn.Module):
    """z ``(N, z_dim)`` and label c ``(N, c_dim)`` -> w ``(N, num_ws, w_dim)`` (or ``(N, w_dim)`` when
    ``num_ws`` is None): both normalised to unit second moment, concatenated, through
    ``num_layers`` lrelu FC layers with learning-rate multiplier ``lr_multiplier``. Tracks the mean
    w (``w_avg``) for truncation."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, num_ws: int | None, num_layers: int = 8,
                 embed_features: int | None = None, layer_features: int | None = None, activation: str = "lrelu",
                 lr_multiplier: float = 0.01, w_avg_beta: float | None = 0.998):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim, self.num_ws = z_dim, c_dim, w_dim, num_ws
        self.num_layers, self.w_avg_beta = num_layers, w_avg_beta
        embed_features = 0 if c_dim == 0 else (w_dim if embed_features is None else embed_features)
        layer_features = w_dim if layer_features is None else layer_features
        features = [z_dim + embed_features] + [layer_features] * (num_layers - 1) + [w_dim]
        if c_dim > 0:
            self.embed = FullyConnectedLayer(c_dim, embed_features)
        for index in range(num_layers):
            layer = FullyConnectedLayer(features[index], features[index + 1], activation=activation,
                                        lr_multiplier=lr_multiplier)
            setattr(self, f"fc{index}", layer)
        if num_ws is not None and w_avg_beta is not None:
            self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(self, z: Tensor | None, c: Tensor | None, truncation_psi: float = 1.0,
                truncation_cutoff: int | None = None, update_emas: bool = False) -> Tensor:
        inputs = []
        if self.z_dim > 0:
            _check_vector("z", z, self.z_dim)
            inputs.append(normalize_2nd_moment(z.to(self.fc0.weight.dtype)))
        if self.c_dim > 0:
            _check_vector("c", c, self.c_dim)
            inputs.append(normalize_2nd_moment(self.embed(c.to(self.embed.weight.dtype))))
        if len(inputs) == 2 and inputs[0].shape[0] != inputs[1].shape[0]:
            raise ValueError(f"MappingNetwork: z has batch size {z.shape[0]} but c has {c.shape[0]}")
        x = torch.cat(inputs, dim=1)
        for index in range(self.num_layers):
            x = getattr(self, f"fc{index}")(x)
        if update_emas and self.w_avg_beta is not None:
            self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if self.num_ws is not None:
            x = x.unsqueeze(1).repeat([1, self.num_ws, 1])
        if truncation_psi != 1:
            if self.w_avg_beta is None:
                raise ValueError("MappingNetwork: truncation needs w_avg, which this network does not track")
            if self.num_ws is None or truncation_cutoff is None:
                x = self.w_avg.lerp(x, truncation_psi)
            else:
                x = torch.cat([self.w_avg.lerp(x[:, :truncation_cutoff], truncation_psi), x[:, truncation_cutoff:]], 1)
        return x

    def extra_repr(self) -> str:
        return f"z_dim={self.z_dim}, c_dim={self.c_dim}, w_dim={self.w_dim}, num_ws={self.num_ws}"


def _check_vector(name: str, value, size: int) -> None:
    if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[1] != size:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"MappingNetwork: {name} must have shape (N, {size}), got {shape}")


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (optionally 2x up-sampling), per-pixel noise, bias, lrelu, clamp."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, kernel_size: int = 3,
                 up: int = 1, use_noise: bool = True, activation: str = "lrelu", resample_filter=(1, 3, 3, 1),
                 conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.w_dim = in_channels, out_channels, w_dim
        self.resolution, self.up, self.use_noise = resolution, up, use_noise
        self.activation, self.conv_clamp = activation, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        if use_noise:
            self.register_buffer("noise_const", torch.randn([resolution, resolution]))
            self.noise_strength = nn.Parameter(torch.zeros([]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))

    def forward(self, x: Tensor, w: Tensor, noise_mode: str = "random", gain: float = 1.0) -> Tensor:
        check_noise_mode(noise_mode)
        styles = self.affine(w)
        noise = None
        if self.use_noise and noise_mode == "random":
            noise = torch.randn([x.shape[0], 1, self.resolution, self.resolution], device=x.device) * self.noise_strength
        elif self.use_noise and noise_mode == "const":
            noise = self.noise_const * self.noise_strength
        x = modulated_conv2d(x, self.weight, styles, noise=noise, up=self.up, padding=self.padding,
                             resample_filter=self.resample_filter)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, self.activation, gain=ACTIVATION_GAINS[self.activation] * gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, w_dim={self.w_dim}, "
                f"resolution={self.resolution}, up={self.up}, activation={self.activation}")


class ToRGBLayer(nn.Module):
    """Modulated 1x1 convolution to image channels, without demodulation."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, kernel_size: int = 1,
                 conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.out_channels, self.w_dim, self.conv_clamp = in_channels, out_channels, w_dim, conv_clamp
        self.affine = FullyConnectedLayer(w_dim, in_channels, bias_init=1)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size, kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False)
        return bias_act(x, self.bias, clamp=self.conv_clamp)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, w_dim={self.w_dim}"


class SynthesisBlock(nn.Module):
    """One resolution of the synthesis network: two modulated convolutions (the first 2x
    up-sampling, unless ``upsample=False`` as in EG3D's ``SynthesisBlockNoUp``) and, for the
    ``skip`` architecture, a ToRGB added to the up-sampled image of the previous block.

    ``in_channels == 0`` makes it the first block, starting from a learned constant. It consumes
    ``num_conv + num_torgb`` ws ``(N, ·, w_dim)``.
    """

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 is_last: bool, architecture: str = "skip", resample_filter=(1, 3, 3, 1),
                 conv_clamp: float | None = 256, use_fp16: bool = False, fp16_channels_last: bool = False,
                 fused_modconv_default=True, upsample: bool = True, **layer_kwargs):
        # fp16_channels_last and fused_modconv_default are EG3D performance switches kept so its
        # configs construct these blocks; neither changes the result.
        del fp16_channels_last, fused_modconv_default
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"SynthesisBlock: architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        super().__init__()
        self.in_channels, self.w_dim, self.resolution, self.img_channels = in_channels, w_dim, resolution, img_channels
        self.is_last, self.architecture, self.use_fp16, self.upsample = is_last, architecture, use_fp16, upsample
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_conv = self.num_torgb = 0
        up = 2 if upsample else 1
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim=w_dim, resolution=resolution, up=up,
                                        resample_filter=resample_filter, conv_clamp=conv_clamp, **layer_kwargs)
            self.num_conv += 1
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim=w_dim, resolution=resolution,
                                    conv_clamp=conv_clamp, **layer_kwargs)
        self.num_conv += 1
        if is_last or architecture == "skip":
            self.torgb = ToRGBLayer(out_channels, img_channels, w_dim=w_dim, conv_clamp=conv_clamp)
            self.num_torgb += 1
        if in_channels != 0 and architecture == "resnet":
            self.skip = Conv2dLayer(in_channels, out_channels, kernel_size=1, bias=False, up=up,
                                    resample_filter=resample_filter)

    def forward(self, x: Tensor | None, img: Tensor | None, ws: Tensor, force_fp32: bool = False,
                noise_mode: str = "random") -> tuple[Tensor, Tensor | None]:
        expected = self.num_conv + self.num_torgb
        if ws.dim() != 3 or ws.shape[1] != expected or ws.shape[2] != self.w_dim:
            raise ValueError(f"SynthesisBlock: ws must have shape (N, {expected}, {self.w_dim}), got {tuple(ws.shape)}")
        w_iter = iter(ws.unbind(dim=1))
        dtype = block_dtype(self.use_fp16, ws, force_fp32, full=ws.dtype)
        in_resolution = self.resolution // 2 if self.upsample else self.resolution
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).repeat([ws.shape[0], 1, 1, 1])
            x = self.conv1(x, next(w_iter), noise_mode=noise_mode)
        else:
            if x is None or tuple(x.shape[1:]) != (self.in_channels, in_resolution, in_resolution):
                shape = None if x is None else tuple(x.shape)
                raise ValueError(f"SynthesisBlock: x must have shape (N, {self.in_channels}, {in_resolution}, "
                                 f"{in_resolution}), got {shape}")
            x = x.to(dtype)
            if self.architecture == "resnet":
                y = self.skip(x, gain=math.sqrt(0.5))
                x = self.conv0(x, next(w_iter), noise_mode=noise_mode)
                x = y + self.conv1(x, next(w_iter), noise_mode=noise_mode, gain=math.sqrt(0.5))
            else:
                x = self.conv0(x, next(w_iter), noise_mode=noise_mode)
                x = self.conv1(x, next(w_iter), noise_mode=noise_mode)
        if img is not None and self.upsample:
            img = upsample2d(img, self.resample_filter)
        if self.is_last or self.architecture == "skip":
            y = self.torgb(x, next(w_iter)).to(ws.dtype)
            img = img + y if img is not None else y
        return x, img

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, architecture={self.architecture}, upsample={self.upsample}"


def channels_per_resolution(resolutions: list[int], channel_base: int, channel_max: int) -> dict[int, int]:
    return {res: min(channel_base // res, channel_max) for res in resolutions}


def fp16_resolution(img_resolution: int, num_fp16_res: int) -> int:
    """The lowest resolution that runs in float16 when ``num_fp16_res`` highest ones do."""
    return max(2 ** (int(math.log2(img_resolution)) + 1 - num_fp16_res), 8)


def check_resolution(owner: str, img_resolution: int) -> None:
    if img_resolution < 4 or img_resolution & (img_resolution - 1):
        raise ValueError(f"{owner}: img_resolution must be a power of two >= 4, got {img_resolution}")


class SynthesisNetwork(nn.Module):
    """ws ``(N, num_ws, w_dim)`` -> image ``(N, img_channels, img_resolution, img_resolution)``: blocks
    ``b4`` ... ``b{img_resolution}`` with ``min(channel_base / res, channel_max)`` channels."""

    def __init__(self, w_dim: int, img_resolution: int, img_channels: int, channel_base: int = 32768,
                 channel_max: int = 512, num_fp16_res: int = 4, **block_kwargs):
        check_resolution("SynthesisNetwork", img_resolution)
        super().__init__()
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(2, int(math.log2(img_resolution)) + 1)]
        channels = channels_per_resolution(self.block_resolutions, channel_base, channel_max)
        lowest_fp16 = fp16_resolution(img_resolution, num_fp16_res)
        self.num_ws = 0
        for res in self.block_resolutions:
            is_last = res == img_resolution
            block = SynthesisBlock(channels[res // 2] if res > 4 else 0, channels[res], w_dim=w_dim, resolution=res,
                                   img_channels=img_channels, is_last=is_last, use_fp16=res >= lowest_fp16,
                                   **block_kwargs)
            self.num_ws += block.num_conv + (block.num_torgb if is_last else 0)
            setattr(self, f"b{res}", block)

    def forward(self, ws: Tensor, noise_mode: str = "random", force_fp32: bool = False,
                block_hook: BlockHook | None = None) -> Tensor:
        """``block_hook(resolution, x, img) -> (x, img)``, when given, runs after each block: how
        DreamPortrait's cross-attention enters the synthesis."""
        if ws.dim() != 3 or ws.shape[1:] != (self.num_ws, self.w_dim):
            raise ValueError(f"SynthesisNetwork: ws must have shape (N, {self.num_ws}, {self.w_dim}), "
                             f"got {tuple(ws.shape)}")
        ws = ws.to(self.b4.conv1.weight.dtype)  # full precision, as the blocks expect
        x = img = None
        first = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            # Consecutive blocks share a w: a block's ToRGB uses the next block's first w.
            x, img = block(x, img, ws.narrow(1, first, block.num_conv + block.num_torgb),
                           force_fp32=force_fp32, noise_mode=noise_mode)
            if block_hook is not None:
                x, img = block_hook(res, x, img)
            first += block.num_conv
        return img

    def extra_repr(self) -> str:
        return f"w_dim={self.w_dim}, num_ws={self.num_ws}, img_resolution={self.img_resolution}"


class StyleGAN2Backbone(nn.Module):
    """StyleGAN2 generator (EG3D's ``networks_stylegan2.Generator``): ``mapping`` + ``synthesis``."""

    def __init__(self, z_dim: int, c_dim: int, w_dim: int, img_resolution: int, img_channels: int,
                 mapping_kwargs: dict | None = None, **synthesis_kwargs):
        super().__init__()
        self.z_dim, self.c_dim, self.w_dim = z_dim, c_dim, w_dim
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.synthesis = SynthesisNetwork(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                                          **synthesis_kwargs)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, num_ws=self.num_ws,
                                      **(mapping_kwargs or {}))

    def forward(self, z: Tensor, c: Tensor, truncation_psi: float = 1.0, truncation_cutoff: int | None = None,
                update_emas: bool = False, **synthesis_kwargs) -> Tensor:
        ws = self.mapping(z, c, truncation_psi=truncation_psi, truncation_cutoff=truncation_cutoff,
                          update_emas=update_emas)
        return self.synthesis(ws, **synthesis_kwargs)


class DiscriminatorBlock(nn.Module):
    """One resolution of the discriminator: (FromRGB for the first block), two 3x3 lrelu
    convolutions, the second 2x down-sampling, and a 1x1 down-sampling skip for ``resnet``."""

    def __init__(self, in_channels: int, tmp_channels: int, out_channels: int, resolution: int, img_channels: int,
                 first_layer_idx: int, architecture: str = "resnet", activation: str = "lrelu",
                 resample_filter=(1, 3, 3, 1), conv_clamp: float | None = None, use_fp16: bool = False,
                 fp16_channels_last: bool = False, freeze_layers: int = 0):
        del fp16_channels_last  # a memory-format switch of EG3D's; no effect on results
        if in_channels not in (0, tmp_channels):
            raise ValueError(f"DiscriminatorBlock: in_channels must be 0 or tmp_channels ({tmp_channels}), got {in_channels}")
        if architecture not in ("orig", "skip", "resnet"):
            raise ValueError(f"DiscriminatorBlock: architecture must be 'orig', 'skip' or 'resnet', got {architecture!r}")
        super().__init__()
        self.in_channels, self.resolution, self.img_channels = in_channels, resolution, img_channels
        self.first_layer_idx, self.architecture, self.use_fp16 = first_layer_idx, architecture, use_fp16
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.num_layers = 0

        def trainable() -> bool:  # Freeze-D: the first freeze_layers layers of the network are frozen
            self.num_layers += 1
            return first_layer_idx + self.num_layers - 1 >= freeze_layers

        common = dict(activation=activation, conv_clamp=conv_clamp)
        if in_channels == 0 or architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, kernel_size=1, trainable=trainable(), **common)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, kernel_size=3, trainable=trainable(), **common)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, kernel_size=3, down=2, trainable=trainable(),
                                 resample_filter=resample_filter, **common)
        if architecture == "resnet":
            self.skip = Conv2dLayer(tmp_channels, out_channels, kernel_size=1, bias=False, down=2,
                                    trainable=trainable(), resample_filter=resample_filter)

    def forward(self, x: Tensor | None, img: Tensor | None, force_fp32: bool = False):
        dtype = block_dtype(self.use_fp16, x if x is not None else img, force_fp32, full=self.conv0.weight.dtype)
        if x is not None:
            x = x.to(dtype)
        if self.in_channels == 0 or self.architecture == "skip":
            if img is None or tuple(img.shape[1:]) != (self.img_channels, self.resolution, self.resolution):
                shape = None if img is None else tuple(img.shape)
                raise ValueError(f"DiscriminatorBlock: img must have shape (N, {self.img_channels}, {self.resolution}, "
                                 f"{self.resolution}), got {shape}")
            img = img.to(dtype)
            y = self.fromrgb(img)
            x = x + y if x is not None else y
            img = downsample2d(img, self.resample_filter) if self.architecture == "skip" else None
        if self.architecture == "resnet":
            y = self.skip(x, gain=math.sqrt(0.5))
            x = y + self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        else:
            x = self.conv1(self.conv0(x))
        return x, img

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, architecture={self.architecture}"


class DiscriminatorEpilogue(nn.Module):
    """The 4x4 end of the discriminator: minibatch std, conv, FC, output; with a camera/label
    embedding ``cmap`` the score is the projection ``<out, cmap> / sqrt(cmap_dim)``."""

    def __init__(self, in_channels: int, cmap_dim: int, resolution: int, img_channels: int,
                 architecture: str = "resnet", mbstd_group_size: int | None = 4, mbstd_num_channels: int = 1,
                 activation: str = "lrelu", conv_clamp: float | None = None):
        super().__init__()
        self.in_channels, self.cmap_dim, self.resolution = in_channels, cmap_dim, resolution
        self.img_channels, self.architecture = img_channels, architecture
        if architecture == "skip":
            self.fromrgb = Conv2dLayer(img_channels, in_channels, kernel_size=1, activation=activation)
        self.mbstd = MinibatchStdLayer(mbstd_group_size, mbstd_num_channels) if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, kernel_size=3, activation=activation,
                                conv_clamp=conv_clamp)
        self.fc = FullyConnectedLayer(in_channels * resolution**2, in_channels, activation=activation)
        self.out = FullyConnectedLayer(in_channels, 1 if cmap_dim == 0 else cmap_dim)

    def forward(self, x: Tensor, img: Tensor | None, cmap: Tensor | None) -> Tensor:
        x = x.to(self.fc.weight.dtype)
        if self.architecture == "skip":
            x = x + self.fromrgb(img.to(x.dtype))
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.out(self.fc(self.conv(x).flatten(1)))
        if self.cmap_dim > 0:
            x = (x * cmap).sum(dim=1, keepdim=True) * (1 / math.sqrt(self.cmap_dim))
        return x

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, architecture={self.architecture}"
