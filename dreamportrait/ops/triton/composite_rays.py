"""Triton kernels of ``composite_rays`` (semantics: :func:`dreamportrait.ops.reference.composite_rays`).

A program owns a block of rays and walks their samples in order, as the C++/CUDA kernels do one
ray per thread; the math follows ``csrc/include/dreamportrait/composite_math.h`` (see there for
the backward's suffix recurrence). Half-precision inputs accumulate in float32; the density and
spacing gradients, which first hold the recurrence's scratch values, are float32 buffers for them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .arguments import check_composite, check_composite_gradients, require
from .common import accumulation_dtype, accumulation_type, channel_block
from .launch import launch

OP = "composite_rays_triton"

BLOCK_R = 32


@triton.jit
def _attenuation(tau):
    """(alpha, survival) = (1 - exp(-tau), exp(-tau)), each to full relative precision (see
    ``attenuation_of`` in composite_math.h). Triton has no expm1: below tau = 1/8 its Taylor series
    stands in."""
    y = tl.minimum(tau, 0.125)  # the series is only used (and only evaluated) near 0
    series = y * (1.0 - y * (0.5 - y * (1.0 / 6 - y * (1.0 / 24 - y * (1.0 / 120 - y * (1.0 / 720 - y * (1.0 / 5040 - y * (1.0 / 40320))))))))
    survival = tl.exp(-tau)
    alpha = tl.where(tau < 0.125, series, 1.0 - survival)
    return alpha, tl.where(tau > 0.6931471805599453, survival, 1.0 - alpha)


@triton.jit
def _forward_kernel(
    densities_ptr, colors_ptr, depths_ptr, deltas_ptr, rgb_ptr, depth_ptr, opacity_ptr, weights_ptr,
    R, S, C, threshold, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rays = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ray_mask = rays < R
    rows = rays.to(tl.int64) * S
    transmittance = tl.full((BLOCK_R,), 1.0, dtype=ACC)
    depth_sum = tl.zeros((BLOCK_R,), dtype=ACC)
    opacity_sum = tl.zeros((BLOCK_R,), dtype=ACC)
    for i in range(S):
        sigma = tl.load(densities_ptr + rows + i, mask=ray_mask, other=0.0).to(ACC)
        delta = tl.load(deltas_ptr + rows + i, mask=ray_mask, other=0.0).to(ACC)
        t = tl.load(depths_ptr + rows + i, mask=ray_mask, other=0.0).to(ACC)
        alpha, survival = _attenuation(sigma * delta)
        w = tl.where(transmittance < threshold, 0.0, transmittance * alpha)
        transmittance *= survival
        tl.store(weights_ptr + rows + i, w.to(weights_ptr.dtype.element_ty), mask=ray_mask)
        depth_sum += w * t
        opacity_sum += w
    tl.store(depth_ptr + rays, depth_sum.to(depth_ptr.dtype.element_ty), mask=ray_mask)
    tl.store(opacity_ptr + rays, opacity_sum.to(opacity_ptr.dtype.element_ty), mask=ray_mask)
    for c0 in range(0, C, BLOCK_C):
        channels = c0 + tl.arange(0, BLOCK_C)
        mask = ray_mask[:, None] & (channels < C)[None, :]
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=ACC)
        for i in range(S):
            w = tl.load(weights_ptr + rows + i, mask=ray_mask, other=0.0).to(ACC)
            color = tl.load(colors_ptr + (rows + i)[:, None] * C + channels[None, :], mask=mask, other=0.0)
            acc += w[:, None] * color.to(ACC)
        tl.store(rgb_ptr + rays.to(tl.int64)[:, None] * C + channels[None, :], acc.to(rgb_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    grad_rgb_ptr, grad_depth_ptr, grad_opacity_ptr, grad_weights_ptr,
    densities_ptr, colors_ptr, depths_ptr, deltas_ptr,
    grad_densities_ptr, grad_colors_ptr, grad_depths_ptr, grad_deltas_ptr,
    R, S, C, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rays = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ray_mask = rays < R
    rows = rays.to(tl.int64) * S
    g_depth = tl.load(grad_depth_ptr + rays, mask=ray_mask, other=0.0).to(ACC)
    g_opacity = tl.load(grad_opacity_ptr + rays, mask=ray_mask, other=0.0).to(ACC)
    # Back to front: G_k into grad_deltas, R_k into grad_densities.
    suffix = tl.zeros((BLOCK_R,), dtype=ACC)
    for j in range(S):
        k = S - 1 - j
        t = tl.load(depths_ptr + rows + k, mask=ray_mask, other=0.0).to(ACC)
        weight_grad = tl.load(grad_weights_ptr + rows + k, mask=ray_mask, other=0.0).to(ACC) + g_depth * t + g_opacity
        for c0 in range(0, C, BLOCK_C):
            channels = c0 + tl.arange(0, BLOCK_C)
            mask = ray_mask[:, None] & (channels < C)[None, :]
            g_rgb = tl.load(grad_rgb_ptr + rays.to(tl.int64)[:, None] * C + channels[None, :], mask=mask, other=0.0)
            color = tl.load(colors_ptr + (rows + k)[:, None] * C + channels[None, :], mask=mask, other=0.0)
            weight_grad += tl.sum(g_rgb.to(ACC) * color.to(ACC), axis=1)
        tl.store(grad_densities_ptr + rows + k, suffix, mask=ray_mask)
        tl.store(grad_deltas_ptr + rows + k, weight_grad, mask=ray_mask)
        sigma = tl.load(densities_ptr + rows + k, mask=ray_mask, other=0.0).to(ACC)
        delta = tl.load(deltas_ptr + rows + k, mask=ray_mask, other=0.0).to(ACC)
        alpha, survival = _attenuation(sigma * delta)
        suffix = alpha * weight_grad + survival * suffix
    # Front to back: transmittances and every gradient.
    transmittance = tl.full((BLOCK_R,), 1.0, dtype=ACC)
    for k in range(S):
        sigma = tl.load(densities_ptr + rows + k, mask=ray_mask, other=0.0).to(ACC)
        delta = tl.load(deltas_ptr + rows + k, mask=ray_mask, other=0.0).to(ACC)
        alpha, survival = _attenuation(sigma * delta)
        w = transmittance * alpha
        transmittance_after = transmittance * survival
        weight_grad = tl.load(grad_deltas_ptr + rows + k, mask=ray_mask, other=0.0)
        suffix = tl.load(grad_densities_ptr + rows + k, mask=ray_mask, other=0.0)
        d_tau = transmittance_after * (weight_grad - suffix)
        tl.store(grad_densities_ptr + rows + k, d_tau * delta, mask=ray_mask)
        tl.store(grad_deltas_ptr + rows + k, d_tau * sigma, mask=ray_mask)
        tl.store(grad_depths_ptr + rows + k, (w * g_depth).to(grad_depths_ptr.dtype.element_ty), mask=ray_mask)
        for c0 in range(0, C, BLOCK_C):
            channels = c0 + tl.arange(0, BLOCK_C)
            mask = ray_mask[:, None] & (channels < C)[None, :]
            g_rgb = tl.load(grad_rgb_ptr + rays.to(tl.int64)[:, None] * C + channels[None, :], mask=mask, other=0.0)
            tl.store(grad_colors_ptr + (rows + k)[:, None] * C + channels[None, :],
                     (w[:, None] * g_rgb.to(ACC)).to(grad_colors_ptr.dtype.element_ty), mask=mask)
        transmittance = transmittance_after


def forward(densities: Tensor, colors: Tensor, depths: Tensor, deltas: Tensor, transmittance_threshold: float):
    check_composite(OP, densities, colors, depths, deltas)
    require(OP, 0 <= transmittance_threshold < 1, f"transmittance_threshold must be in [0, 1), got {transmittance_threshold}")
    rays, samples = densities.shape
    channels = colors.shape[2]
    rgb = densities.new_empty((rays, channels), dtype=accumulation_dtype(densities.dtype))
    depth, opacity = densities.new_empty((rays,)), densities.new_empty((rays,))
    weights = densities.new_empty((rays, samples))
    if rays > 0:
        launch(
            _forward_kernel, (triton.cdiv(rays, BLOCK_R),), densities.contiguous(), colors.contiguous(), depths.contiguous(), deltas.contiguous(),
            rgb, depth, opacity, weights, rays, samples, channels, transmittance_threshold,
            ACC=accumulation_type(densities.dtype), BLOCK_R=BLOCK_R, BLOCK_C=channel_block(channels),
        )
    return rgb.to(densities.dtype), depth, opacity, weights


def backward(grad_rgb: Tensor, grad_depth: Tensor, grad_opacity: Tensor, grad_weights: Tensor,
             densities: Tensor, colors: Tensor, depths: Tensor, deltas: Tensor):
    check_composite(OP + "_backward", densities, colors, depths, deltas)
    check_composite_gradients(OP + "_backward", densities, colors, grad_rgb, grad_depth, grad_opacity, grad_weights)
    rays, samples = densities.shape
    channels = colors.shape[2]
    accumulation = accumulation_dtype(densities.dtype)
    grad_densities = densities.new_empty((rays, samples), dtype=accumulation)
    grad_deltas = densities.new_empty((rays, samples), dtype=accumulation)
    grad_colors = torch.empty_like(colors, memory_format=torch.contiguous_format)
    grad_depths = torch.empty_like(depths, memory_format=torch.contiguous_format)
    if rays > 0:
        launch(
            _backward_kernel, (triton.cdiv(rays, BLOCK_R),), grad_rgb.contiguous(), grad_depth.contiguous(), grad_opacity.contiguous(), grad_weights.contiguous(),
            densities.contiguous(), colors.contiguous(), depths.contiguous(), deltas.contiguous(),
            grad_densities, grad_colors, grad_depths, grad_deltas, rays, samples, channels,
            ACC=accumulation_type(densities.dtype), BLOCK_R=BLOCK_R, BLOCK_C=channel_block(channels),
        )
    return grad_densities.to(densities.dtype), grad_colors, grad_depths, grad_deltas.to(densities.dtype)
