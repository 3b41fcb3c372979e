"""The int8 weight the op takes: int8 values and the float32 scales that dequantize them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.errors import LaunchError
from kernels.schemes import Granularity, SchemeError, WeightLayout


def expand_scale(scale: torch.Tensor, k: int, group_size: int | None) -> torch.Tensor:
    """A weight scale broadcast against W as [N, K]: [N, 1] per channel; per group, each
    group's scale repeated over its columns (the last group may be short)."""
    if group_size is None:
        return scale[:, None]
    return scale.repeat_interleave(group_size, dim=1)[:, :k]


def _described(value) -> str:
    """A value as an error message names it: a tensor's dtype and shape, else its type and value."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


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
        self.validate()

    def validate(self) -> None:
        """The fields' types: the checks construction runs, again (a field assigned after
        construction is checked where the weight is used: FusedGeluMLP runs this). Shapes that
        depend on the layout (scale against data, smooth_scale against K) are the op's checks.
        Cheap (a gated op builds two QuantizedWeights a call): no work beyond the comparisons."""
        data, scale, smooth, group_size = self.data, self.scale, self.smooth_scale, self.group_size
        if not isinstance(data, torch.Tensor) or data.dtype is not torch.int8 or data.dim() != 2:
            raise LaunchError(f"quantized weight data must be a 2-D int8 tensor, got {_described(data)}")
        if not isinstance(scale, torch.Tensor) or scale.dtype is not torch.float32:
            raise LaunchError(
                f"weight scale must be a float32 tensor ([N] per channel, [N, ceil(K / group_size)] per group), "
                f"got {_described(scale)}"
            )
        for field, t in (("input_scale", self.input_scale), ("output_scale", self.output_scale)):
            if t is not None and (not isinstance(t, torch.Tensor) or t.dtype is not torch.float32 or t.numel() != 1):
                raise LaunchError(f"{field} must be None or a one-element float32 tensor (a per-tensor scale, "
                                  f"torch.tensor(0.03)), got {_described(t)}")  # fmt: skip
        if smooth is not None and (not isinstance(smooth, torch.Tensor) or smooth.dtype is not torch.float32 or smooth.dim() != 1):
            raise LaunchError(f"smooth_scale must be None or a float32 [K] tensor, got {_described(smooth)}")
        # Granularity's rule (a positive int or None; not a bool), inline: building one costs 0.4 us
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0):
            raise SchemeError(f"group_size must be a positive int or None, got {group_size!r}")

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
