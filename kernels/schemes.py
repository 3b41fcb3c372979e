"""The words every layer shares, each defined once: the op's dtypes, GELU flavours,
weight layouts, weight granularity and w8a8 activation schemes.

They are parsed once, where a value enters (a CLI flag, a checkpoint's config.json, a
quantized file's record), carried as these small frozen types, and written back with
`str()`, so the CLI, the JSON reports, the file metadata and the op's config use one
spelling:

    Granularity.parse("group:128")        -> Granularity(group_size=128); str() "group:128"
    ActivationScheme.parse("dynamic")     -> per-token scales computed at run time
    WeightLayout.parse("in_out")          -> WeightLayout.IN_OUT (a str: == "in_out" holds)

A wrong spelling is a SchemeError wherever it enters. WeightLayout is the one place a
layout decides anything: code that reads a weight takes its [out, in] view or its (K, N)
shape and strides from it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from kernels.errors import LaunchError

# The op's dtypes: the float ones by name, and the two int8 schemes (int8 weights with
# float activations; int8 weights and activations).
FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
INT8_DTYPES = ("w8a16", "w8a8")
DTYPES = (*FLOAT_DTYPES, *INT8_DTYPES)
# The float dtypes of an int8 scheme's input and output (x, y), by name.
ACTIVATION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# erf: 0.5 x (1 + erf(x / sqrt 2)), the exact GELU. tanh: GPT-2's approximation,
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). quick: CLIP's x * sigmoid(1.702 x).
GELU_FLAVOURS = ("erf", "tanh", "quick")

# An activation name as Hugging Face configs write it (hidden_act, hidden_activation,
# activation_function, activation, feed_forward_proj) -> the GELU flavour it computes.
HIDDEN_ACT_GELU = {
    "gelu": "erf",
    "gelu_python": "erf",
    "gelu_new": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_fast": "tanh",
    "gelu_accurate": "tanh",
    "quick_gelu": "quick",
}


class SchemeError(LaunchError):
    """A layout, granularity or activation scheme spelled in a way gelugemm does not know.

    A LaunchError: the op's config and the launchers take these values too, and a wrong
    one is the same error wherever it enters."""


class WeightLayout(str, enum.Enum):
    """How a linear's weight is stored: nn.Linear's [out, in] or GPT-2 Conv1D's [in, out]."""

    OUT_IN = "out_in"
    IN_OUT = "in_out"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: str | WeightLayout) -> WeightLayout:
        try:
            return cls(value)
        except ValueError:
            raise SchemeError(f"weight_layout must be 'out_in' or 'in_out', got {value!r}") from None

    # The one place a layout decides anything: everything else takes the [out, in] view
    # or the (K, N) shape and strides, and reads any weight the same way.

    def as_out_in(self, w):
        """w viewed as [out, in] = [N, K], whatever layout it is stored in (no copy). The
        view is its own inverse: an [N, K] tensor back in this layout."""
        return w if self is WeightLayout.OUT_IN else w.t()

    def kn_shape(self, w) -> tuple[int, int]:
        """(K, N) of a 2-D weight stored in this layout."""
        rows, cols = w.shape
        return (cols, rows) if self is WeightLayout.OUT_IN else (rows, cols)

    def kn_strides(self, w) -> tuple[int, int]:
        """(stride along K, stride along N) of a 2-D weight stored in this layout."""
        rows, cols = w.stride()
        return (cols, rows) if self is WeightLayout.OUT_IN else (rows, cols)


def _positive_group(text: str, what: str) -> int:
    # isascii: "²".isdigit() is True, but int("²") fails; so does int() of 5000 digits.
    try:
        n = int(text) if text.isascii() and text.isdigit() else 0
    except ValueError:
        n = 0
    if n <= 0:
        raise SchemeError(f"{what}: group:N needs a positive integer N, got 'group:{text[:40]}'")
    return n


@dataclass(frozen=True)
class Granularity:
    """Weight scales: one per output channel (group_size None), or one per group of
    `group_size` input channels along K (the field's W8A16 preset uses 128)."""

    group_size: int | None = None

    def __post_init__(self):
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise SchemeError(f"group_size must be a positive int or None, got {self.group_size!r}")

    @classmethod
    def parse(cls, value: str | Granularity | None) -> Granularity:
        """"per-channel" or "group:N" (None and a Granularity pass through)."""
        if isinstance(value, Granularity):
            return value
        if value in (None, "per-channel"):
            return cls(None)
        name, sep, size = str(value).partition(":")
        if name == "group" and sep:
            return cls(_positive_group(size, "granularity"))
        raise SchemeError(f"granularity must be per-channel or group:N, got {value!r}")

    @property
    def per_channel(self) -> bool:
        return self.group_size is None

    def scale_shape(self, n: int, k: int) -> tuple[int, ...]:
        """The scale tensor's shape for a weight of N outputs and K inputs: (N,) per
        channel, (N, ceil(K / group_size)) per group (the last group may be short)."""
        return (n,) if self.group_size is None else (n, -(-k // self.group_size))

    def __str__(self) -> str:
        return "per-channel" if self.group_size is None else f"group:{self.group_size}"


PER_CHANNEL = Granularity(None)


@dataclass(frozen=True)
class ActivationScheme:
    """How w8a8 scales its two int8 GEMM inputs, x and the GELU output h.

    dynamic   one scale per token (row), its absmax over all columns, computed at run
              time (compressed-tensors strategy "token", dynamic)
    group:N   one scale per token per N columns, computed at run time ("group", dynamic)
    static    one calibrated scale per tensor, stored in the file ("tensor", static)
    """

    kind: str = "dynamic"
    group_size: int | None = None

    KINDS = ("dynamic", "group", "static")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise SchemeError(f"activations must be dynamic, group:N or static, got {self.kind!r}")
        if (self.kind == "group") != (self.group_size is not None):
            raise SchemeError("activations group:N needs a group size, and only it has one")

    @classmethod
    def parse(cls, value: str | ActivationScheme) -> ActivationScheme:
        """"dynamic", "static" or "group:N"."""
        if isinstance(value, ActivationScheme):
            return value
        if value in ("dynamic", "static"):
            return cls(value)
        name, sep, size = str(value).partition(":")
        if name == "group" and sep:
            return cls("group", _positive_group(size, "activations"))
        raise SchemeError(f"activations must be dynamic, group:N or static, got {value!r}")

    @property
    def is_dynamic(self) -> bool:
        """Scales computed at run time (no calibration data needed)."""
        return self.kind != "static"

    @property
    def strategy(self) -> str:
        """The compressed-tensors QuantizationStrategy of these activations."""
        return {"dynamic": "token", "group": "group", "static": "tensor"}[self.kind]

    def __str__(self) -> str:
        return self.kind if self.kind != "group" else f"group:{self.group_size}"


DYNAMIC = ActivationScheme("dynamic")
STATIC = ActivationScheme("static")


def scheme_key(dtype: str, granularity: Granularity | str | None = None, activations: ActivationScheme | str | None = None) -> str:
    """What a path runs, as tolerances and limits are keyed: the dtype for a float one,
    "w8a16:<granularity>" ("w8a16:group:128"), "w8a8:<activations>" ("w8a8:dynamic")."""
    if dtype == "w8a8":
        return f"w8a8:{ActivationScheme.parse(activations)}"
    if dtype == "w8a16":
        return f"w8a16:{Granularity.parse(granularity)}"
    return dtype


def closest_key(key: str, table) -> str:
    """The key of `table` (measured schemes) that stands for `key`: the key itself, or for a
    group size the table does not name, group:128's where it is finer (at least as accurate),
    else w8a16's per-channel one (the coarsest weight scales). KeyError if none applies."""
    if key in table:
        return key
    dtype, _, detail = key.partition(":")
    if detail.startswith("group:"):
        size = Granularity.parse(detail).group_size
        stand_in = f"{dtype}:group:128" if size <= 128 else "w8a16:per-channel"
        if dtype == "w8a16" or size <= 128:
            if stand_in in table:
                return stand_in
    raise KeyError(key)
