"""int8 weights quantized a block of output channels at a time, and how far they are from
the float weights they encode (quantize's per-layer report).

Each output channel's scale comes from its own row of W as [N, K], so quantizing rows in
blocks gives exactly what `kernels.int8.quantize_weight` gives on the whole weight, with
temporaries the size of a block instead of W: a 4096 x 16384 weight stays within its own
bytes plus a few tens of MB.
"""

from __future__ import annotations

import math

import torch

from kernels.int8 import expand_scale, quantize_weight
from kernels.quantized import QuantizedWeight
from kernels.reference import as_out_in

# Elements of W per block: 4 MB of float32, 8 MB of float64 temporaries each.
BLOCK_ELEMENTS = 1 << 20


def row_blocks(n: int, k: int) -> list[slice]:
    """Slices of W's N output channels, each about BLOCK_ELEMENTS of [N, K]."""
    rows = max(1, BLOCK_ELEMENTS // max(k, 1))
    return [slice(start, min(n, start + rows)) for start in range(0, n, rows)]


def quantize_weight_blocked(
    w: torch.Tensor, *, weight_layout: str = "out_in", group_size: int | None = None, multiplier: torch.Tensor | None = None
) -> QuantizedWeight:
    """`kernels.int8.quantize_weight`, a block of output channels at a time.

    multiplier: float32 [K], applied along K in float32 before quantizing (SmoothQuant's
        W1 * s; the same products as calibration.smooth.fold_into_weight).
    """
    w_nk = as_out_in(w, weight_layout)
    n, k = w_nk.shape
    blocks = row_blocks(n, k)
    if multiplier is None and len(blocks) == 1:
        return quantize_weight(w, weight_layout=weight_layout, group_size=group_size)
    data = torch.empty(n, k, dtype=torch.int8)
    # Written in place: a small tensor kept per block would sit between the blocks'
    # temporaries in the allocator's heap and keep it from giving their memory back.
    scale = torch.empty((n,) if group_size is None else (n, -(-k // group_size)), dtype=torch.float32)
    for rows in blocks:
        block = w_nk[rows] if multiplier is None else w_nk[rows].to(torch.float32) * multiplier[None, :]
        q = quantize_weight(block, weight_layout="out_in", group_size=group_size)
        data[rows] = q.data
        scale[rows] = q.scale
        del block, q
    if weight_layout == "in_out":
        data = data.t().contiguous()
    return QuantizedWeight(data, scale, group_size)


def dequantized_rows(qw: QuantizedWeight, weight_layout: str, rows: slice) -> torch.Tensor:
    """Rows `rows` of the float32 weight an int8 weight stands for, as [rows, K]."""
    q = as_out_in(qw.data, weight_layout)[rows].to(torch.float32)
    return q * expand_scale(qw.scale[rows], q.shape[1], qw.group_size)


def weight_error(
    w: torch.Tensor, qw: QuantizedWeight, weight_layout: str = "out_in", multiplier: torch.Tensor | None = None
) -> dict[str, float]:
    """How far the int8 weight is from the float weight it encodes (W * multiplier along K, if given).

    rel_frobenius: ||W - q*s|| / ||W|| (0 for an all-zero W).
    max_abs_steps: max |W - q*s| / s, in units of each element's own scale step;
        at most 0.5 when the scales come from the absmax.
    """
    w_nk = as_out_in(w, weight_layout)
    q_nk = as_out_in(qw.data, weight_layout)
    n, k = w_nk.shape
    diff_sq = norm_sq = max_steps = 0.0
    for rows in row_blocks(n, k):
        # float32 is exact enough for a report: |W - q*s| is at most half a step, and float32
        # holds it to about 1e-5 of a step (values up to 127 steps); the sums are float64.
        block = w_nk[rows].to(torch.float32)
        if multiplier is not None:
            block = block * multiplier[None, :]
        steps = expand_scale(qw.scale[rows], k, qw.group_size)
        diff = block - q_nk[rows].to(torch.float32) * steps
        diff_sq += torch.sum(diff.square(), dtype=torch.float64).item()
        norm_sq += torch.sum(block.square(), dtype=torch.float64).item()
        if diff.numel():
            max_steps = max(max_steps, (diff.abs_() / steps).max().item())
    return {
        "rel_frobenius": math.sqrt(diff_sq) / math.sqrt(norm_sq) if norm_sq > 0 else 0.0,
        "max_abs_steps": max_steps,
    }
