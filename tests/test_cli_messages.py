"""What the commands say, as a reader in a terminal, a pipe or a CI log sees it (issue 11, item 7)."""

import io
import json
import re

import pytest
from rich.console import Console

from checkpoints import write_checkpoint
from cli_helpers import invoke
from gelugemm_cli import common


@pytest.fixture
def ci_width(monkeypatch):
    """The consoles as in CI or a pipe: not a terminal, 80 columns."""
    monkeypatch.setattr(common.console, "width", 80)
    monkeypatch.setattr(common.err_console, "width", 80)
    assert not common.console.is_terminal


@pytest.fixture
def plain(tmp_path):
    """A bare w1, b1, w2, b2 file: one MLP, no LayerNorm, a few KiB."""
    return write_checkpoint(tmp_path / "mlp.safetensors", "plain", d_model=16, d_ff=48)


def test_quantize_at_80_columns_prints_whole_numbers_and_sizes_and_counts(plain, tmp_path, ci_width):
    report_path = tmp_path / "r.json"
    result = invoke("quantize", plain, "--scheme", "w8a8", "--activations", "static", "--calib", "synthetic", "--json", report_path)
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert "…" not in result.stdout  # nothing cut to `7.62e-…`
    for linear in (report["layers"][0]["fc1"], report["layers"][0]["fc2"]):
        assert f"{linear['rel_frobenius']:.2e}" in result.stdout
    assert "1 MLP quantized" in result.stdout and "1 MLPs" not in result.stdout
    assert "0 tensors copied" in result.stdout
    wrote = next(line for line in result.stdout.splitlines() if line.startswith("wrote "))
    assert re.search(r"\(\d+\.\d KiB, from \d+\.\d KiB;", wrote) and " 0 MiB" not in wrote, wrote
    # no LayerNorm feeds a plain file's MLP: its synthetic rows are N(0, 1)
    assert "LayerNorm's weight" not in result.stdout and "no LayerNorm" in result.stdout


def test_verify_of_a_file_without_layernorm_says_where_its_inputs_come_from(plain, ci_width):
    result = invoke("verify", plain, "--dtype", "fp16")
    assert result.exit_code == 0, result.output
    assert "LayerNorm weight" not in result.stdout and "no LayerNorm feeds the MLPs" in result.stdout
    assert "1 MLP x 1 dtype" in result.stdout and "the one row within tolerance" in result.stdout


def test_verify_help_points_at_docs_that_exist():
    result = invoke("verify", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "docs-verify" not in text and "README" in text


@pytest.mark.parametrize("command", ["quantize", "verify", "bench"])
def test_dash_h_is_help(command):
    result = invoke(command, "-h")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout and "--json" in result.stdout


def test_an_error_is_one_line_and_nothing_on_stdout(tmp_path, ci_width):
    """The progress bar printed a stray blank line on stdout before every error."""
    for args in (["quantize", tmp_path / "missing.safetensors"], ["verify", tmp_path], ["quantize", tmp_path]):
        result = invoke(*args)
        assert result.exit_code == 2
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].strip() == lines[0], result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["verify", "--tokens", "x", "m.safetensors"], "Invalid value for '--tokens'"),
        (["verify"], "Missing argument"),
        (["quantize", "m.safetensors", "--no-such-option"], "No such option: --no-such-option"),
        (["frobnicate"], "No such command 'frobnicate'"),
    ],
)
def test_usage_errors_are_one_line_not_a_box(args, message, ci_width):
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "--help" in lines[0] and "╭" not in result.output


def test_a_terminal_sees_the_work_named_as_it_goes_and_a_pipe_sees_no_bar():
    terminal = io.StringIO()
    with common.progress_bar(Console(file=terminal, force_terminal=True, width=100), "loading m", lambda what: f"verifying {what}") as progress:
        progress(3, 8, "fc1:fp16")
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.getvalue())  # the bar's cursor moves and colours
    assert "verifying fc1:fp16" in shown and "3/8" in shown

    pipe = io.StringIO()
    with common.progress_bar(Console(file=pipe, width=100), "loading m", lambda what: f"verifying {what}") as progress:
        progress(3, 8, "fc1:fp16")
    assert pipe.getvalue() == ""  # a log keeps only the report


def test_an_error_about_a_path_is_one_line_whatever_the_name(tmp_path):
    """A file name with a line break, or one the file system cannot hold, used to give two
    lines or an OSError traceback."""
    for name in ("bad\nname.safetensors", "a" * 300 + ".safetensors"):
        result = invoke("inspect", tmp_path / name)
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
