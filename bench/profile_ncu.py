"""Kernel-development probe: hardware counters of gelugemm's GEMMs next to cuBLAS's (Nsight Compute).

Issue 16 asks what the profile shows where a target is missed. This program runs, once each
inside a profiler range, gelugemm's whole MLP (one launch or two, as the op picks), its GEMM1 (erf and tanh GELU), its GEMM2, eager's GEMM1
(F.linear, which is cuBLAS with the bias in the epilogue, then F.gelu) and GEMM2, and
cuBLASLt's GEMM with its bias+GELU (tanh) epilogue; everything is autotuned and warmed
before the range, so ncu sees one launch per case. `bench/gpu_check.sh ncu` runs it under

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... --export R
    ncu --import R.ncu-rep --csv --page raw > R.csv

and then `python3 bench/profile_ncu.py --parse R.csv`, which prints one row per kernel:
duration, SM and DRAM throughput, tensor-pipe activity, issue activity, registers, and the
largest warp stall reasons (cycles per issued instruction).

    PYTHONPATH=. python3 bench/profile_ncu.py --dtype fp16 --shapes 4096x16384 --tokens 2048
"""

from __future__ import annotations

import argparse
import csv
import re
import sys

DT_NAMES = ("fp16", "bf16")


def run_cases(dtype_name: str, shapes: list[tuple[int, int]], tokens: list[int]) -> None:
    import torch
    import torch.nn.functional as F

    from kernels import gemm
    from kernels.op import FusedMLP, MLPConfig

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    cases = []
    op = FusedMLP(MLPConfig(dtype=dtype_name, backend="triton"), device="cuda")
    for d, f in shapes:
        w1 = torch.randn(f, d, device="cuda", dtype=dt) / d**0.5
        w2 = torch.randn(d, f, device="cuda", dtype=dt) / f**0.5
        b1 = torch.randn(f, device="cuda", dtype=dt) * 0.1
        b2 = torch.randn(d, device="cuda", dtype=dt) * 0.1
        for m in tokens:
            x = torch.randn(m, d, device="cuda", dtype=dt)
            h = torch.randn(m, f, device="cuda", dtype=dt)
            tag = f"{dtype_name} {d}x{f} M={m}"
            cases += [
                (f"{tag} ours mlp", lambda x=x, w1=w1, b1=b1, w2=w2, b2=b2: op(x, w1, b1, w2, b2)),
                (f"{tag} ours gemm1 erf", lambda x=x, w=w1, b=b1: gemm.gemm_bias_act(x, w, b, activation="erf")),
                (f"{tag} ours gemm1 tanh", lambda x=x, w=w1, b=b1: gemm.gemm_bias_act(x, w, b, activation="tanh")),
                (f"{tag} ours gemm2", lambda h=h, w=w2, b=b2: gemm.gemm_bias_act(h, w, b)),
                (f"{tag} eager gemm1 (+gelu)", lambda x=x, w=w1, b=b1: F.gelu(F.linear(x, w, b))),
                (f"{tag} eager gemm2", lambda h=h, w=w2, b=b2: F.linear(h, w, b)),
                (f"{tag} cublaslt gemm1 tanh",
                 lambda x=x, w=w1, b=b1: torch._addmm_activation(b, x, w.t(), use_gelu=True)),
            ]  # fmt: skip
    for _, fn in cases:  # autotune and compile outside the profiled range
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    # the config each autotuned GEMM kept (its key: M bucket, N, K, ...; the profile's
    # kernel names do not say which tile ran)
    for name, kern in (("tma", gemm._gemm_tma_kernel), ("decode", gemm._gemm_decode_kernel)):
        for key, chosen in kern.cache.items():
            print("BEST", name, key[:4], str(chosen).replace(", num_ctas: 1", "").replace(", maxnreg: None", ""))
    torch.cuda.profiler.start()
    for label, fn in cases:
        print("CASE", label, flush=True)
        fn()
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()


# raw-page metric names (as ncu 2025.3 names them on sm_90) -> column titles; a metric the
# report lacks prints as "-"
COLUMNS = [
    ("gpu__time_duration.sum", "us"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "SM%"),
    ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "DRAM%"),
    ("sm__instruction_throughput.avg.pct_of_peak_sustained_elapsed", "inst%"),
    ("sm__issue_active.avg.pct_of_peak_sustained_elapsed", "issue%"),
    ("launch__registers_per_thread", "regs"),
    ("launch__grid_size", "grid"),
    ("launch__block_size", "block"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occ%"),
]
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
TENSOR = re.compile(r"^sm__pipe_tensor_op_\w*cycles_active\.avg\.pct_of_peak_sustained_active$")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def parse(path: str, top: int = 4) -> None:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    # ncu's raw CSV: a header row of metric names, a row of units, then one row per kernel
    start = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    header, units, kernels = rows[start], rows[start + 1], rows[start + 2 :]
    col = {name: i for i, name in enumerate(header)}
    tensor_cols = [n for n in header if TENSOR.match(n)]
    stall_cols = [(STALL.match(n).group(1), col[n]) for n in header if STALL.match(n)]
    titles = [t for _, t in COLUMNS] + [re.sub(r"^sm__pipe_tensor_op_|_cycles_active.*$", "", n) + "%" for n in tensor_cols]
    print(f"{'#':>3} {'kernel':42} " + " ".join(f"{t:>8}" for t in titles) + "  stalls (cycles/issue)")
    for i, r in enumerate(kernels):
        if len(r) < len(header):
            continue
        values = []
        for name in [n for n, _ in COLUMNS] + tensor_cols:
            j = col.get(name)
            v = _number(r[j]) if j is not None else None
            if name == "gpu__time_duration.sum" and v is not None and j is not None:
                unit = units[j]
                v = v / 1e3 if unit == "nsecond" else v * 1e3 if unit == "msecond" else v
            values.append("-" if v is None else f"{v:8.1f}")
        stalls = sorted(((_number(r[j]) or 0.0, s) for s, j in stall_cols), reverse=True)[:top]
        name = r[col["Kernel Name"]][:42]
        print(f"{i:3} {name:42} " + " ".join(f"{v:>8}" for v in values) + "  "
              + ", ".join(f"{s} {v:.1f}" for v, s in stalls))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="fp16", choices=DT_NAMES)
    ap.add_argument("--shapes", default="4096x16384")
    ap.add_argument("--tokens", default="2048")
    ap.add_argument("--parse", metavar="CSV", help="print the table of an exported raw-page CSV and exit")
    args = ap.parse_args()
    if args.parse:
        parse(args.parse)
        return
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    run_cases(args.dtype, shapes, [int(t) for t in args.tokens.split(",")])


if __name__ == "__main__":
    sys.exit(main())
