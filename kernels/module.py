"""The op as a `torch.nn.Module`.

    mlp = FusedGeluMLP(w1, b1, w2, b2, MLPConfig(dtype="w8a8"))   # QuantizedWeights for int8
    mlp = FusedGeluMLP.from_linears(fc1, fc2, gelu=model_gelu)     # a model's own float MLP
    model.to("cuda")                                               # moves the weights and scales too
    mlp.backend                                                    # "triton" on CUDA, "torch" elsewhere

A `FusedGeluMLP` holds one MLP's weights, float tensors or int8 `QuantizedWeight`s with
their scales, as buffers, and runs `GELU(x @ W1^T + b1) @ W2^T + b2` through `FusedMLP`;
with `config.gated`, the gated MLP (GeGLU) `(GELU(x Wg^T + bg) * (x Wu^T + bu)) W2^T + b2`,
its up projection a weight of its own (`w_up`, `b_up`) or the second half of W1's
outputs (ModernBERT's concatenated `Wi`, kept as one buffer).
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

import operator

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
    config: what the op computes (dtype, GELU flavour, layout, backend, w8a8 activations,
        gated).
    device: where the weights go; None leaves them where they are.
    w_up, b_up: a gated MLP's up projection (W1 is then its gate), or None: a gated MLP
        whose W1 and b1 hold gate and up as the halves of their outputs.
    """

    def __init__(
        self,
        w1: torch.Tensor | QuantizedWeight,
        b1: torch.Tensor | None,
        w2: torch.Tensor | QuantizedWeight,
        b2: torch.Tensor | None,
        config: MLPConfig,
        device: str | torch.device | None = None,
        w_up: torch.Tensor | QuantizedWeight | None = None,
        b_up: torch.Tensor | None = None,
    ):
        super().__init__()
        self.config = config
        self.quantized = config.dtype not in FLOAT_DTYPES
        if (w_up is not None or b_up is not None) and not config.gated:
            raise GelugemmError("w_up and b_up are a gated MLP's up projection; the config says gated=False")
        self.weight_names = ("w1", "w2") + (("w_up",) if w_up is not None else ())
        weights = {"w1": w1, "w2": w2, "w_up": w_up}
        for name in self.weight_names:
            if isinstance(weights[name], QuantizedWeight) != self.quantized:
                want = "a QuantizedWeight" if self.quantized else f"a {config.dtype} tensor"
                raise GelugemmError(f"{name} must be {want} for dtype {config.dtype}, got {type(weights[name]).__name__}")
        if self.quantized:
            self.group_size = {name: weights[name].group_size for name in self.weight_names}
            _check_intermediate_scale(w1, w2)
            for name in self.weight_names:
                w = weights[name]
                self.register_buffer(name, w.data)
                for field in _SCALE_FIELDS:
                    # w1_output_scale stands for w2's input scale; x's scales are w1's
                    if (name, field) != ("w2", "input_scale") and (name != "w_up" or field == "scale"):
                        self.register_buffer(f"{name}_{field}", getattr(w, field))
        else:
            dtype = config.torch_dtype
            for name in self.weight_names:
                self.register_buffer(name, weights[name].detach().to(dtype))
        # Float modules keep the whole fp16/bf16 path in one dtype; int8 ones keep the biases
        # as the checkpoint stores them (the kernels add them in float32 either way).
        bias_dtype = None if self.quantized else config.torch_dtype
        biases = (("b1", b1), ("b2", b2)) + ((("b_up", b_up),) if w_up is not None else ())
        for name, b in biases:
            self.register_buffer(name, None if b is None else b.detach().to(dtype=bias_dtype or b.dtype))
        self.d_model, self.d_ff = config.weight_layout.kn_shape(self.w1)
        if config.gated and w_up is None:
            self.d_ff //= 2  # W1 holds gate and up
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
        *,
        up: nn.Linear | None = None,
        gated: bool = False,
    ) -> FusedGeluMLP:
        """A float MLP from the model's own linears and its GELU.

        gelu: "erf" | "tanh", or the model's `nn.GELU` module (its `approximate` decides).
        dtype: "fp16" | "bf16" | "fp32"; None keeps the linears' dtype (an fp32 model's MLP
            then computes exactly what it did, through the op).
        up: a gated MLP's up projection (fc1 is then its gate: Gemma's gate_proj, up_proj).
        gated: a gated MLP whose fc1 holds gate and up as the halves of its outputs
            (ModernBERT's Wi); implied by `up`.
        """
        if isinstance(gelu, nn.GELU):
            gelu = _GELU_MODULE_FLAVOUR[gelu.approximate]
        if dtype is None:
            by_torch_dtype = {v: k for k, v in FLOAT_DTYPES.items()}
            if fc1.weight.dtype not in by_torch_dtype:
                raise GelugemmError(f"the linears are {fc1.weight.dtype}; pass dtype='fp16', 'bf16' or 'fp32'")
            dtype = by_torch_dtype[fc1.weight.dtype]
        config = MLPConfig(dtype=dtype, gelu=gelu, weight_layout="out_in", backend=backend, gated=gated or up is not None)
        if up is None:
            return cls(fc1.weight, fc1.bias, fc2.weight, fc2.bias, config, device=device)
        return cls(fc1.weight, fc1.bias, fc2.weight, fc2.bias, config, device=device, w_up=up.weight, b_up=up.bias)

    # ---- what the op reads ----------------------------------------------------------

    def _weight(self, name: str) -> torch.Tensor | QuantizedWeight | None:
        if name not in self.weight_names:
            return None
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
        """(w1, b1, w2, b2, w_up, b_up) as the op takes them: tensors, or QuantizedWeights
        with their scales (w_up and b_up None but for a gated MLP's separate up projection).

        Built again only when a buffer is another tensor than last time (.to(), a buffer
        assigned): building took 16 us a forward on a 2-core host, against a few us for the
        lookup."""
        buffers = tuple(self._buffers.values())
        cached = self.__dict__.get("_weights_cache")
        if cached is not None and len(cached[0]) == len(buffers) and all(map(operator.is_, cached[0], buffers)):
            return cached[1]
        weights = (self._weight("w1"), self.b1, self._weight("w2"), self.b2, self._weight("w_up"), getattr(self, "b_up", None))
        self.__dict__["_weights_cache"] = (buffers, weights)
        return weights

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
            what += f", activations {cfg.activations}"
        gated = "" if not cfg.gated else ", gated (" + ("separate up" if "w_up" in self.weight_names else "concatenated") + ")"
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, {what}, gelu={cfg.gelu}{gated}, "
            f"layout={cfg.weight_layout}, backend={self.backend}"
        )


def _check_intermediate_scale(w1: QuantizedWeight, w2: QuantizedWeight) -> None:
    """w8a8 files carry GELU's output scale twice (fc1.output_scale, fc2.input_scale); they must agree."""
    if w2.input_scale is None:
        return
    if w1.output_scale is None or not torch.equal(w2.input_scale.reshape(-1).cpu(), w1.output_scale.reshape(-1).cpu()):
        raise GelugemmError("w2.input_scale differs from w1.output_scale, the scale GEMM1 requantizes GELU's output to")
