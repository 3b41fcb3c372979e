"""`gelugemm quantize`: the table, --json, and one red line with exit code 2 for each bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from calibration.quantized_file import is_quantized_file, read_quantized, sha256_file
from checkpoints import checkpoint_tensors, corrupt_files, write_calibration, write_checkpoint
from gelugemm_cli.app import app

runner = CliRunner()
# Rich hard-wraps at the console width (80 where there is no terminal); wide enough that
# each message stays on the one line it is printed as.
WIDE = 400


pytestmark = pytest.mark.usefixtures("wide_consoles")


def run(*args):
    return runner.invoke(app, ["quantize", *map(str, args)])


def test_quantize_prints_a_table_and_writes_the_same_facts_as_json(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert", n_layers=2, config={"hidden_act": "gelu"})
    result = run(source, "--scheme", "w8a8", "--activations", "static", "--calib", "synthetic", "--method", "percentile:99",
                 "--tokens", "64", "--json", tmp_path / "r.json")  # fmt: skip
    assert result.exit_code == 0, result.output
    output = tmp_path / "model.int8.safetensors"
    assert is_quantized_file(output)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["output"] == str(output) and report["scheme"] == "w8a8" and report["method"] == "percentile:99"
    assert report["calibration"]["tokens"] == 64
    record, layers = read_quantized(output)
    assert report["record"] == record
    for layer_report, layer in zip(report["layers"], layers, strict=True):
        assert layer_report["fc1"]["prefix"] == layer.fc1 and layer_report["fc2"]["prefix"] == layer.fc2
        # The table shows the same numbers the JSON holds.
        assert f"{layer_report['fc1']['rel_frobenius']:.2e}" in result.stdout
        assert f"{layer_report['fc1']['input_scale']:.3g}" in result.stdout
    assert "intermediate.dense" in result.stdout and "erf" in result.stdout
    assert "peak memory" in result.stdout
    # one timing line: seconds, MB/s of checkpoint, the phases and the one that dominates
    timing = report["timing"]
    line = next(line for line in result.stdout.splitlines() if line.startswith("time: "))
    assert f"time: {timing['seconds']:.1f} s, {timing['mb_per_s']:.0f} MB/s of checkpoint" in line
    assert "read " in line and "quantize " in line and f"{timing['dominant']} dominates" in line


def test_json_to_stdout_is_pure_json(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "gpt2")
    result = run(source, "-o", tmp_path / "q.safetensors", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["gelu"] == "tanh" and report["layers"][0]["fc1"]["prefix"] == "transformer.h.0.mlp.c_fc"


def bad_inputs(tmp_path) -> dict[str, tuple[list, str]]:
    """name -> (arguments after `quantize`, what the one line must say)."""
    good = write_checkpoint(tmp_path / "good.safetensors", "bert")
    nan = checkpoint_tensors("bert")
    nan["encoder.layer.0.output.dense.weight"][1, 2] = float("inf")
    mismatched = checkpoint_tensors("bert")
    mismatched["encoder.layer.1.output.dense.weight"] = torch.randn(16, 40)
    corrupt = corrupt_files(tmp_path)
    calib = write_calibration(tmp_path / "calib.safetensors", {"encoder.layer.0.intermediate.dense": torch.randn(8, 16)})
    (tmp_path / "taken.safetensors").write_bytes(b"already here")
    cases = {
        "missing file": ([tmp_path / "missing.safetensors"], "no such file"),
        "not safetensors": ([corrupt["not safetensors"]], "not a valid safetensors file"),
        "truncated": ([corrupt["truncated data"]], "not a valid safetensors file"),
        "truncated header": ([corrupt["truncated header"]], "not a valid safetensors file"),
        "corrupt header": ([corrupt["corrupt header"]], "not a valid safetensors file"),
        "nan weights": ([write_checkpoint(tmp_path / "nan.safetensors", tensors=nan)], "NaN/Inf"),
        "mismatched shapes": ([write_checkpoint(tmp_path / "shapes.safetensors", tensors=mismatched)], "expected [16, 48]"),
        "no mlp": ([write_checkpoint(tmp_path / "none.safetensors", tensors={"x.weight": torch.ones(2, 2)})], "no GELU MLP found"),
        "layers matching nothing": ([good, "--layers", "decoder"], "matches none of the 2 MLPs"),
        "bad regex": ([good, "--layers", "("], "not a valid regular expression"),
        "bad scheme": ([good, "--scheme", "w4a4"], "--scheme"),
        "bad granularity": ([good, "--granularity", "group:x"], "--granularity"),
        "bad method": ([good, "--scheme", "w8a8", "--method", "percentile:150"], "--method"),
        "bad smooth": ([good, "--scheme", "w8a8", "--smooth", "1.5"], "--smooth"),
        "method without w8a8": ([good, "--method", "mse"], "w8a16 quantizes the weights alone"),
        "bad gelu": ([good, "--gelu", "relu"], "--gelu"),
        "missing calib": ([good, "--scheme", "w8a8", "--activations", "static", "--calib", tmp_path / "nope.safetensors"], "no such file"),
        "calib without a layer": ([good, "--scheme", "w8a8", "--smooth", "0.5", "--calib", calib], "has no tensor 'encoder.layer.1.intermediate.dense'"),
        "calib not safetensors": ([good, "--scheme", "w8a8", "--activations", "static", "--calib", corrupt["empty"]], "not a valid safetensors file"),
        "static without calib": ([good, "--scheme", "w8a8", "--activations", "static"], "static activation scales need calibration rows: pass --calib FILE"),
        "smooth without calib": ([good, "--scheme", "w8a8", "--smooth", "0.5"], "need calibration rows: pass --calib FILE"),
        "calib with dynamic": ([good, "--scheme", "w8a8", "--calib", calib], "--activations dynamic computes its scales at run time"),
        "unsupported group": ([good, "--scheme", "w8a8", "--activations", "group:100"], "the int8 kernels run group:32, group:64, group:128"),
        "w8a8 group weights": ([good, "--scheme", "w8a8", "--granularity", "group:128"], "w8a8 takes per-channel weight scales"),
        "group not dividing K": ([good, "--granularity", "group:7"], "does not divide encoder.layer.0.intermediate.dense's input width"),
        "existing output": ([good, "-o", tmp_path / "taken.safetensors"], "pass --force"),
        "output is input": ([good, "-o", good, "--force"], "never overwrites its input"),
        "output dir missing": ([good, "-o", tmp_path / "no" / "q.safetensors"], "does not exist"),
    }
    return cases


def test_each_bad_input_is_one_red_line_and_exit_2(tmp_path):
    cases = bad_inputs(tmp_path)
    before = {p: sha256_file(p) for p in tmp_path.iterdir()}
    for what, (args, message) in cases.items():
        result = run(*args)
        assert result.exit_code == 2, (what, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (what, result.stderr)
        assert message in " ".join(result.stderr.split()), (what, result.stderr)
        assert "Traceback" not in result.output
        # Inputs untouched, nothing written (no output, no temporary file).
        assert {p: sha256_file(p) for p in tmp_path.iterdir()} == before, what


def test_debug_shows_the_traceback(tmp_path):
    result = runner.invoke(app, ["--debug", "quantize", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "CheckpointError" in result.stderr


def test_the_installed_command_runs(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "vit")
    command = [sys.executable, "-m", "gelugemm_cli", "quantize", str(source)]
    env = {**os.environ, "COLUMNS": str(WIDE)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert is_quantized_file(tmp_path / "model.int8.safetensors")
    again = subprocess.run(command, capture_output=True, text=True, env=env)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "pass --force" in again.stderr


@pytest.mark.parametrize("granularity", ["per-channel", "group:16"])
def test_granularity_reaches_the_file(tmp_path, granularity):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert", d_model=32)
    assert run(source, "--granularity", granularity).exit_code == 0
    record, _ = read_quantized(tmp_path / "model.int8.safetensors")
    assert record["granularity"] == granularity
