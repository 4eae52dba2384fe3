"""Loads the compiled operators ``torch.ops.dreamportrait.*`` on first use.

In order: the prebuilt module ``dreamportrait._C`` (``python setup.py build_ext --inplace`` or
``pip install``); else a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load``, cached in
a directory keyed by a hash of the sources and flags; else nothing, and the ops fall back to the
PyTorch reference with one warning (see :mod:`dreamportrait.ops._backend`).

A JIT build compiles the CUDA kernels only when this process can use them (a GPU is visible, or
``FORCE_CUDA=1``); ``BUILD_NO_CUDA=1`` skips them as in ``setup.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from . import _build

CACHE_ENV = "DREAMPORTRAIT_EXTENSION_CACHE"


@dataclass(frozen=True)
class ExtensionStatus:
    available: bool
    origin: str  # "prebuilt", "jit" or "unavailable"
    cuda_archs: tuple[int, ...] = ()  # compute capabilities with SASS, e.g. (80, 86, 90)
    error: str | None = None  # why it is unavailable
    cuda_ptx_archs: tuple[int, ...] = ()  # compute capabilities with PTX, e.g. (90,)
    path: str | None = None  # the loaded library
    cpu_vector_bytes: int = 0  # vector width of the CPU kernels on this CPU: 64 AVX-512, 32 AVX2, 16 SSE2

    @property
    def has_cuda(self) -> bool:
        return bool(self.cuda_archs)


_lock = threading.Lock()
_status: ExtensionStatus | None = None


def status() -> ExtensionStatus:
    """Load the operators once per process (building them if needed) and say how it went."""
    global _status
    with _lock:
        if _status is None:
            _status = _load()
        return _status


def loaded_status() -> ExtensionStatus | None:
    """The status if loading was already attempted, without attempting it."""
    return _status


def _load() -> ExtensionStatus:
    import torch

    errors = []
    for origin, load in (("prebuilt", _load_prebuilt), ("jit", _jit_build)):
        try:
            path = load()
        except Exception as error:  # noqa: BLE001 - any failure means: try the next way
            errors.append(f"{origin}: {type(error).__name__}: {str(error).strip()[-2000:]}")
            continue
        from .ops import _registration

        _registration.register_compiled_ops()
        sass = tuple(int(a) for a in torch.ops.dreamportrait.cuda_archs())
        ptx = tuple(int(a) for a in torch.ops.dreamportrait.cuda_ptx_archs())
        return ExtensionStatus(True, origin, sass, cuda_ptx_archs=ptx, path=str(path),
                               cpu_vector_bytes=int(torch.ops.dreamportrait.cpu_vector_bytes()))
    return ExtensionStatus(False, "unavailable", (), "\n".join(errors))


def _load_prebuilt() -> Path:
    # The build next to this file, by path: an import could find another checkout's build through
    # an editable install's finder.
    package_dir = Path(__file__).resolve().parent
    candidates = [package_dir / f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        raise ImportError(f"no prebuilt dreamportrait._C in {package_dir}")
    spec = importlib.util.spec_from_file_location("dreamportrait._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["dreamportrait._C"] = module
    return path


def _jit_with_cuda() -> bool:
    """A JIT build compiles the CUDA kernels only where this process can run them."""
    import torch

    return _build.cuda_requested(cuda_usable=torch.cuda.is_available())


def jit_build_directory(with_cuda: bool | None = None) -> Path:
    """The cache directory of the JIT build for the current sources, flags and torch."""
    import torch

    if with_cuda is None:
        with_cuda = _jit_with_cuda()
    digest = hashlib.sha256()
    for path in _build.all_source_files():
        digest.update(str(path.relative_to(_build.SOURCE_ROOT)).encode())
        digest.update(path.read_bytes())
    key = [torch.__version__, str(torch.version.cuda), str(with_cuda), repr(_build.compile_flags(with_cuda, [])),
           os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
    digest.update("|".join(key).encode())
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dreamportrait" / "extensions")
    return root / digest.hexdigest()[:20]


def _jit_build() -> Path:
    if not _build.SOURCE_ROOT.is_dir():
        raise FileNotFoundError(f"no C++ sources at {_build.SOURCE_ROOT} to JIT-build from")
    with_cuda = _jit_with_cuda()
    sass_archs, ptx_archs = _build.target_archs(_build.visible_gpu_capabilities()) if with_cuda else ([], [])
    from torch.utils import cpp_extension

    if with_cuda and cpp_extension.CUDA_HOME is None:
        # cpp_extension looked for the toolkit when it was first imported, maybe before we set it.
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    build_dir = jit_build_directory(with_cuda)
    build_dir.mkdir(parents=True, exist_ok=True)
    flags = _build.compile_flags(with_cuda, sass_archs, ptx_archs)
    sources = _build.cpu_sources() + (_build.cuda_sources() if with_cuda else [])
    # torch's own build lock is a file that a killed build leaves behind, and the next build then
    # waits on it forever. We serialise builds with an OS lock instead (released when its holder
    # dies, however it dies); whoever holds it may remove torch's lock, since nobody else builds.
    name = f"dreamportrait_C_{build_dir.name}"
    with open(build_dir.with_suffix(".lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(s) for s in sources],
            extra_include_paths=[str(p) for p in _build.include_dirs()],
            extra_cflags=flags["cxx"],
            extra_cuda_cflags=flags["nvcc"],
            extra_ldflags=_build.LINK_FLAGS,
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=False,
        )
    return build_dir / f"{name}.so"
