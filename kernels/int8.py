"""Symmetric int8: the scale from an absolute maximum, the rounding, fake quantization,
and int8 weights.

    q = round_half_even(clamp(x * (1 / scale), -127, 127))    in float32
    x ~= q * scale,   scale = max(absmax / 127, SCALE_EPS)

This is the kernels' arithmetic, and the one definition: the GEMM epilogue's
requantization and the activation quantizer (kernels/gemm_base.py's `round_to_int8`,
the reciprocal from `div_rn`) compute exactly this in float32, the reciprocal correctly
rounded; calibration (`fake_quantize`, `quantize_weight`) and the step-by-step reference
(kernels/reference.py) call these functions, so calibration fake-quantizes as the kernel
it calibrates for quantizes, and a kernel and its reference agree bit for bit.

-128 is never produced, so the range is symmetric and -q never overflows. Weights are
quantized per output channel (one scale per row of W as [N, K]) or per group of
`group_size` consecutive input channels (scale [N, ceil(K / group_size)]; the last
group may be short). Weight scales come from the absolute maximum, so every weight is
within half a step of its int8 value.
"""

from __future__ import annotations

import torch

from kernels.errors import LaunchError
from kernels.quantized import QuantizedWeight, expand_scale
from kernels.schemes import Granularity, SchemeError, WeightLayout

INT8_MAX = 127
# The floor on every scale, weights' and activations' alike (static or per token): an
# all-zero channel or row gets a finite, non-zero scale, so nothing divides by zero and
# dequantization gives exact zeros. float32's eps, as compressed-tensors' calculate_qparams
# and torchao clamp their scales: a file gelugemm writes quantizes as those libraries
# would, and 1 / scale stays below 2^23, finite. A row whose absmax is below
# 127 * eps (~1.5e-5; fp16's subnormals start at 6e-5) loses resolution, not range.
SCALE_EPS = torch.finfo(torch.float32).eps


def scale_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """float32 scale that maps absmax to 127, floored at SCALE_EPS."""
    absmax = absmax.to(torch.float32)
    # Divided by a tensor, not the Python 127: on CUDA torch computes tensor / scalar as
    # tensor * (1 / scalar), off by an ulp now and then from the correctly rounded
    # quotient (which the kernels' div_rn and the CPU compute).
    return (absmax / torch.full_like(absmax, INT8_MAX)).clamp_min(SCALE_EPS)


def round_to_int8(v: torch.Tensor) -> torch.Tensor:
    """int8 = round_half_even(clamp(v, -127, 127)) of a float32 tensor."""
    return torch.round(v.clamp(-INT8_MAX, INT8_MAX)).to(torch.int8)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 q = round_half_even(clamp(x * (1 / scale), -127, 127)) in float32; scale
    broadcasts against x. The reciprocal is correctly rounded (IEEE division, as the
    kernels' div_rn), then one float32 multiply, as the kernels compute it."""
    return round_to_int8(x.to(torch.float32) * torch.reciprocal(scale.to(torch.float32)))


def fake_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x rounded to its int8 grid and back, in float32."""
    return quantize_int8(x, scale).to(torch.float32) * scale


def _per_group(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, ceil(K / G), G], zero-padding the last group (zeros do not change an absmax)."""
    n, k = w.shape
    groups = -(-k // group_size)
    return torch.nn.functional.pad(w, (0, groups * group_size - k)).view(n, groups, group_size)


def _check_weight(w, group_size) -> None:
    """A 2-D float weight and a group size of None or a positive int (else a SchemeError, as
    QuantizedWeight raises), checked before any arithmetic divides by it."""
    if isinstance(group_size, bool):
        raise SchemeError(f"group_size must be a positive int or None, got {group_size!r}")
    Granularity(group_size)
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point or w.dim() != 2:
        what = f"a {w.dtype} tensor of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise LaunchError(f"the weight to quantize must be a 2-D floating-point tensor, got {what}")


def weight_scale(w_out_in: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """absmax scales of W as [N, K]: [N] per channel, [N, ceil(K / group_size)] per group."""
    _check_weight(w_out_in, group_size)
    w = w_out_in.to(torch.float32)
    absmax = w.abs().amax(dim=1) if group_size is None else _per_group(w, group_size).abs().amax(dim=2)
    return scale_from_absmax(absmax)


def quantize_weight(
    w: torch.Tensor, *, weight_layout: str | WeightLayout = "out_in", group_size: int | None = None
) -> QuantizedWeight:
    """int8 W in its stored layout with float32 scales per output channel or per group along K."""
    _check_weight(w, group_size)
    layout = WeightLayout.parse(weight_layout)
    w_nk = layout.as_out_in(w).to(torch.float32)
    scale = weight_scale(w_nk, group_size)
    q = quantize_int8(w_nk, expand_scale(scale, w_nk.shape[1], group_size))
    return QuantizedWeight(layout.as_out_in(q).contiguous(), scale, group_size)
