"""The int8-weight GEMM both int8 schemes run: out = epilogue(a @ dequant(Wq)^T).

The weight is a `QuantizedWeight`: int8 values in the checkpoint's layout (`out_in`
[N, K] or `in_out` [K, N]) and float32 scales, per output channel ([N]) or per group of
`group_size` inputs along K ([N, ceil(K / G)]). It is never dequantized in memory: each
int8 tile is converted in registers inside the main loop. The dtype of `a` picks the
scheme at compile time:

- fp16/bf16 `a` (w8a16, kernels/w8a16.py): the int8 tile is converted to a's dtype,
  which holds every value in [-127, 127] exactly, and goes to the fp16/bf16 tensor cores
  with float32 accumulation. A per-channel scale is constant along K, so it multiplies
  the accumulator once, in the epilogue. A per-group scale changes along K: it
  multiplies the tile in the loop (w = q * scale rounded once to a's dtype; for fp16 the
  scale is rounded to fp16 first and multiplies in fp16). From M > 16 the TMA path runs
  the swap-AB schedule (out^T = W @ a^T) where autotuning finds it faster.
- int8 `a` (w8a8, kernels/w8a8.py): both int8 tiles go to the int8 tensor cores as they
  are, with exact int32 accumulation (split-K partials added in int32 too). The
  epilogue dequantizes with a's scale (one per row, or one scalar) times the weight's
  per-channel scale and, when the output buffer is int8, requantizes with the
  calibrated output scale. With per-group scales of `a` (`a_group_k`, w8a8 `group:N`)
  each K tile is one group and its int32 partial is promoted into a float32
  accumulator times the group's scale; with `c_group_n` the int8 output is requantized
  per (row, group of columns), the kernel writing those scales.

The kernels are kernels/gemm_base.py's (decode for M <= 16 = INT8_DECODE_MAX_M, the
persistent TMA kernel, the strided fallback: TMA needs 16-byte aligned rows, K % 16 == 0
for an int8 [.., K] operand, % 8 for fp16/bf16); this module holds the configs they are
tuned over for each scheme and `int8_weight_gemm`, the launcher both schemes call; the
base's GemmLauncher keeps one launch plan per call signature, for int8 as for float.
"""

from __future__ import annotations

from typing import Callable

import torch

from kernels.errors import LaunchError
from kernels.gemm_base import GemmLauncher, cfg, check_operands, gemm_kernels
from kernels.quantized import QuantizedWeight
from kernels.schemes import Granularity, WeightLayout

# Decode streams the int8 weight once for up to this many rows.
INT8_DECODE_MAX_M = 16

# ---------------------------------------------------------------------------------------
# Configs, per scheme, keyed by m_bucket(M) (kernels/gemm_base.py). The int8 x int8 dot
# eats twice the K per byte of shared memory, so w8a8 tiles are twice as deep.
# ---------------------------------------------------------------------------------------

# Decode (M <= 16) through TMA, swap-AB, split-K: BLOCK_N is the MMA's wide side (a
# multiple of 64 for wgmma); deep K tiles and stages keep weight bytes in flight.
W8A16_DECODE_CONFIGS = {
    16: [cfg(16, 64, 256, 4, 4), cfg(16, 64, 512, 4, 3), cfg(16, 128, 256, 4, 4), cfg(16, 64, 128, 4, 6),
         cfg(16, 128, 128, 4, 5)],
}  # fmt: skip
W8A8_DECODE_CONFIGS = {
    16: [cfg(16, 64, 256, 4, 4), cfg(16, 64, 512, 4, 4), cfg(16, 128, 256, 4, 4), cfg(16, 128, 512, 4, 3),
         cfg(16, 64, 256, 4, 6)],
}  # fmt: skip
# Decode without TMA streams the int8 weight: BLOCK_K 128..512 deep, 4..6 stages.
W8A16_STRIDED_CONFIGS = {
    16: [cfg(16, 32, 256, 4, 4), cfg(16, 32, 512, 4, 4), cfg(16, 16, 512, 4, 6), cfg(16, 64, 256, 4, 5),
         cfg(16, 32, 128, 4, 6), cfg(16, 64, 128, 4, 6)],
    64: [cfg(64, 64, 64, 4, 4), cfg(32, 64, 128, 4, 4), cfg(64, 128, 64, 4, 4)],
    "large": [cfg(128, 128, 64, 8, 3), cfg(128, 256, 64, 8, 3), cfg(64, 128, 64, 4, 4)],
}  # fmt: skip
W8A8_STRIDED_CONFIGS = {
    16: [cfg(16, 32, 256, 4, 4), cfg(16, 32, 512, 4, 4), cfg(16, 16, 512, 4, 6), cfg(16, 64, 256, 4, 5),
         cfg(16, 64, 512, 4, 4)],
    64: [cfg(64, 64, 128, 4, 4), cfg(32, 64, 256, 4, 4), cfg(64, 128, 128, 4, 4)],
    "large": [cfg(128, 128, 128, 8, 3), cfg(128, 256, 128, 8, 3), cfg(64, 128, 128, 4, 4)],
}  # fmt: skip
# w8a16 through TMA: the swap-AB schedule (out^T = W @ a^T, the converted weight tile as
# the MMA's register operand; bench/RESULTS.md section 8 measured it 1.2-2.4x faster than
# converting the tile as the B operand, which wgmma reads from shared memory only), with
# the plain schedule kept as an alternative for the autotuner. Large M: 128x256x64 with 4
# stages and the plain tile loop was the probe's fastest (it asked for warp specialization,
# which Triton does not do at 8 warps: bench/ws_survey.py).
W8A16_TMA_CONFIGS = {
    64: [cfg(64, 128, 128, 4, 4, SWAP_AB=True), cfg(32, 128, 128, 4, 5, SWAP_AB=True), cfg(64, 64, 128, 4, 4)],
    256: [cfg(128, 128, 128, 8, 4, SWAP_AB=True, FLATTEN=True), cfg(64, 128, 128, 4, 4, SWAP_AB=True),
          cfg(64, 128, 128, 4, 4, SWAP_AB=True, MAX_SPLIT_K=8), cfg(64, 128, 64, 4, 4)],
    "large": [
        cfg(128, 256, 64, 8, 4, SWAP_AB=True),
        cfg(128, 256, 64, 8, 4, SWAP_AB=True, FLATTEN=True),
        cfg(128, 128, 128, 8, 4, SWAP_AB=True, FLATTEN=True),
        cfg(128, 256, 64, 8, 3, EPILOGUE_SUBTILE=True),
    ],
}  # fmt: skip
# 128x256x128: 48 KiB of int8 tiles a stage; the subtiled epilogue halves the output
# staging buffer (and the live registers of the GELU), leaving room for a 4th stage.
# From 17 to 1024 rows, bench/probe_medium_m.py's leaders on an H200 (bench/RESULTS.md
# section 15), each allowed to split K where GEMM2 has fewer tiles than SMs.
W8A8_TMA_CONFIGS = {
    64: [cfg(64, 128, 128, 4, 4, MAX_SPLIT_K=8), cfg(64, 64, 256, 4, 4, MAX_SPLIT_K=8), cfg(64, 128, 256, 4, 3),
         cfg(64, 128, 128, 4, 4)],
    256: [
        cfg(64, 256, 128, 8, 4, EPILOGUE_SUBTILE=True), cfg(128, 128, 128, 8, 4, MAX_SPLIT_K=8),
        cfg(64, 64, 256, 4, 4, MAX_SPLIT_K=8), cfg(128, 256, 128, 8, 3, EPILOGUE_SUBTILE=True, MAX_SPLIT_K=8),
        cfg(64, 128, 128, 4, 4), cfg(64, 64, 256, 4, 4),
    ],
    1024: [
        cfg(128, 256, 128, 8, 3, EPILOGUE_SUBTILE=True, MAX_SPLIT_K=8), cfg(128, 128, 128, 8, 4, MAX_SPLIT_K=8),
        cfg(64, 256, 128, 8, 4, EPILOGUE_SUBTILE=True), cfg(128, 256, 128, 8, 3, EPILOGUE_SUBTILE=True, FLATTEN=True),
        cfg(64, 128, 128, 4, 4),
    ],
    "large": [
        cfg(128, 256, 128, 8, 3, EPILOGUE_SUBTILE=True, FLATTEN=True),
        cfg(128, 256, 128, 8, 3, EPILOGUE_SUBTILE=True),
        cfg(128, 256, 128, 8, 4, EPILOGUE_SUBTILE=True), cfg(128, 128, 128, 8, 4, FLATTEN=True),
        cfg(128, 256, 128, 8, 3), cfg(128, 128, 128, 4, 4, EPILOGUE_SUBTILE=True, FLATTEN=True),
        cfg(256, 128, 128, 8, 3, EPILOGUE_SUBTILE=True),
    ],
}  # fmt: skip
# No warp-specialized w8a8 configs: on an H200 with triton 3.6, 128x128x128 and 128x256x128
# at 4 warps compiled without error and then gave int8 results off by up to 92 from the
# reference (bench/RESULTS.md section 21).
# w8a8 group:N (written for N = 128; kernels/gemm_base.py's fit_groups sets BLOCK_K = N and
# makes the epilogue tile hold whole groups for other N). Every K tile's partial is
# promoted into the float32 accumulator, which waits on each MMA: the probe measured the
# plain tile loop 5% ahead of the flattened one (it asked for warp specialization, which at
# 8 warps compiles to the plain loop: bench/ws_survey.py), and 64-row tiles far behind.
W8A8_GROUP_DECODE_CONFIGS = {
    16: [cfg(16, 128, 128, 4, 6), cfg(16, 64, 128, 4, 6), cfg(16, 128, 128, 4, 4)],
}  # fmt: skip
W8A8_GROUP_STRIDED_CONFIGS = {
    16: [cfg(16, 128, 128, 4, 4), cfg(16, 64, 128, 4, 5)],
    64: [cfg(64, 128, 128, 4, 4), cfg(32, 128, 128, 4, 4)],
    "large": [cfg(128, 128, 128, 8, 3), cfg(128, 256, 128, 8, 3), cfg(64, 128, 128, 4, 4)],
}  # fmt: skip
W8A8_GROUP_TMA_CONFIGS = {
    64: [cfg(64, 128, 128, 4, 4), cfg(64, 256, 128, 8, 3, EPILOGUE_SUBTILE=True)],
    256: [cfg(128, 128, 128, 8, 4), cfg(128, 256, 128, 8, 3, EPILOGUE_SUBTILE=True),
          cfg(64, 128, 128, 4, 4)],
    "large": [
        cfg(128, 256, 128, 8, 3, EPILOGUE_SUBTILE=True),
        cfg(128, 256, 128, 8, 3, EPILOGUE_SUBTILE=True, FLATTEN=True),
        cfg(128, 128, 128, 8, 4),
        cfg(128, 256, 128, 8, 4, EPILOGUE_SUBTILE=True),
    ],
}  # fmt: skip

# Gated GEMM1 (gate and up accumulators side by side): each scheme's tiles at half the N
# width (two [128, 128] accumulators where the plain kernel holds one [128, 256]).
W8A16_GATED_DECODE_CONFIGS = {
    16: [cfg(16, 64, 256, 4, 4), cfg(16, 64, 512, 4, 3), cfg(16, 128, 256, 4, 4), cfg(16, 64, 128, 4, 6)],
}  # fmt: skip
W8A8_GATED_DECODE_CONFIGS = {
    16: [cfg(16, 64, 256, 4, 4), cfg(16, 64, 512, 4, 3), cfg(16, 64, 128, 4, 6)],
}  # fmt: skip
W8A8_GROUP_GATED_DECODE_CONFIGS = {
    16: [cfg(16, 64, 128, 4, 6), cfg(16, 128, 128, 4, 4)],
}  # fmt: skip
W8A16_GATED_STRIDED_CONFIGS = {
    16: [cfg(16, 32, 256, 4, 4), cfg(16, 32, 512, 4, 4), cfg(16, 64, 256, 4, 4)],
    64: [cfg(64, 64, 64, 4, 4), cfg(32, 64, 128, 4, 4)],
    "large": [cfg(128, 128, 64, 8, 3), cfg(64, 128, 64, 4, 4), cfg(128, 64, 64, 4, 4)],
}  # fmt: skip
W8A8_GATED_STRIDED_CONFIGS = {
    16: [cfg(16, 32, 256, 4, 4), cfg(16, 32, 512, 4, 4), cfg(16, 64, 256, 4, 4)],
    64: [cfg(64, 64, 128, 4, 4), cfg(32, 64, 256, 4, 4)],
    "large": [cfg(128, 128, 128, 8, 3), cfg(64, 128, 128, 4, 4), cfg(128, 64, 128, 4, 4)],
}  # fmt: skip
W8A8_GROUP_GATED_STRIDED_CONFIGS = {
    16: [cfg(16, 64, 128, 4, 4), cfg(16, 128, 128, 4, 4)],
    64: [cfg(64, 64, 128, 4, 4), cfg(32, 128, 128, 4, 4)],
    "large": [cfg(128, 128, 128, 8, 3), cfg(64, 128, 128, 4, 4)],
}  # fmt: skip
W8A16_GATED_TMA_CONFIGS = {
    64: [cfg(64, 64, 128, 4, 4, SWAP_AB=True), cfg(32, 64, 128, 4, 5, SWAP_AB=True), cfg(64, 64, 128, 4, 4)],
    256: [cfg(128, 64, 128, 8, 4, SWAP_AB=True, FLATTEN=True), cfg(64, 128, 128, 4, 4, SWAP_AB=True),
          cfg(64, 64, 64, 4, 4)],
    "large": [
        cfg(128, 128, 64, 8, 4, SWAP_AB=True),
        cfg(128, 128, 64, 8, 4, SWAP_AB=True, FLATTEN=True),
        cfg(128, 128, 64, 8, 3, EPILOGUE_SUBTILE=True, FLATTEN=True),
    ],
}  # fmt: skip
# 128x128x128 gated: 48 KiB of int8 tiles a stage (a, gate, up).
W8A8_GATED_TMA_CONFIGS = {
    64: [cfg(64, 64, 256, 4, 4), cfg(64, 128, 128, 4, 4)],
    256: [cfg(128, 64, 128, 4, 4), cfg(64, 128, 128, 4, 4), cfg(128, 128, 128, 8, 3)],
    "large": [
        cfg(128, 128, 128, 8, 3, EPILOGUE_SUBTILE=True, FLATTEN=True),
        cfg(128, 128, 128, 8, 3, EPILOGUE_SUBTILE=True),
        cfg(128, 128, 128, 8, 4, EPILOGUE_SUBTILE=True), cfg(128, 128, 128, 8, 4, FLATTEN=True),
        cfg(128, 128, 128, 8, 3),
    ],
}  # fmt: skip
W8A8_GROUP_GATED_TMA_CONFIGS = {
    64: [cfg(64, 128, 128, 4, 4), cfg(64, 64, 128, 4, 4)],
    256: [cfg(128, 128, 128, 8, 3), cfg(64, 128, 128, 4, 4)],
    "large": [
        cfg(128, 128, 128, 8, 3), cfg(128, 128, 128, 8, 3, FLATTEN=True),
        cfg(128, 128, 128, 8, 4),
    ],
}  # fmt: skip

_GEMM = GemmLauncher(
    gemm_kernels(
        strided={"w8a16": W8A16_STRIDED_CONFIGS, "w8a8": W8A8_STRIDED_CONFIGS, "w8a8-group": W8A8_GROUP_STRIDED_CONFIGS,
                 "w8a16-gated": W8A16_GATED_STRIDED_CONFIGS, "w8a8-gated": W8A8_GATED_STRIDED_CONFIGS,
                 "w8a8-group-gated": W8A8_GROUP_GATED_STRIDED_CONFIGS},
        tma={"w8a16": W8A16_TMA_CONFIGS, "w8a8": W8A8_TMA_CONFIGS, "w8a8-group": W8A8_GROUP_TMA_CONFIGS,
             "w8a16-gated": W8A16_GATED_TMA_CONFIGS, "w8a8-gated": W8A8_GATED_TMA_CONFIGS,
             "w8a8-group-gated": W8A8_GROUP_GATED_TMA_CONFIGS},
        decode={"w8a16": W8A16_DECODE_CONFIGS, "w8a8": W8A8_DECODE_CONFIGS, "w8a8-group": W8A8_GROUP_DECODE_CONFIGS,
                "w8a16-gated": W8A16_GATED_DECODE_CONFIGS, "w8a8-gated": W8A8_GATED_DECODE_CONFIGS,
                "w8a8-group-gated": W8A8_GROUP_GATED_DECODE_CONFIGS},
        decode_max_m=INT8_DECODE_MAX_M,
    )
)  # fmt: skip
_int8_weight_strided_kernel = _GEMM.kernels.strided
_int8_weight_tma_kernel = _GEMM.kernels.tma
_int8_weight_decode_kernel = _GEMM.kernels.decode

# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------


def check_weight_scales(weight: QuantizedWeight, k: int, n: int, name: str = "weight") -> None:
    """The scale shape a QuantizedWeight's granularity promises, on the data's device."""
    scale = weight.scale
    if scale.device != weight.data.device:
        raise LaunchError(f"{name} scale is on {scale.device} but its int8 data is on {weight.data.device}")
    granularity = Granularity(weight.group_size)
    want = granularity.scale_shape(n, k)
    if tuple(scale.shape) != want:
        what = "per-channel scales" if granularity.per_channel else f"group scales (group_size {weight.group_size} over K={k})"
        raise LaunchError(f"{name} has {what}: scale must have shape {want}, got {tuple(scale.shape)}")


def int8_weight_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    weight: QuantizedWeight,
    bias: torch.Tensor | None,
    *,
    activation: str,
    weight_layout: str | WeightLayout,
    path: str,
    out: torch.Tensor | None,
    out_dtype: torch.dtype,
    c_scale: torch.Tensor | None,
    check: Callable[[], None],
    a_group_k: int = 0,
    c_group_n: int = 0,
    up: QuantizedWeight | None = None,
    up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """epilogue(a @ dequant(weight)^T) for a of shape [..., K]; returns [..., N] in out_dtype.

    a: fp16/bf16 (w8a16) or int8 (w8a8, then `a_scale` is its float32 scale: one per row
        of a, shape [...], or one element; with a_group_k, one per row per a_group_k
        along K, shape [..., cdiv(K, a_group_k)]).
    out_dtype: a's dtype (w8a16), fp16/bf16/fp32 (w8a8 dequantized), or int8 (w8a8
        requantized with the one-element `c_scale`, or with c_group_n per row per
        c_group_n columns, the scales written into `c_scale` [..., cdiv(N, c_group_n)]).
    path: "auto" (decode for M <= 16, else tma, where TMA can take the operands; else
        strided), "decode", "tma" or "strided".
    check: the scheme's own checks of these arguments, run with the shared ones when the
        call's signature has no plan yet.
    up, up_bias: a gated GEMM1's up projection (a QuantizedWeight of weight's shape,
        layout and granularity, and its bias where `bias` is given): the epilogue
        dequantizes both accumulators, each with its own scales, and computes
        act(gate) * up before the output step (w8a8: the product is requantized).
    """
    if not isinstance(weight, QuantizedWeight):
        raise LaunchError(f"weight must be a QuantizedWeight (int8 data and its scales), got {type(weight).__name__}")
    if up is not None and not isinstance(up, QuantizedWeight):
        raise LaunchError(f"up must be a QuantizedWeight (int8 data and its scales), got {type(up).__name__}")

    def check_all(layout: WeightLayout) -> tuple[int, int]:
        check()
        k, n = check_operands(a, weight.data, bias, layout)
        check_weight_scales(weight, k, n)
        if up is not None:
            if up.group_size != weight.group_size:
                raise LaunchError(f"the up weight has {up.granularity} scales, the gate {weight.granularity}")
            check_weight_scales(up, k, n, "up weight")
        elif up_bias is not None:
            raise LaunchError("up_bias is the bias of a gated GEMM1's up projection; pass up too")
        return k, n

    group_size = weight.group_size
    options = (activation, weight_layout, path, out_dtype, group_size, weight.smooth_scale is None, a_group_k, c_group_n)
    return _GEMM.run(
        check_all, options, a, weight.data, bias, weight_layout=weight_layout, activation=activation, path=path,
        out=out, out_dtype=out_dtype, w_scale=weight.scale, a_scale=a_scale, c_scale=c_scale, group_k=group_size or 0,
        a_group_k=a_group_k, c_group_n=c_group_n,
        w_up=None if up is None else up.data, up_bias=up_bias, up_scale=None if up is None else up.scale,
    )  # fmt: skip
