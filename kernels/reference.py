"""The op in plain torch: the readable definition every kernel is tested against.

The MLP is  y = GELU(x @ W1^T + b1) @ W2^T + b2,  with W in nn.Linear's `[out, in]`
layout, or `[in, out]` (GPT-2's Conv1D) where `weight_layout="in_out"`.

`mlp_reference` computes the same rounding steps as the fused kernels: each GEMM
accumulates in float32 (or float64 for the exact reference), bias and GELU are applied
in that precision, and the intermediate is rounded once to the compute dtype before
GEMM2. Run it with `dtype=torch.float64` to get the exact MLP.
"""

from __future__ import annotations

import math

import torch

GELU_FLAVOURS = ("erf", "tanh")
WEIGHT_LAYOUTS = ("out_in", "in_out")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu(x: torch.Tensor, flavour: str = "erf") -> torch.Tensor:
    """GELU in x's precision.

    erf:  0.5 * x * (1 + erf(x / sqrt(2)))                     (exact)
    tanh: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3)))  (GPT-2's approximation)
    """
    if flavour == "erf":
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if flavour == "tanh":
        return 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
    raise ValueError(f"unknown GELU flavour {flavour!r}; expected one of {GELU_FLAVOURS}")


def as_out_in(w: torch.Tensor, weight_layout: str) -> torch.Tensor:
    """View a weight as `[out, in]` whatever layout it is stored in (no copy)."""
    if weight_layout == "out_in":
        return w
    if weight_layout == "in_out":
        return w.t()
    raise ValueError(f"unknown weight layout {weight_layout!r}; expected one of {WEIGHT_LAYOUTS}")


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
) -> torch.Tensor:
    """act(x @ W^T + bias) accumulated in float32 (float64 when dtype is float64), rounded to dtype.

    activation: "none", or a GELU flavour ("erf", "tanh").
    """
    dtype = dtype or x.dtype
    acc = accumulate_dtype(dtype)
    out = x.to(acc) @ as_out_in(w, weight_layout).to(acc).t()
    if bias is not None:
        out = out + bias.to(acc)
    if activation != "none":
        out = gelu(out, activation)
    return out.to(dtype)


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
) -> torch.Tensor:
    """The whole MLP with the kernels' rounding: GEMM1+bias+GELU, round to dtype, GEMM2+bias."""
    dtype = dtype or x.dtype
    h = linear_reference(x, w1, b1, activation=gelu_flavour, weight_layout=weight_layout, dtype=dtype)
    return linear_reference(h, w2, b2, weight_layout=weight_layout, dtype=dtype)
