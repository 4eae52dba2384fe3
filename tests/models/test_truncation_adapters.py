"""Truncation with trained adapters: truncation pulls the base ws towards their mean w_avg
(``w_avg + psi (w - w_avg)``, StyleGAN's trick), and the text's adapter offsets are added after it,
whole, so a prompt acts as much at psi 0.7 (what generate samples at) as at psi 1."""

import pytest
import torch

from dreamportrait.models import TextConditionedGenerator, TextEncoder, build_generator, view_cameras


@pytest.fixture(scope="module")
def generator(tiny_pixel_sd):
    torch.manual_seed(0)
    model = TextConditionedGenerator(build_generator("tiny"), 32, text_encoder=TextEncoder(tiny_pixel_sd),
                                     attention_resolutions=(), use_cross_attention=False)
    with torch.no_grad():  # trained: adapters that move w, and a mean w away from zero
        for mlp in model.adapters.groups.values():
            mlp[2].weight.normal_(std=0.2)
            mlp[2].bias.normal_(std=0.2)
        model.base.backbone.mapping.w_avg.normal_()
    return model.eval()


@pytest.mark.parametrize("psi", [0.0, 0.5, 0.7])
def test_truncation_pulls_the_base_ws_to_their_mean_and_the_text_offset_is_added_whole(generator, psi):
    z, c = torch.randn(3, generator.base.z_dim), view_cameras(3, 0.3)
    text = generator.encode(["a man", "a woman with red hair", ""])
    with torch.no_grad():
        base = generator.base.mapping(z, c)  # (N, num_ws, w_dim), untruncated
        ws_full, sr_full = generator.mapping(z, c, text)
        ws, sr_ws = generator.mapping(z, c, text, truncation_psi=psi)
    offset, sr_offset = ws_full - base, sr_full - base[:, -1:]
    assert offset.abs().max() > 0.05 and sr_offset.abs().max() > 0.05  # the adapters do act
    w_avg = generator.base.backbone.mapping.w_avg
    torch.testing.assert_close(ws, w_avg + psi * (base - w_avg) + offset, rtol=0, atol=1e-5)
    torch.testing.assert_close(sr_ws, w_avg + psi * (base[:, -1:] - w_avg) + sr_offset, rtol=0, atol=1e-5)
    if psi == 0:  # every latent is the mean, and only the prompt tells samples apart
        torch.testing.assert_close(ws[0] - offset[0], ws[1] - offset[1], rtol=0, atol=1e-5)


def test_truncation_cutoff_truncates_only_the_first_ws(generator):
    z, c = torch.randn(2, generator.base.z_dim), view_cameras(2, 0.3)
    text = generator.encode(["a man", "a man"])
    cutoff = 2
    with torch.no_grad():
        base = generator.base.mapping(z, c)
        ws_full, _ = generator.mapping(z, c, text)
        ws, _ = generator.mapping(z, c, text, truncation_psi=0.5, truncation_cutoff=cutoff)
    offset, w_avg = ws_full - base, generator.base.backbone.mapping.w_avg
    torch.testing.assert_close(ws[:, :cutoff], w_avg + 0.5 * (base[:, :cutoff] - w_avg) + offset[:, :cutoff],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(ws[:, cutoff:], ws_full[:, cutoff:], rtol=0, atol=1e-6)
