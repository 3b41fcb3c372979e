"""What every command shares: the consoles, the error and signal boundary, and output paths.

How a command writes an output (calibrate's -o and eval's --json included, as they come):
check it before the work, write it through calibration.outputs at the end.

    check_json_output(json_path, inputs=input_files(checkpoint, calib), force=force)
    outputs.check_output(out, option="-o", inputs=..., expected_bytes=..., force=force)
    ...                                  # the work
    outputs.set_result(0 or 1)           # what a signal after the outputs are written keeps
    with outputs.atomic_output(out) as f: ...      # or directory=True for a directory
    write_json(json_path, result.to_dict())

One policy for every command (tests/test_signals.py):
- a GelugemmError is one red line and exit 2 (`user_errors`); `--debug` shows the traceback;
- SIGINT, SIGTERM and SIGHUP raise `Interrupted` in the main thread; the app's boundary
  (gelugemm_cli/app.py) removes the temporaries of outputs being written, prints one line
  and exits 130, 143 or 129, or, when every output was already in place, with the command's
  own result (calibration.outputs.interrupted);
- SIGXFSZ (a file-size limit, `ulimit -f`) is ignored, so the write fails with EFBIG and
  becomes one line instead of killing the process.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from calibration import outputs, ranks
from calibration.errors import CheckpointError
from calibration.quantized_file import read_quantized
from kernels.errors import GelugemmError

console = Console()
err_console = Console(stderr=True)
LOG_WIDTH = 140  # columns tables are printed in when the output is not a terminal
JSON_BYTES = 1 << 20  # room a --json output is checked for (a report is tens of KiB)
PLOT_BYTES = 4 << 20


def env_debug() -> bool:
    return os.environ.get("GELUGEMM_DEBUG", "0") not in ("", "0")


# Set on every run by the app callback from --debug (or GELUGEMM_DEBUG=1): show tracebacks.
state = {"debug": env_debug()}


class Interrupted(BaseException):
    """A stop signal, raised in the main thread by the handler (not an Exception: nothing
    may swallow it); cleanup runs as the stack unwinds."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame) -> None:
    if _signalled:  # a second signal while the first unwinds: finish now
        outputs.remove_temporaries()
        _flush()
        os.write(2, f"interrupted: {signal.Signals(signum).name} again; stopped at once\n".encode())
        os._exit(128 + _signalled[0])
    _signalled.append(signum)
    raise Interrupted(signum)


_signalled: list[int] = []


def install_signal_handlers() -> None:
    """The command's signal policy (see the module docstring); the entry point calls it once
    torch and triton are imported (gelugemm_cli/entry.py handles signals before that)."""
    for sig in outputs.STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def finishing(code: int) -> None:
    """The command is done and exits with `code`: a signal from here on is ignored (Python's
    own shutdown would put back the default action, and the process would die of the signal
    with its work complete)."""
    for sig in outputs.STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
            pass


def print_line(label: str, style: str, message: str) -> None:
    """`label: message` on stderr, one line whatever its length (a line break in a file name
    shown as \\n); the message is not markup."""
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    err_console.print(Text.assemble((f"{label}:", style), " ", message), highlight=False, soft_wrap=True)


@contextmanager
def user_errors():
    """Turn a GelugemmError into one red line and its exit code (a traceback with --debug)."""
    try:
        yield
    except GelugemmError as exc:
        if state["debug"]:
            err_console.print_exception()
        print_line("error", "bold red", str(exc))
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:  # the file system's answer about a path given (a name too long, a loop)
        if state["debug"]:
            err_console.print_exception()
        where = f"{exc.filename}: " if exc.filename else ""
        print_line("error", "bold red", f"{where}{exc.strerror or exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # SIGINT where the handlers are not installed (in-process use)
        raise Interrupted(signal.SIGINT) from None


def for_log(out: Console) -> Console:
    """`out`, or when it is not a terminal (a pipe, a CI log) the same stream at LOG_WIDTH
    columns: Rich would fit tables to 80 and cut numbers to `7.62e-…`."""
    if out.is_terminal:
        return out
    return Console(file=out.file, width=max(out.width, LOG_WIDTH))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def input_files(*paths: str | Path | None) -> list[Path]:
    """The files a command reads from these paths, so that no output can replace any of them:
    each one (a model directory: every file in it, calibration.outputs.check_output) and the
    config.json beside it (read for the GELU flavour)."""
    found = []
    for path in filter(None, paths):
        path = Path(path)
        found += [path] if path.is_dir() else [path, path.parent / "config.json"]
    return found


def recorded_inputs(checkpoint: Path) -> list[Path]:
    """A quantized checkpoint's recorded source (its file, or its directory's shards) and
    calibration file: verify and eval read them."""
    try:
        record, _ = read_quantized(checkpoint)
    except CheckpointError:
        return []  # not a quantized checkpoint of ours, or a bad one: the command itself says so
    source = record.get("source") or {}
    roots = [Path(source["path"])] if isinstance(source.get("path"), str) else []
    if isinstance(source.get("relative_path"), str):
        roots.append(Path(checkpoint).resolve().parent / source["relative_path"])
    found = []
    for root in roots:
        if source.get("kind") == "directory":
            found += [root / f["name"] for f in source.get("files") or [] if isinstance(f, dict) and isinstance(f.get("name"), str)]
        else:
            found.append(root)
    calib = record.get("calibration") or {}
    if isinstance(calib, dict) and isinstance(calib.get("path"), str):
        found.append(Path(calib["path"]))
    return input_files(*found)


def join_torchrun() -> None:
    """Under `torchrun --nproc-per-node N -m gelugemm_cli ...`: join the process group; rank 0
    alone prints and writes the report (the other ranks' consoles go quiet)."""
    if not ranks.launched_by_torchrun():
        return
    if not ranks.init_from_env().root:
        console.quiet = err_console.quiet = True
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def report_console(json_path: Path | None) -> Console:
    """Where a command prints its report: stderr when --json is '-', so stdout stays pure JSON."""
    return err_console if str(json_path) == "-" else console


@contextmanager
def progress_bar(out: Console, start: str, describe=None):
    """A transient bar on `out` (none when `out` is not a terminal) and the callback a library
    function moves it with, progress(done, total, what); `describe(what)` words the bar, which
    otherwise keeps `start`."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=out, transient=True, disable=not out.is_terminal) as bar:  # fmt: skip
        task = bar.add_task(start, total=None)

        def progress(done: int, total: int, what: str) -> None:
            words = {} if describe is None else {"description": describe(what)}
            bar.update(task, completed=done, total=total, **words)

        yield progress


def check_json_output(json_path: Path | None, *, inputs, others=(), force: bool) -> None:
    """--json FILE, checked before the work; '-' is stdout and needs no check."""
    if json_path is None or str(json_path) == "-" or not ranks.current().root:
        return
    outputs.check_output(json_path, option="--json", inputs=inputs, others=others, expected_bytes=JSON_BYTES,
                         force=force, replace="own")  # fmt: skip


def write_json(path: Path, payload: dict) -> None:
    """Write a command's result object as gelugemm's JSON ('-' for stdout): `tool` and
    `schema_version` first (calibration.outputs.json_document), all or nothing. Under torchrun
    rank 0 writes it."""
    if not ranks.current().root:
        return
    if str(path) == "-":
        sys.stdout.write(outputs.json_text(payload))
        sys.stdout.flush()
    else:
        outputs.write_json(path, payload)
