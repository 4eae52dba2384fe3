"""Triton kernels of ``triplane_sample`` (semantics: :func:`dreamportrait.ops.reference.triplane_sample`).

Layout as in the C++/CUDA kernels: planes are read channel-innermost, ``(B, 3, H, W, C)``, so one
bilinear tap of a block of points is a ``(BLOCK_N, BLOCK_C)`` tile of contiguous channel rows. A
program owns a block of points and a block of channels of one batch element; the plane gradient
is scattered with atomic adds into a ``(B, 3, H, W, C)`` buffer in the accumulation type, then
transposed into a contiguous gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .arguments import check_triplane
from .common import accumulation_dtype, accumulation_type, channel_block
from .launch import launch

OP = "triplane_sample_triton"

# Points per program. 32: with 64, the plane gradient's four scattered (BLOCK_N, BLOCK_C) corner
# tiles spilled registers on sm_80 (the compile gate, tests/ops/test_compile_gate.py).
BLOCK_N = 32
# Warps per program: with 4, the plane gradient at 64-channel tiles spilled on sm_80, and the point
# gradient (whose pipelined channel loop holds the next tiles of four corners) on sm_90.
NUM_WARPS = 8


@triton.jit
def _pick(x, y, z, AXIS: tl.constexpr):
    if AXIS == 0:
        return x
    elif AXIS == 1:
        return y
    else:
        return z


@triton.jit
def _taps(u, v, H, W):
    """Bilinear cell of normalised coordinates (align_corners=False, zero padding).

    ``poison`` is 0 for finite positions and NaN otherwise; adding it to a sample makes a
    non-finite point sample NaN, as grid_sample does.
    """
    x = ((u + 1.0) * W - 1.0) * 0.5
    y = ((v + 1.0) * H - 1.0) * 0.5
    poison = (x - x) + (y - y)
    # Written so that NaN fails; far-away points are clamped before the integer cast.
    in_bounds = (x >= -1.0) & (x <= W) & (y >= -1.0) & (y <= H)
    x = tl.where(in_bounds, x, 0.0)
    y = tl.where(in_bounds, y, 0.0)
    xf = tl.floor(x)
    yf = tl.floor(y)
    return xf.to(tl.int64), yf.to(tl.int64), x - xf, y - yf, in_bounds, poison


@triton.jit
def _corner(x0, y0, fx, fy, in_bounds, H, W, DY: tl.constexpr, DX: tl.constexpr):
    """Pixel index, weight and validity of corner (y0 + DY, x0 + DX)."""
    xi = x0 + DX
    yi = y0 + DY
    valid = in_bounds & (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
    wx = fx if DX == 1 else 1.0 - fx
    wy = fy if DY == 1 else 1.0 - fy
    return yi * W + xi, wx * wy, valid


@triton.jit
def _load_point(points_ptr, rows, mask, ACC: tl.constexpr):
    px = tl.load(points_ptr + rows * 3 + 0, mask=mask, other=0.0).to(ACC)
    py = tl.load(points_ptr + rows * 3 + 1, mask=mask, other=0.0).to(ACC)
    pz = tl.load(points_ptr + rows * 3 + 2, mask=mask, other=0.0).to(ACC)
    return px, py, pz


@triton.jit
def _plane_taps(px, py, pz, scale, H, W, U: tl.constexpr, V: tl.constexpr):
    """Bilinear cell of the plane that takes axis U along W and axis V along H."""
    return _taps(_pick(px, py, pz, U) * scale, _pick(px, py, pz, V) * scale, H, W)


@triton.jit
def _on_axis(value, AXIS: tl.constexpr, TARGET: tl.constexpr):
    """``value`` where plane axis AXIS is point axis TARGET, else zeros (decided at compile time)."""
    if AXIS == TARGET:
        return value
    else:
        return tl.zeros_like(value)


@triton.jit
def _reduced(x, MEAN: tl.constexpr):
    """Weight of each plane's sample: 1/3 for "mean" (divided in x's precision), 1 otherwise."""
    if MEAN:
        return x / 3.0
    else:
        return x


@triton.jit
def _output_rows(rows, plane, PER_PLANE: tl.constexpr):
    """Row of (point, plane) in the (B*N, C) or (B*N*3, C) output / grad_output."""
    if PER_PLANE:
        return rows * 3 + plane
    else:
        return rows


@triton.jit
def _point_channel_block(points_ptr, N, C, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's batch element, channels, masks, flattened point rows and point coordinates
    (grid: point blocks, channel blocks, batch)."""
    b = tl.program_id(2)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n_mask = n < N
    rows = b.to(tl.int64) * N + n  # 64-bit: B * N * 3 * C may pass 2^31
    px, py, pz = _load_point(points_ptr, rows, n_mask, ACC)
    return b, c, n_mask, c < C, rows, px, py, pz


@triton.jit
def _forward_kernel(
    planes_ptr, points_ptr, out_ptr, N, C, H, W, scale_ptr,
    A0: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, A3: tl.constexpr, A4: tl.constexpr, A5: tl.constexpr,
    PER_PLANE: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    b, c, n_mask, c_mask, rows, px, py, pz = _point_channel_block(points_ptr, N, C, ACC, BLOCK_N, BLOCK_C)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    for plane in tl.static_range(3):
        U = A0 if plane == 0 else (A2 if plane == 1 else A4)
        V = A1 if plane == 0 else (A3 if plane == 1 else A5)
        x0, y0, fx, fy, in_bounds, poison = _plane_taps(px, py, pz, scale, H, W, U, V)
        base = planes_ptr + (b * 3 + plane).to(tl.int64) * H * W * C
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                pixel, weight, valid = _corner(x0, y0, fx, fy, in_bounds & n_mask, H, W, dy, dx)
                values = tl.load(base + pixel[:, None] * C + c[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0)
                acc += weight[:, None] * values.to(ACC)
        acc += poison[:, None]
        if PER_PLANE:
            out_rows = _output_rows(rows, plane, PER_PLANE).to(tl.int64)
            tl.store(out_ptr + out_rows[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=n_mask[:, None] & c_mask[None, :])
            acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=ACC)
    if not PER_PLANE:
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * C + c[None, :], _reduced(acc, MEAN).to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & c_mask[None, :])


@triton.jit
def _backward_planes_kernel(
    grad_ptr, points_ptr, grad_planes_ptr, N, C, H, W, scale_ptr,
    A0: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, A3: tl.constexpr, A4: tl.constexpr, A5: tl.constexpr,
    PER_PLANE: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    b, c, n_mask, c_mask, rows, px, py, pz = _point_channel_block(points_ptr, N, C, ACC, BLOCK_N, BLOCK_C)
    for plane in tl.static_range(3):
        U = A0 if plane == 0 else (A2 if plane == 1 else A4)
        V = A1 if plane == 0 else (A3 if plane == 1 else A5)
        x0, y0, fx, fy, in_bounds, poison = _plane_taps(px, py, pz, scale, H, W, U, V)
        grad_rows = _output_rows(rows, plane, PER_PLANE).to(tl.int64)
        grad = tl.load(grad_ptr + grad_rows[:, None] * C + c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0)
        grad = _reduced(grad.to(ACC), MEAN)
        base = grad_planes_ptr + (b * 3 + plane).to(tl.int64) * H * W * C
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                pixel, weight, valid = _corner(x0, y0, fx, fy, in_bounds & n_mask, H, W, dy, dx)
                tl.atomic_add(base + pixel[:, None] * C + c[None, :], weight[:, None] * grad,
                              mask=valid[:, None] & c_mask[None, :])


@triton.jit
def _backward_points_kernel(
    grad_ptr, planes_ptr, points_ptr, grad_points_ptr, N, C, H, W, scale_ptr,
    A0: tl.constexpr, A1: tl.constexpr, A2: tl.constexpr, A3: tl.constexpr, A4: tl.constexpr, A5: tl.constexpr,
    PER_PLANE: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    scale = tl.load(scale_ptr)
    b = tl.program_id(1)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    rows = b.to(tl.int64) * N + n
    px, py, pz = _load_point(points_ptr, rows, n_mask, ACC)
    gx = tl.zeros((BLOCK_N,), dtype=ACC)
    gy = tl.zeros((BLOCK_N,), dtype=ACC)
    gz = tl.zeros((BLOCK_N,), dtype=ACC)
    for plane in tl.static_range(3):
        U = A0 if plane == 0 else (A2 if plane == 1 else A4)
        V = A1 if plane == 0 else (A3 if plane == 1 else A5)
        x0, y0, fx, fy, in_bounds, poison = _plane_taps(px, py, pz, scale, H, W, U, V)
        grad_rows = _output_rows(rows, plane, PER_PLANE).to(tl.int64)
        base = planes_ptr + (b * 3 + plane).to(tl.int64) * H * W * C
        p00, _w00, m00 = _corner(x0, y0, fx, fy, in_bounds & n_mask, H, W, 0, 0)
        p01, _w01, m01 = _corner(x0, y0, fx, fy, in_bounds & n_mask, H, W, 0, 1)
        p10, _w10, m10 = _corner(x0, y0, fx, fy, in_bounds & n_mask, H, W, 1, 0)
        p11, _w11, m11 = _corner(x0, y0, fx, fy, in_bounds & n_mask, H, W, 1, 1)
        # sum_c grad[c] * corner[c] per corner; the position derivative is linear in these.
        d00 = tl.zeros((BLOCK_N,), dtype=ACC)
        d01 = tl.zeros((BLOCK_N,), dtype=ACC)
        d10 = tl.zeros((BLOCK_N,), dtype=ACC)
        d11 = tl.zeros((BLOCK_N,), dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < C
            grad = tl.load(grad_ptr + grad_rows[:, None] * C + c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0.0).to(ACC)
            d00 += tl.sum(grad * tl.load(base + p00[:, None] * C + c[None, :], mask=m00[:, None] & c_mask[None, :], other=0.0).to(ACC), axis=1)
            d01 += tl.sum(grad * tl.load(base + p01[:, None] * C + c[None, :], mask=m01[:, None] & c_mask[None, :], other=0.0).to(ACC), axis=1)
            d10 += tl.sum(grad * tl.load(base + p10[:, None] * C + c[None, :], mask=m10[:, None] & c_mask[None, :], other=0.0).to(ACC), axis=1)
            d11 += tl.sum(grad * tl.load(base + p11[:, None] * C + c[None, :], mask=m11[:, None] & c_mask[None, :], other=0.0).to(ACC), axis=1)
        d_dx = (d01 - d00) * (1.0 - fy) + (d11 - d10) * fy + poison
        d_dy = (d10 - d00) * (1.0 - fx) + (d11 - d01) * fx + poison
        d_du = _reduced(d_dx * (W * 0.5) * scale, MEAN)
        d_dv = _reduced(d_dy * (H * 0.5) * scale, MEAN)
        gx += _on_axis(d_du, U, 0) + _on_axis(d_dv, V, 0)
        gy += _on_axis(d_du, U, 1) + _on_axis(d_dv, V, 1)
        gz += _on_axis(d_du, U, 2) + _on_axis(d_dv, V, 2)
    out_rows = rows.to(tl.int64) * 3
    out_ty = grad_points_ptr.dtype.element_ty
    tl.store(grad_points_ptr + out_rows + 0, gx.to(out_ty), mask=n_mask)
    tl.store(grad_points_ptr + out_rows + 1, gy.to(out_ty), mask=n_mask)
    tl.store(grad_points_ptr + out_rows + 2, gz.to(out_ty), mask=n_mask)


def _common(planes: Tensor, box_warp: float, axes: list[int], reduce: str) -> dict:
    accumulation = accumulation_dtype(planes.dtype)
    return dict(
        # A tensor, not a Python float: Triton would pass a float as float32 even for float64 inputs.
        scale_ptr=torch.full((1,), 2.0 / box_warp, dtype=accumulation, device=planes.device),
        **{f"A{i}": int(a) for i, a in enumerate(axes)},
        PER_PLANE=reduce == "none",
        MEAN=reduce == "mean",
        ACC=accumulation_type(planes.dtype),
        BLOCK_N=BLOCK_N,
        num_warps=NUM_WARPS,
    )


def _channels_innermost(planes: Tensor) -> Tensor:
    return planes.permute(0, 1, 3, 4, 2).contiguous()  # (B, 3, H, W, C)


def forward(planes: Tensor, points: Tensor, box_warp: float, axes: list[int], reduce: str) -> Tensor:
    check_triplane(OP, planes, points, box_warp, axes, reduce)
    batch, _, channels, height, width = planes.shape
    count = points.shape[1]
    shape = (batch, count, 3, channels) if reduce == "none" else (batch, count, channels)
    out = planes.new_empty(shape)
    if out.numel() == 0:
        return out
    block_c = channel_block(channels)
    grid = (triton.cdiv(count, BLOCK_N), triton.cdiv(channels, block_c), batch)
    launch(
        _forward_kernel, grid, _channels_innermost(planes), points.contiguous(), out, count, channels, height, width,
        BLOCK_C=block_c, **_common(planes, box_warp, axes, reduce),
    )
    return out


def backward_planes(grad_output: Tensor, planes: Tensor, points: Tensor, box_warp: float, axes: list[int],
                    reduce: str) -> Tensor:
    """Plane gradient, contiguous ``(B, 3, C, H, W)`` (as in every backend)."""
    check_triplane(OP + "_backward_planes", planes, points, box_warp, axes, reduce, grad_output)
    batch, _, channels, height, width = planes.shape
    count = points.shape[1]
    grad_planes = planes.new_zeros((batch, 3, height, width, channels), dtype=accumulation_dtype(planes.dtype))
    if grad_planes.numel() > 0 and count > 0:
        block_c = channel_block(channels)
        grid = (triton.cdiv(count, BLOCK_N), triton.cdiv(channels, block_c), batch)
        launch(
            _backward_planes_kernel, grid, grad_output.contiguous(), points.contiguous(), grad_planes, count, channels, height, width,
            BLOCK_C=block_c, **_common(planes, box_warp, axes, reduce),
        )
    return grad_planes.to(planes.dtype).permute(0, 1, 4, 2, 3).contiguous()


def backward_points(grad_output: Tensor, planes: Tensor, points: Tensor, box_warp: float, axes: list[int],
                    reduce: str) -> Tensor:
    check_triplane(OP + "_backward_points", planes, points, box_warp, axes, reduce, grad_output)
    batch, _, channels, height, width = planes.shape
    count = points.shape[1]
    grad_points = torch.zeros_like(points, memory_format=torch.contiguous_format)
    if grad_points.numel() == 0 or planes.numel() == 0:
        return grad_points
    grid = (triton.cdiv(count, BLOCK_N), batch)
    launch(
        _backward_points_kernel, grid, grad_output.contiguous(), _channels_innermost(planes), points.contiguous(), grad_points,
        count, channels, height, width, BLOCK_C=channel_block(channels), **_common(planes, box_warp, axes, reduce),
    )
    return grad_points
