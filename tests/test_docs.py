"""The README, RESULTS.md and the guide in docs/ stay true: their code blocks run, their links resolve.

Convention for fenced code blocks (written down in docs/design.md, *Documentation*):

- ``python`` blocks of one page run in order in one namespace (a later block may use an earlier
  block's names), in a temporary working directory;
- ``bash`` blocks run in the same temporary directory: a block of plain commands line by line (its
  ``dreamportrait ...`` commands through ``dreamportrait.cli.main`` in this process), a block using
  shell syntax (variables, pipes, chains) as one ``bash -e`` script; the arguments of every
  ``dreamportrait ...`` command are also checked against the CLI, run or not;
- ``yaml`` blocks must parse (and load, when they are training configs); ``text`` blocks (and untagged ones) are illustrations, not code;
- a block right after a line ``<!-- docs: REASON -->`` is not run, for one of the reasons in
  ``REASONS``; its Python must still compile and its ``dreamportrait`` commands must still parse.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", REPO / "RESULTS.md", *REPO.joinpath("docs").rglob("*.md")])
REASONS = {
    "gpu": "needs a CUDA GPU",
    "hub": "needs weights or models downloaded from elsewhere (Stable Diffusion, an EG3D pickle)",
    "slow": "takes minutes or more on a CPU (training, the whole test suite, set-up)",
    "history": "records a command as it was run for a past result; kept for the record",
}
CODE = {"python", "bash", "sh", "yaml"}
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"^\s*<!-- docs: (?P<reason>[\w-]+) -->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    reason: str | None  # why it is not run; None: it runs

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines, found, index = page.read_text().splitlines(), [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        start, indent = index, len(match["indent"])
        index += 1
        body = []
        while index < len(lines) and lines[index].strip() != "```":
            body.append(lines[index][indent:])
            index += 1
        previous = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.match(previous)
        found.append(Block(page, start + 1, match["lang"], "\n".join(body) + "\n", marker and marker["reason"]))
        index += 1
    return found


ALL = [block for page in PAGES for block in blocks(page)]


def page_id(page: Path) -> str:
    return str(page.relative_to(REPO))


def test_pages_are_found():
    names = {page_id(page) for page in PAGES}
    assert {"README.md", "RESULTS.md", "docs/ops.md", "docs/models.md", "docs/training.md", "docs/generation.md",
            "docs/world.md", "docs/design.md"} <= names
    assert any(block.reason is None and block.lang == "python" for block in ALL)


@pytest.mark.parametrize("block", ALL, ids=Block.where)
def test_every_block_is_code_or_marked_with_a_known_reason(block):
    assert block.lang in CODE | {"text", ""}, f"{block.where()}: unknown block language {block.lang!r}"
    assert block.reason is None or block.reason in REASONS, \
        f"{block.where()}: unknown reason {block.reason!r}; one of {sorted(REASONS)}"


def shell_lines(code: str) -> list[str]:
    """The commands of a bash block: comments dropped, continued lines joined."""
    commands, current = [], ""
    for line in code.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        current += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            commands.append(current)
            current = ""
    return commands


def dreamportrait_commands(command: str) -> list[list[str]]:
    """The argument lists of every ``dreamportrait ...`` in a command line (``&&``/``;`` chains too)."""
    found = []
    for part in re.split(r"&&|;|\|\|", command):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            continue
        while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
            words = words[1:]
        if words[:1] == ["dreamportrait"]:
            found.append(words[1:])
        elif words[:3] == ["python", "-m", "dreamportrait.cli"] or words[:3] == ["-m", "dreamportrait.cli"]:
            found.append(words[3:])
        elif words[:1] == ["torchrun"] and "dreamportrait.cli" in words:
            found.append(words[words.index("dreamportrait.cli") + 1:])
    return found


@pytest.mark.parametrize("block", [b for b in ALL if b.lang in {"bash", "sh"}], ids=Block.where)
def test_cli_commands_parse(block):
    """Every ``dreamportrait`` command in a bash block has valid arguments, run or not."""
    from dreamportrait.cli import build_parser

    parser = build_parser()
    for command in shell_lines(block.code):
        for args in dreamportrait_commands(command):
            args = ["VALUE" if arg.startswith("$") else arg for arg in args]  # a shell variable stands for a value
            try:
                parser.parse_args(args)
            except SystemExit as error:
                if error.code:
                    pytest.fail(f"{block.where()}: `dreamportrait {' '.join(args)}` does not parse")


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "python"], ids=Block.where)
def test_python_compiles(block):
    compile(block.code, block.where(), "exec")


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "yaml"], ids=Block.where)
def test_yaml_parses(block, tmp_path):
    """A YAML block parses; one that looks like a training config (top-level keys of TrainConfig)
    must load as one."""
    import dataclasses

    import yaml

    from dreamportrait.training import TrainConfig, load_config

    values = yaml.safe_load(block.code)
    if isinstance(values, dict) and set(values) <= {field.name for field in dataclasses.fields(TrainConfig)}:
        path = tmp_path / "config.yaml"
        path.write_text(block.code)
        load_config(path)


RUN_PAGES = sorted({block.page for block in ALL if block.reason is None and block.lang in {"python", "bash", "sh"}})


@pytest.mark.parametrize("page", RUN_PAGES, ids=page_id)
def test_blocks_run(page, tmp_path, monkeypatch):
    """A page's unmarked python and bash blocks, in order, in a temporary directory."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks(page):
        if block.reason is not None:
            continue
        if block.lang == "python":
            exec(compile(block.code, block.where(), "exec"), namespace)
        elif block.lang in {"bash", "sh"}:
            run_bash(block, tmp_path)


SHELL_SYNTAX = re.compile(r"[$|><;&`]")


def run_bash(block: Block, cwd: Path) -> None:
    """A block of plain ``dreamportrait`` commands runs them in this process (``cli.main``: no
    interpreter start-up per command) and other plain commands one by one; a block using any shell
    syntax (variables, pipes, redirections, chains) runs as one ``bash -e`` script."""
    from dreamportrait.cli import main

    commands = shell_lines(block.code)
    if any(SHELL_SYNTAX.search(command) for command in commands):
        commands = [block.code]
    for command in commands:
        words = shlex.split(command) if command is not block.code else []
        if words[:1] == ["dreamportrait"]:
            try:
                status = main(words[1:])
            except SystemExit as error:
                status = error.code
            assert not status, f"{block.where()}: `{command}` exited {status}"
            continue
        result = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], capture_output=True, text=True,
                                timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=cwd)
        assert result.returncode == 0, \
            f"{block.where()} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
# Any relative path that climbs out of the page's folder, linked or written in prose or code.
RELATIVE_PATH = re.compile(r"(?P<path>(?:\.\./)+[\w.-]+)")
PATH_IN_CODE = re.compile(r"`(?P<path>(?:docs|dreamportrait|configs|tests|benchmarks|csrc)/[\w./-]+)`")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_links_and_paths_resolve_inside_the_repository(page):
    text = page.read_text()
    for match in RELATIVE_PATH.finditer(text):
        resolved = (page.parent / match["path"]).resolve()
        assert resolved.is_relative_to(REPO), f"{page_id(page)}: {match['path']} points outside the repository"
    for match in LINK.finditer(text):
        target = match["target"].split("#", 1)[0]
        if not target or re.match(r"[a-z]+:", target):
            continue
        resolved = (page.parent / target).resolve()
        assert resolved.is_relative_to(REPO), f"{page_id(page)}: link {target} leaves the repository"
        assert resolved.exists(), f"{page_id(page)}: link {target} does not exist"
    for match in PATH_IN_CODE.finditer(text):
        path = match["path"].rstrip(".")
        if any(ch in path for ch in "*<>") or path.endswith("/"):
            continue
        assert REPO.joinpath(path).exists(), f"{page_id(page)}: `{path}` does not exist"


ROW_NAME = re.compile(r"^\|\s*(?:\(b\) )?(?:\*\*)?(?P<name>[\w.-]+)(?:\*\*)?[ (|]", re.MULTILINE)


def table_rows(text: str) -> dict[str, str]:
    """Markdown table rows by the name in their first cell (``| NAME |``, ``| **NAME** |``, ``| (b) NAME |``)."""
    rows = {}
    for line in text.splitlines():
        match = ROW_NAME.match(line)
        if match:
            rows.setdefault(match["name"], line)
    return rows


def test_docs_world_holds_only_what_the_pages_reference():
    """Every file under docs/world/ is named by a page (by path, by file name, or as a table row of
    evaluation results) or by a script in docs/, so none is left over."""
    text = "\n".join(page.read_text() for page in PAGES)
    text += "\n".join(path.read_text() for path in REPO.joinpath("docs").rglob("*.py"))
    rows = table_rows(text)
    left_over = [str(path.relative_to(REPO)) for path in REPO.joinpath("docs", "world").rglob("*") if path.is_file()
                 and str(path.relative_to(REPO)) not in text and path.name not in text
                 and not (path.suffix == ".json" and path.parent.name == "world" and path.stem in rows)]
    assert not left_over, f"files in docs/world/ that no page references: {left_over}"


@pytest.mark.parametrize("page", [REPO / "RESULTS.md", REPO / "README.md", REPO / "docs/notes/experiments.md"],
                         ids=page_id)
def test_result_rows_match_their_json(page):
    """A table row named after a docs/world/NAME.json shows that file's consistency, diversity and
    world-FID as the harness wrote them (rounded as the tables round them)."""
    import json

    checked = 0
    for name, line in table_rows(page.read_text()).items():
        path = REPO / "docs" / "world" / f"{name}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        cells = [cell.strip().strip("*") for cell in line.strip("|").split("|")]
        for value in (f"{result['multi_view_consistency'] * 100:.1f} %", f"{result['diversity']:.3f}",
                      f"{result['world_fid']:.2f}"):
            assert value in cells, f"{page_id(page)}: the row of {name} does not show {value} ({path.name})"
        checked += 1
    assert checked or page.name == "README.md"


def test_front_pages_are_short():
    assert len(REPO.joinpath("README.md").read_text().splitlines()) <= 200
    assert len(REPO.joinpath("RESULTS.md").read_text().splitlines()) <= 250


def test_readme_picture_is_small_and_made_by_a_documented_command():
    readme = REPO.joinpath("README.md").read_text()
    assert "docs/portraits.png" in readme and "python docs/make_picture.py" in readme
    assert REPO.joinpath("docs/portraits.png").stat().st_size < 300_000


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
