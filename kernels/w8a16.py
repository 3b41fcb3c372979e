"""w8a16: int8 weights, fp16/bf16 activations.

    out = act(x @ dequant(Wq)^T + bias)        act: "none" or a GELU flavour

The GEMM is kernels/int8_gemm.py's: each int8 weight tile is converted in registers
inside the main loop (per-channel scales in the epilogue, per-group scales on the tile),
never dequantized in memory.
"""

from __future__ import annotations

import torch

from kernels.errors import LaunchError
from kernels.int8_gemm import int8_weight_gemm
from kernels.quantized import QuantizedWeight
from kernels.schemes import ACTIVATION_DTYPES, WeightLayout


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
    path: "auto", "decode" (M <= 16), "tma" or "strided"; "decode" and "tma" raise if TMA
        cannot take the operands.
    up, up_bias: a gated GEMM1's up projection (weight's shape, layout and granularity):
        act(... + bias) * (the same GEMM on up + up_bias), each dequantized with its own scales.
    out: a contiguous [..., N] tensor of x's dtype to write into (else one is allocated).
    """

    def check():
        if x.dtype not in ACTIVATION_DTYPES.values():
            raise LaunchError(f"w8a16 input dtype must be fp16 or bf16, got {x.dtype}")
        if weight.smooth_scale is not None:
            raise LaunchError("weight carries a SmoothQuant smooth_scale, which only w8a8 applies (to its int8 input)")

    return int8_weight_gemm(
        x, None, weight, bias, activation=activation, weight_layout=weight_layout, path=path, out=out,
        out_dtype=x.dtype, c_scale=None, check=check, up=up, up_bias=up_bias,
    )  # fmt: skip
