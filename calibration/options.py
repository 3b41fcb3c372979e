"""What `quantize` was asked to do, checked once, with the names the CLI, JSON and metadata share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from calibration.devices import AUTO, resolve_device
from calibration.errors import OptionError
from calibration.families import check_asked_activation_dtype
from calibration.observers import parse_method
from calibration.smooth import check_alpha
from kernels.schemes import ActivationScheme, Granularity, SchemeError
from kernels.w8a8 import W8A8_GROUP_SIZES

SCHEMES = ("w8a16", "w8a8")
# --calib's value that asks for synthetic calibration rows (calibration.data) instead of a file.
SYNTHETIC = "synthetic"
# The defaults by scheme: what the field ships as W8A16 (int8 weights, a scale per 128 inputs)
# and W8A8 (per-channel weights, the only weights engines run int8 x int8 with, and per-token
# dynamic activations).
DEFAULT_GRANULARITY = {"w8a16": "group:128", "w8a8": "per-channel"}
DEFAULT_ACTIVATIONS = "dynamic"
# The largest --granularity group:N: past any model's K (a group as wide as K is one scale
# per row, as per-channel), and small enough for the quantizer, which pads each group to N
# columns (quantize_weights._Blocks: time grows with N, minutes at 2**20 on a large layer).
MAX_GROUP_SIZE = 1 << 16
SYNTHETIC_WARNING = (
    "synthetic calibration rows (--calib synthetic) miss the outlier channels of real activations: "
    "the static scales set from them can be several times off; calibrate on real text or images "
    "(gelugemm calibrate MODEL_DIR --text FILE -o calib.safetensors, then --calib calib.safetensors)"
)


def comma_list(text: str, what: str) -> list[str]:
    """'a, b,a' -> ['a', 'b']: an option's comma list, in order, each item once; an empty item
    ('a,,b', a trailing comma) is refused rather than dropped, and so is an empty list."""
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise OptionError(f"{what}: nothing given")
    if not all(items):
        raise OptionError(f"{what} {text!r}: an empty item between commas")
    return list(dict.fromkeys(items))


def positive_number(text: str | float, what: str) -> float:
    """`text` as a finite number above zero, or an OptionError naming `what` (e.g. "--tol")."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise OptionError(f"{what} must be a positive finite number; got {text!r}")
    return value


def parse_granularity(granularity: str) -> int | None:
    """"per-channel" -> None, "group:N" -> N (a group of N input channels shares a scale),
    1 <= N <= MAX_GROUP_SIZE."""
    shown = granularity if len(str(granularity)) <= 40 else str(granularity)[:37] + "..."
    try:
        group_size = Granularity.parse(granularity).group_size
    except (SchemeError, ValueError):  # ValueError: int() of a digit it cannot take ('²', 5000 digits)
        raise OptionError(f"--granularity must be per-channel or group:N with N > 0; got {shown!r}") from None
    if group_size is not None and group_size > MAX_GROUP_SIZE:
        raise OptionError(f"--granularity group:N takes N from 1 to {MAX_GROUP_SIZE}; got {shown!r}")
    return group_size


@dataclass(frozen=True)
class QuantizeOptions:
    """Options of `quantize_checkpoint`; the defaults are the CLI's.

    scheme: w8a16 (int8 weights) or w8a8 (int8 weights and activations).
    granularity: weight scales "per-channel" or "group:N" along the input dim; None is the
        scheme's default (w8a16 group:128, w8a8 per-channel, the only one w8a8 takes).
    activations: w8a8 only: how x and the GELU output are scaled (kernels.schemes.
        ActivationScheme): "dynamic" (per token at run time; None means it), "group:N" (per
        token per N channels at run time), or "static" (calibrated per-tensor scales).
    method: w8a8 static only: the activation observer (max | percentile:P | mse); None is max.
    smooth: w8a8 only: SmoothQuant alpha in [0, 1], or None for no smoothing.
    calib: the calibration rows for static scales and smoothing: a file (gelugemm calibrate's
        output), or "synthetic" for rows drawn from each MLP's LayerNorm (calibration.data);
        needed exactly when there are static scales or smoothing.
    tokens, seed: how many calibration rows; the synthetic rows' seed.
    layers: regex restricting which MLPs are quantized; the rest are copied unchanged.
    gelu: "erf" | "tanh" to override config.json and the family default.
    force: replace an existing output file.
    activation_dtype: "fp16" | "bf16": the float dtype the quantized MLPs' activations run
        in, recorded per MLP for the engines that load the file; None takes config.json's
        (torch_dtype bfloat16 -> bf16) or the family's (T5: bf16), else fp16.
    device: where the weights are quantized and their error measured: "auto" (a CUDA GPU
        when torch sees one, else the CPU), "cpu" or "cuda" (calibration.devices). Either
        gives the same int8 values and scales, bit for bit.

    granularity and activations are filled in (to the defaults) at construction.
    """

    scheme: str = "w8a16"
    granularity: str | None = None
    method: str | None = None
    smooth: float | None = None
    calib: Path | str | None = None
    tokens: int | None = None
    seed: int = 0
    layers: str | None = None
    gelu: str | None = None
    force: bool = False
    activations: str | None = None
    activation_dtype: str | None = None
    device: str = AUTO
    granularity_given: bool = field(default=False, init=False, compare=False)  # asked, not the scheme's default

    def __post_init__(self):
        if self.device != AUTO:  # (auto is always valid; resolved when the run starts)
            resolve_device(self.device)  # cuda without a CUDA device fails here, before any work
        if self.scheme not in SCHEMES:
            raise OptionError(f"--scheme must be one of {', '.join(SCHEMES)}; got {self.scheme!r}")
        object.__setattr__(self, "granularity_given", self.granularity is not None)
        granularity = str(Granularity(parse_granularity(self.granularity or DEFAULT_GRANULARITY[self.scheme])))
        object.__setattr__(self, "granularity", granularity)
        if self.calib is not None and str(self.calib) == SYNTHETIC:
            object.__setattr__(self, "calib", SYNTHETIC)
        elif self.calib is not None:
            object.__setattr__(self, "calib", Path(self.calib))
        if self.method is not None:
            parse_method(self.method)
        if self.smooth is not None:
            check_alpha(self.smooth)
        if self.tokens is not None and self.tokens < 1:
            raise OptionError(f"--tokens must be at least 1; got {self.tokens}")
        if self.activation_dtype is not None:
            check_asked_activation_dtype(self.activation_dtype)
        if self.scheme == "w8a16":
            self._check_w8a16()
        else:
            self._check_w8a8()

    def _check_w8a16(self) -> None:
        # Weight scales come from the weights alone: these would be silently ignored.
        given = [flag for flag, value in (
            ("--activations", self.activations), ("--method", self.method), ("--smooth", self.smooth),
            ("--calib", self.calib), ("--tokens", self.tokens),
        ) if value is not None]  # fmt: skip
        if given:
            verb, it = ("is", "it") if len(given) == 1 else ("are", "them")
            raise OptionError(
                f"{', '.join(given)} {verb} for w8a8's activation scales; w8a16 quantizes the weights alone "
                f"(drop {it}, or use --scheme w8a8)"
            )

    def _check_w8a8(self) -> None:
        try:
            activations = ActivationScheme.parse(self.activations or DEFAULT_ACTIVATIONS)
        except SchemeError as exc:
            raise OptionError(f"--activations: {exc}") from None
        if activations.kind == "group" and activations.group_size not in W8A8_GROUP_SIZES:
            sizes = ", ".join(f"group:{g}" for g in W8A8_GROUP_SIZES)
            raise OptionError(f"--activations {activations}: the int8 kernels run {sizes}")
        object.__setattr__(self, "activations", str(activations))
        if self.granularity != "per-channel":
            # The int8 x int8 GEMM applies one weight scale per output channel, after the K loop;
            # engines (vLLM's W8A8) run int8 x int8 only with per-channel or per-tensor weights.
            raise OptionError(f"w8a8 takes per-channel weight scales (its int8 GEMM applies them after the K loop); got {self.granularity}")
        static = activations.kind == "static"
        if self.method is not None and not static:
            raise OptionError(f"--method sets static activation scales; --activations {activations} computes them at run time")
        if self.needs_calibration and self.calib is None:
            why = "static activation scales" if static else "SmoothQuant's statistics (--smooth)"
            raise OptionError(
                f"{why} need calibration rows: pass --calib FILE (real activations: gelugemm calibrate MODEL_DIR "
                f"--text FILE -o FILE), or --calib synthetic for rows drawn from the LayerNorms (they miss outlier channels)"
            )
        if not self.needs_calibration:
            given = [flag for flag, value in (("--calib", self.calib), ("--tokens", self.tokens)) if value is not None]
            if given:
                raise OptionError(
                    f"{', '.join(given)}: --activations {activations} computes its scales at run time and uses no calibration "
                    "rows (they are for --activations static and --smooth)"
                )

    @property
    def activation_scheme(self) -> ActivationScheme | None:
        """w8a8's activation scheme (None for w8a16)."""
        return ActivationScheme.parse(self.activations) if self.scheme == "w8a8" else None

    @property
    def needs_calibration(self) -> bool:
        """Calibration rows are read: for static activation scales, and for smoothing's statistics."""
        return self.scheme == "w8a8" and (self.smooth is not None or ActivationScheme.parse(self.activations or DEFAULT_ACTIVATIONS).kind == "static")

    @property
    def calib_file(self) -> Path | None:
        """The calibration file, or None (no calibration, or synthetic rows)."""
        return None if self.calib in (None, SYNTHETIC) else self.calib

    @property
    def synthetic(self) -> bool:
        """Calibration rows are drawn, not read from a file."""
        return self.calib == SYNTHETIC

    @property
    def compute_device(self) -> torch.device:
        """The device `device` names here (auto resolved)."""
        return resolve_device(self.device)

    @property
    def group_size(self) -> int | None:
        return parse_granularity(self.granularity)

    @property
    def observer(self) -> str | None:
        """The static activation observer, canonical; None without static scales."""
        static = self.scheme == "w8a8" and ActivationScheme.parse(self.activations).kind == "static"
        return parse_method(self.method or "max") if static else None
