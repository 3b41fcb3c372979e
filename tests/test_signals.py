"""One signal policy for every command, tested on the real process at known points.

The CLI runs as a subprocess (`python -m gelugemm_cli`, this checkout on PYTHONPATH) with
GELUGEMM_TEST_PAUSE set: at that point it writes a marker file and waits, and the test sends
the signal then, so nothing here depends on timing. Points: "import" (start-up, torch loaded),
"mid-write" (the output's temporary written, not renamed), "after-rename" (the output in place,
the command not finished). calibration/outputs.py and gelugemm_cli/common.py hold the policy.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calibration.quantized_file import is_quantized_file, sha256_file
from checkpoints import write_checkpoint

REPO = Path(__file__).resolve().parent.parent
SIGNALS = {"SIGINT": (signal.SIGINT, 130), "SIGTERM": (signal.SIGTERM, 143), "SIGHUP": (signal.SIGHUP, 129)}


def signalled_at(point: str, sig: int, *args, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `gelugemm ARGS`, wait until it pauses at `point`, send `sig`; the finished process."""
    marker = tmp_path / f"paused-{point}"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400", "GELUGEMM_TEST_PAUSE": point,
           "GELUGEMM_TEST_PAUSE_MARKER": str(marker)}  # fmt: skip
    command = [sys.executable, "-m", "gelugemm_cli", *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    paused = marker.exists()
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    assert paused, f"never paused at {point!r} (exit {process.returncode}): {err[-2000:]}"
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and "terminate called" not in stderr
    return lines[0]


def files(folder: Path) -> dict:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def work(tmp_path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    write_checkpoint(folder / "model.safetensors", "bert", d_model=32, d_ff=96)
    return folder


@pytest.mark.parametrize("name", list(SIGNALS))
def test_a_signal_mid_write_removes_the_partial_file(work, tmp_path, name):
    """Issue 11, item 4: SIGTERM (and SIGHUP) left the `.NAME.XXXX.partial` file behind."""
    sig, code = SIGNALS[name]
    before = files(work)
    done = signalled_at("mid-write", sig, "quantize", work / "model.safetensors", tmp_path=tmp_path)
    assert done.returncode == code, done.stderr
    line = one_line(done.stderr)
    assert line.startswith(f"interrupted: {name}") and "nothing written, no partial file left" in line
    assert files(work) == before  # hidden files included: no temporary


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_while_starting_is_one_line(work, tmp_path, name):
    """Issue 11, item 5: Ctrl-C while torch/triton import aborted (`terminate called after throwing
    an instance of 'nanobind::python_error'`, exit 134) or printed a traceback."""
    sig, code = SIGNALS[name]
    before = files(work)
    done = signalled_at("import", sig, "quantize", work / "model.safetensors", tmp_path=tmp_path)
    assert done.returncode == code, done.stderr
    assert one_line(done.stderr) == f"interrupted: {name} while starting; nothing written"
    assert files(work) == before


def test_a_signal_after_the_rename_keeps_the_output_and_the_result(work, tmp_path):
    """Issue 11, item 5: an interrupt after the output was in place exited 130 though it was complete."""
    done = signalled_at("after-rename", signal.SIGINT, "quantize", work / "model.safetensors", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    line = one_line(done.stderr)
    assert line.startswith("interrupted: SIGINT after") and "model.int8.safetensors was written; kept, complete" in line
    assert is_quantized_file(work / "model.int8.safetensors")
    assert sorted(files(work)) == ["model.int8.safetensors", "model.safetensors"]


def test_verify_keeps_its_verdict_when_the_signal_comes_after_its_json(work, tmp_path):
    report = work / "verify.json"
    done = signalled_at("after-rename", signal.SIGHUP, "verify", work / "model.safetensors", "--dtype", "w8a8",
                        "--tol", "1e-9", "--json", report, tmp_path=tmp_path)  # fmt: skip
    assert done.returncode == 1, done.stderr  # the rows fail: verify's own result, not 129
    assert "verify.json was written; kept, complete" in one_line(done.stderr)
    assert json.loads(report.read_text())["passed"] is False


def test_a_signal_between_two_outputs_keeps_the_complete_one_and_says_so(work, tmp_path):
    done = signalled_at("after-rename", signal.SIGTERM, "quantize", work / "model.safetensors",
                        "--json", work / "report.json", tmp_path=tmp_path)  # fmt: skip
    assert done.returncode == 143, done.stderr
    line = one_line(done.stderr)
    assert "kept" in line and "model.int8.safetensors (complete)" in line and "report.json not written" in line
    assert is_quantized_file(work / "model.int8.safetensors")
    assert sorted(files(work)) == ["model.int8.safetensors", "model.safetensors"]
