"""What the ops must move and compute, and how fast a GPU could at best do it.

For each op at a given shape and dtype, :func:`op_cost` counts the bytes that must cross the GPU's
memory bus (every input read once, every output written once: a kernel cannot do better) and the
arithmetic it must do (flops of the multiply-adds; transcendental functions count as one each).
The floor time on a GPU is ``max(bytes / bandwidth, flops / peak rate)``; BENCHMARKS.md tabulates
it for an H100 SXM and the GPU self-check (:mod:`dreamportrait.selfcheck`) compares measured times
with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuPeak:
    """Datasheet peaks: memory bandwidth (bytes/s) and dense matrix rates (flop/s) per input type.
    ``float32`` is the CUDA-core rate, ``tf32`` the tensor-core rate for float32 inputs."""

    name: str
    bandwidth: float
    float16: float
    tf32: float
    float32: float
    float64: float

    def rate(self, dtype: torch.dtype, tensor_cores: bool = True) -> float:
        if dtype in (torch.float16, torch.bfloat16):
            return self.float16 if tensor_cores else self.float32
        if dtype == torch.float32:
            return self.tf32 if tensor_cores else self.float32
        return self.float64


T = 1e12
# Dense (not sparse) datasheet figures of NVIDIA's data-centre and workstation GPUs.
KNOWN_GPUS = {
    "H100 SXM": GpuPeak("H100 SXM", 3.35e12, 989 * T, 494 * T, 67 * T, 67 * T),
    "H100 PCIe": GpuPeak("H100 PCIe", 2.0e12, 756 * T, 378 * T, 51 * T, 51 * T),
    "H100 NVL": GpuPeak("H100 NVL", 3.9e12, 835 * T, 418 * T, 60 * T, 60 * T),
    "H200": GpuPeak("H200", 4.8e12, 989 * T, 494 * T, 67 * T, 67 * T),
    "B200": GpuPeak("B200", 8.0e12, 2250 * T, 1100 * T, 80 * T, 40 * T),
    "A100 SXM 80GB": GpuPeak("A100 SXM 80GB", 2.039e12, 312 * T, 156 * T, 19.5 * T, 19.5 * T),
    "A100 80GB PCIe": GpuPeak("A100 80GB PCIe", 1.935e12, 312 * T, 156 * T, 19.5 * T, 19.5 * T),
    "A100 40GB": GpuPeak("A100 40GB", 1.555e12, 312 * T, 156 * T, 19.5 * T, 19.5 * T),
    "L40S": GpuPeak("L40S", 0.864e12, 362 * T, 183 * T, 91.6 * T, 1.4 * T),
    "RTX 4090": GpuPeak("RTX 4090", 1.008e12, 165 * T, 82.6 * T, 82.6 * T, 1.3 * T),
    "A10": GpuPeak("A10", 0.6e12, 125 * T, 62.5 * T, 31.2 * T, 0.98 * T),
}
H100 = KNOWN_GPUS["H100 SXM"]


def gpu_peak(device_name: str) -> GpuPeak | None:
    """The datasheet peaks of a GPU from ``torch.cuda.get_device_name()``, None if unknown.

    "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" the PCIe one; the longest matching
    key wins.
    """
    name = device_name.upper().replace("NVIDIA", "").replace("GEFORCE", "")
    aliases = {"H100 80GB HBM3": "H100 SXM", "H200": "H200", "H100 NVL": "H100 NVL", "H100 PCIE": "H100 PCIe",
               "B200": "B200", "A100-SXM4-80GB": "A100 SXM 80GB", "A100 80GB PCIE": "A100 80GB PCIe",
               "A100-SXM4-40GB": "A100 40GB", "A100-PCIE-40GB": "A100 40GB", "L40S": "L40S",
               "RTX 4090": "RTX 4090", "A10": "A10"}
    matches = [key for key in aliases if key in name]
    return KNOWN_GPUS[aliases[max(matches, key=len)]] if matches else None


@dataclass(frozen=True)
class Cost:
    """Bytes that must move and flops that must be done by one call."""

    bytes: float
    flops: float
    tensor_core_flops: bool  # whether the flops are matrix products (tensor-core eligible)

    def floor_seconds(self, gpu: GpuPeak, dtype: torch.dtype) -> float:
        return max(self.bytes / gpu.bandwidth, self.flops / gpu.rate(dtype, self.tensor_core_flops))

    def bound(self, gpu: GpuPeak, dtype: torch.dtype) -> str:
        """"memory" or "compute": which limit sets the floor."""
        memory = self.bytes / gpu.bandwidth
        return "memory" if memory >= self.flops / gpu.rate(dtype, self.tensor_core_flops) else "compute"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def accumulation_size(dtype: torch.dtype) -> int:
    """Bytes of the type gradients are accumulated in (float32, or float64 for float64)."""
    return 8 if dtype == torch.float64 else 4


def triplane_sample_cost(batch: int, points: int, channels: int, resolution: int, dtype: torch.dtype,
                         backward: bool) -> Cost:
    """``reduce="mean"``: planes ``(B, 3, C, R, R)``, points ``(B, N, 3)``, output ``(B, N, C)``.

    Forward: read planes and points, write features; 3 planes x 4 taps x C multiply-adds per point.
    Backward: read the output gradient, planes and points again, write the plane gradient (in the
    accumulation type, then the inputs' dtype) and the point gradient; twice the forward's
    multiply-adds (plane scatter and the point derivative).
    """
    flops = batch * points * 3 * 4 * channels * 2
    return Cost(_sampling_bytes(batch, points, channels, resolution, channels, dtype, backward),
                3 * flops if backward else flops, False)


def _sampling_bytes(batch: int, points: int, channels: int, resolution: int, written: int, dtype: torch.dtype,
                    backward: bool) -> int:
    """Bytes a sampling op moves that reads planes ``(B, 3, C, R, R)`` and points ``(B, N, 3)`` and
    writes ``written`` values per point. Backward: the output gradient, planes and points read
    again, the plane gradient (in the accumulation type, then the inputs' dtype) and the point
    gradient written."""
    e = _size(dtype)
    planes = batch * 3 * channels * resolution * resolution * e
    coordinates = batch * points * 3 * e
    output = batch * points * written * e
    forward = planes + coordinates + output
    if not backward:
        return forward
    grad_planes = batch * 3 * channels * resolution * resolution * (accumulation_size(dtype) + e)
    return forward + (output + planes + coordinates + grad_planes + coordinates)


def sample_and_decode_cost(batch: int, points: int, channels: int, resolution: int, hidden: int, outputs: int,
                           dtype: torch.dtype, backward: bool) -> Cost:
    """Tri-plane sampling, the mean and EG3D's decoder MLP (C -> K -> O) in one pass: planes
    ``(B, 3, C, R, R)``, points ``(B, N, 3)``, output ``(B, N, O)``; the features and hidden units
    never leave the chip, and the weights are too small to count.

    Forward: read planes and points, write the output; per point 3 planes x 4 taps x C
    multiply-adds of the sampling and C·K + K·O of the two layers, all counted at the tensor-core
    rate (the layers are 90 % of them at EG3D's sizes). Backward: read the output gradient, planes
    and points, write the plane gradient (in the accumulation type, then the inputs' dtype) and the
    point gradient; twice the forward's multiply-adds (recomputing the forward is the kernel's
    choice, not a necessity, so it is not counted).
    """
    flops = batch * points * 2 * (3 * 4 * channels + channels * hidden + hidden * outputs)
    return Cost(_sampling_bytes(batch, points, channels, resolution, outputs, dtype, backward),
                3 * flops if backward else flops, True)


def composite_rays_cost(rays: int, samples: int, channels: int, dtype: torch.dtype, backward: bool) -> Cost:
    """Forward: read densities, deltas, depths ``(R, S)`` and colours ``(R, S, C)``; write rgb
    ``(R, C)``, depth and opacity ``(R,)`` and weights ``(R, S)``. Backward: read the four output
    gradients and the four inputs, write the four input gradients."""
    e = _size(dtype)
    per_sample = rays * samples * e
    colors = per_sample * channels
    outputs = rays * channels * e + 2 * rays * e + per_sample
    forward = 3 * per_sample + colors + outputs
    flops = rays * samples * (2 * channels + 8)
    if not backward:
        return Cost(forward, flops, False)
    backward_bytes = outputs + 3 * per_sample + colors + 3 * per_sample + colors
    return Cost(forward + backward_bytes, 3 * flops, False)


def gated_cross_attention_cost(batch: int, heads: int, queries: int, keys: int, dim: int, dtype: torch.dtype,
                               backward: bool) -> Cost:
    """Forward: read q ``(B, H, Lq, D)``, k and v ``(B, H, Lk, D)``, write the output and the
    log-sum-exp; two matrix products (QKᵀ and PV), 4·B·H·Lq·Lk·D flops. Backward: read the output
    gradient, q, k, v and the log-sum-exp, write dq, dk, dv; five products (QKᵀ again, dV, dP, dQ,
    dK), 10·B·H·Lq·Lk·D flops."""
    e = _size(dtype)
    query_bytes = batch * heads * queries * dim * e
    key_bytes = 2 * batch * heads * keys * dim * e
    lse = batch * heads * queries * 4
    products = batch * heads * queries * keys * dim * 2
    forward = Cost(query_bytes + key_bytes + query_bytes + lse, 2 * products, True)
    if not backward:
        return forward
    backward_bytes = query_bytes + query_bytes + key_bytes + lse + query_bytes + key_bytes
    return Cost(forward.bytes + backward_bytes, forward.flops + 5 * products, True)
