"""Every candidate config of the one-launch MLP (kernels/fused_mlp.py), forced one at a time,
against the op's other paths and eager on the same weights and inputs: CUDA-graph replays
(GPU time), µs. For picking the tables and the row bounds (FUSED_MAX_M,
FUSED_W8A8_SMALL_MAX_M); a config that fails to compile or to match the reference says so.

    python3 bench/probe_fused_configs.py [--dtype fp16|bf16|w8a8|w8a16] [--shapes 768x3072] [--tokens 256,512,1024]
        [--json FILE] [--gelu erf|tanh] [--activations dynamic|static|group:128]

Each config runs alone (the one-launch kernel never autotunes: each row bucket has one config).
"two" is the op's float or w8a16 path without the one launch (two GEMM launches; w8a16 with
group:128 weights, its default), "four" the w8a8 `dynamic` path's four launches, "three" the
`static` and `group:G` paths' three; "eager" is fp16/bf16 torch (F.linear, F.gelu, F.linear).
w8a8 `group:G` runs each candidate fitted to its groups (kernels/fused_mlp.py's fit_group).
"""

import argparse
import json
import math

import torch
import torch.nn.functional as F

import kernels.fused_mlp as fm
import kernels.op as op_module
from bench.probe_fused import float_weight_sets, quantized
from kernels.bench import graph_time, rotation_sets
from kernels.gemm import gemm_bias_act
from kernels.reference import mlp_reference, w8a8_mlp_reference, w8a16_mlp_reference
from kernels.op import FusedMLP, MLPConfig
from kernels.schemes import ActivationScheme
from kernels.w8a8 import quantize_activations, w8a8_linear
from kernels.w8a16 import w8a16_linear

c = fm._fcfg
FLOAT_CANDIDATES = [
    c(64, 64, 64, 128, 4), c(64, 64, 64, 128, 2), c(64, 128, 64, 128, 4), c(64, 128, 128, 64, 4),
    c(64, 128, 128, 64, 2), c(64, 128, 64, 64, 4, stages=4), c(128, 64, 64, 128, 4, warps=8),
    c(128, 128, 128, 64, 2, warps=8), c(128, 128, 128, 64, 4, warps=8), c(128, 128, 64, 64, 4, warps=8),
    c(128, 128, 64, 64, 2, warps=8), c(128, 128, 128, 64, 1, warps=8), c(128, 256, 128, 64, 2, warps=8),
    c(128, 128, 64, 64, 4, warps=4),
]  # fmt: skip
W8A8_CANDIDATES = [
    c(64, 64, 64, 128, 4), c(64, 64, 64, 256, 4), c(64, 64, 64, 128, 8), c(32, 64, 64, 256, 4),
    c(64, 128, 64, 128, 4), c(64, 128, 128, 128, 4), c(64, 128, 128, 128, 2), c(128, 128, 128, 128, 2, warps=8),
    c(128, 128, 64, 128, 4, warps=8), c(128, 64, 64, 128, 4, warps=8), c(64, 64, 64, 64, 4, stages=4),
    # the decode configs (16-row blocks)
    c(16, 64, 64, 256, 8), c(16, 64, 64, 256, 4), c(16, 128, 128, 256, 4), c(16, 128, 128, 128, 4), c(16, 64, 64, 128, 8),
    c(16, 128, 64, 128, 8),
    # the 16- and 32-row buckets' configs with the register cap lifted: ptxas holds them to 128
    # registers and spills 16 B at 768x3072 (bench/fused_resources.py; 168 removes it)
    c(16, 64, 64, 256, 8, maxnreg=168), c(16, 64, 64, 256, 4, maxnreg=168),
]  # fmt: skip
W8A16_CANDIDATES = [
    c(16, 64, 64, 256, 8), c(16, 64, 64, 256, 4), c(16, 64, 64, 128, 8), c(16, 128, 128, 256, 4),
    c(16, 128, 128, 128, 4), c(16, 64, 128, 256, 4), c(16, 128, 64, 256, 8), c(16, 128, 128, 512, 4, stages=2),
    c(32, 64, 64, 256, 4), c(64, 64, 64, 128, 4), c(64, 64, 64, 256, 4), c(64, 128, 64, 128, 4),
]  # fmt: skip


def label(cfg):
    kw = cfg.kwargs
    return "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_F", "BLOCK_D", "BLOCK_K", "SPLIT_F")) + (
        f" w{cfg.num_warps}s{cfg.num_stages}" + (f" r{cfg.maxnreg}" if cfg.maxnreg else "")
    )


def force(cfg, scheme):
    """Make the one launch run cfg, for every row count and weight size."""
    table = {b: cfg for b in (16, 32, 64, 128, 256, 512, 1024, 2048)}
    if scheme == "w8a8":
        fm.FUSED_W8A8_CONFIGS, fm.FUSED_W8A8_LARGE_CONFIGS = table, {}
        fm._fused_w8a8_mlp = fm._dispatched(table, {})
        fm._fused_w8a8_group_mlps.clear()  # group:G's dispatchers are made again from the tables
    elif scheme == "w8a16":
        fm.FUSED_W8A16_CONFIGS, fm.FUSED_W8A16_LARGE_CONFIGS = table, {}
        fm._fused_w8a16_mlp = fm._dispatched(table, {})
    else:
        fm.FUSED_CONFIGS = table
        fm._fused_mlp = fm._dispatched(table)
    fm._plans.clear()


def three_launches(dtype, gelu, activations):
    """The op's w8a8 static or group:G path as three launches (the one launch turned off)."""
    op = FusedMLP(MLPConfig(dtype="w8a8", activation_dtype="bf16" if dtype == torch.bfloat16 else "fp16", gelu=gelu,
                            activations=activations, backend="triton"), device="cuda")  # fmt: skip

    def run(x, w1, b1, w2, b2):
        applies = op_module.fused_w8a8_applies
        op_module.fused_w8a8_applies = lambda *args: False
        try:
            return op(x, w1, b1, w2, b2)
        finally:
            op_module.fused_w8a8_applies = applies

    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="768x3072")
    parser.add_argument("--tokens", default="256,512,1024")
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--json", default=None)
    parser.add_argument("--gelu", default="tanh", help="erf or tanh (every path)")
    parser.add_argument("--activations", default="dynamic", help="w8a8's scheme: dynamic, static or group:G")
    args = parser.parse_args()
    activations = ActivationScheme.parse(args.activations)
    gelu = args.gelu
    scheme = args.dtype if args.dtype in ("w8a8", "w8a16") else None
    w8a8 = scheme == "w8a8"
    group_size = 128 if scheme == "w8a16" else None  # w8a16's default granularity
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    three = three_launches(dtype, gelu, activations)
    candidates = {"w8a8": W8A8_CANDIDATES, "w8a16": W8A16_CANDIDATES, None: FLOAT_CANDIDATES}[scheme]
    if w8a8 and activations.group_size:  # fitted to the groups; the duplicates that makes dropped
        candidates = list({label(fm.fit_group(cfg, activations.group_size)): cfg for cfg in candidates}.values())
    torch.manual_seed(0)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    records = []
    for shape in args.shapes.split(","):
        d, f = map(int, shape.split("x"))
        n_sets = rotation_sets(2 * d * f * (1 if scheme else 2), l2)
        float_sets = float_weight_sets(d, f, dtype, n_sets)
        if scheme:
            sets = [(quantized(f, d, group_size), b1, quantized(d, f, group_size), b2) for _, b1, _, b2 in float_sets]
        else:
            sets = float_sets
        for m in map(int, args.tokens.split(",")):
            xs = [torch.randn(m, d, device="cuda", dtype=dtype) for _ in range(n_sets)]
            if w8a8 and activations.kind == "static":
                for i, (w1, b1, _, _) in enumerate(sets):  # calibrated on this set's input, a max observer
                    h = F.gelu(xs[i].float() @ w1.dequantize().t() + b1.float())
                    w1.input_scale = xs[i].float().abs().amax().reshape(1) / 127
                    w1.output_scale = h.abs().amax().reshape(1) / 127

            def one(i):
                if w8a8:
                    return fm.fused_w8a8_mlp(xs[i], *sets[i], activation=gelu, activations=activations)
                if scheme == "w8a16":
                    return fm.fused_w8a16_mlp(xs[i], *sets[i], activation=gelu)
                return fm.fused_mlp(xs[i], *sets[i], activation=gelu)

            def other(i):
                w1, b1, w2, b2 = sets[i]
                if w8a8 and activations.kind != "dynamic":
                    return three(xs[i], *sets[i])
                if w8a8:
                    xq, x_scale = quantize_activations(xs[i])
                    h = w8a8_linear(xq, x_scale, w1, b1, activation=gelu, out_dtype=dtype)
                    hq, h_scale = quantize_activations(h)
                    return w8a8_linear(hq, h_scale, w2, b2, out_dtype=dtype)
                if scheme == "w8a16":
                    return w8a16_linear(w8a16_linear(xs[i], w1, b1, activation=gelu), w2, b2)
                return gemm_bias_act(gemm_bias_act(xs[i], w1, b1, activation=gelu), w2, b2)

            def eager(i):
                w1, b1, w2, b2 = float_sets[i]
                return F.linear(F.gelu(F.linear(xs[i], w1, b1), approximate="tanh" if gelu == "tanh" else "none"), w2, b2)

            if w8a8:
                exact = w8a8_mlp_reference(xs[0], *sets[0], gelu_flavour=gelu, activations=activations).double()
                limit = 1e-2  # the kernel equals the reference up to rounding order in GEMM2's split sums
            elif scheme == "w8a16":
                exact = w8a16_mlp_reference(xs[0], *sets[0], gelu_flavour=gelu).double()
                limit = 2e-3
            else:
                exact = mlp_reference(xs[0], *sets[0], gelu_flavour=gelu, dtype=torch.float64)
                limit = 2e-3 if dtype == torch.float16 else 1e-2

            def err(y):
                return ((y.double() - exact).norm() / exact.norm()).item()

            base = {}
            other_name = ("four" if activations.kind == "dynamic" else "three") if w8a8 else "two"
            for name, call in (("eager", eager), (other_name, other)):
                base[name] = graph_time(call, n_sets, 10, 50).median_us
            rows = []
            for cfg in candidates:
                force(cfg, scheme)
                try:
                    e = err(one(0))
                    t = graph_time(one, n_sets, 10, 50).median_us if e < limit else float("nan")
                    note = "" if e < limit else f"WRONG err {e:.1e}"
                except Exception as exc:  # out of shared memory, a compile failure: say so, go on
                    t, e, note = float("nan"), float("nan"), f"FAILED {type(exc).__name__}: {str(exc)[:80]}"
                rows.append((t, label(cfg), e, note))
                records.append(dict(dtype=args.dtype, activations=args.activations if w8a8 else None, d=d, f=f, m=m, config=label(cfg), us=t, err=e, note=note, **base))
            rows.sort(key=lambda r: (math.isnan(r[0]), r[0]))
            eager_us = base["eager"]
            print(f"{args.dtype}{' ' + args.activations if w8a8 else ''} {d}x{f} M={m}: eager {eager_us:.1f} us, "
                  + ", ".join(f"{k} {v:.1f}" for k, v in base.items() if k != "eager"), flush=True)  # fmt: skip
            for t, name, e, note in rows:
                print(f"    {name:<26s} {t:7.1f} us  {eager_us / t:5.2f}x eager  err {e:.1e} {note}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(records, fh, indent=1)


if __name__ == "__main__":
    main()
