"""StyleGAN2 layers against independent statements of EG3D's formulation."""

import math

import pytest
import torch
import torch.nn.functional as F

from dreamportrait.models.layers import (FullyConnectedLayer, MinibatchStdLayer, bias_act, modulated_conv2d,
                                         normalize_2nd_moment)
from dreamportrait.models.resampling import conv2d_resample, downsample2d, setup_filter, upsample2d

FILTER = setup_filter((1, 3, 3, 1))


def zero_insert(x, up):
    out = x.new_zeros(x.shape[0], x.shape[1], x.shape[2] * up, x.shape[3] * up)
    out[:, :, ::up, ::up] = x
    return out


def fir(x, f, pad_before, pad_after, gain=1.0):
    """Pad and convolve (true convolution) each channel with f."""
    x = F.pad(x, [pad_before, pad_after, pad_before, pad_after])
    kernel = (f * gain).flip([0, 1])[None, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(x, kernel, groups=x.shape[1])


def test_setup_filter_is_normalised_outer_product():
    torch.testing.assert_close(FILTER, torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64)


@pytest.mark.parametrize("kernel", [1, 3])
def test_upsampling_convolution_is_zero_insertion_filter_then_convolution(kernel):
    # EG3D's generic path: zero-insert, pad by (k//2 + 2, k//2 + 1), filter with gain 4, then a
    # true convolution (flipped weights) without padding.
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    weight = torch.randn(4, 5, kernel, kernel, dtype=torch.float64)
    padding = kernel // 2
    expected = F.conv2d(fir(zero_insert(x, 2), FILTER.double(), padding + 2, padding + 1, gain=4), weight.flip([2, 3]))
    actual = conv2d_resample(x, weight, FILTER.double(), up=2, padding=padding)
    assert actual.shape == (2, 4, 12, 14)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("kernel", [1, 3])
def test_downsampling_convolution_is_convolution_then_filtered_decimation(kernel):
    # EG3D's generic path: pad by k//2 + 1, convolve, then filter and keep every second pixel
    # (the kernels filter first; linear shift-invariant operations commute).
    x = torch.randn(2, 5, 8, 10, dtype=torch.float64)
    weight = torch.randn(4, 5, kernel, kernel, dtype=torch.float64)
    padding = kernel // 2
    convolved = F.conv2d(F.pad(x, [padding + 1] * 4), weight)
    expected = fir(convolved, FILTER.double(), 0, 0)[:, :, ::2, ::2]
    actual = conv2d_resample(x, weight, FILTER.double(), down=2, padding=padding)
    assert actual.shape == (2, 4, 4, 5)
    torch.testing.assert_close(actual, expected)


def test_upsample_and_downsample_images():
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(upsample2d(x, FILTER.double()), fir(zero_insert(x, 2), FILTER.double(), 2, 1, gain=4))
    torch.testing.assert_close(downsample2d(x[..., :4], FILTER.double()), fir(x[..., :4], FILTER.double(), 1, 1)[:, :, ::2, ::2])
    # A constant image stays constant away from the borders.
    up = upsample2d(torch.ones(1, 1, 8, 8), FILTER)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_matches_per_sample_weights(up, demodulate):
    # EG3D's fused form: each sample's weights w * s (demodulated per output channel), one
    # grouped convolution over the batch.
    batch, cin, cout, k = 3, 6, 5, 3
    x = torch.randn(batch, cin, 8, 8, dtype=torch.float64)
    weight = torch.randn(cout, cin, k, k, dtype=torch.float64)
    styles = torch.randn(batch, cin, dtype=torch.float64)
    noise = torch.randn(batch, 1, 8 * up, 8 * up, dtype=torch.float64)
    w = weight[None] * styles[:, None, :, None, None]
    if demodulate:
        w = w * (w.square().sum(dim=[2, 3, 4]) + 1e-8).rsqrt()[:, :, None, None, None]
    expected = torch.cat([conv2d_resample(x[i : i + 1], w[i], FILTER.double(), up=up, padding=1) for i in range(batch)])
    actual = modulated_conv2d(x, weight, styles, noise=noise, up=up, padding=1, resample_filter=FILTER.double(),
                              demodulate=demodulate)
    torch.testing.assert_close(actual, expected + noise)


def test_bias_act_gain_and_clamp():
    x = torch.randn(4, 3, 5, 5)
    bias = torch.randn(3)
    lrelu = F.leaky_relu(x + bias[None, :, None, None], 0.2) * math.sqrt(2)
    torch.testing.assert_close(bias_act(x, bias, "lrelu"), lrelu)
    torch.testing.assert_close(bias_act(x, bias, "lrelu", clamp=0.5), lrelu.clamp(-0.5, 0.5))
    torch.testing.assert_close(bias_act(x, None, "linear", gain=3.0), x * 3)
    with pytest.raises(ValueError, match="activation"):
        bias_act(x, bias, "gelu")


def test_fully_connected_layer_uses_equalised_learning_rate():
    layer = FullyConnectedLayer(8, 4, activation="lrelu", lr_multiplier=0.01, bias_init=0.5)
    x = torch.randn(5, 8)
    expected = F.leaky_relu(x @ (layer.weight * 0.01 / math.sqrt(8)).t() + layer.bias * 0.01, 0.2) * math.sqrt(2)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.bias.detach(), torch.full([4], 0.5))


def test_normalize_2nd_moment():
    x = torch.randn(6, 10) * 5
    assert torch.allclose(normalize_2nd_moment(x).square().mean(dim=1), torch.ones(6), atol=1e-5)


def test_minibatch_std_against_loops():
    x = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    out = MinibatchStdLayer(group_size=4, num_channels=2)(x)
    assert out.shape == (8, 8, 3, 3)
    torch.testing.assert_close(out[:, :6], x)
    for sample in range(8):
        members = [sample % 2 + 2 * g for g in range(4)]  # EG3D groups samples with stride batch / group
        for feature in range(2):
            channels = x[members][:, 3 * feature : 3 * feature + 3]
            std = (channels.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
            torch.testing.assert_close(out[sample, 6 + feature], std.expand(3, 3))
    with pytest.raises(ValueError, match="multiple of the group size"):
        MinibatchStdLayer(group_size=4)(torch.randn(6, 2, 3, 3))
