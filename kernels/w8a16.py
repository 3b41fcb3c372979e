"""w8a16: int8 weights, fp16/bf16 activations.

    out = act(x @ dequant(Wq)^T + bias)        act: "none" or a GELU flavour

Up to W8A16_DEQUANT_MIN_M rows the GEMM is kernels/int8_gemm.py's: each int8 weight tile
is converted in registers inside the main loop (per-channel scales in the epilogue,
per-group scales on the tile), never dequantized in memory; there the weight's bytes bound
the time. From W8A16_DEQUANT_MIN_M rows on, a per-group weight is dequantized to a 16-bit
copy for the call (kernels/dequant.py, the same values as the in-loop tiles) and the float
kernel (kernels/gemm.py) runs on it: there the tensor cores bound the time, and the in-loop
conversion costs more than one pass over the weight.
"""

from __future__ import annotations

import torch

from kernels.dequant import dequantize_group_weight
from kernels.errors import LaunchError
from kernels.gemm import gemm_bias_act
from kernels.int8_gemm import check_weight_scales, int8_weight_gemm
from kernels.quantized import QuantizedWeight
from kernels.schemes import ACTIVATION_DTYPES, WeightLayout


# Rows from which a per-group weight takes the dequantize-then-float-GEMM schedule ("auto").
# Measured on an H100/H200 (bench/RESULTS.md): the in-loop conversion runs at ~0.63x fp16
# eager at M = 2048 and 8192, the dequantize pass costs ~2 x 60 us per MLP at 4096x16384.
W8A16_DEQUANT_MIN_M = 512


def w8a16_linear(
    x: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    weight_layout: str | WeightLayout = "out_in",
    path: str = "auto",
    out: torch.Tensor | None = None,
    up: QuantizedWeight | None = None,
    up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x @ dequant(weight)^T + bias) for fp16/bf16 x of shape [..., K]; returns [..., N] in x's dtype.

    weight: int8 data in `weight_layout` ("out_in" [N, K] or "in_out" [K, N]) with
        per-channel or per-group float32 scales.
    activation: "none" or a GELU flavour: "erf" (exact), "tanh" (approximate) or "quick".
    path: "auto", "decode" (M <= 16), "tma", "strided" or "dequant"; "decode" and "tma"
        raise if TMA cannot take the operands; "dequant" (per-group weights only) dequantizes
        the weight to x's dtype and runs the float GEMM, what "auto" picks from
        W8A16_DEQUANT_MIN_M rows on.
    up, up_bias: a gated GEMM1's up projection (weight's shape, layout and granularity):
        act(... + bias) * (the same GEMM on up + up_bias), each dequantized with its own scales.
    out: a contiguous [..., N] tensor of x's dtype to write into (else one is allocated).
    """

    def check():
        if x.dtype not in ACTIVATION_DTYPES.values():
            raise LaunchError(f"w8a16 input dtype must be fp16 or bf16, got {x.dtype}")
        if weight.smooth_scale is not None:
            raise LaunchError("weight carries a SmoothQuant smooth_scale, which only w8a8 applies (to its int8 input)")

    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    per_group = getattr(weight, "group_size", None) is not None
    if path == "dequant" or (path == "auto" and per_group and rows >= W8A16_DEQUANT_MIN_M):
        return _dequant_then_gemm(x, weight, bias, activation, weight_layout, out, up, up_bias, check)
    return int8_weight_gemm(
        x, None, weight, bias, activation=activation, weight_layout=weight_layout, path=path, out=out,
        out_dtype=x.dtype, c_scale=None, check=check, up=up, up_bias=up_bias,
    )  # fmt: skip


def _dequant_then_gemm(x, weight, bias, activation, weight_layout, out, up, up_bias, check):
    if not isinstance(weight, QuantizedWeight) or (up is not None and not isinstance(up, QuantizedWeight)):
        raise LaunchError("weight and up must be QuantizedWeights (int8 data and its scales)")
    check()
    if weight.group_size is None or (up is not None and up.group_size != weight.group_size):
        raise LaunchError("the dequant path needs per-group scales (the same group size for gate and up)")
    layout = WeightLayout.parse(weight_layout)
    if weight.data.dim() != 2:
        raise LaunchError(f"weight data must be 2-D, got shape {tuple(weight.data.shape)}")
    k = x.shape[-1]
    n = layout.kn_shape(weight.data)[1]
    check_weight_scales(weight, k, n)
    w = dequantize_group_weight(weight, x.dtype, layout)
    w_up = None
    if up is not None:
        check_weight_scales(up, k, n, "up weight")
        w_up = dequantize_group_weight(up, x.dtype, layout)
    return gemm_bias_act(x, w, bias, activation=activation, weight_layout=layout, out=out, w_up=w_up, b_up=up_bias)
