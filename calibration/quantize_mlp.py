"""One MLP, quantized in memory: int8 weights with their scales, and for w8a8 the
static activation scales the fused kernels use.

w8a8 follows what the kernels compute:

    x_s = x / s                        SmoothQuant (s = 1 without --smooth), s folded into W1
    input_scale  = observer(x_s)       GEMM1's static input scale
    h = GELU(fq(x_s) @ dq(W1 * s)^T + b1), float32    what GEMM1's epilogue holds
    output_scale = observer(h)         h is requantized to it, so GEMM2 reads int8

fq is fake quantization with input_scale, dq the int8 weight dequantized. The output
scale is on W1 (`output_scale`, GEMM1 produces it) and on W2 (`input_scale`, GEMM2 reads it).

Weights are quantized, and h computed, a block of output channels at a time
(`calibration.quantize_weights`): the same numbers, with temporaries the size of a block.
"""

from __future__ import annotations

import torch

from calibration.errors import OptionError
from calibration.observers import activation_scale
from calibration.options import SCHEMES
from calibration.quantize_weights import dequantized_rows, quantize_weight_blocked, row_blocks
from calibration.smooth import smooth_scale as compute_smooth_scale
from kernels.int8 import fake_quantize
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
    smooth_scale: torch.Tensor | None = None,
) -> tuple[QuantizedWeight, QuantizedWeight]:
    """(W1, W2) as int8 in their stored layout; w8a8 needs calibration inputs x [tokens, d_model].

    w8a16: weight scales only. w8a8: also W1.input_scale, W1.output_scale (= W2.input_scale)
    and, with `smooth` (an alpha), W1.smooth_scale: computed from x and W1, or `smooth_scale`
    where the caller computed it already (the same function of the same x and W1).
    """
    q1 = quantize_gemm1(
        w1, b1, x, scheme=scheme, weight_layout=weight_layout, gelu=gelu, group_size=group_size, method=method,
        smooth=smooth, smooth_scale=smooth_scale,
    )  # fmt: skip
    return q1, quantize_gemm2(w2, q1, weight_layout=weight_layout, group_size=group_size)


def quantize_gemm1(
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    x: torch.Tensor | None = None,
    *,
    scheme: str = "w8a16",
    weight_layout: str = "out_in",
    gelu: str = "erf",
    group_size: int | None = None,
    method: str = "max",
    smooth: float | None = None,
    smooth_scale: torch.Tensor | None = None,
) -> QuantizedWeight:
    """W1 as int8 and, for w8a8, the scales of its input and of its GELU output (quantize_mlp's
    first half: W2 is not needed, so a caller can hold one float weight at a time)."""
    if scheme not in SCHEMES:
        raise OptionError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    if scheme == "w8a16":
        if smooth is not None or smooth_scale is not None:
            raise OptionError("smoothing moves activation outliers into W1; it needs w8a8")
        return quantize_weight_blocked(w1, weight_layout=weight_layout, group_size=group_size)
    if x is None:
        raise OptionError("w8a8 needs calibration inputs to set its activation scales")
    if group_size is not None:
        raise OptionError("w8a8 takes per-channel weight scales; group scales are for w8a16")
    x = x.to(torch.float32)
    s = smooth_scale
    if s is None and smooth is not None:
        s = compute_smooth_scale(x, w1, smooth, weight_layout)
    if s is not None:
        x = x / s
    # W1 * s (SmoothQuant folded in) is what is quantized.
    q1 = quantize_weight_blocked(w1, weight_layout=weight_layout, group_size=group_size, multiplier=s)
    q1.smooth_scale = s
    q1.input_scale = activation_scale(x, method)
    xq = fake_quantize(x, q1.input_scale)
    d_ff, d_model = (w1.shape if weight_layout == "out_in" else w1.shape[::-1])
    h = torch.empty(x.shape[0], d_ff, dtype=torch.float32)
    for rows in row_blocks(d_ff, d_model):  # GEMM1's output channels a block at a time
        h[:, rows] = linear_reference(
            xq, dequantized_rows(q1, weight_layout, rows), None if b1 is None else b1[rows],
            activation=gelu, weight_layout="out_in", dtype=torch.float32,
        )  # fmt: skip
    q1.output_scale = activation_scale(h, method)
    return q1


def quantize_gemm2(w2: torch.Tensor, q1: QuantizedWeight, *, weight_layout: str = "out_in", group_size: int | None = None) -> QuantizedWeight:
    """W2 as int8; for w8a8 its input scale is GEMM1's output scale."""
    q2 = quantize_weight_blocked(w2, weight_layout=weight_layout, group_size=group_size)
    if q1.output_scale is not None:
        q2.input_scale = q1.output_scale.clone()
    return q2
