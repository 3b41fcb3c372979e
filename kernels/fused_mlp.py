"""The whole MLP in one launch, for small float models (up to 1024 rows) and for int8 (w8a8,
w8a16) at few rows:

    y = GELU(x @ W1^T + b1) @ W2^T + b2

At 768x3072 (BERT-base, ViT-B, GPT-2 small) each GEMM is a few microseconds of GPU work,
so two launches, two ramp-ups and two tails cost as much as the math, and from Python a
Triton launch costs more host time than the MLP takes on the GPU. Here one persistent
grid walks two lists of work units:

- GEMM1 units, one per [BLOCK_M, BLOCK_F] tile of h = GELU(x @ W1^T + b1): each stores
  its tile (rounded to x's dtype, as the two-launch path stores h) to a workspace and
  counts itself into its row block's `ready` counter (release);
- GEMM2 units, one per share of a [BLOCK_M, BLOCK_D] tile of y, K = d_ff split SPLIT_F
  ways so that the narrow output still fills the SMs: each waits until its row block's
  h is complete (acquire), multiplies it by W2, and the last share of a tile adds the
  partial sums and runs the epilogue (kernels/gemm_base.py's serial split-K).

Every program takes its units in order, GEMM1 units first, and the grid is at most one
program per SM: a program only waits once its own GEMM1 units are done, for units that
programs already resident are working on. (The CPU interpreter runs programs one after
the other, so it gets one program: it does every GEMM1 unit, then every GEMM2 unit.)
That needs every program resident at once, as a persistent grid of one program per SM
assumes: where the process gets fewer SMs than the device has (an MPS client with a low
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, an SM partition), waiting programs could hold the SMs
that the rest need. GELUGEMM_FUSED_MLP=0 turns this path off (the two GEMM launches run);
so does CUDA_MPS_ACTIVE_THREAD_PERCENTAGE below 100 in the environment.
The counters are left at zero for the next launch: the last GEMM2 unit of a row block to
read h resets them.

Loads are pointer loads (either weight layout, any strides); h travels through L2
(`.cg`: never a stale L1 line).

w8a8 `dynamic` (fused_w8a8_mlp) runs the same units with int8 weights on the int8 tensor
cores: a GEMM1 unit takes the absmax of its rows of x (after the SmoothQuant division) in a
first pass and quantizes each K step of x as it loads it; its epilogue stores h in x's dtype,
as the four launches do, and folds each row's absmax of h into absmax[row] (an atomic max,
before the release); a GEMM2 unit reads its rows' absmax once the row block is complete and
quantizes each K step of h as it loads it. The last reader of a row block zeroes its absmax
with its counters. The arithmetic is kernels/w8a8.py's, so the result equals the four
launches' (kernels/reference.py's w8a8_mlp_reference).

w8a8 `static` and `group:G` (fused_w8a8_mlp's activations) keep h int8 in the workspace, as
their three launches do: static quantizes x with w1.input_scale and requantizes h with
w1.output_scale; group makes each K step one group of G columns, whose int32 product is
added into a float32 sum times the rows' group scales, and GEMM1 writes h's per-(row, group)
scales beside it for GEMM2. (The op sends group here for small weights only, where it was
timed ahead: FUSED_W8A8_OP_SCHEMES.)

w8a16 (fused_w8a16_mlp) runs the float units with int8 weights: each weight tile is
dequantized in registers as kernels/w8a16.py's two launches dequantize it (a per-group scale
on the tile, a per-channel one in the epilogue), so the result is theirs up to the order of
GEMM2's split sums.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.errors import LaunchError
from kernels.gemm_base import (
    INT8_MAX_F32,
    SCALE_EPS_F32,
    _config_key,
    _dot,
    _epilogue,
    _split_k_arrive,
    _to_output,
    _unique,
    _weight_tile,
    gelu,
    round_to_int8,
    tensor_signature,
)
from kernels.int8_gemm import check_weight_scales
from kernels.launch import interpreting, launch, num_programs
from kernels.quantized import QuantizedWeight
from kernels.schemes import ACTIVATION_DTYPES, FLOAT_DTYPES, GELU_FLAVOURS, ActivationScheme, WeightLayout
from kernels.w8a8 import check_group_size, check_scalar_scale

# The op runs the MLP in this one launch for float weights of at most FUSED_MAX_WEIGHT
# elements each (1024x4096 and smaller) and at most FUSED_MAX_M rows; larger ones take the
# two GEMM launches. On an H200 (bench/RESULTS.md sections 16 and 18) at 768x3072 it ran
# 11-14 us up to 128 rows (1.1-1.35x eager), and from 256 to 1024 rows 18-35 us against the
# two launches' 29-35 (eager 16-26); at 384x1536 and 1024x4096 it led the two launches too.
FUSED_MAX_WEIGHT = 1 << 22
FUSED_MAX_M = 1024
# w8a8 `dynamic` (fused_w8a8_mlp): its four launches (quantize x, GEMM1, quantize h, GEMM2)
# cost more host time than a decode step's GPU time even at 4096x16384; the one launch is
# as fast on the GPU up to 16 rows there and up to 128 on small models. H200, us, graph
# (bench/probe_fused.py --dtype w8a8, bench/RESULTS.md section 17): 4096x16384 M=1, 16: one
# 60.0, 57.6, four 61.0, 61.6; M=32-128: one 147-208, four 59-71. 768x3072 M=1-128: one
# 14.3-23.4, four 17.2-27.2.
FUSED_W8A8_MAX_WEIGHT = 1 << 26  # weights of 4096x16384 and smaller
# Weights of more than FUSED_MAX_WEIGHT elements run it up to the largest row bucket of the
# scheme's large-weight configs (FUSED_W8A8_MAX_M, FUSED_W8A16_MAX_M, below the tables) ...
# ... and only where the pinned decode config (FUSED_W8A8_LARGE_CONFIGS) gives each GEMM about
# an H100's or H200's SM count of units (132), as at 4096x16384: at 2048x8192 it would give
# 64, half the SMs streaming weights (not measured; the four launches run there).
FUSED_W8A8_MIN_UNITS = 96
FUSED_W8A8_SMALL_MAX_M = 128  # weights of at most FUSED_MAX_WEIGHT elements
# w8a16 (fused_w8a16_mlp): the same bounds as w8a8, but up to 64 rows at large weights. At
# 768x3072 the one launch ran 11-18 us up to 128 rows against the two launches' 24-43
# (0.92-1.30x fp16 eager); at 4096x16384 55.6-57.5 us at M <= 16 against 77-78, 83 and 107 us
# at M = 32 and 64 against 139 and 169, and 206 at M = 128 against 124
# (bench/probe_fused_configs.py, bench/RESULTS.md sections 18 and 19).
FUSED_W8A16_SMALL_MAX_M = 128
# The w8a8 activation schemes the op runs in this one launch (ActivationScheme.kind), and
# those of them that take it for weights above FUSED_MAX_WEIGHT elements too. H200, graph,
# us, one launch against the scheme's three (bench/probe_fused_configs.py, section 22):
# static at 768x3072 M=1-128 10.3-17.8 against 14.0-25.1, at 4096x16384 M=1 and 16 55.8
# and 44.5 against 56.1 and 55.6; group:128 at 768x3072 14.0-22.8 against 16.3-43.0, but at
# 4096x16384 M=1 76.2 against 57.5 (its K step is one group, 128 deep) and at M=16 57.7
# against 56.9. From Python the one launch costs 36-44 us of host time a call where the
# three cost 133-162 (bench/probe_overhead.py).
FUSED_W8A8_OP_SCHEMES = ("dynamic", "static", "group")
FUSED_W8A8_LARGE_WEIGHT_SCHEMES = ("dynamic", "static")


@triton.jit
def _x_tile(x_ptr, smooth_ptr, rows, offs_k, D, stride_xm, stride_xk, W8A8: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    # x[rows, offs_k] as loaded, or for w8a8 in float32 divided by the SmoothQuant scale
    # (div_rn, as kernels/w8a8.py's quantizer divides: Triton's "/" is approximate on the GPU)
    a = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=offs_k[None, :] < D, other=0.0)
    if W8A8:
        a = a.to(tl.float32)
        if HAS_SMOOTH:
            a = tl.math.div_rn(a, tl.load(smooth_ptr + offs_k, mask=offs_k < D, other=1.0)[None, :])
    return a


@triton.jit
def _row_scale(absmax):
    # dynamic per-token scale = max(absmax / 127, SCALE_EPS): kernels/int8.py's scale_from_absmax
    return tl.maximum(tl.math.div_rn(absmax, INT8_MAX_F32), SCALE_EPS_F32)


@triton.jit
def _w8a8_out(acc, a_scale, offs_m, offs_n, M, N, w_scale_ptr, stride_ws, bias_ptr, c_scale_ptr,
              A_PER_ROW: tl.constexpr, C_GROUP_N: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
              OUT_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):  # fmt: skip
    # acc * a_scale (per row where A_PER_ROW, else one) * w_scale[n] + bias[n], then GELU, in
    # this order (kernels/gemm_base.py's _dequantize), stored in OUT_DTYPE (int8: requantized
    # with c_scale, or per group of C_GROUP_N columns with the scales written to c_scale:
    # _to_output). A float32 acc (group's) carries a's scales already.
    out = acc.to(tl.float32)
    if acc.dtype == tl.int32:
        if A_PER_ROW:
            out = out * a_scale[:, None]
        else:
            out = out * a_scale
    out = out * tl.load(w_scale_ptr + offs_n * stride_ws, mask=offs_n < N, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    out = gelu(out, ACTIVATION, INTERPRETER)
    return _to_output(out, offs_m, offs_n, M, N, c_scale_ptr, C_GROUP_N, OUT_DTYPE, INTERPRETER)


@triton.jit
def _group_dot(a, b, acc, scale):
    # w8a8 group:G, one group per K step: the step's exact int32 product promoted into the
    # float32 accumulator times its rows' group scales (kernels/gemm_base.py's _mma)
    return acc + tl.dot(a, b, out_dtype=tl.int32).to(tl.float32) * scale[:, None]


@triton.jit
def _gemm1_unit(x_ptr, w1_ptr, b1_ptr, h_ptr, ready_ptr, w1_scale_ptr, smooth_ptr, absmax_ptr, x_scale_ptr, h_scale_ptr,
                pid_m, pid_f, M, D, F, stride_xm, stride_xk, stride_w1k, stride_w1n, stride_w1s, stride_w1sg,
                HAS_B1: tl.constexpr, ACTIVATION: tl.constexpr, W8A8: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                STATIC: tl.constexpr, A_GROUP: tl.constexpr, W8A16: tl.constexpr, GROUP_K: tl.constexpr,
                DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # h[rows, cols] = GELU(x[rows] @ W1[cols]^T + b1[cols]); then counted into ready[pid_m].
    # w8a8, x quantized as kernels/w8a8.py's quantize_activations does it, per scheme:
    #   dynamic  per token (a pass for each row's absmax, then each K step quantized as it
    #            is loaded); h stored in x's dtype, each row's absmax of it folded into
    #            absmax[row], from which GEMM2 quantizes h;
    #   static   with the one calibrated scale (x_scale); h requantized to int8 with the
    #            calibrated h_scale;
    #   group    per token per A_GROUP columns (a K step is one group: its scale from its own
    #            absmax); h requantized per token per A_GROUP columns, the scales written
    #            to h_scale [M, cdiv(F, A_GROUP)].
    # w8a16: each int8 weight tile dequantized in registers (kernels/gemm_base.py's
    # _weight_tile: per group on the tile, per channel in the epilogue), as the two w8a16
    # launches do. Float and w8a16: h stored in x's dtype.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.where(offs_m < M, offs_m, 0)
    cols = tl.where(offs_f < F, offs_f, 0)
    DYNAMIC: tl.constexpr = W8A8 and not STATIC and A_GROUP == 0
    if DYNAMIC:
        absmax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            a = _x_tile(x_ptr, smooth_ptr, rows, k0 + offs_k, D, stride_xm, stride_xk, True, HAS_SMOOTH)
            absmax = tl.maximum(absmax, tl.abs(a))
        x_scale = _row_scale(tl.max(absmax, axis=1))
        inv_x_scale = tl.math.div_rn(1.0, x_scale)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.int32)
    elif STATIC:
        x_scale = tl.load(x_scale_ptr)
        inv_x_scale = tl.math.div_rn(1.0, x_scale)
        acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.int32)
    else:
        # float, w8a16, and w8a8 group (the scales promoted into it every K step)
        x_scale = 1.0  # (not read)
        acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_in = (k0 + offs_k) < D
        a = _x_tile(x_ptr, smooth_ptr, rows, k0 + offs_k, D, stride_xm, stride_xk, W8A8, HAS_SMOOTH)
        b = tl.load(w1_ptr + (k0 + offs_k)[:, None] * stride_w1k + cols[None, :] * stride_w1n, mask=k_in[:, None],
                    other=0.0)  # fmt: skip
        if A_GROUP > 0:
            group_scale = _row_scale(tl.max(tl.abs(a), axis=1))
            a = round_to_int8(a * tl.math.div_rn(1.0, group_scale)[:, None])
            acc = _group_dot(a, b, acc, group_scale)
        else:
            if W8A8:
                a = round_to_int8(a * inv_x_scale)
            if W8A16:
                b = _weight_tile(b, a, w1_scale_ptr, k0, cols, D, stride_w1s, stride_w1sg, GROUP_K, BLOCK_K, 0, DOT_F32)
            acc = _dot(a, b, acc, DOT_F32, INPUT_PRECISION)
    h_mask = (offs_m[:, None] < M) & (offs_f[None, :] < F)
    if W8A8:
        h = _w8a8_out(acc, x_scale, offs_m, offs_f, M, F, w1_scale_ptr, stride_w1s, b1_ptr, h_scale_ptr, DYNAMIC,
                      A_GROUP, HAS_B1, ACTIVATION, h_ptr.dtype.element_ty, INTERPRETER)  # fmt: skip
        if DYNAMIC:
            # h is quantized per token over all of d_ff, at 16 bits as stored (kernels/w8a8.py's
            # dynamic scheme): absmax starts at zero, every value folded in is >= 0
            magnitude = tl.where(h_mask, tl.abs(h.to(tl.float32)), 0.0)
            tl.atomic_max(absmax_ptr + offs_m, tl.max(magnitude, axis=1), mask=offs_m < M, sem="relaxed")
    else:
        h = _epilogue(acc, offs_m, offs_f, M, F, b1_ptr, w1_scale_ptr, None, None, stride_w1s, 0, W8A16, GROUP_K, 0,
                      HAS_B1, ACTIVATION, h_ptr.dtype.element_ty, INTERPRETER)  # fmt: skip
    tl.store(h_ptr + offs_m[:, None] * F + offs_f[None, :], h, mask=h_mask)
    # every thread's stores (and absmax atomics, group scales) before the one release that
    # publishes them
    tl.debug_barrier()
    tl.atomic_add(ready_ptr + pid_m, 1, sem="release")


# M is not specialized: Triton compiles a separate kernel for M == 1, and with the erf GELU
# that one ran the w8a8 decode MLP at 4096x16384 in 79-80 us against 59-60 at M = 2 (H200,
# bench/RESULTS.md section 18). M only bounds rows and masks; nothing gains from its value.
@triton.jit(do_not_specialize=["M"])
def fused_mlp_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr, h_ptr, partial_ptr, counters_ptr,
    w1_scale_ptr, w2_scale_ptr, smooth_ptr, absmax_ptr, x_scale_ptr, h_scale_ptr,
    M, D, F, M_BUCKET, NUM_PROGRAMS,
    stride_xm, stride_xk, stride_w1k, stride_w1n, stride_w2k, stride_w2n, stride_ym, stride_w1s, stride_w2s,
    stride_w1sg, stride_w2sg,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACTIVATION: tl.constexpr, W8A8: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, STATIC: tl.constexpr, A_GROUP: tl.constexpr, W8A16: tl.constexpr, GROUP_K: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_F: tl.constexpr,
):  # fmt: skip
    # x [M, D]; W1 as [K = D, N = F] through (stride_w1k, stride_w1n), W2 as [K = F, N = D]
    # (either layout); h [M, F] contiguous, the workspace; counters: ready[row blocks],
    # consumed[row blocks], then the split-K arrivals of each y tile. w8a8: int8 weights with
    # per-channel scales (w1_scale, w2_scale), x divided by smooth where HAS_SMOOTH; dynamic:
    # absmax [M] float32, each row's h absmax, zero between launches; static (STATIC): the
    # calibrated one-element x_scale and h_scale, h int8; group (A_GROUP = G): h int8 with
    # its scales in h_scale [M, cdiv(F, G)], BLOCK_K = G and BLOCK_F a multiple of it. w8a16:
    # int8 weights with per-channel ([N], stride_w*s) or per-group scales ([N, K / GROUP_K],
    # strides stride_w*s and stride_w*sg).
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_f = tl.cdiv(F, BLOCK_F)
    num_pid_d = tl.cdiv(D, BLOCK_D)
    units1 = num_pid_m * num_pid_f
    units = units1 + num_pid_m * num_pid_d * SPLIT_F
    ready_ptr = counters_ptr
    consumed_ptr = counters_ptr + num_pid_m
    arrivals_ptr = counters_ptr + 2 * num_pid_m
    k_tiles = tl.cdiv(F, BLOCK_K)
    DYNAMIC: tl.constexpr = W8A8 and not STATIC and A_GROUP == 0
    k_per_split = tl.cdiv(k_tiles, SPLIT_F)
    offs_k = tl.arange(0, BLOCK_K)
    for unit in range(tl.program_id(0), units, NUM_PROGRAMS):
        if unit < units1:
            # row-block-major: the first row block's h completes first
            _gemm1_unit(x_ptr, w1_ptr, b1_ptr, h_ptr, ready_ptr, w1_scale_ptr, smooth_ptr, absmax_ptr, x_scale_ptr,
                        h_scale_ptr, unit // num_pid_f, unit % num_pid_f, M, D, F, stride_xm, stride_xk, stride_w1k,
                        stride_w1n, stride_w1s, stride_w1sg, HAS_B1, ACTIVATION, W8A8, HAS_SMOOTH, STATIC, A_GROUP,
                        W8A16, GROUP_K, DOT_F32, INPUT_PRECISION, INTERPRETER, BLOCK_M, BLOCK_F, BLOCK_K)  # fmt: skip
        else:
            # the shares of one y tile are consecutive units: they run at once, and the
            # last one's reads of the others' partials hit L2
            tile_id = (unit - units1) // SPLIT_F
            share = (unit - units1) % SPLIT_F
            pid_m = tile_id // num_pid_d
            pid_d = tile_id % num_pid_d
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
            rows = tl.where(offs_m < M, offs_m, 0)
            cols = tl.where(offs_d < D, offs_d, 0)
            # wait for every GEMM1 unit of this row block
            ready = tl.atomic_add(ready_ptr + pid_m, 0, sem="acquire")
            while ready < num_pid_f:
                ready = tl.atomic_add(ready_ptr + pid_m, 0, sem="acquire")
            if DYNAMIC:
                # h's per-token scale; each K step of h is quantized with it as it is loaded
                h_scale = _row_scale(tl.load(absmax_ptr + rows, cache_modifier=".cg"))
                inv_h_scale = tl.math.div_rn(1.0, h_scale)
                acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.int32)
            elif STATIC:
                h_scale = tl.load(h_scale_ptr)  # h is int8 at this scale already
                acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.int32)
            else:
                h_scale = 1.0  # (not read)
                acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            k_first = share * k_per_split
            k_last = tl.minimum(k_first + k_per_split, k_tiles)
            for ki in range(k_first, k_last):
                k_in = (ki * BLOCK_K + offs_k) < F
                a = tl.load(h_ptr + rows[:, None] * F + (ki * BLOCK_K + offs_k)[None, :], mask=k_in[None, :],
                            other=0.0, cache_modifier=".cg")  # fmt: skip
                if DYNAMIC:
                    a = round_to_int8(a.to(tl.float32) * inv_h_scale[:, None])
                b = tl.load(w2_ptr + (ki * BLOCK_K + offs_k)[:, None] * stride_w2k + cols[None, :] * stride_w2n,
                            mask=k_in[:, None], other=0.0)  # fmt: skip
                if A_GROUP > 0:
                    # K step ki is h's group ki
                    group_scale = tl.load(h_scale_ptr + rows * k_tiles + ki, cache_modifier=".cg")
                    acc = _group_dot(a, b, acc, group_scale)
                else:
                    if W8A16:
                        b = _weight_tile(b, a, w2_scale_ptr, ki * BLOCK_K, cols, F, stride_w2s, stride_w2sg, GROUP_K,
                                         BLOCK_K, 0, DOT_F32)  # fmt: skip
                    acc = _dot(a, b, acc, DOT_F32, INPUT_PRECISION)
            # The last unit of the row block to have read h (and its scales) leaves the
            # counters and the absmax at zero for the next launch; acq_rel orders every
            # unit's reads before its count.
            tl.debug_barrier()
            consumed = tl.atomic_add(consumed_ptr + pid_m, 1, sem="acq_rel")
            if consumed == num_pid_d * SPLIT_F - 1:
                if DYNAMIC:
                    tl.store(absmax_ptr + offs_m, tl.zeros((BLOCK_M,), dtype=tl.float32), mask=offs_m < M)
                tl.atomic_xchg(ready_ptr + pid_m, 0, sem="relaxed")
                tl.atomic_xchg(consumed_ptr + pid_m, 0, sem="relaxed")
            y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_d[None, :]
            y_mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
            last = True
            total = acc
            if SPLIT_F > 1:
                last, total, _ = _split_k_arrive(acc, acc, partial_ptr, arrivals_ptr, tile_id, share, SPLIT_F, False)
            if last:
                if W8A8:
                    y = _w8a8_out(total, h_scale, offs_m, offs_d, M, D, w2_scale_ptr, stride_w2s, b2_ptr, None, DYNAMIC,
                                  0, HAS_B2, "none", y_ptr.dtype.element_ty, INTERPRETER)  # fmt: skip
                else:
                    y = _epilogue(total, offs_m, offs_d, M, D, b2_ptr, w2_scale_ptr, None, None, stride_w2s, 0, W8A16,
                                  GROUP_K, 0, HAS_B2, "none", y_ptr.dtype.element_ty, INTERPRETER)  # fmt: skip
                tl.store(y_ptrs, y, mask=y_mask)


# ---------------------------------------------------------------------------------------
# Configs: one per fused_bucket(M), measured, not tuned
# ---------------------------------------------------------------------------------------
# BLOCK_F is GEMM1's output tile width, BLOCK_D GEMM2's; BLOCK_K is both K steps. The
# time is a chain of latencies (GEMM1's K loop, the wait, GEMM2's share of K, the
# reduction), so the leaders make as many short units as there are SMs: at 768x3072 and
# up to 32 rows, 16x64 GEMM1 tiles (48 a row block) and GEMM2 split four or eight ways over
# 128-deep K steps; from 33 rows 64-row blocks, from 129 rows 128-row blocks with 8 warps.
#
# Each bucket runs the one config that led bench/probe_fused_configs.py (every candidate
# timed alone, CUDA-graph replays; probe_fused.py in session 8) on an H200 (bench/RESULTS.md
# sections 16 to 18), not an autotuner's pick: three times Triton's autotuner chose a config
# that ran 1.2-1.45x slower in the same process than the probe's leader (w8a8 decode at
# 4096x16384: 75-79 us against 57-60; w8a16 at 768x3072, M=128: 25.7 against 17.7; fp16 at
# M=1024: 39.7 against 34.7). The buckets are powers of two: a bucket tuned at 32 rows and
# reused at 64 ran 16.2 us where 64-row tiles ran 13.8 at 128 rows (section 16).


def _fcfg(bm, bf, bd, bk, split, warps=4, stages=3, maxnreg=None) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_F": bf, "BLOCK_D": bd, "BLOCK_K": bk, "SPLIT_F": split},
        num_warps=warps,
        num_stages=stages,
        maxnreg=maxnreg,
    )


# 768x3072 leaders, µs (section 16: 16-128 rows; section 18: 256-1024, with the runners-up
# 64x64x64x128x2 19.1, 128x128x128x64x4 26.3, 128x128x128x64x2 36.6)
FUSED_CONFIGS = {
    16: _fcfg(16, 64, 64, 128, 8),  # 11.0
    32: _fcfg(32, 64, 64, 128, 8),  # 12.5
    64: _fcfg(64, 64, 64, 128, 8),  # 13.8
    128: _fcfg(64, 64, 64, 128, 4),  # 13.9
    256: _fcfg(128, 64, 64, 128, 4, warps=8),  # 18.3
    512: _fcfg(128, 128, 64, 64, 2, warps=8),  # 25.5
    1024: _fcfg(128, 256, 128, 64, 2, warps=8),  # 34.7
}
# w8a8: the int8 dot takes twice the K per byte, so the K steps are twice as deep (the
# weight bytes a step keeps in flight stay those of the float tables). 768x3072 leaders
# (sections 17 and 18; a 128-row GEMM1 tile ran 35-46 us at 64 and 128 rows).
FUSED_W8A8_CONFIGS = {
    16: _fcfg(16, 64, 64, 256, 8),
    32: _fcfg(16, 64, 64, 256, 4),
    64: _fcfg(64, 64, 64, 128, 8),  # 22.2-22.8 (64x64x64x128x4: 23.2-23.3)
    128: _fcfg(64, 64, 64, 128, 4),  # 23.1-23.2
}
# w8a16: 768x3072 and 384x1536 leaders (section 18), µs at 768x3072; M = 32 was not swept
# (the 16-row leader's tiles with the 64-row leader's depth).
FUSED_W8A16_CONFIGS = {
    16: _fcfg(16, 64, 64, 128, 8),  # 11.3-11.8
    32: _fcfg(16, 64, 64, 256, 4),
    64: _fcfg(32, 64, 64, 256, 4),  # 14.3
    128: _fcfg(64, 64, 64, 128, 4),  # 17.7 (at 384x1536 12.6 against its leader's 12.1)
}

# Above FUSED_MAX_WEIGHT elements a weight (int8, up to 16 rows): at 4096x16384, M=1 and 16,
# 128-wide GEMM2 tiles (32 of them, split 4 ways) ran w8a8 in 57.2-60.0 us where the 64-wide
# ones ran 74.9-77.2 (section 17), and w8a16 in 55.6-57.5 us where 128-deep K steps ran
# 66-67 and 64-wide GEMM1 tiles 65-74 (section 18).
FUSED_W8A8_LARGE_CONFIGS = {16: _fcfg(16, 128, 128, 256, 4)}
# w8a16 from 17 to 64 rows at 4096x16384 (section 19, erf): 32-row tiles 82.9 us at M=32
# (16-row ones 102.6), 64-row tiles 106.6 at M=64 (32-row ones 157.9)
FUSED_W8A16_LARGE_CONFIGS = {16: _fcfg(16, 128, 128, 256, 4), 32: _fcfg(32, 64, 64, 256, 4),
                             64: _fcfg(64, 64, 64, 256, 4)}  # fmt: skip
# the most rows the one launch takes for weights above FUSED_MAX_WEIGHT elements
FUSED_W8A8_MAX_M = max(FUSED_W8A8_LARGE_CONFIGS)
FUSED_W8A16_MAX_M = max(FUSED_W8A16_LARGE_CONFIGS)


def fused_bucket(m: int) -> int:
    """The configs' key for the row count: the next power of two from 16."""
    return max(16, triton.next_power_of_2(m))


# Under the interpreter: small tiles, so test shapes cross several tiles in each dim and
# GEMM2 splits.
_INTERPRETER_CONFIG = _fcfg(16, 32, 32, 32, 2, stages=1)


def fit_group(c: triton.Config, group: int) -> triton.Config:
    """c for w8a8 `group:G` (group = G; 0 leaves c as it is): one activation group per K step
    (BLOCK_K = G) and whole groups of h's columns in a GEMM1 tile (BLOCK_F at least G; both
    are powers of two)."""
    if not group:
        return c
    kw = {**c.kwargs, "BLOCK_K": group, "BLOCK_F": max(c.kwargs["BLOCK_F"], group)}
    return triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages, maxnreg=c.maxnreg)


def _config_for(m: int, d: int, f: int, table: dict, large: dict | None, group: int = 0) -> triton.Config:
    """The config of m rows' bucket (tables end at their largest bucket); large: the one for
    weights above FUSED_MAX_WEIGHT elements; fitted to w8a8 `group:G` where group = G."""
    if interpreting():
        return fit_group(_INTERPRETER_CONFIG, group)
    bucket = fused_bucket(m)
    if large is not None and d * f > FUSED_MAX_WEIGHT and bucket in large:
        return fit_group(large[bucket], group)
    return fit_group(table[min(bucket, max(table))], group)


def _pruner(table: dict, large: dict | None, group: int = 0):
    def prune(configs, named_args, **kwargs):
        wanted = _config_key(_config_for(named_args["M"], named_args["D"], named_args["F"], table, large, group))
        return [c for c in configs if _config_key(c) == wanted]

    return prune


def _dispatched(table: dict, large: dict | None = None, group: int = 0):
    # Triton's autotuner as a dispatcher: its pruner keeps the one config of the call's bucket
    # (nothing is benchmarked)
    if interpreting():
        # a second (never chosen) config makes the autotuner consult the pruner
        configs = [fit_group(c, group) for c in (_INTERPRETER_CONFIG, _fcfg(16, 32, 32, 32, 1, stages=1))]
    else:
        configs = _unique(fit_group(c, group) for t in (table, large or {}) for c in t.values())
    return triton.autotune(
        configs=configs,
        key=["M_BUCKET", "D", "F", "stride_w1k", "stride_w2k"],
        prune_configs_by={"early_config_prune": _pruner(table, large, group)},
    )(fused_mlp_kernel)


_fused_mlp = _dispatched(FUSED_CONFIGS)
_fused_w8a8_mlp = _dispatched(FUSED_W8A8_CONFIGS, FUSED_W8A8_LARGE_CONFIGS)
_fused_w8a16_mlp = _dispatched(FUSED_W8A16_CONFIGS, FUSED_W8A16_LARGE_CONFIGS)
# w8a8 `group:G`, one dispatcher per G (the w8a8 tables fitted: fit_group), made on first use
_fused_w8a8_group_mlps: dict = {}


def _w8a8_group_dispatcher(group: int):
    kernel = _fused_w8a8_group_mlps.get(group)
    if kernel is None:
        kernel = _fused_w8a8_group_mlps[group] = _dispatched(FUSED_W8A8_CONFIGS, FUSED_W8A8_LARGE_CONFIGS, group)
    return kernel


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------

_workspaces: dict = {}


def _workspace(device: torch.device, dtype: torch.dtype, h_elems: int, partial_elems: int, counters: int, rows: int,
               kind: str = ""):  # fmt: skip
    """(h, fp32 partials, int32 counters, fp32 h scales) for one device, stream, h dtype and
    kind of h scales, grown as needed and kept between launches: launches on one stream run
    in order, and each leaves the counters at zero. The h scales: w8a8 dynamic's absmax per
    row (kind "dynamic", left at zero by each launch, so no other kind may share it), or
    group's [M, F / G] (kind "group", written before they are read); `rows` elements."""
    stream = torch._C._cuda_getCurrentRawStream(device.index or 0) if device.type == "cuda" else 0
    key = (device, stream, dtype, kind)
    h, partial, count, absmax = _workspaces.get(key, (None, None, None, None))
    if h is None or h.numel() < h_elems:
        h = torch.empty(max(h_elems, 1 << 16), dtype=dtype, device=device)
    if partial is None or partial.numel() < partial_elems:
        partial = torch.empty(max(partial_elems, 1 << 16), dtype=torch.float32, device=device)
    if count is None or count.numel() < counters:
        count = torch.zeros(max(counters, 1024), dtype=torch.int32, device=device)
    if absmax is None or absmax.numel() < rows:
        absmax = torch.zeros(max(rows, 1024), dtype=torch.float32, device=device)
    _workspaces[key] = (h, partial, count, absmax)
    return h, partial, count, absmax


def _sizes(m: int, d: int, f: int, table: dict, large: dict | None, group: int) -> tuple[int, int, int, int]:
    """(h elements, partial elements, counters, h scale elements) for the layout m's config takes."""
    c = _config_for(m, d, f, table, large, group)
    bm, bd, split = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], c.kwargs["SPLIT_F"]
    tiles = triton.cdiv(m, bm) * triton.cdiv(d, bd)
    return m * f, tiles * bm * bd * split, 2 * triton.cdiv(m, bm) + tiles, m * (triton.cdiv(f, group) if group else 1)


@functools.lru_cache(maxsize=None)
def fused_mlp_enabled() -> bool:
    """GELUGEMM_FUSED_MLP=0 turns the one-launch path off (read once; see the module's
    docstring for when to). It is off too for an MPS client whose environment limits its
    share of the SMs (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE below 100); a limit set by the MPS
    control daemon alone is not visible here, hence the switch."""
    if os.environ.get("GELUGEMM_FUSED_MLP", "1") in ("", "0"):
        return False
    share = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "").strip()
    try:
        return not share or float(share) >= 100
    except ValueError:
        return True


def fused_mlp_applies(m: int, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the op runs a float MLP of m rows in this one launch (small weights, few
    rows: see FUSED_MAX_WEIGHT and FUSED_MAX_M; not with GELUGEMM_FUSED_MLP=0)."""
    return (
        0 < m <= FUSED_MAX_M
        and w1.numel() <= FUSED_MAX_WEIGHT
        and w2.numel() <= FUSED_MAX_WEIGHT
        and fused_mlp_enabled()
    )


def fused_w8a8_applies(m: int, d: int, w1: QuantizedWeight, w2: QuantizedWeight, kind: str = "dynamic") -> bool:
    """Whether the op runs a w8a8 MLP of m rows and d_model d, activations of this kind
    (ActivationScheme.kind), in this one launch: a kind in FUSED_W8A8_OP_SCHEMES, per-channel
    weights, at most FUSED_W8A8_SMALL_MAX_M rows for weights of at most FUSED_MAX_WEIGHT
    elements; for a kind in FUSED_W8A8_LARGE_WEIGHT_SCHEMES, at most FUSED_W8A8_MAX_M rows
    for larger ones of at most FUSED_W8A8_MAX_WEIGHT, where the pinned config gives each GEMM
    FUSED_W8A8_MIN_UNITS units (as at 4096x16384, where it was measured: 128 each); not with
    GELUGEMM_FUSED_MLP=0."""
    if kind not in FUSED_W8A8_OP_SCHEMES or w1.group_size is not None or w2.group_size is not None:
        return False
    large = FUSED_W8A8_LARGE_CONFIGS if kind in FUSED_W8A8_LARGE_WEIGHT_SCHEMES else None
    return _int8_applies(m, d, w1, w2, FUSED_W8A8_SMALL_MAX_M, large)


def fused_w8a16_applies(m: int, d: int, w1: QuantizedWeight, w2: QuantizedWeight) -> bool:
    """Whether the op runs a w8a16 MLP of m rows and d_model d in this one launch: both
    weights of one granularity, the row and weight bounds of fused_w8a8_applies with
    FUSED_W8A16_SMALL_MAX_M and FUSED_W8A16_MAX_M."""
    return w1.group_size == w2.group_size and _int8_applies(
        m, d, w1, w2, FUSED_W8A16_SMALL_MAX_M, FUSED_W8A16_LARGE_CONFIGS
    )


def _int8_applies(m: int, d: int, w1: QuantizedWeight, w2: QuantizedWeight, small_max_m: int,
                  large: dict | None) -> bool:  # fmt: skip
    # large: the pinned configs for weights above FUSED_MAX_WEIGHT (None: small weights only)
    largest = max(w1.data.numel(), w2.data.numel())
    if largest <= FUSED_MAX_WEIGHT:
        max_m = small_max_m
    elif large is None:
        max_m = 0
    else:
        f = w1.data.numel() // max(d, 1)
        tile = large[16].kwargs
        units1 = triton.cdiv(f, tile["BLOCK_F"])
        units2 = triton.cdiv(d, tile["BLOCK_D"]) * tile["SPLIT_F"]
        max_m = max(large) if min(units1, units2) >= FUSED_W8A8_MIN_UNITS else 0
    return 0 < m <= max_m and largest <= FUSED_W8A8_MAX_WEIGHT and fused_mlp_enabled()


_plans: dict = {}


def fused_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None = None,
    *,
    activation: str = "erf",
    weight_layout: str | WeightLayout = "out_in",
    allow_tf32: bool = False,
) -> torch.Tensor:
    """GELU(x @ W1^T + b1) @ W2^T + b2 in one launch; x [..., d_model] fp16, bf16 or fp32,
    the weights and biases in x's dtype, W1 [d_ff, d_model] and W2 [d_model, d_ff] (or
    [in, out] with weight_layout="in_out"). Returns [..., d_model] in x's dtype.
    activation: the GELU flavour ("erf", "tanh", "quick"); allow_tf32: fp32 only."""
    signature = (
        x.shape, x.stride(), x.dtype, x.device, tensor_signature(w1), tensor_signature(w2),
        tensor_signature(b1), tensor_signature(b2), activation, weight_layout, allow_tf32,
    )  # fmt: skip
    plan = _plans.get(signature)
    if plan is None:
        plan = _plan(x, w1, b1, w2, b2, activation, WeightLayout.parse(weight_layout), allow_tf32, None)
        _plans[signature] = plan
    return _run(plan, x, w1, b1, w2, b2, None, None, None)


def fused_w8a8_mlp(
    x: torch.Tensor,
    w1: QuantizedWeight,
    b1: torch.Tensor | None,
    w2: QuantizedWeight,
    b2: torch.Tensor | None = None,
    *,
    activation: str = "erf",
    weight_layout: str | WeightLayout = "out_in",
    activations: str | ActivationScheme = "dynamic",
) -> torch.Tensor:
    """The w8a8 MLP in one launch, as kernels/w8a8.py's launches compute it for each
    activation scheme (x divided by w1.smooth_scale first, where there is one; both GEMMs on
    the int8 tensor cores):

        dynamic   x quantized per token, GEMM1 with GELU, h rounded to x's dtype, h
                  quantized per token over all of d_ff, GEMM2 (the four launches)
        static    x quantized with w1.input_scale, GEMM1 with GELU requantizes h to int8
                  with w1.output_scale, GEMM2 (the three launches)
        group:G   x quantized per token per G columns, GEMM1 with GELU requantizes h per
                  token per G columns, GEMM2 (the three launches)

    x [..., d_model] fp16, bf16 or fp32; w1, w2 QuantizedWeights with per-channel scales
    (data [d_ff, d_model] and [d_model, d_ff], or [in, out] with weight_layout="in_out");
    float biases. Returns [..., d_model] in x's dtype."""
    scheme = ActivationScheme.parse(activations)
    return _int8_mlp(("w8a8", scheme.kind, scheme.group_size or 0), x, w1, b1, w2, b2, activation, weight_layout)


def fused_w8a16_mlp(
    x: torch.Tensor,
    w1: QuantizedWeight,
    b1: torch.Tensor | None,
    w2: QuantizedWeight,
    b2: torch.Tensor | None = None,
    *,
    activation: str = "erf",
    weight_layout: str | WeightLayout = "out_in",
) -> torch.Tensor:
    """The w8a16 MLP in one launch, as kernels/w8a16.py's two launches compute it: each int8
    weight tile dequantized in registers (per-group scales on the tile, per-channel ones in
    the epilogue), GEMM1 with GELU, h rounded to x's dtype, GEMM2. x [..., d_model] fp16 or
    bf16; w1, w2 QuantizedWeights of one granularity (data [d_ff, d_model] and [d_model,
    d_ff], or [in, out] with weight_layout="in_out"); float biases. Returns [..., d_model] in
    x's dtype."""
    return _int8_mlp(("w8a16", "", 0), x, w1, b1, w2, b2, activation, weight_layout)


def _int8_mlp(scheme, x, w1, b1, w2, b2, activation, weight_layout):
    # scheme: (dtype, w8a8's activation kind, its group size)
    for name, w in (("w1", w1), ("w2", w2)):
        if not isinstance(w, QuantizedWeight):
            raise LaunchError(f"{name} must be a QuantizedWeight (int8 data and its scales), got {type(w).__name__}")
    signature = (
        scheme, x.shape, x.stride(), x.dtype, x.device, tensor_signature(w1.data), tensor_signature(w2.data),
        tensor_signature(b1), tensor_signature(b2), activation, weight_layout, tensor_signature(w1.scale),
        tensor_signature(w2.scale), tensor_signature(w1.smooth_scale), tensor_signature(w2.smooth_scale),
        w1.group_size, w2.group_size,
    )  # fmt: skip
    static = scheme[1] == "static"
    if static:
        signature += (tensor_signature(w1.input_scale), tensor_signature(w1.output_scale))
    plan = _plans.get(signature)
    if plan is None:
        plan = _plan(x, w1.data, b1, w2.data, b2, activation, WeightLayout.parse(weight_layout), False, (scheme, w1, w2))
        _plans[signature] = plan
    smooth = w1.smooth_scale if scheme[0] == "w8a8" else None
    x_scale, h_scale = (w1.input_scale, w1.output_scale) if static else (None, None)
    return _run(plan, x, w1.data, b1, w2.data, b2, w1.scale, w2.scale, smooth, x_scale, h_scale)


def _run(plan, x, w1, b1, w2, b2, w1_scale=None, w2_scale=None, smooth=None, x_scale=None, h_scale=None):
    kernel, grid, scalars, constexprs, key, sizes, slot, d, h_dtype, scales = plan
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a view where strides allow
    y = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return y
    h, partial, counters, h_scales = _workspace(x.device, h_dtype, *sizes, scales)
    if scales == "group":
        h_scale = h_scales
    args = (x2, w1, b1, w2, b2, y, h, partial, counters, w1_scale, w2_scale, smooth,
            h_scales if scales == "dynamic" else None, x_scale, h_scale, *scalars)  # fmt: skip
    launch(kernel, grid, args, constexprs, key, slot=slot)
    return y


def _check_scales(quantized, x, layout: WeightLayout) -> None:
    # w8a8's weights: per-channel float32 scales, one per output channel, on x's device;
    # a SmoothQuant scale on w1 only. w8a16's: per channel or per group, the same for both
    # weights, on x's device; no SmoothQuant scale.
    (scheme, kind, _), w1, w2 = quantized
    if scheme == "w8a16":
        for name, w in (("w1", w1), ("w2", w2)):
            if w.scale.device != x.device:
                raise LaunchError(f"{name} scale is on {w.scale.device} but x is on {x.device}")
            check_weight_scales(w, *layout.kn_shape(w.data), name)
            if w.smooth_scale is not None:
                raise LaunchError(f"{name} carries a SmoothQuant smooth_scale, which only w8a8 applies (to its int8 input)")
        if w1.group_size != w2.group_size:
            raise LaunchError(f"w1 and w2 must have one granularity in one launch; got {w1.granularity} and {w2.granularity}")
        return
    for name, w in (("w1", w1), ("w2", w2)):
        if w.group_size is not None:
            raise LaunchError(f"w8a8 takes per-channel weight scales; {name} has {w.granularity}")
        n = layout.kn_shape(w.data)[1]
        if w.scale.dim() != 1 or w.scale.shape[0] != n or w.scale.device != x.device:
            raise LaunchError(
                f"{name} scale must be a float32 [{n}] vector on {x.device}, got {tuple(w.scale.shape)} on {w.scale.device}"
            )
    if w2.smooth_scale is not None:
        raise LaunchError("a SmoothQuant smooth_scale applies to w8a8's GEMM1 input only (w1)")
    s, d = w1.smooth_scale, x.shape[-1]
    if s is not None and (s.shape != (d,) or s.dtype != torch.float32 or s.device != x.device or s.stride(0) != 1):
        raise LaunchError(f"smooth_scale must be a contiguous float32 [{d}] vector on {x.device}")
    if kind == "group":
        check_group_size(quantized[0][2])
    if kind == "static":
        # GEMM2 reads h at w1.output_scale (kernels/op.py compares a separate w2.input_scale)
        for what, scale in (("w1.input_scale", w1.input_scale), ("w1.output_scale", w1.output_scale)):
            if scale is None:
                raise LaunchError(f"w8a8 static needs {what}, the calibrated scale of x (input) or of GELU's output")
            check_scalar_scale(scale, x.device, what)


def _plan(x, w1, b1, w2, b2, activation, layout: WeightLayout, allow_tf32, quantized):
    if activation not in GELU_FLAVOURS:
        raise LaunchError(f"activation must be one of {GELU_FLAVOURS}, got {activation!r}")
    scheme, kind, a_group = (None, "", 0) if quantized is None else quantized[0]
    if x.dtype not in FLOAT_DTYPES.values():
        raise LaunchError(f"input dtype must be fp16, bf16 or fp32, got {x.dtype}")
    if scheme == "w8a16" and x.dtype not in ACTIVATION_DTYPES.values():
        raise LaunchError(f"w8a16 input dtype must be fp16 or bf16, got {x.dtype}")
    # float: every tensor in x's dtype; int8: int8 weights, biases of any float dtype
    weight_dtype, weight_what = (x.dtype, "input dtype") if quantized is None else (torch.int8, "int8 data")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is None:
            continue
        try:
            if name[0] == "w" and t.dtype != weight_dtype:
                raise LaunchError(f"{name} dtype {t.dtype} differs from {weight_what} {weight_dtype}")
            if name[0] == "b" and t.dtype != x.dtype and (quantized is None or not t.dtype.is_floating_point):
                raise LaunchError(f"{name} dtype {t.dtype} differs from input dtype {x.dtype}")
            if t.device != x.device:
                raise LaunchError(f"{name} is on {t.device} but x is on {x.device}")
        except AttributeError:  # a Python number or a list: said here, at no cost to a tensor
            raise LaunchError(f"{name} must be a torch.Tensor{' or None' if name[0] == 'b' else ''}, got {type(t).__name__}") from None
    for name, w in (("w1", w1), ("w2", w2)):
        if w.dim() != 2:
            raise LaunchError(f"{name} must be 2-D, got shape {tuple(w.shape)}")
    d = x.shape[-1]
    k1, f = layout.kn_shape(w1)
    k2, n2 = layout.kn_shape(w2)
    if k1 != d:
        raise LaunchError(f"w1 takes {k1} inputs but x has {d} features")
    if (k2, n2) != (f, d):
        raise LaunchError(f"w2 must map d_ff={f} to d_model={d}; its shape is {tuple(w2.shape)} ({layout.value})")
    for name, b, n in (("b1", b1, f), ("b2", b2, d)):
        if b is not None and (b.dim() != 1 or b.shape[0] != n or b.stride(0) != 1):
            raise LaunchError(f"{name} must be a contiguous [{n}] vector, got shape {tuple(b.shape)}")
    if quantized is not None:
        _check_scales(quantized, x, layout)
    x2 = x if x.dim() == 2 else x.reshape(-1, d)  # as _run reshapes it
    m = x2.shape[0]
    stride_xm, stride_xk = x2.stride()
    stride_w1k, stride_w1n = layout.kn_strides(w1)
    stride_w2k, stride_w2n = layout.kn_strides(w2)
    programs = 1 if interpreting() else num_programs(x.device)

    def grid(meta):
        bm = meta["BLOCK_M"]
        units = triton.cdiv(m, bm) * (triton.cdiv(f, meta["BLOCK_F"]) + triton.cdiv(d, meta["BLOCK_D"]) * meta["SPLIT_F"])
        return (min(programs, units),)

    # The units loop strides by the SM count (NUM_PROGRAMS); with fewer units than SMs the
    # grid has one program per unit, each running one.
    group_k = 0 if scheme != "w8a16" else quantized[1].group_size or 0
    constexprs = dict(
        HAS_B1=b1 is not None,
        HAS_B2=b2 is not None,
        ACTIVATION=activation,
        W8A8=scheme == "w8a8",
        HAS_SMOOTH=scheme == "w8a8" and quantized[1].smooth_scale is not None,
        STATIC=kind == "static",
        A_GROUP=a_group,
        W8A16=scheme == "w8a16",
        GROUP_K=group_k,
        DOT_F32=interpreting() and x.dtype == torch.bfloat16 and scheme != "w8a8",
        INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
        INTERPRETER=interpreting(),
    )
    # (w1 scale's stride along N, w2's; along the groups, w1's, w2's)
    scale_strides = (0, 0, 0, 0)
    if scheme is not None:
        s1, s2 = quantized[1].scale, quantized[2].scale
        scale_strides = (s1.stride(0), s2.stride(0), s1.stride(1) if group_k else 0, s2.stride(1) if group_k else 0)
    scalars = (m, d, f, fused_bucket(m), programs, stride_xm, stride_xk, stride_w1k, stride_w1n, stride_w2k, stride_w2n,
               d, *scale_strides)  # fmt: skip
    key = ("fused", x.dtype, m, d, f, stride_xm, stride_xk, stride_w1k, stride_w1n, stride_w2k, stride_w2n,
           activation, allow_tf32, b1 is not None, b2 is not None, *scale_strides, *constexprs.values())  # fmt: skip
    tables = {None: (_fused_mlp, FUSED_CONFIGS, None), "w8a8": (_fused_w8a8_mlp, FUSED_W8A8_CONFIGS, FUSED_W8A8_LARGE_CONFIGS),
              "w8a16": (_fused_w8a16_mlp, FUSED_W8A16_CONFIGS, FUSED_W8A16_LARGE_CONFIGS)}  # fmt: skip
    kernel, configs, large = tables[scheme]
    if a_group:
        kernel = _w8a8_group_dispatcher(a_group)
    # h: int8 where GEMM1 requantizes it (static, group), else in x's dtype; its scales: a
    # workspace of their own for dynamic and group (see _workspace)
    h_dtype = torch.int8 if kind in ("static", "group") else x.dtype
    scales = kind if kind in ("dynamic", "group") else ""
    sizes = _sizes(m, d, f, configs, large, a_group)
    return kernel, grid, scalars, constexprs, key, sizes, [None], d, h_dtype, scales
