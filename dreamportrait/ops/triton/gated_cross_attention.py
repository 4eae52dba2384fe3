"""Triton kernels of ``gated_cross_attention`` (semantics:
:func:`dreamportrait.ops.reference.gated_cross_attention`).

A program owns a block of query rows of one (batch, head) and walks the keys in blocks, masking
the ragged end of Lk and padded keys; scores and products use ``tl.dot`` (IEEE float32 for float32
inputs). The forward keeps an online softmax and stores the log-sum-exp per row; the backward
recomputes the probabilities, first for the ungated output A (for ``delta = dA . A`` and the gate
gradient), then for the gradients, adding dk, dv and dgate atomically in the accumulation type.
``tanh(gate)`` is computed by torch and passed in.
Any D up to 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 32
BLOCK_N = 32
MAX_D = 128


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


@triton.jit
def _tile(ptr, rows, row_mask, D, dims, dim_mask, ACC: tl.constexpr):
    """(len(rows), BLOCK_D) tile of a contiguous (., D) matrix, zeros outside."""
    return tl.load(ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0).to(ACC)


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
def _key_block(k_ptr, v_ptr, mask_ptr, b, bh, n0, Lk, D, dims, dim_mask, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """Keys n0 .. n0 + BLOCK_N of (batch, head) bh: their indices, which may be attended, and the
    key and value tiles (zeros past Lk)."""
    keys = n0 + tl.arange(0, BLOCK_N)
    base = bh.to(tl.int64) * Lk * D
    k = _tile(k_ptr + base, keys, keys < Lk, D, dims, dim_mask, ACC)
    v = _tile(v_ptr + base, keys, keys < Lk, D, dims, dim_mask, ACC)
    return keys, _key_mask(mask_ptr, b, keys, Lk, HAS_MASK), k, v


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, gate_ptr, mask_ptr, out_ptr, lse_ptr, H, Lq, Lk, D, scale_ptr,
    HAS_MASK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    scale, bh, b, h, queries, query_mask, dims, dim_mask = _query_block(scale_ptr, H, Lq, D, BLOCK_M, BLOCK_D)
    q = _tile(q_ptr + bh.to(tl.int64) * Lq * D, queries, query_mask, D, dims, dim_mask, ACC)
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for n0 in range(0, Lk, BLOCK_N):
        keys, key_mask, k, v = _key_block(k_ptr, v_ptr, mask_ptr, b, bh, n0, Lk, D, dims, dim_mask, HAS_MASK, ACC, BLOCK_N)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        scores = tl.where(key_mask[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with no key yet
        rescale = tl.exp(row_max - safe_max)
        p = tl.exp(scores - safe_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(ACC), v, input_precision=PRECISION)
        row_max = new_max
    gate_value = tl.load(gate_ptr + h).to(ACC)
    has_keys = row_sum > 0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, row_sum, 1.0)[:, None], 0.0) * gate_value
    tl.store(out_ptr + bh.to(tl.int64) * Lq * D + queries.to(tl.int64)[:, None] * D + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=query_mask[:, None] & dim_mask[None, :])
    lse = tl.where(has_keys, row_max + tl.log(tl.where(has_keys, row_sum, 1.0)), float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + queries, lse, mask=query_mask)


@triton.jit
def _probabilities(q, k, key_mask, lse, scale, PRECISION: tl.constexpr):
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
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
    q = _tile(q_ptr + row_base, queries, query_mask, D, dims, dim_mask, ACC)
    grad = _tile(grad_ptr + row_base, queries, query_mask, D, dims, dim_mask, ACC)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * Lq + queries, mask=query_mask, other=float("-inf")).to(ACC)
    gate_value = tl.load(gate_ptr + h).to(ACC)
    # Ungated output A = P v.
    attended = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for n0 in range(0, Lk, BLOCK_N):
        keys, key_mask, k, v = _key_block(k_ptr, v_ptr, mask_ptr, b, bh, n0, Lk, D, dims, dim_mask, HAS_MASK, ACC, BLOCK_N)
        p = _probabilities(q, k, key_mask, lse, scale, PRECISION)
        attended += tl.dot(p, v, input_precision=PRECISION)
    d_attended = gate_value * grad
    delta = tl.sum(d_attended * attended, axis=1)
    tl.atomic_add(dgate_ptr + h, (1.0 - gate_value * gate_value) * tl.sum(tl.sum(grad * attended, axis=1), axis=0))
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=ACC)
    for n0 in range(0, Lk, BLOCK_N):
        keys, key_mask, k, v = _key_block(k_ptr, v_ptr, mask_ptr, b, bh, n0, Lk, D, dims, dim_mask, HAS_MASK, ACC, BLOCK_N)
        p = _probabilities(q, k, key_mask, lse, scale, PRECISION)
        dp = tl.dot(d_attended, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k, input_precision=PRECISION) * scale
        offsets = bh.to(tl.int64) * Lk * D + keys.to(tl.int64)[:, None] * D + dims[None, :]
        tile_mask = (keys < Lk)[:, None] & dim_mask[None, :]
        tl.atomic_add(dk_ptr + offsets, tl.dot(tl.trans(ds), q, input_precision=PRECISION) * scale, mask=tile_mask)
        tl.atomic_add(dv_ptr + offsets, tl.dot(tl.trans(p), d_attended, input_precision=PRECISION), mask=tile_mask)
    tl.store(dq_ptr + row_base + queries.to(tl.int64)[:, None] * D + dims[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=query_mask[:, None] & dim_mask[None, :])


def _launch_arguments(q: Tensor, gate: Tensor, key_padding_mask: Tensor | None, scale: float) -> dict:
    if q.shape[3] > MAX_D:
        raise ValueError(f"gated_cross_attention: the triton backend supports D <= {MAX_D}, got {q.shape[3]}")
    accumulation = _accumulation_dtype(q.dtype)
    return dict(
        # tanh of the gate from torch (exact), and the scale as a tensor: Triton would pass a Python
        # float as float32 even for float64 inputs.
        gate_ptr=torch.tanh(gate.to(accumulation)).contiguous(),
        mask_ptr=_mask_argument(q, key_padding_mask),
        scale_ptr=torch.full((1,), scale, dtype=accumulation, device=q.device),
        HAS_MASK=key_padding_mask is not None,
        ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
        PRECISION=_precision(q.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(q.shape[3])),
    )


def _mask_argument(q: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    # A dummy pointer when there is no mask (never read: HAS_MASK is a compile-time constant).
    return q.new_empty((1,), dtype=torch.int8) if key_padding_mask is None else key_padding_mask.contiguous().to(torch.int8)


def forward(q: Tensor, k: Tensor, v: Tensor, gate: Tensor, key_padding_mask: Tensor | None, scale: float):
    batch, heads, queries, dim = q.shape
    keys = k.shape[2]
    out = q.new_empty(q.shape)
    lse = q.new_empty((batch, heads, queries), dtype=_accumulation_dtype(q.dtype))
    if lse.numel() > 0:
        _forward_kernel[(triton.cdiv(queries, BLOCK_M), batch * heads)](
            q_ptr=q.contiguous(), k_ptr=k.contiguous(), v_ptr=v.contiguous(), out_ptr=out, lse_ptr=lse,
            H=heads, Lq=queries, Lk=keys, D=dim, **_launch_arguments(q, gate, key_padding_mask, scale),
        )
    return out, lse


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, key_padding_mask: Tensor | None,
             lse: Tensor, scale: float):
    batch, heads, queries, dim = q.shape
    keys = k.shape[2]
    accumulation = _accumulation_dtype(q.dtype)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = k.new_zeros(k.shape, dtype=accumulation)
    dv = v.new_zeros(v.shape, dtype=accumulation)
    dgate = gate.new_zeros(gate.shape, dtype=accumulation)
    if q.numel() > 0:
        _backward_kernel[(triton.cdiv(queries, BLOCK_M), batch * heads)](
            grad_ptr=grad_out.contiguous(), q_ptr=q.contiguous(), k_ptr=k.contiguous(), v_ptr=v.contiguous(),
            lse_ptr=lse.contiguous(), dq_ptr=dq, dk_ptr=dk, dv_ptr=dv, dgate_ptr=dgate,
            H=heads, Lq=queries, Lk=keys, D=dim, **_launch_arguments(q, gate, key_padding_mask, scale),
        )
    return dq, dk.to(q.dtype), dv.to(q.dtype), dgate.to(q.dtype)
