"""Which implementation of an op runs a call.

By default the device decides: CPU tensors -> the C++ ``cpu`` kernels, CUDA tensors -> the
``cuda`` kernels, any other device -> ``reference``. A call's ``backend=`` argument, or else the
environment variable ``DREAMPORTRAIT_BACKEND``, forces one of ``reference``, ``cpu``, ``cuda``,
``triton``; a forced backend that cannot run the call is an error. When the default choice needs
the compiled extension and it cannot be loaded or built, the reference runs instead, with one
warning per process. Under ``torch.compile`` the choice is made once, while tracing, and is part
of the compiled graph: changing ``DREAMPORTRAIT_BACKEND`` later does not recompile it.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .. import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")
BACKEND_ENV = "DREAMPORTRAIT_BACKEND"

_warned: set[str] = set()


def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# Evaluated once while torch.compile traces and treated as a constant, so the choice (which reads
# the environment and may load the extension) never breaks a graph.
@torch.compiler.assume_constant_result
def select_backend(op: str, device_type: str, requested: str | None) -> str:
    """The backend that runs ``op`` on tensors of ``device_type``; see the module docstring."""
    if requested is not None:
        source, name = "backend", requested
    elif os.environ.get(BACKEND_ENV):
        source, name = BACKEND_ENV, os.environ[BACKEND_ENV].strip().lower()
    else:
        source, name = None, {"cpu": "cpu", "cuda": "cuda"}.get(device_type, "reference")
    if name not in BACKENDS:
        raise ValueError(f"{op}: {source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    if name == "reference":
        return name
    if name in ("cpu", "cuda") and device_type != name:
        raise ValueError(f"{op}: {source}={name!r} needs {name.upper()} tensors, got {device_type} tensors")
    if name == "triton":
        if not triton_importable():
            raise RuntimeError(f"{op}: {source}='triton' but the triton package is not installed")
        if device_type == "cpu" and not triton_interpreted():
            raise ValueError(f"{op}: {source}='triton' runs on CPU tensors only under TRITON_INTERPRET=1")
        if device_type not in ("cpu", "cuda"):
            raise ValueError(f"{op}: {source}='triton' needs CUDA tensors, got {device_type} tensors")
        return name
    status = _extension.status()
    problem = None
    if not status.available:
        problem = f"the compiled extension could not be loaded or built:\n{status.error}"
    elif name == "cuda" and not status.has_cuda:
        problem = "the compiled extension was built without CUDA kernels (rebuild with nvcc available)"
    if problem is None:
        return name
    if source is not None:
        raise RuntimeError(f"{op}: {source}={name!r} is unavailable: {problem}")
    _warn_once(
        f"fallback-{name}",
        f"dreamportrait: using the slow PyTorch reference ops because {problem}",
    )
    return "reference"
