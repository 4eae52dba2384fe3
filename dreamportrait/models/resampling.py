"""StyleGAN2's FIR resampling: up-sample, pad, filter, down-sample (``upfirdn2d``) and convolutions
fused with it.

All images are ``(N, C, H, W)``. The low-pass filter is a 2-D tensor, the outer product of the
1-D taps normalised to sum 1 (EG3D registers it as the ``resample_filter`` buffer of many layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def setup_filter(taps: Sequence[float] = (1, 3, 3, 1)) -> Tensor:
    """The 2-D low-pass filter of separable ``taps``, normalised to sum 1, ``(len, len)`` float32."""
    taps_1d = torch.as_tensor(taps, dtype=torch.float32)
    if taps_1d.dim() != 1 or taps_1d.numel() == 0:
        raise ValueError(f"setup_filter: taps must be a non-empty 1-D sequence, got {taps!r}")
    kernel = torch.outer(taps_1d, taps_1d)
    return kernel / kernel.sum()


def upfirdn2d(
    x: Tensor,
    f: Tensor,
    up: int = 1,
    down: int = 1,
    padding: Sequence[int] = (0, 0, 0, 0),
    gain: float = 1.0,
) -> Tensor:
    """Up-sample by zero insertion, pad, convolve with ``f * gain``, keep every ``down``-th pixel.

    ``padding`` is ``(left, right, top, bottom)`` in up-sampled pixels; negative values crop.
    ``f`` is applied as a true convolution (flipped), as StyleGAN2 does; its filters are symmetric.
    """
    batch, channels, height, width = x.shape
    if up > 1:
        x = x.reshape(batch, channels, height, 1, width, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1])
        x = x.reshape(batch, channels, height * up, width * up)
    left, right, top, bottom = padding
    x = F.pad(x, [max(left, 0), max(right, 0), max(top, 0), max(bottom, 0)])
    x = x[:, :, max(-top, 0) : x.shape[2] - max(-bottom, 0), max(-left, 0) : x.shape[3] - max(-right, 0)]
    kernel = (f * gain).to(x.dtype).flip([0, 1])
    x = F.conv2d(x, kernel[None, None].expand(channels, 1, *kernel.shape), groups=channels)
    return x[:, :, ::down, ::down] if down > 1 else x


def upsample2d(x: Tensor, f: Tensor, up: int = 2) -> Tensor:
    """``(N, C, H, W)`` -> ``(N, C, H * up, W * up)``, low-passed with ``f``."""
    size = f.shape[-1]
    pad_before, pad_after = (size + up - 1) // 2, (size - up) // 2
    return upfirdn2d(x, f, up=up, padding=(pad_before, pad_after, pad_before, pad_after), gain=up * up)


def downsample2d(x: Tensor, f: Tensor, down: int = 2) -> Tensor:
    """``(N, C, H, W)`` -> ``(N, C, H / down, W / down)``, low-passed with ``f``."""
    size = f.shape[-1]
    pad_before, pad_after = (size - down + 1) // 2, (size - down) // 2
    return upfirdn2d(x, f, down=down, padding=(pad_before, pad_after, pad_before, pad_after))


def conv2d_resample(x: Tensor, weight: Tensor, f: Tensor | None = None, up: int = 1, down: int = 1, padding: int = 0) -> Tensor:
    """A convolution fused with 2x FIR up- or down-sampling, as StyleGAN2 layers use it.

    Without resampling it is ``F.conv2d`` (a correlation). With ``up`` it is a true convolution of
    the zero-inserted input followed by the low-pass ``f`` (gain ``up**2``), computed as a strided
    transposed convolution; with ``down`` the input is low-passed and then convolved with stride
    ``down``. ``weight`` is ``(O, I, k, k)``; ``padding`` is relative to the up-sampled image.
    """
    if up > 1 and down > 1:
        raise ValueError("conv2d_resample: up- and down-sampling in one layer is not supported")
    kernel = weight.shape[-1]
    if up == 1 and down == 1:
        return F.conv2d(x, weight, padding=padding)
    size = f.shape[-1]
    if up > 1:
        # Padding of the zero-inserted image before the filter, then what the transposed
        # convolution already provides (it covers kernel - 1 before and kernel - up after).
        before = padding + (size + up - 1) // 2 - (kernel - 1)
        after = padding + (size - up) // 2 - (kernel - up)
        x = F.conv_transpose2d(x, weight.transpose(0, 1), stride=up)
        return upfirdn2d(x, f, padding=(before, after, before, after), gain=up * up)
    before = padding + (size - down + 1) // 2
    after = padding + (size - down) // 2
    if kernel == 1:  # filter and drop pixels first: the 1x1 convolution then runs on fewer pixels
        return F.conv2d(upfirdn2d(x, f, down=down, padding=(before, after, before, after)), weight)
    return F.conv2d(upfirdn2d(x, f, padding=(before, after, before, after)), weight, stride=down)
