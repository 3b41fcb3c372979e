"""The op: one object, built from a config, that computes the whole MLP.

    op = FusedMLP(MLPConfig(dtype="bf16", gelu="tanh"), device="cuda")
    y = op(x, w1, b1, w2, b2)          # GELU(x @ W1^T + b1) @ W2^T + b2
    op.backend                          # "triton" or "torch", chosen once, here

The implementation is picked at construction, by dtype and device: the fused Triton
kernels on CUDA, the torch reference elsewhere. With `backend="auto"` the choice and
its reason are on the object (`op.backend`, `op.backend_reason`) for callers to report;
asking for `backend="triton"` where Triton cannot run raises instead of switching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import reference
from kernels.errors import BackendUnavailable, LaunchError
from kernels.gemm import gemm_bias_act, triton_can_run
from kernels.quantized import QuantizedWeight

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
INT8_DTYPES = ("w8a16", "w8a8")
DTYPES = tuple(FLOAT_DTYPES) + INT8_DTYPES
BACKENDS = ("auto", "triton", "torch")
INPUT_QUANT = ("dynamic", "static")


@dataclass(frozen=True)
class MLPConfig:
    """What the op computes and how.

    dtype: fp16 | bf16 | fp32 | w8a16 (int8 weights, float activations) |
        w8a8 (int8 weights and activations).
    gelu: "erf" (exact) or "tanh" (the approximation GPT-2-style checkpoints use).
    weight_layout: "out_in" (nn.Linear, [out, in]) or "in_out" (Conv1D, [in, out]).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    allow_tf32: fp32 only: let the GEMMs use TF32 tensor cores.
    activation_dtype: int8 schemes only: the float dtype of x and y, "fp16" or "bf16".
    input_quant: w8a8 only: "dynamic" (per-token scales computed at run time) or
        "static" (the calibrated `input_scale` carried by the weights).
    """

    dtype: str = "fp16"
    gelu: str = "erf"
    weight_layout: str = "out_in"
    backend: str = "auto"
    allow_tf32: bool = False
    activation_dtype: str = "fp16"
    input_quant: str = "dynamic"

    def __post_init__(self):
        for name, value, allowed in (
            ("dtype", self.dtype, DTYPES),
            ("gelu", self.gelu, reference.GELU_FLAVOURS),
            ("weight_layout", self.weight_layout, reference.WEIGHT_LAYOUTS),
            ("backend", self.backend, BACKENDS),
            ("activation_dtype", self.activation_dtype, ("fp16", "bf16")),
            ("input_quant", self.input_quant, INPUT_QUANT),
        ):
            if value not in allowed:
                raise LaunchError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The float dtype of the op's input and output."""
        return FLOAT_DTYPES.get(self.dtype) or FLOAT_DTYPES[self.activation_dtype]


def choose_backend(config: MLPConfig, device: torch.device) -> tuple[str, str]:
    """(backend, reason) for this config on this device."""
    if config.backend == "torch":
        return "torch", "asked for"
    if config.backend == "triton":
        if not triton_can_run(device):
            raise BackendUnavailable(
                f"backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 for the CPU interpreter); got {device}"
            )
        return "triton", "asked for"
    if device.type == "cuda":
        return "triton", "CUDA device"
    return "torch", f"no CUDA device ({device.type}): running the torch reference"


class FusedMLP:
    """GELU(x @ W1^T + b1) @ W2^T + b2 with the implementation chosen at construction."""

    def __init__(self, config: MLPConfig | None = None, device: str | torch.device | None = None):
        self.config = config or MLPConfig()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.backend, self.backend_reason = choose_backend(self.config, self.device)

    def __repr__(self) -> str:
        return f"FusedMLP({self.config}, device={self.device}, backend={self.backend!r})"

    def _check_float(self, x, weights):
        want = self.config.torch_dtype
        if x.dtype != want:
            raise LaunchError(f"op is configured for {self.config.dtype} but input is {x.dtype}")
        for name, w in weights:
            if isinstance(w, QuantizedWeight):
                raise LaunchError(f"{name} is quantized but the op is configured for {self.config.dtype}")
            if w.dtype != want:
                raise LaunchError(f"op is configured for {self.config.dtype} but {name} is {w.dtype}")

    def _check_device(self, x):
        if x.device.type != self.device.type:
            raise LaunchError(f"op was built for {self.device} but input is on {x.device}")

    def forward(self, x, w1, b1, w2, b2=None) -> torch.Tensor:
        self._check_device(x)
        cfg = self.config
        if cfg.dtype in FLOAT_DTYPES:
            self._check_float(x, (("w1", w1), ("w2", w2)))
            if self.backend == "torch":
                return reference.mlp_reference(
                    x, w1, b1, w2, b2, gelu_flavour=cfg.gelu, weight_layout=cfg.weight_layout, dtype=x.dtype
                )
            kw = dict(weight_layout=cfg.weight_layout, allow_tf32=cfg.allow_tf32)
            h = gemm_bias_act(x, w1, b1, activation=cfg.gelu, **kw)
            return gemm_bias_act(h, w2, b2, activation="none", **kw)
        raise LaunchError(f"dtype {cfg.dtype} is not implemented yet")

    __call__ = forward
