"""The ops' benchmark shapes and inputs, shaped like EG3D's rendering: ``benchmarks/`` times them on
CPU and GPU, and the GPU self-check (:mod:`dreamportrait.selfcheck`) times them on a GPU.

Points are camera-ray samples as EG3D's renderer makes them (camera on a sphere of radius 2.7
looking at the origin, 18.84 degree field of view, depths in [2.25, 3.3]), so memory access has
the spatial coherence of real rendering rather than that of uniform noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TriplaneWorkload:
    name: str
    batch: int
    channels: int
    resolution: int
    rays_side: int  # rays_side x rays_side rays per image
    samples: int  # samples per ray


TRIPLANE_WORKLOADS = [
    TriplaneWorkload("eg3d-inference", batch=1, channels=32, resolution=256, rays_side=64, samples=96),
    TriplaneWorkload("training-batch", batch=4, channels=32, resolution=256, rays_side=64, samples=48),
]


def ray_points(batch: int, rays_side: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, rays_side**2 * samples, 3) points along camera rays through the unit box."""
    yaw = (torch.rand(batch, generator=generator) - 0.5) * math.radians(60)
    pitch = (torch.rand(batch, generator=generator) - 0.5) * math.radians(30)
    origin = 2.7 * torch.stack([torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch), torch.cos(yaw) * torch.cos(pitch)], -1)
    forward = -origin / origin.norm(dim=-1, keepdim=True)
    right = torch.nn.functional.normalize(torch.cross(torch.tensor([0.0, 1.0, 0.0]).expand_as(forward), forward, dim=-1), dim=-1)
    up = torch.cross(forward, right, dim=-1)
    half = math.tan(math.radians(18.837) / 2)
    grid = (torch.arange(rays_side) + 0.5) / rays_side * 2 - 1
    v, u = torch.meshgrid(grid * half, grid * half, indexing="ij")
    directions = forward[:, None] + u.reshape(1, -1, 1) * right[:, None] + v.reshape(1, -1, 1) * up[:, None]
    directions = directions / directions.norm(dim=-1, keepdim=True)  # (B, R, 3)
    depths = torch.linspace(2.25, 3.3, samples)
    points = origin[:, None, None] + directions[:, :, None] * depths[None, None, :, None]
    return points.reshape(batch, -1, 3).contiguous()


def triplane_inputs(workload: TriplaneWorkload, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    planes = torch.randn(workload.batch, 3, workload.channels, workload.resolution, workload.resolution, generator=generator)
    points = ray_points(workload.batch, workload.rays_side, workload.samples, generator)
    return planes.to(device, dtype), points.to(device, dtype)


@dataclass(frozen=True)
class DecoderWorkload(TriplaneWorkload):
    """A tri-plane workload decoded by EG3D's ``OSGDecoder`` (``sample_and_decode``): C -> hidden ->
    outputs (1 density + 32 colour features)."""

    hidden: int = 64
    outputs: int = 33


DECODER_WORKLOADS = [
    # EG3D's coarse and fine pass of one image (48 + 48 samples per ray), and a training batch's coarse pass.
    DecoderWorkload("eg3d-inference", batch=1, channels=32, resolution=256, rays_side=64, samples=96),
    DecoderWorkload("training-batch", batch=4, channels=32, resolution=256, rays_side=64, samples=48),
]


def decoder_inputs(workload: DecoderWorkload, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    """Planes, ray points and the decoder's effective weights (``weight1 (K, C)``, ``bias1 (K,)``,
    ``weight2 (O, K)``, ``bias2 (O,)``), scaled as EG3D's ``FullyConnectedLayer`` initialises them."""
    planes, points = triplane_inputs(workload, device, dtype, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    weight1 = torch.randn(workload.hidden, workload.channels, generator=generator) / math.sqrt(workload.channels)
    weight2 = torch.randn(workload.outputs, workload.hidden, generator=generator) / math.sqrt(workload.hidden)
    weights = [weight1, torch.zeros(workload.hidden), weight2, torch.zeros(workload.outputs)]
    return [planes, points, *(w.to(device, dtype) for w in weights)]


def sample_and_decode_eg3d(planes, points, weight1, bias1, weight2, bias2, backend=None):
    """``sample_and_decode`` with EG3D's ``box_warp`` (1) and plane axes, as EG3D's renderer calls it."""
    from dreamportrait.ops import EG3D_AXES, sample_and_decode

    return sample_and_decode(planes, points, 1.0, weight1, bias1, weight2, bias2, EG3D_AXES, backend=backend)


@dataclass(frozen=True)
class CompositeWorkload:
    name: str
    rays: int
    samples: int
    channels: int


COMPOSITE_WORKLOADS = [
    CompositeWorkload("eg3d-inference", rays=64 * 64, samples=96, channels=32),
    CompositeWorkload("training-batch", rays=4 * 64 * 64, samples=96, channels=32),
]


def composite_inputs(workload: CompositeWorkload, device: str = "cpu", dtype=torch.float32, seed: int = 0):
    """Densities as a softplus-activated decoder makes them, EG3D's depth range, random colours."""
    generator = torch.Generator().manual_seed(seed)
    shape = (workload.rays, workload.samples)
    densities = torch.nn.functional.softplus(torch.randn(shape, generator=generator) * 3 - 1)
    depths = torch.sort(torch.rand(shape, generator=generator) * 1.05 + 2.25, dim=1).values
    deltas = torch.cat([depths.diff(dim=1), torch.full((workload.rays, 1), 1.05 / workload.samples)], dim=1)
    colors = torch.rand(*shape, workload.channels, generator=generator)
    return [x.to(device, dtype) for x in (densities, colors, depths, deltas)]


@dataclass(frozen=True)
class AttentionWorkload:
    name: str
    batch: int
    heads: int
    queries: int
    keys: int
    dim: int


ATTENTION_WORKLOADS = [
    # Tri-plane tokens (3 x 64 x 64) attending to CLIP's 77 text tokens.
    AttentionWorkload("triplane-text", batch=2, heads=8, queries=3 * 64 * 64, keys=77, dim=64),
]


def attention_inputs(workload: AttentionWorkload, device: str = "cpu", dtype=torch.float32, seed: int = 0,
                     prompt_tokens: int | None = None):
    """q, k, v, a per-head gate and a padding mask: prompts of 8 to 77 tokens, as CLIP pads them, or
    every prompt ``prompt_tokens`` long."""
    generator = torch.Generator().manual_seed(seed)
    w = workload
    q = torch.randn(w.batch, w.heads, w.queries, w.dim, generator=generator)
    k = torch.randn(w.batch, w.heads, w.keys, w.dim, generator=generator)
    v = torch.randn(w.batch, w.heads, w.keys, w.dim, generator=generator)
    gate = torch.randn(w.heads, generator=generator)
    lengths = torch.randint(min(8, w.keys), w.keys + 1, (w.batch,), generator=generator)
    if prompt_tokens is not None:
        lengths = torch.full_like(lengths, prompt_tokens)
    mask = torch.arange(w.keys)[None, :] < lengths[:, None]
    return [x.to(device, dtype) for x in (q, k, v, gate)] + [mask.to(device)]


def sdpa_with_gate(q, k, v, gate, key_padding_mask, backend=None):
    """torch's fused scaled_dot_product_attention followed by the gate: the baseline to match."""
    attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :])
    return torch.tanh(gate).view(1, -1, 1, 1) * attended


# Tiny problems that run every first-call set-up (extension load, allocator) before a measurement.
WARM_UP_WORKLOADS = {
    "triplane_sample": TriplaneWorkload("warm-up", batch=1, channels=2, resolution=4, rays_side=2, samples=2),
    "sample_and_decode": DecoderWorkload("warm-up", batch=1, channels=2, resolution=4, rays_side=2, samples=2, hidden=4,
                                         outputs=3),
    "composite_rays": CompositeWorkload("warm-up", rays=4, samples=3, channels=2),
    "gated_cross_attention": AttentionWorkload("warm-up", batch=1, heads=1, queries=4, keys=3, dim=8),
}


def make_call(op: str, workload_name: str, backend: str, backward: bool, device: str = "cpu",
              dtype: torch.dtype = torch.float32):
    """A closure running one op call (and its backward), and the bytes the call must allocate:
    its outputs, plus the input gradients for a backward. ``backend="sdpa"`` runs torch's SDPA and
    the gate in place of ``gated_cross_attention``."""
    from dreamportrait.ops import composite_rays, gated_cross_attention, triplane_sample

    if op == "triplane_sample":
        workload = next(w for w in [*TRIPLANE_WORKLOADS, WARM_UP_WORKLOADS[op]] if w.name == workload_name)
        inputs = list(triplane_inputs(workload, device, dtype))
        function = triplane_sample
    elif op == "sample_and_decode":
        workload = next(w for w in [*DECODER_WORKLOADS, WARM_UP_WORKLOADS[op]] if w.name == workload_name)
        inputs = decoder_inputs(workload, device, dtype)
        function = sample_and_decode_eg3d
    elif op == "composite_rays":
        workload = next(w for w in [*COMPOSITE_WORKLOADS, WARM_UP_WORKLOADS[op]] if w.name == workload_name)
        inputs = composite_inputs(workload, device, dtype)
        function = composite_rays
    elif op == "gated_cross_attention":
        workload = next(w for w in [*ATTENTION_WORKLOADS, WARM_UP_WORKLOADS[op]] if w.name == workload_name)
        inputs = attention_inputs(workload, device, dtype)
        function = sdpa_with_gate if backend == "sdpa" else gated_cross_attention
    else:
        raise ValueError(f"unknown op {op!r}")
    differentiable = [x for x in inputs if x.is_floating_point()]
    for tensor in differentiable:
        tensor.requires_grad_(backward)

    def call():
        outputs = function(*inputs, backend=backend)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if backward:  # gradients returned, as to upstream layers (not accumulated into .grad)
            torch.autograd.grad(outputs, differentiable, [torch.ones_like(o) for o in outputs])
        if device == "cuda":
            torch.cuda.synchronize()
        return outputs

    with torch.no_grad():
        outputs = function(*inputs, backend="reference")
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    required = sum(o.numel() * o.element_size() for o in outputs)
    if backward:
        required += sum(x.numel() * x.element_size() for x in differentiable)
    return call, required
