"""The op as a `torch.nn.Module`.

    mlp = FusedGeluMLP(w1, b1, w2, b2, MLPConfig(dtype="w8a8"))   # QuantizedWeights for int8
    mlp = FusedGeluMLP.from_linears(fc1, fc2, gelu=model_gelu)     # a model's own float MLP
    model.to("cuda")                                               # moves the weights and scales too
    mlp.backend                                                    # "triton" on CUDA, "torch" elsewhere

A `FusedGeluMLP` holds one MLP's weights, float tensors or int8 `QuantizedWeight`s with
their scales, as buffers, and runs `GELU(x @ W1^T + b1) @ W2^T + b2` through `FusedMLP`.
It is for inference: the weights are buffers, not parameters (the fused kernels have no
backward pass).

dtypes: the op computes in its config's dtype (fp16/bf16/fp32; the int8 schemes in their
`activation_dtype`, fp16 unless asked). `forward` casts its input to that dtype and the
result back to the input's dtype, so the module drops into an fp32 model unchanged; the
model's other layers stay in fp32 and only the MLP runs at the lower precision. Casting
the module (`.half()`, `.to(torch.float64)`, or the whole model) moves nothing but the
device: its weights keep the dtypes the op is configured for.

Loading modules from a quantized checkpoint and swapping them into a model is the
checkpoint layer's job: `calibration.model` (`load_mlps`, `swap_mlps`).
"""

from __future__ import annotations

import torch
from torch import nn

from kernels.errors import GelugemmError
from kernels.op import FLOAT_DTYPES, FusedMLP, MLPConfig
from kernels.quantized import QuantizedWeight

# The scale tensors a QuantizedWeight may carry; each becomes a buffer `w1_<field>` / `w2_<field>`.
_SCALE_FIELDS = ("scale", "input_scale", "output_scale", "smooth_scale")

# nn.GELU's `approximate` -> the op's GELU flavour.
_GELU_MODULE_FLAVOUR = {"none": "erf", "tanh": "tanh"}


class FusedGeluMLP(nn.Module):
    """GELU(x @ W1^T + b1) @ W2^T + b2 through the fused op, as a module.

    w1, w2: float tensors in the config's dtype (fp16/bf16/fp32), or `QuantizedWeight`s
        for w8a16/w8a8, stored in `config.weight_layout` ([d_ff, d_model] for W1 in
        "out_in", [d_model, d_ff] in "in_out").
    b1, b2: float biases or None.
    config: what the op computes (dtype, GELU flavour, layout, backend, w8a8 input_quant).
    device: where the weights go; None leaves them where they are.
    """

    def __init__(
        self,
        w1: torch.Tensor | QuantizedWeight,
        b1: torch.Tensor | None,
        w2: torch.Tensor | QuantizedWeight,
        b2: torch.Tensor | None,
        config: MLPConfig,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        self.config = config
        self.quantized = config.dtype not in FLOAT_DTYPES
        for name, w in (("w1", w1), ("w2", w2)):
            if isinstance(w, QuantizedWeight) != self.quantized:
                want = "a QuantizedWeight" if self.quantized else f"a {config.dtype} tensor"
                raise GelugemmError(f"{name} must be {want} for dtype {config.dtype}, got {type(w).__name__}")
        if self.quantized:
            self.group_size = {"w1": w1.group_size, "w2": w2.group_size}
            _check_intermediate_scale(w1, w2)
            for name, w in (("w1", w1), ("w2", w2)):
                self.register_buffer(name, w.data)
                for field in _SCALE_FIELDS:
                    if (name, field) != ("w2", "input_scale"):  # w1_output_scale stands for it
                        self.register_buffer(f"{name}_{field}", getattr(w, field))
        else:
            dtype = config.torch_dtype
            self.register_buffer("w1", w1.detach().to(dtype))
            self.register_buffer("w2", w2.detach().to(dtype))
        # Float modules keep the whole fp16/bf16 path in one dtype; int8 ones keep the biases
        # as the checkpoint stores them (the kernels add them in float32 either way).
        bias_dtype = None if self.quantized else config.torch_dtype
        for name, b in (("b1", b1), ("b2", b2)):
            self.register_buffer(name, None if b is None else b.detach().to(dtype=bias_dtype or b.dtype))
        self.d_model, self.d_ff = config.weight_layout.kn_shape(self.w1)
        if device is not None:
            self.to(device)
        else:
            self._op = FusedMLP(config, self.w1.device)

    # ---- constructors ---------------------------------------------------------------

    @classmethod
    def from_linears(
        cls,
        fc1: nn.Linear,
        fc2: nn.Linear,
        gelu: str | nn.GELU = "erf",
        dtype: str | None = None,
        backend: str = "auto",
        device: str | torch.device | None = None,
    ) -> FusedGeluMLP:
        """A float MLP from the model's own two linears and its GELU.

        gelu: "erf" | "tanh", or the model's `nn.GELU` module (its `approximate` decides).
        dtype: "fp16" | "bf16" | "fp32"; None keeps the linears' dtype (an fp32 model's MLP
            then computes exactly what it did, through the op).
        """
        if isinstance(gelu, nn.GELU):
            gelu = _GELU_MODULE_FLAVOUR[gelu.approximate]
        if dtype is None:
            by_torch_dtype = {v: k for k, v in FLOAT_DTYPES.items()}
            if fc1.weight.dtype not in by_torch_dtype:
                raise GelugemmError(f"the linears are {fc1.weight.dtype}; pass dtype='fp16', 'bf16' or 'fp32'")
            dtype = by_torch_dtype[fc1.weight.dtype]
        config = MLPConfig(dtype=dtype, gelu=gelu, weight_layout="out_in", backend=backend)
        return cls(fc1.weight, fc1.bias, fc2.weight, fc2.bias, config, device=device)

    # ---- what the op reads ----------------------------------------------------------

    def _weight(self, name: str) -> torch.Tensor | QuantizedWeight:
        if not self.quantized:
            return getattr(self, name)
        # Rebuilt from the buffers on each call (a few attribute reads), so the weight
        # follows the buffers wherever .to() moved them.
        scales = {field: getattr(self, f"{name}_{field}", None) for field in _SCALE_FIELDS}
        if name == "w2":
            # GEMM2 reads the int8 intermediate at the scale GEMM1 requantized it to. Handing
            # the op that very tensor (not an equal copy) spares it a per-call device-to-host
            # comparison of the two.
            scales["input_scale"] = self.w1_output_scale
        return QuantizedWeight(getattr(self, name), group_size=self.group_size[name], **scales)

    def weights(self) -> tuple:
        """(w1, b1, w2, b2) as the op takes them: tensors, or QuantizedWeights with their scales."""
        return self._weight("w1"), self.b1, self._weight("w2"), self.b2

    @property
    def op(self) -> FusedMLP:
        return self._op

    @property
    def backend(self) -> str:
        """"triton" or "torch": what forward runs on the weights' current device."""
        return self._op.backend

    @property
    def backend_reason(self) -> str:
        return self._op.backend_reason

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., d_model] in any float dtype -> [..., d_model] in the same dtype, computed in the op's dtype."""
        y = self._op(x.to(self.config.torch_dtype), *self.weights())
        return y.to(x.dtype)

    # ---- moving ---------------------------------------------------------------------

    def _apply(self, fn, recurse: bool = True):
        # Module.to(), .cuda(), .half() ... all come here with `fn` applied to every buffer.
        # Keep each buffer's dtype (int8 data, float32 scales, the config's weight dtype):
        # a cast would break the op's dtype checks, or round the scales. Only the device moves.
        def move_only(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        super()._apply(move_only, recurse)
        # The op picks its backend by device, once: pick again for the new device.
        self._op = FusedMLP(self.config, self.w1.device)
        return self

    def extra_repr(self) -> str:
        cfg = self.config
        what = cfg.dtype if not self.quantized else f"{cfg.dtype}, {cfg.activation_dtype} activations"
        if cfg.dtype == "w8a8":
            what += f", {cfg.input_quant} input scale"
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, {what}, gelu={cfg.gelu}, "
            f"layout={cfg.weight_layout}, backend={self.backend}"
        )


def _check_intermediate_scale(w1: QuantizedWeight, w2: QuantizedWeight) -> None:
    """w8a8 files carry GELU's output scale twice (fc1.output_scale, fc2.input_scale); they must agree."""
    if w2.input_scale is None:
        return
    if w1.output_scale is None or not torch.equal(w2.input_scale.reshape(-1).cpu(), w1.output_scale.reshape(-1).cpu()):
        raise GelugemmError("w2.input_scale differs from w1.output_scale, the scale GEMM1 requantizes GELU's output to")
