"""The `gelugemm` command: one Typer app, one module per command."""

from __future__ import annotations

import signal
import sys

import typer
from typer.core import TyperGroup

from calibration import outputs
from gelugemm_cli.common import Interrupted, env_debug, finishing, install_signal_handlers, join_torchrun, print_line, state
from kernels.version import __version__


# The click Typer runs on: click itself, or (newer Typer) its own vendored copy.
click_exceptions = sys.modules[typer.BadParameter.__module__]
NoArgsIsHelpError = getattr(click_exceptions, "NoArgsIsHelpError", ())


class Boundary(TyperGroup):
    """Every command's way out: usage errors as one line (not Rich's boxed panel), and an
    interrupt as the signal policy says (gelugemm_cli/common.py)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        outputs.start_run()
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:  # the help is already printed
            sys.exit(exc.exit_code)
        except click_exceptions.ClickException as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            print_line("error", "bold red", exc.format_message() + where)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print_line("error", "bold red", "aborted")
            sys.exit(1)
        except (Interrupted, KeyboardInterrupt) as exc:
            code, line = outputs.interrupted(getattr(exc, "signum", signal.SIGINT))
            print_line("interrupted", "yellow", line)
            sys.exit(code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="gelugemm",
    help="Quantize, validate and benchmark transformer GELU MLP layers with fused Triton GEMM-GELU kernels.",
    cls=Boundary,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
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
    join_torchrun()


# Commands, each a thin module over the library.
from gelugemm_cli import quantize  # noqa: E402

app.command("quantize")(quantize.quantize)

from gelugemm_cli import bench  # noqa: E402

app.command("bench")(bench.bench)

from gelugemm_cli import verify  # noqa: E402

app.command("verify")(verify.verify)

from gelugemm_cli import inspect  # noqa: E402

app.command("inspect")(inspect.inspect)

from gelugemm_cli import calibrate  # noqa: E402

app.command("calibrate")(calibrate.calibrate)

from gelugemm_cli import eval as eval_command  # noqa: E402

app.command("eval")(eval_command.evaluate)


def main() -> int:
    """Run the command line with the signal policy installed; the exit code."""
    install_signal_handlers()
    try:
        app()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finishing(code)
        return code
    finishing(0)
    return 0
