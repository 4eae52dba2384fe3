"""What the GPU compilers make of the ops' kernels, without a GPU.

Triton compiles a kernel for any NVIDIA target on a machine without one, and ``cuobjdump`` (shipped
inside the triton wheel) reads the compiled code. This module

- runs the public ops over every dtype and variant they support on the triton backend and records
  the launches their own launch code makes (:func:`record_op_launches`; needs ``TRITON_INTERPRET=1``
  on a machine without a GPU),
- compiles each distinct launch to a cubin for a target architecture, exactly as a launch on that
  GPU would (same signature, specialisation and constants; :func:`compile_launch`), and reads its
  registers, spills and shared memory,
- reads the same figures, and the SASS and PTX architectures, of the compiled CUDA extension
  (:func:`extension_kernels`, :func:`extension_archs`).

The test suite uses it as a compile gate; ``python -m dreamportrait.ops.triton.compile_check``
prints the tables of BENCHMARKS.md.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .launch import Launch, recording

# sm_80 (A100), sm_90 (H100/H200), sm_100 (B200): every generation users run on.
TARGET_ARCHS = (80, 90, 100)
# Shared memory one block may use on each (bytes): 163 KiB on sm_80, 227 KiB on sm_90 and sm_100.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}


@dataclass(frozen=True)
class Resources:
    """Per-thread registers, spill bytes (stack and local) and shared memory of one compiled kernel."""

    registers: int
    stack: int
    local: int
    shared: int

    @property
    def spills(self) -> int:
        return self.stack + self.local


@dataclass(frozen=True)
class CompiledLaunch:
    """A recorded launch compiled for ``arch``: its resources (None with ``error``) and warps."""

    launch: Launch
    arch: int
    resources: Resources | None
    num_warps: int
    tensor_core: bool
    error: str | None

    @property
    def dtype(self) -> torch.dtype:
        return launch_dtype(self.launch)


# --- Recording the ops' launches ----------------------------------------------------------------

def op_variants() -> Iterator[tuple[str, Callable[[], None]]]:
    """``(description, run)`` for each dtype and variant of the three ops on the triton backend;
    ``run`` calls the public op forward and backward on small CPU (or CUDA) tensors. Shapes come in
    two kinds: sizes divisible by 16 and ragged ones, since Triton specialises on both."""
    from .. import composite_rays, gated_cross_attention, sample_and_decode, triplane_sample
    from .._checks import backend_dtypes
    from ..triplane_sample import EG3D_AXES, ORTHOGONAL_AXES, REDUCTIONS

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = backend_dtypes("triton")

    def randn(*shape, dtype):
        return torch.randn(shape, device=device).to(dtype).requires_grad_()

    # tri-plane: every dtype, reduction and axes preset at an aligned shape (points, channels,
    # height, width); ragged shapes and other channel tiles for every dtype.
    shapes = [((64, 32, 16, 16), reduce, axes) for reduce in REDUCTIONS for axes in (EG3D_AXES, ORTHOGONAL_AXES)]
    shapes += [(shape, "mean", EG3D_AXES) for shape in ((37, 3, 5, 7), (19, 96, 8, 12))]
    for dtype in dtypes:
        for (count, channels, height, width), reduce, axes in shapes:
            def run(dtype=dtype, reduce=reduce, axes=axes, count=count, channels=channels, h=height, w=width):
                planes = randn(1, 3, channels, h, w, dtype=dtype)
                points = (torch.rand(1, count, 3, device=device) - 0.5).to(dtype).requires_grad_()
                out = triplane_sample(planes, points, box_warp=1.0, axes=axes, reduce=reduce, backend="triton")
                out.sum().backward()
            yield f"triplane_sample {dtype} reduce={reduce} axes={axes} N={count} C={channels}", run

    # the fused sample-and-decode at EG3D's decoder sizes (C 32, K 64, O 33) and a smaller one
    for dtype in dtypes:
        for count, channels, hidden, outputs in ((64, 32, 64, 33), (37, 16, 16, 4)):
            def run(dtype=dtype, count=count, channels=channels, hidden=hidden, outputs=outputs):
                planes = randn(1, 3, channels, 8, 8, dtype=dtype)
                points = (torch.rand(1, count, 3, device=device) - 0.5).to(dtype).requires_grad_()
                layers = [randn(hidden, channels, dtype=dtype), randn(hidden, dtype=dtype),
                          randn(outputs, hidden, dtype=dtype), randn(outputs, dtype=dtype)]
                out = sample_and_decode(planes, points, 1.0, *layers, backend="triton")
                out.sum().backward()
            yield f"sample_and_decode {dtype} N={count} C={channels} K={hidden} O={outputs}", run

    # compositing: (rays, samples, channels), threshold on (inference) and off (with backward)
    for dtype in dtypes:
        for rays, samples, channels in ((64, 48, 32), (37, 13, 3)):
            for threshold in (None, 1e-3):
                def run(dtype=dtype, rays=rays, samples=samples, channels=channels, threshold=threshold):
                    densities = torch.rand(rays, samples, device=device).to(dtype).requires_grad_()
                    colors = randn(rays, samples, channels, dtype=dtype)
                    depths = torch.linspace(2.0, 3.0, samples, device=device).to(dtype).expand(rays, samples)
                    deltas = torch.full((rays, samples), 1.0 / samples, device=device, dtype=dtype)
                    with torch.set_grad_enabled(threshold is None):  # the threshold is for inference
                        outputs = composite_rays(densities, colors, depths, deltas, transmittance_threshold=threshold,
                                                 backend="triton")
                    if threshold is None:
                        sum(o.sum() for o in outputs).backward()
                yield f"composite_rays {dtype} R={rays} S={samples} C={channels} threshold={threshold}", run

    # attention: every dtype, head dim (powers of two and not; every tile size) and mask at ragged
    # lengths, and aligned lengths with a scalar gate
    shapes = [(64, 77, (2,), dim, masked) for dim in (16, 24, 40, 64, 128, 256) for masked in (False, True)]
    shapes += [(33, 16, (), 64, masked) for masked in (False, True)]
    for dtype in dtypes:
        for queries, keys, gate_shape, dim, masked in shapes:
            def run(dtype=dtype, dim=dim, masked=masked, queries=queries, keys=keys, gate_shape=gate_shape):
                q, k, v = (randn(1, 2, length, dim, dtype=dtype) for length in (queries, keys, keys))
                gate = randn(*gate_shape, dtype=dtype)
                mask = torch.rand(1, keys, device=device) < 0.7 if masked else None
                out = gated_cross_attention(q, k, v, gate, key_padding_mask=mask, backend="triton")
                out.sum().backward()
            yield (f"gated_cross_attention {dtype} D={dim} mask={masked} Lq={queries} Lk={keys} "
                   f"gate={gate_shape}"), run
    # float32 on TF32 tensor cores, as when torch allows TF32 matmuls
    for dim in (64, 128):
        def run(dim=dim):
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                q, k, v = (randn(1, 2, length, dim, dtype=torch.float32) for length in (64, 77, 77))
                gated_cross_attention(q, k, v, randn(2, dtype=torch.float32), backend="triton").sum().backward()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
        yield f"gated_cross_attention torch.float32 tf32 D={dim}", run


def record_op_launches(variants: Iterable[tuple[str, Callable[[], None]]] | None = None) -> list[Launch]:
    """The distinct launches that ``variants`` (default: :func:`op_variants`) make. The kernels are
    not run (a dry run: see :func:`~dreamportrait.ops.triton.launch.recording`)."""
    with recording(dry_run=True) as launches:
        for _, run in variants if variants is not None else op_variants():
            run()
    return list(dict.fromkeys(launches))


def launch_dtype(launch: Launch) -> torch.dtype:
    """The dtype a launch computes in: that of its first floating-point tensor argument."""
    from .launch import TensorArgument

    for _, value in launch.arguments:
        if isinstance(value, TensorArgument) and value.dtype.is_floating_point:
            return value.dtype
    raise ValueError(f"{launch.kernel} has no floating-point tensor argument")


# --- Compiling a launch -------------------------------------------------------------------------

def compile_launch(launch: Launch, arch: int) -> CompiledLaunch:
    """Compile ``launch`` for ``sm_<arch>`` down to a cubin and read what it uses.

    Call it in a process where triton runs without the interpreter (:func:`compile_launches` makes
    such processes): the interpreter re-binds ``triton.language`` while it runs a kernel, and the
    compiler fails on what it leaves behind.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    kernel = getattr(importlib.import_module(launch.module), launch.name)
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{launch.kernel} is interpreted here: compile it in a process without TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    launch_options = dict(launch.options)
    # What JITFunction.run does before it compiles, with the recorded arguments.
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(**dict(launch.arguments), **launch_options)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch_options, bound, specialization, options)
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    except Exception as error:  # noqa: BLE001 - a compiler error of any kind is the result
        return CompiledLaunch(launch, arch, None, options.num_warps, False, _error_message(error))
    cubin = compiled.asm["cubin"]
    (function, usage), = cubin_resources(cubin).items()
    resources = Resources(usage.registers, usage.stack, usage.local, compiled.metadata.shared)
    return CompiledLaunch(launch, arch, resources, compiled.metadata.num_warps, has_tensor_core_code(cubin), None)


def _error_message(error: BaseException) -> str:
    """The compiler's own words: a CompilationError's cause, else the error, on one line."""
    cause = error.__cause__ or error
    return " ".join(f"{type(error).__name__}: {cause}".split())[:500]


def compile_launches(launches: Iterable[Launch], archs: Iterable[int] = TARGET_ARCHS,
                     workers: int | None = None) -> list[CompiledLaunch]:
    """:func:`compile_launch` of every launch for every arch, in ``workers`` fresh processes
    (default: one per CPU, at most 8: each imports torch, about 1 GB) that run triton without the
    interpreter. Triton caches cubins on disk, so a second run is fast."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(launch, arch) for launch in launches for arch in archs]
    context = multiprocessing.get_context("spawn")
    # The workers inherit the environment when they start, before they import anything.
    interpret = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        with ProcessPoolExecutor(workers or min(os.cpu_count() or 1, 8), mp_context=context) as pool:
            return list(pool.map(_compile_job, jobs, chunksize=2))
    finally:
        if interpret is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = interpret


def _compile_job(job: tuple[Launch, int]) -> CompiledLaunch:
    return compile_launch(*job)


# --- Reading compiled code ----------------------------------------------------------------------

def cuobjdump() -> str:
    """The cuobjdump shipped inside the triton wheel (any CUDA toolkit's works as well)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.is_file():
        raise FileNotFoundError(f"cuobjdump not found at {path}")
    return str(path)


def _cuobjdump(*arguments: str) -> str:
    result = subprocess.run([cuobjdump(), *arguments], capture_output=True, text=True, check=False)
    if result.returncode != 0 and "No PTX file found" not in result.stderr + result.stdout:
        raise RuntimeError(f"cuobjdump {' '.join(arguments)} failed: {result.stderr.strip()}")
    return result.stdout


def _with_cubin(cubin: bytes, *arguments: str) -> str:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "kernel.cubin"
        path.write_bytes(cubin)
        return _cuobjdump(*arguments, str(path))


_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_USAGE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
_ARCH = re.compile(r"^arch = sm_(\d+)")


def parse_resource_usage(text: str) -> dict[tuple[int | None, str], Resources]:
    """``cuobjdump -res-usage`` output -> ``{(arch, function): Resources}`` (arch None for a lone
    cubin, which prints none). Shared memory here is the static amount."""
    usage: dict[tuple[int | None, str], Resources] = {}
    arch = function = None
    for line in text.splitlines():
        if match := _ARCH.match(line.strip()):
            arch = int(match.group(1))
        elif match := _FUNCTION.match(line):
            function = match.group(1)
        elif function is not None and (fields := dict(_USAGE.findall(line))):
            usage[(arch, function)] = Resources(int(fields.get("REG", 0)), int(fields.get("STACK", 0)),
                                                int(fields.get("LOCAL", 0)), int(fields.get("SHARED", 0)))
            function = None
    return usage


def cubin_resources(cubin: bytes) -> dict[str, Resources]:
    return {function: r for (_, function), r in parse_resource_usage(_with_cubin(cubin, "-res-usage")).items()}


# HMMA (sm_80+ mma.sync), HGMMA (Hopper's warpgroup wgmma), UTC*MMA (Blackwell's tcgen05), DMMA (fp64).
_TENSOR_CORE = re.compile(r"\b(HMMA|HGMMA|UTC\w*MMA|DMMA)\b")


def has_tensor_core_code(cubin: bytes) -> bool:
    """Whether the SASS holds a tensor-core matrix instruction."""
    return bool(_TENSOR_CORE.search(_with_cubin(cubin, "-sass")))


def extension_kernels(library: str | os.PathLike) -> dict[tuple[int | None, str], Resources]:
    """``{(arch, mangled kernel name): Resources}`` of every CUDA kernel in the extension."""
    return parse_resource_usage(_cuobjdump("-res-usage", str(library)))


def extension_archs(library: str | os.PathLike) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The architectures the extension holds SASS for and those it holds PTX for."""
    sass = re.findall(r"\.sm_(\d+)\.cubin", _cuobjdump("--list-elf", str(library)))
    ptx = re.findall(r"\.sm_(\d+)\.ptx", _cuobjdump("--list-ptx", str(library)))
    return tuple(sorted({int(a) for a in sass})), tuple(sorted({int(a) for a in ptx}))


# --- Tables -------------------------------------------------------------------------------------

def _constexpr_summary(launch: Launch) -> str:
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_C", "BLOCK_R", "PRECISION", "HAS_MASK", "PER_PLANE", "MEAN")
    values = dict(launch.arguments)
    return " ".join(f"{name}={values[name]}" for name in names if name in values)


def triton_table(results: Iterable[CompiledLaunch]) -> str:
    """Markdown: per kernel, dtype and arch, the worst case over its variants."""
    groups: dict[tuple[str, str, int], list[CompiledLaunch]] = {}
    for result in results:
        key = (result.launch.kernel.replace("dreamportrait.ops.triton.", ""),
               str(result.dtype).removeprefix("torch."), result.arch)
        groups.setdefault(key, []).append(result)
    lines = ["| kernel | dtype | arch | variants | compiled | max registers | max spill bytes | max shared (B) "
             "| warps | tensor cores |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, dtype, arch), group in sorted(groups.items()):
        ok = [r for r in group if r.resources is not None]
        registers = max((r.resources.registers for r in ok), default=0)
        spills = max((r.resources.spills for r in ok), default=0)
        shared = max((r.resources.shared for r in ok), default=0)
        warps = sorted({r.num_warps for r in group})
        tensor_core = "yes" if ok and all(r.tensor_core for r in ok) else ("some" if any(r.tensor_core for r in ok)
                                                                           else "no")
        lines.append(f"| {kernel} | {dtype} | sm_{arch} | {len(group)} | {len(ok)}/{len(group)} | {registers} "
                     f"| {spills} | {shared} | {','.join(map(str, warps))} | {tensor_core} |")
    return "\n".join(lines)


def extension_table(library: str | os.PathLike) -> str:
    lines = ["| kernel | arch | registers | stack | local | static shared (B) |", "|---|---|---|---|---|---|"]
    for (arch, function), r in sorted(extension_kernels(library).items(), key=lambda item: (item[0][1], item[0][0])):
        lines.append(f"| `{_demangle(function)}` | sm_{arch} | {r.registers} | {r.stack} | {r.local} | {r.shared} |")
    return "\n".join(lines)


def _demangle(name: str) -> str:
    """``forward_kernel<float, float>`` for a mangled kernel name (the name itself without c++filt)."""
    try:
        demangled = subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return name
    # Drop the namespace first: "(anonymous namespace)" would end the name at its parenthesis.
    return demangled.replace("dreamportrait::(anonymous namespace)::", "").split("(")[0].removeprefix("void ")


def main() -> int:
    """Print the compile tables (Triton launches and the CUDA extension) as Markdown."""
    from ... import _extension

    launches = record_op_launches()
    print(f"{len(launches)} distinct Triton launches, compiled for {', '.join(f'sm_{a}' for a in TARGET_ARCHS)}\n")
    print(triton_table(compile_launches(launches)))
    status = _extension.status()
    if status.has_cuda:
        sass, ptx = extension_archs(status.path)
        print(f"\nCUDA extension: SASS {', '.join(f'sm_{a}' for a in sass)}; "
              f"PTX {', '.join(f'compute_{a}' for a in ptx) or 'none'}\n")
        print(extension_table(status.path))
    return 0


if __name__ == "__main__":
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Recording runs the ops on CPU tensors, which needs the interpreter, and the interpreter
        # must be on before triton.jit wraps the kernels (when the package is imported): start
        # again with it.
        os.execve(sys.executable, [sys.executable, "-m", "dreamportrait.ops.triton.compile_check", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    raise SystemExit(main())
