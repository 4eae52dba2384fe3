"""Triton kernels of ``sample_and_decode`` (semantics: :func:`dreamportrait.ops.sample_and_decode.reference`).

A program owns a block of points of one batch element: it samples their mean features (planes
read channel-innermost, as ``triplane_sample``'s kernels do), runs the two layers as ``tl.dot``
through the hidden layer in chunks of ``HIDDEN_BLOCK`` units (operands in the inputs' dtype with
float32 sums: tensor cores for float16/bfloat16, TF32 for float32 when torch allows TF32 matmuls,
else IEEE float32), and writes only the ``(BLOCK_N, O)`` output. The backward recomputes a block's
activations, adds its weight and bias gradients with one atomic add per element per block, scatters
the plane gradient with atomic adds into a ``(B, 3, H, W, C)`` buffer in the accumulation type, and
writes the point gradients.
Channels and hidden units must be powers of two from 16 to 128, outputs at most 128 (EG3D: 32, 64,
33); :func:`supported` says whether a call fits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .arguments import check_decoder
from .common import accumulation_dtype, accumulation_type, precision
from .launch import launch
from .triplane_sample import _corner, _load_point, _on_axis, _plane_taps

# Points per program (64 spilled registers on sm_80 and sm_100: the compile gate).
BLOCK_N = 32
# Hidden units per chunk: the hidden layer is computed (and, in the backward, differentiated)
# 16 units at a time, so a program never holds a (BLOCK_N, K) activation, nor a whole weight.
HIDDEN_BLOCK = 16


def _power_of_two(n: int) -> bool:
    return 16 <= n <= 128 and n & (n - 1) == 0


def supported(channels: int, hidden: int, outputs: int) -> bool:
    return _power_of_two(channels) and _power_of_two(hidden) and 2 <= outputs <= 128


@triton.jit
def _mean_features(planes_ptr, b, px, py, pz, n_mask, c, scale, H, W, C: tl.constexpr,
                   A0: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, A3: tl.constexpr, A4: tl.constexpr,
                   A5: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    acc = tl.zeros((BLOCK_N, C), dtype=ACC)
    for plane in tl.static_range(3):
        U = A0 if plane == 0 else (A2 if plane == 1 else A4)
        V = A1 if plane == 0 else (A3 if plane == 1 else A5)
        x0, y0, fx, fy, in_bounds, poison = _plane_taps(px, py, pz, scale, H, W, U, V)
        base = planes_ptr + (b * 3 + plane).to(tl.int64) * H * W * C
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                pixel, weight, valid = _corner(x0, y0, fx, fy, in_bounds & n_mask, H, W, dy, dx)
                values = tl.load(base + pixel[:, None] * C + c[None, :], mask=valid[:, None], other=0.0)
                acc += weight[:, None] * values.to(ACC)
        acc += poison[:, None]
    return acc / 3.0


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, ACC: tl.constexpr, OPERAND: tl.constexpr):
    """a @ b with both operands in OPERAND, the inputs' dtype (float16/bfloat16 tensor cores, as a
    float16 ``nn.Linear`` would multiply), accumulated in ACC."""
    return tl.dot(a.to(OPERAND), b.to(OPERAND), input_precision=PRECISION, out_dtype=ACC)


@triton.jit
def _hidden_units(features, w1t_ptr, b1_ptr, c, j, K: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Pre-activations and softplus of hidden units ``j`` (one chunk) for a block of mean features,
    each ``(BLOCK_N, HIDDEN_BLOCK)``, and the chunk's first-layer weights ``(C, HIDDEN_BLOCK)``."""
    w1t = tl.load(w1t_ptr + c[:, None] * K + j[None, :])
    pre = _dot(features, w1t, PRECISION, ACC, w1t_ptr.dtype.element_ty) + tl.load(b1_ptr + j).to(ACC)[None, :]
    hidden = tl.where(pre > 20.0, pre, tl.maximum(pre, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(pre))))
    return pre, hidden, w1t


@triton.jit
def _raw_outputs(features, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, c, o, o_mask, O, K: tl.constexpr, ACC: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, HIDDEN_BLOCK: tl.constexpr):
    """The decoder's raw outputs ``(BLOCK_N, BLOCK_O)`` for a block of mean features, through the
    hidden layer in chunks of HIDDEN_BLOCK units: only a chunk of hidden activations is ever held."""
    raw = tl.zeros((BLOCK_N, BLOCK_O), dtype=ACC) + tl.load(b2_ptr + o, mask=o_mask, other=0.0).to(ACC)[None, :]
    for k0 in range(0, K, HIDDEN_BLOCK):
        j = k0 + tl.arange(0, HIDDEN_BLOCK)
        _, hidden, _ = _hidden_units(features, w1t_ptr, b1_ptr, c, j, K, ACC, PRECISION)
        w2t = tl.load(w2t_ptr + j[:, None] * O + o[None, :], mask=o_mask[None, :], other=0.0)  # (HIDDEN_BLOCK, BLOCK_O)
        raw += _dot(hidden, w2t, PRECISION, ACC, w2t_ptr.dtype.element_ty)
    return raw


@triton.jit
def _forward_kernel(
    planes_ptr, points_ptr, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, out_ptr, N, H, W, O, scale_ptr,
    A0: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, A3: tl.constexpr, A4: tl.constexpr, A5: tl.constexpr,
    C: tl.constexpr, K: tl.constexpr, BLOCK_O: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, HIDDEN_BLOCK: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    b = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = b.to(tl.int64) * N + n
    c, o = tl.arange(0, C), tl.arange(0, BLOCK_O)
    o_mask = o < O
    px, py, pz = _load_point(points_ptr, rows, n_mask, ACC)
    features = _mean_features(planes_ptr, b, px, py, pz, n_mask, c, scale, H, W, C, A0, A1, A2, A3, A4, A5, ACC,
                              BLOCK_N)
    raw = _raw_outputs(features, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, c, o, o_mask, O, K, ACC, PRECISION, BLOCK_N,
                       BLOCK_O, HIDDEN_BLOCK)
    colour = 1.0 / (1.0 + tl.exp(-raw)) * 1.002 - 0.001
    out = tl.where(o[None, :] == 0, raw, colour)
    tl.store(out_ptr + rows[:, None] * O + o[None, :], out.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & o_mask[None, :])


@triton.jit
def _backward_kernel(
    grad_ptr, planes_ptr, points_ptr, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr,
    grad_planes_ptr, grad_points_ptr, gw1t_ptr, gb1_ptr, gw2t_ptr, gb2_ptr, N, H, W, O, scale_ptr,
    A0: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, A3: tl.constexpr, A4: tl.constexpr, A5: tl.constexpr,
    C: tl.constexpr, K: tl.constexpr, BLOCK_O: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    NEEDS_PLANES: tl.constexpr, NEEDS_POINTS: tl.constexpr, BLOCK_N: tl.constexpr, HIDDEN_BLOCK: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    b = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = b.to(tl.int64) * N + n
    c, o = tl.arange(0, C), tl.arange(0, BLOCK_O)
    o_mask = o < O
    px, py, pz = _load_point(points_ptr, rows, n_mask, ACC)
    features = _mean_features(planes_ptr, b, px, py, pz, n_mask, c, scale, H, W, C, A0, A1, A2, A3, A4, A5, ACC,
                              BLOCK_N)
    raw = _raw_outputs(features, w1t_ptr, b1_ptr, w2t_ptr, b2_ptr, c, o, o_mask, O, K, ACC, PRECISION, BLOCK_N,
                       BLOCK_O, HIDDEN_BLOCK)
    # Rows past N load a zero gradient, so they add nothing below.
    grad = tl.load(grad_ptr + rows[:, None] * O + o[None, :], mask=n_mask[:, None] & o_mask[None, :],
                   other=0.0).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-raw))
    grad_raw = tl.where(o[None, :] == 0, grad, grad * 1.002 * s * (1.0 - s))
    tl.atomic_add(gb2_ptr + o, tl.sum(grad_raw, axis=0), mask=o_mask)
    # The hidden layer's backward chunk by chunk, its activations recomputed: each chunk adds its
    # rows of the second layer's weight gradient, its columns of the first's, and its share of the
    # features' gradient.
    grad_features = tl.zeros((BLOCK_N, C), dtype=ACC)
    for k0 in range(0, K, HIDDEN_BLOCK):
        j = k0 + tl.arange(0, HIDDEN_BLOCK)
        pre, hidden, w1t = _hidden_units(features, w1t_ptr, b1_ptr, c, j, K, ACC, PRECISION)
        tl.atomic_add(gw2t_ptr + j[:, None] * O + o[None, :],
                      _dot(tl.trans(hidden), grad_raw, PRECISION, ACC, w2t_ptr.dtype.element_ty), mask=o_mask[None, :])
        w2t = tl.load(w2t_ptr + j[:, None] * O + o[None, :], mask=o_mask[None, :], other=0.0)
        grad_hidden = _dot(grad_raw, tl.trans(w2t), PRECISION, ACC, w2t_ptr.dtype.element_ty)
        grad_pre = grad_hidden * tl.where(pre > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-pre)))
        tl.atomic_add(gw1t_ptr + c[:, None] * K + j[None, :],
                      _dot(tl.trans(features), grad_pre, PRECISION, ACC, w1t_ptr.dtype.element_ty))
        tl.atomic_add(gb1_ptr + j, tl.sum(grad_pre, axis=0))
        grad_features += _dot(grad_pre, tl.trans(w1t), PRECISION, ACC, w1t_ptr.dtype.element_ty)
    # Gradient of each plane's sample (the mean's 1/3 included).
    grad_sample = grad_features / 3.0
    gx = tl.zeros((BLOCK_N,), dtype=ACC)
    gy = tl.zeros((BLOCK_N,), dtype=ACC)
    gz = tl.zeros((BLOCK_N,), dtype=ACC)
    for plane in tl.static_range(3):
        U = A0 if plane == 0 else (A2 if plane == 1 else A4)
        V = A1 if plane == 0 else (A3 if plane == 1 else A5)
        x0, y0, fx, fy, in_bounds, poison = _plane_taps(px, py, pz, scale, H, W, U, V)
        base = planes_ptr + (b * 3 + plane).to(tl.int64) * H * W * C
        grad_base = grad_planes_ptr + (b * 3 + plane).to(tl.int64) * H * W * C
        p00, w00, m00 = _corner(x0, y0, fx, fy, in_bounds & n_mask, H, W, 0, 0)
        p01, w01, m01 = _corner(x0, y0, fx, fy, in_bounds & n_mask, H, W, 0, 1)
        p10, w10, m10 = _corner(x0, y0, fx, fy, in_bounds & n_mask, H, W, 1, 0)
        p11, w11, m11 = _corner(x0, y0, fx, fy, in_bounds & n_mask, H, W, 1, 1)
        if NEEDS_PLANES:
            tl.atomic_add(grad_base + p00[:, None] * C + c[None, :], w00[:, None] * grad_sample, mask=m00[:, None])
            tl.atomic_add(grad_base + p01[:, None] * C + c[None, :], w01[:, None] * grad_sample, mask=m01[:, None])
            tl.atomic_add(grad_base + p10[:, None] * C + c[None, :], w10[:, None] * grad_sample, mask=m10[:, None])
            tl.atomic_add(grad_base + p11[:, None] * C + c[None, :], w11[:, None] * grad_sample, mask=m11[:, None])
        if NEEDS_POINTS:
            v00 = tl.load(base + p00[:, None] * C + c[None, :], mask=m00[:, None], other=0.0)
            d00 = tl.sum(grad_sample * v00.to(ACC), axis=1)
            v01 = tl.load(base + p01[:, None] * C + c[None, :], mask=m01[:, None], other=0.0)
            d01 = tl.sum(grad_sample * v01.to(ACC), axis=1)
            v10 = tl.load(base + p10[:, None] * C + c[None, :], mask=m10[:, None], other=0.0)
            d10 = tl.sum(grad_sample * v10.to(ACC), axis=1)
            v11 = tl.load(base + p11[:, None] * C + c[None, :], mask=m11[:, None], other=0.0)
            d11 = tl.sum(grad_sample * v11.to(ACC), axis=1)
            d_du = ((d01 - d00) * (1.0 - fy) + (d11 - d10) * fy + poison) * (W * 0.5) * scale
            d_dv = ((d10 - d00) * (1.0 - fx) + (d11 - d01) * fx + poison) * (H * 0.5) * scale
            gx += _on_axis(d_du, U, 0) + _on_axis(d_dv, V, 0)
            gy += _on_axis(d_du, U, 1) + _on_axis(d_dv, V, 1)
            gz += _on_axis(d_du, U, 2) + _on_axis(d_dv, V, 2)
    if NEEDS_POINTS:
        out_ty = grad_points_ptr.dtype.element_ty
        tl.store(grad_points_ptr + rows * 3 + 0, gx.to(out_ty), mask=n_mask)
        tl.store(grad_points_ptr + rows * 3 + 1, gy.to(out_ty), mask=n_mask)
        tl.store(grad_points_ptr + rows * 3 + 2, gz.to(out_ty), mask=n_mask)


def backward_options(dtype: torch.dtype) -> dict:
    """Compile options of the backward, chosen with the compile gate: one stage (the hidden-chunk
    loop has K / 16 iterations; pipelining it only holds the next chunk's weights in registers);
    8 warps for float32 and float64, whose products without tensor cores hold their operands in
    registers (4 spilled on sm_80 and sm_100), and 4 for float16/bfloat16 (8 spilled on sm_100)."""
    return dict(num_warps=4 if dtype in (torch.float16, torch.bfloat16) else 8, num_stages=1)


def _common(planes: Tensor, points: Tensor, box_warp: float, axes: list[int], weight1: Tensor, weight2: Tensor) -> dict:
    accumulation = accumulation_dtype(planes.dtype)
    return dict(
        # A tensor, not a Python float: Triton would pass a float as float32 even for float64 inputs.
        scale_ptr=torch.full((1,), 2.0 / box_warp, dtype=accumulation, device=planes.device),
        **{f"A{i}": int(a) for i, a in enumerate(axes)},
        C=planes.shape[2], K=weight1.shape[0], BLOCK_O=max(16, triton.next_power_of_2(weight2.shape[0])),
        ACC=accumulation_type(planes.dtype), PRECISION=precision(planes.dtype), BLOCK_N=BLOCK_N,
        HIDDEN_BLOCK=HIDDEN_BLOCK,
    )


def _check(op: str, planes: Tensor, weight1: Tensor, weight2: Tensor) -> None:
    if not supported(planes.shape[2], weight1.shape[0], weight2.shape[0]):
        raise ValueError(f"{op}: the Triton kernel needs channels and hidden units that are powers of two from 16 to "
                         f"128 and at most 128 outputs; got C={planes.shape[2]}, K={weight1.shape[0]}, "
                         f"O={weight2.shape[0]}")


def _operands(planes, points, weight1, bias1, weight2, bias2):
    return (planes.permute(0, 1, 3, 4, 2).contiguous(), points.contiguous(), weight1.t().contiguous(),
            bias1.contiguous(), weight2.t().contiguous(), bias2.contiguous())


def forward(planes: Tensor, points: Tensor, box_warp: float, axes: list[int], weight1: Tensor, bias1: Tensor,
            weight2: Tensor, bias2: Tensor) -> Tensor:
    check_decoder("sample_and_decode_triton", planes, points, box_warp, axes, weight1, bias1, weight2, bias2)
    _check("sample_and_decode_triton", planes, weight1, weight2)
    batch, count, outputs = planes.shape[0], points.shape[1], weight2.shape[0]
    out = planes.new_empty((batch, count, outputs))
    if out.numel() == 0:
        return out
    launch(_forward_kernel, (triton.cdiv(count, BLOCK_N), batch),
           *_operands(planes, points, weight1, bias1, weight2, bias2), out, count, planes.shape[3], planes.shape[4],
           outputs, **_common(planes, points, box_warp, axes, weight1, weight2))
    return out


def backward(grad_output: Tensor, planes: Tensor, points: Tensor, box_warp: float, axes: list[int], weight1: Tensor,
             bias1: Tensor, weight2: Tensor, bias2: Tensor, needs_planes: bool, needs_points: bool):
    check_decoder("sample_and_decode_triton_backward", planes, points, box_warp, axes, weight1, bias1, weight2, bias2,
                  grad_output)
    _check("sample_and_decode_triton_backward", planes, weight1, weight2)
    batch, _, channels, height, width = planes.shape
    count, outputs = points.shape[1], weight2.shape[0]
    accumulation = accumulation_dtype(planes.dtype)
    grad_planes = planes.new_zeros((batch, 3, height, width, channels) if needs_planes else (1,), dtype=accumulation)
    grad_points = points.new_zeros(points.shape if needs_points else (1,))
    sums = [weight1.new_zeros(weight1.shape[::-1], dtype=accumulation),
            bias1.new_zeros(bias1.shape, dtype=accumulation),
            weight2.new_zeros(weight2.shape[::-1], dtype=accumulation),
            bias2.new_zeros(bias2.shape, dtype=accumulation)]
    if batch * count > 0:
        launch(_backward_kernel, (triton.cdiv(count, BLOCK_N), batch), grad_output.contiguous(),
               *_operands(planes, points, weight1, bias1, weight2, bias2), grad_planes, grad_points, *sums,
               count, height, width, outputs, NEEDS_PLANES=needs_planes, NEEDS_POINTS=needs_points,
               **backward_options(planes.dtype),
               **_common(planes, points, box_warp, axes, weight1, weight2))
    dtype = planes.dtype
    grad_planes = (grad_planes.to(dtype).permute(0, 1, 4, 2, 3).contiguous() if needs_planes
                   else planes.new_empty((0,)))
    grad_points = grad_points if needs_points else points.new_empty((0,))
    return (grad_planes, grad_points, sums[0].t().to(dtype).contiguous(), sums[1].to(dtype),
            sums[2].t().to(dtype).contiguous(), sums[3].to(dtype))
