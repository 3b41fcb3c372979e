"""w8a8: int8 activations x int8 weights on the int8 tensor cores, int32 accumulation.

The MLP runs as three launches, and every tensor between them is int8:

    xq, x_scale = quantize_activations(x)                    # x / smooth, per-token or static
    h  = w8a8_linear(xq, x_scale, w1, b1, activation="erf",  # int8 [M, F] in memory
                     output_scale=w1.output_scale)
    y  = w8a8_linear(h, w1.output_scale, w2, b2)             # fp16/bf16

Quantization is symmetric, q = round_half_even(clamp(v * (1 / scale), -127, 127)) in
float32 with the reciprocal correctly rounded: kernels/int8.py's definition, which the
reference and calibration use too, so a kernel and its reference agree bit for bit
except where a float32 op-order difference (an fma, the erf implementation) moves a
value across a rounding tie.

- `_quantize_rows_kernel`: one program per row of x. Dynamic: a first pass over the
  row finds absmax (after the SmoothQuant division), scale = max(absmax / 127,
  SCALE_EPS); the second pass quantizes. Static: one pass with the calibrated scale.
- The GEMMs are kernels/int8_gemm.py's (decode, persistent TMA, strided) with an int8
  input: int8 x int8 tensor-core dots with int32 accumulation (split-K partials added
  in int32 too); the epilogue computes acc * x_scale[m] * w_scale[n] + bias in float32,
  then GELU, then either requantizes with the calibrated output scale (GEMM1, int8
  out) or rounds to the float output dtype (GEMM2). Weight scales are per channel:
  per-group scales would need a float rescale of the int32 partial sum at every group
  boundary, which this kernel does not do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.errors import LaunchError
from kernels.gemm_base import INT8_MAX_F32, output_buffer, round_to_int8, triton_can_run
from kernels.int8 import SCALE_EPS
from kernels.int8_gemm import int8_weight_gemm
from kernels.launch import interpreting, launch
from kernels.quantized import QuantizedWeight
from kernels.schemes import FLOAT_DTYPES, WeightLayout


def check_scalar_scale(scale, device: torch.device, what: str) -> None:
    """A calibrated scale: a one-element float32 tensor on the input's device."""
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise LaunchError(f"{what} must be a one-element float32 tensor, got {scale!r}")
    if scale.dtype != torch.float32:
        raise LaunchError(f"{what} must be float32, got {scale.dtype}")
    if scale.device != device:
        raise LaunchError(f"{what} is on {scale.device} but the input is on {device}")


# ---------------------------------------------------------------------------------------
# Activation quantization
# ---------------------------------------------------------------------------------------


@triton.jit
def _load_smoothed(row_ptr, smooth_ptr, offs_k, K, stride_xk, HAS_SMOOTH: tl.constexpr):
    # x[k] in float32, divided by smooth[k] for SmoothQuant (exactly rounded: div_rn,
    # because Triton's plain "/" is an approximate division on the GPU)
    x = tl.load(row_ptr + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=1.0))
    return x


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, smooth_ptr,
    K, stride_xm, stride_xk, stride_qm,
    DYNAMIC: tl.constexpr, HAS_SMOOTH: tl.constexpr, SCALE_EPS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    if DYNAMIC:
        absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            absmax = tl.maximum(absmax, tl.abs(_load_smoothed(x_row, smooth_ptr, k0 + offs, K, stride_xk, HAS_SMOOTH)))
        # scale = max(absmax / 127, SCALE_EPS): kernels/int8.py's scale_from_absmax, finite
        # and non-zero for an all-zero row
        scale = tl.maximum(tl.math.div_rn(tl.max(absmax, axis=0), INT8_MAX_F32), SCALE_EPS)
        tl.store(scale_ptr + row, scale)
    else:
        scale = tl.load(scale_ptr)
    inv_scale = tl.math.div_rn(1.0, scale)
    # The row is re-read from L2 (dynamic), where the first pass left it.
    for k0 in range(0, K, BLOCK_K):
        x = _load_smoothed(x_row, smooth_ptr, k0 + offs, K, stride_xk, HAS_SMOOTH)
        tl.store(q_row + k0 + offs, round_to_int8(x * inv_scale), mask=k0 + offs < K)


def quantize_activations(
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    smooth_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of x [..., K] (fp16, bf16 or fp32).

    scale: None for dynamic per-token scales (absmax of each row / 127), or a
        one-element float32 tensor (static, calibrated).
    smooth_scale: float32 [K] or None; x is divided by it per channel first (SmoothQuant).
    out: a contiguous int8 [..., K] tensor to write into (else one is allocated).
    Returns (q int8 [..., K], scale): float32 [...] when dynamic, else `scale` itself.
    """
    if x.dtype not in FLOAT_DTYPES.values():
        raise LaunchError(f"activation quantization takes fp16, bf16 or fp32 input, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise LaunchError(f"input must have a non-empty last dim, got shape {tuple(x.shape)}")
    if not triton_can_run(x.device):
        raise LaunchError(f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU); input is on {x.device}")
    k = x.shape[-1]
    lead = x.shape[:-1]
    if scale is not None:
        check_scalar_scale(scale, x.device, "static input scale")
    if smooth_scale is not None:
        if smooth_scale.shape != (k,) or smooth_scale.dtype != torch.float32 or smooth_scale.device != x.device:
            raise LaunchError(
                f"smooth_scale must be a float32 tensor of shape ({k},) on {x.device}; "
                f"got {smooth_scale.dtype} {tuple(smooth_scale.shape)} on {smooth_scale.device}"
            )
        smooth_scale = smooth_scale.contiguous()
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # (2-D: no reshape, whose host cost is microseconds)
    m = x2.shape[0]
    q = output_buffer(out, (*lead, k), x, torch.int8)
    dynamic = scale is None
    if dynamic:
        scale = torch.empty(lead, dtype=torch.float32, device=x.device)
    if m > 0:
        # Under the interpreter a small block, so test rows span several.
        block_k = 32 if interpreting() else min(triton.next_power_of_2(k), 4096)
        args = (x2, q, scale, smooth_scale if smooth_scale is not None else scale, k, x2.stride(0), x2.stride(1), q.stride(0))
        constexprs = dict(
            DYNAMIC=dynamic, HAS_SMOOTH=smooth_scale is not None, SCALE_EPS=SCALE_EPS, BLOCK_K=block_k,
            num_warps=8 if block_k >= 2048 else 4,
        )  # fmt: skip
        key = (x.dtype, m, k, x2.stride(0), x2.stride(1), dynamic, smooth_scale is not None)
        launch(_quantize_rows_kernel, lambda meta: (m,), args, constexprs, key)
    return (q if x.dim() == 2 else q.reshape(*lead, k)), scale


# ---------------------------------------------------------------------------------------
# The w8a8 GEMM
# ---------------------------------------------------------------------------------------


def w8a8_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    weight_layout: str | WeightLayout = "out_in",
    output_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    path: str = "auto",
    out: torch.Tensor | None = None,
    up: QuantizedWeight | None = None,
    up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """act((xq * x_scale) @ dequant(weight)^T + bias) for int8 xq [..., K], on the int8 tensor cores.

    x_scale: float32, per token (shape [...]) or one element (static).
    weight: int8 data in `weight_layout` with per-channel float32 scales.
    activation: "none" or a GELU flavour ("erf", "tanh", "quick").
    output_scale: a one-element float32 tensor: requantize the result to int8 with it
        (GEMM1, whose int8 output GEMM2 reads); returns int8 [..., N]. None: the result
        in `out_dtype` (fp16, bf16 or fp32).
    path: "auto", "decode" (M <= 16), "tma" or "strided", as for w8a16_linear.
    up, up_bias: a gated GEMM1's up projection (weight's shape, layout and granularity):
        act(... + bias) * (the same GEMM on up + up_bias), each dequantized with its own scales.
    out: a contiguous [..., N] tensor of the output dtype to write into.
    """
    requested_dtype = out_dtype
    if output_scale is not None:
        out_dtype = torch.int8

    def check():
        if xq.dtype != torch.int8:
            raise LaunchError(f"w8a8 input must be int8 (quantize it with quantize_activations), got {xq.dtype}")
        if weight.group_size is not None:
            raise LaunchError(
                f"w8a8 takes per-channel weight scales only, got {weight.granularity}: "
                "quantize the weight per channel, or run it as w8a16"
            )
        lead = xq.shape[:-1]
        if not isinstance(x_scale, torch.Tensor) or x_scale.dtype != torch.float32 or x_scale.device != xq.device:
            raise LaunchError(f"x_scale must be a float32 tensor on {xq.device}")
        if x_scale.numel() != 1 and tuple(x_scale.shape) != tuple(lead):
            raise LaunchError(
                f"x_scale must hold one scale per token (shape {tuple(lead)}) or one for all, got {tuple(x_scale.shape)}"
            )
        if output_scale is not None:
            check_scalar_scale(output_scale, xq.device, "output_scale")
        elif requested_dtype not in FLOAT_DTYPES.values():
            raise LaunchError(
                f"out_dtype must be fp16, bf16 or fp32 (int8 comes with an output_scale), got {requested_dtype}"
            )

    return int8_weight_gemm(
        xq, x_scale, weight, bias, activation=activation, weight_layout=weight_layout, path=path, out=out,
        out_dtype=out_dtype, c_scale=output_scale, check=check, up=up, up_bias=up_bias,
    )  # fmt: skip
