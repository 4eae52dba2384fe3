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
    thirds = fourier_positions(3, 1, "cpu", torch.float64)  # centres -2/3, 0, 2/3: not exact in float32
    np.testing.assert_allclose(thirds[0, 0].numpy(), np.sin(np.array([-2 / 3, 0, 2 / 3]) * math.pi), rtol=0,
                               atol=1e-14)
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
        with pytest.raises(ValueError, match="^" + re.escape("give exactly one of prompts (list of strings) and text "
                                                             "(TextFeatures)") + "$"):
            generator._text(prompts, given, 2)
    with pytest.raises(ValueError, match="^2 prompts/text features for a batch of 3 samples$"):
        generator._text(None, text, 3)
    narrow = TextFeatures(text.tokens[..., :16], text.mask, text.pooled[..., :16])
    with pytest.raises(ValueError, match="^text features have width 16, the generator expects 32$"):
        generator._text(None, narrow, 2)
    bare = TextConditionedGenerator(build_generator("tiny"), encoder.dim, use_cross_attention=False)
    with pytest.raises(ValueError, match="^" + re.escape("prompts given but the generator has no text_encoder; pass "
                                                         "text=TextFeatures instead") + "$"):
        bare.encode(["a man"])
    # A copy (the EMA generator) shares the frozen text encoder instead of duplicating it.
    assert copy.deepcopy(generator).text_encoder is encoder
    assert generator.init_kwargs == dict(text_dim=32, adapter_boundaries=[16, 64], adapter_hidden=None,
                                         attention_resolutions=[16], attention_heads=2, attention_head_dim=8,
                                         use_adapters=False, use_cross_attention=True)


def restated_cross_attention(block, x, img, text):
    """The block's forward written out with plain tensor algebra (float64): each texel's query reads
    its plane's 32 channels, the other planes along its 3D line, its plane's identity and its
    position; each head attends over the unmasked tokens with scale 1/√d; tanh(gate) per head;
    the heads, concatenated, are projected to 32 plane channels per plane and, the three planes
    concatenated per pixel, to the block's feature channels; both are added."""
    n, _, r, _ = img.shape
    planes = img.view(n, 3, 32, r, r)
    centres = (torch.arange(r, dtype=torch.float64) + 0.5) / r * 2 - 1
    u, v = centres[None, :].expand(r, r), centres[:, None].expand(r, r)
    scales = [2.0**k * math.pi for k in range(block.frequencies)]
    angles = [u * s for s in scales] + [v * s for s in scales]
    position = torch.stack([a.sin() for a in angles] + [a.cos() for a in angles])  # (4F, R, R)
    from dreamportrait.text.conditioning import line_features  # pinned by test_line_features_average_each_...

    rows = []
    for p in range(3):
        identity = block.plane_identity[p][None, :, None, None].expand(n, -1, r, r)
        rows.append(torch.cat([planes[:, p], line_features(planes, block.axes)[:, p], identity,
                               position[None].expand(n, -1, -1, -1)], dim=1))  # (N, Q, R, R)
    query_in = torch.stack(rows, 1).permute(0, 1, 3, 4, 2).reshape(n, 3 * r * r, -1)  # texels plane-major
    normed = torch.nn.functional.layer_norm(query_in, query_in.shape[-1:], block.query_norm.weight,
                                            block.query_norm.bias)
    heads, d = block.heads, block.head_dim
    q = (normed @ block.to_q.weight.T).view(n, -1, heads, d)
    kv = (text.tokens.double() @ block.to_kv.weight.T).view(n, -1, 2, heads, d)
    k, values = kv[:, :, 0], kv[:, :, 1]
    scores = torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(~text.mask[:, None, None, :], float("-inf"))
    attended = torch.einsum("nhqk,nkhd->nqhd", scores.softmax(-1), values) * torch.tanh(block.gate)[None, None, :, None]
    attended = attended.reshape(n, 3, r, r, heads * d)
    plane_update = (attended @ block.to_planes.weight.T).permute(0, 1, 4, 2, 3).reshape(n, 96, r, r)
    per_pixel = attended.permute(0, 2, 3, 1, 4).reshape(n, r, r, 3 * heads * d)
    feature_update = (per_pixel @ block.to_features.weight.T).permute(0, 3, 1, 2)
    return x + feature_update, img + plane_update


def test_the_cross_attention_block_is_its_restated_formula(encoder):
    from dreamportrait.models.renderer import TRIPLANE_AXES
    from dreamportrait.text.conditioning import TriplaneCrossAttention

    block = TriplaneCrossAttention(6, 32, TRIPLANE_AXES["eg3d"], heads=2, head_dim=4).double()
    assert (block.heads, block.head_dim, block.frequencies, tuple(block.plane_identity.shape)) == (2, 4, 4, (3, 16))
    assert all(layer.bias is None for layer in (block.to_q, block.to_kv, block.to_planes, block.to_features))
    with torch.no_grad():
        block.gate.copy_(torch.tensor([0.7, -1.2], dtype=torch.float64))
        block.query_norm.weight.normal_()
        block.query_norm.bias.normal_()
    text = encoder(["a bald man with glasses", "a woman"])  # float32 tokens, the second prompt shorter
    x, img = torch.randn(2, 6, 4, 4, dtype=torch.float64), torch.randn(2, 96, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        new_x, new_img = block(x, img, text)
        expected_x, expected_img = restated_cross_attention(block, x, img, text)
    assert new_x.dtype == new_img.dtype == torch.float64
    torch.testing.assert_close(new_img, expected_img, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(new_x, expected_x, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(new_img, img) and not torch.allclose(new_x, x)


def test_the_defaults_of_the_cross_attention_and_the_generator(encoder):
    from dreamportrait.models.renderer import TRIPLANE_AXES
    from dreamportrait.text.conditioning import TriplaneCrossAttention

    block = TriplaneCrossAttention(8, 32, TRIPLANE_AXES["eg3d"])
    assert (block.heads, block.head_dim, block.frequencies) == (4, 32, 4)
    assert block.to_q.in_features == 96 + 16 + 16 and block.to_q.out_features == 128
    assert block.to_kv.out_features == 256 and tuple(block.plane_identity.shape) == (3, 16)
    assert 0.005 < block.plane_identity.std().item() < 0.05  # drawn with a standard deviation of 0.02
    base = build_generator("tiny")
    base.rendering_kwargs = {**base.rendering_kwargs, "triplane_axes": "orthogonal"}
    generator = TextConditionedGenerator(base, 32, adapter_hidden=7)
    assert sorted(generator.cross_attention) == ["32", "64"]
    for block in generator.cross_attention.values():
        assert (block.heads, block.head_dim) == (4, 32) and block.axes == tuple(TRIPLANE_AXES["orthogonal"])
    assert generator.adapters.groups["coarse"][0].out_features == 7 and generator.init_kwargs["adapter_hidden"] == 7
    assert "ws_group" not in generator.adapters.state_dict()  # not saved: it follows from the generator
    assert set(generator.parameter_groups()) == {"adapters", "cross_attention", "base"}
    small = TextConditionedGenerator(build_generator("tiny"), 32, attention_resolutions=(16,), attention_heads=2,
                                     attention_head_dim=8)
    assert (small.cross_attention["16"].heads, small.cross_attention["16"].head_dim) == (2, 8)
    with pytest.raises(ValueError, match="^base state dict does not fit TriPlaneGenerator: missing keys: "):
        small.load_base_state_dict({})


def test_the_mapping_adds_each_groups_offset_after_the_base_mapping_and_leaves_its_averages(encoder):
    generator = TextConditionedGenerator(build_generator("tiny"), encoder.dim, use_cross_attention=False)
    groups = ws_groups(generator.base, 16, 64)
    with torch.no_grad():
        for index, mlp in enumerate(generator.adapters.groups.values()):
            mlp[2].bias.fill_(index + 1.0)  # coarse 1, middle 2, fine 3, super-resolution 4; weights 0
    z, c = torch.randn(2, 64), torch.randn(2, 25)
    text = encoder(["a man", "a woman"])
    w_avg = generator.base.backbone.mapping.w_avg.clone()
    with torch.no_grad():
        base = generator.base.mapping(z, c, truncation_psi=0.5, truncation_cutoff=4)
        ws, sr_ws = generator.mapping(z, c, text, truncation_psi=0.5, truncation_cutoff=4)
    assert torch.equal(generator.base.backbone.mapping.w_avg, w_avg)  # no update by default
    offsets = torch.tensor([{"coarse": 1.0, "middle": 2.0, "fine": 3.0}[g] for g in groups])
    torch.testing.assert_close(ws, base + offsets[None, :, None], rtol=0, atol=1e-6)
    assert sr_ws.shape == (2, 1, 64)
    torch.testing.assert_close(sr_ws, base[:, -1:] + 4.0, rtol=0, atol=1e-6)
    with torch.no_grad():  # asked for, the base mapping's running average of w moves
        generator.mapping(z, c, text, update_emas=True)
    assert not torch.equal(generator.base.backbone.mapping.w_avg, w_avg)


def test_the_forward_passes_its_arguments_on(encoder, monkeypatch):
    generator = TextConditionedGenerator(build_generator("tiny"), encoder.dim, use_cross_attention=False)
    calls = []
    monkeypatch.setattr(generator, "mapping", lambda *args: calls.append(("mapping", args)) or (
        torch.zeros(2, 10, 64), torch.zeros(2, 1, 64)))
    monkeypatch.setattr(generator, "synthesis", lambda *args, **kwargs: calls.append(("synthesis", args, kwargs)))
    z, c, conditioning = torch.randn(2, 64), torch.randn(2, 25), torch.randn(2, 25)
    text = encoder(["a man", "a woman"])
    generator(z, c, text=text, truncation_psi=0.6, truncation_cutoff=3, neural_rendering_resolution=8,
              update_emas=True, noise_mode="const", deterministic_sampling=True, conditioning=conditioning)
    (_, mapping_args), (_, synthesis_args, synthesis_kwargs) = calls
    assert mapping_args[0] is z and mapping_args[1] is conditioning and mapping_args[2] is text
    assert mapping_args[3:] == (0.6, 3, True)
    assert synthesis_args[1] is c and synthesis_kwargs == {"neural_rendering_resolution": 8, "noise_mode": "const",
                                                           "deterministic_sampling": True}
    calls.clear()
    generator(z, c, text=text)
    (_, mapping_args), (_, synthesis_args, synthesis_kwargs) = calls
    assert mapping_args[1] is c and mapping_args[3:] == (1.0, None, False)
    assert synthesis_kwargs == {"neural_rendering_resolution": None, "noise_mode": "random",
                                "deterministic_sampling": None}
