"""calibration/data.py: calibration inputs from a file or from the LayerNorm statistics."""

import pytest
import torch

from calibration.checkpoint import find_mlps, open_checkpoint
from calibration.data import HELD_OUT_FRACTION, calibration_inputs, split_rows
from calibration.errors import CheckpointError, OptionError
from checkpoints import checkpoint_tensors, write_calibration, write_checkpoint


@pytest.fixture
def bert(tmp_path):
    path = write_checkpoint(tmp_path / "model.safetensors", "bert", d_model=16, n_layers=2)
    return path, find_mlps(path), checkpoint_tensors("bert", d_model=16, n_layers=2)


def test_synthetic_inputs_follow_the_layernorm(bert):
    path, layers, tensors = bert
    layer = layers[1]
    with open_checkpoint(path) as ckpt:
        x, source = calibration_inputs(ckpt, layer, tokens=4096, seed=0)
    gamma = tensors[f"{layer.norm}.weight"]
    beta = tensors[f"{layer.norm}.bias"]
    assert x.shape == (4096, 16) and x.dtype == torch.float32
    # Per channel: mean beta, standard deviation |gamma| (4096 draws: ~1.6% standard error).
    torch.testing.assert_close(x.mean(0), beta, atol=0.1 * gamma.abs().max().item(), rtol=0)
    torch.testing.assert_close(x.std(0), gamma.abs(), rtol=0.1, atol=0)
    assert layer.norm in source and "seed 0" in source


def test_synthetic_inputs_without_a_layernorm_are_standard_normal(tmp_path):
    path = write_checkpoint(tmp_path / "plain.safetensors", "plain", d_model=16)
    layer = find_mlps(path)[0]
    with open_checkpoint(path) as ckpt:
        x, source = calibration_inputs(ckpt, layer, tokens=4096)
    torch.testing.assert_close(x.mean(0), torch.zeros(16), atol=0.1, rtol=0)
    torch.testing.assert_close(x.std(0), torch.ones(16), atol=0.1, rtol=0)
    assert "no LayerNorm" in source


def test_synthetic_inputs_are_seeded_and_splits_and_layers_differ(bert):
    path, layers, _ = bert
    with open_checkpoint(path) as ckpt:
        draw = lambda layer, **kw: calibration_inputs(ckpt, layer, tokens=64, **kw)[0]  # noqa: E731
        a = draw(layers[0], seed=0)
        assert torch.equal(a, draw(layers[0], seed=0))
        assert not torch.equal(a, draw(layers[0], seed=1))
        assert not torch.equal(a, draw(layers[0], seed=0, split="verify"))
        # Standardized, the two layers' draws would be the same rows if they shared a seed.
        z0 = (a - a.mean(0)) / a.std(0)
        b = draw(layers[1], seed=0)
        assert not torch.allclose(z0, (b - b.mean(0)) / b.std(0), atol=1e-3)
        assert draw(layers[0], seed=0).shape == (64, 16)
        assert calibration_inputs(ckpt, layers[0])[0].shape == (512, 16)


def test_file_splits_are_disjoint_and_cover_the_file(bert, tmp_path):
    path, layers, _ = bert
    rows = torch.arange(40 * 16, dtype=torch.float32).view(40, 16)
    calib = write_calibration(tmp_path / "calib.safetensors", {layers[0].fc1: rows, layers[1].fc1: rows.half()})
    with open_checkpoint(path) as ckpt:
        cal, source = calibration_inputs(ckpt, layers[0], calib=calib)
        ver, _ = calibration_inputs(ckpt, layers[0], calib=calib, split="verify")
        assert torch.equal(torch.cat([cal, ver]), rows)
        assert ver.shape[0] == int(40 * HELD_OUT_FRACTION)
        assert "calibrate split" in source and layers[0].fc1 in source
        first, _ = calibration_inputs(ckpt, layers[0], calib=calib, tokens=5)
        assert torch.equal(first, rows[:5])
        held_out, _ = calibration_inputs(ckpt, layers[0], calib=calib, tokens=3, split="verify")
        assert torch.equal(held_out, rows[30:33])
        half, _ = calibration_inputs(ckpt, layers[1], calib=calib)
        assert half.dtype == torch.float32 and torch.equal(half, rows[:30])


def test_split_rows_keeps_one_row_for_each_split():
    assert split_rows(2, "calibrate") == (0, 1) and split_rows(2, "verify") == (1, 2)
    assert split_rows(10, "calibrate") == (0, 8) and split_rows(10, "verify") == (8, 10)
    with pytest.raises(CheckpointError, match="at least 2 rows"):
        split_rows(1, "calibrate")
    with pytest.raises(OptionError, match="split"):
        split_rows(10, "test")


@pytest.mark.parametrize(
    "rows,complaint",
    [
        ({"encoder.layer.0.intermediate.dense.weight": torch.randn(8, 16)}, "has no tensor 'encoder.layer.0.intermediate.dense'"),
        ({"encoder.layer.0.intermediate.dense": torch.randn(8, 15)}, r"shape \[8, 15\], expected \[tokens, 16\]"),
        ({"encoder.layer.0.intermediate.dense": torch.randn(2, 8, 16)}, r"expected \[tokens, 16\]"),
        ({"encoder.layer.0.intermediate.dense": torch.full((8, 16), float("nan"))}, "NaN or Inf"),
    ],
)
def test_bad_calibration_files(bert, tmp_path, rows, complaint):
    path, layers, _ = bert
    calib = write_calibration(tmp_path / "calib.safetensors", rows)
    with open_checkpoint(path) as ckpt, pytest.raises(CheckpointError, match=complaint):
        calibration_inputs(ckpt, layers[0], calib=calib)


def test_zero_tokens_is_an_option_error(bert):
    path, layers, _ = bert
    with open_checkpoint(path) as ckpt, pytest.raises(OptionError, match="--tokens"):
        calibration_inputs(ckpt, layers[0], tokens=0)
