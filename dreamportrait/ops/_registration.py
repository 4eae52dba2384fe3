"""Autograd and fake-tensor registrations of the ops' torch.library operators.

The compiled operators' schemas come from C++ (csrc/ops.cpp), so their Python registrations can
only happen once the extension is loaded: :mod:`dreamportrait._extension` then calls
:func:`register_compiled_ops`. The Triton operators are Python custom ops and are registered at
import (see :mod:`dreamportrait.ops.triplane_sample`).
"""

from __future__ import annotations

import torch

_registered: set[str] = set()


def register_triplane_sample(forward: str, backward_planes: str, backward_points: str) -> None:
    """Register autograd for ``forward`` and fake kernels for the three operators.

    All three share the argument list ``(..., planes, points, box_warp, axes, reduce)``; the
    backward operators take ``grad_output`` first. Every output is contiguous, whatever the
    inputs' strides (so the fake kernels never depend on them).
    """
    if forward in _registered:
        return
    _registered.add(forward)
    planes_op = _resolve(backward_planes)
    points_op = _resolve(backward_points)

    @torch.library.register_fake(forward)
    def _forward_fake(planes, points, box_warp, axes, reduce):
        batch, _, channels = planes.shape[:3]
        count = points.shape[1]
        shape = (batch, count, 3, channels) if reduce == "none" else (batch, count, channels)
        return planes.new_empty(shape)

    @torch.library.register_fake(backward_planes)
    def _planes_fake(grad_output, planes, points, box_warp, axes, reduce):
        return planes.new_empty(planes.shape)

    @torch.library.register_fake(backward_points)
    def _points_fake(grad_output, planes, points, box_warp, axes, reduce):
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


def _resolve(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def register_compiled_ops() -> None:
    register_triplane_sample(
        "dreamportrait::triplane_sample",
        "dreamportrait::triplane_sample_backward_planes",
        "dreamportrait::triplane_sample_backward_points",
    )
