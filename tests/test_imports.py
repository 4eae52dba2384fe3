"""The package's imports: every module imports on its own, as the first of the package in a fresh
interpreter (no import cycle, no module that works only after another has been imported), and
every import follows the layers docs/design.md lists (no module imports from a layer below it)."""

import ast
import importlib.util
import os
import re
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


# --- the layers of docs/design.md -------------------------------------------------------------------

DESIGN = PACKAGE.parent / "docs" / "design.md"

IMPORTS_AGAINST_THE_LAYERS = {("dreamportrait._extension", "dreamportrait.ops"),
                              ("dreamportrait._extension", "dreamportrait.ops._registration")}
"""The one upward import design.md names: loading the compiled extension registers its ops
(importing ``ops._registration`` runs ``ops/__init__.py`` first)."""


def design_layers() -> list[tuple[str, list[Path]]]:
    """The rows of design.md's layer table, bottom up: (layer, the paths its "where" cell names; a
    bare file name is in the folder of the path before it)."""
    section = DESIGN.read_text().split("## Layers, bottom up", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("layer", "---"):
            continue
        folder, paths = PACKAGE.parent, []
        for name in re.findall(r"`([^`]+)`", cells[1]):
            path = PACKAGE.parent / name if "/" in name else folder / name
            folder = path if name.endswith("/") else path.parent
            paths.append(path)
        if cells[0]:
            layers.append((cells[0], paths))
        else:  # a continuation row of the layer above
            layers[-1][1].extend(paths)
    return layers


def module_file(name: str) -> Path:
    path = PACKAGE.parent / name.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(name: str) -> set[str]:
    """The package's modules that module ``name`` imports, at the top or inside functions."""
    path = module_file(name)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1]) if node.level else ""
            target = ".".join(part for part in (base, node.module) if part)
            found |= {target, *(f"{target}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found & set(package_modules()) - {name, "dreamportrait"}


def test_every_import_follows_the_layers_of_the_design_page():
    layers = design_layers()

    def layer_of(name: str) -> int | None:
        path = module_file(name)
        matches = [(len(where.parts), index) for index, (_, paths) in enumerate(layers) for where in paths
                   if path == where or (where.is_dir() and path.is_relative_to(where))]
        return max(matches)[1] if matches else None

    modules = [name for name in package_modules() if name != "dreamportrait"]  # the root holds only the version
    unplaced = [name for name in modules if layer_of(name) is None]
    assert not unplaced, f"modules in no layer of {DESIGN.name}: {unplaced}"
    upward = [f"{name} ({layers[layer_of(name)][0]}) imports {imported} ({layers[layer_of(imported)][0]})"
              for name in modules for imported in sorted(imported_modules(name))
              if layer_of(imported) > layer_of(name) and (name, imported) not in IMPORTS_AGAINST_THE_LAYERS]
    assert not upward, "\n".join(upward)
