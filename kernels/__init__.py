"""Fused GEMM-GELU kernels for transformer MLPs, the op that runs them, and its torch reference."""

from kernels.errors import BackendUnavailable, GelugemmError, LaunchError
from kernels.gemm import gemm_bias_act
from kernels.module import FusedGeluMLP
from kernels.op import FusedMLP, MLPConfig
from kernels.quantized import QuantizedWeight
from kernels.reference import gelu, mlp_reference, w8a8_mlp_reference, w8a16_mlp_reference
from kernels.w8a8 import quantize_activations, w8a8_linear
from kernels.w8a16 import w8a16_linear

__all__ = [
    "BackendUnavailable",
    "FusedGeluMLP",
    "FusedMLP",
    "GelugemmError",
    "LaunchError",
    "MLPConfig",
    "QuantizedWeight",
    "gelu",
    "gemm_bias_act",
    "mlp_reference",
    "quantize_activations",
    "w8a8_linear",
    "w8a8_mlp_reference",
    "w8a16_linear",
    "w8a16_mlp_reference",
]
