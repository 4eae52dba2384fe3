"""Helpers shared by the tests: which backends this machine can run, tolerances, poisoned
allocations and the torch.compile comparison."""

import contextlib

import pytest
import torch

from dreamportrait import _extension
from dreamportrait.ops import _backend


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


def assert_close_scaled(actual, expected, rtol, name=""):
    """Elementwise ``|actual - expected| <= rtol * (|expected| + max(max|expected|, 1))``: relative
    to the tensor's magnitude, so rounding residues of values that cancel to ~0 pass."""
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=rtol, atol=rtol * max(scale, 1.0), equal_nan=True, msg=lambda m: f"{name}: {m}"
    )


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
