"""StyleGAN2's networks as EG3D builds them, re-stated block by block on small sizes: the mapping
network (normalisation, equalised-lr layers, truncation, the w average), the synthesis layer, ToRGB,
block and network (which w each layer takes, skip images, resnet gains, noise modes), the
discriminator block and epilogue (Freeze-D, minibatch std, the camera projection), the dual
discriminator's inputs and the super-resolution's. The layers themselves are pinned by test_layers.py;
here their composition is."""

import math

import pytest
import torch
import torch.nn.functional as F

from dreamportrait.models import stylegan2
from dreamportrait.models.discriminator import DualDiscriminator
from dreamportrait.models.layers import modulated_conv2d
from dreamportrait.models.resampling import downsample2d, setup_filter, upsample2d
from dreamportrait.models.layers import MinibatchStdLayer
from dreamportrait.models.stylegan2 import (DiscriminatorBlock, DiscriminatorEpilogue, MappingNetwork,
                                            SynthesisBlock, SynthesisLayer, SynthesisNetwork, ToRGBLayer)
from dreamportrait.models.superresolution import (SuperresolutionHybrid2X, SuperresolutionHybrid4X,
                                                  SuperresolutionHybrid8X, SuperresolutionHybrid8XDC,
                                                  superresolution_class)

SQRT2 = math.sqrt(2)
FILTER = setup_filter((1, 3, 3, 1)).double()


def lrelu(x):
    return F.leaky_relu(x, 0.2) * SQRT2


def fc(layer, x, activation="linear"):
    """An equalised-lr FC layer written out: weight * lr / sqrt(in), bias * lr."""
    lr = layer.bias_gain
    y = x @ (layer.weight * lr / math.sqrt(layer.in_features)).t() + layer.bias * lr
    return lrelu(y) if activation == "lrelu" else y


def norm2(x):
    return x / (x.square().mean(dim=1, keepdim=True) + 1e-8).sqrt()


def randomise(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
        for name, buffer in module.named_buffers():
            if name.endswith("noise_const") or name.endswith("w_avg"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator, dtype=buffer.dtype))
    return module


# --- the mapping network --------------------------------------------------------------------------------

def test_mapping_normalises_z_and_the_embedded_label_and_runs_lrelu_layers_at_a_hundredth_of_the_lr():
    mapping = randomise(MappingNetwork(z_dim=5, c_dim=3, w_dim=4, num_ws=6, num_layers=3).double())
    z, c = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    x = torch.cat([norm2(z), norm2(fc(mapping.embed, c))], dim=1)
    assert mapping.fc0.bias_gain == 0.01 and mapping.embed.bias_gain == 1.0
    for index in range(3):
        x = fc(getattr(mapping, f"fc{index}"), x, "lrelu")
    ws = mapping(z, c)
    assert ws.shape == (2, 6, 4)
    torch.testing.assert_close(ws, x[:, None].expand(2, 6, 4))
    # Layer sizes: z + embedding (w_dim) in, w_dim through; a given embedding / layer width.
    assert mapping.fc0.weight.shape == (4, 9) and mapping.embed.weight.shape == (4, 3)
    wide = MappingNetwork(z_dim=5, c_dim=3, w_dim=4, num_ws=None, num_layers=2, embed_features=7, layer_features=6)
    assert (wide.embed.weight.shape, wide.fc0.weight.shape, wide.fc1.weight.shape) == ((7, 3), (6, 12), (4, 6))
    assert wide(torch.randn(2, 5), torch.randn(2, 3)).shape == (2, 4)
    assert not hasattr(wide, "w_avg")  # no num_ws: no truncation average
    assert MappingNetwork(5, 3, 4, num_ws=2).num_layers == 8 and MappingNetwork(5, 3, 4, num_ws=2).w_avg_beta == 0.998


def test_mapping_without_z_or_without_a_label():
    labels_only = randomise(MappingNetwork(z_dim=0, c_dim=3, w_dim=4, num_ws=None, num_layers=1,
                                           w_avg_beta=None).double())
    c = torch.randn(2, 3, dtype=torch.float64)
    torch.testing.assert_close(labels_only(None, c), fc(labels_only.fc0, norm2(fc(labels_only.embed, c)), "lrelu"))
    assert labels_only.fc0.weight.shape == (4, 4)
    no_label = randomise(MappingNetwork(z_dim=5, c_dim=0, w_dim=4, num_ws=2, num_layers=1).double())
    assert not hasattr(no_label, "embed") and no_label.fc0.weight.shape == (4, 5)
    z = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(no_label(z, None), fc(no_label.fc0, norm2(z), "lrelu")[:, None].expand(3, 2, 4))


def test_truncation_and_the_w_average():
    mapping = randomise(MappingNetwork(z_dim=5, c_dim=3, w_dim=4, num_ws=6, num_layers=2, w_avg_beta=0.9).double())
    z, c = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    ws = mapping(z, c)
    average = mapping.w_avg.clone()
    torch.testing.assert_close(mapping(z, c, truncation_psi=0.25), average + 0.25 * (ws - average))
    cut = mapping(z, c, truncation_psi=0.25, truncation_cutoff=2)
    torch.testing.assert_close(cut[:, :2], average + 0.25 * (ws[:, :2] - average))
    torch.testing.assert_close(cut[:, 2:], ws[:, 2:])
    assert torch.equal(mapping.w_avg, average)  # no update unless asked
    mapping(z, c, update_emas=True)
    torch.testing.assert_close(mapping.w_avg, ws[:, 0].mean(0) + 0.9 * (average - ws[:, 0].mean(0)))
    # Without num_ws there is nothing to cut: psi applies to the one w.
    single = randomise(MappingNetwork(z_dim=5, c_dim=0, w_dim=4, num_ws=None, num_layers=1).double())
    single.register_buffer("w_avg", torch.ones(4, dtype=torch.float64))
    w = single(z, None)
    torch.testing.assert_close(single(z, None, truncation_psi=0.5, truncation_cutoff=1), 1 + 0.5 * (w - 1))
    plain = MappingNetwork(z_dim=5, c_dim=0, w_dim=4, num_ws=2, num_layers=1, w_avg_beta=None)
    plain(z.float(), None, update_emas=True)  # nothing to update
    with pytest.raises(ValueError, match="^MappingNetwork: truncation needs w_avg, which this network does not track$"):
        plain(z.float(), None, truncation_psi=0.5)


@pytest.mark.parametrize("z, c, message", [
    (torch.randn(2, 4), torch.randn(2, 3), r"^MappingNetwork: z must have shape \(N, 5\), got \(2, 4\)$"),
    (torch.randn(5), torch.randn(2, 3), r"^MappingNetwork: z must have shape \(N, 5\), got \(5,\)$"),
    ([0.0] * 5, torch.randn(2, 3), r"^MappingNetwork: z must have shape \(N, 5\), got list$"),
    (torch.randn(2, 5), torch.randn(2, 2), r"^MappingNetwork: c must have shape \(N, 3\), got \(2, 2\)$"),
    (torch.randn(2, 5), None, r"^MappingNetwork: c must have shape \(N, 3\), got NoneType$"),
    (torch.randn(2, 5), torch.randn(4, 3), r"^MappingNetwork: z has batch size 2 but c has 4$"),
])
def test_mapping_input_errors(z, c, message):
    with pytest.raises(ValueError, match=message):
        MappingNetwork(z_dim=5, c_dim=3, w_dim=4, num_ws=2, num_layers=1)(z, c)


def test_the_repr_names_the_sizes():
    assert "z_dim=5, c_dim=3, w_dim=4, num_ws=2" in repr(MappingNetwork(5, 3, 4, num_ws=2, num_layers=1))
    layer = SynthesisLayer(3, 2, w_dim=4, resolution=8, up=2)
    assert "in_channels=3, out_channels=2, w_dim=4, resolution=8, up=2, activation=lrelu" in repr(layer)
    assert "in_channels=3, out_channels=2, w_dim=4" in repr(ToRGBLayer(3, 2, w_dim=4))
    assert "resolution=8, architecture=skip, upsample=True" in repr(SynthesisBlock(3, 2, 4, 8, 3, is_last=False))
    assert "w_dim=4, num_ws=" in repr(SynthesisNetwork(4, 8, 3, channel_base=32, channel_max=4))
    assert "resolution=8, architecture=resnet" in repr(DiscriminatorBlock(0, 2, 2, 8, 3, 0))
    assert "resolution=4, architecture=resnet" in repr(DiscriminatorEpilogue(2, 0, 4, 3))


# --- synthesis ---------------------------------------------------------------------------------------------

def conv_written_out(x, weight, styles, demodulate=True, up=1):
    """Per-sample modulated weights in one convolution each (EG3D's fused form)."""
    outputs = []
    for i in range(x.shape[0]):
        w = weight * styles[i][None, :, None, None]
        if demodulate:
            w = w * (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).rsqrt()
        xi = x[i : i + 1]
        if up == 2:
            zeros = xi.new_zeros(1, xi.shape[1], xi.shape[2] * 2, xi.shape[3] * 2)
            zeros[:, :, ::2, ::2] = xi
            # Zero insertion, the 3x3 true convolution, then the low-pass (gain 4), as EG3D pads it.
            y = F.conv2d(F.pad(zeros, [1 + 2, 1 + 1] * 2), w.flip([2, 3]))
            y = F.conv2d(y, (FILTER * 4).flip([0, 1])[None, None].repeat(y.shape[1], 1, 1, 1), groups=y.shape[1])
        else:
            y = F.conv2d(xi, w, padding=w.shape[-1] // 2)
        outputs.append(y)
    return torch.cat(outputs)


@pytest.mark.parametrize("noise_mode", ["const", "none", "random"])
def test_synthesis_layer_is_modulated_conv_noise_bias_lrelu_and_clamp(noise_mode):
    layer = randomise(SynthesisLayer(3, 2, w_dim=4, resolution=6, conv_clamp=0.5).double())
    x, w = torch.randn(2, 3, 6, 6, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    styles = fc(layer.affine, w)
    torch.testing.assert_close(layer.affine.bias.new_tensor(1.0), layer.affine.bias.new_tensor(1.0))
    y = conv_written_out(x, layer.weight, styles)
    if noise_mode == "const":
        y = y + layer.noise_const * layer.noise_strength
    elif noise_mode == "random":
        torch.manual_seed(3)
        y = y + torch.randn(2, 1, 6, 6).double() * layer.noise_strength
    expected = lrelu(y + layer.bias[None, :, None, None]).clamp(-0.5, 0.5)
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x, w, noise_mode=noise_mode), expected)
    # A gain scales the activation and the clamp alike.
    torch.manual_seed(3)
    torch.testing.assert_close(layer(x, w, noise_mode=noise_mode, gain=0.5),
                               (lrelu(y + layer.bias[None, :, None, None]) * 0.5).clamp(-0.25, 0.25))
    with pytest.raises(ValueError, match=r"^noise_mode must be one of \('random', 'const', 'none'\), got 'off'$"):
        layer(x, w, noise_mode="off")


def test_synthesis_layer_initialisation_and_upsampling():
    layer = SynthesisLayer(3, 2, w_dim=4, resolution=8, up=2)
    assert torch.equal(layer.affine.bias, torch.ones(3)) and torch.equal(layer.bias, torch.zeros(2))
    assert layer.noise_strength.item() == 0 and layer.noise_const.shape == (8, 8) and layer.padding == 1
    assert torch.equal(layer.resample_filter, setup_filter((1, 3, 3, 1)))
    randomise(layer.double())
    x, w = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    y = conv_written_out(x, layer.weight, fc(layer.affine, w), up=2) + layer.noise_const * layer.noise_strength
    torch.testing.assert_close(layer(x, w, noise_mode="const"), lrelu(y + layer.bias[None, :, None, None]))
    quiet = SynthesisLayer(3, 2, w_dim=4, resolution=8, use_noise=False)
    assert not hasattr(quiet, "noise_strength") and not hasattr(quiet, "noise_const")
    torch.testing.assert_close(quiet(x.float().repeat_interleave(2, -1).repeat_interleave(2, -2), w.float(), "random"),
                               quiet(x.float().repeat_interleave(2, -1).repeat_interleave(2, -2), w.float(), "none"))


def test_torgb_is_an_undemodulated_1x1_modulated_conv_with_its_weight_gain():
    layer = randomise(ToRGBLayer(4, 3, w_dim=5, conv_clamp=0.7).double())
    x, w = torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    styles = fc(layer.affine, w) / math.sqrt(4)
    expected = (conv_written_out(x, layer.weight, styles, demodulate=False) + layer.bias[None, :, None, None])
    torch.testing.assert_close(layer(x, w), expected.clamp(-0.7, 0.7))
    assert torch.equal(ToRGBLayer(4, 3, w_dim=5).affine.bias, torch.ones(4))


def block_ws(block, batch=2, seed=5):
    return torch.randn(batch, block.num_conv + block.num_torgb, block.w_dim, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


def test_the_first_block_starts_from_its_constant_and_adds_its_rgb():
    block = randomise(SynthesisBlock(0, 3, w_dim=4, resolution=4, img_channels=2, is_last=False).double())
    assert (block.num_conv, block.num_torgb) == (1, 1) and not hasattr(block, "conv0")
    ws = block_ws(block)
    x, img = block(None, None, ws, noise_mode="const")
    const = block.const[None].expand(2, 3, 4, 4)
    expected_x = block.conv1(const, ws[:, 0], noise_mode="const")
    torch.testing.assert_close(x, expected_x)
    torch.testing.assert_close(img, block.torgb(expected_x, ws[:, 1]))


@pytest.mark.parametrize("architecture", ["skip", "orig", "resnet"])
@pytest.mark.parametrize("is_last", [False, True])
def test_a_block_takes_its_ws_in_order_and_upsamples_the_image(architecture, is_last):
    block = randomise(SynthesisBlock(3, 2, w_dim=4, resolution=8, img_channels=2, is_last=is_last,
                                     architecture=architecture).double())
    with_rgb = is_last or architecture == "skip"
    assert (block.num_conv, block.num_torgb) == (2, int(with_rgb))
    assert hasattr(block, "skip") == (architecture == "resnet") and hasattr(block, "torgb") == with_rgb
    ws = block_ws(block)
    x_in, img_in = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 2, 4, 4, dtype=torch.float64)
    x, img = block(x_in, img_in, ws, noise_mode="const")
    hidden = block.conv0(x_in, ws[:, 0], noise_mode="const")
    if architecture == "resnet":
        expected = block.skip(x_in, gain=math.sqrt(0.5)) + block.conv1(hidden, ws[:, 1], noise_mode="const",
                                                                       gain=math.sqrt(0.5))
    else:
        expected = block.conv1(hidden, ws[:, 1], noise_mode="const")
    torch.testing.assert_close(x, expected)
    upsampled = upsample2d(img_in, FILTER)
    if with_rgb:
        torch.testing.assert_close(img, upsampled + block.torgb(expected, ws[:, 2]))
    else:
        torch.testing.assert_close(img, upsampled)
    if architecture == "resnet":
        # The skip is a bias-free 1x1 up-sampling convolution with EG3D's filter.
        assert block.skip.bias is None and block.skip.up == 2 and block.skip.weight.shape == (2, 3, 1, 1)


def test_a_block_without_upsampling_keeps_the_resolution():
    block = randomise(SynthesisBlock(3, 2, w_dim=4, resolution=8, img_channels=2, is_last=True,
                                     upsample=False).double())
    ws = block_ws(block)
    x_in, img_in = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 2, 8, 8, dtype=torch.float64)
    x, img = block(x_in, img_in, ws, noise_mode="const")
    expected = block.conv1(block.conv0(x_in, ws[:, 0], noise_mode="const"), ws[:, 1], noise_mode="const")
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(img, img_in + block.torgb(expected, ws[:, 2]))
    assert block.conv0.up == 1
    with pytest.raises(ValueError, match=r"^SynthesisBlock: x must have shape \(N, 3, 8, 8\), got \(2, 3, 4, 4\)$"):
        block(x_in[..., :4, :4], None, ws)


def test_block_errors_are_named():
    block = SynthesisBlock(3, 2, w_dim=4, resolution=8, img_channels=2, is_last=False)
    with pytest.raises(ValueError, match=r"^SynthesisBlock: ws must have shape \(N, 3, 4\), got \(2, 2, 4\)$"):
        block(torch.randn(2, 3, 4, 4), None, torch.randn(2, 2, 4))
    with pytest.raises(ValueError, match=r"^SynthesisBlock: ws must have shape \(N, 3, 4\), got \(2, 3, 5\)$"):
        block(torch.randn(2, 3, 4, 4), None, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"^SynthesisBlock: ws must have shape \(N, 3, 4\), got \(3, 4\)$"):
        block(torch.randn(2, 3, 4, 4), None, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"^SynthesisBlock: x must have shape \(N, 3, 4, 4\), got None$"):
        block(None, None, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"^SynthesisBlock: x must have shape \(N, 3, 4, 4\), got \(2, 2, 4, 4\)$"):
        block(torch.randn(2, 2, 4, 4), None, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"^SynthesisBlock: architecture must be 'orig', 'skip' or 'resnet', got 'unet'$"):
        SynthesisBlock(3, 2, w_dim=4, resolution=8, img_channels=2, is_last=False, architecture="unet")


def test_the_synthesis_network_shares_a_w_between_consecutive_blocks():
    network = randomise(SynthesisNetwork(w_dim=4, img_resolution=16, img_channels=2, channel_base=64,
                                         channel_max=8, num_fp16_res=0).double())
    assert network.block_resolutions == [4, 8, 16]
    # Channels min(64 / res, 8): 8, 8, 4; ws: 1 + 2 + 2 convolutions and the last ToRGB.
    assert network.b4.conv1.weight.shape[0] == 8 and network.b8.conv1.weight.shape[:2] == (8, 8)
    assert network.b16.conv0.weight.shape[:2] == (4, 8) and network.num_ws == 6
    ws = torch.randn(2, 6, 4, dtype=torch.float64)
    x, img = network.b4(None, None, ws[:, 0:2], noise_mode="const")
    x, img = network.b8(x, img, ws[:, 1:4], noise_mode="const")
    x, img = network.b16(x, img, ws[:, 3:6], noise_mode="const")
    torch.testing.assert_close(network(ws, noise_mode="const"), img)
    seen = []

    def hook(resolution, x, img):
        seen.append((resolution, tuple(x.shape), tuple(img.shape)))
        return x, img * 2 if resolution == 16 else img

    torch.testing.assert_close(network(ws, noise_mode="const", block_hook=hook), img * 2)
    assert seen == [(4, (2, 8, 4, 4), (2, 2, 4, 4)), (8, (2, 8, 8, 8), (2, 2, 8, 8)), (16, (2, 4, 16, 16), (2, 2, 16, 16))]
    with pytest.raises(ValueError, match=r"^SynthesisNetwork: ws must have shape \(N, 6, 4\), got \(2, 5, 4\)$"):
        network(ws[:, :5])
    with pytest.raises(ValueError, match=r"^SynthesisNetwork: img_resolution must be a power of two >= 4, got 12$"):
        SynthesisNetwork(w_dim=4, img_resolution=12, img_channels=2)
    with pytest.raises(ValueError, match="got 2$"):
        SynthesisNetwork(w_dim=4, img_resolution=2, img_channels=2)
    assert SynthesisNetwork(w_dim=4, img_resolution=4, img_channels=2, channel_base=16, channel_max=8).num_ws == 2


def test_half_precision_is_for_the_highest_resolutions_on_cuda_only():
    # The num_fp16_res highest resolutions, never below 8.
    assert [stylegan2.fp16_resolution(512, n) for n in (0, 1, 4)] == [1024, 512, 64]
    assert stylegan2.fp16_resolution(64, 4) == 8 and stylegan2.fp16_resolution(64, 3) == 16
    network = SynthesisNetwork(w_dim=4, img_resolution=32, img_channels=2, channel_base=64, channel_max=8,
                               num_fp16_res=2)
    assert [getattr(network, f"b{res}").use_fp16 for res in network.block_resolutions] == [False, False, True, True]
    cpu = torch.zeros(1)
    assert stylegan2.block_dtype(True, cpu, False, torch.float64) == torch.float64
    meta_cuda = torch.empty(1, device="meta")
    assert stylegan2.block_dtype(True, meta_cuda, False, torch.float32) == torch.float32
    # On CUDA (the device type is what counts; a stand-in tensor of that type):
    cuda_like = type("T", (), {"device": torch.device("cuda")})()
    assert stylegan2.block_dtype(True, cuda_like, False, torch.float32) == torch.float16
    assert stylegan2.block_dtype(True, cuda_like, True, torch.float32) == torch.float32
    assert stylegan2.block_dtype(False, cuda_like, False, torch.float32) == torch.float32
    assert stylegan2.channels_per_resolution([4, 8, 256], 1024, 64) == {4: 64, 8: 64, 256: 4}


def test_the_backbone_maps_then_synthesises():
    backbone = randomise(stylegan2.StyleGAN2Backbone(z_dim=5, c_dim=3, w_dim=4, img_resolution=8, img_channels=2,
                                                     mapping_kwargs={"num_layers": 1}, channel_base=32,
                                                     channel_max=4, num_fp16_res=0).double())
    assert backbone.num_ws == backbone.synthesis.num_ws == backbone.mapping.num_ws == 4
    z, c = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    ws = backbone.mapping(z, c, truncation_psi=0.5, truncation_cutoff=1)
    torch.testing.assert_close(backbone(z, c, truncation_psi=0.5, truncation_cutoff=1, noise_mode="const"),
                               backbone.synthesis(ws, noise_mode="const"))
    average = backbone.mapping.w_avg.clone()
    backbone(z, c, update_emas=True, noise_mode="none")
    assert not torch.equal(backbone.mapping.w_avg, average)


# --- discriminator -----------------------------------------------------------------------------------------

def test_the_resnet_discriminator_block_written_out():
    block = randomise(DiscriminatorBlock(0, 3, 4, resolution=8, img_channels=2, first_layer_idx=0).double())
    img = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    x, img_out = block(None, img)
    y = block.fromrgb(img)
    assert block.fromrgb.activation == "lrelu" and block.conv0.activation == "lrelu" and block.conv1.down == 2
    expected = block.skip(y, gain=math.sqrt(0.5)) + block.conv1(block.conv0(y), gain=math.sqrt(0.5))
    torch.testing.assert_close(x, expected)
    assert img_out is None
    assert block.skip.bias is None and block.skip.down == 2 and block.skip.activation == "linear"
    # A later block takes features only.
    later = randomise(DiscriminatorBlock(4, 4, 5, resolution=4, img_channels=2, first_layer_idx=4).double())
    features = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(later(features, None)[0], later.skip(features, gain=math.sqrt(0.5))
                               + later.conv1(later.conv0(features), gain=math.sqrt(0.5)))
    assert not hasattr(later, "fromrgb")


def test_the_skip_and_orig_discriminator_blocks():
    block = randomise(DiscriminatorBlock(3, 3, 4, resolution=8, img_channels=2, first_layer_idx=0,
                                         architecture="skip").double())
    features, img = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 2, 8, 8, dtype=torch.float64)
    x, img_out = block(features, img)
    torch.testing.assert_close(x, block.conv1(block.conv0(features + block.fromrgb(img))))
    torch.testing.assert_close(img_out, downsample2d(img, FILTER))
    orig = randomise(DiscriminatorBlock(0, 3, 4, resolution=8, img_channels=2, first_layer_idx=0,
                                        architecture="orig").double())
    x, img_out = orig(None, img)
    torch.testing.assert_close(x, orig.conv1(orig.conv0(orig.fromrgb(img))))
    assert img_out is None and not hasattr(orig, "skip")


def test_freeze_d_freezes_the_networks_first_layers():
    def trainable(block):
        return {name: isinstance(getattr(block, name).weight, torch.nn.Parameter)
                for name in ("fromrgb", "conv0", "conv1", "skip") if hasattr(block, name)}

    first = DiscriminatorBlock(0, 3, 4, resolution=8, img_channels=2, first_layer_idx=0, freeze_layers=2)
    assert first.num_layers == 4
    assert trainable(first) == {"fromrgb": False, "conv0": False, "conv1": True, "skip": True}
    later = DiscriminatorBlock(4, 4, 4, resolution=4, img_channels=2, first_layer_idx=4, freeze_layers=5)
    assert later.num_layers == 3 and trainable(later) == {"conv0": False, "conv1": True, "skip": True}
    assert all(trainable(DiscriminatorBlock(0, 3, 4, 8, 2, first_layer_idx=0)).values())
    frozen = DiscriminatorBlock(0, 3, 4, 8, 2, first_layer_idx=0, freeze_layers=4)
    assert "conv0.weight" in dict(frozen.named_buffers()) and "skip.weight" in dict(frozen.named_buffers())


def test_discriminator_block_errors():
    with pytest.raises(ValueError, match=r"^DiscriminatorBlock: in_channels must be 0 or tmp_channels \(3\), got 2$"):
        DiscriminatorBlock(2, 3, 4, 8, 2, first_layer_idx=0)
    with pytest.raises(ValueError, match=r"^DiscriminatorBlock: architecture must be 'orig', 'skip' or 'resnet', got 'x'$"):
        DiscriminatorBlock(0, 3, 4, 8, 2, first_layer_idx=0, architecture="x")
    block = DiscriminatorBlock(0, 3, 4, 8, 2, first_layer_idx=0)
    with pytest.raises(ValueError, match=r"^DiscriminatorBlock: img must have shape \(N, 2, 8, 8\), got \(2, 2, 4, 4\)$"):
        block(None, torch.randn(2, 2, 4, 4))
    with pytest.raises(ValueError, match=r"^DiscriminatorBlock: img must have shape \(N, 2, 8, 8\), got None$"):
        block(torch.randn(2, 3, 8, 8), None)


@pytest.mark.parametrize("cmap_dim", [0, 3])
def test_the_epilogue_written_out(cmap_dim):
    epilogue = randomise(DiscriminatorEpilogue(4, cmap_dim=cmap_dim, resolution=4, img_channels=2,
                                               mbstd_group_size=2).double())
    x = torch.randn(4, 4, 4, 4, dtype=torch.float64)
    cmap = torch.randn(4, 3, dtype=torch.float64) if cmap_dim else None
    # Minibatch std over groups of 2 (samples i and i + 2), one channel.
    std = (x.reshape(2, 2, 4, 4, 4).var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=[1, 2, 3])
    with_std = torch.cat([x, std.repeat(2)[:, None, None, None].expand(4, 1, 4, 4)], dim=1)
    out = fc(epilogue.out, fc(epilogue.fc, epilogue.conv(with_std).flatten(1), "lrelu"))
    if cmap_dim:
        out = (out * cmap).sum(dim=1, keepdim=True) / math.sqrt(3)
    torch.testing.assert_close(epilogue(x, None, cmap), out)
    assert epilogue.conv.weight.shape == (4, 5, 3, 3) and epilogue.fc.weight.shape == (4, 64)
    assert epilogue.out.weight.shape == ((3 if cmap_dim else 1), 4) and epilogue.conv.activation == "lrelu"
    assert epilogue.mbstd.group_size == 2 and epilogue.mbstd.num_channels == 1


def test_an_epilogue_without_minibatch_std_and_with_a_skip_image():
    epilogue = randomise(DiscriminatorEpilogue(4, cmap_dim=0, resolution=4, img_channels=2, architecture="skip",
                                               mbstd_num_channels=0).double())
    assert epilogue.mbstd is None and epilogue.conv.weight.shape == (4, 4, 3, 3)
    x, img = torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    expected = fc(epilogue.out, fc(epilogue.fc, epilogue.conv(x + epilogue.fromrgb(img)).flatten(1), "lrelu"))
    torch.testing.assert_close(epilogue(x, img, None), expected)
    assert DiscriminatorEpilogue(4, 0, 4, 2).mbstd.group_size == 4


def test_the_dual_discriminator_judges_the_image_beside_its_resized_raw_image():
    discriminator = randomise(DualDiscriminator(c_dim=3, img_resolution=16, img_channels=3, channel_base=64,
                                                channel_max=8, num_fp16_res=0, conv_clamp=None,
                                                mapping_kwargs={"num_layers": 1},
                                                epilogue_kwargs={"mbstd_group_size": 2}).double())
    assert discriminator.block_resolutions == [16, 8] and discriminator.img_channels == 6
    assert discriminator.b16.fromrgb.weight.shape == (4, 6, 1, 1) and discriminator.b8.conv1.weight.shape[0] == 8
    assert discriminator.b4.cmap_dim == 8 and discriminator.mapping.w_dim == 8 and discriminator.mapping.z_dim == 0
    image = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    raw = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    c = torch.randn(2, 3, dtype=torch.float64)
    x = torch.cat([image, F.interpolate(raw, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)], 1)
    features, _ = discriminator.b16(None, x)
    features, _ = discriminator.b8(features, None)
    expected = discriminator.b4(features, None, discriminator.mapping(None, c))
    torch.testing.assert_close(discriminator({"image": image, "image_raw": raw}, c), expected)
    assert discriminator.b8.first_layer_idx == discriminator.b16.num_layers == 4
    # Camera noise: c + randn * std(c) * disc_c_noise.
    discriminator.disc_c_noise = 0.5
    torch.manual_seed(7)
    noisy = c + torch.randn_like(c) * c.std(0) * 0.5
    torch.manual_seed(7)
    torch.testing.assert_close(discriminator({"image": image, "image_raw": raw}, c),
                               discriminator.b4(features, None, discriminator.mapping(None, noisy)))
    unconditional = DualDiscriminator(c_dim=0, img_resolution=8, img_channels=3, channel_base=32, channel_max=4)
    assert not hasattr(unconditional, "mapping") and unconditional.b4.cmap_dim == 0
    assert unconditional({"image": torch.randn(2, 3, 8, 8), "image_raw": torch.randn(2, 3, 4, 4)}, None).shape == (2, 1)
    assert DualDiscriminator(c_dim=3, img_resolution=8, img_channels=3, channel_base=32, channel_max=4,
                             cmap_dim=5).b4.cmap_dim == 5
    assert "c_dim=3, img_resolution=16, img_channels=6" in repr(discriminator)


@pytest.mark.parametrize("img, c, message", [
    ({"image": torch.randn(2, 3, 8, 8)}, torch.randn(2, 3),
     r"^img must be a mapping with 'image' and 'image_raw' tensors \(a generator's output\)$"),
    ([torch.randn(2, 3, 8, 8)], torch.randn(2, 3), "^img must be a mapping"),
    ({"image": torch.randn(2, 3, 4, 4), "image_raw": torch.randn(2, 3, 4, 4)}, torch.randn(2, 3),
     r"^img\['image'\] must have shape \(N, 3, 8, 8\), got \(2, 3, 4, 4\)$"),
    ({"image": torch.randn(3, 8, 8), "image_raw": torch.randn(2, 3, 4, 4)}, torch.randn(2, 3),
     r"^img\['image'\] must have shape \(N, 3, 8, 8\), got \(3, 8, 8\)$"),
    ({"image": torch.randn(2, 3, 8, 8), "image_raw": torch.randn(2, 1, 4, 4)}, torch.randn(2, 3),
     r"^img\['image_raw'\] must have shape \(2, 3, r, r\), got \(2, 1, 4, 4\)$"),
    ({"image": torch.randn(2, 3, 8, 8), "image_raw": torch.randn(3, 4, 4)}, torch.randn(2, 3),
     r"^img\['image_raw'\] must have shape \(2, 3, r, r\), got \(3, 4, 4\)$"),
    ({"image": torch.randn(2, 3, 8, 8), "image_raw": torch.randn(2, 3, 4, 4)}, torch.randn(3, 3),
     r"^c must have shape \(2, 3\) \(one camera label per image\), got \(3, 3\)$"),
    ({"image": torch.randn(2, 3, 8, 8), "image_raw": torch.randn(2, 3, 4, 4)}, torch.randn(6),
     r"^c must have shape \(2, 3\) \(one camera label per image\), got \(6,\)$"),
    ({"image": torch.randn(2, 3, 8, 8), "image_raw": torch.randn(2, 3, 4, 4)}, None,
     r"^c must have shape \(2, 3\) \(one camera label per image\), got NoneType$"),
])
def test_dual_discriminator_input_errors(img, c, message):
    discriminator = DualDiscriminator(c_dim=3, img_resolution=8, img_channels=3, channel_base=32, channel_max=4,
                                      epilogue_kwargs={"mbstd_group_size": 2})
    with pytest.raises(ValueError, match=message):
        discriminator(img, c)


# --- super-resolution ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls, scale, upsamples, channels, buffer", [
    (SuperresolutionHybrid2X, 2, False, (128, 64), True), (SuperresolutionHybrid4X, 2, False, (128, 64), True),
    (SuperresolutionHybrid8X, 4, True, (128, 64), True), (SuperresolutionHybrid8XDC, 4, True, (256, 128), False)])
def test_the_super_resolution_modules_layouts(cls, scale, upsamples, channels, buffer):
    module = cls(channels=6, img_resolution=32, sr_num_fp16_res=0, sr_antialias=True, w_dim=4)
    assert module.input_resolution == 32 // scale and module.block0.upsample == upsamples
    assert module.block0.conv1.weight.shape[0] == channels[0] and module.block1.conv1.weight.shape[0] == channels[1]
    assert module.block0.resolution == 16 and module.block1.resolution == 32 and module.block1.is_last
    assert not module.block0.is_last and ("resample_filter" in dict(module.named_buffers())) == buffer
    if buffer:
        assert torch.equal(module.resample_filter, setup_filter((1, 3, 3, 1)))
    assert module.block0.conv1.conv_clamp is None and not module.block0.use_fp16
    half = cls(channels=6, img_resolution=32, sr_num_fp16_res=1, sr_antialias=True, w_dim=4, block_channels=(4, 2))
    assert half.block0.use_fp16 and half.block1.use_fp16 and half.block1.conv1.conv_clamp == 256
    assert half.block0.conv1.conv_clamp == 256
    assert half.block0.conv1.weight.shape[0] == 4 and half.block1.conv1.weight.shape[0] == 2
    assert superresolution_class(f"training.superresolution.{cls.__name__}") is cls
    assert superresolution_class(cls.__name__) is cls


def test_super_resolution_errors():
    with pytest.raises(ValueError, match=r"^SuperresolutionHybrid8X: img_resolution must be a multiple of 4 and at least "
                                         r"16, got 30$"):
        SuperresolutionHybrid8X(channels=6, img_resolution=30, sr_num_fp16_res=0, sr_antialias=True)
    with pytest.raises(ValueError, match="at least 8, got 6$"):
        SuperresolutionHybrid2X(channels=6, img_resolution=6, sr_num_fp16_res=0, sr_antialias=True)
    SuperresolutionHybrid2X(channels=6, img_resolution=8, sr_num_fp16_res=0, sr_antialias=True, w_dim=4)
    with pytest.raises(ValueError, match=r"^rendering_kwargs\['superresolution_module'\] must name one of "
                                         r"\['SuperresolutionHybrid2X', 'SuperresolutionHybrid4X', "
                                         r"'SuperresolutionHybrid8X', 'SuperresolutionHybrid8XDC'\], got 'x.SR'$"):
        superresolution_class("x.SR")


@pytest.mark.parametrize("antialias", [True, False])
def test_super_resolution_resizes_the_rendering_then_runs_both_blocks_on_the_last_w(antialias):
    module = randomise(SuperresolutionHybrid2X(channels=6, img_resolution=16, sr_num_fp16_res=0,
                                               sr_antialias=antialias, w_dim=4, block_channels=(4, 3)).double())
    rgb, x = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 6, 4, 4, dtype=torch.float64)
    ws = torch.randn(2, 5, 4, dtype=torch.float64)
    last = ws[:, -1:].expand(2, 3, 4)
    resize = lambda t: F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False, antialias=antialias)  # noqa: E731
    h, img = module.block0(resize(x), resize(rgb), last, noise_mode="const")
    _, img = module.block1(h, img, last, noise_mode="const")
    torch.testing.assert_close(module(rgb, x, ws, noise_mode="const"), img)
    # At the input resolution nothing is resized; larger renderings are brought down (not by 4X).
    rgb8, x8 = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 6, 8, 8, dtype=torch.float64)
    h, img = module.block0(x8, rgb8, last, noise_mode="const")
    torch.testing.assert_close(module(rgb8, x8, ws, noise_mode="const"), module.block1(h, img, last, noise_mode="const")[1])
    rgb16, x16 = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 6, 16, 16, dtype=torch.float64)
    h, img = module.block0(resize(x16), resize(rgb16), last, noise_mode="const")
    torch.testing.assert_close(module(rgb16, x16, ws, noise_mode="const"),
                               module.block1(h, img, last, noise_mode="const")[1])
    passing = SuperresolutionHybrid4X(channels=6, img_resolution=16, sr_num_fp16_res=0, sr_antialias=antialias, w_dim=4,
                                      block_channels=(4, 3)).double()
    passing.load_state_dict(module.state_dict())
    # 4X resizes only up: a larger rendering reaches its first block as it is.
    with pytest.raises(ValueError, match=r"^SynthesisBlock: x must have shape \(N, 6, 8, 8\), got \(2, 6, 16, 16\)$"):
        passing(rgb16, x16, ws, noise_mode="const")
    h, img = passing.block0(resize(x), resize(rgb), last, noise_mode="const")
    torch.testing.assert_close(passing(rgb, x, ws, noise_mode="const"), passing.block1(h, img, last, noise_mode="const")[1])
    # Random noise by default.
    torch.manual_seed(0)
    first = module(rgb, x, ws)
    assert not torch.equal(first, module(rgb, x, ws))


# --- the convolution layer and the discriminator's construction ------------------------------------------------

@pytest.mark.parametrize("up, down", [(1, 1), (2, 1), (1, 2)])
def test_the_convolution_layer_written_out(up, down):
    from dreamportrait.models.layers import Conv2dLayer
    from dreamportrait.models.resampling import conv2d_resample

    layer = randomise(Conv2dLayer(3, 2, kernel_size=3, activation="lrelu", up=up, down=down, conv_clamp=0.4).double())
    assert layer.padding == 1 and layer.weight_gain == 1 / math.sqrt(3 * 9)
    assert torch.equal(layer.resample_filter, setup_filter((1, 3, 3, 1)))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = conv2d_resample(x, layer.weight / math.sqrt(27), FILTER, up=up, down=down, padding=1)
    y = lrelu(y + layer.bias[None, :, None, None])
    torch.testing.assert_close(layer(x), y.clamp(-0.4, 0.4))
    torch.testing.assert_close(layer(x, gain=0.5), (y * 0.5).clamp(-0.2, 0.2))
    linear = randomise(Conv2dLayer(3, 2, kernel_size=1, bias=False).double())
    assert linear.bias is None and linear.padding == 0
    torch.testing.assert_close(linear(x, gain=2.0), F.conv2d(x, linear.weight / math.sqrt(3)) * 2)
    fresh = Conv2dLayer(3, 2, kernel_size=3)
    assert torch.equal(fresh.bias, torch.zeros(2)) and fresh.activation == "linear" and fresh.conv_clamp is None
    assert (fresh.up, fresh.down) == (1, 1)
    frozen = Conv2dLayer(3, 2, kernel_size=3, trainable=False)
    assert dict(frozen.named_parameters()) == {} and set(dict(frozen.named_buffers())) == {"resample_filter", "weight",
                                                                                           "bias"}
    no_bias = Conv2dLayer(3, 2, 1, bias=False, trainable=False)
    assert no_bias.bias is None and "bias" in no_bias._buffers and not list(no_bias.parameters())
    assert "in_channels=3, out_channels=2, activation=linear, up=1, down=1" in repr(fresh)


def test_the_dual_discriminator_records_its_arguments_and_builds_its_blocks_from_them():
    block_kwargs = {"freeze_layers": 1}
    discriminator = DualDiscriminator(c_dim=3, img_resolution=16, img_channels=3, architecture="skip",
                                      channel_base=64, channel_max=8, num_fp16_res=1, conv_clamp=100, cmap_dim=6,
                                      disc_c_noise=0.25, block_kwargs=block_kwargs,
                                      mapping_kwargs={"num_layers": 2}, epilogue_kwargs={"mbstd_group_size": 2})
    assert discriminator.init_kwargs == {
        "c_dim": 3, "img_resolution": 16, "img_channels": 3, "architecture": "skip", "channel_base": 64,
        "channel_max": 8, "num_fp16_res": 1, "conv_clamp": 100, "cmap_dim": 6, "disc_c_noise": 0.25,
        "block_kwargs": {"freeze_layers": 1}, "mapping_kwargs": {"num_layers": 2},
        "epilogue_kwargs": {"mbstd_group_size": 2}}
    block_kwargs["freeze_layers"] = 5
    assert discriminator.init_kwargs["block_kwargs"] == {"freeze_layers": 1}
    assert discriminator.disc_c_noise == 0.25 and discriminator.c_dim == 3 and discriminator.img_resolution == 16
    b16, b8 = discriminator.b16, discriminator.b8
    assert (b16.architecture, b8.architecture, discriminator.b4.architecture) == ("skip", "skip", "skip")
    assert (b16.in_channels, b8.in_channels) == (0, 8) and b16.conv1.weight.shape[0] == 8
    assert b16.use_fp16 and not b8.use_fp16  # fp16 from 16 down to max(2^(5 - 1), 8) = 16
    assert b16.conv0.conv_clamp == 100 and discriminator.b4.conv.conv_clamp == 100
    assert not isinstance(b16.fromrgb.weight, torch.nn.Parameter) and isinstance(b16.conv0.weight, torch.nn.Parameter)
    assert b16.resolution == 16 and b16.img_channels == 6 and b8.first_layer_idx == 3
    assert discriminator.mapping.num_layers == 2 and discriminator.mapping.c_dim == 3
    assert discriminator.mapping.w_avg_beta is None and discriminator.mapping.num_ws is None
    assert discriminator.b4.cmap_dim == 6 and discriminator.b4.resolution == 4 and discriminator.b4.in_channels == 8
    assert discriminator.b4.mbstd.group_size == 2 and discriminator.b4.img_channels == 6
    assert torch.equal(discriminator.resample_filter, setup_filter((1, 3, 3, 1)))
    defaults = DualDiscriminator(c_dim=0, img_resolution=8, img_channels=3)
    assert defaults.init_kwargs == {
        "c_dim": 0, "img_resolution": 8, "img_channels": 3, "architecture": "resnet", "channel_base": 32768,
        "channel_max": 512, "num_fp16_res": 4, "conv_clamp": 256, "cmap_dim": None, "disc_c_noise": 0.0,
        "block_kwargs": {}, "mapping_kwargs": {}, "epilogue_kwargs": {}}
    assert defaults.b8.conv0.conv_clamp == 256 and defaults.b8.use_fp16 and defaults.b8.conv0.weight.shape[0] == 512
    assert defaults.b4.mbstd.group_size == 4 and defaults.disc_c_noise == 0.0
    with pytest.raises(ValueError, match=r"^DualDiscriminator: img_resolution must be a power of two >= 4, got 24$"):
        DualDiscriminator(c_dim=0, img_resolution=24, img_channels=3)



# --- sizes of one, dtypes, defaults -----------------------------------------------------------------------------

def test_a_mapping_of_one_dimensional_z_and_label_uses_both_and_casts_them():
    mapping = randomise(MappingNetwork(z_dim=1, c_dim=1, w_dim=2, num_ws=None, num_layers=1).double())
    z, c = torch.tensor([[2.0], [-1.0]]), torch.tensor([[0.5], [3.0]])  # float32 into a float64 network
    x = torch.cat([norm2(z.double()), norm2(fc(mapping.embed, c.double()))], dim=1)
    out = mapping(z, c)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, fc(mapping.fc0, x, "lrelu"), rtol=1e-12, atol=0)
    assert mapping.fc0.weight.shape == (2, 3)


def test_blocks_and_networks_compute_in_their_parameters_precision():
    block = randomise(SynthesisBlock(0, 3, w_dim=4, resolution=4, img_channels=2, is_last=True,
                                     use_fp16=True).double())  # float16 only on CUDA
    ws = block_ws(block, batch=3)
    x, img = block(None, None, ws, noise_mode="const")
    assert x.shape == (3, 3, 4, 4) and img.dtype == torch.float64
    later = randomise(SynthesisBlock(3, 2, w_dim=4, resolution=8, img_channels=2, is_last=True).double())
    x_in = torch.randn(2, 3, 4, 4)
    x, img = later(x_in, None, block_ws(later), noise_mode="const")
    expected, _ = later(x_in.double(), None, block_ws(later), noise_mode="const")
    assert x.dtype == torch.float64 and img.dtype == torch.float64
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=0)
    network = randomise(SynthesisNetwork(w_dim=4, img_resolution=8, img_channels=2, channel_base=32,
                                         channel_max=4).double())
    ws = torch.randn(2, network.num_ws, 4)
    out = network(ws, noise_mode="const")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, network(ws.double(), noise_mode="const"), rtol=1e-12, atol=0)
    discriminator_block = randomise(DiscriminatorBlock(0, 3, 4, resolution=8, img_channels=2, first_layer_idx=0,
                                                       use_fp16=True).double())
    img = torch.randn(2, 2, 8, 8)
    got, _ = discriminator_block(None, img)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, discriminator_block(None, img.double())[0], rtol=1e-12, atol=0)
    later_block = randomise(DiscriminatorBlock(4, 4, 4, resolution=4, img_channels=2, first_layer_idx=4,
                                               use_fp16=True).double())
    features = torch.randn(2, 4, 4, 4)
    got, _ = later_block(features, None)
    torch.testing.assert_close(got, later_block(features.double(), None)[0], rtol=1e-12, atol=0)
    epilogue = randomise(DiscriminatorEpilogue(4, cmap_dim=0, resolution=4, img_channels=2, architecture="skip",
                                               mbstd_group_size=2).double())
    features, img = torch.randn(2, 4, 4, 4) * 100, torch.randn(2, 2, 4, 4) * 100
    got = epilogue(features, img, None)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, epilogue(features.double(), img.double(), None), rtol=1e-12, atol=0)


def test_defaults_of_the_networks_and_layers():
    network = SynthesisNetwork(w_dim=4, img_resolution=8, img_channels=2, channel_base=8192)
    assert network.b4.conv1.weight.shape[0] == 512  # channel_max 512
    deep = SynthesisNetwork(w_dim=4, img_resolution=256, img_channels=2, channel_base=256, channel_max=2)
    assert [getattr(deep, f"b{res}").use_fp16 for res in deep.block_resolutions] == [False] * 3 + [True] * 4
    block = SynthesisBlock(0, 3, w_dim=4, resolution=4, img_channels=2, is_last=True)
    with torch.no_grad():
        for module in (network, block):
            for name, parameter in module.named_parameters():
                if name.endswith("noise_strength"):
                    parameter.fill_(1.0)
    torch.manual_seed(0)
    ws = torch.randn(1, network.num_ws, 4)
    assert not torch.equal(network(ws), network(ws))  # random noise by default
    assert not torch.equal(block(None, None, ws[:, :2])[0], block(None, None, ws[:, :2])[0])
    layer = SynthesisLayer(3, 2, w_dim=4, resolution=4)
    with torch.no_grad():
        layer.noise_strength.fill_(1.0)
    x = torch.randn(1, 3, 4, 4)
    assert not torch.equal(layer(x, ws[:, 0]), layer(x, ws[:, 0]))
    assert MinibatchStdLayer(4).num_channels == 1
    backbone = stylegan2.StyleGAN2Backbone(z_dim=5, c_dim=3, w_dim=4, img_resolution=8, img_channels=2,
                                           mapping_kwargs={"num_layers": 1}, channel_base=32, channel_max=4)
    assert backbone.synthesis.b4.conv1.weight.shape[0] == 4 and backbone.mapping.num_layers == 1
    assert stylegan2.StyleGAN2Backbone(5, 3, 4, 8, 2, channel_base=32, channel_max=4).mapping.num_layers == 8
    z, c = torch.randn(2, 5), torch.randn(2, 3)
    average = backbone.mapping.w_avg.clone()
    torch.manual_seed(1)
    out = backbone(z, c)  # no truncation, no average update, random noise
    torch.manual_seed(1)
    torch.testing.assert_close(out, backbone.synthesis(backbone.mapping(z, c)))
    assert torch.equal(backbone.mapping.w_avg, average)


def test_an_orig_synthesis_network_has_an_rgb_layer_on_its_last_block_only():
    network = randomise(SynthesisNetwork(w_dim=4, img_resolution=8, img_channels=2, channel_base=32, channel_max=4,
                                         architecture="orig").double())
    assert not hasattr(network.b4, "torgb") and hasattr(network.b8, "torgb") and network.num_ws == 4
    ws = torch.randn(2, 4, 4, dtype=torch.float64)
    x, img = network.b4(None, None, ws[:, :1], noise_mode="const")
    _, img = network.b8(x, img, ws[:, 1:4], noise_mode="const")
    torch.testing.assert_close(network(ws, noise_mode="const"), img)


def test_discriminator_layers_shapes_and_settings():
    block = DiscriminatorBlock(0, 3, 4, resolution=8, img_channels=2, first_layer_idx=0, conv_clamp=64)
    assert block.fromrgb.weight.shape == (3, 2, 1, 1) and block.conv0.weight.shape == (3, 3, 3, 3)
    assert block.conv1.weight.shape == (4, 3, 3, 3) and block.skip.weight.shape == (4, 3, 1, 1)
    assert block.fromrgb.conv_clamp == block.conv0.conv_clamp == block.conv1.conv_clamp == 64
    assert block.skip.conv_clamp is None and block.conv1.activation == "lrelu"
    epilogue = DiscriminatorEpilogue(4, cmap_dim=1, resolution=4, img_channels=2, architecture="skip",
                                     mbstd_group_size=2, mbstd_num_channels=2, conv_clamp=32)
    assert epilogue.fromrgb.activation == "lrelu" and epilogue.mbstd.num_channels == 2
    assert epilogue.conv.weight.shape == (4, 6, 3, 3) and epilogue.conv.conv_clamp == 32
    randomise(epilogue.double())
    x, cmap = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64)
    img = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    hidden = epilogue.mbstd(x + epilogue.fromrgb(img))
    out = fc(epilogue.out, fc(epilogue.fc, epilogue.conv(hidden).flatten(1), "lrelu"))
    torch.testing.assert_close(epilogue(x, img, cmap), out * cmap)  # cmap_dim 1: <out, cmap> / 1


def test_super_resolution_passes_its_block_settings_on():
    module = SuperresolutionHybrid2X(channels=6, img_resolution=16, sr_num_fp16_res=2, sr_antialias=True, w_dim=4,
                                     block_channels=(4, 3), architecture="resnet")
    assert module.block0.architecture == module.block1.architecture == "resnet"
    assert module.block0.conv1.conv_clamp == module.block1.conv1.conv_clamp == 256
    assert torch.equal(module.resample_filter, setup_filter((1, 3, 3, 1)))


def test_the_raw_image_is_resized_with_antialiasing():
    raw = torch.zeros(1, 1, 8, 8)
    raw[..., 4:] = 1.0
    # 8 -> 4: a triangle filter two input pixels each side (see test_image_folder.py): 0, 1/8, 7/8, 1.
    from dreamportrait.models.discriminator import resize_raw_image

    torch.testing.assert_close(resize_raw_image(raw, 4)[0, 0, 0], torch.tensor([0.0, 0.125, 0.875, 1.0]))


def test_normalisation_and_minibatch_std_of_constant_inputs():
    from dreamportrait.models.layers import normalize_2nd_moment

    assert torch.equal(normalize_2nd_moment(torch.zeros(2, 3)), torch.zeros(2, 3))
    x = torch.ones(4, 2, 3, 3, dtype=torch.float64)
    out = MinibatchStdLayer(group_size=None)(x)
    torch.testing.assert_close(out[:, 2], torch.full((4, 3, 3), 1e-4, dtype=torch.float64))  # sqrt(0 + 1e-8)
    varied = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    std = (varied.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()  # one group of the whole batch
    torch.testing.assert_close(MinibatchStdLayer(group_size=None)(varied)[:, 2], std.expand(6, 3, 3))


def test_downsampling_pads_by_the_filters_size():
    from dreamportrait.models.resampling import downsample2d, upsample2d

    taps = setup_filter((1, 2, 3, 3, 2, 1)).double()
    x = torch.randn(1, 2, 10, 10, dtype=torch.float64)
    padded = F.pad(x, [2, 2, 2, 2])  # (6 - 2 + 1) // 2 before, (6 - 2) // 2 after
    expected = F.conv2d(padded, taps.flip([0, 1])[None, None].repeat(2, 1, 1, 1), groups=2)[:, :, ::2, ::2]
    torch.testing.assert_close(downsample2d(x, taps), expected)
    zeros = x.new_zeros(1, 2, 20, 20)
    zeros[:, :, ::2, ::2] = x
    padded = F.pad(zeros, [3, 2, 3, 2])  # (6 + 2 - 1) // 2 before, (6 - 2) // 2 after
    expected = F.conv2d(padded, (taps * 4).flip([0, 1])[None, None].repeat(2, 1, 1, 1), groups=2)
    torch.testing.assert_close(upsample2d(x, taps), expected)


# --- layers at their edges -------------------------------------------------------------------------------------

def test_modulated_convolution_in_float16_prenormalises_so_large_values_do_not_overflow():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 6, 6, generator=generator) * 100
    weight, styles = torch.randn(4, 3, 3, 3, generator=generator) * 100, torch.randn(2, 3, generator=generator) * 100
    for up in (1, 2):
        f = setup_filter((1, 3, 3, 1))
        expected = modulated_conv2d(x.double(), weight.double(), styles.double(), padding=1, up=up,
                                    resample_filter=f.double())
        got = modulated_conv2d(x.half(), weight.half(), styles.half(), padding=1, up=up, resample_filter=f.half())
        assert got.dtype == torch.float16 and got.isfinite().all()
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-3 * expected.abs().max().item())
    # Without demodulation nothing is rescaled: small values in float16 give the float64 result.
    small = modulated_conv2d(x.half() / 100, weight.half() / 100, styles.half() / 100, demodulate=False)
    reference = modulated_conv2d(x.double() / 100, weight.double() / 100, styles.double() / 100, demodulate=False)
    torch.testing.assert_close(small.double(), reference, rtol=0, atol=2e-2)
    # Zero styles: zero output, not 0/0.
    zero = modulated_conv2d(x.double(), weight.double(), torch.zeros(2, 3, dtype=torch.float64), padding=1)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_bias_act_relu_gain_and_a_zero_clamp():
    from dreamportrait.models.layers import bias_act

    x = torch.tensor([[-2.0, 0.5], [1.0, -0.25]], dtype=torch.float64)
    bias = torch.tensor([0.5, -1.0])  # float32 bias on float64 x
    torch.testing.assert_close(bias_act(x, bias, "relu"), F.relu(x + bias.double()) * SQRT2)
    torch.testing.assert_close(bias_act(x, None, "linear", gain=2.0), x * 2)
    torch.testing.assert_close(bias_act(x, None, "lrelu", gain=1.0), F.leaky_relu(x, 0.2))
    assert torch.equal(bias_act(x, bias.double(), "linear", clamp=0.0), torch.zeros_like(x))
    torch.testing.assert_close(bias_act(x, None, "linear", clamp=-1.0), x)  # a negative clamp: none


def test_fully_connected_layer_initialisation_and_dtypes():
    from dreamportrait.models.layers import FullyConnectedLayer

    torch.manual_seed(0)
    layer = FullyConnectedLayer(64, 64, lr_multiplier=0.01)
    assert 90 < layer.weight.std().item() < 110  # stored as N(0, 1) / lr
    assert torch.equal(layer.bias, torch.zeros(64)) and layer.weight_gain == 0.01 / 8
    no_bias = FullyConnectedLayer(3, 2, bias=False)
    assert no_bias.bias is None
    x = torch.randn(4, 3, dtype=torch.float64)  # float64 input, float32 parameters
    out = no_bias(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x @ (no_bias.weight.double() / math.sqrt(3)).t())
    biased = randomise(FullyConnectedLayer(3, 2, lr_multiplier=0.5))
    torch.testing.assert_close(biased(x), x @ (biased.weight.double() * 0.5 / math.sqrt(3)).t()
                               + biased.bias.double() * 0.5)
    relu = randomise(FullyConnectedLayer(3, 2, bias=False, activation="relu"))
    torch.testing.assert_close(relu(x), F.relu(x @ (relu.weight.double() / math.sqrt(3)).t()) * SQRT2)


def test_setup_filter_is_float32_and_refuses_what_is_not_a_list_of_taps():
    assert setup_filter(torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64)).dtype == torch.float32
    assert setup_filter([1, 2, 1]).dtype == torch.float32
    torch.testing.assert_close(setup_filter([2]), torch.ones(1, 1))
    for taps in ([], [[1, 2], [3, 4]]):
        with pytest.raises(ValueError, match=r"^setup_filter: taps must be a non-empty 1-D sequence, got "):
            setup_filter(taps)


def test_upfirdn2d_pads_crops_and_keeps_the_images_dtype():
    from dreamportrait.models.resampling import upfirdn2d

    f = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # float32 filter, float64 image
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    kernel = f.double().flip([0, 1])[None, None].repeat(2, 1, 1, 1)
    torch.testing.assert_close(upfirdn2d(x, f), F.conv2d(x, kernel, groups=2))
    for padding in ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (2, 1, 1, 2)):
        left, right, top, bottom = padding
        expected = F.conv2d(F.pad(x, [left, right, top, bottom]), kernel, groups=2)
        torch.testing.assert_close(upfirdn2d(x, f, padding=padding), expected)
    # Negative padding crops: (left, right, top, bottom) = (-1, -2, 0, -1).
    expected = F.conv2d(x[:, :, 0:4, 1:4], kernel, groups=2)
    torch.testing.assert_close(upfirdn2d(x, f, padding=(-1, -2, 0, -1)), expected)
    expected = F.conv2d(x[:, :, 1:5, 0:6], kernel, groups=2)
    torch.testing.assert_close(upfirdn2d(x, f, padding=(0, 0, -1, 0)), expected)


def test_resampling_with_an_odd_filter_and_a_two_by_two_kernel():
    from dreamportrait.models.resampling import conv2d_resample, upsample2d

    taps = setup_filter((1, 2, 1)).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    zeros = x.new_zeros(1, 2, 10, 10)
    zeros[:, :, ::2, ::2] = x
    filtered = F.conv2d(F.pad(zeros, [2, 0, 2, 0]), (taps * 4).flip([0, 1])[None, None].repeat(2, 1, 1, 1), groups=2)
    torch.testing.assert_close(upsample2d(x, taps), filtered)  # (3 + 2 - 1) // 2 = 2 before, (3 - 2) // 2 = 0 after
    weight = torch.randn(3, 2, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(conv2d_resample(x, weight, taps, up=2), F.conv2d(filtered, weight))
    # A 2x2 kernel down-sampled: pad, filter, then a strided convolution.
    weight = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    f = setup_filter((1, 3, 3, 1)).double()
    padded = F.pad(x, [1, 1, 1, 1])
    low = F.conv2d(padded, f.flip([0, 1])[None, None].repeat(2, 1, 1, 1), groups=2)
    torch.testing.assert_close(conv2d_resample(x, weight, f, down=2), F.conv2d(low, weight, stride=2))
    torch.testing.assert_close(conv2d_resample(x, weight), F.conv2d(x, weight))  # no padding by default
    with pytest.raises(ValueError, match="^conv2d_resample: up- and down-sampling in one layer is not supported$"):
        conv2d_resample(x, weight, f, up=2, down=2)


def test_synthesis_block_and_layer_settings():
    layer = SynthesisLayer(3, 2, w_dim=4, resolution=8, kernel_size=5)
    assert layer.padding == 2 and layer.weight.shape == (2, 3, 5, 5)
    rgb = ToRGBLayer(4, 3, w_dim=5, kernel_size=3)
    assert rgb.weight_gain == 1 / math.sqrt(4 * 9)
    block = SynthesisBlock(3, 2, w_dim=4, resolution=8, img_channels=2, is_last=True)
    assert block.conv0.conv_clamp == block.conv1.conv_clamp == block.torgb.conv_clamp == 256 and not block.use_fp16
    quiet = SynthesisBlock(3, 2, w_dim=4, resolution=8, img_channels=2, is_last=True, conv_clamp=7, use_noise=False)
    assert quiet.conv0.conv_clamp == quiet.conv1.conv_clamp == quiet.torgb.conv_clamp == 7
    assert not hasattr(quiet.conv0, "noise_strength") and not hasattr(quiet.conv1, "noise_strength")
    first = SynthesisBlock(0, 2, w_dim=4, resolution=4, img_channels=2, is_last=False, architecture="resnet")
    assert not hasattr(first, "skip") and first.num_conv == 1
    assert MappingNetwork(z_dim=2, c_dim=1, w_dim=2, num_ws=None, num_layers=1).embed.weight.shape == (2, 1)


def test_the_dual_discriminator_with_one_label_channel_and_skip_blocks():
    discriminator = randomise(DualDiscriminator(c_dim=1, img_resolution=8, img_channels=3, architecture="skip",
                                                channel_base=32, channel_max=4, num_fp16_res=0,
                                                mapping_kwargs={"num_layers": 1},
                                                epilogue_kwargs={"mbstd_group_size": 2}).double())
    image = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    raw = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    c = torch.randn(2, 1, dtype=torch.float64)
    x = torch.cat([image, F.interpolate(raw, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)], 1)
    features, img = discriminator.b8(None, x)
    expected = discriminator.b4(features, img, discriminator.mapping(None, c))
    torch.testing.assert_close(discriminator({"image": image, "image_raw": raw}, c), expected)
    with pytest.raises(ValueError, match=r"^img must be a mapping with 'image' and 'image_raw' tensors"):
        discriminator({"image_raw": raw}, c)
    with pytest.raises(ValueError, match=r"^c must have shape \(2, 1\) \(one camera label per image\), got str$"):
        discriminator({"image": image, "image_raw": raw}, "front")


def test_float16_modulation_casts_float32_weights_and_styles_and_keeps_headroom():
    generator = torch.Generator().manual_seed(4)
    # Products of x with 1/√27-scaled weights stay far below 65504; with weights scaled by √27 they overflow.
    x = torch.randn(2, 3, 6, 6, generator=generator) * 3000
    weight, styles = torch.randn(4, 3, 3, 3, generator=generator), torch.randn(2, 3, generator=generator)
    expected = modulated_conv2d(x.double(), weight.double(), styles.double(), padding=1)
    noise = torch.zeros(1, 1, 6, 6)  # float32 noise too
    got = modulated_conv2d(x.half(), weight, styles, noise=noise, padding=1)  # float32 weight and styles
    assert got.dtype == torch.float16 and got.isfinite().all()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-3 * expected.abs().max().item())


def test_convolution_layer_defaults_padding_and_dtype():
    from dreamportrait.models.layers import Conv2dLayer

    layer = Conv2dLayer(3, 2, kernel_size=5)
    assert layer.padding == 2 and isinstance(layer.weight, torch.nn.Parameter)
    assert isinstance(layer.bias, torch.nn.Parameter)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)  # float32 layer, float64 input
    out = layer(x)
    assert out.dtype == torch.float64 and out.shape == (1, 2, 6, 6)
    torch.testing.assert_close(out, F.conv2d(x, layer.weight.double() / math.sqrt(75), padding=2)
                               + layer.bias.double()[None, :, None, None])


def test_freeze_d_counts_layers_across_blocks():
    discriminator = DualDiscriminator(c_dim=0, img_resolution=32, img_channels=3, channel_base=64, channel_max=4,
                                      block_kwargs={"freeze_layers": 5})
    assert [discriminator.b32.first_layer_idx, discriminator.b16.first_layer_idx, discriminator.b8.first_layer_idx] \
        == [0, 4, 7]
    # Layers 0-4 frozen: the first block's four and the second block's first.
    assert isinstance(discriminator.b16.conv1.weight, torch.nn.Parameter)
    assert not isinstance(discriminator.b16.conv0.weight, torch.nn.Parameter)


def test_super_resolution_defaults_and_a_six_tap_downsampling_convolution():
    from dreamportrait.models.resampling import conv2d_resample

    module = SuperresolutionHybrid2X(channels=6, img_resolution=8, sr_num_fp16_res=0, sr_antialias=True,
                                     block_channels=(4, 3))
    assert module.block0.w_dim == module.block1.w_dim == 512
    assert module.block0.conv1.conv_clamp is None and module.block1.conv1.conv_clamp is None
    taps = setup_filter((1, 2, 3, 3, 2, 1)).double()
    x = torch.randn(1, 2, 10, 10, dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    # Pad (6 - 2 + 1) // 2 + 1 = 3 before and (6 - 2) // 2 + 1 = 3 after, low-pass, then a strided convolution.
    low = F.conv2d(F.pad(x, [3, 3, 3, 3]), taps.flip([0, 1])[None, None].repeat(2, 1, 1, 1), groups=2)
    torch.testing.assert_close(conv2d_resample(x, weight, taps, down=2, padding=1), F.conv2d(low, weight, stride=2))
