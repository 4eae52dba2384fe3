"""Mutation testing of the package's Python, one area at a time (docs/testing.md).

    python tools/mutation.py AREA [AREA ...]     # e.g. training cameras eg3d_import
    python tools/mutation.py --list

mutmut rewrites the files it mutates, so each run works on a copy (of the committed tree, or with
``--tree worktree`` of the working tree; plus the built extension) in a temporary directory, never
on the checkout itself. The areas (which files are mutated, which tests judge them) are
``[tool.dreamportrait.mutation]`` in pyproject.toml; the settings every run shares are
``[tool.mutmut]`` there. mutmut runs, per mutant, only the tests that executed the mutated function
(its per-test selection), one at a time (``--max-children``, default 1) with one OpenMP thread
(forked children of a multi-threaded torch can hang). The run's summary and the surviving
mutants' diffs go to ``--out`` (default: the temporary directory's ``dreamportrait-mutation/AREA/``).
Needs ``pip install mutmut`` (tested with 3.8).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def areas() -> dict[str, dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["dreamportrait"]["mutation"]["areas"]


def toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{value}"' for value in values) + "]"


def copy_tree(destination: Path, tree: str) -> None:
    """The committed tree (``head``: what a score refers to) or the working tree as it is now
    (``worktree``: tracked and untracked, not ignored, files), plus the built extension."""
    if tree == "head":
        archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(destination)], input=archive, check=True)
    else:
        copy_worktree(destination)
    for extension in (ROOT / "dreamportrait").glob("_C*.so"):
        shutil.copy2(extension, destination / "dreamportrait" / extension.name)


def copy_worktree(destination: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def configure(copy: Path, area: dict) -> None:
    """The copy's [tool.mutmut]: the shared settings plus the area's files and tests."""
    text = (copy / "pyproject.toml").read_text()
    extensions = [f"dreamportrait/{path.name}" for path in (copy / "dreamportrait").glob("_C*.so")]
    settings = (f"only_mutate = {toml_list(area['mutate'])}\n"
                f"pytest_add_cli_args_test_selection = {toml_list(area['tests'])}\n"
                f"also_copy = {toml_list(extensions + ['tests/', 'dreamportrait/assets/', 'dreamportrait/configs/'])}"
                "\n")
    marker = "[tool.mutmut]\n"
    if marker not in text:
        raise SystemExit("pyproject.toml has no [tool.mutmut] section")
    (copy / "pyproject.toml").write_text(text.replace(marker, marker + settings, 1))


def run_area(name: str, area: dict, out: Path, max_children: int, tree: str) -> int:
    with tempfile.TemporaryDirectory(prefix=f"mutation-{name}-") as directory:
        copy = Path(directory)
        copy_tree(copy, tree)
        configure(copy, area)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(copy)}
        check = subprocess.run([sys.executable, "-c", "import dreamportrait; print(dreamportrait.__file__)"],
                               cwd=copy, env=env, capture_output=True, text=True)
        if not check.stdout.startswith(str(copy)):
            raise SystemExit(f"the copy's package is not the one imported: {check.stdout or check.stderr}")
        started = datetime.now(timezone.utc)
        run = subprocess.run(["mutmut", "run", "--max-children", str(max_children)], cwd=copy, env=env,
                             capture_output=True, text=True)
        results = subprocess.run(["mutmut", "results", "--all", "true"], cwd=copy, env=env, capture_output=True,
                                 text=True).stdout
        out.mkdir(parents=True, exist_ok=True)
        statuses = [line.rsplit(": ", 1)[-1].strip() for line in results.splitlines() if ": " in line]
        counts = {status: statuses.count(status) for status in sorted(set(statuses))}
        judged = sum(counts.values()) - sum(counts.get(status, 0) for status in ("no tests", "skipped", "not checked"))
        killed = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
        score = f"{killed}/{judged} = {100 * killed / judged:.1f} %" if judged else "no mutants judged"
        summary = (f"area {name} ({tree}): {score} killed ({counts}); started {started:%Y-%m-%d %H:%M} UTC, "
                   f"{(datetime.now(timezone.utc) - started).total_seconds() / 60:.1f} min\n")
        # Only the survivors' diffs: "no tests" mutants (code no test of the area runs; hundreds in some
        # areas, a `mutmut show` each) are named in summary.txt.
        survivors = [line.split(":")[0].strip() for line in results.splitlines() if line.rstrip().endswith("survived")]
        diffs = [subprocess.run(["mutmut", "show", mutant], cwd=copy, env=env, capture_output=True,
                                text=True).stdout for mutant in survivors]
        (out / "summary.txt").write_text(summary + results)
        (out / "survivors.diff").write_text("\n".join(diffs))
        (out / "run.log").write_text(run.stdout[-20000:] + run.stderr[-20000:])
        print(summary, end="")
        return run.returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("areas", nargs="*")
    parser.add_argument("--list", action="store_true", help="list the areas and exit")
    parser.add_argument("--max-children", type=int, default=1)
    parser.add_argument("--tree", choices=("head", "worktree"), default="head",
                        help="mutate the committed tree (default) or the working tree with its uncommitted changes")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dreamportrait-mutation")
    args = parser.parse_args(argv)
    known = areas()
    if args.list or not args.areas:
        for name, area in known.items():
            print(f"{name}: mutates {', '.join(area['mutate'])}; tests {' '.join(area['tests'])}")
        return 0
    unknown = [name for name in args.areas if name not in known]
    if unknown:
        parser.error(f"unknown area(s) {', '.join(unknown)}; --list shows them")
    code = 0
    for name in args.areas:
        code |= run_area(name, known[name], args.out / name, args.max_children, args.tree)
    return code


if __name__ == "__main__":
    sys.exit(main())
