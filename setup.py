"""Builds the extension ``dreamportrait._C`` (package metadata lives in pyproject.toml).

    python setup.py build_ext --inplace          # or: pip install --no-build-isolation -e .

C++ CPU kernels are always built. CUDA kernels are built whenever nvcc is found (or FORCE_CUDA=1),
and skipped with BUILD_NO_CUDA=1. See dreamportrait/_build.py for the defaults of CUDA_HOME and
TORCH_CUDA_ARCH_LIST.
"""

import importlib.util
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def load_build_config():
    # By path, so that building never imports the package itself.
    spec = importlib.util.spec_from_file_location("_dreamportrait_build", ROOT / "dreamportrait" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension_modules():
    build = load_build_config()
    import torch

    with_cuda = build.cuda_requested(cuda_usable=torch.version.cuda is not None)
    sass_archs, ptx_archs = build.target_archs(build.visible_gpu_capabilities()) if with_cuda else ([], [])

    # Imported only now: cpp_extension reads CUDA_HOME when it is first imported.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = [str(p.relative_to(ROOT)) for p in build.cpu_sources()]
    if with_cuda:
        sources += [str(p.relative_to(ROOT)) for p in build.cuda_sources()]
    extension = CUDAExtension if with_cuda else CppExtension
    module = extension(
        name="dreamportrait._C",
        sources=sources,
        include_dirs=[str(p) for p in build.include_dirs()],
        extra_compile_args=build.compile_flags(with_cuda, sass_archs, ptx_archs),
        extra_link_args=build.LINK_FLAGS,
    )
    print(f"dreamportrait: building _C with CUDA={f'yes, SASS {sass_archs}, PTX {ptx_archs}' if with_cuda else 'no'}")
    return [module], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
