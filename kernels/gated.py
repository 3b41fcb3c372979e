"""A gated MLP's GEMM1 operands: the gate and the up projection, as two weights or as the
two halves of one.

    y = (GELU(x @ Wg^T + bg) * (x @ Wu^T + bu)) @ W2^T + b2        (GeGLU)

Gemma and T5 v1.1 store Wg and Wu as two linears; ModernBERT stores one linear `Wi` whose
output rows [0, d_ff) are the gate (GELU's input) and [d_ff, 2 d_ff) the up projection.
That one weight is read in place: `gate_and_up` hands the op two views of it (rows of an
[out, in] weight, columns of an [in, out] one), float tensors or int8 QuantizedWeights
(whose scales are split the same way), never a copy.
"""

from __future__ import annotations

import torch

from kernels.errors import LaunchError
from kernels.quantized import QuantizedWeight
from kernels.schemes import WeightLayout


def _half_rows(t: torch.Tensor, first: bool, layout: WeightLayout) -> torch.Tensor:
    nk = layout.as_out_in(t)
    n = nk.shape[0] // 2
    return layout.as_out_in(nk[:n] if first else nk[n:])


def _half(w, first: bool, layout: WeightLayout):
    if not isinstance(w, QuantizedWeight):
        return _half_rows(w, first, layout)
    n = w.scale.shape[0] // 2
    # The gate half keeps the scales that belong to GEMM1 as a whole (x's static scale,
    # the product's output scale, SmoothQuant's); the up half reads the same x.
    return QuantizedWeight(
        _half_rows(w.data, first, layout), w.scale[:n] if first else w.scale[n:], w.group_size,
        input_scale=w.input_scale, output_scale=w.output_scale if first else None,
        smooth_scale=w.smooth_scale if first else None,
    )  # fmt: skip


def gate_and_up(w1, b1, w_up, b_up, weight_layout: str | WeightLayout):
    """(w_gate, b_gate, w_up, b_up) of a gated GEMM1: w_up given (two weights), or the
    halves of w1 and b1 (one concatenated weight, gate first), as views."""
    layout = WeightLayout.parse(weight_layout)
    if w_up is not None:
        if b_up is not None and b1 is None or b_up is None and b1 is not None:
            raise LaunchError("a gated MLP's gate and up projections have a bias each, or neither has one")
        return w1, b1, w_up, b_up
    if b_up is not None:
        raise LaunchError("b_up goes with w_up; a concatenated gate and up weight carries both biases in b1")
    data = w1.data if isinstance(w1, QuantizedWeight) else w1
    if data.dim() != 2:
        raise LaunchError(f"w1 must be 2-D, got shape {tuple(data.shape)}")
    rows = layout.kn_shape(data)[1]
    if rows % 2:
        raise LaunchError(f"a concatenated gate and up weight has an even number of outputs; w1 has {rows}")
    if b1 is not None and (b1.dim() != 1 or b1.shape[0] != rows):
        raise LaunchError(f"b1 of a concatenated gate and up weight must have shape ({rows},), got {tuple(b1.shape)}")
    b_gate = None if b1 is None else b1[: rows // 2]
    b_upper = None if b1 is None else b1[rows // 2 :]
    return _half(w1, True, layout), b_gate, _half(w1, False, layout), b_upper
