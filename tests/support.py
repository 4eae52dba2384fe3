"""Helpers shared by the tests: which backends this machine can run, tolerances, poisoned
allocations and the torch.compile comparison."""

import contextlib

import pytest
import torch

from dreamportrait import _extension
from dreamportrait.ops import _backend, reference


def extension_available() -> bool:
    return _extension.status().available


def cuda_kernels_usable() -> bool:
    return torch.cuda.is_available() and _extension.status().has_cuda


def triton_usable() -> bool:
    return _backend.triton_importable() and (torch.cuda.is_available() or _backend.triton_interpreted())


requires_extension = pytest.mark.skipif(not extension_available(), reason="the compiled extension is not built")
requires_cuda = pytest.mark.skipif(not cuda_kernels_usable(), reason="no CUDA GPU (or extension built without CUDA)")
requires_triton = pytest.mark.skipif(not triton_usable(), reason="triton unavailable (needs a GPU or TRITON_INTERPRET=1)")


def kernel_backends():
    """pytest params of every compiled backend, each on its device, skipped where unusable."""
    return [
        pytest.param("cpu", "cpu", marks=requires_extension, id="cpu"),
        pytest.param("triton", "cuda" if torch.cuda.is_available() else "cpu", marks=requires_triton, id="triton"),
        pytest.param("cuda", "cuda", marks=requires_cuda, id="cuda"),
    ]


def assert_close_scaled(actual, expected, rtol, name="", magnitude=0.0):
    """Elementwise ``|actual - expected| <= rtol * (|expected| + max(max|expected|, magnitude, 1))``:
    relative to the tensor's magnitude, so rounding residues of values that cancel to ~0 pass.
    ``magnitude`` is for a sum whose terms can cancel: the size its rounding error scales with
    (see ``gate_gradient_magnitudes``)."""
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * max(scale, magnitude, 1.0), equal_nan=True,
        msg=lambda m: f"{name}: {m}",
    )


def gate_gradient_magnitudes(q, k, v, gate, key_padding_mask, scale, grad_out) -> torch.Tensor:
    """The size of gated_cross_attention's gate gradient before cancellation, per head ``(H,)``:
    ``(1 - tanh(g_h)^2) * sqrt(sum over b, i, d of (dO * A)^2)``, A the attention before the gate.

    The gradient sums ``dO * A`` over batch, queries and head dim; with random dO that sum can land
    near 0 while its float32 rounding error stays the size of a sum of sign-random terms, this. Shapes
    as ``reference.gated_cross_attention``; gate ``(H,)``; computed in float64.
    """
    q, k, v, gate, grad_out = (x.detach().double() for x in (q, k, v, gate, grad_out))
    opened = torch.full_like(gate, float("inf"))  # tanh(inf) = 1: the output is A itself
    attention = reference.gated_cross_attention(q, k, v, opened, key_padding_mask, scale)
    terms = (grad_out * attention).square().sum(dim=(0, 2, 3)).sqrt()
    return terms * (1 - torch.tanh(gate).square())


@contextlib.contextmanager
def poisoned_allocations(device):
    """Uninitialised memory is filled with NaN inside, so an output element a kernel skips shows."""
    previous = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        assert torch.empty(4, device=device).isnan().all(), "poisoning is not active"
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def assert_compiled_matches_eager(loss, inputs):
    """torch.compile(fullgraph=True) of a scalar loss gives the eager value and input gradients."""
    eager_inputs = [x.clone().requires_grad_() for x in inputs]
    compiled_inputs = [x.clone().requires_grad_() for x in inputs]
    expected = loss(*eager_inputs)
    expected.backward()
    value = torch.compile(loss, fullgraph=True)(*compiled_inputs)
    value.backward()
    torch.testing.assert_close(value, expected)
    for ours, theirs in zip(compiled_inputs, eager_inputs):
        torch.testing.assert_close(ours.grad, theirs.grad)
