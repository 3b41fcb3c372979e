"""Kernel-development probe for the float path (not the user-facing benchmark: that is
`gelugemm bench`). Times gelugemm's GEMM1, GEMM2 and whole MLP against torch eager and
cuBLASLt's GELU epilogue on the standard shapes, with a wide or narrow config space,
and prints which config the autotuner kept per M bucket with the timings of the others.

    python bench/probe_float.py --wide --dtype fp16 --json $OUT/probe.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
import triton

from kernels import gemm
from kernels.gemm_base import cfg
from kernels.op import FusedMLP, MLPConfig

DT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def wide_tma_configs():
    # (No subtiled epilogue with warp specialization: at 4 warps triton 3.6's compiler aborts
    # on it, and at 8 warps the flag compiles to the plain loop; bench/ws_survey.py.)
    out = []
    for bm, bn, bk, w, s in [(128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3)]:
        for extra in [{"EPILOGUE_SUBTILE": True}, {"EPILOGUE_SUBTILE": True, "FLATTEN": True}, {"FLATTEN": True}, {}]:
            out.append(cfg(bm, bn, bk, w, s, **extra))
    out.append(cfg(128, 256, 64, 8, 3, group_m=16, EPILOGUE_SUBTILE=True))
    out.append(cfg(128, 256, 64, 8, 3, group_m=4, EPILOGUE_SUBTILE=True))
    return out + list(gemm.TMA_WS_CANDIDATES)


def compiles(kern, cfg, run):
    """True when this config compiles and runs here (WS and flatten depend on the Triton version)."""
    saved = kern.configs
    kern.configs = [cfg]
    kern.cache.clear()
    try:
        run()
        torch.cuda.synchronize()
        return True
    except Exception as exc:  # noqa: BLE001 - a probe: report and drop the config
        print("DROP", cfg, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        return False
    finally:
        kern.configs = saved
        kern.cache.clear()


def widen():
    x = torch.randn(256, 512, device="cuda", dtype=torch.float16)
    w = torch.randn(1024, 512, device="cuda", dtype=torch.float16)
    ok = [c for c in wide_tma_configs() if compiles(gemm._gemm_tma_kernel, c, lambda: gemm.gemm_bias_act(x, w, activation="erf", path="tma"))]
    gemm.TMA_CONFIGS["large"][:] = ok
    gemm.STRIDED_CONFIGS[16][:] = [cfg(16, bn, bk, w, s) for bn, bk, w, s in [
        (16, 512, 4, 4), (32, 256, 4, 4), (32, 512, 4, 4), (64, 128, 4, 5), (64, 256, 4, 4), (64, 256, 8, 3),
        (128, 128, 4, 4), (32, 256, 4, 6)]]
    for kern, tables in ((gemm._gemm_tma_kernel, (gemm.TMA_CONFIGS, gemm.GATED_TMA_CONFIGS)),
                         (gemm._gemm_strided_kernel, (gemm.STRIDED_CONFIGS, gemm.GATED_STRIDED_CONFIGS))):  # fmt: skip
        kern.configs = list({str(c): c for table in tables for cfgs in table.values() for c in cfgs}.values())


def bench_ms(fn, warmup=50, rep=300):
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def rotating(make, count):
    sets = [make() for _ in range(count)]
    state = {"i": 0}

    def next_set():
        state["i"] = (state["i"] + 1) % count
        return sets[state["i"]]

    return next_set


def print_timings(label: str, d: int, f: int, m: int, kern=None) -> None:
    # an autotuned kernel's per-config times of its last search (then cleared for the next)
    kern = kern or gemm._gemm_tma_kernel
    for c, t in (getattr(kern, "configs_timings", None) or {}).items():
        print("TIMING", label, d, f, m, str(c).replace("num_ctas: 1, ", "").replace(", maxnreg: None", ""), f"{t[0] * 1e3:.1f}us")
    if hasattr(kern, "configs_timings"):
        kern.configs_timings = {}


def gated_row(dtype_name: str, d: int, f: int, m: int, x: torch.Tensor) -> dict:
    """The gated GEMM1 (erf GELU(x W^T + b) * (x U^T + c), two weights) autotuned, then
    timed against eager's two F.linear + GELU + product."""
    dt = DT[dtype_name]
    wg, wu = (torch.randn(f, d, device="cuda", dtype=dt) / d**0.5 for _ in range(2))
    bg, bu = (torch.randn(f, device="cuda", dtype=dt) * 0.1 for _ in range(2))
    gemm.gemm_bias_act(x, wg, bg, activation="erf", w_up=wu, b_up=bu)  # autotune
    print_timings("tma-gated", d, f, m)
    res = {
        "gelugemm_gated_gemm1": bench_ms(lambda: gemm.gemm_bias_act(x, wg, bg, activation="erf", w_up=wu, b_up=bu)),
        "eager_gated_gemm1": bench_ms(lambda: F.gelu(F.linear(x, wg, bg)) * F.linear(x, wu, bu)),
    }
    row = dict(dtype=dtype_name, d=d, f=f, M=m, **{k: round(v * 1e3, 1) for k, v in res.items()})
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wide", action="store_true")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--shapes", default="768x3072,4096x16384")
    ap.add_argument("--tokens", default="1,16,128,2048,8192")
    ap.add_argument("--json", default=None)
    ap.add_argument("--gated", action="store_true", help="also the gated GEMM1 (GeGLU) against eager, per config")
    args = ap.parse_args()
    if args.wide:
        widen()
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    rows = []
    for dtype_name in args.dtype.split(","):
        dt = DT[dtype_name]
        for shape in args.shapes.split(","):
            d, f = map(int, shape.split("x"))
            wbytes = 2 * d * f * 2
            nsets = max(1, min(8, (3 * l2) // wbytes + 1))

            def make():
                w1 = torch.randn(f, d, device="cuda", dtype=dt) / d**0.5
                w2 = torch.randn(d, f, device="cuda", dtype=dt) / f**0.5
                return w1, torch.randn(f, device="cuda", dtype=dt) * 0.1, w2, torch.randn(d, device="cuda", dtype=dt) * 0.1

            weights = rotating(make, nsets)
            op = FusedMLP(MLPConfig(dtype=dtype_name, backend="triton"), device="cuda")
            for m in map(int, args.tokens.split(",")):
                x = torch.randn(m, d, device="cuda", dtype=dt)
                h = torch.randn(m, f, device="cuda", dtype=dt)
                t0 = time.time()
                w1, b1, w2, b2 = weights()
                # autotune GEMM1 alone first, so that each GEMM's per-config times are printed
                gemm.gemm_bias_act(x, w1, b1, activation="erf")
                print_timings("tma-gemm1", d, f, m)
                op(x, w1, b1, w2, b2)  # autotune (GEMM2; GEMM1's choice is cached)
                print_timings("tma-gemm2", d, f, m)
                print_timings("decode", d, f, m, gemm._gemm_decode_kernel)
                tune_s = time.time() - t0
                impls = {
                    "gelugemm": lambda: op(x, *weights()),
                    "gelugemm_gemm1": lambda: gemm.gemm_bias_act(x, weights()[0], weights()[1], activation="erf"),
                    "gelugemm_gemm2": lambda: gemm.gemm_bias_act(h, weights()[2], weights()[3]),
                    "eager": lambda: (lambda w: F.linear(F.gelu(F.linear(x, w[0], w[1])), w[2], w[3]))(weights()),
                    "cublaslt_tanh": lambda: (lambda w: torch.addmm(w[3], torch._addmm_activation(w[1], x, w[0].t(), use_gelu=True), w[2].t()))(weights()),
                }
                res = {name: bench_ms(fn) * 1e3 for name, fn in impls.items()}
                flops = 4 * m * d * f
                row = dict(dtype=dtype_name, d=d, f=f, M=m, tune_s=round(tune_s, 1), **{k: round(v, 1) for k, v in res.items()},
                           tflops=round(flops / res["gelugemm"] / 1e6, 1))
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.gated:
                    rows.append(gated_row(dtype_name, d, f, m, x))
    from kernels.launch import launch_cache_size

    print("launch cache entries:", launch_cache_size())
    # which configs won
    winners = {}
    for kname, kern in (("tma", gemm._gemm_tma_kernel), ("strided", gemm._gemm_strided_kernel)):
        for key, chosen in kern.cache.items():
            winners[f"{kname} {key}"] = str(chosen)
        timings = getattr(kern, "configs_timings", None)
        if timings:
            print(kname, "last timings:", {str(c): t for c, t in timings.items()})
    for k, v in winners.items():
        print("BEST", k, v)
    if args.json:
        json.dump({"rows": rows, "winners": winners}, open(args.json, "w"), indent=1)
    print()
    print(f"{'dtype':5} {'d':>5} {'M':>5} {'ours':>8} {'g1':>8} {'g2':>8} {'eager':>8} {'cublt':>8} {'TF/s':>6}")
    for r in rows:
        if "gelugemm" in r:
            print(f"{r['dtype']:5} {r['d']:5} {r['M']:5} {r['gelugemm']:8.1f} {r['gelugemm_gemm1']:8.1f} {r['gelugemm_gemm2']:8.1f} {r['eager']:8.1f} {r['cublaslt_tanh']:8.1f} {r['tflops']:6.1f}")
    for r in rows:
        if "gelugemm_gated_gemm1" in r:
            print(f"{r['dtype']:5} {r['d']:5} {r['M']:5} gated GEMM1 {r['gelugemm_gated_gemm1']:8.1f} eager {r['eager_gated_gemm1']:8.1f} "
                  f"({r['eager_gated_gemm1'] / r['gelugemm_gated_gemm1']:.2f}x)")


if __name__ == "__main__":
    main()
