"""Fused GEMM + bias + GELU on float weights: out = act(a @ W^T + bias), float32 accumulation.

This is the float half of the op: GEMM1 runs with a GELU flavour as `activation`, GEMM2
with `activation="none"`. A gated GEMM1 (GeGLU) passes the up projection too (`w_up`,
`b_up`) and gets GELU(a @ Wg^T + bg) * (a @ Wu^T + bu), both tiles from one kernel. `a` is fp16, bf16 or fp32; the weight has a's dtype and is read
in place in either layout (`out_in`: nn.Linear's [N, K]; `in_out`: Conv1D's [K, N]).

The three kernels are kernels/gemm_base.py's, shared with the int8-weight GEMM; this
module holds the float configs they are tuned over and the launcher:

- decode (M <= 64 = FLOAT_DECODE_MAX_M, TMA operands; M <= 16 for weights of more than
  FLOAT_DECODE_LARGE_WEIGHT elements): swap-AB, split-K;
- tma (M > 64, TMA operands): the persistent Hopper kernel, with split-K configs for the
  medium rows whose GEMM2 has fewer output tiles than there are SMs;
- strided: any strides and alignment.

`gemm_bias_act` is the launcher: it checks dtypes, shapes, strides and devices, and
kernels/gemm_base.py's `GemmLauncher` flattens leading dims, picks the kernel, allocates
the output, and keeps one launch plan per call signature, so a repeated call skips the
checks and launches the compiled kernel directly.
"""

from __future__ import annotations

import torch

from kernels.errors import LaunchError
from kernels.gemm_base import GemmLauncher, cfg, check_operands, gemm_kernels
from kernels.schemes import FLOAT_DTYPES, WeightLayout

# The float decode kernel streams the weight once for up to this many rows. It ran the
# rows up to 128 until the TMA kernel had split-K: at M = 128 the split TMA kernel took a
# 4096x16384 MLP's GEMMs in 47 + 51 us against decode's 68 + 54 (H200,
# bench/probe_medium_m.py, bench/RESULTS.md section 15).
FLOAT_DECODE_MAX_M = 64
# ... for weights of at most FLOAT_DECODE_LARGE_WEIGHT elements. A larger weight takes the
# decode kernel up to FLOAT_DECODE_LARGE_WEIGHT_MAX_M rows only: at 4096x16384 (67M
# elements a weight) the split TMA kernel ran the MLP at M = 32 and 64 in 91 and 86 us
# against decode's 106 and 101, while at 768x3072 (2.4M) decode ran 20.6 us against TMA's
# 24.4 (H200, bench/probe_small_m.py, bench/RESULTS.md section 15).
FLOAT_DECODE_LARGE_WEIGHT = 1 << 24
FLOAT_DECODE_LARGE_WEIGHT_MAX_M = 16

# ---------------------------------------------------------------------------------------
# Configs: keyed by m_bucket(M) (kernels/gemm_base.py)
# ---------------------------------------------------------------------------------------

# Decode (M <= 64) through TMA, swap-AB, split-K. Every config of a bucket has
# BLOCK_M >= the bucket's largest M: one M tile holds all rows. The last 16-row config
# fits fp32 tiles.
DECODE_CONFIGS = {
    16: [cfg(16, 64, 256, 4, 4), cfg(16, 64, 128, 4, 6), cfg(16, 128, 128, 4, 4),
         cfg(16, 128, 256, 4, 3), cfg(16, 64, 64, 4, 4)],
    64: [cfg(64, 64, 128, 4, 4), cfg(64, 128, 128, 4, 3), cfg(64, 64, 64, 4, 4)],
}  # fmt: skip

# 16 rows without TMA stream the weight: small N tiles give enough programs.
STRIDED_CONFIGS = {
    16: [cfg(16, 32, 256, 4, 4), cfg(16, 64, 128, 4, 5), cfg(16, 64, 256, 4, 4), cfg(16, 128, 128, 4, 4)],
    64: [cfg(64, 64, 64, 4, 4), cfg(64, 128, 64, 4, 4), cfg(32, 64, 128, 4, 4), cfg(64, 64, 32, 4, 3)],
    "large": [cfg(128, 128, 64, 8, 3), cfg(128, 128, 32, 4, 4), cfg(64, 128, 64, 4, 4), cfg(128, 256, 64, 8, 3)],
}  # fmt: skip

# Each list ends or starts with a config small enough for fp32 tiles' shared memory.
# Measured on the H100 (bench/RESULTS.md): 128x256x64 with the subtiled epilogue and a
# flattened or plain tile loop led at M >= 2048. (Those configs asked for warp
# specialization too, but at 8 warps Triton compiles the plain loop: bench/ws_survey.py.)
# From 65 to 1024 rows, the leaders of bench/probe_medium_m.py on an H200 (section 15),
# each allowed to split K: GEMM2 of a 4096x16384 MLP has 32 to 128 output tiles there, and
# split-K took it from 95 to 51 us at M = 128 and from 99 to 70 us at M = 256.
# Small tiles without split-K stay in each list for small models (768x3072: the whole
# GEMM is a few microseconds, and a split's reduction costs more than it spreads).
TMA_CONFIGS = {
    64: [cfg(64, 64, 128, 4, 4), cfg(64, 128, 64, 4, 4), cfg(64, 128, 128, 4, 3), cfg(64, 64, 32, 4, 3),
         cfg(64, 64, 128, 4, 4, MAX_SPLIT_K=8), cfg(64, 128, 64, 4, 4, MAX_SPLIT_K=8)],
    256: [
        cfg(128, 128, 128, 8, 3, MAX_SPLIT_K=8), cfg(128, 128, 64, 8, 4, MAX_SPLIT_K=8),
        cfg(64, 256, 64, 8, 4, EPILOGUE_SUBTILE=True, MAX_SPLIT_K=8),
        cfg(128, 256, 64, 8, 3, EPILOGUE_SUBTILE=True, MAX_SPLIT_K=8), cfg(64, 64, 128, 4, 4),
        cfg(64, 128, 64, 4, 4), cfg(64, 128, 32, 4, 3),
    ],
    1024: [
        cfg(128, 256, 64, 8, 3, EPILOGUE_SUBTILE=True, MAX_SPLIT_K=8), cfg(128, 128, 64, 4, 4, MAX_SPLIT_K=8),
        cfg(128, 128, 128, 8, 3, MAX_SPLIT_K=8), cfg(128, 256, 64, 8, 3, EPILOGUE_SUBTILE=True, FLATTEN=True),
        cfg(64, 128, 64, 4, 4), cfg(64, 64, 128, 4, 4), cfg(128, 128, 32, 8, 3),
    ],
    "large": [
        cfg(128, 256, 64, 8, 3, EPILOGUE_SUBTILE=True, FLATTEN=True),
        cfg(128, 256, 64, 8, 3, EPILOGUE_SUBTILE=True),
        cfg(128, 256, 64, 8, 3, FLATTEN=True), cfg(128, 128, 64, 8, 4, FLATTEN=True),
        cfg(128, 128, 64, 4, 4, EPILOGUE_SUBTILE=True, FLATTEN=True), cfg(128, 128, 32, 8, 3),
        cfg(256, 128, 64, 4, 3, WARP_SPECIALIZE=True),
    ],
}  # fmt: skip
# Warp-specialized tile loops: a producer warp group issues the TMA loads and two consumer
# groups each take half of the tile's rows (the MMAs and the epilogue), so the next tile's
# loads run under this tile's epilogue. Triton does this on sm_90 only for configs of 4
# warps (a group's: 12 in all); at 8 warps the flag compiles to the plain loop, and with the
# subtiled epilogue the compiler aborts (bench/ws_survey.py). These compile for sm_90 under
# triton 3.6 and 3.9. They join a table once a GPU has run each (the `gpu` test
# test_warp_specialized_candidates) and timed it ahead (bench/probe_float.py --wide,
# bench/RESULTS.md section 21): 256x128x64 led GEMM1 of a 4096x16384 MLP at M = 2048 on an
# H200, 413.6 us against the plain loop's best 421.5 (section 22), and joined "large".
TMA_WS_CANDIDATES = [
    cfg(128, 128, 64, 4, 4, WARP_SPECIALIZE=True), cfg(128, 256, 64, 4, 3, WARP_SPECIALIZE=True),
    cfg(128, 128, 128, 4, 3, WARP_SPECIALIZE=True), cfg(256, 128, 64, 4, 3, WARP_SPECIALIZE=True),
]  # fmt: skip

# Gated GEMM1 (two accumulators, gate and up): the plain tables' tiles at half the N
# width, so the two [128, 128] accumulators of the large configs hold what one [128, 256]
# does; the subtiled epilogue keeps the GELU and the product on [128, 64] halves.
GATED_DECODE_CONFIGS = {
    16: [cfg(16, 64, 128, 4, 6), cfg(16, 64, 64, 4, 4)],
    64: [cfg(64, 64, 128, 4, 4), cfg(64, 64, 64, 4, 4), cfg(64, 128, 64, 8, 3)],
    256: [cfg(128, 64, 64, 8, 3), cfg(128, 64, 128, 8, 3), cfg(128, 32, 64, 4, 3)],
}  # fmt: skip
GATED_STRIDED_CONFIGS = {
    16: [cfg(16, 32, 256, 4, 4), cfg(16, 64, 128, 4, 4), cfg(16, 32, 128, 4, 5)],
    64: [cfg(64, 64, 64, 4, 4), cfg(32, 64, 128, 4, 4), cfg(64, 64, 32, 4, 3)],
    "large": [cfg(128, 128, 64, 8, 3), cfg(128, 64, 64, 4, 4), cfg(64, 128, 64, 4, 4), cfg(128, 128, 32, 8, 3)],
}  # fmt: skip
GATED_TMA_CONFIGS = {
    64: [cfg(64, 64, 128, 4, 4), cfg(64, 64, 64, 4, 4), cfg(64, 128, 64, 4, 3), cfg(64, 64, 32, 4, 3)],
    256: [cfg(64, 128, 64, 4, 4), cfg(128, 64, 64, 4, 4), cfg(128, 128, 64, 8, 3), cfg(64, 64, 32, 4, 3)],
    "large": [
        cfg(128, 128, 64, 8, 3, EPILOGUE_SUBTILE=True, FLATTEN=True),
        cfg(128, 128, 64, 8, 3, EPILOGUE_SUBTILE=True),
        cfg(128, 128, 64, 8, 4, EPILOGUE_SUBTILE=True), cfg(128, 128, 64, 8, 3, FLATTEN=True),
        cfg(128, 64, 64, 4, 4, FLATTEN=True), cfg(128, 128, 32, 8, 3),
    ],
}  # fmt: skip
# No warp-specialized gated configs: on an H200 with triton 3.6, 128x128x64 (3 and 4 stages)
# and 256x64x64 at 4 warps compiled without error and then left outputs unwritten or wrong
# (NaN from the poisoned output; bench/RESULTS.md section 21).

_GEMM = GemmLauncher(
    gemm_kernels(
        strided={"float": STRIDED_CONFIGS, "float-gated": GATED_STRIDED_CONFIGS},
        tma={"float": TMA_CONFIGS, "float-gated": GATED_TMA_CONFIGS},
        decode={"float": DECODE_CONFIGS, "float-gated": GATED_DECODE_CONFIGS},
        decode_max_m=FLOAT_DECODE_MAX_M,
        large_weight=FLOAT_DECODE_LARGE_WEIGHT,
        large_weight_decode_max_m=FLOAT_DECODE_LARGE_WEIGHT_MAX_M,
    )
)
_gemm_strided_kernel = _GEMM.kernels.strided
_gemm_tma_kernel = _GEMM.kernels.tma
_gemm_decode_kernel = _GEMM.kernels.decode


def gemm_bias_act(
    a: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    weight_layout: str | WeightLayout = "out_in",
    allow_tf32: bool = False,
    path: str = "auto",
    out: torch.Tensor | None = None,
    w_up: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(a @ W^T + bias) for a of shape [..., K]; returns [..., N] in a's dtype.

    activation: "none" or a GELU flavour: "erf" (exact), "tanh" (approximate) or "quick".
    weight_layout: "out_in" for W stored [N, K], "in_out" for W stored [K, N].
    allow_tf32: let fp32 inputs use TF32 tensor cores (about 1e-3 relative error).
    path: "auto", "tma", "decode" (M <= 64) or "strided"; "tma" and "decode" raise if
        TMA cannot take the inputs.
    out: a contiguous [..., N] tensor of a's dtype to write into (else one is allocated).
    w_up, b_up: a gated GEMM1's up projection (W's shape, layout and strides: its own
        weight, or the other half of a concatenated one; b_up where bias is given): returns
        act(a @ W^T + bias) * (a @ Wup^T + b_up), the product in float32, rounded once.
    """

    def check(layout: WeightLayout) -> tuple[int, int]:
        if a.dtype not in FLOAT_DTYPES.values():
            raise LaunchError(f"input dtype must be fp16, bf16 or fp32, got {a.dtype}")
        if w.dtype != a.dtype:
            raise LaunchError(f"weight dtype {w.dtype} differs from input dtype {a.dtype}")
        if w_up is None and b_up is not None:
            raise LaunchError("b_up is the bias of a gated GEMM1's up projection; pass w_up too")
        return check_operands(a, w, bias, layout)

    return _GEMM.run(
        check, (activation, weight_layout, allow_tf32, path), a, w, bias, weight_layout=weight_layout,
        activation=activation, path=path, out=out, out_dtype=a.dtype, input_precision="tf32" if allow_tf32 else "ieee",
        w_up=w_up, up_bias=b_up,
    )  # fmt: skip
