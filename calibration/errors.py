"""Errors in what the user gave quantize: a file it cannot use, or an option it cannot take."""

from kernels.errors import GelugemmError


class CheckpointError(GelugemmError, ValueError):
    """A checkpoint, calibration file or output path that cannot be used as given."""


class OptionError(GelugemmError, ValueError):
    """An option value outside what quantize accepts (scheme, granularity, method, ...)."""


class ModelError(GelugemmError, ValueError):
    """A model directory transformers cannot load as given, or inputs it cannot run on."""


class OutputError(CheckpointError):
    """An output path that cannot be written as given, or a write that failed (disk full, ...)."""
