"""Compile every kernel variant for SM90 with the installed Triton; no GPU needed.

The GPU machines run Triton 3.6 while CI runs 3.9, and the CPU interpreter checks neither
compiler. Run this in an environment with the GPU's Triton to catch what it rejects:

    python -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 numpy
    PYTHONPATH=. /tmp/t36/bin/python bench/compile_check.py [float|int8]

Each kernel is compiled with every autotuning config for one representative dtype and
layout, and with one config for the other dtypes, layouts and activations; the gated
GEMM1 (GATED: gate and up accumulators) with every config of its "-gated" tables for
fp16 and for each int8 scheme, and one config for the rest. Exit 1 if any compile fails.

    PYTHONPATH=. python bench/compile_check.py [float|int8|gated]
"""

from __future__ import annotations

import itertools
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.int8 import SCALE_EPS

from kernels import gemm, int8_gemm, w8a8
from kernels.launch import _heuristic_layers, _innermost

TARGET = GPUTarget("cuda", 90, 32)
# Sizes the heuristics (split-K, EVEN_K) see: a 4096x16384 GEMM on 132 SMs.
SIZES = dict(M=2048, N=16384, K=4096, NUM_SMS=132)


def compile_one(kernel, types: dict, constexprs: dict, config: triton.Config):
    """Compile `kernel` with runtime argument types `types` (a tensor the call does not
    have is a constexpr None); return (compiled kernel, None) or (None, the error)."""
    jit = _innermost(kernel)
    values = {**constexprs, **config.kwargs}
    for layer in _heuristic_layers(kernel):
        for name, rule in layer.values.items():
            values[name] = rule({**SIZES, **values})
    for param in jit.params:
        if param.name not in types and param.name not in values:
            values[param.name] = param.default
    signature = {n: "constexpr" if n in values else types[n] for n in jit.arg_names}
    source = ASTSource(fn=jit, signature=signature, constexprs={n: values[n] for n in jit.arg_names if n in values})
    try:
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        return triton.compile(source, target=TARGET, options=options), None
    except Exception as exc:  # noqa: BLE001 - report every failure, then exit 1
        return None, " | ".join(str(exc).strip().splitlines()[-3:])[:300]


def _ints(*names):
    return {n: "i32" for n in names}


def gemm_types(a: str, b: str, c: str, bias: str, *, strided: bool, decode: bool,
               w_scale: bool = False, a_scale: bool = False, c_scale: bool = False, gated: bool = False) -> tuple[dict, dict]:  # fmt: skip
    """(runtime argument types, the None tensors and GATED) of one of kernels/gemm_base.py's kernels."""
    t = {"a_ptr": f"*{a}", "b_ptr": f"*{b}", "c_ptr": f"*{c}", "bias_ptr": f"*{bias}"}
    absent = {"GATED": gated}
    for name, present in (("w_scale_ptr", w_scale), ("a_scale_ptr", a_scale), ("c_scale_ptr", c_scale),
                          ("u_scale_ptr", w_scale and gated)):  # fmt: skip
        if present:
            t[name] = "*fp32"
        else:
            absent[name] = None
    if gated:
        t.update(u_ptr=f"*{b}", u_bias_ptr=f"*{bias}")
    else:
        absent.update(u_ptr=None, u_bias_ptr=None)
    if decode:
        t.update(partial_ptr="*fp32", arrivals_ptr="*i32")
    names = ["M", "N", "K", "M_BUCKET", "stride_am"]
    names += ["stride_ak", "stride_bk", "stride_bn"] if strided else ["stride_b"]
    t.update(_ints(*names, "stride_cm", "stride_wsn", "stride_wsg", "stride_as"))
    return t, absent


def _paths(kernels):
    # (kernel, strided, decode)
    return ((kernels.tma, False, False), (kernels.decode, False, True), (kernels.strided, True, False))


def float_cases():
    for kernel, strided, decode in _paths(gemm._GEMM.kernels):
        base = dict(HAS_BIAS=True, ACTIVATION="erf", GROUP_K=0, DOT_F32=False, INPUT_PRECISION="ieee", INTERPRETER=False)
        if not strided:
            base.update(B_IS_NK=True, NUM_SMS=132)

        def types(dt):
            t, absent = gemm_types(dt, dt, dt, dt, strided=strided, decode=decode)
            return t, {**base, **absent}

        for config in kernel.configs:
            t, cx = types("fp16")
            yield kernel, t, cx, config, "fp16 erf"
        for dt, act, b_is_nk in itertools.product(["bf16", "fp32"], ["tanh", "none"], [True, False]):
            t, cx = types(dt)
            cx.update(ACTIVATION=act, **({} if strided else {"B_IS_NK": b_is_nk}))
            yield kernel, t, cx, kernel.configs[-1], f"{dt} {act} b_is_nk={b_is_nk}"


def int8_cases():
    for kernel, strided, decode in _paths(int8_gemm._GEMM.kernels):
        # (activation dtype, output dtype, group size): w8a16 per channel and per group,
        # w8a8 GEMM1 (int8 out) and GEMM2 (fp16 out)
        for a_dtype, out_dtype, group in (("fp16", "fp16", 0), ("i8", "i8", 0), ("i8", "fp16", 0), ("bf16", "bf16", 128), ("fp16", "fp16", 32)):
            t, absent = gemm_types(a_dtype, "i8", out_dtype, "fp16", strided=strided, decode=decode,
                                   w_scale=True, a_scale=a_dtype == "i8", c_scale=out_dtype == "i8")  # fmt: skip
            cx = dict(HAS_BIAS=True, ACTIVATION="erf" if out_dtype == "i8" else "none", GROUP_K=group, DOT_F32=False,
                      INPUT_PRECISION="ieee", INTERPRETER=False, **absent)  # fmt: skip
            if not strided:
                cx.update(B_IS_NK=True, NUM_SMS=132)
            configs = kernel.configs if (a_dtype, out_dtype) == ("i8", "i8") else kernel.configs[:2]
            for config in configs:
                yield kernel, t, cx, config, f"a={a_dtype} out={out_dtype} group={group}"
        if not strided:
            t, absent = gemm_types("i8", "i8", "i8", "fp16", strided=False, decode=decode, w_scale=True, a_scale=True, c_scale=True)
            cx = dict(HAS_BIAS=True, ACTIVATION="erf", GROUP_K=0, DOT_F32=False, INPUT_PRECISION="ieee",
                      INTERPRETER=False, B_IS_NK=False, NUM_SMS=132, **absent)  # fmt: skip
            yield kernel, t, cx, kernel.configs[0], "w8a8 in_out"
    quantize_types = {"x_ptr": "*fp16", "q_ptr": "*i8", "scale_ptr": "*fp32", "smooth_ptr": "*fp32",
                      **_ints("K", "stride_xm", "stride_xk", "stride_qm")}  # fmt: skip
    for dynamic, smooth in itertools.product([True, False], [True, False]):
        cx = dict(DYNAMIC=dynamic, HAS_SMOOTH=smooth, SCALE_EPS=SCALE_EPS, BLOCK_K=1024)
        yield w8a8._quantize_rows_kernel, quantize_types, cx, triton.Config({}, num_warps=4), f"dynamic={dynamic} smooth={smooth}"


def gated_cases():
    """The gated GEMM1: every config of the "-gated" tables for fp16 and for each int8 scheme
    (per channel, w8a8 requantizing the product to int8), one config for the rest."""
    for kernel, strided, decode in _paths(gemm._GEMM.kernels):
        base = dict(HAS_BIAS=True, ACTIVATION="tanh", GROUP_K=0, DOT_F32=False, INPUT_PRECISION="ieee", INTERPRETER=False)
        if not strided:
            base.update(B_IS_NK=True, NUM_SMS=132)
        configs = _gated_configs(kernel, "float-gated")
        for dt, layouts, chosen in (("fp16", [True], configs), ("bf16", [True, False], configs[-1:]), ("fp32", [True], configs[-1:])):
            for b_is_nk in layouts:
                t, absent = gemm_types(dt, dt, dt, dt, strided=strided, decode=decode, gated=True)
                cx = {**base, **absent, **({} if strided else {"B_IS_NK": b_is_nk})}
                for config in chosen:
                    yield kernel, t, cx, config, f"gated {dt} b_is_nk={b_is_nk}"
    for kernel, strided, decode in _paths(int8_gemm._GEMM.kernels):
        # (activation dtype, output dtype, group size, table)
        for a_dtype, out_dtype, group, table in (("fp16", "fp16", 0, "w8a16-gated"), ("bf16", "bf16", 128, "w8a16-gated"),
                                                 ("i8", "i8", 0, "w8a8-gated"), ("i8", "fp16", 0, "w8a8-gated")):  # fmt: skip
            t, absent = gemm_types(a_dtype, "i8", out_dtype, "fp16", strided=strided, decode=decode, w_scale=True,
                                   a_scale=a_dtype == "i8", c_scale=out_dtype == "i8", gated=True)  # fmt: skip
            cx = dict(HAS_BIAS=True, ACTIVATION="tanh", GROUP_K=group, DOT_F32=False, INPUT_PRECISION="ieee",
                      INTERPRETER=False, **absent)  # fmt: skip
            if not strided:
                cx.update(B_IS_NK=True, NUM_SMS=132)
            configs = _gated_configs(kernel, table)
            for config in configs if (a_dtype, out_dtype, group) in (("fp16", "fp16", 0), ("i8", "i8", 0)) else configs[:1]:
                yield kernel, t, cx, config, f"gated a={a_dtype} out={out_dtype} group={group}"


def _gated_configs(kernel, table: str) -> list:
    """The configs a gated call prunes to, over every M bucket of the table."""
    tables = {"float-gated": (gemm.GATED_STRIDED_CONFIGS, gemm.GATED_TMA_CONFIGS, gemm.GATED_DECODE_CONFIGS),
              "w8a16-gated": (int8_gemm.W8A16_GATED_STRIDED_CONFIGS, int8_gemm.W8A16_GATED_TMA_CONFIGS,
                              int8_gemm.W8A16_GATED_DECODE_CONFIGS),
              "w8a8-gated": (int8_gemm.W8A8_GATED_STRIDED_CONFIGS, int8_gemm.W8A8_GATED_TMA_CONFIGS,
                             int8_gemm.W8A8_GATED_DECODE_CONFIGS)}[table]  # fmt: skip
    body = _innermost(kernel).__name__
    chosen = tables[0] if "strided" in body else tables[1] if "tma" in body else tables[2]
    return [c for configs in chosen.values() for c in configs]


def main() -> int:
    which = sys.argv[1:] or ["float", "int8", "gated"]
    generators = (("float", float_cases), ("int8", int8_cases), ("gated", gated_cases))
    cases = [c for name, gen in generators if name in which for c in gen()]
    failures = []
    for kernel, types, constexprs, config, label in cases:
        t0 = time.time()
        _, error = compile_one(kernel, types, constexprs, config)
        name = _innermost(kernel).__name__
        print(f"{'FAIL' if error else 'ok  '} {time.time() - t0:5.1f}s {name} {label} {config}", flush=True)
        if error:
            failures.append(f"{name} {label} {config}: {error}")
    print(f"\ntriton {triton.__version__}: {len(cases)} compiled, {len(failures)} failed")
    print("\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
