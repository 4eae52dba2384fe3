"""How many blocks of each CUDA kernel of the extension an SM holds, read from the compiled code.

Without a GPU, occupancy follows from three figures and the target's limits: registers per thread
(``cuobjdump -res-usage`` of the built extension), threads per block (the kernels' launch
constants) and shared memory per block (static from the cubin, dynamic from the tile shape the
attention and fused-decoder launchers pick for the target, :func:`attention_shared_memory`,
:func:`decoder_shared_memory`). :func:`blocks_per_sm`
applies the limits of :data:`SM_LIMITS`; :func:`kernel_rows` adds, per kernel at the benchmark
workloads, the grid size in waves of a full H100 and the roofline floor of its pass on an H100
(:mod:`dreamportrait.roofline`). ``python -m dreamportrait.occupancy`` prints BENCHMARKS.md's table
(sm_80 and sm_90 rows).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass

import torch

from . import roofline, workloads


@dataclass(frozen=True)
class SmLimits:
    """Per-SM limits of a compute capability (CUDA C Programming Guide, "Compute Capabilities")."""

    threads: int  # resident threads per SM
    blocks: int  # resident blocks per SM
    registers: int  # 32-bit registers per SM
    shared: int  # shared memory per SM usable by blocks (bytes)
    shared_per_block: int  # the most one block may opt in to
    # 1 KiB of shared memory per block is reserved for the system; cuobjdump counts it in a sm_90
    # kernel's static shared memory, not in a sm_80/sm_86 one's.
    reserved_counted: bool


SM_LIMITS = {
    80: SmLimits(2048, 32, 65536, 164 * 1024, 163 * 1024, False),
    86: SmLimits(1536, 16, 65536, 100 * 1024, 99 * 1024, False),
    90: SmLimits(2048, 32, 65536, 228 * 1024, 227 * 1024, True),
}
RESERVED_SHARED = 1024
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256
SHARED_GRANULE = 128
H100_SMS = 132
TABLE_ARCHS = (80, 90)  # A100 and H100/H200: BENCHMARKS.md's table


def blocks_per_sm(arch: int, registers: int, threads: int, static_shared: int, dynamic_shared: int = 0) -> int:
    """Resident blocks per SM: the fewest allowed by threads, registers, shared memory and blocks."""
    limits = SM_LIMITS[arch]
    warps = math.ceil(threads / 32)
    by_threads = limits.threads // (warps * 32)
    registers_per_warp = math.ceil(max(registers, 1) * 32 / REGISTER_GRANULE) * REGISTER_GRANULE
    by_registers = (limits.registers // registers_per_warp) // warps
    shared = static_shared + dynamic_shared + (0 if limits.reserved_counted else RESERVED_SHARED)
    shared = math.ceil(shared / SHARED_GRANULE) * SHARED_GRANULE
    by_shared = limits.shared // shared
    return min(by_threads, by_registers, by_shared, limits.blocks)


def occupancy(arch: int, blocks: int, threads: int) -> float:
    """Resident warps as a fraction of the SM's maximum."""
    return blocks * math.ceil(threads / 32) * 32 / SM_LIMITS[arch].threads


def attention_shared_memory(backward: bool, keys: int, dim: int, dtype: torch.dtype, arch: int) -> tuple[int, int, int]:
    """(block_q, block_k, dynamic shared bytes) the CUDA attention launcher picks on ``arch``."""
    block_q, block_k, _, _, shared = torch.ops.dreamportrait.attention_tile_shape(
        backward, keys, dim, dtype, SM_LIMITS[arch].shared_per_block)
    return block_q, block_k, shared


def decoder_shared_memory(backward: bool, channels: int, hidden: int, outputs: int, dtype: torch.dtype,
                          arch: int) -> tuple[int, int]:
    """(points per tile, dynamic shared bytes) the CUDA sample_and_decode launcher picks on ``arch``."""
    tile, shared = torch.ops.dreamportrait.sample_and_decode_tile_shape(
        backward, channels, hidden, outputs, dtype, SM_LIMITS[arch].shared_per_block)
    return tile, shared


# --- The extension's kernels ---------------------------------------------------------------------

ATTENTION_THREADS = 128  # attention_tiles.h kThreads
COMPOSITE_THREADS = 128  # composite_scan.h kThreads
COMPOSITE_RAYS_PER_BLOCK = 4
DECODER_THREADS = 256  # decoder_tiles.h kThreads
DECODER_BLOCKS_PER_SM = 4  # decoder_tiles.h kBlocksPerSm: the launcher's grid is at most this many per SM
OPS = ("gated_cross_attention", "composite_rays", "sample_and_decode")
_DTYPES = {"c10::Half": torch.float16, "c10::BFloat16": torch.bfloat16, "float": torch.float32, "double": torch.float64}
_PRODUCTS = {"TensorCoreGemm<16>": "tensor cores", "TensorCoreGemm<8>": "TF32 tensor cores", "ScalarGemm": "FMA"}


@dataclass(frozen=True)
class Kernel:
    """One kernel of the extension: its op, pass, dtype and (attention) tile products."""

    mangled: str
    op: str  # one of OPS
    backward: bool
    dtype: torch.dtype
    products: str | None


def demangle(name: str) -> str:
    return subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()


def identify(mangled: str) -> Kernel | None:
    """The attention, compositing and fused-decoder kernels; None for the others."""
    op = next((op for op in OPS if op in mangled), None)
    match = re.search(r"(forward|backward)_kernel<(.*)>\(", demangle(mangled)) if op else None
    if match is None:
        return None
    arguments = match.group(2).replace("dreamportrait::(anonymous namespace)::", "").replace(
        "dreamportrait::attention::tiles::", "")
    products = next((label for key, label in _PRODUCTS.items() if arguments.startswith(key)), None)
    dtype = next(d for name, d in _DTYPES.items() if re.search(rf"(^|, ){re.escape(name)},", arguments + ","))
    return Kernel(mangled, op, match.group(1) == "backward", dtype, products)


def tensor_core_archs(library: str | os.PathLike, mangled: str, cuobjdump: str) -> dict[int, bool]:
    """Per SASS architecture, whether the kernel holds a tensor-core instruction (HMMA; HGMMA on sm_90)."""
    sass = subprocess.run([cuobjdump, "-sass", "-fun", mangled, str(library)], capture_output=True, text=True).stdout
    found: dict[int, bool] = {}
    for section in re.split(r"^arch = ", sass, flags=re.MULTILINE)[1:]:
        arch = int(re.match(r"sm_(\d+)", section).group(1))
        if "Function :" in section:
            found[arch] = bool(re.search(r"\b(HMMA|HGMMA)\b", section))
    return found


@dataclass(frozen=True)
class Row:
    kernel: Kernel
    arch: int
    registers: int
    shared: int  # per block, static + dynamic
    blocks_per_sm: int
    occupancy: float
    grid: int  # blocks at the benchmark workload
    floor_us: float  # the pass's H100 roofline floor


def _attention_grid(backward: bool, block_q: int, block_k: int) -> int:
    w = workloads.ATTENTION_WORKLOADS[0]
    heads = w.batch * w.heads
    query_tiles = math.ceil(w.queries / block_q)
    if not backward:  # the forward aims at 8 blocks per SM, each taking several query tiles
        per_block = max(heads * query_tiles // (2 * 4 * H100_SMS), 1)
        return heads * math.ceil(query_tiles / per_block)
    key_tiles = math.ceil(w.keys / block_k)
    splits = min(max(math.ceil(4 * H100_SMS / (key_tiles * heads)), 1), query_tiles)
    return heads * key_tiles * splits


def _floor_us(kernel: Kernel) -> float:
    """The pass's floor: the forward's, or the backward's share of forward + backward."""
    if kernel.op == "gated_cross_attention":
        w = workloads.ATTENTION_WORKLOADS[0]
        cost = lambda backward: roofline.gated_cross_attention_cost(  # noqa: E731
            w.batch, w.heads, w.queries, w.keys, w.dim, kernel.dtype, backward)
    elif kernel.op == "sample_and_decode":
        w = workloads.DECODER_WORKLOADS[0]
        cost = lambda backward: roofline.sample_and_decode_cost(  # noqa: E731
            w.batch, w.rays_side ** 2 * w.samples, w.channels, w.resolution, w.hidden, w.outputs, kernel.dtype, backward)
    else:
        w = workloads.COMPOSITE_WORKLOADS[0]
        cost = lambda backward: roofline.composite_rays_cost(  # noqa: E731
            w.rays, w.samples, w.channels, kernel.dtype, backward)
    forward = cost(False).floor_seconds(roofline.H100, kernel.dtype)
    total = cost(True).floor_seconds(roofline.H100, kernel.dtype) if kernel.backward else 2 * forward
    return (total - forward) * 1e6 if kernel.backward else forward * 1e6


def kernel_rows(library: str | os.PathLike, resources: dict) -> list[Row]:
    """Rows for the attention, compositing and fused-decoder kernels in ``resources``
    (``compile_check.extension_kernels``)."""
    rows = []
    for (arch, mangled), r in sorted(resources.items(), key=lambda item: (item[0][1], item[0][0])):
        kernel = identify(mangled)
        if kernel is None or arch not in SM_LIMITS:
            continue
        if kernel.op == "gated_cross_attention":
            w = workloads.ATTENTION_WORKLOADS[0]
            block_q, block_k, dynamic = attention_shared_memory(kernel.backward, w.keys, w.dim, kernel.dtype, arch)
            threads, grid = ATTENTION_THREADS, _attention_grid(kernel.backward, block_q, block_k)
        elif kernel.op == "sample_and_decode":
            w = workloads.DECODER_WORKLOADS[0]
            tile, dynamic = decoder_shared_memory(kernel.backward, w.channels, w.hidden, w.outputs, kernel.dtype, arch)
            tiles = w.batch * math.ceil(w.rays_side ** 2 * w.samples / tile) if tile else 0
            threads, grid = DECODER_THREADS, min(tiles, DECODER_BLOCKS_PER_SM * H100_SMS)
        else:
            dynamic, threads = 0, COMPOSITE_THREADS
            grid = math.ceil(workloads.COMPOSITE_WORKLOADS[0].rays / COMPOSITE_RAYS_PER_BLOCK)
        blocks = blocks_per_sm(arch, r.registers, threads, r.shared, dynamic)
        rows.append(Row(kernel, arch, r.registers, r.shared + dynamic, blocks, occupancy(arch, blocks, threads), grid,
                        _floor_us(kernel)))
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| op | pass | dtype | products | arch | registers | shared / block (B) | blocks / SM | occupancy "
             "| blocks at the workload | H100 waves | H100 floor (µs) |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        k = row.kernel
        waves = row.grid / (row.blocks_per_sm * H100_SMS) if row.blocks_per_sm else math.inf
        lines.append(f"| {k.op} | {'bwd' if k.backward else 'fwd'} | {str(k.dtype).removeprefix('torch.')} "
                     f"| {k.products or '—'} | sm_{row.arch} | {row.registers} | {row.shared} | {row.blocks_per_sm} "
                     f"| {row.occupancy:.0%} | {row.grid} | {waves:.2f} | {row.floor_us:.1f} |")
    return "\n".join(lines)


def main() -> int:
    from . import _extension
    from .ops.triton import compile_check

    status = _extension.status()
    if not status.has_cuda:
        print("the extension was built without CUDA kernels")
        return 1
    rows = kernel_rows(status.path, compile_check.extension_kernels(status.path))
    print(table([row for row in rows if row.arch in TABLE_ARCHS]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
