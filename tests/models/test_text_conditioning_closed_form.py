"""The text conditioning's parts against closed forms written out by hand or in numpy: the adapters'
MLPs and the w each group's offset lands on, the groups of the tiny generator's ws, the Fourier
features of texel positions, the synthesis hook, the text checks and their messages."""

import copy
import math
import re

import numpy as np
import pytest
import torch
from tiny_models import write_tiny_clip

from dreamportrait.models import build_generator
from dreamportrait.text.conditioning import (ADAPTER_GROUPS, ConditionAdapters, TextConditionedGenerator,
                                             fourier_positions, ws_groups, zero_output_mlp)
from dreamportrait.text.encoder import TextEncoder, TextFeatures


def lrelu(x):
    return np.where(x >= 0, x, 0.2 * x)


def test_zero_output_mlp_is_linear_leaky_relu_linear_with_a_zero_last_layer():
    mlp = zero_output_mlp(3, 5, 4)
    x = torch.randn(6, 3)
    assert torch.equal(mlp(x), torch.zeros(6, 4))
    assert (mlp[0].in_features, mlp[0].out_features, mlp[2].in_features, mlp[2].out_features) == (3, 5, 5, 4)
    assert mlp[0].weight.abs().sum() > 0  # only the last layer starts at zero
    with torch.no_grad():
        mlp[2].weight.normal_()
        mlp[2].bias.normal_()
    w1, b1, w2, b2 = (p.detach().double().numpy() for p in (mlp[0].weight, mlp[0].bias, mlp[2].weight, mlp[2].bias))
    expected = lrelu(x.double().numpy() @ w1.T + b1) @ w2.T + b2
    np.testing.assert_allclose(mlp(x).detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_each_w_gets_the_offset_of_its_group_and_the_super_resolution_its_own():
    groups = ["coarse", "coarse", "middle", "fine", "middle", "fine"]
    adapters = ConditionAdapters(text_dim=3, w_dim=4, group_of_ws=groups, hidden=5)
    assert set(adapters.groups) == set(ADAPTER_GROUPS) and adapters.groups["fine"][0].out_features == 5
    pooled = torch.randn(2, 3)
    ws_offset, sr_offset = adapters(pooled)
    assert torch.equal(ws_offset, torch.zeros(2, 6, 4)) and torch.equal(sr_offset, torch.zeros(2, 1, 4))
    with torch.no_grad():
        for mlp in adapters.groups.values():
            mlp[2].weight.normal_()
            mlp[2].bias.normal_()

    def group_output(name):
        mlp = adapters.groups[name]
        w1, b1, w2, b2 = (p.detach().double().numpy() for p in (mlp[0].weight, mlp[0].bias, mlp[2].weight,
                                                                   mlp[2].bias))
        return lrelu(pooled.double().numpy() @ w1.T + b1) @ w2.T + b2  # (2, 4)

    ws_offset, sr_offset = adapters(pooled)
    assert ws_offset.shape == (2, 6, 4) and sr_offset.shape == (2, 1, 4)
    for index, name in enumerate(groups):
        np.testing.assert_allclose(ws_offset[:, index].detach().numpy(), group_output(name), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sr_offset[:, 0].detach().numpy(), group_output("superresolution"), rtol=1e-5,
                               atol=1e-5)
    assert ConditionAdapters(3, 4, groups).groups["coarse"][0].out_features == 4  # hidden defaults to w_dim
    with pytest.raises(ValueError, match=re.escape("ConditionAdapters: unknown groups ['superresolution', 'x']; "
                                                   "use ('coarse', 'middle', 'fine')")):
        ConditionAdapters(3, 4, ["coarse", "x", "superresolution"])


def test_the_tiny_generators_ws_by_group():
    base = build_generator("tiny")
    # blocks 4, 8, 16, 32, 64 with 1, 2, 2, 2, 2 convolutions, then the last ToRGB's w: 10 ws
    assert base.backbone.synthesis.block_resolutions == [4, 8, 16, 32, 64] and base.num_ws == 10
    assert ws_groups(base, 16, 64) == ["coarse"] * 3 + ["middle"] * 4 + ["fine"] * 3
    assert ws_groups(base, 8, 32) == ["coarse"] + ["middle"] * 4 + ["fine"] * 5
    assert ws_groups(base, 4, 128) == ["middle"] * 9 + ["fine"]


def test_fourier_positions_are_sines_and_cosines_of_the_texel_centres():
    resolution, frequencies = 4, 3
    features = fourier_positions(resolution, frequencies, "cpu", torch.float64)
    assert features.shape == (4 * frequencies, resolution, resolution) and features.dtype == torch.float64
    centres = np.array([-0.75, -0.25, 0.25, 0.75])  # (i + 1/2) / R * 2 - 1
    u = np.broadcast_to(centres[None, :], (4, 4))  # along W
    v = np.broadcast_to(centres[:, None], (4, 4))  # along H
    angles = [u * 2**k * math.pi for k in range(frequencies)] + [v * 2**k * math.pi for k in range(frequencies)]
    expected = np.stack([np.sin(a) for a in angles] + [np.cos(a) for a in angles])
    np.testing.assert_allclose(features.numpy(), expected, rtol=0, atol=1e-12)
    assert fourier_positions(2, 1, "meta", torch.float32).device.type == "meta"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return TextEncoder(write_tiny_clip(tmp_path_factory.mktemp("clip")))


def test_the_synthesis_hook_runs_the_cross_attention_only_at_its_resolutions(encoder):
    generator = TextConditionedGenerator(build_generator("tiny"), encoder.dim, text_encoder=encoder,
                                         attention_resolutions=(16,), attention_heads=2, attention_head_dim=8)
    text = encoder(["a bald man"])
    hook = generator.block_hook(text)
    x, img = torch.randn(1, 8, 32, 32), torch.randn(1, 96, 32, 32)
    same_x, same_img = hook(32, x, img)  # no block at 32: passed through
    assert same_x is x and same_img is img
    with torch.no_grad():
        block = generator.cross_attention["16"]
        block.gate.fill_(1.0)
        x16 = torch.randn(1, block.to_features.out_features, 16, 16)
        img16 = torch.randn(1, 96, 16, 16)
        expected = block(x16, img16, text)
        hooked = hook(16, x16, img16)
    assert torch.equal(hooked[0], expected[0]) and torch.equal(hooked[1], expected[1])
    assert not torch.equal(hooked[1], img16)  # an open gate changes the planes
    without = TextConditionedGenerator(build_generator("tiny"), encoder.dim, use_cross_attention=False)
    assert without.block_hook(text) is None and without.text_encoder is None
    assert without.parameter_groups()["cross_attention"] == []


def test_text_checks_and_messages(encoder):
    generator = TextConditionedGenerator(build_generator("tiny"), encoder.dim, text_encoder=encoder,
                                         attention_resolutions=(16,), attention_heads=2, attention_head_dim=8,
                                         use_adapters=False)
    assert generator.parameter_groups()["adapters"] == []
    text = encoder(["a man", "a woman"])
    assert generator._text(None, text, 2) is text
    encoded = generator._text(["a man", "a woman"], None, 2)
    assert torch.equal(encoded.tokens, text.tokens) and torch.equal(encoded.pooled, text.pooled)
    for prompts, given in ((None, None), (["a man", "a woman"], text)):
        with pytest.raises(ValueError, match=re.escape("give exactly one of prompts (list of strings) and text "
                                                       "(TextFeatures)")):
            generator._text(prompts, given, 2)
    with pytest.raises(ValueError, match="^2 prompts/text features for a batch of 3 samples$"):
        generator._text(None, text, 3)
    narrow = TextFeatures(text.tokens[..., :16], text.mask, text.pooled[..., :16])
    with pytest.raises(ValueError, match="^text features have width 16, the generator expects 32$"):
        generator._text(None, narrow, 2)
    bare = TextConditionedGenerator(build_generator("tiny"), encoder.dim, use_cross_attention=False)
    with pytest.raises(ValueError, match=re.escape("prompts given but the generator has no text_encoder; pass "
                                                   "text=TextFeatures instead")):
        bare.encode(["a man"])
    # A copy (the EMA generator) shares the frozen text encoder instead of duplicating it.
    assert copy.deepcopy(generator).text_encoder is encoder
    assert generator.init_kwargs == dict(text_dim=32, adapter_boundaries=[16, 64], adapter_hidden=None,
                                         attention_resolutions=[16], attention_heads=2, attention_head_dim=8,
                                         use_adapters=False, use_cross_attention=True)
