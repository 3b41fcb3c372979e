"""The GEMM base shared by the float and the int8-weight GEMMs: one kernel body per path,
and the host side that picks a path, a config and a launch plan.

    out = epilogue(a @ B),   B = the weight as [K, N] (read in place in either layout)

Three kernels, each one body for every operand type (the dtypes of `a` and of the weight
decide at compile time what the tile loop and the epilogue do):

- `gemm_tma_kernel`, the Hopper path: a persistent grid (one program per SM walking
  output tiles in grouped order) that loads and stores through TMA tensor descriptors.
  It needs unit stride along the last dim and 16-byte aligned rows. Configs with
  MAX_SPLIT_K split K when the output has fewer tiles than there are SMs (GEMM2 at
  medium M), reduced serially as in the decode kernel.
- `gemm_decode_kernel`, few rows (at most the BLOCK_M of its configs: 64 for float
  weights, 16 for int8 ones), where the cost is reading the weight once: swap-AB (the
  weight tile on the MMA's wide side, the few tokens on its narrow side), TMA loads,
  and a serial split-K when N alone gives too few programs to keep every SM streaming.
- `gemm_strided_kernel`: one program per output tile, pointer loads, any strides and
  alignment: the fallback for operands TMA cannot address.

What each operand type does inside them:

    a        weight   dot                          epilogue (float32)
    float    float    a's dtype, fp32 accumulate   + bias, GELU, round to out's dtype
    fp16/bf16  int8   q -> a's dtype (exact); per  * w_scale[n] (per channel), + bias,
                      group: q * scale, rounded    GELU, round to out's dtype
    int8     int8     int8 x int8, int32 acc       * a_scale[m] * w_scale[n], + bias, GELU;
                                                   int8 out: requantize with c_scale

and the constexprs that change them:

- SWAP_AB (a TMA config option, w8a16's schedule): out^T = W @ a^T, the weight tile
  converted in registers as the MMA's register operand (the decode kernel always swaps).
- A_GROUP_K (w8a8 `group:N`): a's scale changes every A_GROUP_K along K; the K tile is
  one group, and each tile's exact int32 partial is promoted into a float32 accumulator
  times its group's scale, per row (`_mma`).
- C_GROUP_N (w8a8 `group:N`, GEMM1): the int8 output is requantized per (row, C_GROUP_N
  columns) with a scale from that group's absmax, and the kernel writes the scales too
  (`_requantize_groups`); the epilogue tile holds whole groups (`fit_groups`).
- GATED (a gated GEMM1, GeGLU): the up projection's tile of the same output columns is
  loaded beside the weight tile (a second descriptor or pointer: a weight of its own, or
  the other half of one concatenated weight) and multiplied with the same activation tile
  into a second accumulator; `_gated_epilogue` dequantizes each accumulator with its own
  weight's scales and bias and stores GELU(gate) * up through the one output step
  (requantized, per tensor or per group, for w8a8). Its configs are each scheme's
  "-gated" table: two accumulators, so tiles half as wide as the plain ones.

int8 -> fp16 goes through `int8_to_fp16` (integer adds, no converter); a per-group weight
scale multiplies in fp16 for fp16 activations and in float32 for bf16 (kernels/
reference.py's w8a16 reference computes the same).

The weight tile the dot takes (`_weight_tile`), the K step (`_mma`) and the epilogue
(`_epilogue`, which sees the tile's rows and columns) are small jitted helpers shared by
the three kernels, so the next operand types are branches on new constexprs there, not
new kernels: A quantized per row as it is loaded (a step after the A load), an epilogue
that also writes a row absmax (atomic max).

Host side, written once for every scheme: configs keyed by the row count's bucket and
pruned to the scheme's table and to what fits (`gemm_kernels` builds a scheme family's
three autotuned kernels from its tables), the TMA / strided / decode decision, grids, the
split-K workspace, and `GemmLauncher`, which keeps one `GemmPlan` per call signature so
a repeated call skips every check and launches the compiled kernel directly
(kernels/launch.py's slot).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.errors import LaunchError
from kernels.int8 import INT8_MAX, SCALE_EPS
from kernels.launch import device_capability, ensure_tma_allocator, interpreting, launch, num_programs
from kernels.schemes import GELU_FLAVOURS, WeightLayout

ACTIVATIONS = ("none",) + GELU_FLAVOURS
PATHS = ("auto", "tma", "decode", "strided")
# kernels/int8.py's INT8_MAX, as the float32 constant the kernels compute with
INT8_MAX_F32: tl.constexpr = tl.constexpr(float(INT8_MAX))
# kernels/int8.py's floor on every scale
SCALE_EPS_F32: tl.constexpr = tl.constexpr(SCALE_EPS)


def m_bucket(m: int) -> int:
    """Autotuning key for the row count: nearby token counts share one tuned config."""
    for bound in (16, 64, 128, 256, 512, 1024, 4096):
        if m <= bound:
            return bound
    return 16384


# ---------------------------------------------------------------------------------------
# Device functions
# ---------------------------------------------------------------------------------------
# One return at the end of each: Triton 3.6 generates the statements after a return
# inside an `if` too, so an early return would emit a second, wrongly typed value.


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row blocks walk the N tiles together, so the band of the
    # weight they share is still in L2 when the next row block reads it.
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile_id // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % tiles_per_group) % group_rows
    pid_n = (tile_id % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # DOT_F32 upcasts the tiles first. The launchers set it only for bf16 under the CPU
    # interpreter, whose bf16 tl.dot returns garbage: every other step of the bf16
    # kernel (loads, masks, epilogue, the bf16 store) still runs as on the GPU.
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    elif a.dtype == tl.int8:
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # int8 x int8 accumulates in int32
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _rcp(x, INTERPRETER: tl.constexpr):
    # 1 / x for x >= 1 by the special-function unit alone (rcp.approx.ftz.f32, within 1 ulp).
    # Triton's "/" is div.full.f32, whose range handling for huge and tiny divisors costs six
    # more instructions an element, a third of an erf GELU epilogue; no divisor here needs it.
    if INTERPRETER:
        r = 1.0 / x
    else:
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    return r


@triton.jit
def _exp2(x, INTERPRETER: tl.constexpr):
    # 2^x by the special-function unit alone (ex2.approx.ftz.f32): tl.exp's non-ftz ex2 adds
    # three instructions an element to keep results below 2^-126, which GELU rounds away.
    if INTERPRETER:
        # inf past float32's range, as on the GPU, without numpy's overflow warning
        r = tl.where(x < 128.0, tl.exp2(tl.minimum(x, 127.0)), float("inf"))
    else:
        r = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)
    return r


@triton.jit
def gelu(x, ACTIVATION: tl.constexpr, INTERPRETER: tl.constexpr):
    """x unchanged for "none", else the GELU flavour ACTIVATION of float32 x."""
    if ACTIVATION == "erf":
        # exact GELU: 0.5 * x * (1 + erf(z)), z = x / sqrt(2). erf(|z|) = 1 - q with
        # q = t * P(t) * exp(-z^2), t = 1 / (1 + p|z|) (Abramowitz & Stegun 7.1.26, |error| <=
        # 1.5e-7), so 1 + erf(z) is q for x < 0 (no cancellation in the tail) and 2 - q else.
        # Not libdevice's erf: under triton 3.6 it made ptxas spill registers in measured
        # configs of the one-launch MLP and the TMA GEMM (bench/RESULTS.md section 19). This
        # GELU is within 6.4e-7 of float64, closer than torch's own float32 erf GELU.
        # exp(-z^2) = 2^(x^2 * -log2(e) / 2).
        t = _rcp(1.0 + 0.3275911 * 0.7071067811865476 * tl.abs(x), INTERPRETER)
        q = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
        q = q * _exp2(x * x * -0.7213475204444817, INTERPRETER)
        x = 0.5 * x * tl.where(x < 0, q, 2.0 - q)
    elif ACTIVATION == "tanh":
        # tanh GELU: 0.5 * x * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3), which
        # equals x * sigmoid(2u) = x / (1 + 2^(-2u log2(e))) (no libdevice tanh: it does not
        # run under the interpreter).
        # (the cubic written out: factored as x * (a + b x^2), ptxas spilled 16 B of the
        # 1024-row one-launch config at 768x3072; bench/RESULTS.md section 21)
        x = x * _rcp(1.0 + _exp2(-2.302208198144325 * x - 0.1029432395800235 * x * x * x, INTERPRETER), INTERPRETER)
    elif ACTIVATION == "quick":
        # CLIP's quick GELU: x * sigmoid(1.702 x) = x / (1 + 2^(-1.702 x log2(e)))
        x = x * _rcp(1.0 + _exp2(-2.4554669595930156 * x, INTERPRETER), INTERPRETER)
    return x


@triton.jit
def round_to_int8(v):
    """int8 q = round_half_even(clamp(v, -127, 127)) of float32 v: the int8 rounding every
    kernel uses and kernels/int8.py's `round_to_int8` mirrors in torch."""
    # libdevice's rint does not run under the interpreter; adding then subtracting
    # 1.5 * 2^23 = 12582912 does the rounding in the float32 adder itself: for
    # |v| <= 2^22 the sum's last bit is worth exactly 1, so the add rounds v to the
    # nearest integer, ties to even, and the subtract is exact. The clamp sits between
    # any product and the add, so the compiler cannot fuse them into one fma (which
    # would round differently).
    v = tl.minimum(tl.maximum(v, -INT8_MAX_F32), INT8_MAX_F32)
    v = (v + 12582912.0) - 12582912.0
    return v.to(tl.int8)


@triton.jit
def _bf16_round_nearest(v):
    # float32 -> the nearest bf16 value (ties to even), kept in float32. Only for the CPU
    # interpreter, whose float32 -> bf16 cast truncates (the GPU's rounds to nearest);
    # the cast of the rounded value is then exact.
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def int8_to_fp16(q):
    """int8 q -> fp16, exactly, without the converter: the fp16 with bits 0x6480 + q is
    1152 + q (exponent 2^10, q + 128 in the mantissa), so an int16 add and one fp16
    subtract give q."""
    return (q.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0


@triton.jit
def _weight_tile(q, a, w_scale_ptr, k0, cols, K, stride_wsn, stride_wsg,
                 GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr, K_AXIS: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    # The weight tile the dot takes, from the tile q as loaded; a is the activation tile.
    # q covers k in [k0, k0 + BLOCK_K) along axis K_AXIS ([BLOCK_K, BLOCK_N] tiles: 0; the
    # swap-AB schedules' [BLOCK_N, BLOCK_K]: 1) and the output channels `cols` (clamped in
    # bounds) along the other.
    # DOT_F32 (bf16 under the CPU interpreter, see _dot) hands the dot float32 tiles
    # holding the values the GPU's bf16 tiles hold: the interpreter's int8 -> bf16 cast
    # returns garbage and its float32 -> bf16 cast truncates.
    if q.dtype != tl.int8:
        w = q  # a float weight, as loaded
    elif a.dtype == tl.int8:
        w = q  # w8a8: int8 x int8; both scales wait for the epilogue
    elif GROUP_K == 0:
        # exact (|q| <= 127); the per-channel scale waits for the epilogue
        if DOT_F32:
            w = q.to(tl.float32)
        elif a.dtype == tl.float16:
            w = int8_to_fp16(q)
        else:
            w = q.to(a.dtype)
    else:
        w = _group_scaled_tile(q, a, w_scale_ptr, k0, cols, K, stride_wsn, stride_wsg, GROUP_K, BLOCK_K, K_AXIS, DOT_F32)
    return w


@triton.jit
def _group_scaled_tile(q, a, w_scale_ptr, k0, cols, K, stride_wsn, stride_wsg,
                       GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr, K_AXIS: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    # per group: w[k, n] = q[k, n] * scale[n, k // GROUP_K], rounded once to a's dtype. fp16:
    # the product of q (exact in fp16) and the scale rounded to fp16, in fp16 (packed
    # multiplies; the product is exact in float32, so this equals rounding
    # q * fp16(scale) once); bf16: q * scale in float32, rounded to bf16 (a bf16 scale
    # would carry 2^-9 of error into every weight of its group).
    BLOCK_N: tl.constexpr = cols.shape[0]
    if GROUP_K % BLOCK_K == 0:
        # the whole tile lies in one group: one scale per output channel
        scale = tl.load(w_scale_ptr + cols * stride_wsn + (k0 // GROUP_K) * stride_wsg)
        scale = scale[None, :] if K_AXIS == 0 else scale[:, None]
    elif BLOCK_K % GROUP_K == 0:
        # BLOCK_K / GROUP_K whole groups: load their scales, repeat each GROUP_K times
        # along k (groups past K, in the zero-filled tail, read group 0 to stay in bounds)
        GROUPS: tl.constexpr = BLOCK_K // GROUP_K
        groups = k0 // GROUP_K + tl.arange(0, GROUPS)
        groups = tl.where(groups * GROUP_K < K, groups, 0)
        if K_AXIS == 0:
            s = tl.load(w_scale_ptr + groups[:, None] * stride_wsg + cols[None, :] * stride_wsn)
            scale = tl.reshape(tl.broadcast_to(s[:, None, :], (GROUPS, GROUP_K, BLOCK_N)), (BLOCK_K, BLOCK_N))
        else:
            s = tl.load(w_scale_ptr + cols[:, None] * stride_wsn + groups[None, :] * stride_wsg)
            scale = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, GROUPS, GROUP_K)), (BLOCK_N, BLOCK_K))
    else:
        # group size and tile depth do not divide: gather each element's scale (slow,
        # and the pipeliner stages the gathered tile in shared memory; fine for odd
        # group sizes on small tiles). k past K reads group 0 to stay in bounds.
        ks = k0 + tl.arange(0, BLOCK_K)
        groups = tl.where(ks < K, ks, 0) // GROUP_K
        if K_AXIS == 0:
            scale = tl.load(w_scale_ptr + groups[:, None] * stride_wsg + cols[None, :] * stride_wsn)
        else:
            scale = tl.load(w_scale_ptr + cols[:, None] * stride_wsn + groups[None, :] * stride_wsg)
    if DOT_F32:
        w = _bf16_round_nearest(q.to(tl.float32) * scale)
    elif a.dtype == tl.float16:
        w = int8_to_fp16(q) * scale.to(tl.float16)
    else:
        w = (q.to(tl.float32) * scale).to(a.dtype)
    return w


@triton.jit
def _mma(x, y, acc, a_scale_ptr, scale_rows, ki, stride_as,
         A_GROUP_K: tl.constexpr, SWAPPED: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    # acc += x @ y. A_GROUP_K (an int8 `a` whose scale changes every A_GROUP_K along K;
    # the K tile is one group): the tile's exact int32 partial is promoted into the float32
    # accumulator times its group's scale, one per row of `a` (scale_rows, in bounds) -
    # the columns of the product when SWAPPED (out^T = W @ a^T).
    if A_GROUP_K == 0:
        acc = _dot(x, y, acc, DOT_F32, INPUT_PRECISION)
    else:
        part = tl.dot(x, y, out_dtype=tl.int32).to(tl.float32)
        s = tl.load(a_scale_ptr + scale_rows * stride_as + ki)
        if SWAPPED:
            acc += part * s[None, :]
        else:
            acc += part * s[:, None]
    return acc


@triton.jit
def _dequantize(acc, offs_m, offs_n, M, N, bias_ptr, w_scale_ptr, a_scale_ptr, stride_wsn, stride_as,
                INT8_WEIGHT: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr):  # fmt: skip
    # float32 acc * a_scale[m] * w_scale[n] + bias[n], in this order, as kernels/reference.py
    # computes it (the scales where the operands are int8).
    out = acc.to(tl.float32)  # int32 -> float32 rounds to nearest even, as torch does
    if acc.dtype == tl.int32:
        # w8a8: a's scale, one per row (stride 1) or one for all rows (stride 0). (A
        # per-group scale was applied in the K loop: the accumulator is float32 then.)
        a_scale = tl.load(a_scale_ptr + offs_m * stride_as, mask=offs_m < M, other=0.0)
        out = out * a_scale[:, None]
    if INT8_WEIGHT:
        if GROUP_K == 0:
            w_scale = tl.load(w_scale_ptr + offs_n * stride_wsn, mask=offs_n < N, other=0.0)
            out = out * w_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        out = out + bias.to(tl.float32)[None, :]
    return out


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N,
              bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr, stride_wsn, stride_as,
              INT8_WEIGHT: tl.constexpr, GROUP_K: tl.constexpr, C_GROUP_N: tl.constexpr, HAS_BIAS: tl.constexpr,
              ACTIVATION: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):  # fmt: skip
    # float32 out = acc * a_scale[m] * w_scale[n] + bias[n], then GELU, in this order, as
    # kernels/reference.py computes it; then stored in OUT_DTYPE (int8: requantized).
    out = _dequantize(acc, offs_m, offs_n, M, N, bias_ptr, w_scale_ptr, a_scale_ptr, stride_wsn, stride_as,
                      INT8_WEIGHT, GROUP_K, HAS_BIAS)  # fmt: skip
    out = gelu(out, ACTIVATION, INTERPRETER)
    return _to_output(out, offs_m, offs_n, M, N, c_scale_ptr, C_GROUP_N, OUT_DTYPE, INTERPRETER)


@triton.jit
def _gated_epilogue(acc, acc_up, offs_m, offs_n, M, N,
                    bias_ptr, up_bias_ptr, w_scale_ptr, up_scale_ptr, a_scale_ptr, c_scale_ptr, stride_wsn, stride_as,
                    INT8_WEIGHT: tl.constexpr, GROUP_K: tl.constexpr, C_GROUP_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                    ACTIVATION: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):  # fmt: skip
    # A gated GEMM1: each accumulator dequantized with its own weight's scales and bias,
    # GELU(gate) * up in float32 (kernels/reference.py's order), then stored as _epilogue
    # stores (w8a8: the product requantized).
    gate = _dequantize(acc, offs_m, offs_n, M, N, bias_ptr, w_scale_ptr, a_scale_ptr, stride_wsn, stride_as,
                       INT8_WEIGHT, GROUP_K, HAS_BIAS)  # fmt: skip
    up = _dequantize(acc_up, offs_m, offs_n, M, N, up_bias_ptr, up_scale_ptr, a_scale_ptr, stride_wsn, stride_as,
                     INT8_WEIGHT, GROUP_K, HAS_BIAS)  # fmt: skip
    out = gelu(gate, ACTIVATION, INTERPRETER) * up
    return _to_output(out, offs_m, offs_n, M, N, c_scale_ptr, C_GROUP_N, OUT_DTYPE, INTERPRETER)


@triton.jit
def _tile_epilogue(acc, acc_up, offs_m, offs_n, M, N,
                   bias_ptr, u_bias_ptr, w_scale_ptr, u_scale_ptr, a_scale_ptr, c_scale_ptr, stride_wsn, stride_as,
                   INT8_WEIGHT: tl.constexpr, GROUP_K: tl.constexpr, C_GROUP_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                   ACTIVATION: tl.constexpr, GATED: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):  # fmt: skip
    # The output tile: _gated_epilogue of both accumulators, or _epilogue of acc (acc_up
    # is then never read).
    if GATED:
        out = _gated_epilogue(
            acc, acc_up, offs_m, offs_n, M, N, bias_ptr, u_bias_ptr, w_scale_ptr, u_scale_ptr, a_scale_ptr, c_scale_ptr,
            stride_wsn, stride_as, INT8_WEIGHT, GROUP_K, C_GROUP_N, HAS_BIAS, ACTIVATION, OUT_DTYPE, INTERPRETER,
        )  # fmt: skip
    else:
        out = _epilogue(
            acc, offs_m, offs_n, M, N, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr, stride_wsn, stride_as,
            INT8_WEIGHT, GROUP_K, C_GROUP_N, HAS_BIAS, ACTIVATION, OUT_DTYPE, INTERPRETER,
        )  # fmt: skip
    return out


@triton.jit
def _to_output(out, offs_m, offs_n, M, N, c_scale_ptr,
               C_GROUP_N: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):  # fmt: skip
    # float32 out stored in OUT_DTYPE (int8: requantized, per tensor or per group)
    if OUT_DTYPE == tl.int8:
        if C_GROUP_N == 0:
            # w8a8 GEMM1, static: requantize for GEMM2, q = round(clamp(out / c_scale)), the
            # division as a multiply by the correctly rounded reciprocal (div_rn: Triton's
            # plain "/" is an approximate division on the GPU)
            inv_c_scale = tl.math.div_rn(1.0, tl.load(c_scale_ptr))
            result = round_to_int8(out * inv_c_scale)
        else:
            result = _requantize_groups(out, offs_m, offs_n, M, N, c_scale_ptr, C_GROUP_N)
    else:
        if OUT_DTYPE == tl.bfloat16:
            if INTERPRETER:
                out = _bf16_round_nearest(out)  # the interpreter's bf16 cast would truncate
        result = out.to(OUT_DTYPE)
    return result


@triton.jit
def _requantize_groups(out, offs_m, offs_n, M, N, c_scale_ptr, C_GROUP_N: tl.constexpr):
    # w8a8 GEMM1 of group:N: each (row, C_GROUP_N columns) of the output gets its own
    # scale, max(absmax / 127, SCALE_EPS) over the group's columns (those past N left out),
    # written to c_scale [M, cdiv(N, C_GROUP_N)]; then q = round(clamp(out * (1 / scale))),
    # kernels/int8.py's arithmetic. The tile holds whole groups (the configs see to it).
    BLOCK_M: tl.constexpr = out.shape[0]
    BLOCK_N: tl.constexpr = out.shape[1]
    GROUPS: tl.constexpr = BLOCK_N // C_GROUP_N
    tl.static_assert(BLOCK_N % C_GROUP_N == 0, "the epilogue's tile must hold whole output groups")
    n_groups = tl.cdiv(N, C_GROUP_N)
    magnitude = tl.where(offs_n[None, :] < N, tl.abs(out), 0.0)
    if GROUPS == 1:
        # one group per tile (the large configs' 128-wide epilogue halves): 2-D reductions
        scale = tl.maximum(tl.math.div_rn(tl.max(magnitude, axis=1), INT8_MAX_F32), SCALE_EPS_F32)
        # (the second half of a subtiled edge tile may lie wholly past N: no group to write)
        group = tl.max(offs_n, axis=0) // C_GROUP_N
        tl.store(c_scale_ptr + offs_m * n_groups + group, scale, mask=(offs_m < M) & (offs_m * 0 + group < n_groups))
        result = round_to_int8(out * tl.math.div_rn(1.0, scale)[:, None])
    else:
        absmax = tl.max(tl.reshape(magnitude, (BLOCK_M, GROUPS, C_GROUP_N)), axis=2)
        scale = tl.maximum(tl.math.div_rn(absmax, INT8_MAX_F32), SCALE_EPS_F32)
        groups = tl.max(tl.reshape(offs_n, (GROUPS, C_GROUP_N)), axis=1) // C_GROUP_N
        mask = (offs_m[:, None] < M) & (groups[None, :] < n_groups)
        tl.store(c_scale_ptr + offs_m[:, None] * n_groups + groups[None, :], scale, mask=mask)
        scaled = tl.reshape(out, (BLOCK_M, GROUPS, C_GROUP_N)) * tl.math.div_rn(1.0, scale)[:, :, None]
        result = round_to_int8(tl.reshape(scaled, (BLOCK_M, BLOCK_N)))
    return result


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------
# Arguments, in this order for all three: the tensors (a [M, K]; b the weight, float or
# int8; c the output [M, N]; bias [N]; w_scale, the int8 weight's scales, [N] per channel
# or [N, K / GROUP_K] per group; a_scale, an int8 a's scale: [M] (stride_as 1), one
# (stride_as 0), or with A_GROUP_K one per row per A_GROUP_K along K, [M, cdiv(K,
# A_GROUP_K)] with rows stride_as apart; c_scale, the one scale an int8 output is
# requantized with, or with C_GROUP_N the [M, cdiv(N, C_GROUP_N)] scales the kernel writes
# for it; a gated GEMM1's up projection: u the up weight (b's dtype, shape and strides: a
# weight of its own, or the other half of one concatenated weight), u_bias [N], u_scale
# (w_scale's shape and strides); decode and tma add their split-K workspace), then sizes and
# strides. A scale or tensor the operands do not have is passed as None (a compile-time
# None, never read).


@triton.jit
def _zero_acc(A_TYPE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, A_GROUP_K: tl.constexpr):
    # int32 for int8 x int8 (exact), float32 otherwise and when per-group A scales are
    # promoted into it every K tile
    if A_TYPE == tl.int8 and A_GROUP_K == 0:
        acc = tl.zeros((ROWS, COLS), dtype=tl.int32)
    else:
        acc = tl.zeros((ROWS, COLS), dtype=tl.float32)
    return acc


@triton.jit
def _accumulators(A_TYPE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, A_GROUP_K: tl.constexpr,
                  GATED: tl.constexpr):  # fmt: skip
    # (acc, acc_up): acc_up, the up projection's, only when GATED (else acc again, never read)
    acc = _zero_acc(A_TYPE, ROWS, COLS, A_GROUP_K)
    if GATED:
        acc_up = _zero_acc(A_TYPE, ROWS, COLS, A_GROUP_K)
    else:
        acc_up = acc
    return acc, acc_up


@triton.jit
def _weight_desc(ptr, N, K, stride_b, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, B_IS_NK: tl.constexpr):
    # A weight's TMA descriptor: stored [N, K] (nn.Linear) in [BLOCK_N, BLOCK_K] tiles, or
    # [K, N] (Conv1D) in [BLOCK_K, BLOCK_N] tiles.
    if B_IS_NK:
        desc = tl.make_tensor_descriptor(ptr, shape=[N, K], strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        desc = tl.make_tensor_descriptor(ptr, shape=[K, N], strides=[stride_b, 1], block_shape=[BLOCK_K, BLOCK_N])
    return desc


@triton.jit
def _load_weight(desc, off_n, k0, B_IS_NK: tl.constexpr, K_AXIS: tl.constexpr):
    # The weight tile at (off_n, k0) through its descriptor, oriented with K along K_AXIS:
    # [BLOCK_K, BLOCK_N] (0, the dot's B operand) or [BLOCK_N, BLOCK_K] (1, swap-AB's A).
    if B_IS_NK:
        q = desc.load([off_n, k0])
        if K_AXIS == 0:
            q = q.T
    else:
        q = desc.load([k0, off_n])
        if K_AXIS == 1:
            q = q.T
    return q


@triton.jit
def _tma_mma(desc, a, acc, off_n, ki, cols, rows, K, w_scale_ptr, a_scale_ptr, stride_wsn, stride_wsg, stride_as,
             GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr, A_GROUP_K: tl.constexpr, B_IS_NK: tl.constexpr,
             SWAPPED: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    # acc += the K tile ki of `a` times the weight tile at (off_n, ki) read through desc (a
    # gated GEMM1 calls it for the gate and for the up weight): as the dot's [K, N] B operand,
    # or SWAPPED (out^T = W @ a^T: the [N, K] weight tile is the MMA's register operand).
    if SWAPPED:
        q = _load_weight(desc, off_n, ki * BLOCK_K, B_IS_NK, 1)
        w = _weight_tile(q, a, w_scale_ptr, ki * BLOCK_K, cols, K, stride_wsn, stride_wsg, GROUP_K, BLOCK_K, 1, DOT_F32)
        acc = _mma(w, a.T, acc, a_scale_ptr, rows, ki, stride_as, A_GROUP_K, True, DOT_F32, INPUT_PRECISION)
    else:
        q = _load_weight(desc, off_n, ki * BLOCK_K, B_IS_NK, 0)
        b = _weight_tile(q, a, w_scale_ptr, ki * BLOCK_K, cols, K, stride_wsn, stride_wsg, GROUP_K, BLOCK_K, 0, DOT_F32)
        acc = _mma(a, b, acc, a_scale_ptr, rows, ki, stride_as, A_GROUP_K, False, DOT_F32, INPUT_PRECISION)
    return acc


@triton.jit
def _sum_splits(ptrs, like, SPLIT_K: tl.constexpr, T: tl.constexpr):
    # The SPLIT_K partial sums stored T elements apart from ptrs, added up in like's dtype
    # (int32 partials travel bit for bit through the float32 workspace).
    total = tl.zeros(like.shape, dtype=like.dtype)
    for split in range(SPLIT_K):
        part = tl.load(ptrs + split * T, cache_modifier=".cg")
        total += part.to(like.dtype, bitcast=True)
    return total


@triton.jit
def _split_k_arrive(acc, acc_up, partial_ptr, arrivals_ptr, tile_id, share, SPLIT_K: tl.constexpr, GATED: tl.constexpr):
    # Serial split-K, one output tile's share `share` of SPLIT_K: store this share's partial
    # sums in the tile's slots (gated: the up partials after the gate's), then count it in
    # (an acq_rel atomic, so the other shares' partials are visible to the last). Returns
    # (last, total, total_up): the last share to arrive gets the sums and zeroes the
    # counter for the next launch; the others get their own accumulators back, unused.
    # int32 partials (w8a8) travel bit for bit through the float32 workspace and add up
    # exactly; float32 ones add in float32.
    ROWS: tl.constexpr = acc.shape[0]
    COLS: tl.constexpr = acc.shape[1]
    T: tl.constexpr = ROWS * COLS
    tile = tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    if GATED:
        slots = partial_ptr + tile_id * (2 * SPLIT_K * T)
        tl.store(slots + (SPLIT_K + share) * T + tile, acc_up.to(tl.float32, bitcast=True))
    else:
        slots = partial_ptr + tile_id * (SPLIT_K * T)
    tl.store(slots + share * T + tile, acc.to(tl.float32, bitcast=True))
    # One thread makes the atomic: the barrier puts every thread's partial stores before its
    # release (the barrier then the release, as a CTA-wide semaphore is written in CUDA).
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr + tile_id, 1, sem="acq_rel")
    last = arrived == SPLIT_K - 1
    total = acc
    total_up = acc_up
    if last:
        total = _sum_splits(slots + tile, acc, SPLIT_K, T)
        if GATED:
            total_up = _sum_splits(slots + SPLIT_K * T + tile, acc, SPLIT_K, T)
        else:
            total_up = total  # never read
        tl.store(arrivals_ptr + tile_id, 0)
    return last, total, total_up


@triton.jit
def gemm_strided_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr, u_ptr, u_bias_ptr, u_scale_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_wsn, stride_wsg, stride_as,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GROUP_K: tl.constexpr,
    A_GROUP_K: tl.constexpr, C_GROUP_N: tl.constexpr, GATED: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    tl.static_assert(A_GROUP_K == 0 or A_GROUP_K == BLOCK_K, "per-group A scales take one group per K tile")
    INT8_WEIGHT: tl.constexpr = b_ptr.dtype.element_ty == tl.int8
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge read row/column 0 (in bounds) and are dropped by the
    # store mask, which keeps M and N masks out of the main loop.
    rows = tl.where(offs_m < M, offs_m, 0)
    cols = tl.where(offs_n < N, offs_n, 0)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn

    acc, acc_up = _accumulators(a_ptr.dtype.element_ty, BLOCK_M, BLOCK_N, A_GROUP_K, GATED)
    if GATED:
        u_ptrs = u_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn
    for ki in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            q = tl.load(b_ptrs)
        else:
            k_left = K - ki * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            q = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        b = _weight_tile(q, a, w_scale_ptr, ki * BLOCK_K, cols, K, stride_wsn, stride_wsg, GROUP_K, BLOCK_K, 0, DOT_F32)
        acc = _mma(a, b, acc, a_scale_ptr, rows, ki, stride_as, A_GROUP_K, False, DOT_F32, INPUT_PRECISION)
        if GATED:
            if EVEN_K:
                qu = tl.load(u_ptrs)
            else:
                qu = tl.load(u_ptrs, mask=offs_k[:, None] < K - ki * BLOCK_K, other=0.0)
            bu = _weight_tile(qu, a, u_scale_ptr, ki * BLOCK_K, cols, K, stride_wsn, stride_wsg, GROUP_K, BLOCK_K, 0, DOT_F32)
            acc_up = _mma(a, bu, acc_up, a_scale_ptr, rows, ki, stride_as, A_GROUP_K, False, DOT_F32, INPUT_PRECISION)
            u_ptrs += BLOCK_K * stride_bk
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out = _tile_epilogue(
        acc, acc_up, offs_m, offs_n, M, N, bias_ptr, u_bias_ptr, w_scale_ptr, u_scale_ptr, a_scale_ptr, c_scale_ptr,
        stride_wsn, stride_as, INT8_WEIGHT, GROUP_K, C_GROUP_N, HAS_BIAS, ACTIVATION, GATED, c_ptr.dtype.element_ty,
        INTERPRETER,
    )  # fmt: skip
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def gemm_tma_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr, u_ptr, u_bias_ptr, u_scale_ptr,
    partial_ptr, arrivals_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_b, stride_cm, stride_wsn, stride_wsg, stride_as,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GROUP_K: tl.constexpr,
    A_GROUP_K: tl.constexpr, C_GROUP_N: tl.constexpr, GATED: tl.constexpr, B_IS_NK: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False, EPILOGUE_SUBTILE: tl.constexpr = False,
    SWAP_AB: tl.constexpr = False, MAX_SPLIT_K: tl.constexpr = 1, SPLIT_K: tl.constexpr = 1,
    HOST_DESC: tl.constexpr = "",
):  # fmt: skip
    # HOST_DESC (not empty: the operands' dtypes, which the autotuner's key cannot see in a
    # descriptor): a_ptr, b_ptr, c_ptr (and u_ptr) are tensor descriptors made on the host
    # (TensorDescriptor, their block shapes set for the config by host_block_shapes), passed
    # as kernel parameters; empty: pointers, and the descriptors are made here, on the
    # device (a tensor map written to global scratch and fenced before the first load).
    # B_IS_NK: the weight is stored [N, K] (nn.Linear), read as [BLOCK_N, BLOCK_K] tiles
    # (transposed in registers where the dot wants [K, N]: K-major, the layout the int8
    # wgmma wants); otherwise it is [K, N] (Conv1D), read as is.
    # SWAP_AB (int8 weights with fp16/bf16 a): out^T = W @ a^T, so the weight tile
    # converted in registers is the MMA's register operand (wgmma reads its A operand from
    # registers, its B operand only from shared memory: converted as B, the tile would
    # make a round trip through shared memory every K step); the accumulator is
    # [BLOCK_N, BLOCK_M], transposed for the epilogue.
    # SPLIT_K (tma_split_k, for configs that allow it with MAX_SPLIT_K): when the output
    # has fewer tiles than there are SMs (GEMM2 at a few hundred rows: N = d_model is
    # narrow and K = d_ff long), each tile's K range is cut in SPLIT_K shares, each a work
    # unit of its own, reduced serially by the last share to finish (as in the decode
    # kernel).
    tl.static_assert(A_GROUP_K == 0 or A_GROUP_K == BLOCK_K, "per-group A scales take one group per K tile")
    tl.static_assert(SPLIT_K == 1 or not (FLATTEN or WARP_SPECIALIZE), "split-K runs the plain tile loop")
    # (triton 3.6's warp-specialization pass aborts the process on the subtiled epilogue:
    # a clean compile error here instead; bench/ws_survey.py)
    tl.static_assert(not (WARP_SPECIALIZE and EPILOGUE_SUBTILE), "no subtiled epilogue in a warp-specialized loop")
    # (and its consumer groups' stores to a host descriptor fail to compile: "descriptor block
    # and tensor types must match", triton 3.6; bench/compile_check.py host)
    tl.static_assert(not (WARP_SPECIALIZE and HOST_DESC != ""), "no host descriptors in a warp-specialized loop")
    if HOST_DESC != "":  # (the compiler takes no str as an `if` condition)
        a_desc = a_ptr
        b_desc = b_ptr
        c_desc = c_ptr
        u_desc = u_ptr
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = _weight_desc(b_ptr, N, K, stride_b, BLOCK_N, BLOCK_K, B_IS_NK)
        if GATED:  # the up weight: b's shape and strides
            u_desc = _weight_desc(u_ptr, N, K, stride_b, BLOCK_N, BLOCK_K, B_IS_NK)
        # EPILOGUE_SUBTILE runs the epilogue and the store on two [BLOCK_M, BLOCK_N / 2]
        # halves: fewer live registers in the GELU and half the output staging buffer, which
        # leaves shared memory for a deeper pipeline.
        if EPILOGUE_SUBTILE:
            c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                               block_shape=[BLOCK_M, BLOCK_N // 2])  # fmt: skip
        else:
            c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])
    A_TYPE: tl.constexpr = a_desc.dtype
    INT8_WEIGHT: tl.constexpr = b_desc.dtype == tl.int8
    OUT_TYPE: tl.constexpr = c_desc.dtype

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_per_split = tl.cdiv(k_tiles, SPLIT_K)
    for unit in tl.range(
        tl.program_id(0), num_pid_m * num_pid_n * SPLIT_K, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
    ):
        # the shares of one tile are consecutive units: they run at once on neighbouring
        # SMs, and the last one's reads of the others' partials hit L2
        tile_id = unit // SPLIT_K
        k_first = (unit % SPLIT_K) * k_per_split
        k_last = tl.minimum(k_first + k_per_split, k_tiles)
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        rows = tl.where(offs_m < M, offs_m, 0)  # in-bounds scale reads for the edge tiles
        cols = tl.where(offs_n < N, offs_n, 0)
        if SWAP_AB:
            acc, acc_up = _accumulators(A_TYPE, BLOCK_N, BLOCK_M, A_GROUP_K, GATED)
        else:
            acc, acc_up = _accumulators(A_TYPE, BLOCK_M, BLOCK_N, A_GROUP_K, GATED)
        for ki in range(k_first, k_last):
            # TMA fills reads past the tensor's edge with zeros: no K mask needed.
            a = a_desc.load([off_m, ki * BLOCK_K])
            acc = _tma_mma(b_desc, a, acc, off_n, ki, cols, rows, K, w_scale_ptr, a_scale_ptr, stride_wsn, stride_wsg,
                           stride_as, GROUP_K, BLOCK_K, A_GROUP_K, B_IS_NK, SWAP_AB, DOT_F32, INPUT_PRECISION)  # fmt: skip
            if GATED:
                acc_up = _tma_mma(u_desc, a, acc_up, off_n, ki, cols, rows, K, u_scale_ptr, a_scale_ptr, stride_wsn,
                                  stride_wsg, stride_as, GROUP_K, BLOCK_K, A_GROUP_K, B_IS_NK, SWAP_AB, DOT_F32,
                                  INPUT_PRECISION)  # fmt: skip
        if SWAP_AB:
            acc = acc.T
            if GATED:
                acc_up = acc_up.T
            else:
                acc_up = acc
        if SPLIT_K > 1:
            # the last share of the tile to finish runs its epilogue on the sums
            last, total, total_up = _split_k_arrive(acc, acc_up, partial_ptr, arrivals_ptr, tile_id, unit % SPLIT_K,
                                                    SPLIT_K, GATED)  # fmt: skip
            if last:
                _tma_store_tile(
                    c_desc, total, total_up, off_m, off_n, M, N, bias_ptr, u_bias_ptr, w_scale_ptr, u_scale_ptr,
                    a_scale_ptr, c_scale_ptr, stride_wsn, stride_as, INT8_WEIGHT, GROUP_K, C_GROUP_N, HAS_BIAS,
                    ACTIVATION, GATED, EPILOGUE_SUBTILE, OUT_TYPE, INTERPRETER,
                )  # fmt: skip
        else:
            _tma_store_tile(
                c_desc, acc, acc_up, off_m, off_n, M, N, bias_ptr, u_bias_ptr, w_scale_ptr, u_scale_ptr, a_scale_ptr,
                c_scale_ptr, stride_wsn, stride_as, INT8_WEIGHT, GROUP_K, C_GROUP_N, HAS_BIAS, ACTIVATION, GATED,
                EPILOGUE_SUBTILE, OUT_TYPE, INTERPRETER,
            )  # fmt: skip


@triton.jit
def _tma_store_tile(c_desc, acc, acc_up, off_m, off_n, M, N, bias_ptr, u_bias_ptr, w_scale_ptr, u_scale_ptr,
                    a_scale_ptr, c_scale_ptr, stride_wsn, stride_as, INT8_WEIGHT: tl.constexpr,
                    GROUP_K: tl.constexpr, C_GROUP_N: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                    GATED: tl.constexpr, EPILOGUE_SUBTILE: tl.constexpr, out_dtype: tl.constexpr,
                    INTERPRETER: tl.constexpr):  # fmt: skip
    # The TMA kernel's epilogue for the [BLOCK_M, BLOCK_N] tile at (off_m, off_n), stored
    # through c_desc (TMA clips stores at the tensor's edge: no mask needed).
    BLOCK_M: tl.constexpr = acc.shape[0]
    BLOCK_N: tl.constexpr = acc.shape[1]
    offs_m = off_m + tl.arange(0, BLOCK_M)
    if EPILOGUE_SUBTILE:
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        up0, up1 = tl.split(tl.permute(tl.reshape(acc_up, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        offs_n0 = off_n + tl.arange(0, BLOCK_N // 2)
        out0 = _tile_epilogue(
            acc0, up0, offs_m, offs_n0, M, N, bias_ptr, u_bias_ptr, w_scale_ptr, u_scale_ptr, a_scale_ptr,
            c_scale_ptr, stride_wsn, stride_as, INT8_WEIGHT, GROUP_K, C_GROUP_N, HAS_BIAS, ACTIVATION, GATED,
            out_dtype, INTERPRETER,
        )  # fmt: skip
        c_desc.store([off_m, off_n], out0)
        out1 = _tile_epilogue(
            acc1, up1, offs_m, offs_n0 + BLOCK_N // 2, M, N, bias_ptr, u_bias_ptr, w_scale_ptr, u_scale_ptr,
            a_scale_ptr, c_scale_ptr, stride_wsn, stride_as, INT8_WEIGHT, GROUP_K, C_GROUP_N, HAS_BIAS, ACTIVATION,
            GATED, out_dtype, INTERPRETER,
        )  # fmt: skip
        c_desc.store([off_m, off_n + BLOCK_N // 2], out1)
    else:
        out = _tile_epilogue(
            acc, acc_up, offs_m, off_n + tl.arange(0, BLOCK_N), M, N, bias_ptr, u_bias_ptr, w_scale_ptr, u_scale_ptr,
            a_scale_ptr, c_scale_ptr, stride_wsn, stride_as, INT8_WEIGHT, GROUP_K, C_GROUP_N, HAS_BIAS, ACTIVATION,
            GATED, out_dtype, INTERPRETER,
        )  # fmt: skip
        c_desc.store([off_m, off_n], out)


def tma_split_k(args) -> int:
    """How many ways the TMA kernel splits K (configs opt in with MAX_SPLIT_K): enough
    work units to fill the SMs when the output has fewer tiles than there are SMs, at
    most MAX_SPLIT_K, with at least eight K tiles a share (on a 768x3072 MLP, shares of
    four to six K tiles ran slower than no split: the reduction's latency outweighs them)."""
    cap = args.get("MAX_SPLIT_K", 1)
    if cap <= 1:
        return 1
    tiles = triton.cdiv(args["M"], args["BLOCK_M"]) * triton.cdiv(args["N"], args["BLOCK_N"])
    k_tiles = triton.cdiv(args["K"], args["BLOCK_K"])
    return max(1, min(cap, args["NUM_SMS"] // tiles, k_tiles // 8))


def decode_split_k(args) -> int:
    """How many ways the decode kernel splits K: enough programs for about two per SM
    (GEMM2 of a decode step has few N tiles and a long K), keeping at least four K tiles
    per split for the pipeline to work with."""
    tiles_n = triton.cdiv(args["N"], args["BLOCK_N"])
    k_tiles = triton.cdiv(args["K"], args["BLOCK_K"])
    want = triton.cdiv(2 * args["NUM_SMS"], tiles_n)
    return max(1, min(want, k_tiles // 4))


@triton.jit
def gemm_decode_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr, u_ptr, u_bias_ptr, u_scale_ptr,
    partial_ptr, arrivals_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_b, stride_cm, stride_wsn, stride_wsg, stride_as,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GROUP_K: tl.constexpr,
    A_GROUP_K: tl.constexpr, C_GROUP_N: tl.constexpr, GATED: tl.constexpr, B_IS_NK: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    # Decode: M <= BLOCK_M rows, so the cost is streaming the weight once. Swap AB:
    # out^T = W @ a^T puts a weight tile (dequantized in registers if int8) on the MMA's
    # wide side and the few tokens on its narrow side. Program (pid_n, pid_k) covers
    # BLOCK_N outputs over the pid_k-th share of K; weight and activation tiles arrive
    # through TMA, several in flight.
    tl.static_assert(A_GROUP_K == 0 or A_GROUP_K == BLOCK_K, "per-group A scales take one group per K tile")
    INT8_WEIGHT: tl.constexpr = b_ptr.dtype.element_ty == tl.int8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = _weight_desc(b_ptr, N, K, stride_b, BLOCK_N, BLOCK_K, B_IS_NK)
    if GATED:  # the up weight: b's shape and strides
        u_desc = _weight_desc(u_ptr, N, K, stride_b, BLOCK_N, BLOCK_K, B_IS_NK)
    off_n = pid_n * BLOCK_N
    offs_n = off_n + tl.arange(0, BLOCK_N)
    cols = tl.where(offs_n < N, offs_n, 0)
    offs_m = tl.arange(0, BLOCK_M)
    rows = tl.where(offs_m < M, offs_m, 0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * k_per_split
    k_last = tl.minimum(k_first + k_per_split, k_tiles)

    acc, acc_up = _accumulators(a_ptr.dtype.element_ty, BLOCK_N, BLOCK_M, A_GROUP_K, GATED)
    for ki in range(k_first, k_last):
        a = a_desc.load([0, ki * BLOCK_K])
        acc = _tma_mma(b_desc, a, acc, off_n, ki, cols, rows, K, w_scale_ptr, a_scale_ptr, stride_wsn, stride_wsg,
                       stride_as, GROUP_K, BLOCK_K, A_GROUP_K, B_IS_NK, True, DOT_F32, INPUT_PRECISION)  # fmt: skip
        if GATED:
            acc_up = _tma_mma(u_desc, a, acc_up, off_n, ki, cols, rows, K, u_scale_ptr, a_scale_ptr, stride_wsn, stride_wsg,
                              stride_as, GROUP_K, BLOCK_K, A_GROUP_K, B_IS_NK, True, DOT_F32, INPUT_PRECISION)  # fmt: skip

    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        # the last split of this N tile to finish runs its epilogue on the sums
        last, total, total_up = _split_k_arrive(acc, acc_up, partial_ptr, arrivals_ptr, pid_n, pid_k, SPLIT_K, GATED)
        if last:
            out = _tile_epilogue(
                total.T, total_up.T, offs_m, offs_n, M, N, bias_ptr, u_bias_ptr, w_scale_ptr, u_scale_ptr, a_scale_ptr,
                c_scale_ptr, stride_wsn, stride_as, INT8_WEIGHT, GROUP_K, C_GROUP_N, HAS_BIAS, ACTIVATION, GATED,
                c_ptr.dtype.element_ty, INTERPRETER,
            )  # fmt: skip
            tl.store(c_ptrs, out, mask=c_mask)
    else:
        out = _tile_epilogue(
            acc.T, acc_up.T, offs_m, offs_n, M, N, bias_ptr, u_bias_ptr, w_scale_ptr, u_scale_ptr, a_scale_ptr,
            c_scale_ptr, stride_wsn, stride_as, INT8_WEIGHT, GROUP_K, C_GROUP_N, HAS_BIAS, ACTIVATION, GATED,
            c_ptr.dtype.element_ty, INTERPRETER,
        )  # fmt: skip
        tl.store(c_ptrs, out, mask=c_mask)


# ---------------------------------------------------------------------------------------
# Configs and autotuning
# ---------------------------------------------------------------------------------------
# A scheme's configs are three tables, one per kernel, keyed by m_bucket(M): for each
# bucket the configs written for it (the smallest key at or above the bucket, else
# "large"). The CPU interpreter gets one small config that makes odd test shapes cross
# several tiles in each dim.


def cfg(bm, bn, bk, warps, stages, group_m=8, **extra) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, **extra},
        num_warps=warps,
        num_stages=stages,
    )


_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}

# Hopper gives a block 227 KB of shared memory, less a little for barriers.
_SMEM_BUDGET = 226 * 1024


def _smem_bytes(config: triton.Config, a_bytes: int, b_bytes: int, gated: bool = False) -> int:
    """Estimated shared memory: the pipelined A and B tiles (gated: B and the up tile)
    plus the output staging tile."""
    kw = config.kwargs
    per_stage = kw["BLOCK_M"] * kw["BLOCK_K"] * a_bytes + kw["BLOCK_K"] * kw["BLOCK_N"] * b_bytes * (2 if gated else 1)
    return per_stage * config.num_stages + kw["BLOCK_M"] * kw["BLOCK_N"] * a_bytes


def autotune_enabled() -> bool:
    """GELUGEMM_AUTOTUNE=0 skips the search and takes each bucket's first config."""
    return os.environ.get("GELUGEMM_AUTOTUNE", "1") not in ("", "0")


def _config_key(c: triton.Config) -> tuple:
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages, c.maxnreg


def operand_scheme(a_dtype: torch.dtype, b_dtype: torch.dtype, a_group_k: int = 0) -> str:
    """Which config table a call tunes over: "float", "w8a16", "w8a8", or "w8a8-group" (an
    int8 a with one scale per row per a_group_k along K). A gated GEMM1 takes the
    scheme's "-gated" table (two accumulators: narrower tiles)."""
    if a_dtype == torch.int8:
        return "w8a8-group" if a_group_k else "w8a8"
    return "w8a16" if b_dtype == torch.int8 else "float"


def _gather_config(c: triton.Config) -> triton.Config:
    # For group sizes no tile depth divides: the per-element scale gather is staged in
    # shared memory like a weight tile, four bytes an element: smaller tiles, fewer stages.
    kwargs = {**c.kwargs, "BLOCK_K": min(c.kwargs["BLOCK_K"], 64), "BLOCK_N": min(c.kwargs["BLOCK_N"], 128)}
    return triton.Config(kwargs, num_warps=c.num_warps, num_stages=min(c.num_stages, 3), maxnreg=c.maxnreg)


def fit_groups(c: triton.Config, a_group_k: int, c_group_n: int) -> triton.Config:
    """c made to fit per-group activation scales: one A group per K tile (BLOCK_K =
    a_group_k), and an epilogue tile (BLOCK_N, or its half when subtiled) holding whole
    output groups of c_group_n columns. 0 leaves that side as it is."""
    kw = dict(c.kwargs)
    if a_group_k:
        kw["BLOCK_K"] = a_group_k
    if c_group_n:
        subtile = kw.get("EPILOGUE_SUBTILE", False)
        if (kw["BLOCK_N"] // (2 if subtile else 1)) % c_group_n:
            if subtile and kw["BLOCK_N"] % c_group_n == 0:
                kw["EPILOGUE_SUBTILE"] = False
            else:
                kw["BLOCK_N"] = c_group_n * (2 if subtile else 1)
    if kw == c.kwargs:
        return c
    return triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg)


def _unique(configs) -> list:
    return list({_config_key(c): c for c in configs}.values())


def _pruner(tables: dict, interpreter_extra: dict):
    # Bench only the configs written for this M bucket in the scheme's table, fitted to
    # per-group activation scales, those whose tiles fit shared memory, and, for group
    # weight scales, those whose K tile and group size divide one another (a few scale
    # loads per tile); when none does, shallow variants of the bucket's configs for the
    # gather. Under the interpreter: its one config, with the scheme's extras
    # (interpreter_extra: {scheme: {constexpr: value}}) and fitted to the groups.
    def prune(configs, named_args, **kwargs):
        a, b = _operand(named_args["a_ptr"]), _operand(named_args["b_ptr"])
        if kwargs.get("HOST_DESC"):
            # (no warp-specialized loop: triton 3.6 rejects its split stores to a host descriptor)
            keep = _prune(configs, a, b, named_args, kwargs)
            keep = [c for c in keep if not c.kwargs.get("WARP_SPECIALIZE")] or keep[:1]
            return [_for_host_descriptors(c) for c in keep]
        return _prune(configs, a, b, named_args, kwargs)

    def _prune(configs, a, b, named_args, kwargs):
        a_group_k = kwargs.get("A_GROUP_K", 0)
        c_group_n = kwargs.get("C_GROUP_N", 0)
        gated = bool(kwargs.get("GATED", False))
        scheme = operand_scheme(a.dtype, b.dtype, a_group_k)
        if interpreting():
            c = configs[0]
            extra = interpreter_extra.get(scheme, {})
            return [fit_groups(triton.Config({**c.kwargs, **extra}, num_warps=c.num_warps, num_stages=1), a_group_k, c_group_n)]
        table = tables[f"{scheme}-gated" if gated else scheme]
        bucket = named_args["M_BUCKET"]
        sizes = [k for k in table if k != "large" and k >= bucket]
        wanted = {_config_key(c) for c in (table[min(sizes)] if sizes else table["large"])}
        keep = _unique(fit_groups(c, a_group_k, c_group_n) for c in configs if _config_key(c) in wanted)
        # fp32 tiles take twice the shared memory of fp16 ones: drop configs that cannot fit.
        a_bytes, b_bytes = a.element_size(), b.element_size()
        fits = [c for c in keep if _smem_bytes(c, a_bytes, b_bytes, gated) <= _SMEM_BUDGET]
        keep = fits or sorted(keep, key=lambda c: _smem_bytes(c, a_bytes, b_bytes, gated))[:1]
        keep = keep if autotune_enabled() else keep[:1]
        group_k = kwargs.get("GROUP_K", named_args.get("GROUP_K", 0))
        if group_k:
            divides = [c for c in keep if group_k % c.kwargs["BLOCK_K"] == 0 or c.kwargs["BLOCK_K"] % group_k == 0]
            keep = divides or _unique(map(_gather_config, keep))
        return keep

    return prune


def _operand(x):
    # the tensor behind a host descriptor (TensorDescriptor.base), or the tensor
    return x.base if isinstance(x, TensorDescriptor) else x


def host_block_shapes(nargs: dict) -> None:
    """Set the block shapes of a TMA call's host descriptors (HOST_DESC) for the config in
    nargs (its BLOCK_M, BLOCK_N, BLOCK_K and EPILOGUE_SUBTILE, the weight's B_IS_NK), as the
    kernel would make them on the device: the autotuner's pre_hook."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    weight = [bn, bk] if nargs["B_IS_NK"] else [bk, bn]
    nargs["a_ptr"].block_shape = [bm, bk]
    nargs["b_ptr"].block_shape = weight
    if isinstance(nargs.get("u_ptr"), TensorDescriptor):
        nargs["u_ptr"].block_shape = list(weight)
    nargs["c_ptr"].block_shape = [bm, bn // 2 if nargs.get("EPILOGUE_SUBTILE") else bn]


def _for_host_descriptors(c: triton.Config) -> triton.Config:
    # c with the plain tile loop and the pre_hook that gives the descriptors its block shapes
    kwargs = {k: v for k, v in c.kwargs.items() if k != "WARP_SPECIALIZE"}
    return triton.Config(kwargs, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg,
                         pre_hook=host_block_shapes)  # fmt: skip


def _autotune_kwargs() -> dict:
    # Autotune results persist in Triton's cache dir where this Triton supports it, so a
    # second process skips the search.
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}


def _autotuned(body, tables: dict, key: list, heuristics: dict, interpreter_extra: dict | None = None, **interpreter_all):
    """`body` autotuned over every config of every scheme's table (once each), pruned per
    call to the scheme's configs for the call's M bucket. Under the interpreter: one small
    config, with interpreter_all for every scheme and interpreter_extra[scheme] for one."""
    if interpreting():
        # Triton's autotuner consults the pruner only when it holds more than one config:
        # a second (never chosen) makes it fit the one interpreter config to each call.
        configs = [triton.Config({**_INTERPRETER_CONFIG, **interpreter_all}, num_warps=w, num_stages=1) for w in (4, 1)]
    else:
        configs = _unique(c for table in tables.values() for cfgs in table.values() for c in cfgs)
    prune = _pruner(tables, interpreter_extra or {})
    tuned = triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, **_autotune_kwargs()
    )(triton.heuristics(heuristics)(body))
    tuned.prune = prune  # for sizing the split-K workspace from the configs a call may take
    return tuned


@dataclass(frozen=True)
class GemmKernels:
    """One scheme family's three autotuned kernels (the shared bodies, its own configs),
    the most rows its decode configs hold (every decode config of a bucket has BLOCK_M >=
    the bucket's largest M), and the rows "auto" sends to decode: up to decode_max_m for a
    weight of at most large_weight elements, up to large_weight_decode_max_m above it."""

    strided: object
    tma: object
    decode: object
    decode_max_m: int
    large_weight: int | None = None
    large_weight_decode_max_m: int | None = None

    def auto_decode_max_m(self, w: torch.Tensor) -> int:
        if self.large_weight is not None and w.numel() > self.large_weight:
            return self.large_weight_decode_max_m
        return self.decode_max_m


def gemm_kernels(strided: dict, tma: dict, decode: dict, decode_max_m: int, large_weight: int | None = None,
                 large_weight_decode_max_m: int | None = None) -> GemmKernels:  # fmt: skip
    """Build the three kernels from {scheme: table} for each path ("float", or "w8a16",
    "w8a8" and "w8a8-group", each with its "-gated" table; see operand_scheme)."""
    groups = ["GROUP_K", "A_GROUP_K", "C_GROUP_N", "GATED"]
    return GemmKernels(
        strided=_autotuned(
            gemm_strided_kernel, strided, ["M_BUCKET", "N", "K", "stride_bk", "stride_bn", *groups],
            {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0},
        ),  # fmt: skip
        # the interpreter runs the subtiled epilogue that most large-M configs use, w8a16's
        # swap-AB schedule, and split-K where a call has fewer tiles than its 4 programs
        tma=_autotuned(
            gemm_tma_kernel, tma, ["M_BUCKET", "N", "K", "B_IS_NK", *groups, "HOST_DESC"], {"SPLIT_K": tma_split_k},
            interpreter_extra={"w8a16": {"SWAP_AB": True}}, EPILOGUE_SUBTILE=True, MAX_SPLIT_K=4,
        ),  # fmt: skip
        decode=_autotuned(
            gemm_decode_kernel, decode, ["M_BUCKET", "N", "K", "B_IS_NK", *groups], {"SPLIT_K": decode_split_k},
            BLOCK_M=decode_max_m,
        ),  # fmt: skip
        decode_max_m=decode_max_m,
        large_weight=large_weight,
        large_weight_decode_max_m=large_weight_decode_max_m,
    )


# ---------------------------------------------------------------------------------------
# Operands, paths and plans
# ---------------------------------------------------------------------------------------


def triton_can_run(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, or on the CPU under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def check_shapes(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, layout, name: str = "weight",
                 bias_name: str = "bias", input_name: str = "input") -> tuple[int, int]:  # fmt: skip
    """The shape, type and device checks of a GEMM's operands, (K, N): `w` 2-D with K = a's
    last dim, `bias` None or a float [N] vector, all on a's device. The launchers' first check,
    and the op's torch backend's. `layout` is a kernels.schemes.WeightLayout."""
    try:
        return _check_shapes(a, w, bias, layout, name, bias_name, input_name)
    except AttributeError:  # not a tensor (a float bias, a list): said here, not found on the hot path
        for what, t in ((input_name, a), (name, w), (bias_name, bias)):
            if not isinstance(t, torch.Tensor) and not (t is None and what == bias_name):
                optional = " or None" if what == bias_name else ""
                raise LaunchError(f"{what} must be a torch.Tensor{optional}, got {type(t).__name__}") from None
        raise


def _check_shapes(a, w, bias, layout, name, bias_name, input_name) -> tuple[int, int]:
    if w.dim() != 2:
        raise LaunchError(f"{name} must be 2-D, got shape {tuple(w.shape)}")
    k, n = layout.kn_shape(w)
    if k == 0 or n == 0:
        raise LaunchError(f"{name} has an empty dim: {tuple(w.shape)}")
    if a.dim() < 1 or a.shape[-1] != k:
        raise LaunchError(
            f"{input_name}'s last dim is {a.shape[-1] if a.dim() else 'missing'} but {name} "
            f"{tuple(w.shape)} ({layout}) expects {k}"
        )
    if w.device != a.device:
        raise LaunchError(f"{input_name} is on {a.device} but {name} is on {w.device}")
    if bias is not None:
        if bias.shape != (n,):
            raise LaunchError(f"{bias_name} must have shape ({n},), got {tuple(bias.shape)}")
        if bias.device != a.device:
            raise LaunchError(f"{input_name} is on {a.device} but {bias_name} is on {bias.device}")
        if not bias.dtype.is_floating_point:
            raise LaunchError(f"{bias_name} must be floating point, got {bias.dtype}")
    return k, n


def check_operands(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, layout, name: str = "weight"):
    """Shape and device checks shared by every launcher (check_shapes), and that Triton can
    run on a's device; returns (K, N)."""
    k, n = check_shapes(a, w, bias, layout, name)
    if not triton_can_run(a.device):
        raise LaunchError(f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU); input is on {a.device}")
    return k, n


def check_up_operands(w, w_up, bias, up_bias, w_scale, up_scale) -> None:
    """A gated GEMM1's up projection must match the gate as the kernels read both: one set
    of strides for the two weights (two linears of one layout, or the halves of one
    concatenated weight), a bias each or neither, scales of one shape and strides."""
    if w_up.shape != w.shape or w_up.dtype != w.dtype or w_up.device != w.device:
        raise LaunchError(
            f"the up weight must have the gate weight's shape, dtype and device: gate {w.dtype} {tuple(w.shape)} on "
            f"{w.device}, up {w_up.dtype} {tuple(w_up.shape)} on {w_up.device}"
        )
    if w_up.stride() != w.stride():
        raise LaunchError(f"the up weight's strides {w_up.stride()} differ from the gate weight's {w.stride()}")
    if (bias is None) != (up_bias is None):
        raise LaunchError("a gated GEMM1 has a bias for gate and up, or for neither")
    if up_bias is not None:
        if up_bias.shape != bias.shape or up_bias.dtype != bias.dtype or up_bias.device != bias.device:
            raise LaunchError(f"the up bias must match the gate bias: {bias.dtype} {tuple(bias.shape)} on {bias.device}")
    if (w_scale is None) != (up_scale is None):
        raise LaunchError("an int8 gated GEMM1 needs scales for gate and up")
    if up_scale is not None and (up_scale.shape != w_scale.shape or up_scale.stride() != w_scale.stride()):
        raise LaunchError(
            f"the up weight's scales {tuple(up_scale.shape)} (strides {up_scale.stride()}) must match the gate's "
            f"{tuple(w_scale.shape)} (strides {w_scale.stride()})"
        )


def output_buffer(out: torch.Tensor | None, shape: tuple, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The [M, N] buffer a launcher writes: the caller's `out`, checked, or a new one."""
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=like.device)
        return out if len(shape) == 2 else out.reshape(-1, shape[-1])
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != like.device or not out.is_contiguous():
        raise LaunchError(
            f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {like.device}; "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out if out.dim() == 2 else out.reshape(-1, shape[-1])


def tensor_signature(t: torch.Tensor | None) -> tuple | None:
    """What a launch plan depends on in a tensor: shape, strides, dtype, device and
    16-byte alignment (which Triton specializes on)."""
    if t is None:
        return None
    try:
        return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0
    except AttributeError:  # not a tensor: no plan matches it, and planning's checks say what it is
        return ("not a tensor", type(t))


def _tma_supported(device: torch.device) -> bool:
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if device.type == "cpu":
        return interpreting()
    return device_capability(device)[0] >= 9


def _tma_aligned(t: torch.Tensor, major_stride: int) -> bool:
    return t.data_ptr() % 16 == 0 and (major_stride * t.element_size()) % 16 == 0


def _path(kernels: GemmKernels, path: str, m: int, a: torch.Tensor, w: torch.Tensor, stride_bk: int, stride_bn: int,
          out_aligned: bool, w_up: torch.Tensor | None = None) -> str:  # fmt: skip
    """The path a call takes: decode (few rows) or tma where TMA can take the operands,
    else strided; a path asked for by name is checked. w_up: a gated GEMM1's up weight
    (w's strides), whose start must be aligned too (the second half of a concatenated
    weight starts d_ff elements in)."""
    major = stride_bn if stride_bk == 1 else stride_bk
    tma_ok = (
        _tma_supported(a.device)
        and a.stride(-1) == 1
        and (stride_bk == 1 or stride_bn == 1)
        and _tma_aligned(a, a.stride(0))
        and _tma_aligned(w, major)
        and (w_up is None or _tma_aligned(w_up, major))
        and out_aligned
    )
    if path in ("tma", "decode") and not tma_ok:
        raise LaunchError(
            f"the {path} path needs TMA: an SM90+ GPU, unit inner strides and 16-byte aligned rows "
            "(int8 rows: a multiple of 16 elements; fp16/bf16 rows: a multiple of 8; fp32: 4)"
        )
    if path == "decode" and m > kernels.decode_max_m:
        raise LaunchError(f"the decode path takes at most {kernels.decode_max_m} rows, got {m}")
    if path == "auto":
        path = ("decode" if m <= kernels.auto_decode_max_m(w) else "tma") if tma_ok else "strided"
    return path


_split_k_workspaces: dict = {}


def _split_k_workspace(device: torch.device, partial_elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partial sums, int32 arrival counters) for split-K decode.

    One pair per device and stream, kept between launches: launches on one stream run in
    order and each leaves its counters at zero, so the buffers need no clearing."""
    stream = torch._C._cuda_getCurrentRawStream(device.index or 0) if device.type == "cuda" else 0
    key = (device, stream)
    partial, arrivals = _split_k_workspaces.get(key, (None, None))
    if partial is None or partial.numel() < partial_elems:
        partial = torch.empty(max(partial_elems, 1 << 16), dtype=torch.float32, device=device)
    if arrivals is None or arrivals.numel() < tiles:
        arrivals = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    _split_k_workspaces[key] = (partial, arrivals)
    return partial, arrivals


@dataclass(frozen=True)
class GemmPlan:
    """How one call signature launches: kernel, grid, runtime scalars, compile-time args,
    launch-cache key, the split-K workspace size, and launch's direct-launch slot."""

    path: str
    kernel: object
    grid: object
    scalars: tuple  # the runtime ints after the tensor arguments
    constexprs: dict
    key: tuple
    workspace: tuple | None  # (partial elements, tiles) for split-K (decode and tma; None: strided)
    slot: list = field(default_factory=lambda: [None])
    # where no config of the call splits K (workspace (0, 0)): the buffers passed for the
    # kernel's workspace arguments, which it never reads, kept so a launch skips the lookup
    idle_workspace: list = field(default_factory=lambda: [None])


def _plan(
    kernels: GemmKernels,
    a: torch.Tensor,
    w: torch.Tensor,
    c_row_stride: int,
    layout,
    *,
    path: str,
    out_aligned: bool,
    has_bias: bool,
    activation: str,
    group_k: int = 0,
    a_group_k: int = 0,
    c_group_n: int = 0,
    scale_strides: tuple[int, int, int] = (0, 0, 0),
    input_precision: str = "ieee",
    key: tuple = (),
    w_up: torch.Tensor | None = None,
) -> GemmPlan:
    """The launch plan for a = [M, K] (unit or any strides) times the weight w stored in
    `layout` (a WeightLayout), into a [M, N] output with rows c_row_stride apart.

    out_aligned: the output is 16-byte aligned with 16-byte aligned rows (TMA can store it).
    group_k: the int8 weight's group size along K (0: per channel, or a float weight).
    a_group_k: an int8 a's scales are per row per a_group_k along K (0: per row or one).
    c_group_n: an int8 output is requantized per row per c_group_n columns, its scales
        written by the kernel (0: with the one c_scale given).
    scale_strides: (w_scale's along N, w_scale's along the groups, a_scale's along M).
    key: what else selects the compiled kernel (dtypes of the tensors the kernel reads).
    w_up: a gated GEMM1's up weight (w's shape, dtype and strides), or None.
    """
    m, k = a.shape
    n = layout.kn_shape(w)[1]
    stride_bk, stride_bn = layout.kn_strides(w)
    caller_key = key
    path = _path(kernels, path, m, a, w, stride_bk, stride_bn, out_aligned, w_up)
    gated = w_up is not None
    constexprs = dict(
        HAS_BIAS=has_bias,
        ACTIVATION=activation,
        GROUP_K=group_k,
        A_GROUP_K=a_group_k,
        C_GROUP_N=c_group_n,
        GATED=gated,
        # bf16 under the CPU interpreter: see _dot and _weight_tile
        DOT_F32=interpreting() and a.dtype == torch.bfloat16,
        INPUT_PRECISION=input_precision,
        INTERPRETER=interpreting(),
    )
    key = (path, a.dtype, w.dtype, m, n, k, a.stride(0), a.stride(1), stride_bk, stride_bn, c_row_stride,
           scale_strides, activation, group_k, a_group_k, c_group_n, input_precision, gated, *key)  # fmt: skip
    head = (m, n, k, m_bucket(m))
    if path == "strided":

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        scalars = (*head, a.stride(0), a.stride(1), stride_bk, stride_bn, c_row_stride, *scale_strides)
        return GemmPlan(path, kernels.strided, grid, scalars, constexprs, key, None)

    b_is_nk = stride_bk == 1
    sms = num_programs(a.device)
    scalars = (*head, a.stride(0), stride_bn if b_is_nk else stride_bk, c_row_stride, *scale_strides)
    constexprs.update(B_IS_NK=b_is_nk, NUM_SMS=sms)
    # The split-K workspace, sized for the largest layout among the configs autotuning may
    # pick for this call: BLOCK_M * BLOCK_N fp32 partial sums per share of each output
    # tile (gated: two), and an arrival counter per tile.
    kernel = kernels.tma if path == "tma" else kernels.decode
    named = dict(a_ptr=a, b_ptr=w, M_BUCKET=m_bucket(m), GROUP_K=group_k)
    configs = kernel.prune(kernel.configs, named, GROUP_K=group_k, A_GROUP_K=a_group_k, C_GROUP_N=c_group_n, GATED=gated)
    split_k = tma_split_k if path == "tma" else decode_split_k
    partial_elems, tiles = 0, 0
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        tiles_c = triton.cdiv(n, bn) * (triton.cdiv(m, bm) if path == "tma" else 1)
        splits = split_k(dict(c.kwargs, M=m, N=n, K=k, NUM_SMS=sms))
        if splits > 1:
            partial_elems = max(partial_elems, tiles_c * bm * bn * splits * (2 if gated else 1))
            tiles = max(tiles, tiles_c)
    workspace = (partial_elems, tiles)

    if path == "tma":

        def grid(meta):
            tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
            return (min(sms, tiles * meta["SPLIT_K"]),)

        # descriptors made on the host, for 16-bit and int8 operands (fp32 keeps the device's)
        host = HOST_DESCRIPTORS and a.dtype != torch.float32
        constexprs["HOST_DESC"] = f"{a.dtype}/{w.dtype}/{caller_key}" if host else ""
        return GemmPlan(path, kernels.tma, grid, scalars, constexprs, (*key, constexprs["HOST_DESC"]), workspace)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    return GemmPlan(path, kernels.decode, grid, scalars, constexprs, key, workspace)


# Descriptors made on the host for the TMA kernel (HOST_DESC), for 16-bit and int8 operands.
# Off unless GELUGEMM_HOST_DESCRIPTORS=1: through the op they saved 0-7 us of GPU time a MLP
# (and lost up to 3 in some rows), while Triton's encoding of three descriptors at every
# launch took a TMA GEMM call's host time from 21.8 to 57.9 us (H100, bench/RESULTS.md
# section 23). Read when a call signature's launch plan is made.
HOST_DESCRIPTORS = os.environ.get("GELUGEMM_HOST_DESCRIPTORS", "0") not in ("", "0")


def _host_descriptors(plan: GemmPlan, a2, w, out2, w_up) -> tuple:
    """(a, w, out, w_up) as TensorDescriptors for a HOST_DESC plan, with the shapes and
    strides the kernel would give its own. Their block shapes matter only where Triton
    specializes the call (the launch through the autotuner, whose pre_hook sets the
    config's: host_block_shapes): a direct launch runs the kept compiled kernel, and
    Triton's launcher encodes each descriptor with that kernel's block shape (triton 3.6,
    backends/nvidia/driver.py make_tensordesc_arg), not the object's."""
    m, n, k = plan.scalars[:3]
    stride_am, stride_b, stride_cm = plan.scalars[4:7]
    b_is_nk = plan.constexprs["B_IS_NK"]
    w_shape = [n, k] if b_is_nk else [k, n]
    square = [16, 16]  # a placeholder of the right rank
    return (
        TensorDescriptor(a2, [m, k], [stride_am, 1], square),
        TensorDescriptor(w, w_shape, [stride_b, 1], square),
        TensorDescriptor(out2, [m, n], [stride_cm, 1], square),
        None if w_up is None else TensorDescriptor(w_up, w_shape, [stride_b, 1], square),
    )


class GemmLauncher:
    """A scheme family's kernels and its launch plans, one per call signature.

    `run` computes the signature of its arguments (shapes, strides, dtypes, devices,
    16-byte alignment, options: everything the checks and the plan depend on); the first
    call with a signature runs the checks and builds the plan, later ones skip both and
    launch the compiled kernel directly through the plan's slot (kernels/launch.py)."""

    def __init__(self, kernels: GemmKernels):
        self.kernels = kernels
        self.plans: dict = {}

    def run(
        self,
        check: Callable[[WeightLayout], tuple[int, int]],
        options: tuple,
        a: torch.Tensor,
        w: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        weight_layout: str | WeightLayout,
        activation: str,
        path: str,
        out: torch.Tensor | None,
        out_dtype: torch.dtype,
        w_scale: torch.Tensor | None = None,
        a_scale: torch.Tensor | None = None,
        c_scale: torch.Tensor | None = None,
        group_k: int = 0,
        a_group_k: int = 0,
        c_group_n: int = 0,
        input_precision: str = "ieee",
        w_up: torch.Tensor | None = None,
        up_bias: torch.Tensor | None = None,
        up_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """epilogue(a @ W) for a of shape [..., K] and the weight w (float, or int8 with
        w_scale) stored in `weight_layout`; returns [..., N] in out_dtype. With w_up (a gated
        GEMM1): GELU(a @ W + bias) * (a @ Wup + up_bias), w_up with w's shape, dtype and
        strides, up_scale its scales (w_scale's shape and strides).

        check(layout) -> (K, N): the caller's checks of its arguments, run on a new signature.
        options: every argument other than the tensors that the checks or the plan depend
            on (the caller's options, which decide weight_layout, activation, path,
            out_dtype, group_k, a_group_k, c_group_n and input_precision), for the signature.
        a_scale: an int8 a's float32 scale, one per row ([M]) or one element; with
            a_group_k, one per row per a_group_k along K ([..., cdiv(K, a_group_k)],
            contiguous).
        c_scale: the one-element scale an int8 output is requantized with; with c_group_n,
            the contiguous [..., cdiv(N, c_group_n)] buffer the kernel writes the output's
            per-group scales into.
        """
        # Written out flat: this runs on every call, and each microsecond of host time
        # shows in a decode step.
        signature = (
            a.shape, a.stride(), a.dtype, a.device, a.data_ptr() % 16 == 0,
            w.shape, w.stride(), w.dtype, w.device, w.data_ptr() % 16 == 0,
            None if bias is None else tensor_signature(bias),
            None if w_scale is None else tensor_signature(w_scale),
            None if a_scale is None else tensor_signature(a_scale),
            None if c_scale is None else tensor_signature(c_scale),
            options,
            None if w_up is None else (tensor_signature(w_up), tensor_signature(up_bias), tensor_signature(up_scale)),
        )  # fmt: skip
        plan = self.plans.get(signature)
        if plan is None or out is not None:
            layout = WeightLayout.parse(weight_layout)
            if activation not in ACTIVATIONS:
                raise LaunchError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
            if path not in PATHS:
                raise LaunchError(f"path must be 'auto', 'tma', 'decode' or 'strided', got {path!r}")
            k, n = check(layout)
            if w_up is not None:
                check_up_operands(w, w_up, bias, up_bias, w_scale, up_scale)
        else:
            n, k = plan.scalars[1], plan.scalars[2]
        # A reshape costs microseconds of host time even as a no-op: 2-D tensors skip it
        # (else a view where strides allow; the kernels take any row stride).
        flat = a.dim() == 2
        a2 = a if flat else a.reshape(-1, k)
        if a_scale is not None and a_scale.dim() != (2 if a_group_k else 1):
            a_scale = a_scale.reshape(-1, a_scale.shape[-1]) if a_group_k else a_scale.reshape(-1)
        out2 = output_buffer(out, (*a.shape[:-1], n), a, out_dtype)
        if a2.shape[0] == 0:
            return out2.reshape(*a.shape[:-1], n)
        # TMA stores need a 16-byte aligned output with 16-byte aligned rows. One we allocate
        # has rows of n elements: aligned unless n is not (n * element size % 16, e.g. d_model
        # = 20 in fp16). A caller's may not be. An unaligned output takes a plan of its own
        # (the strided path) that is not kept.
        out_aligned = out2.data_ptr() % 16 == 0 and (n * out2.element_size()) % 16 == 0
        if plan is None or not out_aligned:
            stride_as = 0 if a_scale is None or (a_scale.numel() == 1 and not a_group_k) else a_scale.stride(0)
            w_scale_strides = (0, 0) if w_scale is None else (w_scale.stride(0), w_scale.stride(1) if group_k else 0)
            plan = _plan(
                self.kernels, a2, w, n, layout, path=path, out_aligned=out_aligned, has_bias=bias is not None,
                activation=activation, group_k=group_k, a_group_k=a_group_k, c_group_n=c_group_n,
                scale_strides=(*w_scale_strides, stride_as),
                input_precision=input_precision, key=(out_dtype, None if bias is None else bias.dtype), w_up=w_up,
            )  # fmt: skip
            if out_aligned:
                self.plans[signature] = plan
        if plan.path != "strided":
            ensure_tma_allocator()
        if plan.constexprs.get("HOST_DESC"):
            a2, w_arg, out_arg, up_arg = _host_descriptors(plan, a2, w, out2, w_up)
        else:
            w_arg, out_arg, up_arg = w, out2, w_up
        tensors = (a2, w_arg, out_arg, bias, w_scale, a_scale, c_scale, up_arg, up_bias, up_scale)
        if plan.workspace is None:
            args = (*tensors, *plan.scalars)
        elif plan.workspace[0] == 0:
            workspace = plan.idle_workspace[0]
            if workspace is None:
                workspace = plan.idle_workspace[0] = _split_k_workspace(a.device, 0, 0)
            args = (*tensors, *workspace, *plan.scalars)
        else:
            args = (*tensors, *_split_k_workspace(a.device, *plan.workspace), *plan.scalars)
        launch(plan.kernel, plan.grid, args, plan.constexprs, plan.key, slot=plan.slot if out_aligned else None)
        return out2 if flat else out2.reshape(*a.shape[:-1], n)
