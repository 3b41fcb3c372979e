"""Which of the TMA GEMM's variants Triton's Hopper warp specialization takes, without a GPU.

`tl.range(..., warp_specialize=True)` (the kernel's WARP_SPECIALIZE) asks for a producer
warp group that issues the TMA loads and consumer warp groups that run the MMAs and the
epilogue. On sm_90 Triton's pass (`NVGPUWarpSpecialization`) splits the tile between two
consumer groups only when the config has 4 warps: each group then has 4 warps, 12 in all.
With 8 warps the pass leaves the loop as it is, and the flag changes nothing but an
attribute (`--same`: the TTGIR with and without it, diffed). Some variants crash the
compiler process outright (an MLIR assertion), so every compile runs in a process of its own.

    PYTHONPATH=. python bench/ws_survey.py [--tiles 128x128x64x4x4,128x256x64x4x3] [--same]

One row per variant (the labels of bench/compile_check.py's one-config cases) and tile:
whether the compiled kernel is warp-specialized, its warps, registers, spills and shared
memory, or why it did not compile. (Kernel-development tool: bench/RESULTS.md section 21.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# The variants of the TMA kernel the survey compiles, as bench/compile_check.py labels them.
LABELS = [
    "fp16 erf", "bf16 tanh b_is_nk=True", "fp32 tanh b_is_nk=True", "w8a16 per channel", "w8a16 group:128",
    "w8a8 static GEMM1", "w8a8 GEMM2 / dynamic GEMM1 (16-bit h)", "w8a8 group:128 GEMM1", "w8a8 group:128 GEMM2",
    "gated fp16", "gated w8a16 per channel", "gated w8a8 static GEMM1",
]  # fmt: skip
# A large-M GEMM: every config's tile loop has many tiles and K steps.
SIZES = dict(M=8192, N=16384, K=4096, NUM_SMS=132)
SPECIALIZE = dict(M=8192, N=16384, K=4096, stride_am=4096, stride_b=4096, stride_cm=16384)


def _case(label: str):
    import bench.compile_check as cc
    from kernels import gemm, int8_gemm

    tma = {gemm._GEMM.kernels.tma, int8_gemm._GEMM.kernels.tma}
    for gen in (cc.float_cases, cc.int8_cases, cc.gated_cases):
        for kernel, types, cx, config, case_label in gen():
            if kernel in tma and case_label == label:
                return kernel, types, cx, config
    raise SystemExit(f"no TMA case labelled {label!r}")


def _config(tile: str, base, cx, ws: bool):
    from kernels.gemm_base import cfg, fit_groups

    bm, bn, bk, warps, stages = map(int, tile.split("x"))
    keep = {k: v for k, v in base.kwargs.items() if k == "SWAP_AB"}  # w8a16's schedule
    config = cfg(bm, bn, bk, warps, stages, **keep, **({"WARP_SPECIALIZE": True} if ws else {}))
    return fit_groups(config, cx.get("A_GROUP_K", 0), cx.get("C_GROUP_N", 0))


def _strip(ttgir: str) -> list[str]:
    # the TTGIR without source locations and the loop attribute the flag adds
    import re

    lines = [re.sub(r"\s*loc\([^)]*\)", "", line) for line in ttgir.splitlines() if not line.startswith("#loc")]
    return [line.replace(" {tt.warp_specialize}", "") for line in lines]


def compile_case(label: str, tile: str, same: bool) -> dict:
    """One compile (in this process): the row's fields."""
    import bench.compile_check as cc
    import bench.fused_resources as fr

    kernel, types, cx, base = _case(label)
    compiled, error = cc.compile_one(kernel, types, cx, _config(tile, base, cx, True), sizes=SIZES,
                                     specialize=SPECIALIZE)  # fmt: skip
    if error:
        return dict(error=error)
    ttgir = compiled.asm["ttgir"]
    row = dict(ws="ttg.warp_specialize" in ttgir, warps=compiled.metadata.num_warps, **fr.resources(compiled))
    if same:
        plain, error = cc.compile_one(kernel, types, cx, _config(tile, base, cx, False), sizes=SIZES,
                                      specialize=SPECIALIZE)  # fmt: skip
        row["same_without_flag"] = None if error else _strip(plain.asm["ttgir"]) == _strip(ttgir)
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiles", default="128x128x64x4x4,128x256x64x4x3,128x128x64x8x4,128x256x64x8x3")
    parser.add_argument("--labels", default=",".join(LABELS))
    parser.add_argument("--same", action="store_true", help="also diff the TTGIR against the config without the flag")
    parser.add_argument("--one", nargs=2, metavar=("LABEL", "TILE"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(compile_case(*args.one, args.same)))
        return 0
    import triton

    print(f"TMA GEMM with WARP_SPECIALIZE, {SIZES['M']}x{SIZES['N']}x{SIZES['K']}, triton {triton.__version__}, sm_90")
    for label in args.labels.split(","):
        for tile in args.tiles.split(","):
            cmd = [sys.executable, __file__, "--one", label, tile] + (["--same"] if args.same else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            try:
                row = json.loads(lines[-1])
            except (IndexError, json.JSONDecodeError):
                last = [ln for ln in done.stderr.splitlines() if ln.strip()][-1:] or [f"exit {done.returncode}"]
                row = dict(error=f"the compiler process died: {last[0][:100]}")
            if "error" in row:
                cells = row["error"][:110]
            else:
                cells = (f"ws {'yes' if row['ws'] else 'no '}  warps {row['warps']:2d}  REG {row['REG']:3d}  "
                         f"STACK {row['STACK']:5d}  shared {row['shared']}")  # fmt: skip
                if "same_without_flag" in row:
                    cells += f"  same TTGIR without the flag: {row['same_without_flag']}"
            print(f"  {label:40s} {tile:16s} {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
