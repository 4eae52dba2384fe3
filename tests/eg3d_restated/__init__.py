"""EG3D's code as tests need it, re-stated by us from EG3D's published math and structure (never
copied): the top-level packages ``torch_utils``, ``dnnlib`` and ``training`` under the module paths
EG3D uses, so that objects pickle, and renderers get patched, exactly as EG3D's own would.

:func:`eg3d_code` puts this directory on ``sys.path`` and imports the modules for the duration of a
``with`` block (a test fixture), then removes them again, leaving ``sys.modules`` as it was.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGES = ("torch_utils", "dnnlib", "training")
MODULES = ("torch_utils.persistence", "dnnlib.util", "training.networks_stylegan2", "training.triplane",
           "training.volumetric_rendering.ray_marcher", "training.volumetric_rendering.ray_sampler",
           "training.volumetric_rendering.renderer")


def _ours(name: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in PACKAGES)


@contextlib.contextmanager
def eg3d_code():
    """Yields a namespace of the re-stated EG3D modules, importable by their EG3D names meanwhile."""
    saved = {name: module for name, module in sys.modules.items() if _ours(name)}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(ROOT))
    try:
        modules = {name: importlib.import_module(name) for name in MODULES}
        yield type("EG3D", (), {name.rsplit(".", 1)[-1]: module for name, module in modules.items()})
    finally:
        sys.path.remove(str(ROOT))
        for name in [name for name in sys.modules if _ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)
