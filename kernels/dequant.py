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
from kernels.gemm_base import _bf16_round_nearest, int8_to_fp16
from kernels.launch import interpreting
from kernels.quantized import QuantizedWeight
from kernels.schemes import ACTIVATION_DTYPES, WeightLayout

# One program per (group along K, block of output channels): the group's scale is loaded
# once per channel, never per element. A group of G values spans next_power_of_2(G) lanes.
TILE_ELEMENTS = 8192


def _blocks(group_size: int, rows_are_n: bool) -> tuple[int, int]:
    block_g = triton.next_power_of_2(group_size)
    # the other side: output channels, contiguous in memory for in_out (coalesced stores)
    block_other = max(32 if rows_are_n else 128, TILE_ELEMENTS // block_g)
    return block_g, block_other


@triton.jit
def _dequant_group_kernel(
    q_ptr, s_ptr, out_ptr, R, C,
    stride_qr, stride_qc, stride_or, stride_oc, stride_sn, stride_sg,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_OTHER: tl.constexpr, ROWS_ARE_N: tl.constexpr,
    OUT_FP16: tl.constexpr, INTERPRETER: tl.constexpr,
):  # fmt: skip
    # The data is [N, K] (out_in: rows are N) or [K, N] (in_out); the scales [N, cdiv(K, G)].
    if ROWS_ARE_N:
        g = tl.program_id(1)
        n = tl.program_id(0) * BLOCK_OTHER + tl.arange(0, BLOCK_OTHER)
        n_count = R
        k_count = C
    else:
        g = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_OTHER + tl.arange(0, BLOCK_OTHER)
        n_count = C
        k_count = R
    lane = tl.arange(0, BLOCK_G)
    k = g * GROUP + lane
    k_ok = (lane < GROUP) & (k < k_count)
    n_ok = n < n_count
    s = tl.load(s_ptr + n * stride_sn + g * stride_sg, mask=n_ok, other=0.0)
    if ROWS_ARE_N:
        offs_r = n[:, None]
        offs_c = k[None, :]
        mask = n_ok[:, None] & k_ok[None, :]
        scale = s[:, None]
    else:
        offs_r = k[:, None]
        offs_c = n[None, :]
        mask = k_ok[:, None] & n_ok[None, :]
        scale = s[None, :]
    q = tl.load(q_ptr + offs_r * stride_qr + offs_c * stride_qc, mask=mask, other=0)
    if OUT_FP16:
        # the in-loop tile's arithmetic: int8 -> fp16 by integer adds, times the fp16 scale
        # (an exact product rounded once)
        w = int8_to_fp16(q) * scale.to(tl.float16)
    else:
        v = q.to(tl.float32) * scale
        if INTERPRETER:
            v = _bf16_round_nearest(v)
        w = v.to(tl.bfloat16)
    tl.store(out_ptr + offs_r * stride_or + offs_c * stride_oc, w, mask=mask)


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
    k, n = layout.kn_shape(q)
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
    rows_are_n = layout is WeightLayout.OUT_IN
    block_g, block_other = _blocks(weight.group_size, rows_are_n)
    grid = (triton.cdiv(n, block_other), groups) if rows_are_n else (groups, triton.cdiv(n, block_other))
    _dequant_group_kernel[grid](
        q, scale, out, q.shape[0], q.shape[1], q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        scale.stride(0), scale.stride(1), GROUP=weight.group_size, BLOCK_G=block_g, BLOCK_OTHER=block_other,
        ROWS_ARE_N=rows_are_n, OUT_FP16=dtype == torch.float16, INTERPRETER=interpreting(),
    )  # fmt: skip
    return out
