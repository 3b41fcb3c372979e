"""What every command shares: the consoles, the error boundary, and JSON output."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from kernels.errors import GelugemmError

console = Console()
err_console = Console(stderr=True)

def env_debug() -> bool:
    return os.environ.get("GELUGEMM_DEBUG", "0") not in ("", "0")


# Set on every run by the app callback from --debug (or GELUGEMM_DEBUG=1): show tracebacks.
state = {"debug": env_debug()}


@contextmanager
def user_errors():
    """Turn a GelugemmError into one red line and its exit code (a traceback with --debug)."""
    try:
        yield
    except GelugemmError as exc:
        if state["debug"]:
            err_console.print_exception()
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]")
        raise typer.Exit(130) from None


def write_json(path: Path, payload: dict) -> None:
    """Write a command's result object as JSON ('-' for stdout)."""
    text = json.dumps(payload, indent=2, sort_keys=False, default=str)
    if str(path) == "-":
        print(text)
    else:
        Path(path).write_text(text + "\n")
