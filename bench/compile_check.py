"""Compile every kernel variant for SM90 with the installed Triton; no GPU needed.

The GPU machines run Triton 3.6 while CI runs 3.9, and the CPU interpreter checks neither
compiler. Run this in an environment with the GPU's Triton to catch what it rejects:

    python -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 numpy
    PYTHONPATH=. /tmp/t36/bin/python bench/compile_check.py [float|int8]

Each kernel is compiled with every autotuning config for one representative dtype and
layout, and with one config for the other dtypes, layouts and activations. Exit 1 if any
compile fails.
"""

from __future__ import annotations

import itertools
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import gemm, w8a8, w8a16
from kernels.launch import _heuristic_layers, _innermost

TARGET = GPUTarget("cuda", 90, 32)
# Sizes the heuristics (split-K, EVEN_K) see: a 4096x16384 GEMM on 132 SMs.
SIZES = dict(M=2048, N=16384, K=4096, NUM_SMS=132)


def compile_one(kernel, types: dict, constexprs: dict, config: triton.Config) -> str | None:
    """Compile `kernel` with runtime argument types `types`; return the error, or None."""
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
        triton.compile(source, target=TARGET, options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    except Exception as exc:  # noqa: BLE001 - report every failure, then exit 1
        return " | ".join(str(exc).strip().splitlines()[-3:])[:300]
    return None


def _ints(*names):
    return {n: "i32" for n in names}


def float_cases():
    def types(dt, decode, strided):
        t = {"a_ptr": f"*{dt}", "b_ptr": f"*{dt}", "c_ptr": f"*{dt}", "bias_ptr": f"*{dt}"}
        if decode:
            t.update(partial_ptr="*fp32", arrivals_ptr="*i32")
        if strided:
            t.update(_ints("M", "N", "K", "M_BUCKET", "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm"))
        else:
            t.update(_ints("M", "N", "K", "M_BUCKET", "stride_am", "stride_b", "stride_cm"))
        return t

    for kernel, decode, strided in (
        (gemm._gemm_tma_kernel, False, False),
        (gemm._gemm_decode_kernel, True, False),
        (gemm._gemm_strided_kernel, False, True),
    ):
        base = dict(HAS_BIAS=True, ACTIVATION="erf", DOT_F32=False, INPUT_PRECISION="ieee")
        if not strided:
            base.update(B_IS_NK=True, NUM_SMS=132)
        for config in kernel.configs:
            yield kernel, types("fp16", decode, strided), base, config, "fp16 erf"
        for dt, act, b_is_nk in itertools.product(["bf16", "fp32"], ["tanh", "none"], [True, False]):
            cx = dict(base, ACTIVATION=act, **({} if strided else {"B_IS_NK": b_is_nk}))
            yield kernel, types(dt, decode, strided), cx, kernel.configs[-1], f"{dt} {act} b_is_nk={b_is_nk}"


def int8_cases():
    def types(a_dtype, out_dtype, decode, strided):
        t = {"a_ptr": f"*{a_dtype}", "b_ptr": "*i8", "c_ptr": f"*{out_dtype}", "bias_ptr": "*fp16",
             "w_scale_ptr": "*fp32", "a_scale_ptr": "*fp32", "c_scale_ptr": "*fp32"}  # fmt: skip
        if decode:
            t.update(partial_ptr="*fp32", arrivals_ptr="*i32")
        names = ["M", "N", "K", "M_BUCKET", "stride_am"]
        names += ["stride_ak", "stride_bk", "stride_bn"] if strided else ["stride_b"]
        t.update(_ints(*names, "stride_cm", "stride_wsn", "stride_wsg", "stride_as"))
        return t

    for kernel, decode, strided in (
        (w8a16._int8_weight_tma_kernel, False, False),
        (w8a16._int8_weight_decode_kernel, True, False),
        (w8a16._int8_weight_strided_kernel, False, True),
    ):
        # (activation dtype, output dtype, group size): w8a16 per channel and per group,
        # w8a8 GEMM1 (int8 out) and GEMM2 (fp16 out)
        for a_dtype, out_dtype, group in (("fp16", "fp16", 0), ("i8", "i8", 0), ("i8", "fp16", 0), ("bf16", "bf16", 128), ("fp16", "fp16", 32)):
            cx = dict(GROUP_K=group, HAS_BIAS=True, ACTIVATION="erf" if out_dtype == "i8" else "none", DOT_F32=False, INTERPRETER=False)
            if not strided:
                cx.update(B_IS_NK=True, NUM_SMS=132)
            configs = kernel.configs if (a_dtype, out_dtype) == ("i8", "i8") else kernel.configs[:2]
            for config in configs:
                yield kernel, types(a_dtype, out_dtype, decode, strided), cx, config, f"a={a_dtype} out={out_dtype} group={group}"
        if not strided:
            cx = dict(GROUP_K=0, HAS_BIAS=True, ACTIVATION="erf", DOT_F32=False, INTERPRETER=False, B_IS_NK=False, NUM_SMS=132)
            yield kernel, types("i8", "i8", decode, strided), cx, kernel.configs[0], "w8a8 in_out"
    quantize_types = {"x_ptr": "*fp16", "q_ptr": "*i8", "scale_ptr": "*fp32", "smooth_ptr": "*fp32",
                      **_ints("K", "stride_xm", "stride_xk", "stride_qm")}  # fmt: skip
    for dynamic, smooth in itertools.product([True, False], [True, False]):
        cx = dict(DYNAMIC=dynamic, HAS_SMOOTH=smooth, MIN_ABSMAX=1e-12, BLOCK_K=1024)
        yield w8a8._quantize_rows_kernel, quantize_types, cx, triton.Config({}, num_warps=4), f"dynamic={dynamic} smooth={smooth}"


def main() -> int:
    which = sys.argv[1:] or ["float", "int8"]
    cases = [c for name, gen in (("float", float_cases), ("int8", int8_cases)) if name in which for c in gen()]
    failures = []
    for kernel, types, constexprs, config, label in cases:
        t0 = time.time()
        error = compile_one(kernel, types, constexprs, config)
        name = _innermost(kernel).__name__
        print(f"{'FAIL' if error else 'ok  '} {time.time() - t0:5.1f}s {name} {label} {config}", flush=True)
        if error:
            failures.append(f"{name} {label} {config}: {error}")
    print(f"\ntriton {triton.__version__}: {len(cases)} compiled, {len(failures)} failed")
    print("\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
