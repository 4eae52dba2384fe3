"""The README's set-up commands are the ones CI runs."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_commands() -> dict[str, str]:
    """The commands in the README's "Set-up" section, by the label of their comment line."""
    section = REPO.joinpath("README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```(?:bash|sh)\n(.*?)```", section, re.DOTALL).group(1)
    commands, label = {}, None
    for line in block.splitlines():
        if line.startswith("#"):
            label = line.lstrip("# ").split(":")[0].strip().lower()
        elif line.strip():
            commands[label] = line.strip()
    return commands


def test_ci_runs_the_readme_test_command():
    commands = readme_commands()
    assert set(commands) == {"main job", "tests"}
    ci_lines = [line.strip() for line in REPO.joinpath(".ci/run").read_text().splitlines()]
    assert commands["tests"] in ci_lines


def test_both_commands_set_up_from_scratch():
    """Each command works alone on a fresh machine: both start with the whole installation."""
    setup = "pip install torch==2.14.1 setuptools wheel ninja && pip install --no-build-isolation -e "
    assert all(command.startswith(setup) for command in readme_commands().values())


def test_the_main_job_generates_with_valid_arguments():
    import shlex

    from dreamportrait.cli import build_parser

    command = readme_commands()["main job"].split(" && ")[-1]
    assert command.startswith("dreamportrait generate ")
    args = build_parser().parse_args(shlex.split(command)[1:])
    assert args.checkpoint is None and args.video and args.mesh  # the packaged model, every output kind
