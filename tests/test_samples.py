"""The committed samples (samples/capture_minilm.py wrote them): real MLP inputs in the --calib format."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from calibration.checkpoint import find_mlps
from calibration.data import split_rows

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def mlp_key(i: int) -> str:
    return f"encoder.layer.{i}.intermediate.dense"


def test_samples_hold_real_mlp_inputs_in_the_calib_format():
    weights = load_file(str(SAMPLES / "minilm-mlp.safetensors"))
    activations = load_file(str(SAMPLES / "minilm-calib.safetensors"))
    with safe_open(str(SAMPLES / "minilm-calib.safetensors"), framework="pt") as f:
        record = json.loads(f.metadata()["source"])
    assert record["calibrate"].startswith("rows 0-1535:") and record["verify"].startswith("rows 1536-2047:")
    assert json.loads((SAMPLES / "config.json").read_text())["hidden_act"] == "gelu"

    assert list(activations) == [mlp_key(0), mlp_key(5)]
    for key, x in activations.items():
        norm = key.replace("intermediate.dense", "attention.output.LayerNorm")
        assert x.shape == (2048, 384) and x.dtype == torch.float16
        assert weights[f"{key}.weight"].shape == (1536, 384) and weights[f"{norm}.weight"].shape == (384,)
        # Each row is that LayerNorm's output, gamma * z + beta with z of zero mean and unit
        # variance across channels: undo the affine part and check (fp16 rounding aside).
        z = (x.double() - weights[f"{norm}.bias"].double()) / weights[f"{norm}.weight"].double()
        assert z.mean(dim=1).abs().max() < 1e-3
        assert (z.var(dim=1, unbiased=False) - 1).abs().max() < 5e-3


def test_samples_line_up_with_the_quantize_conventions():
    # quantize finds both MLPs, the LayerNorm feeding each, and the erf GELU from config.json.
    layers = find_mlps(SAMPLES / "minilm-mlp.safetensors")
    assert [layer.fc1 for layer in layers] == [mlp_key(0), mlp_key(5)]
    assert all(layer.gelu == "erf" and layer.norm is not None for layer in layers)
    # verify's held-out slice of the --calib file is exactly the rows taken from the verify lines
    # (capture_minilm.py's HELD_OUT_FRACTION is calibration.data's).
    assert split_rows(2048, "calibrate") == (0, 1536) and split_rows(2048, "verify") == (1536, 2048)
