"""Fused GEMM-GELU kernels for transformer MLPs, the op that runs them, and its torch reference."""

from kernels.errors import BackendUnavailable, GelugemmError, LaunchError
from kernels.gemm import gemm_bias_act
from kernels.op import FusedMLP, MLPConfig
from kernels.quantized import QuantizedWeight
from kernels.reference import gelu, mlp_reference

__all__ = [
    "BackendUnavailable",
    "FusedMLP",
    "GelugemmError",
    "LaunchError",
    "MLPConfig",
    "QuantizedWeight",
    "gelu",
    "gemm_bias_act",
    "mlp_reference",
]
