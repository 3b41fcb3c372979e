"""The `gelugemm` command: one Typer app, one module per command."""

from __future__ import annotations

import sys

import typer

from gelugemm_cli import __version__
from gelugemm_cli.common import env_debug, state

app = typer.Typer(
    name="gelugemm",
    help="Quantize, validate and benchmark transformer GELU MLP layers with fused Triton GEMM-GELU kernels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool):
    if value:
        print(f"gelugemm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error."),
):
    state["debug"] = debug or env_debug()


# Commands, each a thin module over the library.
from gelugemm_cli import quantize  # noqa: E402

app.command("quantize")(quantize.quantize)

from gelugemm_cli import bench  # noqa: E402

app.command("bench")(bench.bench)

from gelugemm_cli import verify  # noqa: E402

app.command("verify")(verify.verify)

from gelugemm_cli import inspect  # noqa: E402

app.command("inspect")(inspect.inspect)


def main() -> None:
    sys.exit(app())
