"""Autograd and fake-tensor registrations of the ops' torch.library operators.

The compiled operators' schemas come from C++ (csrc/ops.cpp), so their Python registrations can
only happen once the extension is loaded: :mod:`dreamportrait._extension` then calls
:func:`register_compiled_ops`. The Triton operators are Python custom ops, registered when their
op module is imported. Every output is contiguous, whatever the inputs' strides, so the fake
kernels never depend on them.
"""

from __future__ import annotations

import torch

_registered: set[str] = set()


def register_triplane_sample(forward: str, backward_planes: str, backward_points: str) -> None:
    """Register autograd for ``forward`` and fake kernels for the three operators.

    All three share the argument list ``(..., planes, points, box_warp, axes, reduce)``; the
    backward operators take ``grad_output`` first.
    """
    if forward in _registered:
        return
    _registered.add(forward)
    planes_op = _resolve(backward_planes)
    points_op = _resolve(backward_points)

    @torch.library.register_fake(forward)
    def _forward_fake(planes, points, box_warp, axes, reduce):
        _arguments().check_triplane(forward, planes, points, box_warp, axes, reduce, indexing=False)
        batch, _, channels = planes.shape[:3]
        count = points.shape[1]
        shape = (batch, count, 3, channels) if reduce == "none" else (batch, count, channels)
        return planes.new_empty(shape)

    @torch.library.register_fake(backward_planes)
    def _planes_fake(grad_output, planes, points, box_warp, axes, reduce):
        _arguments().check_triplane(backward_planes, planes, points, box_warp, axes, reduce, grad_output, indexing=False)
        return planes.new_empty(planes.shape)

    @torch.library.register_fake(backward_points)
    def _points_fake(grad_output, planes, points, box_warp, axes, reduce):
        _arguments().check_triplane(backward_points, planes, points, box_warp, axes, reduce, grad_output, indexing=False)
        return points.new_empty(points.shape)

    def setup_context(ctx, inputs, output):
        planes, points, box_warp, axes, reduce = inputs
        ctx.save_for_backward(planes, points)
        ctx.arguments = (box_warp, axes, reduce)

    def backward(ctx, grad_output):
        planes, points = ctx.saved_tensors
        grad_output = grad_output.contiguous()
        grad_planes = grad_points = None
        if ctx.needs_input_grad[0]:
            grad_planes = planes_op(grad_output, planes, points, *ctx.arguments)
        if ctx.needs_input_grad[1]:
            grad_points = points_op(grad_output, planes, points, *ctx.arguments)
        return grad_planes, grad_points, None, None, None

    torch.library.register_autograd(forward, backward, setup_context=setup_context)


def register_composite_rays(forward: str, backward: str) -> None:
    """Register autograd for ``forward`` and fake kernels for it and its ``backward``.

    ``forward(densities, colors, depths, deltas, transmittance_threshold) -> (rgb, depth, opacity,
    weights)``; ``backward(grad_rgb, grad_depth, grad_opacity, grad_weights, densities, colors,
    depths, deltas)`` returns the gradients of the four tensor inputs.
    """
    if forward in _registered:
        return
    _registered.add(forward)
    backward_op = _resolve(backward)

    @torch.library.register_fake(forward)
    def _forward_fake(densities, colors, depths, deltas, transmittance_threshold):
        _arguments().check_composite(forward, densities, colors, depths, deltas, indexing=False)
        rays, samples = densities.shape
        return (
            densities.new_empty((rays, colors.shape[2])),
            densities.new_empty((rays,)),
            densities.new_empty((rays,)),
            densities.new_empty((rays, samples)),
        )

    @torch.library.register_fake(backward)
    def _backward_fake(grad_rgb, grad_depth, grad_opacity, grad_weights, densities, colors, depths, deltas):
        checks = _arguments()
        checks.check_composite(backward, densities, colors, depths, deltas, indexing=False)
        checks.check_composite_gradients(backward, densities, colors, grad_rgb, grad_depth, grad_opacity, grad_weights)
        return densities.new_empty(densities.shape), colors.new_empty(colors.shape), \
            depths.new_empty(depths.shape), deltas.new_empty(deltas.shape)

    def setup_context(ctx, inputs, output):
        densities, colors, depths, deltas, transmittance_threshold = inputs
        ctx.early_stop = transmittance_threshold > 0
        ctx.save_for_backward(densities, colors, depths, deltas)

    def backward_fn(ctx, grad_rgb, grad_depth, grad_opacity, grad_weights):
        if ctx.early_stop:
            raise RuntimeError("composite_rays: transmittance_threshold > 0 is for inference and has no gradient")
        grads = backward_op(
            grad_rgb.contiguous(), grad_depth.contiguous(), grad_opacity.contiguous(), grad_weights.contiguous(),
            *ctx.saved_tensors,
        )
        return (*grads, None)

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


def register_gated_cross_attention(forward: str, backward: str) -> None:
    """Register autograd for ``forward`` and fake kernels for it and its ``backward``.

    ``forward(q, k, v, gate, key_padding_mask, scale) -> (out, lse)``; lse is saved for the
    backward and has no gradient. ``backward(grad_out, q, k, v, gate, key_padding_mask, lse,
    scale) -> (dq, dk, dv, dgate)``.
    """
    if forward in _registered:
        return
    _registered.add(forward)
    backward_op = _resolve(backward)

    @torch.library.register_fake(forward)
    def _forward_fake(q, k, v, gate, key_padding_mask, scale):
        _arguments().check_attention(forward, q, k, v, gate, key_padding_mask, scale, indexing=False)
        # The log-sum-exp is kept in the accumulation type: float32 for 16-bit inputs.
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake(backward)
    def _backward_fake(grad_out, q, k, v, gate, key_padding_mask, lse, scale):
        checks = _arguments()
        checks.check_attention(backward, q, k, v, gate, key_padding_mask, scale, indexing=False)
        checks.check_attention_gradients(backward, q, grad_out, lse, _lse_dtype(q.dtype))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gate.new_empty(gate.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, gate, key_padding_mask, scale = inputs
        ctx.save_for_backward(q, k, v, gate, key_padding_mask, output[1])
        ctx.scale = scale

    def backward_fn(ctx, grad_out, grad_lse):
        q, k, v, gate, key_padding_mask, lse = ctx.saved_tensors
        dq, dk, dv, dgate = backward_op(grad_out.contiguous(), q, k, v, gate, key_padding_mask, lse, ctx.scale)
        return dq, dk, dv, dgate, None, None

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _arguments():
    """The operators' argument checks (imported late: they import the op modules, which import this)."""
    from .triton import arguments

    return arguments


def _resolve(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def register_compiled_ops() -> None:
    register_triplane_sample(
        "dreamportrait::triplane_sample",
        "dreamportrait::triplane_sample_backward_planes",
        "dreamportrait::triplane_sample_backward_points",
    )
    register_composite_rays("dreamportrait::composite_rays", "dreamportrait::composite_rays_backward")
    register_gated_cross_attention(
        "dreamportrait::gated_cross_attention", "dreamportrait::gated_cross_attention_backward"
    )
    if hasattr(torch.ops.dreamportrait, "sample_and_decode"):
        from .sample_and_decode import _register_compiled

        _register_compiled()
    _register_emulation_fakes()


def _register_emulation_fakes() -> None:
    """Fake kernels of the test-only host emulations of the CUDA schedules (csrc/cpu/tile_emulation.cpp):
    they check their tensors as the operators they emulate do."""
    if "emulation" in _registered or not hasattr(torch.ops.dreamportrait, "attention_tile_emulation"):
        return
    _registered.add("emulation")
    name = "dreamportrait::attention_tile_emulation"

    @torch.library.register_fake(name)
    def _attention_fake(q, k, v, gate, key_padding_mask, scale, *tiles):
        _arguments().check_attention(name, q, k, v, gate, key_padding_mask, scale, indexing=False)
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))

    @torch.library.register_fake(name + "_backward")
    def _attention_backward_fake(grad_out, q, k, v, gate, key_padding_mask, lse, scale, *tiles):
        checks = _arguments()
        checks.check_attention(name + "_backward", q, k, v, gate, key_padding_mask, scale, indexing=False)
        checks.check_attention_gradients(name + "_backward", q, grad_out, lse, _lse_dtype(q.dtype))
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gate.new_empty(gate.shape)

    warp = "dreamportrait::composite_warp_emulation"

    @torch.library.register_fake(warp)
    def _warp_fake(densities, colors, depths, deltas, transmittance_threshold):
        _arguments().check_composite(warp, densities, colors, depths, deltas, indexing=False)
        rays, samples = densities.shape
        return (densities.new_empty((rays, colors.shape[2])), densities.new_empty((rays,)),
                densities.new_empty((rays,)), densities.new_empty((rays, samples)))

    @torch.library.register_fake(warp + "_backward")
    def _warp_backward_fake(grad_rgb, grad_depth, grad_opacity, grad_weights, densities, colors, depths, deltas):
        checks = _arguments()
        checks.check_composite(warp + "_backward", densities, colors, depths, deltas, indexing=False)
        checks.check_composite_gradients(warp + "_backward", densities, colors, grad_rgb, grad_depth, grad_opacity,
                                         grad_weights)
        return (densities.new_empty(densities.shape), colors.new_empty(colors.shape), depths.new_empty(depths.shape),
                deltas.new_empty(deltas.shape))

    from .sample_and_decode import register_fakes

    register_fakes("dreamportrait::sample_and_decode_tile_emulation",
                   "dreamportrait::sample_and_decode_tile_emulation_backward")
