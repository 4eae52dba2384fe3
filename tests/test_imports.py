"""Every module of the package imports on its own, as the first of the package in a fresh
interpreter: no import cycle, and no module that works only after another has been imported."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dreamportrait"

# One interpreter forks a child per module, so that each module is the first of the package to be
# imported. Beforehand it imports the third-party modules that importing the whole package loads (a
# first child reports them), so that no child pays for torch or transformers again.
IMPORT_EACH = """
import importlib, os, sys, tempfile, traceback

def fork(run):
    child = os.fork()
    if child == 0:
        try:
            run()
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        os._exit(0)
    return os.waitpid(child, 0)[1] == 0

def ours(name):
    return name.split(".")[0] == "dreamportrait"

report = tempfile.TemporaryFile()
def loaded_by_the_package():
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except BaseException:
            pass
    report.write("\\n".join(name for name in list(sys.modules) if not ours(name)).encode())
    report.flush()
fork(loaded_by_the_package)
report.seek(0)
third_party = report.read().decode().split()
for name in third_party:
    try:
        importlib.import_module(name)
    except BaseException:
        pass
assert not any(ours(name) for name in sys.modules)
failed = []
for name in sys.argv[1:]:
    if not fork(lambda: importlib.import_module(name)):
        print(f"failed: import {name}", file=sys.stderr, flush=True)
        failed.append(name)
print("failed:", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def package_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_package_modules_are_found():
    modules = package_modules()
    assert {"dreamportrait", "dreamportrait.cli", "dreamportrait.ops.reference", "dreamportrait.text"} <= set(modules)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per module")
def test_every_module_imports_on_its_own():
    modules = package_modules()
    if importlib.util.find_spec("triton") is None:  # the Triton kernels' modules import triton itself
        modules = [name for name in modules if not name.startswith("dreamportrait.ops.triton.")]
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, *modules], cwd=PACKAGE.parent, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-8000:]
