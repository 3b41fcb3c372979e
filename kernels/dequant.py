"""A per-group int8 weight dequantized to fp16/bf16 in memory: w8a16's large-M schedule.

    W[n, k] = dtype(Wq[n, k] * scale[n, k // G])        (fp16: the scale rounded to fp16 first)

At many rows the w8a16 GEMM is bound by its tensor cores, and converting every int8 weight
tile in the main loop costs more than it saves: on an H100 the in-loop conversion runs at
~0.6x fp16 eager from M = 2048 up. Dequantizing the weight once (one read of 1 byte and one
write of 2 bytes per weight, ~60 us for a 4096x16384 weight at 3 TB/s) and running the float
kernel on it costs that pass plus the float GEMM. The dequantized values are exactly the
in-loop tiles' (kernels/reference.py's w8a16_group_weight), so the result is the same GEMM.
The 16-bit copy lives only for the call (2 bytes per weight of transient memory).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.errors import LaunchError
from kernels.gemm_base import _bf16_round_nearest
from kernels.launch import interpreting
from kernels.quantized import QuantizedWeight
from kernels.schemes import ACTIVATION_DTYPES, WeightLayout

BLOCK_ROWS, BLOCK_COLS = 32, 256


@triton.jit
def _dequant_group_kernel(
    q_ptr, s_ptr, out_ptr, R, C,
    stride_qr, stride_qc, stride_or, stride_oc, stride_sn, stride_sg,
    GROUP: tl.constexpr, ROWS_ARE_N: tl.constexpr, OUT_FP16: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (r < R) & (c < C)
    q = tl.load(q_ptr + r * stride_qr + c * stride_qc, mask=mask, other=0)
    # The data is [N, K] (out_in) or [K, N] (in_out); the scales are [N, cdiv(K, G)].
    if ROWS_ARE_N:
        s_offs = r * stride_sn + (c // GROUP) * stride_sg
    else:
        s_offs = c * stride_sn + (r // GROUP) * stride_sg
    s = tl.load(s_ptr + s_offs, mask=mask, other=0.0)
    if OUT_FP16:
        # an fp16 scale times a 7-bit integer is exact in float32: one rounding, to fp16
        w = (q.to(tl.float32) * s.to(tl.float16).to(tl.float32)).to(tl.float16)
    else:
        v = q.to(tl.float32) * s
        if INTERPRETER:
            v = _bf16_round_nearest(v)
        w = v.to(tl.bfloat16)
    tl.store(out_ptr + r * stride_or + c * stride_oc, w, mask=mask)


def dequantize_group_weight(
    weight: QuantizedWeight, dtype: torch.dtype, weight_layout: str | WeightLayout = "out_in"
) -> torch.Tensor:
    """The per-group int8 `weight` as a new contiguous fp16/bf16 tensor in its stored layout
    ([N, K] for out_in, [K, N] for in_out), equal to w8a16_group_weight bit for bit."""
    layout = WeightLayout.parse(weight_layout)
    q, scale = weight.data, weight.scale
    if weight.group_size is None:
        raise LaunchError("dequantize_group_weight needs per-group scales; this weight has per-channel scales")
    if dtype not in ACTIVATION_DTYPES.values():
        raise LaunchError(f"dequantized weight dtype must be fp16 or bf16, got {dtype}")
    if q.dtype != torch.int8 or q.dim() != 2:
        raise LaunchError(f"weight data must be a 2-D int8 tensor, got {q.dtype} of shape {tuple(q.shape)}")
    n, k = (q.shape[0], q.shape[1]) if layout is WeightLayout.OUT_IN else (q.shape[1], q.shape[0])
    groups = triton.cdiv(k, weight.group_size)
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n, groups):
        raise LaunchError(f"group scales must be float32 of shape ({n}, {groups}), got {scale.dtype} {tuple(scale.shape)}")
    if scale.device != q.device:
        raise LaunchError(f"weight data is on {q.device} but its scales are on {scale.device}")
    if q.device.type != "cuda" and not interpreting():
        raise LaunchError(f"the Triton kernels need a CUDA device (or TRITON_INTERPRET=1), got {q.device}")
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    if out.numel() == 0:
        return out
    rows, cols = q.shape
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(cols, BLOCK_COLS))
    _dequant_group_kernel[grid](
        q, scale, out, rows, cols, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        scale.stride(0), scale.stride(1), GROUP=weight.group_size, ROWS_ARE_N=layout is WeightLayout.OUT_IN,
        OUT_FP16=dtype == torch.float16, INTERPRETER=interpreting(), BLOCK_R=BLOCK_ROWS, BLOCK_C=BLOCK_COLS,
    )  # fmt: skip
    return out
