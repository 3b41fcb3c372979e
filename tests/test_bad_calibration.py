"""Bad calibration input is one `error:` line and exit 2, for quantize and verify alike
(calibration/data.py checks a --calib file's rows once for both; calibration/verify.py checks
what it reads from a quantized file): all-zero rows, NaN or Inf anywhere in the file, integer
rows, a --tokens that cannot fit in memory, too few held-out rows for verify, and a NaN in a
quantized file's bias. verify exits 1 only for a valid run past tolerance.
"""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from calibration.data import MIN_HELD_OUT_ROWS, min_rows_for_verify, split_rows
from checkpoints import write_calibration, write_checkpoint
from cli_helpers import invoke, one_line_error

LAYERS = [f"encoder.layer.{i}.intermediate.dense" for i in (0, 1)]  # the bert checkpoint's fc1 prefixes
D_MODEL = 16
STATIC = ["--scheme", "w8a8", "--activations", "static"]
SMOOTH = ["--scheme", "w8a8", "--smooth", "0.5"]


pytestmark = pytest.mark.usefixtures("wide_consoles")


@pytest.fixture
def model(tmp_path) -> Path:
    return write_checkpoint(tmp_path / "m.safetensors", "bert")


def rows(n: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(n, D_MODEL, generator=g) for name in LAYERS}


def calib_file(tmp_path, tensors: dict[str, torch.Tensor], name: str = "calib.safetensors") -> Path:
    return write_calibration(tmp_path / name, tensors)


def refused_everywhere(model: Path, tmp_path: Path, calib: Path) -> list[str]:
    """The line each of quantize (static, smooth) and verify prints for `calib`; none writes an output."""
    lines = [
        one_line_error(invoke("quantize", model, "-o", tmp_path / "q.safetensors", *STATIC, "--calib", calib)),
        one_line_error(invoke("quantize", model, "-o", tmp_path / "q.safetensors", *SMOOTH, "--calib", calib)),
        one_line_error(invoke("verify", model, "--calib", calib)),
    ]
    assert not (tmp_path / "q.safetensors").exists()
    return lines


def test_a_good_calibration_file_is_taken_by_both(model, tmp_path):
    calib = calib_file(tmp_path, rows())
    assert invoke("quantize", model, "-o", tmp_path / "q.safetensors", *STATIC, "--calib", calib).exit_code == 0
    assert invoke("verify", model, "--calib", calib, "--dtype", "fp16").exit_code == 0


# ---- 1. all-zero rows -----------------------------------------------------------------------------


def test_all_zero_rows_are_refused_naming_the_mlp(model, tmp_path):
    tensors = rows()
    tensors[LAYERS[1]] = torch.zeros(64, D_MODEL)
    for line in refused_everywhere(model, tmp_path, calib_file(tmp_path, tensors)):
        assert LAYERS[1] in line and "are all zero" in line, line


def test_an_all_zero_split_is_refused_by_both(model, tmp_path):
    """quantize reads only the calibrate split, verify only the held-out one: either all zero
    is refused by both, before any work."""
    tensors = rows()
    start, stop = split_rows(64, "verify")
    tensors[LAYERS[0]][start:stop] = 0
    for line in refused_everywhere(model, tmp_path, calib_file(tmp_path, tensors)):
        assert LAYERS[0] in line and "verify split" in line and "all zero" in line, line
    tensors = rows()
    tensors[LAYERS[0]][:start] = 0
    for line in refused_everywhere(model, tmp_path, calib_file(tmp_path, tensors, "c2.safetensors")):
        assert "calibrate split" in line and "all zero" in line, line


# ---- 2. NaN or Inf ------------------------------------------------------------------------------


@pytest.mark.parametrize("row", [0, 63], ids=["calibrate split", "held-out split"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_anywhere_is_refused_by_quantize_and_verify(model, tmp_path, row, value):
    tensors = rows()
    tensors[LAYERS[1]][row, 3] = value
    for line in refused_everywhere(model, tmp_path, calib_file(tmp_path, tensors)):
        assert f"{LAYERS[1]} holds NaN or Inf" in line and f"row {row}" in line, line


def test_nan_past_tokens_is_still_refused(model, tmp_path):
    """--tokens reads the first rows only; the file is checked whole all the same."""
    tensors = rows()
    tensors[LAYERS[0]][40, 0] = float("nan")
    calib = calib_file(tmp_path, tensors)
    line = one_line_error(invoke("quantize", model, "-o", tmp_path / "q.safetensors", *STATIC, "--calib", calib, "--tokens", "4"))
    assert "holds NaN or Inf" in line


# ---- 3. integer rows ----------------------------------------------------------------------------


def test_integer_rows_are_refused(model, tmp_path):
    tensors = {name: (t * 10).to(torch.int32) for name, t in rows().items()}
    for line in refused_everywhere(model, tmp_path, calib_file(tmp_path, tensors)):
        assert f"{LAYERS[0]} is I32" in line and "float" in line, line


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_float_dtype_is_taken(model, tmp_path, dtype):
    calib = calib_file(tmp_path, {name: t.to(dtype) for name, t in rows().items()})
    assert invoke("quantize", model, "-o", tmp_path / "q.safetensors", *STATIC, "--calib", calib).exit_code == 0


# ---- 4. --tokens that cannot fit ------------------------------------------------------------------


def test_tokens_that_cannot_fit_in_memory_are_an_option_error(model, tmp_path):
    huge = str(10**15)  # 10^15 rows of 16 + 48 float32s: 256 PB
    for result in (
        invoke("quantize", model, "-o", tmp_path / "q.safetensors", *STATIC, "--calib", "synthetic", "--tokens", huge),
        invoke("quantize", model, "-o", tmp_path / "q.safetensors", *SMOOTH, "--calib", "synthetic", "--tokens", huge),
        invoke("verify", model, "--tokens", huge),
    ):
        line = one_line_error(result)
        assert f"--tokens {huge}" in line and "of memory" in line and "pass at most" in line, line
    assert not (tmp_path / "q.safetensors").exists()


# ---- 5. too few held-out rows for verify ------------------------------------------------------------


def test_verify_needs_enough_held_out_rows(model, tmp_path):
    few = min_rows_for_verify() - 1
    line = one_line_error(invoke("verify", model, "--calib", calib_file(tmp_path, rows(3))))
    assert "has 3 rows" in line and "1 row(s) here" in line and f"needs at least {MIN_HELD_OUT_ROWS}" in line, line
    line = one_line_error(invoke("verify", model, "--calib", calib_file(tmp_path, rows(few), "few.safetensors")))
    assert f"a file of at least {few + 1} rows" in line, line
    enough = calib_file(tmp_path, rows(few + 1), "enough.safetensors")
    assert split_rows(few + 1, "verify")[1] - split_rows(few + 1, "verify")[0] == MIN_HELD_OUT_ROWS
    assert invoke("verify", model, "--calib", enough, "--dtype", "fp16").exit_code == 0


# ---- 6. NaN in a quantized file ---------------------------------------------------------------------


def test_nan_in_a_quantized_bias_is_bad_input_not_a_failed_row(model, tmp_path):
    q = tmp_path / "q.safetensors"
    assert invoke("quantize", model, "-o", q, "--scheme", "w8a8").exit_code == 0
    assert invoke("verify", q).exit_code == 0
    with safe_open(str(q), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(q))
    bias = "encoder.layer.1.output.dense.bias"
    tensors[bias][2] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    line = one_line_error(invoke("verify", bad))
    assert bias in line and "NaN/Inf" in line, line
