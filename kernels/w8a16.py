"""GEMMs that read int8 weights: w8a16, and the GEMM half of w8a8.

    out = act(a @ dequant(Wq)^T + bias)        act: "none", "erf" or "tanh" GELU

The weight is a `QuantizedWeight`: int8 values in the checkpoint's layout (`out_in`
[N, K] or `in_out` [K, N]) and float32 scales, per output channel ([N]) or per group of
`group_size` inputs along K ([N, ceil(K / G)]). It is never dequantized in memory: each
int8 tile is converted in registers inside the main loop.

One set of kernels serves both int8 schemes; the dtype of `a` decides at compile time:

- fp16/bf16 `a` (w8a16): the int8 tile is converted to a's dtype, which holds every
  value in [-127, 127] exactly, and goes to the fp16/bf16 tensor cores with float32
  accumulation. A per-channel scale is constant along K, so it multiplies the
  accumulator once, in the epilogue. A per-group scale changes along K: it multiplies
  the tile in the loop (w = q * scale, rounded once to a's dtype).
- int8 `a` (w8a8, launched from kernels/w8a8.py): both int8 tiles go to the int8
  tensor cores as they are, with exact int32 accumulation. The epilogue dequantizes
  with a's scale (one per row, or one scalar) times the weight's per-channel scale and,
  when the output buffer is int8, requantizes with the calibrated output scale.

Kernels (the int8 twins of kernels/gemm.py's three):

- `_int8_weight_decode_kernel`: M <= 16, where the cost is streaming the int8 weight
  once. Swap-AB (the dequantized weight tile on the MMA's wide side), TMA loads, and a
  serial split-K over K when N alone gives too few programs to keep every SM streaming.
- `_int8_weight_tma_kernel`: the Hopper path for M > 16, a persistent grid walking output
  tiles in grouped order and loading through TMA tensor descriptors.
- `_int8_weight_strided_kernel`: one program per output tile, pointer loads, any
  strides: the fallback for operands TMA cannot address (TMA needs 16-byte aligned
  rows: K % 16 == 0 for an int8 [.., K] operand, % 8 for fp16/bf16).

`launch_int8_weight_gemm` checks and launches for both schemes; `w8a16_linear` is the
w8a16 launcher.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.errors import LaunchError
from kernels.gemm import (
    _INTERPRETER_CONFIG,
    ACTIVATIONS,
    DECODE_MAX_M,
    _autotune_kwargs,
    _bias_act,
    _cfg,
    _decode_split_k,
    _dot,
    _output,
    _prune_for,
    _split_k_workspace,
    _tile_coords,
    _tma_aligned,
    _tma_supported,
    check_operands,
    m_bucket,
    weight_strides,
)
from kernels.launch import ensure_tma_allocator, interpreting, launch, num_programs
from kernels.quantized import QuantizedWeight

W8A16_DTYPES = (torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------
# Shared device functions
# ---------------------------------------------------------------------------------------


@triton.jit
def _round_to_int8(v):
    # int8 = round_half_even(clamp(v, -127, 127)). libdevice's rint does not run under
    # the interpreter; adding then subtracting 1.5 * 2^23 = 12582912 does the rounding in
    # the float32 adder itself: for |v| <= 2^22 the sum's last bit is worth exactly 1, so
    # the add rounds v to the nearest integer, ties to even, and the subtract is exact.
    # The clamp sits between any product and the add, so the compiler cannot fuse them
    # into one fma (which would round differently).
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
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
def _weight_tile(q, a, w_scale_ptr, k0, cols, K, stride_wsn, stride_wsg,
                 GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr, K_AXIS: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    # The weight tile the dot takes, from its int8 values q; a is the activation tile,
    # whose dtype picks the scheme. q covers k in [k0, k0 + BLOCK_K) along axis K_AXIS
    # ([BLOCK_K, BLOCK_N] tiles: 0; the decode kernel's [BLOCK_N, BLOCK_K]: 1) and the
    # output channels `cols` (clamped in bounds) along the other.
    # DOT_F32 (bf16 under the CPU interpreter, see kernels/gemm.py's _dot) hands the dot
    # float32 tiles holding the values the GPU's bf16 tiles hold: the interpreter's
    # int8 -> bf16 cast returns garbage and its float32 -> bf16 cast truncates.
    # One return at the end: Triton 3.6 also generates what follows a return in an `if`.
    if a.dtype == tl.int8:
        w = q  # w8a8: int8 x int8; both scales wait for the epilogue
    elif GROUP_K == 0:
        # exact (|q| <= 127); the per-channel scale waits for the epilogue
        if DOT_F32:
            w = q.to(tl.float32)
        else:
            w = q.to(a.dtype)
    else:
        w = _group_scaled_tile(q, a, w_scale_ptr, k0, cols, K, stride_wsn, stride_wsg, GROUP_K, BLOCK_K, K_AXIS, DOT_F32)
    return w


@triton.jit
def _group_scaled_tile(q, a, w_scale_ptr, k0, cols, K, stride_wsn, stride_wsg,
                       GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr, K_AXIS: tl.constexpr, DOT_F32: tl.constexpr):  # fmt: skip
    # per group: w[k, n] = q[k, n] * scale[n, k // GROUP_K], rounded once to a's dtype
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
    w = q.to(tl.float32) * scale
    if DOT_F32:
        w = _bf16_round_nearest(w)
    else:
        w = w.to(a.dtype)
    return w


@triton.jit
def _int8_epilogue(acc, offs_m, offs_n, M, N,
                   bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr, stride_wsn, stride_as,
                   GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                   OUT_DTYPE: tl.constexpr, INTERPRETER: tl.constexpr):  # fmt: skip
    # float32 out = acc * a_scale[m] * w_scale[n] + bias[n], then GELU; in this order, as
    # kernels/reference.py computes it.
    out = acc.to(tl.float32)  # int32 -> float32 rounds to nearest even, as torch does
    if acc.dtype == tl.int32:
        # w8a8: a's scale, one per row (stride 1) or one for all rows (stride 0)
        a_scale = tl.load(a_scale_ptr + offs_m * stride_as, mask=offs_m < M, other=0.0)
        out = out * a_scale[:, None]
    if GROUP_K == 0:
        w_scale = tl.load(w_scale_ptr + offs_n * stride_wsn, mask=offs_n < N, other=0.0)
        out = out * w_scale[None, :]
    out = _bias_act(out, bias_ptr, offs_n, N, HAS_BIAS, ACTIVATION)
    if OUT_DTYPE == tl.int8:
        # w8a8 GEMM1: requantize for GEMM2, q = round(clamp(out / c_scale)), the division
        # as a multiply by the correctly rounded reciprocal (div_rn: Triton's plain "/"
        # is an approximate division on the GPU)
        inv_c_scale = tl.math.div_rn(1.0, tl.load(c_scale_ptr))
        result = _round_to_int8(out * inv_c_scale)
    else:
        if OUT_DTYPE == tl.bfloat16:
            if INTERPRETER:
                out = _bf16_round_nearest(out)  # the interpreter's bf16 cast would truncate
        result = out.to(OUT_DTYPE)
    return result


# ---------------------------------------------------------------------------------------
# Configs, per scheme, keyed by m_bucket(M) like kernels/gemm.py's. The int8 x int8 dot
# eats twice the K per byte of shared memory, so w8a8 tiles are twice as deep.
# ---------------------------------------------------------------------------------------

# Decode (M <= 16) through TMA, swap-AB, split-K: BLOCK_N is the MMA's wide side (a
# multiple of 64 for wgmma); deep K tiles and stages keep weight bytes in flight.
W8A16_DECODE_CONFIGS = {
    16: [
        _cfg(16, 64, 256, 4, 4),
        _cfg(16, 64, 512, 4, 3),
        _cfg(16, 128, 256, 4, 4),
        _cfg(16, 64, 128, 4, 6),
        _cfg(16, 128, 128, 4, 5),
    ],
}
W8A8_DECODE_CONFIGS = {
    16: [
        _cfg(16, 64, 256, 4, 4),
        _cfg(16, 64, 512, 4, 4),
        _cfg(16, 128, 256, 4, 4),
        _cfg(16, 128, 512, 4, 3),
        _cfg(16, 64, 256, 4, 6),
    ],
}
W8A16_STRIDED_CONFIGS = {
    # decode without TMA: stream the int8 weight; BLOCK_K 128..512 deep, 4..6 stages
    16: [
        _cfg(16, 32, 256, 4, 4),
        _cfg(16, 32, 512, 4, 4),
        _cfg(16, 16, 512, 4, 6),
        _cfg(16, 64, 256, 4, 5),
        _cfg(16, 32, 128, 4, 6),
        _cfg(16, 64, 128, 4, 6),
    ],
    64: [_cfg(64, 64, 64, 4, 4), _cfg(32, 64, 128, 4, 4), _cfg(64, 128, 64, 4, 4)],
    "large": [_cfg(128, 128, 64, 8, 3), _cfg(128, 256, 64, 8, 3), _cfg(64, 128, 64, 4, 4)],
}
W8A16_TMA_CONFIGS = {
    64: [_cfg(64, 64, 128, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 128, 128, 4, 3)],
    256: [_cfg(64, 128, 64, 4, 4), _cfg(128, 128, 64, 8, 4), _cfg(64, 256, 64, 8, 4)],
    # After kernels/gemm.py's measured large-M float configs: the subtiled epilogue with
    # a flattened or warp-specialized tile loop.
    "large": [
        _cfg(128, 256, 64, 8, 3, EPILOGUE_SUBTILE=True, FLATTEN=True),
        _cfg(128, 256, 64, 8, 3, EPILOGUE_SUBTILE=True, WARP_SPECIALIZE=True),
        _cfg(128, 128, 64, 8, 4, FLATTEN=True),
        _cfg(128, 256, 64, 8, 3),
        _cfg(128, 128, 128, 8, 3),
    ],
}
W8A8_STRIDED_CONFIGS = {
    16: [
        _cfg(16, 32, 256, 4, 4),
        _cfg(16, 32, 512, 4, 4),
        _cfg(16, 16, 512, 4, 6),
        _cfg(16, 64, 256, 4, 5),
        _cfg(16, 64, 512, 4, 4),
    ],
    64: [_cfg(64, 64, 128, 4, 4), _cfg(32, 64, 256, 4, 4), _cfg(64, 128, 128, 4, 4)],
    "large": [_cfg(128, 128, 128, 8, 3), _cfg(128, 256, 128, 8, 3), _cfg(64, 128, 128, 4, 4)],
}
W8A8_TMA_CONFIGS = {
    64: [_cfg(64, 128, 128, 4, 4), _cfg(64, 64, 256, 4, 4), _cfg(64, 128, 256, 4, 3)],
    256: [_cfg(128, 128, 128, 8, 4), _cfg(64, 256, 128, 8, 4), _cfg(128, 64, 128, 4, 4), _cfg(64, 128, 128, 4, 4)],
    # 128x256x128: 48 KiB of int8 tiles a stage; the subtiled epilogue halves the output
    # staging buffer (and the live registers of the GELU), leaving room for a 4th stage.
    "large": [
        _cfg(128, 256, 128, 8, 3, EPILOGUE_SUBTILE=True, FLATTEN=True),
        _cfg(128, 256, 128, 8, 3, EPILOGUE_SUBTILE=True, WARP_SPECIALIZE=True),
        _cfg(128, 256, 128, 8, 4, EPILOGUE_SUBTILE=True),
        _cfg(128, 128, 128, 8, 4, FLATTEN=True),
        _cfg(128, 256, 128, 8, 3),
        _cfg(128, 128, 128, 4, 4, EPILOGUE_SUBTILE=True, FLATTEN=True),
        _cfg(256, 128, 128, 8, 3, EPILOGUE_SUBTILE=True),
    ],
}


def _config_key(c):
    return tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages


def _scheme_configs(*tables, **interpreter_extra):
    # Every config of every scheme's table, once each; the interpreter's one config with
    # BLOCK_K = 32, the smallest K the int8 dot takes.
    if interpreting():
        return [triton.Config({**_INTERPRETER_CONFIG, **interpreter_extra}, num_warps=4, num_stages=1)]
    seen, out = set(), []
    for table in tables:
        for cfgs in table.values():
            for c in cfgs:
                if _config_key(c) not in seen:
                    seen.add(_config_key(c))
                    out.append(c)
    return out


def _gather_config(c: triton.Config) -> triton.Config:
    # For group sizes no tile depth divides: the per-element scale gather is staged in
    # shared memory like a weight tile, four bytes an element: smaller tiles, fewer stages.
    kwargs = {**c.kwargs, "BLOCK_K": min(c.kwargs["BLOCK_K"], 64), "BLOCK_N": min(c.kwargs["BLOCK_N"], 128)}
    return triton.Config(kwargs, num_warps=c.num_warps, num_stages=min(c.num_stages, 3))


def _prune_by_scheme(w8a16_table, w8a8_table):
    # The scheme's table for this M bucket (kernels/gemm.py's pruning). For group scales,
    # the configs whose K tile and group size divide one another (a few scale loads per
    # tile); when none does, shallow variants of the bucket's configs for the gather.
    prunes = {"w8a16": _prune_for(w8a16_table), "w8a8": _prune_for(w8a8_table)}

    def prune(configs, named_args, **kwargs):
        scheme = "w8a8" if named_args["a_ptr"].dtype == torch.int8 else "w8a16"
        kept = prunes[scheme](configs, named_args, **kwargs)
        group_k = kwargs.get("GROUP_K", named_args.get("GROUP_K", 0))
        if group_k:
            divides = [c for c in kept if group_k % c.kwargs["BLOCK_K"] == 0 or c.kwargs["BLOCK_K"] % group_k == 0]
            if divides:
                return divides
            gather = {_config_key(g): g for g in map(_gather_config, kept)}
            return list(gather.values())
        return kept

    return prune


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.autotune(
    configs=_scheme_configs(W8A16_STRIDED_CONFIGS, W8A8_STRIDED_CONFIGS),
    key=["M_BUCKET", "N", "K", "stride_bk", "stride_bn", "GROUP_K"],
    prune_configs_by={"early_config_prune": _prune_by_scheme(W8A16_STRIDED_CONFIGS, W8A8_STRIDED_CONFIGS)},
    **_autotune_kwargs(),
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _int8_weight_strided_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_wsn, stride_wsg, stride_as,
    GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    DOT_F32: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
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

    if a_ptr.dtype.element_ty == tl.int8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            q = tl.load(b_ptrs)
        else:
            k_left = K - ki * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            q = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        b = _weight_tile(q, a, w_scale_ptr, ki * BLOCK_K, cols, K, stride_wsn, stride_wsg, GROUP_K, BLOCK_K, 0, DOT_F32)
        acc = _dot(a, b, acc, DOT_F32, "ieee")
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out = _int8_epilogue(
        acc, offs_m, offs_n, M, N, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr, stride_wsn, stride_as,
        GROUP_K, HAS_BIAS, ACTIVATION, c_ptr.dtype.element_ty, INTERPRETER,
    )  # fmt: skip
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(
    # the interpreter runs the subtiled epilogue that most large-M configs use
    configs=_scheme_configs(W8A16_TMA_CONFIGS, W8A8_TMA_CONFIGS, EPILOGUE_SUBTILE=True),
    key=["M_BUCKET", "N", "K", "B_IS_NK", "GROUP_K"],
    prune_configs_by={"early_config_prune": _prune_by_scheme(W8A16_TMA_CONFIGS, W8A8_TMA_CONFIGS)},
    **_autotune_kwargs(),
)
@triton.jit
def _int8_weight_tma_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_b, stride_cm, stride_wsn, stride_wsg, stride_as,
    GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, B_IS_NK: tl.constexpr,
    DOT_F32: tl.constexpr, INTERPRETER: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False, EPILOGUE_SUBTILE: tl.constexpr = False,
):  # fmt: skip
    # B_IS_NK: the weight is stored [N, K] (nn.Linear), read as [BLOCK_N, BLOCK_K] tiles
    # and transposed in registers (K-major, the layout the int8 wgmma wants); otherwise
    # it is [K, N] (Conv1D), read as is.
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_IS_NK:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1], block_shape=[BLOCK_K, BLOCK_N])
    # EPILOGUE_SUBTILE runs the epilogue and the store on two [BLOCK_M, BLOCK_N / 2]
    # halves: fewer live registers in the GELU and half the output staging buffer.
    if EPILOGUE_SUBTILE:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N // 2])
    else:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])
    out_dtype = c_ptr.dtype.element_ty

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(
        tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
    ):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_n = off_n + tl.arange(0, BLOCK_N)
        cols = tl.where(offs_n < N, offs_n, 0)  # in-bounds scale reads for the edge tile
        if a_ptr.dtype.element_ty == tl.int8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            # TMA fills reads past the tensor's edge with zeros: no K mask needed.
            a = a_desc.load([off_m, ki * BLOCK_K])
            if B_IS_NK:
                q = b_desc.load([off_n, ki * BLOCK_K]).T
            else:
                q = b_desc.load([ki * BLOCK_K, off_n])
            b = _weight_tile(q, a, w_scale_ptr, ki * BLOCK_K, cols, K, stride_wsn, stride_wsg, GROUP_K, BLOCK_K, 0, DOT_F32)
            acc = _dot(a, b, acc, DOT_F32, "ieee")
        offs_m = off_m + tl.arange(0, BLOCK_M)
        # TMA clips stores at the tensor's edge: no mask needed.
        if EPILOGUE_SUBTILE:
            acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            offs_n0 = off_n + tl.arange(0, BLOCK_N // 2)
            out0 = _int8_epilogue(
                acc0, offs_m, offs_n0, M, N, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr,
                stride_wsn, stride_as, GROUP_K, HAS_BIAS, ACTIVATION, out_dtype, INTERPRETER,
            )  # fmt: skip
            c_desc.store([off_m, off_n], out0)
            out1 = _int8_epilogue(
                acc1, offs_m, offs_n0 + BLOCK_N // 2, M, N, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr,
                stride_wsn, stride_as, GROUP_K, HAS_BIAS, ACTIVATION, out_dtype, INTERPRETER,
            )  # fmt: skip
            c_desc.store([off_m, off_n + BLOCK_N // 2], out1)
        else:
            out = _int8_epilogue(
                acc, offs_m, offs_n, M, N, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr,
                stride_wsn, stride_as, GROUP_K, HAS_BIAS, ACTIVATION, out_dtype, INTERPRETER,
            )  # fmt: skip
            c_desc.store([off_m, off_n], out)


@triton.autotune(
    configs=_scheme_configs(W8A16_DECODE_CONFIGS, W8A8_DECODE_CONFIGS),
    key=["M_BUCKET", "N", "K", "B_IS_NK", "GROUP_K"],
    prune_configs_by={"early_config_prune": _prune_by_scheme(W8A16_DECODE_CONFIGS, W8A8_DECODE_CONFIGS)},
    **_autotune_kwargs(),
)
@triton.heuristics({"SPLIT_K": _decode_split_k})
@triton.jit
def _int8_weight_decode_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr, partial_ptr, arrivals_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_b, stride_cm, stride_wsn, stride_wsg, stride_as,
    GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, B_IS_NK: tl.constexpr,
    DOT_F32: tl.constexpr, INTERPRETER: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    # Decode: M <= BLOCK_M rows, so the cost is streaming the int8 weight once. Swap AB,
    # as kernels/gemm.py's _gemm_decode_kernel does: out^T = W @ a^T puts the weight
    # tile, dequantized in registers, on the MMA's wide side and the few tokens on its
    # narrow side. Program (pid_n, pid_k) covers BLOCK_N outputs over the pid_k-th share
    # of K; weight and activation tiles arrive through TMA, several in flight.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_IS_NK:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1], block_shape=[BLOCK_K, BLOCK_N])
    off_n = pid_n * BLOCK_N
    offs_n = off_n + tl.arange(0, BLOCK_N)
    cols = tl.where(offs_n < N, offs_n, 0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * k_per_split
    k_last = tl.minimum(k_first + k_per_split, k_tiles)

    if a_ptr.dtype.element_ty == tl.int8:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for ki in range(k_first, k_last):
        a = a_desc.load([0, ki * BLOCK_K])
        if B_IS_NK:
            q = b_desc.load([off_n, ki * BLOCK_K])
        else:
            q = b_desc.load([ki * BLOCK_K, off_n]).T
        w = _weight_tile(q, a, w_scale_ptr, ki * BLOCK_K, cols, K, stride_wsn, stride_wsg, GROUP_K, BLOCK_K, 1, DOT_F32)
        acc = _dot(w, a.T, acc, DOT_F32, "ieee")

    offs_m = tl.arange(0, BLOCK_M)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        # Serial split-K (kernels/gemm.py's protocol): each split writes its partial sum;
        # the last split to arrive for this N tile (counted by an acq_rel atomic, so the
        # other partials are visible) adds them up, runs the epilogue, and zeroes the
        # counter for the next launch. int32 partials (w8a8) travel bit for bit through
        # the float32 workspace and add up exactly.
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + offs_m[None, :]
        slots = partial_ptr + pid_n * (SPLIT_K * BLOCK_N * BLOCK_M)
        tl.store(slots + pid_k * (BLOCK_N * BLOCK_M) + tile, acc.to(tl.float32, bitcast=True))
        arrived = tl.atomic_add(arrivals_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=acc.dtype)
            for split in range(SPLIT_K):
                part = tl.load(slots + split * (BLOCK_N * BLOCK_M) + tile, cache_modifier=".cg")
                total += part.to(acc.dtype, bitcast=True)
            tl.store(arrivals_ptr + pid_n, 0)
            out = _int8_epilogue(
                total.T, offs_m, offs_n, M, N, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr, stride_wsn, stride_as,
                GROUP_K, HAS_BIAS, ACTIVATION, c_ptr.dtype.element_ty, INTERPRETER,
            )  # fmt: skip
            tl.store(c_ptrs, out, mask=c_mask)
    else:
        out = _int8_epilogue(
            acc.T, offs_m, offs_n, M, N, bias_ptr, w_scale_ptr, a_scale_ptr, c_scale_ptr, stride_wsn, stride_as,
            GROUP_K, HAS_BIAS, ACTIVATION, c_ptr.dtype.element_ty, INTERPRETER,
        )  # fmt: skip
        tl.store(c_ptrs, out, mask=c_mask)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------


def check_weight_scales(weight: QuantizedWeight, k: int, n: int, name: str = "weight") -> None:
    """The scale shape a QuantizedWeight's granularity promises, on the data's device."""
    scale = weight.scale
    if scale.device != weight.data.device:
        raise LaunchError(f"{name} scale is on {scale.device} but its int8 data is on {weight.data.device}")
    if weight.group_size is None:
        if scale.shape != (n,):
            raise LaunchError(f"{name} has per-channel scales: scale must have shape ({n},), got {tuple(scale.shape)}")
        return
    g = weight.group_size
    if not isinstance(g, int) or g <= 0:
        raise LaunchError(f"{name} group_size must be a positive int, got {g!r}")
    groups = triton.cdiv(k, g)
    if scale.shape != (n, groups):
        raise LaunchError(
            f"{name} has group scales (group_size {g} over K={k}): scale must have shape ({n}, {groups}), "
            f"got {tuple(scale.shape)}"
        )


def check_scalar_scale(scale, device: torch.device, what: str) -> torch.Tensor:
    """A calibrated scale: a one-element float32 tensor on the input's device."""
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise LaunchError(f"{what} must be a one-element float32 tensor, got {scale!r}")
    if scale.dtype != torch.float32:
        raise LaunchError(f"{what} must be float32, got {scale.dtype}")
    if scale.device != device:
        raise LaunchError(f"{what} is on {scale.device} but the input is on {device}")
    return scale.reshape(1)


def launch_int8_weight_gemm(
    a2: torch.Tensor,
    a_scale: torch.Tensor | None,
    weight: QuantizedWeight,
    bias: torch.Tensor | None,
    out2: torch.Tensor,
    *,
    activation: str,
    weight_layout: str,
    path: str,
    c_scale: torch.Tensor | None = None,
) -> None:
    """Launch the int8-weight GEMM on checked operands: out2 = epilogue(a2 @ Wq^T).

    a2: [M, K], fp16/bf16 (w8a16) or int8 (w8a8, then `a_scale` is a float32 [M] per-row
    or one-element scale). out2: [M, N], a's dtype (w8a16), fp16/bf16/fp32 (w8a8
    dequantized), or int8 (w8a8 requantized with the one-element `c_scale`).
    path: "auto" (decode for M <= 16, else tma, where TMA can take the operands; else
        strided), "decode", "tma" or "strided".
    """
    m, k = a2.shape
    n = out2.shape[1]
    w = weight.data
    stride_bk, stride_bn = weight_strides(w, weight_layout)
    group_k = weight.group_size or 0
    scale = weight.scale
    stride_wsn = scale.stride(0)
    stride_wsg = scale.stride(1) if group_k else 0
    is_int8 = a2.dtype == torch.int8
    if is_int8 and a_scale is None:
        raise LaunchError("an int8 input needs its scale")
    stride_as = 0 if a_scale is None or a_scale.numel() == 1 else a_scale.stride(0)

    common = dict(
        GROUP_K=group_k,
        HAS_BIAS=bias is not None,
        ACTIVATION=activation,
        # bf16 under the CPU interpreter: see kernels/gemm.py's _dot and _weight_tile above
        DOT_F32=interpreting() and a2.dtype == torch.bfloat16,
        INTERPRETER=interpreting(),
    )
    # Pointers the kernel never reads when their flag is off still need a tensor.
    bias_arg = bias if bias is not None else scale
    a_scale_arg = a_scale if a_scale is not None else scale
    c_scale_arg = c_scale if c_scale is not None else scale

    if path not in ("auto", "tma", "decode", "strided"):
        raise LaunchError(f"path must be 'auto', 'tma', 'decode' or 'strided', got {path!r}")
    tma_ok = (
        _tma_supported(a2.device)
        and a2.stride(1) == 1
        and (stride_bk == 1 or stride_bn == 1)
        and _tma_aligned(a2, a2.stride(0))
        and _tma_aligned(w, stride_bn if stride_bk == 1 else stride_bk)
        and _tma_aligned(out2, out2.stride(0))
    )
    if path in ("tma", "decode") and not tma_ok:
        raise LaunchError(
            f"the {path} path needs TMA: an SM90+ GPU, unit inner strides and 16-byte aligned rows "
            "(int8 rows: a multiple of 16 elements; fp16/bf16 rows: a multiple of 8)"
        )
    if path == "decode" and m > DECODE_MAX_M:
        raise LaunchError(f"the decode path takes at most {DECODE_MAX_M} rows, got {m}")
    if path == "auto":
        path = ("decode" if m <= DECODE_MAX_M else "tma") if tma_ok else "strided"

    # Everything that selects a compiled kernel and its grid, for the launch cache.
    key = (
        path, a2.dtype, out2.dtype, None if bias is None else bias.dtype, m, n, k, a2.stride(0), a2.stride(1),
        stride_bk, stride_bn, out2.stride(0), stride_wsn, stride_wsg, stride_as, activation, group_k,
    )  # fmt: skip
    operands = (a2, w, out2, bias_arg, scale, a_scale_arg, c_scale_arg)
    if path == "strided":

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        args = (
            *operands, m, n, k, m_bucket(m),
            a2.stride(0), a2.stride(1), stride_bk, stride_bn, out2.stride(0), stride_wsn, stride_wsg, stride_as,
        )  # fmt: skip
        launch(_int8_weight_strided_kernel, grid, args, common, key)
        return

    ensure_tma_allocator()
    b_is_nk = stride_bk == 1
    sms = num_programs(a2.device)
    tma_args = (
        m, n, k, m_bucket(m),
        a2.stride(0), stride_bn if b_is_nk else stride_bk, out2.stride(0), stride_wsn, stride_wsg, stride_as,
    )  # fmt: skip
    constexprs = dict(B_IS_NK=b_is_nk, NUM_SMS=sms, **common)
    if path == "tma":

        def grid(meta):
            return (min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

        launch(_int8_weight_tma_kernel, grid, (*operands, *tma_args), constexprs, key)
    else:
        # The float decode kernel's workspace, sized for any config (BLOCK_N >= 32,
        # BLOCK_K >= 32): BLOCK_N * BLOCK_M partial sums per split of each N tile, at most
        # one split per 4 K tiles (kernels/gemm.py's _decode_split_k).
        tiles_n = triton.cdiv(n, 32)
        max_splits = max(1, triton.cdiv(k, 32) // 4)
        partial, arrivals = _split_k_workspace(a2.device, tiles_n * 32 * DECODE_MAX_M * max_splits, tiles_n)

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

        launch(_int8_weight_decode_kernel, grid, (*operands, partial, arrivals, *tma_args), constexprs, key)


def check_int8_weight(x: torch.Tensor, weight, bias, weight_layout: str, activation: str, name: str = "weight"):
    """Checks shared by the int8 launchers; returns (K, N)."""
    if activation not in ACTIVATIONS:
        raise LaunchError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(weight, QuantizedWeight):
        raise LaunchError(f"{name} must be a QuantizedWeight (int8 data and its scales), got {type(weight).__name__}")
    k, n = check_operands(x, weight.data, bias, weight_layout, name)
    check_weight_scales(weight, k, n, name)
    return k, n


def w8a16_linear(
    x: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    weight_layout: str = "out_in",
    path: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x @ dequant(weight)^T + bias) for fp16/bf16 x of shape [..., K]; returns [..., N] in x's dtype.

    weight: int8 data in `weight_layout` ("out_in" [N, K] or "in_out" [K, N]) with
        per-channel or per-group float32 scales.
    activation: "none", "erf" (exact GELU) or "tanh" (approximate GELU).
    path: "auto", "decode" (M <= 16), "tma" or "strided"; "decode" and "tma" raise if TMA
        cannot take the operands.
    out: a contiguous [..., N] tensor of x's dtype to write into (else one is allocated).
    """
    if x.dtype not in W8A16_DTYPES:
        raise LaunchError(f"w8a16 input dtype must be fp16 or bf16, got {x.dtype}")
    k, n = check_int8_weight(x, weight, bias, weight_layout, activation)
    if weight.smooth_scale is not None:
        raise LaunchError("weight carries a SmoothQuant smooth_scale, which only w8a8 applies (to its int8 input)")
    lead = x.shape[:-1]
    # (a view where strides allow; the kernels take any row stride. A reshape costs
    # microseconds of host time even as a no-op: 2-D tensors skip it.)
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    out = _output(out, (*lead, n), x)
    if x2.shape[0] > 0:
        launch_int8_weight_gemm(x2, None, weight, bias, out, activation=activation, weight_layout=weight_layout, path=path)
    return out if x.dim() == 2 else out.reshape(*lead, n)

