"""``gated_cross_attention``: tri-plane tokens attend to text tokens, through a tanh gate."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _registration, reference
from ._backend import select_backend
from ._checks import require_backend_dtype, require_floating, require_like, require_real, require_tensor

OP = "gated_cross_attention"


def gated_cross_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gate: Tensor,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """``tanh(gate)[h] * softmax(q k^T * scale + mask) v``, fused.

    Args:
        q: ``(B, H, Lq, D)`` queries (e.g. 3 * 64 * 64 tri-plane tokens).
        k, v: ``(B, H, Lk, D)`` keys and values (e.g. 77 text tokens). Any strides: views of a
            packed projection are fine.
        gate: ``()`` or ``(H,)`` gate parameter alpha; the output is scaled by ``tanh(alpha)``, so
            a gate initialised to 0 leaves the attention closed (output exactly 0) while its
            gradient still flows.
        key_padding_mask: optional ``(B, Lk)`` bool, True = attend. A query whose keys are all
            masked outputs zeros (never NaN).
        scale: score scale, default ``1 / sqrt(D)``.
        backend: ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``; default: by device, or the
            ``DREAMPORTRAIT_BACKEND`` environment variable.

    Returns ``(B, H, Lq, D)``. Differentiable with respect to q, k, v and gate. The kernels keep
    only the log-sum-exp of each query row for the backward, which recomputes the probabilities:
    nothing of size Lq x Lk is stored.
    """
    scale = _check_arguments(q, k, v, gate, key_padding_mask, scale)
    chosen = select_backend(OP, q.device.type, backend)
    require_backend_dtype(OP, chosen, "q", q)
    heads = q.shape[1]
    gate = gate.expand(heads) if gate.dim() == 0 else gate
    if chosen == "reference":
        return reference.gated_cross_attention(q, k, v, gate, key_padding_mask, scale)
    if chosen == "triton":
        return torch.ops.dreamportrait.gated_cross_attention_triton(q, k, v, gate, key_padding_mask, scale)[0]
    return torch.ops.dreamportrait.gated_cross_attention(q, k, v, gate, key_padding_mask, scale)[0]


def _check_arguments(q, k, v, gate, key_padding_mask, scale) -> float:
    for name, value in (("q", q), ("k", k), ("v", v), ("gate", gate)):
        require_tensor(OP, name, value)
    if q.dim() != 4:
        raise ValueError(f"{OP}: q must have shape (B, H, Lq, D), got {tuple(q.shape)}")
    batch, heads, _, dim = q.shape
    if k.dim() != 4 or k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != dim:
        raise ValueError(f"{OP}: k must have shape ({batch}, {heads}, Lk, {dim}), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"{OP}: v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if gate.shape not in ((), (heads,)):
        raise ValueError(f"{OP}: gate must have shape () or ({heads},), got {tuple(gate.shape)}")
    require_floating(OP, "q", q)
    for name, tensor in (("k", k), ("v", v), ("gate", gate)):
        require_like(OP, name, tensor, "q", q)
    if key_padding_mask is not None:
        require_tensor(OP, "key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{OP}: key_padding_mask must be a bool tensor (True = attend), got {key_padding_mask.dtype}")
        if key_padding_mask.shape != (batch, k.shape[2]):
            raise ValueError(
                f"{OP}: key_padding_mask must have shape ({batch}, {k.shape[2]}), got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"{OP}: key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    if scale is None:
        return 1.0 / math.sqrt(dim) if dim > 0 else 1.0
    return require_real(OP, "scale", scale)


# The Triton kernels as torch.library custom ops; the triton package is imported on first call.
@torch.library.custom_op("dreamportrait::gated_cross_attention_triton", mutates_args=())
def _triton_forward(
    q: Tensor, k: Tensor, v: Tensor, gate: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    from .triton import gated_cross_attention as kernels

    return kernels.forward(q, k, v, gate, key_padding_mask, scale)


@torch.library.custom_op("dreamportrait::gated_cross_attention_triton_backward", mutates_args=())
def _triton_backward(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, gate: Tensor, key_padding_mask: Tensor | None,
    lse: Tensor, scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .triton import gated_cross_attention as kernels

    return kernels.backward(grad_out, q, k, v, gate, key_padding_mask, lse, scale)


_registration.register_gated_cross_attention(
    "dreamportrait::gated_cross_attention_triton", "dreamportrait::gated_cross_attention_triton_backward"
)
