"""What a tensor-parallel split does to int8 accuracy, on the real all-MiniLM-L6-v2 (CPU).

    PYTHONPATH=. python3 bench/tp_accuracy.py [--checkpoint FILE_OR_DIR] [--calib FILE] [--worlds 1,2,4]

Each MLP is quantized whole (as `gelugemm quantize` does; w8a8 static calibrated on the
calibration file's "calibrate" split), then run on its "verify" split (the held-out rows)
through the op's torch backend (the kernels' arithmetic) as one GPU runs it and as R ranks
of `TensorParallelMLP` run it (`kernels.parallel.tensor_parallel_in_one_process`: each
rank's shard, the fp16 partials summed, b2 once). x is fp16, as an fp16 model feeds it.

Under w8a8 `dynamic` each rank quantizes its d_ff / R columns of the GELU output with its
own per-row scale, so TP computes something other than one GPU; `group:128` (shard edges on
group edges) and `static` compute the same int8 products and differ from one GPU only by
rounding each rank's partial output to fp16 before the sum; so does w8a16.

Printed per (scheme, R): the relative Frobenius error ||y - ref|| / ||ref|| against the fp16
path (verify's gate: F.linear, F.gelu, F.linear in fp16), against float64 (the exact MLP),
and against one GPU's result, each the mean over the six MLPs, and the worst MLP's error
against the fp16 path. --json writes every MLP's numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from calibration.checkpoint import find_mlps, open_checkpoint, read_mlp
from calibration.data import file_inputs
from calibration.quantize_mlp import quantize_mlp
from calibration.verify import torch_mlp
from kernels.op import MLPConfig
from kernels.parallel import tensor_parallel_in_one_process

CACHE = Path("/work/main/.cache/minilm")
# (label, quantize_mlp's scheme, w8a16 group size, w8a8 activations)
SCHEMES = (
    ("w8a8 dynamic", "w8a8", None, "dynamic"),
    ("w8a8 group:128", "w8a8", None, "group:128"),
    ("w8a8 static", "w8a8", None, "static"),
    ("w8a16 group:128", "w8a16", 128, "dynamic"),
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def measure(checkpoint: Path, calib: Path, worlds: list[int]) -> list[dict]:
    rows = []
    layers = find_mlps(checkpoint)
    for layer in layers:
        with open_checkpoint(checkpoint) as handle:
            w1, b1, w2, b2, *_ = (t if t is None else t.float() for t in read_mlp(handle, layer))
        x_cal = file_inputs(calib, layer, split="calibrate")
        x = file_inputs(calib, layer, split="verify")
        kw = dict(gelu=layer.gelu, weight_layout=layer.weight_layout)
        fp16_path = torch_mlp(x, w1, b1, w2, b2, dtype=torch.float16, **kw)
        exact = torch_mlp(x.double(), w1, b1, w2, b2, dtype=torch.float64, **kw)
        x16 = x.half()
        for label, scheme, group, activations in SCHEMES:
            q1, q2 = quantize_mlp(w1, b1, w2, x_cal if activations == "static" else None, scheme=scheme,
                                  group_size=group, activations=activations, **kw)  # fmt: skip
            config = MLPConfig(dtype=scheme, gelu=layer.gelu, weight_layout=layer.weight_layout, backend="torch",
                               activations=activations)  # fmt: skip
            one_gpu = tensor_parallel_in_one_process(q1, b1, q2, b2, config, x16, 1)
            for world in worlds:
                y = one_gpu if world == 1 else tensor_parallel_in_one_process(q1, b1, q2, b2, config, x16, world)
                rows.append({
                    "layer": layer.fc1, "scheme": label, "world": world, "d_ff": layer.d_ff, "tokens": x.shape[0],
                    "vs_fp16_path": rel_err(y, fp16_path), "vs_float64": rel_err(y, exact),
                    "vs_one_gpu": rel_err(y, one_gpu), "max_abs_vs_one_gpu": (y.float() - one_gpu.float()).abs().max().item(),
                })  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| scheme | ranks | vs fp16 path (mean) | worst MLP | vs float64 (mean) | vs one GPU (mean) | max abs vs one GPU |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, *_ in SCHEMES:
        for world in sorted({r["world"] for r in rows}):
            sel = [r for r in rows if r["scheme"] == label and r["world"] == world]
            mean = lambda k: statistics.fmean(r[k] for r in sel)  # noqa: E731
            lines.append(
                f"| {label} | {world} | {100 * mean('vs_fp16_path'):.3f}% | {100 * max(r['vs_fp16_path'] for r in sel):.3f}% "
                f"| {100 * mean('vs_float64'):.3f}% | {mean('vs_one_gpu'):.1e} | {max(r['max_abs_vs_one_gpu'] for r in sel):.1e} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CACHE / "minilm-6mlp-fp32.safetensors")
    parser.add_argument("--calib", type=Path, default=CACHE / "minilm-calib.safetensors")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = measure(args.checkpoint, args.calib, [int(w) for w in args.worlds.split(",")])
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
