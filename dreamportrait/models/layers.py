"""StyleGAN2's layers with equalised learning rate, as EG3D uses them.

Weights are stored as unit-variance normals and scaled by ``1/sqrt(fan_in)`` (times a learning-rate
multiplier) at run time; parameter and buffer names and shapes equal EG3D's so its state dicts load.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .resampling import conv2d_resample, setup_filter

ACTIVATION_GAINS = {"linear": 1.0, "relu": math.sqrt(2), "lrelu": math.sqrt(2)}
"""Each activation's default gain: it keeps unit-variance inputs at unit variance."""


def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """Scale ``x`` to unit mean square along ``dim``."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


def bias_act(x: Tensor, bias: Tensor | None, activation: str = "linear", gain: float | None = None,
             clamp: float | None = None) -> Tensor:
    """``clamp(act(x + bias) * gain, -clamp, clamp)``; the bias is broadcast along dim 1.

    ``gain`` defaults to the activation's (:data:`ACTIVATION_GAINS`); lrelu has slope 0.2.
    """
    if activation not in ACTIVATION_GAINS:
        raise ValueError(f"bias_act: activation must be one of {sorted(ACTIVATION_GAINS)}, got {activation!r}")
    if bias is not None:
        x = x + bias.to(x.dtype).reshape([-1 if i == 1 else 1 for i in range(x.dim())])
    if activation == "lrelu":
        x = F.leaky_relu(x, 0.2)
    elif activation == "relu":
        x = F.relu(x)
    gain = ACTIVATION_GAINS[activation] if gain is None else gain
    if gain != 1:
        x = x * gain
    if clamp is not None and clamp >= 0:
        x = x.clamp(-clamp, clamp)
    return x


def modulated_conv2d(
    x: Tensor,
    weight: Tensor,
    styles: Tensor,
    noise: Tensor | None = None,
    up: int = 1,
    padding: int = 0,
    resample_filter: Tensor | None = None,
    demodulate: bool = True,
) -> Tensor:
    """StyleGAN2's modulated convolution: per-sample input scales ``styles``, optional demodulation
    (each output channel rescaled to unit norm of its modulated weights), then ``+ noise``.

    x ``(N, I, H, W)``, weight ``(O, I, k, k)``, styles ``(N, I)``, noise broadcastable to the output.
    Computed by scaling activations around one shared convolution (EG3D's non-fused form, equal to
    its grouped-convolution form up to rounding).
    """
    in_channels, kernel = weight.shape[1], weight.shape[-1]
    if x.dtype == torch.float16 and demodulate:
        # Pre-normalise so the float16 products cannot overflow; demodulation cancels the scales.
        weight = weight * (1 / math.sqrt(in_channels * kernel * kernel) / weight.norm(float("inf"), dim=[1, 2, 3], keepdim=True))
        styles = styles / styles.norm(float("inf"), dim=1, keepdim=True)
    x = x * styles.to(x.dtype).reshape(*styles.shape, 1, 1)
    x = conv2d_resample(x, weight.to(x.dtype), resample_filter, up=up, padding=padding)
    if demodulate:
        # |w * s|^2 summed over (I, k, k) = styles^2 @ (sum over k, k of w^2)^T.
        demodulation = (styles.square() @ weight.square().sum(dim=[2, 3]).t() + 1e-8).rsqrt()
        x = x * demodulation.to(x.dtype).reshape(*demodulation.shape, 1, 1)
    if noise is not None:
        x = x + noise.to(x.dtype)
    return x


class FullyConnectedLayer(nn.Module):
    """``act(x @ (weight * lr_multiplier / sqrt(in)).T + bias * lr_multiplier)``, weight ``(out, in)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str = "linear",
                 lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.activation = in_features, out_features, activation
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight.to(x.dtype) * self.weight_gain
        bias = None if self.bias is None else self.bias.to(x.dtype) * self.bias_gain
        if self.activation == "linear" and bias is not None:
            return torch.addmm(bias.unsqueeze(0), x, weight.t())
        return bias_act(x.matmul(weight.t()), bias, self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"


class Conv2dLayer(nn.Module):
    """Equalised-lr convolution with optional 2x FIR up/down-sampling, bias, activation and clamp."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
                 activation: str = "linear", up: int = 1, down: int = 1, resample_filter=(1, 3, 3, 1),
                 conv_clamp: float | None = None, trainable: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.activation = in_channels, out_channels, activation
        self.up, self.down, self.conv_clamp = up, down, conv_clamp
        self.register_buffer("resample_filter", setup_filter(resample_filter))
        self.padding = kernel_size // 2
        self.weight_gain = 1 / math.sqrt(in_channels * kernel_size**2)
        weight = torch.randn([out_channels, in_channels, kernel_size, kernel_size])
        bias_value = torch.zeros([out_channels]) if bias else None
        if trainable:
            self.weight = nn.Parameter(weight)
            self.bias = nn.Parameter(bias_value) if bias_value is not None else None
        else:  # frozen layers (EG3D's freeze_layers) keep their weights as buffers, under the same names
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias_value)

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        weight = (self.weight * self.weight_gain).to(x.dtype)
        x = conv2d_resample(x, weight, self.resample_filter, up=self.up, down=self.down, padding=self.padding)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return bias_act(x, self.bias, self.activation, gain=ACTIVATION_GAINS[self.activation] * gain, clamp=clamp)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, activation={self.activation}, "
                f"up={self.up}, down={self.down}")


class MinibatchStdLayer(nn.Module):
    """Appends ``num_channels`` feature maps holding the standard deviation of the features across
    groups of ``group_size`` samples (averaged over channels and pixels): lets a discriminator see
    a lack of variety."""

    def __init__(self, group_size: int | None, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        group = batch if self.group_size is None else min(self.group_size, batch)
        if batch % group:
            raise ValueError(
                f"MinibatchStdLayer: the batch size ({batch}) must be a multiple of the group size ({group})"
            )
        features = self.num_channels
        y = x.reshape(group, -1, features, channels // features, height, width)
        y = (y - y.mean(dim=0)).square().mean(dim=0)  # variance over the group
        y = (y + 1e-8).sqrt().mean(dim=[2, 3, 4])  # (batch / group, F)
        y = y.reshape(-1, features, 1, 1).repeat(group, 1, height, width)
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"
