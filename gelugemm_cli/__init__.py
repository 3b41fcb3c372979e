"""gelugemm: quantize, validate and benchmark transformer GELU MLP layers.

This package's own import loads nothing but the standard library: the entry point
(gelugemm_cli/entry.py) installs its start-up signal handling before torch and triton load.
"""


def __getattr__(name: str):
    if name == "__version__":  # kernels.version imports the kernels package, hence torch
        from kernels.version import __version__

        return __version__
    raise AttributeError(f"module 'gelugemm_cli' has no attribute {name!r}")
