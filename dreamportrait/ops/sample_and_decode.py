"""``sample_and_decode``: tri-plane sampling, the mean over planes and EG3D's tri-plane decoder MLP
(``OSGDecoder``) in one op.

Per point: ``f = mean_p sample_p(planes, point)`` (as :func:`~dreamportrait.ops.triplane_sample`
with ``reduce="mean"``), ``h = softplus(W1 f + b1)`` (torch's softplus: ``x`` above 20), ``x = W2 h +
b2``; the output is ``x[0]`` (the raw density) followed by ``sigmoid(x[1:]) * 1.002 - 0.001`` (the
colour features, MipNeRF's widened sigmoid). ``W1, b1, W2, b2`` are the layers' effective weights
(EG3D's ``weight * weight_gain`` and ``bias * bias_gain``). The compiled CPU and CUDA kernels keep a
tile of points' features and hidden units in cache or shared memory: neither the ``(B, N, 3, C)``
samples nor the ``(B, N, C)`` features nor the ``(B, N, 64)`` hidden units are written to memory,
forward or backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._backend import select_backend
from ._checks import require_backend_dtype, require_like, require_tensor
from .triplane_sample import EG3D_AXES, _check_arguments, triplane_sample

OP = "sample_and_decode"
SIGMOID_SCALE = 1 + 2 * 0.001
SIGMOID_SHIFT = 0.001
SOFTPLUS_THRESHOLD = 20.0


def reference(planes: Tensor, points: Tensor, box_warp: float, axes: Sequence[int], weight1: Tensor,
              bias1: Tensor, weight2: Tensor, bias2: Tensor) -> Tensor:
    """The specification, in PyTorch (autograd gives its gradients)."""
    from . import reference as ops_reference

    features = ops_reference.triplane_sample(planes, points, box_warp, axes, "mean")
    return decode(features, weight1, bias1, weight2, bias2)


def decode(features: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor) -> Tensor:
    """The decoder half on given ``(B, N, C)`` features."""
    hidden = F.softplus(F.linear(features, weight1, bias1), beta=1, threshold=SOFTPLUS_THRESHOLD)
    raw = F.linear(hidden, weight2, bias2)
    return torch.cat([raw[..., :1], torch.sigmoid(raw[..., 1:]) * SIGMOID_SCALE - SIGMOID_SHIFT], dim=-1)


def sample_and_decode(planes: Tensor, points: Tensor, box_warp: float, weight1: Tensor, bias1: Tensor,
                      weight2: Tensor, bias2: Tensor, axes: Sequence[int] = EG3D_AXES, *,
                      backend: str | None = None) -> Tensor:
    """Decode tri-plane features at 3D points with EG3D's two-layer MLP.

    Args:
        planes: ``(B, 3, C, H, W)``; points ``(B, N, 3)``; box_warp, axes: as
            :func:`~dreamportrait.ops.triplane_sample`.
        weight1: ``(K, C)``, bias1 ``(K,)``: the first layer (K = 64 in EG3D).
        weight2: ``(O, K)``, bias2 ``(O,)``: the second layer, O >= 2 (1 + 32 in EG3D).
        backend: as the other ops: ``"reference"``, ``"cpu"`` (C++ kernel), ``"cuda"`` (CUDA kernel; the
            decoder's weights must fit in a thread block's shared memory, as EG3D's do many times over),
            ``"triton"`` (fused kernel when C and K are powers of two from 16 to 128 and O <= 128, as
            EG3D's 32, 64, 33; for other sizes the tri-plane kernel composed with PyTorch's matmuls).

    Returns ``(B, N, O)``: the raw density in column 0, the colour features after the widened
    sigmoid in columns 1..O-1. Differentiable with respect to all tensor arguments.
    """
    axes = _check_arguments(planes, points, box_warp, axes, "mean")
    hidden, out = _check_weights(planes, weight1, bias1, weight2, bias2)
    chosen = select_backend(OP, planes.device.type, backend)
    require_backend_dtype(OP, chosen, "planes", planes)
    if chosen == "reference":
        return reference(planes, points, float(box_warp), axes, weight1, bias1, weight2, bias2)
    if chosen in ("cpu", "cuda") and hasattr(torch.ops.dreamportrait, OP):
        _register_compiled()
        return torch.ops.dreamportrait.sample_and_decode(planes, points, float(box_warp), axes, weight1, bias1,
                                                         weight2, bias2)
    if chosen == "triton" and _triton_fits(planes, weight1, weight2):
        return torch.ops.dreamportrait.sample_and_decode_triton(planes, points, float(box_warp), axes, weight1, bias1,
                                                                weight2, bias2)
    features = triplane_sample(planes, points, box_warp, axes, "mean", backend=chosen)
    return decode(features, weight1, bias1, weight2, bias2)


def _check_weights(planes, weight1, bias1, weight2, bias2) -> tuple[int, int]:
    for name, tensor, dims in (("weight1", weight1, 2), ("bias1", bias1, 1), ("weight2", weight2, 2),
                               ("bias2", bias2, 1)):
        require_tensor(OP, name, tensor)
        require_like(OP, name, tensor, "planes", planes)
        if tensor.dim() != dims:
            raise ValueError(f"{OP}: {name} must have {dims} dimension{'s' if dims > 1 else ''}, "
                             f"got shape {tuple(tensor.shape)}")
    channels = planes.shape[2]
    hidden, out = weight1.shape[0], weight2.shape[0]
    if weight1.shape[1] != channels:
        raise ValueError(f"{OP}: weight1 must have shape (K, {channels}) for planes of {channels} channels, "
                         f"got {tuple(weight1.shape)}")
    if hidden < 1 or bias1.shape[0] != hidden:
        raise ValueError(f"{OP}: bias1 must have shape ({hidden},) to match weight1, got {tuple(bias1.shape)}")
    if out < 2 or weight2.shape[1] != hidden:
        raise ValueError(f"{OP}: weight2 must have shape (O, {hidden}) with O >= 2, got {tuple(weight2.shape)}")
    if bias2.shape[0] != out:
        raise ValueError(f"{OP}: bias2 must have shape ({out},) to match weight2, got {tuple(bias2.shape)}")
    return hidden, out


_registered: set[str] = set()


def register_fakes(forward: str, backward: str) -> None:
    """Fake kernels of a sample_and_decode operator pair (the signatures of :func:`_register`; any
    further trailing arguments, such as the host emulation's GPU description, are accepted): the
    argument checks of the operators, then empty outputs of the right shapes."""

    @torch.library.register_fake(forward)
    def _forward_fake(planes, points, box_warp, axes, weight1, bias1, weight2, bias2, *schedule):
        from .triton.arguments import check_decoder

        check_decoder(forward, planes, points, box_warp, axes, weight1, bias1, weight2, bias2, indexing=False)
        return planes.new_empty((planes.shape[0], points.shape[1], weight2.shape[0]))

    @torch.library.register_fake(backward)
    def _backward_fake(grad_output, planes, points, box_warp, axes, weight1, bias1, weight2, bias2,
                       needs_planes, needs_points, *schedule):
        from .triton.arguments import check_decoder

        check_decoder(backward, planes, points, box_warp, axes, weight1, bias1, weight2, bias2, grad_output,
                      indexing=False)
        return (planes.new_empty(planes.shape if needs_planes else (0,)),
                points.new_empty(points.shape if needs_points else (0,)), weight1.new_empty(weight1.shape),
                bias1.new_empty(bias1.shape), weight2.new_empty(weight2.shape), bias2.new_empty(bias2.shape))


def _register(forward: str, backward: str) -> None:
    """Autograd and fake kernels of an operator pair: ``forward(planes, points, box_warp, axes, weight1,
    bias1, weight2, bias2) -> (B, N, O)`` and ``backward(grad_output, <the same>, needs_planes,
    needs_points)`` -> gradients of planes, points, weight1, bias1, weight2, bias2 (planes' and points'
    empty when not needed)."""
    if forward in _registered:
        return
    _registered.add(forward)
    namespace, name = backward.split("::")
    backward_op = getattr(getattr(torch.ops, namespace), name)

    register_fakes(forward, backward)

    def setup_context(ctx, inputs, output):
        planes, points, box_warp, axes, weight1, bias1, weight2, bias2 = inputs
        ctx.save_for_backward(planes, points, weight1, bias1, weight2, bias2)
        ctx.arguments = (box_warp, axes)

    def backward_fn(ctx, grad_output):
        planes, points, weight1, bias1, weight2, bias2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = backward_op(grad_output.contiguous(), planes, points, *ctx.arguments, weight1, bias1, weight2,
                            bias2, needs[0], needs[1])
        keep = (needs[0], needs[1], needs[4], needs[5], needs[6], needs[7])
        grad_planes, grad_points, grad_w1, grad_b1, grad_w2, grad_b2 = (
            grad if wanted else None for grad, wanted in zip(grads, keep))
        return grad_planes, grad_points, None, None, grad_w1, grad_b1, grad_w2, grad_b2

    torch.library.register_autograd(forward, backward_fn, setup_context=setup_context)


def _register_compiled() -> None:
    """The C++ operator's Python registrations (its schema comes from C++, once the extension loads)."""
    _register("dreamportrait::sample_and_decode", "dreamportrait::sample_and_decode_backward")


# The Triton kernels as torch.library custom ops; the triton package is imported on first call.
@torch.library.custom_op("dreamportrait::sample_and_decode_triton", mutates_args=())
def _triton_forward(planes: Tensor, points: Tensor, box_warp: float, axes: list[int], weight1: Tensor, bias1: Tensor,
                    weight2: Tensor, bias2: Tensor) -> Tensor:
    from .triton import sample_and_decode as kernels

    return kernels.forward(planes, points, box_warp, axes, weight1, bias1, weight2, bias2)


@torch.library.custom_op("dreamportrait::sample_and_decode_triton_backward", mutates_args=())
def _triton_backward(grad_output: Tensor, planes: Tensor, points: Tensor, box_warp: float, axes: list[int],
                     weight1: Tensor, bias1: Tensor, weight2: Tensor, bias2: Tensor, needs_planes: bool,
                     needs_points: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .triton import sample_and_decode as kernels

    return kernels.backward(grad_output, planes, points, box_warp, axes, weight1, bias1, weight2, bias2,
                            needs_planes, needs_points)


_register("dreamportrait::sample_and_decode_triton", "dreamportrait::sample_and_decode_triton_backward")


def _triton_fits(planes: Tensor, weight1: Tensor, weight2: Tensor) -> bool:
    channels, hidden, outputs = planes.shape[2], weight1.shape[0], weight2.shape[0]
    powers = all(16 <= n <= 128 and n & (n - 1) == 0 for n in (channels, hidden))
    return powers and 2 <= outputs <= 128
