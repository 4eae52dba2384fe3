"""What text conditioning costs: the text-conditioned generator (adapters + 3D-aware gated
cross-attention) vs its unconditioned base, forward and forward+backward (to all parameters), at
the ``tiny`` and ``ffhq512-128`` presets. Text features are precomputed (the frozen CLIP encoder
runs once per prompt and is cached), 77 tokens of width 768 (Stable Diffusion 1.x's CLIP ViT-L).

    python -m pytest benchmarks/test_text_conditioning.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

GPU = torch.cuda.is_available()
TEXT_DIM = 768
SETTINGS = {  # preset: (neural rendering resolution, cross-attention resolutions)
    "tiny": (32, (16, 32)),
    "ffhq512-128": (64, (32, 64)),
}


def make_call(preset: str, conditioned: bool, backward: bool, device: str):
    from dreamportrait.models import TextConditionedGenerator, TextFeatures, build_generator, camera_labels
    from dreamportrait.models import fov_to_intrinsics, sample_orbit_poses

    torch.manual_seed(0)
    resolution, attention_resolutions = SETTINGS[preset]
    base = build_generator(preset, neural_rendering_resolution=resolution)
    generator = TextConditionedGenerator(base, TEXT_DIM, attention_resolutions=attention_resolutions) if conditioned else base
    generator = generator.to(device).requires_grad_(backward)
    if conditioned:  # open the gates and adapters, as after training (closed ones cost the same)
        with torch.no_grad():
            for block in generator.cross_attention.values():
                block.gate.fill_(0.5)
    batch = 2
    z = torch.randn(batch, base.z_dim, device=device)
    c = camera_labels(sample_orbit_poses(batch), fov_to_intrinsics(18.837)).to(device)
    mask = torch.arange(77)[None] < torch.tensor([[12], [30]])
    text = TextFeatures(torch.randn(batch, 77, TEXT_DIM), mask, torch.randn(batch, TEXT_DIM)).to(device)

    def call():
        with torch.set_grad_enabled(backward):
            out = generator(z, c, text=text) if conditioned else generator(z, c)
            if backward:
                (out["image"].mean() + out["image_raw"].mean()).backward()
        if device == "cuda":
            torch.cuda.synchronize()

    return call


@pytest.mark.parametrize("preset", list(SETTINGS))
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("variant", ["unconditioned", "text"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not GPU, reason="no GPU"))])
def test_text_conditioning_cost(benchmark, record, preset, backward, variant, device):
    call = make_call(preset, variant == "text", backward, device)
    rounds = 3 if preset == "tiny" else 2
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1, iterations=1)
    record(f"{preset} batch 2 {'fwd+bwd' if backward else 'fwd'} {device}", variant, benchmark)
