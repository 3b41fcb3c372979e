"""How far an output is from a reference: the four numbers verify reports.

    m = error_metrics(out, ref)     # all in float64, over the whole [tokens, d_model] output
    m.rel_frobenius                 # ||out - ref|| / ||ref||
    m.sqnr_db                       # 10 log10(||ref||^2 / ||out - ref||^2) = -20 log10(rel_frobenius)

max_abs is in the output's own units (so it depends on the layer's scale); the other
three are scale-free. Cosine is taken over the flattened tensors: 1 - cos is about
rel_frobenius^2 / 2 for small errors, so it saturates near 1 long before the other
metrics stop moving, and is reported for readers used to it, not as a gate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ErrorMetrics:
    max_abs: float  # max |out - ref|
    rel_frobenius: float  # ||out - ref|| / ||ref||
    cosine: float  # <out, ref> / (||out|| ||ref||), flattened
    sqnr_db: float  # 10 log10(||ref||^2 / ||out - ref||^2); +inf for an exact match

    @property
    def finite(self) -> bool:
        return math.isfinite(self.max_abs) and math.isfinite(self.rel_frobenius)

    def to_dict(self) -> dict:
        """JSON has no inf or NaN: a value that is not finite is written as null
        (SQNR of an exact match; every metric of an output holding NaN or Inf)."""
        return {k: (v if math.isfinite(v) else None) for k, v in asdict(self).items()}


NOT_FINITE = ErrorMetrics(math.inf, math.inf, math.nan, -math.inf)


def error_metrics(out: torch.Tensor, ref: torch.Tensor) -> ErrorMetrics:
    """The distance of `out` from `ref` (same shape), computed in float64.

    An output holding NaN or Inf gets infinite errors (it fails any tolerance).
    """
    out = out.to(torch.float64)
    ref = ref.to(device=out.device, dtype=torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return NOT_FINITE
    diff = out - ref
    err, ref_norm, out_norm = diff.norm().item(), ref.norm().item(), out.norm().item()
    if ref_norm == 0:
        rel = 0.0 if err == 0 else math.inf
    else:
        rel = err / ref_norm
    if ref_norm == 0 or out_norm == 0:
        cosine = 1.0 if ref_norm == out_norm else 0.0
    else:
        cosine = (out * ref).sum().item() / (out_norm * ref_norm)
    if err == 0:
        sqnr = math.inf
    elif ref_norm == 0:
        sqnr = -math.inf
    else:
        sqnr = 20 * math.log10(ref_norm / err)
    return ErrorMetrics(diff.abs().max().item() if diff.numel() else 0.0, rel, cosine, sqnr)


def json_safe(value):
    """A report's dict (dataclasses.asdict's output) with every non-finite float as None:
    JSON has no inf or NaN."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
