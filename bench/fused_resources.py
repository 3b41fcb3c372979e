"""Registers, spills and shared memory of the one-launch MLP's compiled kernels
(kernels/fused_mlp.py), without a GPU: each config is compiled for sm_90 with the
specialization a call of the given shape gets on the GPU (16-byte divisibility of the
pointers and of the sizes and strides that are multiples of 16; arguments equal to 1 as
constants; M never specialized, as the kernel says), and cuobjdump reads the cubin.

    python3 bench/fused_resources.py [--shape 4096x16384] [--m 16] [--dtype fp16|w8a16|w8a8] [--candidates]
        [--activations dynamic|static|group:128]
    python3 bench/fused_resources.py --gemm
    python3 bench/fused_resources.py --epilogue


One row per config and GELU: REG (registers a thread), STACK (bytes of local memory a
thread: spills), shared memory. A config with STACK > 0 spills, and a GELU that changes REG
changes the schedule. --candidates compiles bench/probe_fused_configs.py's candidates
instead of the tables' configs. --gemm reads the float GEMM kernels instead (kernels/gemm.py:
every table config of the TMA, decode and strided kernels, fp16 with bias, as
bench/compile_check.py compiles them, without a call's specialization). --epilogue counts
the GELU's cost in the TMA GEMM's table configs: the SASS instructions each flavour adds
to the kernel with no activation, per output element a thread holds, at a 1024x3072x768
call's specialization (the epilogue is unrolled, so the static count is what a thread runs
per tile; a flattened loop's peeled copy of the epilogue counts twice). (Kernel-development
tool: the reading of a time; bench/RESULTS.md sections 19 and 21 have its tables.)
"""

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton

import bench.compile_check as cc
import bench.probe_fused_configs as candidates
from kernels import fused_mlp as fm

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resources(compiled) -> dict:
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    fields = dict(f.split(":", 1) for line in out.splitlines() if "REG:" in line for f in line.split() if ":" in f)
    return {"REG": int(fields["REG"]), "STACK": int(fields["STACK"]), "shared": compiled.metadata.shared}


def gemm_main() -> None:
    print(f"float GEMM kernels, fp16, triton {triton.__version__}, sm_90")
    seen = set()
    for kernel, types, cx, config, label, *_ in cc.float_cases():
        key = (id(kernel), cc.gemm_config_key(config))
        if label != "fp16 erf" or key in seen:
            continue
        seen.add(key)
        cells = []
        for gelu in ("erf", "tanh"):
            compiled, error = cc.compile_one(kernel, types, {**cx, "ACTIVATION": gelu}, config)
            if error:
                cells.append(f"{gelu} {error[:60]}")
                continue
            r = resources(compiled)
            cells.append(f"{gelu} REG {r['REG']:3d} STACK {r['STACK']:4d}")
        name = cc._innermost(kernel).__name__
        print(f"  {name:20s} {_gemm_label(config):55s} | " + " | ".join(cells), flush=True)


def sass_counts(compiled) -> dict:
    """{opcode: how many times it appears} in the cubin's SASS."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as fh:
        fh.write(compiled.asm["cubin"])
        fh.flush()
        out = subprocess.run([CUOBJDUMP, "-sass", fh.name], capture_output=True, text=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", out)
    return collections.Counter(ops)


def epilogue_main() -> None:
    print(f"TMA GEMM, fp16 with bias, 1024x3072x768, triton {triton.__version__}, sm_90: SASS instructions a GELU "
          "adds per output element a thread holds (MUFU of them)")  # fmt: skip
    ints = dict(M=1024, N=3072, K=768, stride_am=768, stride_b=768, stride_cm=3072)
    seen = set()
    for kernel, types, cx, config, label, *_ in cc.float_cases():
        key = cc.gemm_config_key(config)
        if label != "fp16 erf" or cc._innermost(kernel).__name__ != "gemm_tma_kernel" or key in seen:
            continue
        seen.add(key)
        counts = {}
        for gelu in ("none", "erf", "tanh", "quick"):
            compiled, error = cc.compile_one(kernel, types, {**cx, "ACTIVATION": gelu}, config, specialize=ints)
            if error:
                break
            counts[gelu] = sass_counts(compiled)
        else:
            kw = config.kwargs
            per_thread = kw["BLOCK_M"] * kw["BLOCK_N"] / (32 * config.num_warps)
            cells = [
                f"{g} {(sum(counts[g].values()) - sum(counts['none'].values())) / per_thread:5.1f} "
                f"({(counts[g]['MUFU'] - counts['none']['MUFU']) / per_thread:.1f})"
                for g in ("erf", "tanh", "quick")
            ]
            print(f"  {_gemm_label(config):62s} | " + " | ".join(cells), flush=True)
            continue
        print(f"  {_gemm_label(config):62s} | {error[:80]}", flush=True)


def _gemm_label(config) -> str:
    kw = config.kwargs
    tile = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    flags = [k.lower() for k in ("EPILOGUE_SUBTILE", "FLATTEN", "WARP_SPECIALIZE") if kw.get(k)]
    flags += [f"split<={kw['MAX_SPLIT_K']}"] if kw.get("MAX_SPLIT_K", 1) > 1 else []
    return f"{tile:12s} w{config.num_warps}s{config.num_stages} {' '.join(flags)}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="4096x16384")
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--dtype", default="w8a16")
    parser.add_argument("--candidates", action="store_true")
    parser.add_argument("--gemm", action="store_true", help="the float GEMM kernels' table configs instead")
    parser.add_argument("--epilogue", action="store_true", help="SASS instructions each GELU adds, TMA GEMM configs")
    parser.add_argument("--activations", default="dynamic", help="w8a8's scheme: dynamic, static or group:G")
    args = parser.parse_args()
    group = 0
    if args.gemm:
        gemm_main()
        return
    if args.epilogue:
        epilogue_main()
        return
    d, f = map(int, args.shape.split("x"))
    m = args.m
    cases = {label: (kernel, types, cx) for kernel, types, cx, _, label in cc.fused_cases()}
    ints = dict(M=m, D=d, F=f, M_BUCKET=fm.fused_bucket(m), NUM_PROGRAMS=132, stride_xm=d, stride_xk=1, stride_w1k=1,
                stride_w1n=d, stride_w2k=1, stride_w2n=f, stride_ym=d, stride_w1s=1, stride_w2s=1, stride_w1sg=0,
                stride_w2sg=0)  # fmt: skip
    if args.dtype == "w8a16":  # group:128 scales, [N, K / 128] row-major
        kernel, types, cx = cases["fused w8a16 fp16 group:128"]
        ints.update(stride_w1s=d // 128, stride_w2s=f // 128, stride_w1sg=1, stride_w2sg=1)
        table, large, pool = fm.FUSED_W8A16_CONFIGS, fm.FUSED_W8A16_LARGE_CONFIGS, candidates.W8A16_CANDIDATES
    elif args.dtype == "w8a8":
        if args.activations == "dynamic":
            kernel, types, cx = cases["fused w8a8 fp16 erf smooth"]
        elif args.activations == "static":
            kernel, types, cx = cases["fused w8a8 fp16 static smooth"]
        else:
            group = int(args.activations.partition(":")[2])
            kernel, types, cx = cases[f"fused w8a8 fp16 group:{group}"]
        cx = {**cx, "HAS_SMOOTH": False, "smooth_ptr": None}
        table, large, pool = fm.FUSED_W8A8_CONFIGS, fm.FUSED_W8A8_LARGE_CONFIGS, candidates.W8A8_CANDIDATES
    else:
        kernel, types, cx = cases["fused fp16 erf"]
        table, large, pool = fm.FUSED_CONFIGS, None, candidates.FLOAT_CANDIDATES
    configs = [fm.fit_group(c, group) for c in pool] if args.candidates else [fm._config_for(m, d, f, table, large, group)]
    scheme = f" {args.activations}" if args.dtype == "w8a8" else ""
    print(f"{args.dtype}{scheme} {d}x{f} M={m}, triton {triton.__version__}, sm_90")
    for config in configs:
        for gelu in ("erf", "tanh"):
            compiled, error = cc.compile_one(kernel, types, {**cx, "ACTIVATION": gelu}, config, specialize=ints)
            if error:
                print(f"  {candidates.label(config):<26s} {gelu:<4s} {error}", flush=True)
                continue
            r = resources(compiled)
            print(f"  {candidates.label(config):<26s} {gelu:<4s} REG {r['REG']:3d}  STACK {r['STACK']:4d}  "
                  f"shared {r['shared']}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
