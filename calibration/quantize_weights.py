"""How far an int8 weight is from the float weight it encodes (quantize's per-layer report)."""

from __future__ import annotations

import torch

from kernels.quantized import QuantizedWeight, expand_scale
from kernels.reference import as_out_in


def weight_error(w: torch.Tensor, qw: QuantizedWeight, weight_layout: str = "out_in") -> dict[str, float]:
    """How far the int8 weight is from the float weight it encodes.

    rel_frobenius: ||W - q*s|| / ||W|| (0 for an all-zero W).
    max_abs_steps: max |W - q*s| / s, in units of each element's own scale step;
        at most 0.5 when the scales come from the absmax.
    """
    w_nk = as_out_in(w, weight_layout).to(torch.float64)
    steps = expand_scale(qw.scale, w_nk.shape[1], qw.group_size).to(torch.float64)
    diff = w_nk - as_out_in(qw.data, weight_layout).to(torch.float64) * steps
    norm = w_nk.norm().item()
    return {
        "rel_frobenius": diff.norm().item() / norm if norm > 0 else 0.0,
        "max_abs_steps": (diff.abs() / steps).max().item(),
    }
