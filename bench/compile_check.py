"""Compile every kernel variant for SM90 with the installed Triton; no GPU needed.

The GPU machines run Triton 3.6 while CI runs 3.9, and the CPU interpreter checks neither
compiler. Run this in an environment with the GPU's Triton to catch what it rejects:

    python -m venv /tmp/t36 && /tmp/t36/bin/pip install torch==2.13.0 triton==3.6.0 numpy
    PYTHONPATH=. /tmp/t36/bin/python bench/compile_check.py [float|int8]

Each kernel is compiled with every autotuning config for one representative dtype and
layout, and with one config for the other dtypes, layouts and activations (the float TMA
kernel also with its warp-specialized candidates); the int8
kernels with every config of each scheme's table (w8a16 per channel and group:128 with
the swap-AB schedule, w8a8 static, w8a8 group:128 in and out) and with one config for the
rest (bf16, in_out, dynamic's 16-bit GEMM1 output, group:32 and group:64); the activation
quantizer per token, static and per group. Exit 1 if any compile fails.
The gated GEMM1 (GATED: gate and up accumulators) with every config of its "-gated"
tables for fp16 and for each int8 scheme, and one config for the rest.

    PYTHONPATH=. python bench/compile_check.py [float|int8|gated|split|host|fused]

`split`: the TMA kernel's split-K tile loop, one config per variant above. `host`: the TMA
kernel with descriptors made on the host, every TMA case above but fp32's. `fused`: the
one-launch MLP (kernels/fused_mlp.py).
"""

from __future__ import annotations

import itertools
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.int8 import SCALE_EPS

from kernels import dequant, fused_mlp, gemm, int8_gemm, w8a8
from kernels.gemm_base import fit_groups
from kernels.launch import _heuristic_layers, _innermost

TARGET = GPUTarget("cuda", 90, 32)
# Sizes the heuristics (split-K, EVEN_K) see: a 4096x16384 GEMM on 132 SMs.
SIZES = dict(M=2048, N=16384, K=4096, NUM_SMS=132)
# GEMM2 at 128 rows: fewer output tiles than SMs, so a TMA config with MAX_SPLIT_K splits K
SPLIT_SIZES = dict(M=128, N=4096, K=16384, NUM_SMS=132)


SHARED_MEMORY_LIMIT = 232448  # bytes a program may take on sm_90 (227 KiB)


def compile_one(kernel, types: dict, constexprs: dict, config: triton.Config, sizes: dict = SIZES,
                specialize: dict | None = None):  # fmt: skip
    """Compile `kernel` with runtime argument types `types` (a tensor the call does not
    have is a constexpr None), its heuristics evaluated at `sizes`; return (compiled
    kernel, None) or (None, the error). specialize: integer arguments' values, to compile
    as a call with them is specialized on the GPU (a value of 1 a constant, multiples of 16
    and every pointer 16-byte divisible; not the kernel's do_not_specialize arguments).
    Without it nothing is assumed of them."""
    jit = _innermost(kernel)
    values = {**constexprs, **config.kwargs}
    ints = specialize or {}
    values.update({n: 1 for n, v in ints.items() if v == 1 and n not in jit.do_not_specialize})
    for layer in _heuristic_layers(kernel):
        for name, rule in layer.values.items():
            values[name] = rule({**sizes, **values})
    for param in jit.params:
        if param.name not in types and param.name not in values:
            values[param.name] = param.default
    signature = {n: "constexpr" if n in values else types[n] for n in jit.arg_names}
    aligned = [
        i for i, n in enumerate(jit.arg_names)
        if specialize is not None and n not in values and n not in jit.do_not_specialize
        and (signature[n].startswith("*") or ints.get(n, 1) % 16 == 0)
    ]  # fmt: skip
    source = ASTSource(
        fn=jit, signature=signature, constexprs={n: values[n] for n in jit.arg_names if n in values},
        attrs={(i,): [["tt.divisibility", 16]] for i in aligned},
    )  # fmt: skip
    try:
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
        if config.maxnreg:  # as the autotuner compiles a config that sets it
            options["maxnreg"] = config.maxnreg
        compiled = triton.compile(source, target=TARGET, options=options)
    except Exception as exc:  # noqa: BLE001 - report every failure, then exit 1
        return None, " | ".join(str(exc).strip().splitlines()[-3:])[:300]
    # what loading it on the GPU would refuse (Triton checks only there): more shared memory
    # than an H100/H200 gives one program
    shared = getattr(compiled.metadata, "shared", 0)
    if shared > SHARED_MEMORY_LIMIT:
        return None, f"needs {shared} bytes of shared memory, more than {SHARED_MEMORY_LIMIT}"
    return compiled, None


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
    if not strided:  # the split-K workspace
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
        base = dict(HAS_BIAS=True, ACTIVATION="erf", GROUP_K=0, A_GROUP_K=0, C_GROUP_N=0, DOT_F32=False,
                    INPUT_PRECISION="ieee", INTERPRETER=False)  # fmt: skip
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
        if kernel is gemm._GEMM.kernels.tma:
            # the warp-specialized candidates (kernels/gemm.py; one is in the large table too):
            # fp16 in both layouts, bf16
            for config, (dt, act, b_is_nk) in itertools.product(
                gemm.TMA_WS_CANDIDATES, [("fp16", "erf", True), ("fp16", "erf", False), ("bf16", "tanh", True)]
            ):
                t, cx = types(dt)
                cx.update(ACTIVATION=act, B_IS_NK=b_is_nk)
                yield kernel, t, cx, config, f"{dt} {act} b_is_nk={b_is_nk} warp-specialized candidate"


def _table_configs(table: dict) -> list:
    return list({gemm_config_key(c): c for cfgs in table.values() for c in cfgs}.values())


def gemm_config_key(c: triton.Config) -> tuple:
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def _smallest(configs: list) -> triton.Config:
    """The config with the least pipelined operand area: where a variant compiles one config,
    the one whose shared memory fits its dtype (a 4-byte fp32 tile takes twice fp16's; the
    autotuner drops a config that does not fit, so the variant still runs)."""
    return min(configs, key=lambda c: (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * c.num_stages)


# Each int8 kernel's tables, by scheme (kernels/int8_gemm.py).
INT8_TABLES = {
    "tma": {"w8a16": int8_gemm.W8A16_TMA_CONFIGS, "w8a8": int8_gemm.W8A8_TMA_CONFIGS,
            "w8a8-group": int8_gemm.W8A8_GROUP_TMA_CONFIGS},
    "decode": {"w8a16": int8_gemm.W8A16_DECODE_CONFIGS, "w8a8": int8_gemm.W8A8_DECODE_CONFIGS,
               "w8a8-group": int8_gemm.W8A8_GROUP_DECODE_CONFIGS},
    "strided": {"w8a16": int8_gemm.W8A16_STRIDED_CONFIGS, "w8a8": int8_gemm.W8A8_STRIDED_CONFIGS,
                "w8a8-group": int8_gemm.W8A8_GROUP_STRIDED_CONFIGS},
}  # fmt: skip

# (a dtype, out dtype, weight group, a group, out group, table, all configs or the first,
# what it is); the activation is GELU where the output is GEMM1's (int8, or dynamic's 16-bit h).
INT8_VARIANTS = [
    ("fp16", "fp16", 0, 0, 0, "w8a16", True, "w8a16 per channel"),
    ("fp16", "fp16", 128, 0, 0, "w8a16", True, "w8a16 group:128"),
    ("bf16", "bf16", 128, 0, 0, "w8a16", False, "w8a16 bf16 group:128"),
    ("fp16", "fp16", 32, 0, 0, "w8a16", False, "w8a16 group:32"),
    ("i8", "i8", 0, 0, 0, "w8a8", True, "w8a8 static GEMM1"),
    ("i8", "fp16", 0, 0, 0, "w8a8", False, "w8a8 GEMM2 / dynamic GEMM1 (16-bit h)"),
    ("i8", "i8", 0, 128, 128, "w8a8-group", True, "w8a8 group:128 GEMM1"),
    ("i8", "fp16", 0, 128, 0, "w8a8-group", True, "w8a8 group:128 GEMM2"),
    ("i8", "i8", 0, 64, 64, "w8a8-group", False, "w8a8 group:64 GEMM1"),
    ("i8", "i8", 0, 32, 32, "w8a8-group", False, "w8a8 group:32 GEMM1"),
]


def int8_cases():
    kernels = int8_gemm._GEMM.kernels
    for path, (kernel, strided, decode) in zip(("tma", "decode", "strided"), _paths(kernels)):
        for a_dtype, out_dtype, group, a_group, c_group, scheme, every, label in INT8_VARIANTS:
            t, absent = gemm_types(a_dtype, "i8", out_dtype, "fp16", strided=strided, decode=decode,
                                   w_scale=True, a_scale=a_dtype == "i8", c_scale=out_dtype == "i8")  # fmt: skip
            gemm1 = out_dtype == "i8" or "dynamic" in label
            cx = dict(HAS_BIAS=True, ACTIVATION="erf" if gemm1 else "none", GROUP_K=group, A_GROUP_K=a_group,
                      C_GROUP_N=c_group, DOT_F32=False, INPUT_PRECISION="ieee", INTERPRETER=False, **absent)  # fmt: skip
            if not strided:
                cx.update(B_IS_NK=True, NUM_SMS=132)
            configs = _table_configs(INT8_TABLES[path][scheme])
            configs = configs if every else [_smallest(configs)]
            for config in {gemm_config_key(c): c for c in (fit_groups(c, a_group, c_group) for c in configs)}.values():
                yield kernel, t, cx, config, label
            if not strided and scheme in ("w8a16", "w8a8-group") and every and group in (0, 128) and a_dtype != "bf16":
                # the weight stored [K, N] (Conv1D): one config
                yield kernel, t, {**cx, "B_IS_NK": False}, fit_groups(configs[0], a_group, c_group), f"{label} in_out"
        if not strided:
            t, absent = gemm_types("i8", "i8", "i8", "fp16", strided=False, decode=decode, w_scale=True, a_scale=True, c_scale=True)
            cx = dict(HAS_BIAS=True, ACTIVATION="erf", GROUP_K=0, A_GROUP_K=0, C_GROUP_N=0, DOT_F32=False,
                      INPUT_PRECISION="ieee", INTERPRETER=False, B_IS_NK=False, NUM_SMS=132, **absent)  # fmt: skip
            yield kernel, t, cx, _table_configs(INT8_TABLES[path]["w8a8"])[0], "w8a8 in_out"
    quantize_types = {"x_ptr": "*fp16", "q_ptr": "*i8", "scale_ptr": "*fp32", "smooth_ptr": "*fp32",
                      **_ints("K", "stride_xm", "stride_xk", "stride_qm", "stride_sm")}  # fmt: skip
    for dynamic, group, smooth in [(d, 0, s) for d, s in itertools.product([True, False], [True, False])] + [
        (True, g, s) for g, s in ((32, False), (64, False), (128, False), (128, True))
    ]:
        cx = dict(DYNAMIC=dynamic, GROUP=group, HAS_SMOOTH=smooth, SCALE_EPS=SCALE_EPS, BLOCK_K=1024)
        label = f"dynamic={dynamic} group={group} smooth={smooth}"
        yield w8a8._quantize_rows_kernel, quantize_types, cx, triton.Config({}, num_warps=4), label


GATED_TABLES = {
    "float": {"tma": gemm.GATED_TMA_CONFIGS, "decode": gemm.GATED_DECODE_CONFIGS, "strided": gemm.GATED_STRIDED_CONFIGS},
    "w8a16": {"tma": int8_gemm.W8A16_GATED_TMA_CONFIGS, "decode": int8_gemm.W8A16_GATED_DECODE_CONFIGS,
              "strided": int8_gemm.W8A16_GATED_STRIDED_CONFIGS},
    "w8a8": {"tma": int8_gemm.W8A8_GATED_TMA_CONFIGS, "decode": int8_gemm.W8A8_GATED_DECODE_CONFIGS,
             "strided": int8_gemm.W8A8_GATED_STRIDED_CONFIGS},
    "w8a8-group": {"tma": int8_gemm.W8A8_GROUP_GATED_TMA_CONFIGS, "decode": int8_gemm.W8A8_GROUP_GATED_DECODE_CONFIGS,
                   "strided": int8_gemm.W8A8_GROUP_GATED_STRIDED_CONFIGS},
}  # fmt: skip

# The gated GEMM1: (a dtype, weight dtype, out dtype, weight group, a group, out group, table,
# every config or the first, what it is)
GATED_VARIANTS = [
    ("fp16", "fp16", "fp16", 0, 0, 0, "float", True, "gated fp16"),
    ("bf16", "bf16", "bf16", 0, 0, 0, "float", False, "gated bf16"),
    ("fp32", "fp32", "fp32", 0, 0, 0, "float", False, "gated fp32"),
    ("fp16", "i8", "fp16", 0, 0, 0, "w8a16", True, "gated w8a16 per channel"),
    ("bf16", "i8", "bf16", 128, 0, 0, "w8a16", False, "gated w8a16 bf16 group:128"),
    ("i8", "i8", "i8", 0, 0, 0, "w8a8", True, "gated w8a8 static GEMM1"),
    ("i8", "i8", "fp16", 0, 0, 0, "w8a8", False, "gated w8a8 dynamic GEMM1 (16-bit h)"),
    ("i8", "i8", "i8", 0, 128, 128, "w8a8-group", True, "gated w8a8 group:128 GEMM1"),
    ("i8", "i8", "i8", 0, 64, 64, "w8a8-group", False, "gated w8a8 group:64 GEMM1"),
]


def gated_cases():
    """The gated GEMM1 (GATED: the up projection's tile and accumulator beside the gate's):
    every config of the "-gated" tables for fp16 and for each int8 scheme, one config for
    the rest, and the weight stored [K, N] once per table."""
    for name, kernels in (("float", gemm._GEMM.kernels), ("int8", int8_gemm._GEMM.kernels)):
        for path, (kernel, strided, decode) in zip(("tma", "decode", "strided"), _paths(kernels)):
            for a_dtype, b_dtype, out_dtype, group, a_group, c_group, table, every, label in GATED_VARIANTS:
                if (table == "float") != (name == "float"):
                    continue
                int8 = b_dtype == "i8"
                t, absent = gemm_types(a_dtype, b_dtype, out_dtype, "fp16" if int8 else a_dtype, strided=strided,
                                       decode=decode, w_scale=int8, a_scale=a_dtype == "i8", c_scale=out_dtype == "i8",
                                       gated=True)  # fmt: skip
                cx = dict(HAS_BIAS=True, ACTIVATION="tanh", GROUP_K=group, A_GROUP_K=a_group, C_GROUP_N=c_group,
                          DOT_F32=False, INPUT_PRECISION="ieee", INTERPRETER=False, **absent)  # fmt: skip
                if not strided:
                    cx.update(B_IS_NK=True, NUM_SMS=132)
                configs = _table_configs(GATED_TABLES[table][path])
                configs = configs if every else [_smallest(configs)]
                for config in {gemm_config_key(c): c for c in (fit_groups(c, a_group, c_group) for c in configs)}.values():
                    yield kernel, t, cx, config, label
                if not strided and every:
                    yield kernel, t, {**cx, "B_IS_NK": False}, fit_groups(configs[0], a_group, c_group), f"{label} in_out"


def dequant_cases():
    """w8a16's large-M dequantize pass (kernels/dequant.py): fp16 and bf16, both layouts,
    with the launcher's default warps and stages."""
    types = {"q_ptr": "*i8", "s_ptr": "*fp32", **_ints("R", "C", "stride_qr", "stride_qc", "stride_or", "stride_oc",
                                                        "stride_sn", "stride_sg")}  # fmt: skip
    for out, rows_are_n, group in itertools.product(("fp16", "bf16"), (True, False), (128, 32)):
        block_g, block_other = dequant._blocks(group, rows_are_n)
        cx = dict(GROUP=group, BLOCK_G=block_g, BLOCK_OTHER=block_other, ROWS_ARE_N=rows_are_n, OUT_FP16=out == "fp16",
                  INTERPRETER=False)  # fmt: skip
        label = f"w8a16 dequantize {out} {'out_in' if rows_are_n else 'in_out'} group:{group}"
        yield dequant._dequant_group_kernel, {**types, "out_ptr": f"*{out}"}, cx, triton.Config({}, num_warps=4, num_stages=3), label


def split_k_cases():
    """The TMA kernel's split-K tile loop: each float, int8 and gated variant's one-config
    case (a plain tile loop: no flatten or warp specialization) with MAX_SPLIT_K = 8, its
    SPLIT_K evaluated at GEMM2's 128-row shape, where it splits."""
    tma = {gemm._GEMM.kernels.tma, int8_gemm._GEMM.kernels.tma}
    seen = set()
    for gen in (float_cases, int8_cases, gated_cases):
        for kernel, types, cx, config, label in gen():
            if kernel not in tma or (id(kernel), label.split(" in_out")[0]) in seen or "candidate" in label:
                continue  # (warp-specialized candidates never split K)
            seen.add((id(kernel), label.split(" in_out")[0]))
            kwargs = {k: v for k, v in config.kwargs.items() if k not in ("FLATTEN", "WARP_SPECIALIZE")}
            split = triton.Config({**kwargs, "MAX_SPLIT_K": 8}, num_warps=config.num_warps, num_stages=config.num_stages)
            yield kernel, types, cx, split, f"{label} split-K", SPLIT_SIZES
    # every config the tables let split, at the shape where it does
    for gen in (float_cases, int8_cases):
        for kernel, types, cx, config, label in gen():
            if kernel in tma and config.kwargs.get("MAX_SPLIT_K", 1) > 1:
                yield kernel, types, cx, config, f"{label} split-K (table)", SPLIT_SIZES


_TORCH = {"fp16": "float16", "bf16": "bfloat16", "i8": "int8", "fp32": "float32"}


def _descriptor_type(pointer_type: str, block_shape: list) -> str:
    # the signature Triton gives a host TensorDescriptor argument of this dtype and block shape
    import torch
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    base = torch.empty(256, 256, dtype=getattr(torch, _TORCH[pointer_type.lstrip("*")]))
    return mangle_type(TensorDescriptor(base, [256, 256], [256, 1], block_shape))


def host_descriptor_cases():
    """The TMA kernel with its descriptors made on the host (HOST_DESC; kernels/gemm_base.py's
    HOST_DESCRIPTORS): every float, int8 and gated TMA case above but fp32's (which keeps
    device descriptors) and the warp-specialized configs' (which the pruner keeps from them:
    triton 3.6 rejects the split stores), its a, weight(s) and output passed as
    TensorDescriptors whose block shapes are the config's."""
    tma = {gemm._GEMM.kernels.tma, int8_gemm._GEMM.kernels.tma}
    for gen in (float_cases, int8_cases, gated_cases):
        for kernel, types, cx, config, label in gen():
            if kernel not in tma or types["a_ptr"] == "*fp32" or config.kwargs.get("WARP_SPECIALIZE"):
                continue  # (the pruner keeps warp-specialized configs from host descriptors)
            kw = config.kwargs
            bm, bn, bk = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"]
            weight = [bn, bk] if cx["B_IS_NK"] else [bk, bn]
            t = dict(types, a_ptr=_descriptor_type(types["a_ptr"], [bm, bk]),
                     b_ptr=_descriptor_type(types["b_ptr"], weight),
                     c_ptr=_descriptor_type(types["c_ptr"], [bm, bn // 2 if kw.get("EPILOGUE_SUBTILE") else bn]))  # fmt: skip
            if "u_ptr" in t:
                t["u_ptr"] = _descriptor_type(types["u_ptr"], weight)
            yield kernel, t, {**cx, "HOST_DESC": "host"}, config, f"{label} host descriptors"


def fused_cases():
    """The one-launch MLP (kernels/fused_mlp.py): every float config for fp16 with both
    biases and for fp32 (every one within the shared memory limit), one config for bf16 and the layouts and
    biases; every w8a8 config for fp16 with SmoothQuant, one for bf16 without; every w8a16
    config for fp16 per group of 128, one for bf16 per channel."""
    kernel = fused_mlp._fused_mlp
    w8a8_kernel = fused_mlp._fused_w8a8_mlp
    w8a16_kernel = fused_mlp._fused_w8a16_mlp

    def unique(*tables):
        return list({gemm_config_key(c): c for table in tables for c in table.values()}.values())

    def types(dt, w8a8=False):
        w = "i8" if w8a8 else dt
        t = {"x_ptr": f"*{dt}", "w1_ptr": f"*{w}", "b1_ptr": f"*{dt}", "w2_ptr": f"*{w}", "b2_ptr": f"*{dt}",
             "y_ptr": f"*{dt}", "h_ptr": f"*{dt}", "partial_ptr": "*fp32", "counters_ptr": "*i32",
             **_ints("M", "D", "F", "M_BUCKET", "NUM_PROGRAMS", "stride_xm", "stride_xk", "stride_w1k",
                     "stride_w1n", "stride_w2k", "stride_w2n", "stride_ym", "stride_w1s", "stride_w2s",
                     "stride_w1sg", "stride_w2sg")}  # fmt: skip
        if w8a8:
            t.update(w1_scale_ptr="*fp32", w2_scale_ptr="*fp32", smooth_ptr="*fp32", absmax_ptr="*fp32")
        return t

    absent = dict(w1_scale_ptr=None, w2_scale_ptr=None, smooth_ptr=None, absmax_ptr=None)
    base = dict(HAS_B1=True, HAS_B2=True, ACTIVATION="erf", W8A8=False, HAS_SMOOTH=False, STATIC=False, A_GROUP=0,
                W8A16=False, GROUP_K=0, DOT_F32=False, INPUT_PRECISION="ieee", INTERPRETER=False,
                x_scale_ptr=None, h_scale_ptr=None)  # fmt: skip
    configs = unique(fused_mlp.FUSED_CONFIGS)
    for config in configs:
        yield kernel, types("fp16"), {**base, **absent}, config, "fused fp16 erf"
        yield kernel, types("fp32"), {**base, **absent}, config, "fused fp32 erf"
    for dt, act, b2 in (("bf16", "tanh", True), ("fp16", "tanh", False)):
        cx = {**base, **absent, "ACTIVATION": act, "HAS_B2": b2}
        yield kernel, types(dt), cx, configs[0], f"fused {dt} {act} b2={b2}"
    w8a16 = {**base, "W8A16": True, "GROUP_K": 128, "smooth_ptr": None, "absmax_ptr": None}
    w8a16_types = types("fp16", True)  # the int8 weights and their scales
    w8a16_configs = unique(fused_mlp.FUSED_W8A16_CONFIGS, fused_mlp.FUSED_W8A16_LARGE_CONFIGS)
    for config in w8a16_configs:
        yield w8a16_kernel, w8a16_types, w8a16, config, "fused w8a16 fp16 group:128"
    bf16_types = {**w8a16_types, "x_ptr": "*bf16", "b1_ptr": "*bf16", "b2_ptr": "*bf16", "y_ptr": "*bf16", "h_ptr": "*bf16"}
    yield w8a16_kernel, bf16_types, {**w8a16, "GROUP_K": 0}, w8a16_configs[0], "fused w8a16 bf16 per-channel"
    w8a8 = {**base, "W8A8": True, "HAS_SMOOTH": True}
    w8a8_configs = unique(fused_mlp.FUSED_W8A8_CONFIGS, fused_mlp.FUSED_W8A8_LARGE_CONFIGS)
    for config in w8a8_configs:
        yield w8a8_kernel, types("fp16", True), w8a8, config, "fused w8a8 fp16 erf smooth"
    types_bf16 = {k: v for k, v in types("bf16", True).items() if k != "smooth_ptr"}
    cx = {**w8a8, "HAS_SMOOTH": False, "smooth_ptr": None, "ACTIVATION": "tanh"}
    yield w8a8_kernel, types_bf16, cx, w8a8_configs[0], "fused w8a8 bf16 tanh"
    # static and group: int8 h; static's two calibrated scales, group's h scales
    int8_h = {**types("fp16", True), "h_ptr": "*i8", "h_scale_ptr": "*fp32"}
    pointers = {k: v for k, v in w8a8.items() if k not in ("x_scale_ptr", "h_scale_ptr")}  # (typed, not None)
    static = {**pointers, "STATIC": True, "absmax_ptr": None}
    for config in w8a8_configs:
        yield w8a8_kernel, {**int8_h, "x_scale_ptr": "*fp32"}, static, config, "fused w8a8 fp16 static smooth"
    for group in (128, 64, 32):
        group_cx = {**pointers, "A_GROUP": group, "absmax_ptr": None, "x_scale_ptr": None}
        fitted = unique({i: fused_mlp.fit_group(c, group) for i, c in enumerate(w8a8_configs)})
        for config in fitted if group == 128 else fitted[:1]:
            yield fused_mlp._w8a8_group_dispatcher(group), int8_h, group_cx, config, f"fused w8a8 fp16 group:{group}"


def main() -> int:
    which = sys.argv[1:] or ["float", "int8", "gated", "split", "host", "fused"]
    generators = (("float", float_cases), ("int8", int8_cases), ("int8", dequant_cases), ("gated", gated_cases),
                  ("split", split_k_cases), ("host", host_descriptor_cases), ("fused", fused_cases))  # fmt: skip
    cases = [c for name, gen in generators if name in which for c in gen()]
    failures = []
    for kernel, types, constexprs, config, label, *sizes in cases:
        t0 = time.time()
        _, error = compile_one(kernel, types, constexprs, config, *sizes)
        name = _innermost(kernel).__name__
        print(f"{'FAIL' if error else 'ok  '} {time.time() - t0:5.1f}s {name} {label} {config}", flush=True)
        if error:
            failures.append(f"{name} {label} {config}: {error}")
    print(f"\ntriton {triton.__version__}: {len(cases)} compiled, {len(failures)} failed")
    print("\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
