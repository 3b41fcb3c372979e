"""Memory of `gelugemm quantize` on a synthetic sharded model (CPU; no GPU needed).

    python bench/quantize_memory.py                      # 8 x 4096x16384 fp16 MLPs over 4 shards (2.0 GiB)
    python bench/quantize_memory.py --mlps 6 --shards 3  # the lead's variant (1.5 GiB)

Builds a GPT-NeoX-named model directory in a temporary folder (one shard in memory at a
time), runs `gelugemm quantize DIR --scheme S --json -` in a fresh process for each scheme,
and prints, from the report's `memory` facts (calibration/memory.py):

- heap: the largest anonymous resident memory seen at quantize's sample points (after each
  MLP is quantized and after each tensor is written), minus the same at its start;
- peak RSS growth: the kernel's high-water mark of all resident memory (VmHWM, reset when
  the run starts), minus the resident memory at its start; it counts file pages the process
  maps (gelugemm reads shards with read(), not mmap, so the page cache is not in it).

The bounds issue 14 sets: heap <= 3 x the largest MLP's weights + 100 MB; peak RSS growth
<= the largest shard + 300 MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

MB = 1 << 20


def build(directory: Path, mlps: int, shards: int, d_model: int, d_ff: int) -> tuple[int, int]:
    """Write the model; returns (largest MLP's weight bytes, largest shard's bytes)."""
    per_shard = -(-mlps // shards)
    weight_map, largest_shard = {}, 0
    g = torch.Generator().manual_seed(0)
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for i in range(s * per_shard, min(mlps, (s + 1) * per_shard)):
            p = f"gpt_neox.layers.{i}."
            tensors[p + "post_attention_layernorm.weight"] = torch.ones(d_model, dtype=torch.float16)
            tensors[p + "post_attention_layernorm.bias"] = torch.zeros(d_model, dtype=torch.float16)
            tensors[p + "mlp.dense_h_to_4h.weight"] = (torch.randn(d_ff, d_model, generator=g) * 0.02).half()
            tensors[p + "mlp.dense_h_to_4h.bias"] = torch.zeros(d_ff, dtype=torch.float16)
            tensors[p + "mlp.dense_4h_to_h.weight"] = (torch.randn(d_model, d_ff, generator=g) * 0.02).half()
            tensors[p + "mlp.dense_4h_to_h.bias"] = torch.zeros(d_model, dtype=torch.float16)
        save_file(tensors, str(directory / name))
        weight_map.update({t: name for t in tensors})
        largest_shard = max(largest_shard, (directory / name).stat().st_size)
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({"model_type": "gpt_neox", "hidden_act": "gelu"}))
    return 2 * d_model * d_ff * 2, largest_shard


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The synthetic model's size and the schemes run on it (shared with bench/quantize_speed.py)."""
    parser.add_argument("--mlps", type=int, default=8)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--d-ff", type=int, default=16384)
    parser.add_argument("--schemes", default="w8a16,w8a8")


def measure(source: Path, scheme: str) -> dict:
    command = [sys.executable, "-m", "gelugemm_cli", "quantize", str(source), "--scheme", scheme, "--force", "--json", "-"]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "model"
        source.mkdir()
        mlp_bytes, shard_bytes = build(source, args.mlps, args.shards, args.d_model, args.d_ff)
        total = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        print(f"model: {args.mlps} x {args.d_model}x{args.d_ff} fp16 MLPs, {args.shards} shards, {total / MB:.0f} MiB; "
              f"largest MLP {mlp_bytes / MB:.0f} MiB, largest shard {shard_bytes / MB:.0f} MiB")  # fmt: skip
        heap_bound, rss_bound = 3 * mlp_bytes + 100 * MB, shard_bytes + 300 * MB
        print(f"bounds: heap <= {heap_bound / MB:.0f} MiB, peak RSS growth <= {rss_bound / MB:.0f} MiB")
        print("| scheme | heap (MiB) | peak RSS growth (MiB) | start RSS (MiB) | time (s) | within bounds |")
        print("| --- | ---: | ---: | ---: | ---: | --- |")
        for scheme in args.schemes.split(","):
            report = measure(source, scheme)
            mem = report["memory"]
            heap = mem["peak_anon_bytes"] - mem["start_anon_bytes"]
            rss = mem["peak_rss_bytes"] - mem["start_rss_bytes"]
            ok = heap <= heap_bound and rss <= rss_bound
            print(f"| {scheme} | {heap / MB:.0f} | {rss / MB:.0f} | {mem['start_rss_bytes'] / MB:.0f} | {report['seconds']:.1f} | {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
