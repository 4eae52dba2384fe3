"""The generator decodes with the fused sample-and-decode op, and gets the same render as sampling then
decoding (which it falls back to when the decoder carries hooks)."""

import torch

import dreamportrait.models.renderer as renderer_module
from dreamportrait.models import build_generator, camera_labels, fov_to_intrinsics, sample_orbit_poses


def test_generator_renders_through_the_fused_op_and_matches_the_unfused_path(monkeypatch):
    torch.manual_seed(0)
    generator = build_generator("tiny").double().eval()
    c = camera_labels(sample_orbit_poses(2), fov_to_intrinsics(18.837)).double()
    z = torch.randn(2, generator.z_dim, dtype=torch.float64)
    calls = []
    original = renderer_module.sample_and_decode
    monkeypatch.setattr(renderer_module, "sample_and_decode", lambda *a, **k: calls.append(1) or original(*a, **k))

    def render():
        ws = generator.mapping(z, c)
        return generator.synthesis(ws, c, noise_mode="const", deterministic_sampling=True)

    fused = render()
    assert len(calls) == 2  # the coarse and the fine pass
    generator.decoder.register_forward_hook(lambda module, args, out: None)  # hooks must run: unfused path
    unfused = render()
    assert len(calls) == 2
    for key in ("image", "image_raw", "image_depth"):
        torch.testing.assert_close(fused[key], unfused[key], rtol=1e-9, atol=1e-9)
