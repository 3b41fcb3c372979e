"""gelugemm: quantize, validate and benchmark transformer GELU MLP layers."""

from kernels.version import __version__

__all__ = ["__version__"]
