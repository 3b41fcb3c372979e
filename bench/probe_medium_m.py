"""Kernel-development probe for issue 16's medium rows (M = 128 to 1024): each GEMM of the
4096x16384 MLP timed alone, config by config, against cuBLAS in the same run.

GEMM2 at these M has few output tiles (N = 4096 is narrow, K = 16384 long): 32 tiles of
128x128 at M = 128 for 132 SMs. The TMA kernel's split-K (MAX_SPLIT_K in a config) cuts
K into shares to fill the SMs. This probe times every candidate tile config with and
without it, for fp16 (GEMM1 with erf, GEMM2 plain) and w8a8 (int8 x int8; GEMM1 with a
16-bit output as the dynamic scheme runs it), plus the float decode kernel at M = 128,
and prints the best per GEMM and M next to cuBLAS (F.linear; torch._int_mm for int8) and
fp16 eager's GEMM1 (linear + GELU). fp16 also runs the pointer-load (strided) kernel on the
same tiles, and kernels/gemm.py's warp-specialized candidates.

    PYTHONPATH=. python3 bench/probe_medium_m.py --json $OUT/probe-medium.json

CUDA-graph replays of one call (kernels.bench.graph_time with one input set): GPU time, no
host launch cost. At 4096x16384 the weights are 128 MB, larger than L2, so every call reads
them from memory; at 768x3072 (4.7 MB) they stay in L2 for every row, cuBLAS's included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import torch.nn.functional as F

from kernels import gemm, int8_gemm, launch
from kernels.bench import graph_time
from kernels.gemm_base import cfg
from kernels.int8 import quantize_weight
from kernels.w8a8 import w8a8_linear

FLOAT_TILES = [
    (64, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 64, 4, 5), (64, 256, 64, 8, 4), (128, 64, 64, 4, 4),
    (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3), (128, 256, 64, 8, 3),
]  # fmt: skip
FLOAT_DECODE = [(128, 64, 128, 4, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 3), (128, 128, 128, 8, 3), (128, 64, 256, 4, 3)]
INT8_TILES = [
    (64, 128, 128, 4, 4), (64, 64, 256, 4, 4), (128, 128, 128, 8, 4), (64, 256, 128, 8, 4), (128, 64, 128, 4, 4),
    (128, 256, 128, 8, 3), (64, 128, 256, 4, 3),
]  # fmt: skip


def config(tile, split: int):
    bm, bn, bk, warps, stages = tile
    extra = {"EPILOGUE_SUBTILE": True} if bn == 256 else {}
    if split > 1:
        extra["MAX_SPLIT_K"] = split
    return cfg(bm, bn, bk, warps, stages, **extra)


def tile_of(c) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of a config, as the tile lists write them."""
    return tuple(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + (c.num_warps, c.num_stages)


def force(launcher, kernel, table: dict, c) -> None:
    """Make `c` the one config the kernel runs for every M bucket."""
    if kernel is gemm._gemm_decode_kernel:
        # the decode kernel at up to 128 rows, as it ran before FLOAT_DECODE_MAX_M became 64
        table.setdefault(256, [])
        launcher.kernels = dataclasses.replace(launcher.kernels, decode_max_m=128)
    for key in table:
        table[key][:] = [c]
    kernel.configs = [c]
    kernel.cache.clear()
    launcher.plans.clear()
    launch._compiled.clear()


def timed(call, warmup_ms: float, rep_ms: float) -> float | None:
    try:
        call(0)
        if not torch.cuda.is_available():  # a CPU smoke run under TRITON_INTERPRET=1
            started = time.perf_counter()
            call(0)
            return (time.perf_counter() - started) * 1e6
        torch.cuda.synchronize()
        return graph_time(call, 1, warmup_ms, rep_ms).median_us
    except Exception as exc:  # noqa: BLE001 - a probe: report and go on
        print("FAIL", type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--f", type=int, default=16384)
    ap.add_argument("--tokens", default="128,256,512,1024")
    ap.add_argument("--warmup-ms", type=float, default=10)
    ap.add_argument("--rep-ms", type=float, default=60)
    ap.add_argument("--kinds", default="fp16,w8a8", help="which sweeps: fp16, w8a8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    d, f = args.d, args.f
    tokens = [int(t) for t in args.tokens.split(",")]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    # GEMM1: [M, d] x W1 [f, d] -> [M, f], GELU; GEMM2: [M, f] x W2 [d, f] -> [M, d]
    gemms = {"gemm1": (d, f, "erf"), "gemm2": (f, d, "none")}
    w = {g: torch.randn(n, k, device=dev, dtype=torch.float16) / k**0.5 for g, (k, n, _) in gemms.items()}
    b = {g: torch.randn(n, device=dev, dtype=torch.float16) for g, (k, n, _) in gemms.items()}
    qw = {g: quantize_weight(w[g]) for g in gemms}
    rows = []

    def record(kind, g, m, label, us):
        rows.append(dict(kind=kind, gemm=g, m=m, config=label, us=us))
        if us is not None:
            print(f"{kind:7s} {g} M={m:5d} {us:8.1f} us  {label}", flush=True)

    for m in tokens:
        for g, (k, n, act) in gemms.items():
            x = torch.randn(m, k, device=dev, dtype=torch.float16)
            record("cublas", g, m, "F.linear", timed(lambda i: F.linear(x, w[g], b[g]), args.warmup_ms, args.rep_ms))
            if act != "none":
                record("eager", g, m, "F.linear + F.gelu",
                       timed(lambda i: F.gelu(F.linear(x, w[g], b[g])), args.warmup_ms, args.rep_ms))  # fmt: skip
            xq = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
            if m > 16:
                record("int_mm", g, m, "torch._int_mm", timed(lambda i: torch._int_mm(xq, qw[g].data.t()), args.warmup_ms, args.rep_ms))

    kinds = args.kinds.split(",")

    def sweep_fp16(kernel, table, c, path: str, label: str, rows_up_to: int | None = None) -> None:
        """c forced on the fp16 kernel of `path`, each GEMM at each row count (up to rows_up_to)."""
        force(gemm._GEMM, kernel, table, c)
        for m in [t for t in tokens if rows_up_to is None or t <= rows_up_to]:
            for g, (k, n, act) in gemms.items():
                x = torch.randn(m, k, device=dev, dtype=torch.float16)
                out = torch.empty(m, n, device=dev, dtype=torch.float16)
                call = lambda i: gemm.gemm_bias_act(x, w[g], b[g], activation=act, path=path, out=out)  # noqa: E731
                record("fp16", g, m, label, timed(call, args.warmup_ms, args.rep_ms))

    fp16_tiles = FLOAT_TILES if "fp16" in kinds else []
    for tile, split in [(t, s) for t in fp16_tiles for s in (1, 8)]:
        sweep_fp16(gemm._gemm_tma_kernel, gemm.TMA_CONFIGS, config(tile, split), "tma", f"tma {tile} split<={split}")
    # Session 12's questions at 768x3072 (bench/RESULTS.md section 20), where the best TMA GEMM
    # trailed cuBLAS 1.27-1.44x from 512 rows: does the pointer-load kernel (no tensor
    # descriptors made on the device) do better at K = 768, and does the warp-specialized
    # tile loop (the next tile's loads under this tile's epilogue)?
    for tile in fp16_tiles:
        sweep_fp16(gemm._gemm_strided_kernel, gemm.STRIDED_CONFIGS, cfg(*tile), "strided", f"strided {tile}")
    # (Warp specialization happens only at 4 warps, and not with the subtiled epilogue:
    # kernels/gemm.py's candidates; bench/ws_survey.py.)
    for c in gemm.TMA_WS_CANDIDATES if fp16_tiles else []:
        sweep_fp16(gemm._gemm_tma_kernel, gemm.TMA_CONFIGS, c, "tma", f"tma {tile_of(c)} warp-specialized")
    for tile in FLOAT_DECODE if "fp16" in kinds else []:  # up to the decode configs' BLOCK_M
        sweep_fp16(gemm._gemm_decode_kernel, gemm.DECODE_CONFIGS, config(tile, 1), "decode", f"decode {tile}", 128)

    int8_configs = [(config(t, s), f"tma {t} split<={s}") for t in INT8_TILES for s in (1, 8)]
    for c, label in int8_configs if "w8a8" in kinds else []:
        force(int8_gemm._GEMM, int8_gemm._int8_weight_tma_kernel, int8_gemm.W8A8_TMA_CONFIGS, c)
        for m in tokens:
            for g, (k, n, act) in gemms.items():
                xq = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8)
                xs = torch.rand(m, device=dev, dtype=torch.float32) / 100 + 1e-3
                out = torch.empty(m, n, device=dev, dtype=torch.float16)
                call = lambda i: w8a8_linear(xq, xs, qw[g], b[g], activation=act, path="tma", out=out)  # noqa: E731
                record("w8a8", g, m, label, timed(call, args.warmup_ms, args.rep_ms))

    print("\nbest per GEMM and M (us; cuBLAS = F.linear fp16, int_mm = torch._int_mm):")
    print(f"{'M':>5} {'gemm':5} {'cuBLAS':>7} {'eager':>7} {'fp16 best':>9} {'no split':>8}  {'int_mm':>7} {'w8a8 best':>9} {'no split':>8}  configs")
    summary = []
    for m in tokens:
        for g in gemms:
            def pick(kind, pred=lambda r: True):
                got = [r for r in rows if r["kind"] == kind and r["gemm"] == g and r["m"] == m and r["us"] is not None and pred(r)]
                return min(got, key=lambda r: r["us"]) if got else None

            def us(r):
                return f"{r['us']:.1f}" if r else "-"

            fb, fn = pick("fp16"), pick("fp16", lambda r: "split<=8" not in r["config"])
            ib, inn = pick("w8a8"), pick("w8a8", lambda r: "split<=8" not in r["config"])
            cb, eg, im = pick("cublas"), pick("eager"), pick("int_mm")
            print(f"{m:5d} {g:5s} {us(cb):>7} {us(eg):>7} {us(fb):>9} {us(fn):>8}  {us(im):>7} {us(ib):>9} {us(inn):>8}  "
                  f"fp16: {fb and fb['config']} | w8a8: {ib and ib['config']}")  # fmt: skip
            summary.append(dict(m=m, gemm=g, cublas=cb, eager=eg, fp16_best=fb, fp16_no_split=fn, int_mm=im, w8a8_best=ib, w8a8_no_split=inn))
    if args.json:
        with open(args.json, "w") as fh:
            name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (interpreter smoke run)"
            json.dump(dict(device=name, torch=torch.__version__, rows=rows, summary=summary), fh, indent=1)


if __name__ == "__main__":
    main()
