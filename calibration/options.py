"""What `quantize` was asked to do, checked once, with the names the CLI, JSON and metadata share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from calibration.errors import OptionError
from calibration.families import check_asked_activation_dtype
from calibration.observers import parse_method
from calibration.smooth import check_alpha
from kernels.schemes import ActivationScheme

SCHEMES = ("w8a16", "w8a8")


def parse_granularity(granularity: str) -> int | None:
    """"per-channel" -> None, "group:N" -> N (a group of N input channels shares a scale)."""
    if granularity == "per-channel":
        return None
    name, _, value = granularity.partition(":")
    if name == "group" and value.isdigit() and int(value) > 0:
        return int(value)
    raise OptionError(f"--granularity must be per-channel or group:N with N > 0; got {granularity!r}")


@dataclass(frozen=True)
class QuantizeOptions:
    """Options of `quantize_checkpoint`; the defaults are the CLI's.

    scheme: w8a16 (int8 weights) or w8a8 (int8 weights, static int8 activation scales).
    granularity: weight scales "per-channel" or "group:N" along the input dim (w8a16 only).
    method: w8a8 only: the activation observer (max | percentile:P | mse); None is max.
    smooth: w8a8 only: SmoothQuant alpha in [0, 1], or None for no smoothing.
    calib, tokens, seed: w8a8 only: the calibration inputs (see calibration.data).
    layers: regex restricting which MLPs are quantized; the rest are copied unchanged.
    gelu: "erf" | "tanh" to override config.json and the family default.
    force: replace an existing output file.
    activations: w8a8 only: how x and the GELU output are scaled (kernels.schemes.
        ActivationScheme: dynamic | group:N | static); None is quantize's default, static.
    activation_dtype: "fp16" | "bf16": the float dtype the quantized MLPs' activations run
        in, recorded per MLP for the engines that load the file; None takes config.json's
        (torch_dtype bfloat16 -> bf16) or the family's (T5: bf16), else fp16.
    """

    scheme: str = "w8a16"
    granularity: str = "per-channel"
    method: str | None = None
    smooth: float | None = None
    calib: Path | None = None
    tokens: int | None = None
    seed: int = 0
    layers: str | None = None
    gelu: str | None = None
    force: bool = False
    activations: str | None = None
    activation_dtype: str | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise OptionError(f"--scheme must be one of {', '.join(SCHEMES)}; got {self.scheme!r}")
        parse_granularity(self.granularity)
        if self.method is not None:
            parse_method(self.method)
        if self.smooth is not None:
            check_alpha(self.smooth)
        if self.activations is not None:
            if self.scheme != "w8a8":
                raise OptionError(f"--activations sets w8a8's activation scales; {self.scheme} has none")
            if ActivationScheme.parse(self.activations).kind != "static":
                raise OptionError(f"--activations {self.activations}: quantize writes static activation scales only (so far)")
        if self.activation_dtype is not None:
            check_asked_activation_dtype(self.activation_dtype)
        if self.tokens is not None and self.tokens < 1:
            raise OptionError(f"--tokens must be at least 1; got {self.tokens}")
        if self.scheme == "w8a8" and self.granularity != "per-channel":
            # The int8 x int8 GEMM applies one weight scale per output channel, in its epilogue.
            raise OptionError(f"w8a8 takes per-channel weight scales (its int8 GEMM applies them after the K loop); got {self.granularity}")
        if self.scheme == "w8a16":
            # Weight scales come from the weights alone: these would be silently ignored.
            given = [flag for flag, value in (
                ("--method", self.method), ("--smooth", self.smooth), ("--calib", self.calib), ("--tokens", self.tokens),
            ) if value is not None]  # fmt: skip
            if given:
                raise OptionError(f"{', '.join(given)} set activation scales, which w8a16 does not have; use --scheme w8a8")

    @property
    def activation_scheme(self) -> ActivationScheme | None:
        """w8a8's activation scheme (None for w8a16)."""
        if self.scheme != "w8a8":
            return None
        return ActivationScheme.parse(self.activations or "static")

    @property
    def group_size(self) -> int | None:
        return parse_granularity(self.granularity)

    @property
    def observer(self) -> str | None:
        """The activation observer, canonical; None for w8a16."""
        return parse_method(self.method or "max") if self.scheme == "w8a8" else None
