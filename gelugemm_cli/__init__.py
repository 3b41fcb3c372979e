"""gelugemm: quantize, validate and benchmark transformer GELU MLP layers.

This package's own import loads nothing but the standard library: the entry point
(gelugemm_cli/entry.py) installs its start-up signal handling before torch and triton load.
The version is `kernels.version.__version__`.
"""
