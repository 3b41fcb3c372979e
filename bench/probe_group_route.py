"""w8a8 `group:128` at 4096x16384 and few rows: the op's three launches (its route today)
against the one launch (kernels/fused_mlp.py, with "group" added to
FUSED_W8A8_LARGE_WEIGHT_SCHEMES), each called from Python (CUDA events around each call:
host cost included) and replayed in a CUDA graph (GPU time), µs, with fp16 eager timed
alongside. Decides which route the op takes for group:G at large weights.

    python3 bench/probe_group_route.py [--shape 4096x16384] [--tokens 1,16]
"""

import argparse
import math

import torch
import torch.nn.functional as F

import kernels.fused_mlp as fm
from bench.probe_fused import float_weight_sets, quantized
from kernels.bench import graph_time, median_time, rotation_sets
from kernels.op import FusedMLP, MLPConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="4096x16384")
    parser.add_argument("--tokens", default="1,16")
    args = parser.parse_args()
    d, f = map(int, args.shape.split("x"))
    torch.manual_seed(0)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    n_sets = rotation_sets(2 * d * f, l2)
    float_sets = float_weight_sets(d, f, torch.float16, n_sets)
    int8_sets = [(quantized(f, d), b1, quantized(d, f), b2) for _, b1, _, b2 in float_sets]
    op = FusedMLP(MLPConfig(dtype="w8a8", activations="group:128", gelu="tanh", backend="triton"), device="cuda")
    default_schemes = fm.FUSED_W8A8_LARGE_WEIGHT_SCHEMES
    print(f"{args.shape}, {n_sets} rotation sets, {torch.cuda.get_device_name()}")
    print(f"{'M':>5} {'path':<28} {'calls us':>9} {'graph us':>9} {'calls/graph':>12} {'x eager (graph)':>16}")
    for m in map(int, args.tokens.split(",")):
        xs = [torch.randn(m, d, device="cuda", dtype=torch.float16) for _ in range(n_sets)]

        def eager(i):
            w1, b1, w2, b2 = float_sets[i]
            return F.linear(F.gelu(F.linear(xs[i], w1, b1), approximate="tanh"), w2, b2)

        def int8(i):
            return op(xs[i], *int8_sets[i])

        rows, outs = [("fp16 eager", eager, default_schemes)], {}
        for route, schemes in (("three launches", default_schemes), ("one launch", (*default_schemes, "group"))):
            rows.append((f"w8a8 group:128 {route}", int8, schemes))
        for name, call, schemes in rows:
            fm.FUSED_W8A8_LARGE_WEIGHT_SCHEMES = schemes  # read by fused_w8a8_applies at every call
            outs[name] = call(0).float()
            calls, graph = median_time(call, n_sets, 25, 200), graph_time(call, n_sets, 25, 200)
            if name == "fp16 eager":
                eager_graph = graph.median_us
            print(f"{m:>5} {name:<28} {calls.median_us:>9.1f} {graph.median_us:>9.1f} "
                  f"{calls.median_us / graph.median_us:>12.2f} {eager_graph / graph.median_us:>16.2f}"
                  f"   calls p20-p80 {calls.p20_us:.1f}-{calls.p80_us:.1f}")  # fmt: skip
        fm.FUSED_W8A8_LARGE_WEIGHT_SCHEMES = default_schemes
        a, b = outs["w8a8 group:128 three launches"], outs["w8a8 group:128 one launch"]
        rel = ((a - b).norm() / a.norm()).item()
        print(f"{m:>5} one launch against three: relative error {rel:.2e}" + ("" if math.isfinite(rel) else " (NaN)"))

if __name__ == "__main__":
    main()
