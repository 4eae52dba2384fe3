"""How the extension ``dreamportrait._C`` is built: sources, CUDA detection and compiler flags.

``setup.py`` and the JIT fallback (:mod:`dreamportrait._extension`) both use this module, so an
ahead-of-time build and a JIT build compile the same code with the same flags. It imports nothing
from torch, so ``setup.py`` can configure the environment before ``torch.utils.cpp_extension``
reads it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parent.parent / "csrc"
# SASS for A100 (8.0), RTX 30xx/A10/A40 (8.6) and H100/H200 (9.0), plus PTX of 9.0 that the driver
# compiles at load time on any newer GPU (Blackwell and later), which has no SASS here.
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0+PTX"

# The language standard is torch's (C++20 for torch 2.14). -fopenmp-simd only enables
# `#pragma omp simd` (vectorised reductions), no OpenMP runtime.
# -fno-trapping-math (as torch builds itself): floating-point operations are not expected to raise
# exceptions, so GCC may turn the kernels' clamps and selects (softplus, the exponentials) into
# branch-free vector code; without AVX-512's masks it otherwise leaves those loops scalar. Results
# are unchanged (NaN and inf included); only the exception flags, which nothing reads, may differ.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math"]
# DREAMPORTRAIT_CPU_ARCH=x86-64-v3 (any -march value) builds the CPU kernels for that one target
# instead of the instruction-set clones of cpu_dispatch.h: to measure, on an AVX-512 machine, what
# an AVX2-only CPU runs (with ATEN_CPU_CAPABILITY=avx2 for torch's own kernels; BENCHMARKS.md).
CPU_ARCH_VARIABLE = "DREAMPORTRAIT_CPU_ARCH"
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def cpu_sources() -> list[Path]:
    return [SOURCE_ROOT / "ops.cpp", *sorted((SOURCE_ROOT / "cpu").glob("*.cpp"))]


def cuda_sources() -> list[Path]:
    return sorted((SOURCE_ROOT / "cuda").glob("*.cu"))


def include_dirs() -> list[Path]:
    return [SOURCE_ROOT / "include"]


def all_source_files() -> list[Path]:
    """Every file whose content changes the build (sources and headers)."""
    return sorted(p for p in SOURCE_ROOT.rglob("*") if p.is_file())


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def toolkit_of(nvcc: str) -> str:
    """The CUDA toolkit directory ``nvcc`` belongs to.

    ``nvcc`` on PATH may be a wrapper script or a symlink outside the toolkit, so ask nvcc itself:
    its dry run prints the directory of the real binary as ``_HERE_``.
    """
    try:
        dry_run = subprocess.run(
            [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60, check=False,
        )
        match = re.search(r"^#\$ _HERE_=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
        if match:
            return str(Path(match.group(1).strip()).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        pass
    return str(Path(nvcc).resolve().parent.parent)


def cuda_requested(cuda_usable: bool) -> bool:
    """Whether to compile the CUDA kernels: ``BUILD_NO_CUDA=1`` skips them, ``FORCE_CUDA=1``
    demands them, otherwise they are built when ``cuda_usable`` (setup.py: torch is a CUDA build;
    the JIT build: a GPU is visible) and nvcc is found."""
    if env_flag("BUILD_NO_CUDA"):
        return False
    if env_flag("FORCE_CUDA"):
        return True
    return cuda_usable and find_nvcc() is not None


def configure_cuda_environment(visible_capabilities: list[tuple[int, int]]) -> list[str]:
    """Set ``CUDA_HOME`` and ``TORCH_CUDA_ARCH_LIST`` for a CUDA build; return the arch list.

    ``CUDA_HOME`` defaults to the toolkit nvcc belongs to. ``TORCH_CUDA_ARCH_LIST`` defaults to the
    visible GPUs' capabilities, or with no GPU visible to :data:`DEFAULT_CUDA_ARCHS`; either way the
    newest architecture also gets PTX (``+PTX``), so that a newer GPU can run the build.
    """
    if not os.environ.get("CUDA_HOME"):
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        os.environ["CUDA_HOME"] = toolkit_of(nvcc)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if visible_capabilities:
            archs = [f"{major}.{minor}" for major, minor in sorted(set(visible_capabilities))]
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs[:-1] + [archs[-1] + "+PTX"])
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return [a for a in re.split(r"[;\s]+", os.environ["TORCH_CUDA_ARCH_LIST"]) if a]


def arch_numbers(archs: list[str]) -> list[int]:
    """The architectures a build holds SASS for: ``["8.0", "8.6+PTX", "9.0a"]`` -> ``[80, 86, 90]``."""
    numbers = []
    for arch in archs:
        match = re.match(r"(\d+)\.(\d+)", arch)
        if match:
            numbers.append(int(match.group(1)) * 10 + int(match.group(2)))
    return numbers


def ptx_arch_numbers(archs: list[str]) -> list[int]:
    """The architectures a build holds PTX for: ``["8.0", "9.0+PTX"]`` -> ``[90]``."""
    return arch_numbers([a for a in archs if a.upper().endswith("+PTX")])


def visible_gpu_capabilities() -> list[tuple[int, int]]:
    """(major, minor) compute capability of each visible GPU; empty without one."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def target_archs(visible_capabilities: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Configure the environment for a CUDA build and return the compute capabilities it targets
    (80 = sm_80): those it holds SASS for and those it holds PTX for."""
    archs = configure_cuda_environment(visible_capabilities)
    return arch_numbers(archs), ptx_arch_numbers(archs)


def compile_flags(with_cuda: bool, sass_archs: list[int], ptx_archs: list[int] = ()) -> dict[str, list[str]]:
    """Compiler flags for the C++ (``cxx``) and CUDA (``nvcc``) translation units."""
    cpu_arch = os.environ.get(CPU_ARCH_VARIABLE, "").strip()
    cxx = CXX_FLAGS + ([f"-march={cpu_arch}", "-DDREAMPORTRAIT_CPU_SINGLE_TARGET"] if cpu_arch else [])
    if not with_cuda:
        return {"cxx": cxx, "nvcc": list(NVCC_FLAGS)}
    defines = ["-DDREAMPORTRAIT_WITH_CUDA"]
    # Read by ops.cpp only (so `dreamportrait info` can say what the build holds); nvcc would split
    # the comma-separated values into separate arguments.
    archs_defines = [f"-DDREAMPORTRAIT_CUDA_{name}_ARCHS=" + ",".join(str(a) for a in archs)
                     for name, archs in (("SASS", sass_archs), ("PTX", ptx_archs)) if archs]
    return {"cxx": cxx + defines + archs_defines, "nvcc": NVCC_FLAGS + defines}
