"""The op in plain torch: the readable definition every kernel is tested against.

The MLP is  y = GELU(x @ W1^T + b1) @ W2^T + b2,  with W in nn.Linear's `[out, in]`
layout, or `[in, out]` (GPT-2's Conv1D) where `weight_layout="in_out"`. A gated MLP (GeGLU)
is  y = (GELU(x @ Wg^T + bg) * (x @ Wu^T + bu)) @ W2^T + b2:  every GEMM1 below takes the
up projection as `up` / `up_bias` (W1 is then the gate) and multiplies GELU's output by
it, in the GEMM's own precision, before the one rounding of the intermediate.

`mlp_reference` computes the same rounding steps as the fused kernels: each GEMM
accumulates in float32 (or float64 for the exact reference), bias and GELU are applied
in that precision, and the intermediate is rounded once to the compute dtype before
GEMM2. Run it with `dtype=torch.float64` to get the exact MLP.
"""

from __future__ import annotations

import math

import torch

from kernels.gated import gate_and_up
from kernels.int8 import quantize_int8, scale_from_absmax
from kernels.quantized import QuantizedWeight, expand_scale
from kernels.schemes import GELU_FLAVOURS, ActivationScheme, WeightLayout

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x: torch.Tensor, flavour: str = "erf") -> torch.Tensor:
    """GELU in x's precision.

    erf:  0.5 * x * (1 + erf(x / sqrt(2)))                     (exact)
    tanh: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))  (GPT-2's approximation)
    quick: x * sigmoid(1.702 x)                                 (CLIP's quick_gelu)
    """
    if flavour == "erf":
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if flavour == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    if flavour == "quick":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"unknown GELU flavour {flavour!r}; expected one of {GELU_FLAVOURS}")


def eager_gelu(x: torch.Tensor, flavour: str = "erf") -> torch.Tensor:
    """GELU as models run it in eager torch, in x's dtype: F.gelu for erf and tanh, and
    Hugging Face's QuickGELUActivation (x * sigmoid(1.702 x)) for quick."""
    if flavour == "quick":
        return x * torch.sigmoid(1.702 * x)
    if flavour not in GELU_FLAVOURS:
        raise ValueError(f"unknown GELU flavour {flavour!r}; expected one of {GELU_FLAVOURS}")
    return torch.nn.functional.gelu(x, approximate="tanh" if flavour == "tanh" else "none")


def as_out_in(w: torch.Tensor, weight_layout: str | WeightLayout) -> torch.Tensor:
    """View a weight as `[out, in]` whatever layout it is stored in (no copy)."""
    return WeightLayout.parse(weight_layout).as_out_in(w)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a GEMM accumulates in: float64 for the exact reference, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    activation: str = "none",
    weight_layout: str = "out_in",
    dtype: torch.dtype | None = None,
    up: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(x @ W^T + bias) accumulated in float32 (float64 when dtype is float64), rounded to dtype.

    activation: "none", or a GELU flavour ("erf", "tanh", "quick").
    up, up_bias: a gated GEMM1's up projection: act(x @ W^T + bias) * (x @ Wup^T + up_bias),
        the product in the accumulation precision, then rounded once.
    """
    dtype = dtype or x.dtype
    acc = accumulate_dtype(dtype)
    out = x.to(acc) @ as_out_in(w, weight_layout).to(acc).t()
    if bias is not None:
        out = out + bias.to(acc)
    if activation != "none":
        out = gelu(out, activation)
    if up is not None:
        u = x.to(acc) @ as_out_in(up, weight_layout).to(acc).t()
        if up_bias is not None:
            u = u + up_bias.to(acc)
        out = out * u
    return out.to(dtype)


def _gemm1(w1, b1, gated: bool, w_up, b_up, weight_layout) -> tuple:
    """(gate or W1, its bias, the up projection as a GEMM1 reference's up/up_bias arguments)."""
    if not gated:
        return w1, b1, {}
    w1, b1, w_up, b_up = gate_and_up(w1, b1, w_up, b_up, weight_layout)
    return w1, b1, dict(up=w_up, up_bias=b_up)


def mlp_reference(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None = None,
    *,
    gelu_flavour: str = "erf",
    weight_layout: str = "out_in",
    dtype: torch.dtype | None = None,
    gated: bool = False,
    w_up: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole MLP with the kernels' rounding: GEMM1+bias+GELU, round to dtype, GEMM2+bias.

    gated: GEMM1 is GELU(x @ Wg^T + bg) * (x @ Wu^T + bu), with the up projection w_up and
        b_up, or (w_up None) W1 and b1 holding gate and up as their two halves.
    """
    dtype = dtype or x.dtype
    w1, b1, up = _gemm1(w1, b1, gated, w_up, b_up, weight_layout)
    h = linear_reference(x, w1, b1, activation=gelu_flavour, weight_layout=weight_layout, dtype=dtype, **up)
    return linear_reference(h, w2, b2, weight_layout=weight_layout, dtype=dtype)


# ---------------------------------------------------------------------------------------
# int8 schemes, step by step: the same quantized function the int8 kernels compute, with
# the same float32 operations in the same order, so a kernel can be checked exactly.
# ---------------------------------------------------------------------------------------

def _groups(v: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., K] -> [..., cdiv(K, G), G], the last group zero-padded (zeros change no absmax)."""
    k = v.shape[-1]
    n_groups = -(-k // group_size)
    return torch.nn.functional.pad(v, (0, n_groups * group_size - k)).reshape(*v.shape[:-1], n_groups, group_size)


def quantize_activation_reference(
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    smooth_scale: torch.Tensor | None = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of x [..., K]: returns (q int8 [..., K], scale float32).

    smooth_scale [K]: SmoothQuant; x is divided by it per input channel first.
    scale None: dynamic, one scale per token, scale_from_absmax(absmax(row)) (absmax / 127,
        floored at kernels/int8.py's SCALE_EPS), shape [...]; with group_size G, one per
        token per G columns, shape [..., cdiv(K, G)] (the last group may be short). Else
        the given static one-element scale, returned as is.
    q = quantize_int8(x, scale): round_half_even(clamp(x * (1 / scale), -127, 127)) in float32.
    """
    v = x.float()
    if smooth_scale is not None:
        v = v / smooth_scale.float()
    if scale is not None:
        return quantize_int8(v, scale.float().reshape(())), scale
    if group_size is not None:
        grouped = _groups(v, group_size)
        scale = scale_from_absmax(grouped.abs().amax(dim=-1))
        q = quantize_int8(grouped, scale[..., None]).reshape(*v.shape[:-1], -1)[..., : v.shape[-1]]
        return q, scale
    scale = scale_from_absmax(v.abs().amax(dim=-1))
    return quantize_int8(v, scale[..., None]), scale


def w8a8_linear_reference(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    w: QuantizedWeight,
    bias: torch.Tensor | None,
    *,
    activation: str = "none",
    weight_layout: str = "out_in",
    output_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    input_group_size: int | None = None,
    output_group_size: int | None = None,
    up: QuantizedWeight | None = None,
    up_bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One w8a8 GEMM on an int8 input xq [..., K] with its scale.

    w: a QuantizedWeight with per-channel scales.
    x_scale: per token [...] or one element: acc = xq @ Wq^T in exact integer arithmetic
        (float64 holds every partial sum exactly: |acc| <= 127^2 K < 2^53), then in
        float32 acc * x_scale[m]. With input_group_size G, x_scale [..., cdiv(K, G)]: the
        exact integer partial of each G-deep K block, times its scale, added into a
        float32 sum in K order (the kernel's promotion, one K tile per group).
    Then in float32: * w_scale[n] + bias, GELU; a gated GEMM1 (`up`) then multiplies by
    up's own acc (scaled as above) * up_scale[n] + up_bias; then with `output_scale`
    requantized to int8 (GEMM1 of static: quantize_int8(v, output_scale)); with
    output_group_size G requantized per token per G columns with scale_from_absmax of each
    group, returning (int8, scales [..., cdiv(N, G)]); else rounded to out_dtype (GEMM2).
    """

    def dequantized(weight: QuantizedWeight, b: torch.Tensor | None) -> torch.Tensor:
        w_nk = as_out_in(weight.data, weight_layout).double()
        if input_group_size is None:
            v = (xq.double() @ w_nk.t()).float()
            # per token: one scale per row; static: one for all (the two agree when there is one row)
            v = v * (x_scale.float().reshape(()) if x_scale.numel() == 1 else x_scale.float()[..., None])
        else:
            xg, wg = _groups(xq.double(), input_group_size), _groups(w_nk, input_group_size)  # [..., G#, G], [N, G#, G]
            v = torch.zeros((*xq.shape[:-1], w_nk.shape[0]), dtype=torch.float32, device=xq.device)
            for g in range(xg.shape[-2]):
                part = (xg[..., g, :] @ wg[:, g, :].t()).float()
                v = v + part * x_scale[..., g, None].float()
        v = v * weight.scale
        return v if b is None else v + b.float()

    out = dequantized(w, bias)
    if activation != "none":
        out = gelu(out, activation)
    if up is not None:
        out = out * dequantized(up, up_bias)
    if output_scale is not None:
        return quantize_int8(out, output_scale.float().reshape(()))
    if output_group_size is not None:
        return quantize_activation_reference(out, group_size=output_group_size)
    return out.to(out_dtype)


def w8a8_mlp_reference(
    x: torch.Tensor,
    w1: QuantizedWeight,
    b1: torch.Tensor | None,
    w2: QuantizedWeight,
    b2: torch.Tensor | None = None,
    *,
    gelu_flavour: str = "erf",
    weight_layout: str = "out_in",
    activations: str | ActivationScheme = "dynamic",
    gated: bool = False,
    w_up: QuantizedWeight | None = None,
    b_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """The w8a8 MLP step by step, per activation scheme (x divided by w1.smooth_scale
    first where there is one):

    dynamic   x quantized per token; GEMM1 + bias + GELU rounded to x's dtype (16-bit h);
              h quantized per token over all its columns; GEMM2 per-token scales
    group:G   x quantized per token per G columns; GEMM1 promotes each K block's partial
              with its scale, requantizes h per token per G columns (int8 h + scales);
              GEMM2 the same per K block
    static    x quantized with w1.input_scale; GEMM1 requantizes h with w1.output_scale
              (int8 h), which is then GEMM2's input scale

    gated: GEMM1 is GELU(gate) * up, each dequantized with its own scales (w1 the gate with
    w_up, or the concatenated gate and up): h is that product, in every scheme.
    """
    w1, b1, up = _gemm1(w1, b1, gated, w_up, b_up, weight_layout)
    scheme = ActivationScheme.parse(activations)
    if scheme.kind == "static":
        xq, x_scale = quantize_activation_reference(x, w1.input_scale, w1.smooth_scale)
        h = w8a8_linear_reference(
            xq, x_scale, w1, b1, activation=gelu_flavour, weight_layout=weight_layout, output_scale=w1.output_scale, **up
        )
        return w8a8_linear_reference(h, w1.output_scale, w2, b2, weight_layout=weight_layout, out_dtype=x.dtype)
    if scheme.kind == "dynamic":
        xq, x_scale = quantize_activation_reference(x, None, w1.smooth_scale)
        h = w8a8_linear_reference(
            xq, x_scale, w1, b1, activation=gelu_flavour, weight_layout=weight_layout, out_dtype=x.dtype, **up
        )
        hq, h_scale = quantize_activation_reference(h)
        return w8a8_linear_reference(hq, h_scale, w2, b2, weight_layout=weight_layout, out_dtype=x.dtype)
    g = scheme.group_size
    xq, x_scale = quantize_activation_reference(x, None, w1.smooth_scale, group_size=g)
    hq, h_scale = w8a8_linear_reference(
        xq, x_scale, w1, b1, activation=gelu_flavour, weight_layout=weight_layout, input_group_size=g, output_group_size=g,
        **up,
    )
    return w8a8_linear_reference(hq, h_scale, w2, b2, weight_layout=weight_layout, out_dtype=x.dtype, input_group_size=g)


def w8a16_group_weight(w: QuantizedWeight, dtype: torch.dtype, weight_layout: str = "out_in") -> torch.Tensor:
    """A per-group int8 weight as [N, K] in dtype, dequantized as the w8a16 kernels' tiles
    are: for fp16, W = fp16(Wq * fp16(scale[n, k // G])) (the scale rounded to fp16 and the
    product - exact in float32 - rounded once: the kernel's fp16 multiply); for bf16,
    W = bf16(Wq * scale) with the float32 scale."""
    q = as_out_in(w.data, weight_layout).float()  # [N, K]
    scale = expand_scale(w.scale, q.shape[1], w.group_size)
    if dtype == torch.float16:
        scale = scale.half().float()
    return (q * scale).to(dtype)


def w8a16_linear_reference(
    x: torch.Tensor,
    w: QuantizedWeight,
    bias: torch.Tensor | None,
    *,
    activation: str = "none",
    weight_layout: str = "out_in",
    up: QuantizedWeight | None = None,
    up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One w8a16 GEMM: act(x @ dequant(W)^T + bias) in float32, rounded to x's dtype.

    Per-channel scales: acc = x @ Wq^T (integer weights), then acc * scale[n], as the
    kernel's epilogue does. Per-group scales: the kernel's dequantized tile
    (w8a16_group_weight), then the matmul.
    up, up_bias: a gated GEMM1's up projection, computed the same way, multiplied in float32.
    """

    def dequantized(weight: QuantizedWeight, b: torch.Tensor | None) -> torch.Tensor:
        if weight.group_size is None:
            v = (x.float() @ as_out_in(weight.data, weight_layout).float().t()) * weight.scale
        else:
            v = x.float() @ w8a16_group_weight(weight, x.dtype, weight_layout).float().t()
        return v if b is None else v + b.float()

    out = dequantized(w, bias)
    if activation != "none":
        out = gelu(out, activation)
    if up is not None:
        out = out * dequantized(up, up_bias)
    return out.to(x.dtype)


def w8a16_mlp_reference(
    x: torch.Tensor,
    w1: QuantizedWeight,
    b1: torch.Tensor | None,
    w2: QuantizedWeight,
    b2: torch.Tensor | None = None,
    *,
    gelu_flavour: str = "erf",
    weight_layout: str = "out_in",
    gated: bool = False,
    w_up: QuantizedWeight | None = None,
    b_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """The w8a16 MLP step by step: GEMM1 + bias + GELU (times the up projection, gated)
    rounded to x's dtype, then GEMM2 + bias."""
    w1, b1, up = _gemm1(w1, b1, gated, w_up, b_up, weight_layout)
    h = w8a16_linear_reference(x, w1, b1, activation=gelu_flavour, weight_layout=weight_layout, **up)
    return w8a16_linear_reference(h, w2, b2, weight_layout=weight_layout)
