"""Triton kernels of ``gated_cross_attention`` (semantics:
:func:`dreamportrait.ops.reference.gated_cross_attention`).

A program owns a block of query rows of one (batch, head) and walks the keys in blocks, masking
the ragged end of Lk and padded keys. Scores and products are ``tl.dot`` on the inputs' own dtype
with float32 accumulation: tensor cores for float16/bfloat16; for float32, TF32 tensor cores when
torch allows TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``, i.e.
``torch.set_float32_matmul_precision("high")``) and IEEE float32 otherwise; float64 in float64.
Probabilities are rounded to the inputs' dtype before the product with V, as in FlashAttention.

The forward keeps an online softmax and stores the log-sum-exp per row; the backward recomputes
the probabilities, first for the ungated output A (for ``delta = dA . A`` and the gate gradient),
then for the gradients: dq is written once per query block, dk, dv and dgate are added with one
atomic per element per block. ``tanh(gate)`` is computed by torch and passed in.

A row attends to nothing only when every key is masked (it outputs zeros); a NaN or inf in q, k
or v reaches every output that depends on it, as in the reference. Any D up to 256; tile sizes
depend on the dtype and D (:func:`tiles`) so that no kernel spills registers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from .arguments import check_attention, check_attention_gradients
from .common import accumulation_dtype, accumulation_type, precision
from .launch import launch

OP = "gated_cross_attention_triton"

MAX_D = 256


class Tiles(NamedTuple):
    """Query rows and keys per block, warps per program, and the software-pipelining depth of the
    loop over key blocks."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def tiles(dtype: torch.dtype, dim: int, backward: bool) -> Tiles:
    """Tile sizes for ``dtype`` and head dim ``dim``, chosen with the compile gate
    (:mod:`dreamportrait.ops.triton.compile_check`) so that no float32/16 kernel spills on
    sm_80/90/100 and every kernel fits the shared memory of each.

    Without tensor cores (IEEE float32, float64) a product keeps both operands in registers, so
    those tiles are small. The backward holds five ``(BLOCK_M, D)`` tiles per program, the forward
    two. Pipelining the key loop (``num_stages`` 3) buffers K/V blocks in registers and shared
    memory; with text keys (Lk <= 77: three to five key blocks) it buys little, and where the
    backward spills with it, it runs one stage (:data:`_BACKWARD_STAGES`). Float64 (a gradcheck
    tool) always runs one stage, the only way its D = 256 tiles fit sm_80's shared memory."""
    block_d = _block_d(dim)
    half = dtype in (torch.float16, torch.bfloat16)
    # 8 warps for wide heads, and for the half backward's narrow ones (8 bytes spilled on sm_80
    # with 4).
    warps = 8 if block_d > 64 or (half and backward and block_d <= 32) else 4
    if not half:
        block_m, block_n = 16, 16
    elif backward:
        block_m, block_n = (16 if block_d == 256 else 32), 32
    else:
        block_m, block_n = 64, 32
    if dtype == torch.float64:
        stages = 1
    elif backward:
        stages = _BACKWARD_STAGES["half" if half else "float32"][block_d]
    else:
        stages = 3
    return Tiles(block_m, block_n, warps, stages)


# The backward's pipelining depth per BLOCK_D: the deepest that the compile gate found spill-free
# on sm_80/90/100 (the register allocator's choices are not monotonic in it).
_BACKWARD_STAGES = {"float32": {16: 3, 32: 1, 64: 1, 128: 1, 256: 3}, "half": {16: 3, 32: 3, 64: 1, 128: 1, 256: 1}}


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


@triton.jit
def _tile(ptr, rows, row_mask, D, dims, dim_mask):
    """(len(rows), BLOCK_D) tile of a contiguous (., D) matrix in its own dtype, zeros outside."""
    return tl.load(ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :],
                   other=0.0)


@triton.jit
def _key_mask(mask_ptr, b, keys, Lk, HAS_MASK: tl.constexpr):
    valid = keys < Lk
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + b * Lk + keys, mask=keys < Lk, other=0) != 0)
    return valid


@triton.jit
def _query_block(scale_ptr, H, Lq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """The scale, this program's (batch, head) and its block of query rows and head channels
    (grid: query blocks, B * H)."""
    bh = tl.program_id(1)
    queries = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    return tl.load(scale_ptr), bh, bh // H, bh % H, queries, queries < Lq, dims, dims < D


@triton.jit
def _key_block(k_ptr, v_ptr, mask_ptr, b, bh, n0, Lk, D, dims, dim_mask, HAS_MASK: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Keys n0 .. n0 + BLOCK_N of (batch, head) bh: their indices, which may be attended, and the
    key and value tiles (zeros past Lk)."""
    keys = n0 + tl.arange(0, BLOCK_N)
    base = bh.to(tl.int64) * Lk * D
    k = _tile(k_ptr + base, keys, keys < Lk, D, dims, dim_mask)
    v = _tile(v_ptr + base, keys, keys < Lk, D, dims, dim_mask)
    return keys, _key_mask(mask_ptr, b, keys, Lk, HAS_MASK), k, v


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, mask_ptr, out_ptr, lse_ptr, H, Lq, Lk, D, scale_ptr,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale, bh, b, h, queries, query_mask, dims, dim_mask = _query_block(scale_ptr, H, Lq, D, BLOCK_M, BLOCK_D)
    q = _tile(q_ptr + bh.to(tl.int64) * Lq * D, queries, query_mask, D, dims, dim_mask)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    # Whether the row attends to any key, from the mask alone, never from the scores: a NaN score
    # must give NaN, not look like a row with nothing to attend to.
    attended_keys = 0
    for n0 in range(0, Lk, BLOCK_N):
        keys, key_mask, k, v = _key_block(k_ptr, v_ptr, mask_ptr, b, bh, n0, Lk, D, dims, dim_mask, HAS_MASK, BLOCK_N)
        attended_keys += tl.sum(key_mask.to(tl.int32), axis=0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * scale
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with no key yet
        rescale = tl.exp(row_max - safe_max)
        p = tl.exp(scores - safe_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
        row_max = new_max
    gate_value = tl.load(gate_ptr + h).to(ACC)
    has_keys = attended_keys > 0
    out = tl.where(has_keys, acc / tl.where(has_keys, row_sum, 1.0)[:, None], 0.0) * gate_value
    tl.store(out_ptr + bh.to(tl.int64) * Lq * D + queries.to(tl.int64)[:, None] * D + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=query_mask[:, None] & dim_mask[None, :])
    lse = tl.where(has_keys, row_max + tl.log(tl.where(has_keys, row_sum, 1.0)), float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + queries, lse, mask=query_mask)


@triton.jit
def _probabilities(q, k, key_mask, lse, scale, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Softmax probabilities of the block from the saved log-sum-exp (-inf: no key, all zeros)."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC) * scale
    usable = key_mask[None, :] & (lse != float("-inf"))[:, None]
    return tl.where(usable, tl.exp(scores - tl.where(usable, lse[:, None], 0.0)), 0.0)


@triton.jit
def _backward_kernel(
    grad_ptr, q_ptr, k_ptr, v_ptr, gate_ptr, mask_ptr, lse_ptr, dq_ptr, dk_ptr, dv_ptr, dgate_ptr,
    H, Lq, Lk, D, scale_ptr,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale, bh, b, h, queries, query_mask, dims, dim_mask = _query_block(scale_ptr, H, Lq, D, BLOCK_M, BLOCK_D)
    row_base = bh.to(tl.int64) * Lq * D
    q = _tile(q_ptr + row_base, queries, query_mask, D, dims, dim_mask)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * Lq + queries, mask=query_mask, other=float("-inf")).to(ACC)
    gate_value = tl.load(gate_ptr + h).to(ACC)
    # Ungated output A = P v.
    attended = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for n0 in range(0, Lk, BLOCK_N):
        keys, key_mask, k, v = _key_block(k_ptr, v_ptr, mask_ptr, b, bh, n0, Lk, D, dims, dim_mask, HAS_MASK, BLOCK_N)
        p = _probabilities(q, k, key_mask, lse, scale, ACC, PRECISION)
        attended += tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=ACC)
    grad = _tile(grad_ptr + row_base, queries, query_mask, D, dims, dim_mask).to(ACC)
    tl.atomic_add(dgate_ptr + h, (1.0 - gate_value * gate_value) * tl.sum(tl.sum(grad * attended, axis=1), axis=0))
    d_attended = gate_value * grad
    delta = tl.sum(d_attended * attended, axis=1)
    d_attended = d_attended.to(q.dtype)  # an operand of the products below, in the inputs' dtype
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for n0 in range(0, Lk, BLOCK_N):
        keys, key_mask, k, v = _key_block(k_ptr, v_ptr, mask_ptr, b, bh, n0, Lk, D, dims, dim_mask, HAS_MASK, BLOCK_N)
        p = _probabilities(q, k, key_mask, lse, scale, ACC, PRECISION)
        dp = tl.dot(d_attended, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        # A key of probability 0 (masked) gets no gradient even where dp or delta is not finite.
        ds = tl.where(p == 0.0, 0.0, p * (dp - delta[:, None]) * scale).to(q.dtype)
        dq += tl.dot(ds, k, input_precision=PRECISION, out_dtype=ACC)
        offsets = bh.to(tl.int64) * Lk * D + keys.to(tl.int64)[:, None] * D + dims[None, :]
        tile_mask = (keys < Lk)[:, None] & dim_mask[None, :]
        tl.atomic_add(dk_ptr + offsets, tl.dot(tl.trans(ds), q, input_precision=PRECISION, out_dtype=ACC),
                      mask=tile_mask)
        tl.atomic_add(dv_ptr + offsets, tl.dot(tl.trans(p.to(q.dtype)), d_attended, input_precision=PRECISION,
                                               out_dtype=ACC), mask=tile_mask)
    tl.store(dq_ptr + row_base + queries.to(tl.int64)[:, None] * D + dims[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=query_mask[:, None] & dim_mask[None, :])


def _launch_arguments(q: Tensor, gate: Tensor, key_padding_mask: Tensor | None, scale: float, backward: bool) -> dict:
    if q.shape[3] > MAX_D:
        raise ValueError(f"gated_cross_attention: the triton backend supports D <= {MAX_D}, got {q.shape[3]}")
    accumulation = accumulation_dtype(q.dtype)
    block_m, block_n, num_warps, num_stages = tiles(q.dtype, q.shape[3], backward)
    return dict(
        # tanh of the gate from torch (exact), and the scale as a tensor: Triton would pass a Python
        # float as float32 even for float64 inputs.
        gate_ptr=torch.tanh(gate.to(accumulation)).contiguous(),
        mask_ptr=_mask_argument(q, key_padding_mask),
        scale_ptr=torch.full((1,), scale, dtype=accumulation, device=q.device),
        HAS_MASK=key_padding_mask is not None,
        ACC=accumulation_type(q.dtype),
        PRECISION=precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(q.shape[3]), num_warps=num_warps,
        num_stages=num_stages,
    )


def _mask_argument(q: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    # A dummy pointer when there is no mask (never read: HAS_MASK is a compile-time constant). The
    # mask goes in as int32: with an 8-bit load in the kernel, Triton lays the float64 products out
    # for 8-bit operands, which its float64 tensor-core lowering rejects ("fp64 don't support
    # largeK MMA"). The mask is B * Lk values, so the width costs nothing.
    if key_padding_mask is None:
        return q.new_empty((1,), dtype=torch.int32)
    return key_padding_mask.contiguous().to(torch.int32)


def forward(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, key_padding_mask: Tensor | None, scale: float):
    check_attention(OP, q, k, v, gate, key_padding_mask, scale)
    batch, heads, queries, dim = q.shape
    keys = k.shape[2]
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, heads, queries), dtype=accumulation_dtype(q.dtype))
    if lse.numel() > 0:
        arguments = _launch_arguments(q, gate, key_padding_mask, scale, backward=False)
        launch(
            _forward_kernel, (triton.cdiv(queries, arguments["BLOCK_M"]), batch * heads),
            q_ptr=q.contiguous(), k_ptr=k.contiguous(), v_ptr=v.contiguous(), out_ptr=out, lse_ptr=lse,
            H=heads, Lq=queries, Lk=keys, D=dim, **arguments,
        )
    return out, lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, key_padding_mask: Tensor | None,
             lse: Tensor, scale: float):
    check_attention(OP + "_backward", q, k, v, gate, key_padding_mask, scale)
    check_attention_gradients(OP + "_backward", q, grad_out, lse, accumulation_dtype(q.dtype))
    batch, heads, queries, dim = q.shape
    keys = k.shape[2]
    accumulation = accumulation_dtype(q.dtype)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = k.new_zeros(k.shape, dtype=accumulation)
    dv = v.new_zeros(v.shape, dtype=accumulation)
    dgate = gate.new_zeros(gate.shape, dtype=accumulation)
    if q.numel() > 0:
        arguments = _launch_arguments(q, gate, key_padding_mask, scale, backward=True)
        launch(
            _backward_kernel, (triton.cdiv(queries, arguments["BLOCK_M"]), batch * heads),
            grad_ptr=grad_out.contiguous(), q_ptr=q.contiguous(), k_ptr=k.contiguous(), v_ptr=v.contiguous(),
            lse_ptr=lse.contiguous(), dq_ptr=dq, dk_ptr=dk, dv_ptr=dv, dgate_ptr=dgate,
            H=heads, Lq=queries, Lk=keys, D=dim, **arguments,
        )
    return dq, dk.to(q.dtype), dv.to(q.dtype), dgate.to(q.dtype)
