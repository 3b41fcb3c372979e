"""The one-launch MLP (kernels/fused_mlp.py) against the two GEMM launches and torch eager,
for small models at few rows: CUDA-graph replays (GPU time) and calls from Python (what a
caller without graphs sees), the same weights and inputs, each checked against float64.
With --dtype w8a8, the one-launch w8a8 `dynamic` MLP against its four launches (quantize x,
GEMM1, quantize h, GEMM2) and fp16 eager, checked against the w8a8 torch reference.
(Kernel-development probe: picks FUSED_MAX_M, FUSED_MAX_WEIGHT and the w8a8 bounds.)

    python3 bench/probe_fused.py [--shapes 768x3072,384x1536,1024x4096] [--tokens 1,16,...] [--dtype fp16|bf16|w8a8]
        [--gelu erf|tanh|quick]
"""

import argparse
import math

import torch
import torch.nn.functional as F

import kernels.fused_mlp as fused_module
from kernels.bench import graph_time, median_time, rotation_sets
from kernels.fused_mlp import fused_mlp, fused_w8a8_mlp
from kernels.gemm import gemm_bias_act
from kernels.quantized import QuantizedWeight
from kernels.reference import mlp_reference, w8a8_mlp_reference
from kernels.w8a8 import quantize_activations, w8a8_linear


def quantized(n, k, group_size=None):
    """A random int8 weight [n, k] with per-channel (or per-group) scales, scaled like a
    1/sqrt(k) float one."""
    data = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    shape = (n,) if group_size is None else (n, -(-k // group_size))
    scale = torch.full(shape, 1 / (73 * math.sqrt(k)), device="cuda") * (0.5 + torch.rand(shape, device="cuda"))
    return QuantizedWeight(data, scale, group_size)


def float_weight_sets(d, f, dtype, n_sets):
    """n_sets random (W1 [f, d], b1, W2 [d, f], b2) in dtype, the weights scaled by 1/sqrt(fan-in)."""
    return [
        (torch.randn(f, d, device="cuda", dtype=dtype) / math.sqrt(d), torch.randn(f, device="cuda", dtype=dtype),
         torch.randn(d, f, device="cuda", dtype=dtype) / math.sqrt(f), torch.randn(d, device="cuda", dtype=dtype))
        for _ in range(n_sets)
    ]  # fmt: skip


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="768x3072,384x1536,1024x4096")
    parser.add_argument("--tokens", default="1,16,32,64,128,256")
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--gelu", default="tanh", help="the GELU flavour of every path: erf, tanh or quick")
    args = parser.parse_args()
    gelu = args.gelu
    w8a8 = args.dtype == "w8a8"
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "w8a8": torch.float16}[args.dtype]
    torch.manual_seed(0)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    print(f"{'d x f':>10s} {'M':>5s} | {'fused':>7s} {'2 launch':>8s} {'eager':>7s} | {'fused':>7s} {'2 launch':>8s} "
          f"{'eager':>7s} | {'err64':>8s}  config   (us; graph | calls)")  # fmt: skip
    # The first capture on the graph stream allocates that stream's counters (a memset
    # inside the graph); take it here, not in a timed row.
    w = torch.randn(64, 32, device="cuda", dtype=dtype)
    x = torch.randn(4, 32, device="cuda", dtype=dtype)
    graph_time(lambda i: fused_mlp(x, w, None, w.t().contiguous(), None), 1, 1, 1)
    for shape in args.shapes.split(","):
        d, f = map(int, shape.split("x"))
        n_sets = rotation_sets(2 * d * f * (1 if w8a8 else 2), l2)
        sets = float_weight_sets(d, f, dtype, n_sets)
        if w8a8:
            float_sets = sets
            sets = [(quantized(f, d), b1, quantized(d, f), b2) for _, b1, _, b2 in float_sets]
        for m in map(int, args.tokens.split(",")):
            xs = [torch.randn(m, d, device="cuda", dtype=dtype) for _ in range(n_sets)]

            def fused(i):
                if w8a8:
                    return fused_w8a8_mlp(xs[i], *sets[i], activation=gelu)
                return fused_mlp(xs[i], *sets[i], activation=gelu)

            def two(i):
                w1, b1, w2, b2 = sets[i]
                if w8a8:  # the op's four launches of `dynamic`
                    xq, x_scale = quantize_activations(xs[i])
                    h = w8a8_linear(xq, x_scale, w1, b1, activation=gelu, out_dtype=dtype)
                    hq, h_scale = quantize_activations(h)
                    return w8a8_linear(hq, h_scale, w2, b2, out_dtype=dtype)
                return gemm_bias_act(gemm_bias_act(xs[i], w1, b1, activation=gelu), w2, b2)

            def eager(i):
                w1, b1, w2, b2 = float_sets[i] if w8a8 else sets[i]
                hidden = F.linear(xs[i], w1, b1)
                if gelu == "quick":
                    hidden = hidden * torch.sigmoid(1.702 * hidden)
                else:
                    hidden = F.gelu(hidden, approximate="tanh" if gelu == "tanh" else "none")
                return F.linear(hidden, w2, b2)

            if w8a8:
                exact = w8a8_mlp_reference(xs[0], *sets[0], gelu_flavour=gelu, activations="dynamic").double()
            else:
                exact = mlp_reference(xs[0], *sets[0], gelu_flavour=gelu, dtype=torch.float64)
            y = fused(0)
            err = ((y.double() - exact).norm() / exact.norm()).item()
            config = (fused_module._fused_w8a8_mlp if w8a8 else fused_module._fused_mlp).best_config
            graph, calls = [], []
            for call in (fused, two, eager):
                for i in range(n_sets):
                    call(i)
                torch.cuda.synchronize()
                graph.append(graph_time(call, n_sets, 10, 50).median_us)
                calls.append(median_time(call, n_sets, 10, 50).median_us)
            kw = config.kwargs if config is not None else {}
            label = "x".join(str(kw.get(k)) for k in ("BLOCK_M", "BLOCK_F", "BLOCK_D", "BLOCK_K", "SPLIT_F"))
            print(f"{d:>4d}x{f:<5d} {m:5d} | {graph[0]:7.1f} {graph[1]:8.1f} {graph[2]:7.1f} | {calls[0]:7.1f} "
                  f"{calls[1]:8.1f} {calls[2]:7.1f} | {err:8.1e}  {label}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
