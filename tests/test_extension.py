"""Loading the compiled extension: cheap import, JIT build (with a stale lock left behind),
fallback to the reference, build configuration, and ``dreamportrait info``."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dreamportrait import _build, _extension
from dreamportrait.cli import main

REPO = Path(__file__).resolve().parent.parent


def fresh_checkout(tmp_path: Path, with_sources: bool = True) -> Path:
    """A copy of the package with no built extension, as in a fresh clone."""
    root = tmp_path / "checkout"
    shutil.copytree(REPO / "dreamportrait", root / "dreamportrait", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    if with_sources:
        shutil.copytree(REPO / "csrc", root / "csrc")
    return root


def run_python(root: Path, code: str, cache: Path, timeout: float = 120, **env) -> str:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DREAMPORTRAIT_")}
    environment.update(PYTHONPATH=str(root), DREAMPORTRAIT_EXTENSION_CACHE=str(cache), **env)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=root, env=environment,
        capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def test_import_compiles_nothing(tmp_path):
    root = fresh_checkout(tmp_path)
    cache = tmp_path / "cache"
    run_python(root, """
        import dreamportrait, dreamportrait.ops
        from dreamportrait import _extension
        assert _extension.loaded_status() is None
    """, cache)
    assert not cache.exists()


def test_jit_build_ignores_a_stale_lock(tmp_path):
    """A killed build leaves torch's lock file behind; the next build must not wait on it."""
    root = fresh_checkout(tmp_path)
    output = run_python(root, """
        import torch
        from dreamportrait import _extension
        from dreamportrait.ops import reference, triplane_sample
        build_dir = _extension.jit_build_directory()
        build_dir.mkdir(parents=True)
        (build_dir / "lock").touch()
        planes, points = torch.randn(2, 3, 5, 6, 7, dtype=torch.float64), torch.rand(2, 50, 3, dtype=torch.float64) - 0.5
        out = triplane_sample(planes, points, backend="cpu")
        torch.testing.assert_close(out, reference.triplane_sample(planes, points, 1.0, (0, 1, 0, 2, 2, 0), "mean"))
        print(_extension.status().origin, build_dir.parent)
    """, tmp_path / "cache", timeout=900, BUILD_NO_CUDA="1")
    origin, cache_root = output.split()
    assert origin == "jit" and Path(cache_root) == tmp_path / "cache"


def test_failed_build_falls_back_to_reference_with_one_warning(tmp_path):
    root = fresh_checkout(tmp_path, with_sources=False)
    output = run_python(root, """
        import warnings, torch
        from dreamportrait import _extension
        from dreamportrait.ops import reference, triplane_sample
        planes, points = torch.randn(1, 3, 4, 5, 5), torch.rand(1, 9, 3) - 0.5
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = triplane_sample(planes, points)
            second = triplane_sample(planes, points)
        torch.testing.assert_close(first, reference.triplane_sample(planes, points, 1.0, (0, 1, 0, 2, 2, 0), "mean"))
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "reference" in messages[0], messages
        status = _extension.status()
        assert not status.available and "no C++ sources" in status.error
        print("ok")
    """, tmp_path / "cache")
    assert output.strip() == "ok"


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "extension" in out
    for backend in ("reference", "cpu", "cuda", "triton"):
        assert f"  {backend} " in out


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        return next((set(line.split(":", 1)[1].split()) for line in cpuinfo if line.startswith("flags")), set())


@pytest.mark.skipif(not _extension.status().available or not Path("/proc/cpuinfo").exists()
                    or os.uname().machine != "x86_64" or os.environ.get(_build.CPU_ARCH_VARIABLE),
                    reason="the CPU kernels' instruction set, from the kernel's CPU flags, on x86-64 Linux")
def test_cpu_kernels_use_the_widest_vectors_of_this_cpu(capsys):
    """x86-64-v4 (AVX-512 F/BW/CD/DQ/VL) gives 64-byte vectors, v3 (AVX2, FMA and the rest) 32,
    anything else 16; `dreamportrait info` says which."""
    flags = _cpu_flags()
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"} <= flags
    v4 = v3 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    expected = 64 if v4 else 32 if v3 else 16
    assert _extension.status().cpu_vector_bytes == expected
    assert main(["info"]) == 0
    name = {64: "AVX-512", 32: "AVX2 with FMA", 16: "SSE2"}[expected]
    assert f"CPU kernels   {name}" in capsys.readouterr().out


def test_one_cpu_target_builds_without_clones(monkeypatch):
    monkeypatch.setenv(_build.CPU_ARCH_VARIABLE, "x86-64-v3")
    cxx = _build.compile_flags(False, [])["cxx"]
    assert "-march=x86-64-v3" in cxx and "-DDREAMPORTRAIT_CPU_SINGLE_TARGET" in cxx
    monkeypatch.delenv(_build.CPU_ARCH_VARIABLE)
    assert not any(flag.startswith("-march") for flag in _build.compile_flags(True, [80])["cxx"])


@pytest.mark.skipif(
    _build.find_nvcc() is None or os.environ.get("BUILD_NO_CUDA") == "1"
    or _extension.status().origin != "prebuilt",
    reason="checks a prebuilt extension on a machine with nvcc",
)
def test_prebuilt_extension_holds_cuda_code_when_nvcc_exists():
    assert _extension.status().cuda_archs, "nvcc is available but dreamportrait._C has no CUDA kernels"


def test_arch_numbers():
    assert _build.arch_numbers(["8.0", "8.6+PTX", "9.0a", "sm_bogus"]) == [80, 86, 90]


def test_ptx_arch_numbers():
    assert _build.ptx_arch_numbers(["8.0", "8.6+PTX", "9.0+ptx", "10.0"]) == [86, 90]


def test_nvcc_sees_no_comma_separated_define():
    flags = _build.compile_flags(True, [80, 90], [90])
    assert "-DDREAMPORTRAIT_CUDA_SASS_ARCHS=80,90" in flags["cxx"]
    assert "-DDREAMPORTRAIT_CUDA_PTX_ARCHS=90" in flags["cxx"]
    assert not any("," in flag for flag in flags["nvcc"])
    assert "-DDREAMPORTRAIT_WITH_CUDA" not in _build.compile_flags(False, [])["cxx"]


def test_cuda_build_switches(monkeypatch):
    monkeypatch.setenv("BUILD_NO_CUDA", "1")
    monkeypatch.setenv("FORCE_CUDA", "1")
    assert not _build.cuda_requested(cuda_usable=True)
    monkeypatch.delenv("BUILD_NO_CUDA")
    assert _build.cuda_requested(cuda_usable=False)


@pytest.mark.skipif(_build.find_nvcc() is None, reason="no nvcc")
def test_cuda_defaults_without_a_gpu(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    archs = _build.configure_cuda_environment([])
    assert archs == ["8.0", "8.6", "9.0+PTX"]
    assert (Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc").is_file()
    assert (Path(os.environ["CUDA_HOME"]) / "include" / "cuda_runtime.h").is_file()


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("Yes", True), (" ON ", True),
                                             ("TRUE", True), ("0", False), ("off", False), ("", False)])
def test_build_switches_read_the_usual_spellings(monkeypatch, value, expected):
    monkeypatch.setenv("DREAMPORTRAIT_TEST_FLAG", value)
    assert _build.env_flag("DREAMPORTRAIT_TEST_FLAG") is expected
    monkeypatch.delenv("DREAMPORTRAIT_TEST_FLAG")
    assert _build.env_flag("DREAMPORTRAIT_TEST_FLAG") is False


@pytest.mark.parametrize("usable, nvcc, expected", [(True, "/opt/cuda/bin/nvcc", True), (True, None, False),
                                                    (False, "/opt/cuda/bin/nvcc", False), (False, None, False)])
def test_cuda_is_built_when_usable_and_nvcc_is_found(monkeypatch, usable, nvcc, expected):
    monkeypatch.delenv("BUILD_NO_CUDA", raising=False)
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    monkeypatch.setattr(_build, "find_nvcc", lambda: nvcc)
    assert _build.cuda_requested(cuda_usable=usable) is expected


def test_compile_flags_without_and_with_cuda(monkeypatch):
    monkeypatch.delenv(_build.CPU_ARCH_VARIABLE, raising=False)
    assert _build.compile_flags(False, []) == {"cxx": _build.CXX_FLAGS, "nvcc": _build.NVCC_FLAGS}
    flags = _build.compile_flags(True, [80], [])
    assert flags["nvcc"] == _build.NVCC_FLAGS + ["-DDREAMPORTRAIT_WITH_CUDA"]
    assert flags["cxx"] == _build.CXX_FLAGS + ["-DDREAMPORTRAIT_WITH_CUDA", "-DDREAMPORTRAIT_CUDA_SASS_ARCHS=80"]
