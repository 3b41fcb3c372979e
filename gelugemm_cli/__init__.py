"""gelugemm: quantize, validate and benchmark transformer GELU MLP layers."""

__version__ = "0.1.0"
