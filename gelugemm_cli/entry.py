"""The `gelugemm` command's entry point: signals are handled from the first moment.

Importing torch and triton takes a second or more. A signal then (Ctrl-C at once, a
`timeout` that fires early) surfaced as an exception inside their native modules'
initialisation: a traceback, or an abort (`terminate called after throwing an instance of
'nanobind::python_error'`, exit 134). Nothing is written before the imports end, so until
then SIGINT, SIGTERM and SIGHUP print one line and end the process at once with 130, 143
or 129. This module imports only the standard library before installing that; once the
commands are imported, gelugemm_cli.common's handling takes over.
"""

from __future__ import annotations

import os
import signal
import sys
import time

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _while_starting(signum: int, frame) -> None:
    os.write(2, f"interrupted: {signal.Signals(signum).name} while starting; nothing written\n".encode())
    os._exit(128 + signum)


def _test_pause(point: str) -> None:
    # The start-up twin of calibration.outputs.test_pause (which imports torch): same variables.
    if os.environ.get("GELUGEMM_TEST_PAUSE") != point:
        return
    marker = os.environ.get("GELUGEMM_TEST_PAUSE_MARKER")
    if marker:
        with open(marker, "w") as f:
            f.write(f"{os.getpid()} {point}\n")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.01)


def main() -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, _while_starting)
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a file-size limit: EFBIG, one line
    import torch  # noqa: F401  (the slow part of start-up: a test pauses right after it)

    _test_pause("import")
    from gelugemm_cli.app import main as run

    sys.exit(run())
