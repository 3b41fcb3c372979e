"""The README's command synopses name every option each command takes, so they cannot drift
from `--help` as options are added."""

import re
from pathlib import Path

import pytest
import typer.main

from gelugemm_cli.app import app

README = Path(__file__).resolve().parent.parent / "README.md"
COMMANDS = typer.main.get_command(app).commands


def synopsis(command: str) -> str:
    """The fenced block of the README that starts with `gelugemm COMMAND `."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if b.startswith(f"gelugemm {command} ")]
    assert len(found) == 1, f"the README has {len(found)} synopsis blocks for {command}"
    return found[0]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_readme_synopsis_names_every_option(command):
    text = synopsis(command)
    named = lambda opt: re.search(re.escape(opt) + r"(?![\w-])", text)  # noqa: E731
    options = [p.opts for p in COMMANDS[command].params if p.opts[0].startswith("-")]
    missing = [max(opts, key=len) for opts in options if not any(named(o) for o in opts)]
    assert not missing, f"README's `gelugemm {command}` synopsis lacks {missing}"
