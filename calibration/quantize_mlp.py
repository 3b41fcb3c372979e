"""One MLP, quantized in memory: int8 weights with their scales, and for w8a8 what its
activation scheme needs ahead of run time: SmoothQuant's scale with --smooth, and for
`static` the calibrated activation scales the fused kernels use (`dynamic` and `group:N`
compute theirs at run time, from each token).

w8a8 static follows what the kernels compute:

    x_s = x / s                        SmoothQuant (s = 1 without --smooth), s folded into W1
    input_scale  = observer(x_s)       GEMM1's static input scale
    h = GELU(fq(x_s) @ dq(W1 * s)^T + b1), float32    what GEMM1's epilogue holds
    output_scale = observer(h)         h is requantized to it, so GEMM2 reads int8

fq is fake quantization with input_scale, dq the int8 weight dequantized. The output
scale is on W1 (`output_scale`, GEMM1 produces it) and on W2 (`input_scale`, GEMM2 reads it).

A gated MLP (GeGLU) quantizes its gate and up weights each with its own scales (for one
concatenated weight, its rows' own scales are the halves' own), both multiplied by the
one smoothing scale (they read the same x), and calibrates a static output scale on what
its GEMM1 holds: h = GELU(fq(x_s) @ dq(Wg * s)^T + bg) * (fq(x_s) @ dq(Wu * s)^T + bu).

Weights are quantized, and h computed, a block of output channels at a time
(`calibration.quantize_weights`): the same numbers, with temporaries the size of a block.
"""

from __future__ import annotations

import torch

from calibration.errors import OptionError
from calibration.observers import activation_scale
from calibration.options import SCHEMES
from calibration.quantize_weights import WeightError, dequantized_rows, quantize_weight_blocked, row_blocks
from calibration.smooth import smooth_scale as compute_smooth_scale
from kernels.gated import gate_and_up
from kernels.int8 import fake_quantize
from kernels.quantized import QuantizedWeight
from kernels.reference import linear_reference
from kernels.schemes import ActivationScheme


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
    activations: str | ActivationScheme = "dynamic",
) -> tuple[QuantizedWeight, QuantizedWeight]:
    """(W1, W2) as int8 in their stored layout.

    w8a16: weight scales only. w8a8: with `smooth` (an alpha), W1.smooth_scale, computed from
    x and W1, or `smooth_scale` where the caller computed it already (the same function of
    the same x and W1); with activations "static", W1.input_scale and W1.output_scale (=
    W2.input_scale), calibrated on x. x [tokens, d_model] is needed for exactly those.
    """
    q1 = quantize_gemm1(
        w1, b1, x, scheme=scheme, weight_layout=weight_layout, gelu=gelu, group_size=group_size, method=method,
        smooth=smooth, smooth_scale=smooth_scale, activations=activations,
    )  # fmt: skip
    return q1, quantize_gemm2(w2, q1, weight_layout=weight_layout, group_size=group_size)


def quantize_gated_mlp(
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    x: torch.Tensor | None = None,
    *,
    w_up: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    scheme: str = "w8a16",
    weight_layout: str = "out_in",
    gelu: str = "erf",
    group_size: int | None = None,
    method: str = "max",
    smooth: float | None = None,
    activations: str | ActivationScheme = "dynamic",
) -> tuple[QuantizedWeight, QuantizedWeight, QuantizedWeight | None]:
    """(W1, W2, W_up) of a gated MLP as int8: W1 the gate (W_up its up projection) or, with
    w_up None, the concatenated gate and up (W_up None). The w8a8 scales as quantize_mlp's,
    a static output scale calibrated on GELU(gate) * up."""
    static = check_gemm1_options(scheme, x, group_size, smooth, None, activations)
    s = None
    if scheme == "w8a8" and smooth is not None:
        s = compute_smooth_scale(x.to(torch.float32), w1, smooth, weight_layout, w_up=w_up)
    q1 = quantize_gemm1_weight(w1, weight_layout=weight_layout, group_size=group_size, smooth_scale=s)
    q_up = None if w_up is None else quantize_gemm1_weight(w_up, weight_layout=weight_layout, group_size=group_size, smooth_scale=s)
    if static:
        calibrate_gemm1(q1, b1, x, weight_layout=weight_layout, gelu=gelu, method=method, gated=True, up=q_up, up_bias=b_up)
        if q_up is not None:
            q_up.input_scale = q1.input_scale  # the up projection reads the same x
    return q1, quantize_gemm2(w2, q1, weight_layout=weight_layout, group_size=group_size), q_up


def check_gemm1_options(scheme: str, x, group_size, smooth, smooth_scale, activations) -> bool:
    """Whether GEMM1 takes static activation scales (calibrated here); an OptionError for
    what cannot be done (x missing where static scales or smoothing need it)."""
    if scheme not in SCHEMES:
        raise OptionError(f"scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
    if scheme == "w8a16":
        if smooth is not None or smooth_scale is not None:
            raise OptionError("smoothing moves activation outliers into W1; it needs w8a8")
        return False
    if group_size is not None:
        raise OptionError("w8a8 takes per-channel weight scales; group scales are for w8a16")
    static = ActivationScheme.parse(activations).kind == "static"
    if x is None and (static or (smooth is not None and smooth_scale is None)):
        why = "static activation scales" if static else "SmoothQuant's scale"
        raise OptionError(f"w8a8 needs calibration inputs to set its {why}")
    return static


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
    activations: str | ActivationScheme = "dynamic",
    error: WeightError | None = None,
    device: torch.device | str | None = None,
) -> QuantizedWeight:
    """W1 as int8 and, for w8a8, its smoothing scale and (static) the scales of its input
    and of its GELU output (quantize_mlp's first half: W2 is not needed, so a caller can
    hold one float weight at a time). error: a WeightError to measure the int8 W1 (W1 *
    smoothing scale) into, as it is quantized. device: where the weight is quantized
    (quantize_weight_blocked's; the result comes back to W1's device, where the smoothing
    scale and the static scales are computed)."""
    static = check_gemm1_options(scheme, x, group_size, smooth, smooth_scale, activations)
    if scheme == "w8a16":
        return quantize_weight_blocked(w1, weight_layout=weight_layout, group_size=group_size, error=error, device=device)
    s = smooth_scale
    if s is None and smooth is not None:
        s = compute_smooth_scale(x.to(torch.float32), w1, smooth, weight_layout)
    q1 = quantize_gemm1_weight(w1, weight_layout=weight_layout, group_size=group_size, smooth_scale=s, error=error, device=device)
    if static:
        calibrate_gemm1(q1, b1, x, weight_layout=weight_layout, gelu=gelu, method=method)
    return q1


def quantize_gemm1_weight(
    w: torch.Tensor, *, weight_layout: str = "out_in", group_size: int | None = None, smooth_scale: torch.Tensor | None = None,
    error: WeightError | None = None, device: torch.device | str | None = None,
) -> QuantizedWeight:
    """A GEMM1 weight (W1, a gated MLP's gate or up) as int8: W * smooth_scale along K
    (SmoothQuant folded in) is what is quantized, on `device` (None: W's); smooth_scale is kept on it."""
    q = quantize_weight_blocked(w, weight_layout=weight_layout, group_size=group_size, multiplier=smooth_scale, error=error,
                                device=device)  # fmt: skip
    q.smooth_scale = smooth_scale
    return q


def calibrate_gemm1(
    q1: QuantizedWeight,
    b1: torch.Tensor | None,
    x: torch.Tensor,
    *,
    weight_layout: str = "out_in",
    gelu: str = "erf",
    method: str = "max",
    gated: bool = False,
    up: QuantizedWeight | None = None,
    up_bias: torch.Tensor | None = None,
) -> None:
    """w8a8's static scales on q1 (x [tokens, d_model], before smoothing): input_scale of
    x / q1.smooth_scale, output_scale of what GEMM1's epilogue holds in float32, GELU's
    output (gated: times the up projection, `up`, or q1's second half) on the int8 weights."""
    x = x.to(torch.float32)
    if q1.smooth_scale is not None:
        x = x / q1.smooth_scale
    q1.input_scale = activation_scale(x, method)
    xq = fake_quantize(x, q1.input_scale)
    gate, b_gate, upper, b_upper = gate_and_up(q1, b1, up, up_bias, weight_layout) if gated else (q1, b1, None, None)
    d_ff, d_model = gate.data.shape if weight_layout == "out_in" else gate.data.shape[::-1]
    h = torch.empty(x.shape[0], d_ff, dtype=torch.float32)
    for rows in row_blocks(d_ff, d_model):  # GEMM1's output channels a block at a time
        bias = lambda b: None if b is None else b[rows]  # noqa: E731
        up_rows = {} if upper is None else dict(up=dequantized_rows(upper, weight_layout, rows), up_bias=bias(b_upper))
        h[:, rows] = linear_reference(
            xq, dequantized_rows(gate, weight_layout, rows), bias(b_gate), activation=gelu, weight_layout="out_in",
            dtype=torch.float32, **up_rows,
        )  # fmt: skip
    q1.output_scale = activation_scale(h, method)


def quantize_gemm2(w2: torch.Tensor, q1: QuantizedWeight, *, weight_layout: str = "out_in", group_size: int | None = None,
                   error: WeightError | None = None, device: torch.device | str | None = None) -> QuantizedWeight:  # fmt: skip
    """W2 as int8 (quantized on `device`, None: W2's); for w8a8 its input scale is GEMM1's output scale."""
    q2 = quantize_weight_blocked(w2, weight_layout=weight_layout, group_size=group_size, error=error, device=device)
    if q1.output_scale is not None:
        q2.input_scale = q1.output_scale.clone()
    return q2
