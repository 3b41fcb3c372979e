"""The int8 weight the op takes: int8 values and the float32 scales that dequantize them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.errors import LaunchError
from kernels.schemes import Granularity, WeightLayout


def expand_scale(scale: torch.Tensor, k: int, group_size: int | None) -> torch.Tensor:
    """A weight scale broadcast against W as [N, K]: [N, 1] per channel; per group, each
    group's scale repeated over its columns (the last group may be short)."""
    if group_size is None:
        return scale[:, None]
    return scale.repeat_interleave(group_size, dim=1)[:, :k]


@dataclass
class QuantizedWeight:
    """W ~= data * scale, symmetric int8 in [-127, 127].

    data: int8, in the checkpoint's layout ([N, K] for out_in, [K, N] for in_out).
    scale: float32, [N] per output channel, or [N, K / group_size] per group along K.
    group_size: None for per-channel scales.
    input_scale: w8a8 only, a float32 scalar: the static scale of this GEMM's int8 input
        (x for GEMM1, the GELU output for GEMM2). None quantizes the input per token at run time.
    output_scale: w8a8 GEMM1 only, a float32 scalar: the scale the GELU output is
        requantized to, in the GEMM's epilogue, so GEMM2 reads int8.
    smooth_scale: w8a8 GEMM1 only, float32 [K] or None: SmoothQuant migration. The
        stored weight was multiplied by it along K, so the input is divided by it
        (per input channel) before it is quantized.
    """

    data: torch.Tensor
    scale: torch.Tensor
    group_size: int | None = None
    input_scale: torch.Tensor | None = None
    output_scale: torch.Tensor | None = None
    smooth_scale: torch.Tensor | None = None

    def __post_init__(self):
        if self.data.dtype != torch.int8 or self.data.dim() != 2:
            raise LaunchError(f"quantized weight data must be a 2-D int8 tensor, got {self.data.dtype} {tuple(self.data.shape)}")
        if self.scale.dtype != torch.float32:
            raise LaunchError(f"weight scale must be float32, got {self.scale.dtype}")
        Granularity(self.group_size)  # a positive int or None, else the vocabulary's SchemeError

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def granularity(self) -> str:
        """"per-channel" or "group:N", spelled as kernels.schemes.Granularity spells it."""
        return str(Granularity(self.group_size))

    def dequantize(self, weight_layout: str | WeightLayout = "out_in", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight these int8 values stand for, in the same layout."""
        layout = WeightLayout.parse(weight_layout)
        w = layout.as_out_in(self.data).to(torch.float32)  # [N, K]
        w = w * expand_scale(self.scale, w.shape[1], self.group_size)
        return layout.as_out_in(w).to(dtype)

    def to(self, device) -> "QuantizedWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantizedWeight(
            move(self.data), move(self.scale), self.group_size,
            move(self.input_scale), move(self.output_scale), move(self.smooth_scale),
        )  # fmt: skip
