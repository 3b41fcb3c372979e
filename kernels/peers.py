"""What users run instead of gelugemm's op: the MLP through torch, cuBLASLt and torch.compile.

Every peer computes  y = GELU(x @ W1^T + b1) @ W2^T + b2  with nn.Linear's [out, in]
weights, takes the same arguments as `FusedMLP` (x, w1, b1, w2, b2) and returns y in x's
dtype, so the benchmark can time them side by side on the same inputs.

    eager     F.linear, F.gelu, F.linear in the float dtype
    cublaslt  torch._addmm_activation(b1, x, W1^T, use_gelu=True), then addmm: cuBLASLt's
              GEMM with a bias+GELU epilogue. That epilogue is the tanh approximation
              (CUBLASLT_EPILOGUE_GELU_BIAS; torch's non-Lt fallback calls gelu(..., "tanh")
              too), so this peer is tanh GELU whatever the run asks for:
              `cublaslt_gelu_flavour` checks that on the device.
    compile   torch.compile of `eager` (static shapes)
    dequant   w8a16 the naive way: dequantize the int8 weights in torch on every call,
              then the eager MLP
    int_mm    w8a8 through torch._int_mm, the field's W8A8 (per-token dynamic scales) run
              naively: quantize x per token, int8 GEMM, dequantize, bias, GELU, quantize
              per token, int8 GEMM, dequantize, bias, each a separate torch op

The int8 peers take `QuantizedWeight`s (int8 weights in nn.Linear's layout, float32
scales: per channel, or for dequant per group too), as the int8 op does.

Gated MLPs (GeGLU, `gated=True`): every peer takes the op's (x, w1, b1, w2, b2, w_up,
b_up) and computes GELU(gate) * up as the models do: two GEMMs for gate and up (Gemma, T5:
w1 the gate, w_up the up projection), or one GEMM on the concatenated weight whose output
halves are gate and up (ModernBERT: w_up None; the benchmark's "eager-cat" row); cuBLASLt
runs its GELU epilogue on the gate GEMM; int_mm quantizes x once for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.quantized import QuantizedWeight, expand_scale
from kernels.reference import eager_gelu
from kernels.reference import gelu as reference_gelu
from kernels.reference import quantize_activation_reference

FLOAT_PEERS = ("eager", "cublaslt", "compile")
INT8_PEERS = {"dequant": "w8a16", "int_mm": "w8a8"}  # peer -> the one dtype it runs for
PEERS = FLOAT_PEERS + tuple(INT8_PEERS)

# torch._int_mm refuses inputs of 16 rows or fewer; the peer pads x to this many.
INT_MM_MIN_ROWS = 32


# ---- float peers ------------------------------------------------------------------------


def eager_mlp(x, w1, b1, w2, b2, gelu: str = "erf", *, w_up=None, b_up=None, gated: bool = False):
    """The MLP as three torch calls, in x's dtype (gated: four, or three on a concatenated
    gate and up weight, and the product)."""
    h = F.linear(x, w1, b1)
    if not gated:
        return F.linear(eager_gelu(h, gelu), w2, b2)
    gate, up = h.chunk(2, dim=-1) if w_up is None else (h, F.linear(x, w_up, b_up))
    return F.linear(eager_gelu(gate, gelu) * up, w2, b2)


def cublaslt_mlp(x, w1, b1, w2, b2, *, w_up=None, b_up=None, gated: bool = False):
    """GEMM1 with cuBLASLt's bias+GELU epilogue (tanh GELU), then GEMM2 with its bias (gated:
    the epilogue on the gate GEMM, a plain GEMM for up, their product; a missing bias is
    zeros, which the epilogue needs)."""
    if not gated:
        h = torch._addmm_activation(b1, x, w1.t(), use_gelu=True)
        return torch.addmm(b2, h, w2.t())
    zeros = lambda b, n: b if b is not None else torch.zeros(n, dtype=x.dtype, device=x.device)  # noqa: E731
    h = torch._addmm_activation(zeros(b1, w1.shape[0]), x, w1.t(), use_gelu=True) * torch.addmm(
        zeros(b_up, w_up.shape[0]), x, w_up.t()
    )
    return torch.addmm(zeros(b2, w2.shape[0]), h, w2.t())


def compiled_mlp(gelu: str = "erf", gated: bool = False):
    """torch.compile of the eager MLP for one GELU flavour; compiles on its first call."""
    def mlp(x, w1, b1, w2, b2, w_up=None, b_up=None):
        return eager_mlp(x, w1, b1, w2, b2, gelu, w_up=w_up, b_up=b_up, gated=gated)

    # dynamic=False: one specialised graph per token count, as a serving stack with fixed
    # batch shapes would compile it (and no switch to dynamic shapes on the second M).
    return torch.compile(mlp, dynamic=False)


def dynamo_recompile_limits() -> dict:
    """torch._dynamo settings that keep every (shape, M) of one run compiled.

    All `compiled_mlp` closures share one code object, so their graphs count against one
    recompile limit (8 by default); past it dynamo falls back to eager without a word, and
    the 'compile' rows would time eager. The names differ across torch versions.
    """
    import torch._dynamo

    config = torch._dynamo.config
    names = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")
    return {name: 4096 for name in names if hasattr(config, name)}


def dynamo_patch():
    """A context manager that raises dynamo's recompile limits for its duration."""
    import torch._dynamo

    return torch._dynamo.config.patch(**dynamo_recompile_limits())


def cublaslt_gelu_flavour(device, dtype: torch.dtype = torch.float16) -> str:
    """'tanh' or 'erf': which GELU torch._addmm_activation(use_gelu=True) applies on this device.

    Pre-activations are put in [-3.5, -2.5], where the two GELUs differ by about 6% (they
    agree within 2e-4 elsewhere, under fp16 rounding), and the output is compared with
    both, computed in float64 from the same rounded inputs.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(64, 64, generator=g) * 0.1).to(device, dtype)
    w = (torch.randn(128, 64, generator=g) * 0.01).to(device, dtype)
    b = (torch.rand(128, generator=g) - 3.5).to(device, dtype)
    out = torch._addmm_activation(b, x, w.t(), use_gelu=True).double()
    pre = torch.addmm(b.double(), x.double(), w.double().t())
    errors = {}
    for flavour in ("erf", "tanh"):
        ref = reference_gelu(pre, flavour)
        errors[flavour] = ((out - ref).norm() / ref.norm()).item()
    best = min(errors, key=errors.get)
    # The other flavour sits ~6e-2 away; a result far from both is neither. (In bf16 the
    # pre-activation may be rounded before the GELU, which blurs the two: check in fp16.)
    return best if errors[best] < 2e-2 else "unknown"


# ---- int8 peers -------------------------------------------------------------------------


def _dequantized(q: QuantizedWeight | None, dtype: torch.dtype) -> torch.Tensor | None:
    if q is None:
        return None
    return q.data.to(dtype) * expand_scale(q.scale, q.data.shape[1], q.group_size).to(dtype)


def dequant_mlp(x, q1: QuantizedWeight, b1, q2: QuantizedWeight, b2, gelu: str = "erf", *, w_up=None, b_up=None,
                gated: bool = False):  # fmt: skip
    """w8a16 the naive way: rebuild the float weights in torch (scales per channel or
    per group of input channels), then the eager MLP."""
    w1, w2, w_up = (_dequantized(q, x.dtype) for q in (q1, q2, w_up))
    return eager_mlp(x, w1, b1, w2, b2, gelu, w_up=w_up, b_up=b_up, gated=gated)


def _int_mm(a_int8: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """a @ W^T in int32 through torch._int_mm, padding a past its 16-row minimum."""
    m = a_int8.shape[0]
    if m < INT_MM_MIN_ROWS:
        a_int8 = F.pad(a_int8, (0, 0, 0, INT_MM_MIN_ROWS - m))
    return torch._int_mm(a_int8, w.data.t())[:m]


def int_mm_mlp(x, q1: QuantizedWeight, b1, q2: QuantizedWeight, b2, gelu: str = "erf", *, w_up=None, b_up=None,
               gated: bool = False):  # fmt: skip
    """w8a8 with torch._int_mm and each (de)quantization step a separate torch op: x and
    the GELU output quantized per token (float32 h, not rounded to x's dtype first). Gated:
    x quantized once; gate and up each dequantized with its own scales (one int8 GEMM on a
    concatenated weight, cut in halves, where w_up is None)."""
    xq, x_scale = quantize_activation_reference(x)  # scale [M]

    def dequantized(q: QuantizedWeight, b) -> torch.Tensor:
        v = _int_mm(xq, q).float() * x_scale[:, None] * q.scale
        return v if b is None else v + b.float()

    h = dequantized(q1, b1)
    if gated:
        gate, up = h.chunk(2, dim=-1) if w_up is None else (h, dequantized(w_up, b_up))
        h = eager_gelu(gate, gelu) * up
    else:
        h = eager_gelu(h, gelu)
    hq, h_scale = quantize_activation_reference(h)
    y = _int_mm(hq, q2).float() * h_scale[:, None] * q2.scale
    if b2 is not None:
        y = y + b2.float()
    return y.to(x.dtype)
