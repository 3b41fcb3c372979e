"""Symmetric int8: the scale from an absolute maximum, fake quantization, and int8 weights.

    q = clamp(round(x / scale), -127, 127)     round half to even (torch.round)
    x ~= q * scale,   scale = absmax / 127

-128 is never produced, so the range is symmetric and -q never overflows. Weights are
quantized per output channel (one scale per row of W as [N, K]) or per group of
`group_size` consecutive input channels (scale [N, ceil(K / group_size)]; the last
group may be short). Weight scales come from the absolute maximum, so every weight is
within half a step of its int8 value.
"""

from __future__ import annotations

import torch

from kernels.quantized import QuantizedWeight
from kernels.reference import as_out_in

INT8_MAX = 127
# Floor on every scale (torchao's choice): an all-zero channel gets a finite, non-zero
# scale, so nothing divides by zero and dequantization gives exact zeros.
SCALE_EPS = torch.finfo(torch.float32).eps


def scale_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """float32 scale that maps absmax to 127, floored at SCALE_EPS."""
    return (absmax.to(torch.float32) / INT8_MAX).clamp_min(SCALE_EPS)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 q = clamp(round(x / scale), -127, 127); scale broadcasts against x."""
    return torch.round(x.to(torch.float32) / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded to its int8 grid and back, in float32."""
    return quantize_int8(x, scale).to(torch.float32) * scale


def _per_group(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, ceil(K / G), G], zero-padding the last group (zeros do not change an absmax)."""
    n, k = w.shape
    groups = -(-k // group_size)
    return torch.nn.functional.pad(w, (0, groups * group_size - k)).view(n, groups, group_size)


def weight_scale(w_out_in: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """absmax scales of W as [N, K]: [N] per channel, [N, ceil(K / group_size)] per group."""
    w = w_out_in.to(torch.float32)
    absmax = w.abs().amax(dim=1) if group_size is None else _per_group(w, group_size).abs().amax(dim=2)
    return scale_from_absmax(absmax)


def expand_scale(scale: torch.Tensor, k: int, group_size: int | None) -> torch.Tensor:
    """A weight scale broadcast against W as [N, K]."""
    if group_size is None:
        return scale[:, None]
    return scale.repeat_interleave(group_size, dim=1)[:, :k]


def quantize_weight(w: torch.Tensor, *, weight_layout: str = "out_in", group_size: int | None = None) -> QuantizedWeight:
    """int8 W in its stored layout with float32 scales per output channel or per group along K."""
    w_nk = as_out_in(w, weight_layout).to(torch.float32)
    scale = weight_scale(w_nk, group_size)
    q = quantize_int8(w_nk, expand_scale(scale, w_nk.shape[1], group_size))
    data = q if weight_layout == "out_in" else q.t().contiguous()
    return QuantizedWeight(data, scale, group_size)
