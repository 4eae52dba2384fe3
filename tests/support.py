"""Helpers shared by the tests: which backends this machine can run."""

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
