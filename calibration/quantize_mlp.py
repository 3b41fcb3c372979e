"""One MLP, quantized in memory: int8 weights with their scales, and for w8a8 the
static activation scales the fused kernels use.

w8a8 follows what the kernels compute:

    x_s = x / s                        SmoothQuant (s = 1 without --smooth), s folded into W1
    input_scale  = observer(x_s)       GEMM1's static input scale
    h = GELU(fq(x_s) @ dq(W1 * s)^T + b1), float32    what GEMM1's epilogue holds
    output_scale = observer(h)         h is requantized to it, so GEMM2 reads int8

fq is fake quantization with input_scale, dq the int8 weight dequantized. The output
scale is on W1 (`output_scale`, GEMM1 produces it) and on W2 (`input_scale`, GEMM2 reads it).
"""

from __future__ import annotations

import torch

from calibration.errors import OptionError
from calibration.observers import activation_scale
from calibration.options import SCHEMES
from kernels.int8 import fake_quantize, quantize_weight
from calibration.smooth import fold_into_weight, smooth_scale
from kernels.quantized import QuantizedWeight
from kernels.reference import linear_reference


def quantize_mlp(
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    x: torch.Tensor | None = None,
    *,
    scheme: str = "w8a16",
    weight_layout: str = "out_in",
    gelu: str = "erf",
    group_size: int | None = None,
    method: str = "max",
    smooth: float | None = None,
) -> tuple[QuantizedWeight, QuantizedWeight]:
    """(W1, W2) as int8 in their stored layout; w8a8 needs calibration inputs x [tokens, d_model].

    w8a16: weight scales only. w8a8: also W1.input_scale, W1.output_scale (= W2.input_scale)
    and, with `smooth` (an alpha), W1.smooth_scale.
    """
    if scheme not in SCHEMES:
        raise OptionError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    q2 = quantize_weight(w2, weight_layout=weight_layout, group_size=group_size)
    if scheme == "w8a16":
        if smooth is not None:
            raise OptionError("smoothing moves activation outliers into W1; it needs w8a8")
        return quantize_weight(w1, weight_layout=weight_layout, group_size=group_size), q2
    if x is None:
        raise OptionError("w8a8 needs calibration inputs to set its activation scales")
    if group_size is not None:
        raise OptionError("w8a8 takes per-channel weight scales; group scales are for w8a16")
    x = x.to(torch.float32)
    s = None
    if smooth is not None:
        s = smooth_scale(x, w1, smooth, weight_layout)
        w1 = fold_into_weight(w1, s, weight_layout)
        x = x / s
    q1 = quantize_weight(w1, weight_layout=weight_layout, group_size=group_size)
    q1.smooth_scale = s
    q1.input_scale = activation_scale(x, method)
    h = linear_reference(
        fake_quantize(x, q1.input_scale), q1.dequantize(weight_layout), b1,
        activation=gelu, weight_layout=weight_layout, dtype=torch.float32,
    )  # fmt: skip
    q1.output_scale = activation_scale(h, method)
    q2.input_scale = q1.output_scale.clone()
    return q1, q2
