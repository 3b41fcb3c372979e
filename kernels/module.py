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

from kernels.errors import BackendUnavailable, LaunchError
from kernels.int8_gemm import check_weight_scales
from kernels.op import FLOAT_DTYPES, FusedMLP, MLPConfig
from kernels.quantized import QuantizedWeight
from kernels.schemes import WeightLayout

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

    Every weight's and bias's shape is checked against the others here (d_model and d_ff
    come from w1), and the types, scales and device: a mistake is a LaunchError when the
    module is built, not a torch error (or a wrong-width output) at the first forward.
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
        if not isinstance(config, MLPConfig):
            raise LaunchError(
                f"config must be an MLPConfig (what the op computes: MLPConfig(dtype='fp16'), ...), got {type(config).__name__}"
            )
        device = _device(device)
        self.config = config
        self.quantized = config.dtype not in FLOAT_DTYPES
        if (w_up is not None or b_up is not None) and not config.gated:
            raise LaunchError("w_up and b_up are a gated MLP's up projection; the config says gated=False")
        self.weight_names = ("w1", "w2") + (("w_up",) if w_up is not None else ())
        weights = {"w1": w1, "w2": w2, "w_up": w_up}
        for name in self.weight_names:
            w = weights[name]
            if isinstance(w, QuantizedWeight) != self.quantized or not isinstance(w, (QuantizedWeight, torch.Tensor)):
                want = "a QuantizedWeight" if self.quantized else f"a {config.dtype} tensor"
                raise LaunchError(f"{name} must be {want} for dtype {config.dtype}, got {type(w).__name__}")
            if self.quantized:
                try:
                    w.validate()  # its fields' types again: one may have been assigned since it was built
                except LaunchError as e:
                    raise type(e)(f"{name}: {e}") from None
            elif not w.dtype.is_floating_point:
                raise LaunchError(
                    f"{name} must be a floating-point tensor (the weights are cast to {config.dtype}), got {w.dtype}; "
                    "int8 weights are QuantizedWeights, with dtype w8a16 or w8a8"
                )
        given_biases = {"b1": b1, "b2": b2, "b_up": b_up}
        for name, b in given_biases.items():
            if b is not None and (not isinstance(b, torch.Tensor) or not b.dtype.is_floating_point):
                what = b.dtype if isinstance(b, torch.Tensor) else type(b).__name__
                raise LaunchError(f"{name} must be a floating-point tensor or None, got {what}")
        d_model, d_ff = _mlp_sizes(config, weights, given_biases)
        if self.quantized:
            _check_quantized(config, weights, self.weight_names, d_model)
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
        self.d_model, self.d_ff = d_model, d_ff
        if device is not None:
            try:
                self.to(device)
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as e:  # meta tensors to a real device, ...
                raise LaunchError(f"the MLP's weights cannot go to device {str(device)!r}: {e}") from None
        else:
            on = {t.device for t in self._buffers.values() if t is not None}
            if len(on) > 1:
                where = ", ".join(f"{name} on {t.device}" for name, t in self._buffers.items() if t is not None)
                raise LaunchError(f"the MLP's tensors are on different devices ({where}); pass device= to put them on one")
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
        for role, linear in (("fc1", fc1), ("fc2", fc2), ("up", up)):
            if linear is not None or role != "up":
                _check_linear(role, linear)
        if isinstance(gelu, nn.GELU):
            gelu = _GELU_MODULE_FLAVOUR[gelu.approximate]
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise LaunchError(
                f"from_linears builds a float MLP: dtype must be {', '.join(FLOAT_DTYPES)} or None, got {dtype!r}; "
                "for int8, quantize the weights (calibration.quantize_mlp.quantize_mlp) and pass the QuantizedWeights "
                "to FusedGeluMLP"
            )
        if dtype is None:
            by_torch_dtype = {v: k for k, v in FLOAT_DTYPES.items()}
            if fc1.weight.dtype not in by_torch_dtype:
                raise LaunchError(f"the linears are {fc1.weight.dtype}; pass dtype='fp16', 'bf16' or 'fp32'")
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
        try:  # an int or bool x would be cast in and the result cast back: truncated values
            dtype = x.dtype
            floating = dtype.is_floating_point
        except AttributeError:
            floating = False
        if not floating:
            what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise LaunchError(f"x must be a floating-point tensor [..., d_model={self.d_model}], got {what}")
        y = self._op(x.to(self.config.torch_dtype), *self.weights())
        return y.to(dtype)

    # ---- loading ----------------------------------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # torch's load copies each tensor into its buffer, casting: a float weight loaded into
        # an int8 buffer would be truncated to integers (most to zero) without a word, and int8
        # values loaded into a float buffer would lose their scales. Checked before anything
        # of this module is copied; shapes too, so a mismatch is one LaunchError.
        assign = local_metadata.get("assign_to_params_buffers", False)
        for name, buffer in self._buffers.items():
            key = prefix + name
            if buffer is None or key not in state_dict or not isinstance(state_dict[key], torch.Tensor):
                continue  # absent or not a tensor: torch's own missing/unexpected-key report
            t = state_dict[key]
            if (t.dtype == torch.int8) != (buffer.dtype == torch.int8) or not (t.dtype == torch.int8 or t.dtype.is_floating_point):
                hint = (
                    "float weights go into a float module (FusedGeluMLP.from_linears, or dtype fp16/bf16/fp32)"
                    if buffer.dtype == torch.int8
                    else "int8 weights go into a w8a16/w8a8 module, with their scales"
                )
                raise LaunchError(
                    f"load_state_dict: {key} is {t.dtype} but this {self.config.dtype} module's {name} holds "
                    f"{buffer.dtype}: copying would cast the values, not convert them ({hint})"
                )
            if t.shape != buffer.shape:
                raise LaunchError(
                    f"load_state_dict: {key} has shape {tuple(t.shape)} but this module's {name} has shape "
                    f"{tuple(buffer.shape)} (d_model={self.d_model}, d_ff={self.d_ff}, {self.config.weight_layout})"
                )
            if assign and t.dtype != buffer.dtype:
                raise LaunchError(
                    f"load_state_dict(assign=True): {key} is {t.dtype} but this {self.config.dtype} module's {name} "
                    f"must stay {buffer.dtype}; load without assign=True to cast it"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

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
        raise LaunchError("w2.input_scale differs from w1.output_scale, the scale GEMM1 requantizes GELU's output to")


# ---- construction checks -----------------------------------------------------------------


def _device(device) -> torch.device | None:
    """device= as a torch.device (None stays None); a name torch does not know is a LaunchError,
    CUDA where torch sees none a BackendUnavailable (not torch's AssertionError)."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LaunchError(f"device must be a torch device or its name ('cuda', 'cuda:1', 'cpu'), got {device!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "" if torch.version.cuda else " (this torch build has no CUDA)"
            raise BackendUnavailable(
                f"device {str(device)!r} asked for, but torch sees no CUDA device{build}; "
                "pass device='cpu' (or None, to leave the weights where they are) to run the torch reference"
            )
        if device.index is not None and device.index >= count:
            raise BackendUnavailable(f"device {str(device)!r} asked for, but torch sees {count} CUDA device(s)")
    elif device.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as e:  # mps, xla, ... where this torch build lacks them
            raise BackendUnavailable(f"device {str(device)!r} asked for, but torch cannot use it here: {e}") from None
    return device


def _stored(layout: WeightLayout, k, n) -> tuple:
    """The stored shape of a weight of K inputs and N outputs in `layout`."""
    return (n, k) if layout is WeightLayout.OUT_IN else (k, n)


def _shape(w) -> tuple[int, ...]:
    return tuple((w.data if isinstance(w, QuantizedWeight) else w).shape)


def _mlp_sizes(config: MLPConfig, weights: dict, biases: dict) -> tuple[int, int]:
    """(d_model, d_ff) from w1, every other weight and bias checked against them."""
    layout, gated = config.weight_layout, config.gated
    concatenated = gated and weights["w_up"] is None
    roles = {"w1": ("d_ff", "d_model"), "w2": ("d_model", "d_ff"), "w_up": ("d_ff", "d_model")}
    if concatenated:
        roles["w1"] = ("2*d_ff", "d_model")
    for name, (out, inp) in roles.items():
        if weights[name] is None:
            continue
        shape = _shape(weights[name])
        if len(shape) != 2:
            want = "[" + ", ".join(_stored(layout, inp, out)) + "]"
            raise LaunchError(f"{name} must be a 2-D weight, {want} in layout {layout}; got shape {shape}")
        if 0 in shape:
            raise LaunchError(f"{name} has an empty dim: shape {shape}")
    w1_shape = _shape(weights["w1"])
    d_model, n1 = layout.kn_shape(weights["w1"].data if isinstance(weights["w1"], QuantizedWeight) else weights["w1"])
    if concatenated and n1 % 2:
        raise LaunchError(
            f"w1 {w1_shape} ({layout}) has {n1} outputs; a gated MLP without w_up holds gate and up as the halves "
            "of w1's outputs, so their number is even"
        )
    d_ff = n1 // 2 if concatenated else n1
    made = f"w1 {w1_shape} ({layout}) makes d_model={d_model}, d_ff={d_ff}"
    for name, k, n, k_name, n_name in (("w2", d_ff, d_model, "d_ff", "d_model"), ("w_up", d_model, d_ff, "d_model", "d_ff")):
        if weights[name] is not None and _shape(weights[name]) != _stored(layout, k, n):
            what = "[" + ", ".join(_stored(layout, k_name, n_name)) + "]"
            raise LaunchError(f"{name} has shape {_shape(weights[name])}, expected {_stored(layout, k, n)} = {what} ({layout}): {made}")
    for name, n, what in (("b1", n1, "2*d_ff" if concatenated else "d_ff"), ("b2", d_model, "d_model"), ("b_up", d_ff, "d_ff")):
        b = biases[name]
        if b is not None and tuple(b.shape) != (n,):
            raise LaunchError(f"{name} has shape {tuple(b.shape)}, expected ({n},) = ({what},): {made}")
    if weights["w_up"] is not None and (biases["b1"] is None) != (biases["b_up"] is None):
        given, missing = ("b1", "b_up") if biases["b_up"] is None else ("b_up", "b1")
        raise LaunchError(f"a gated MLP's gate and up projections have a bias each, or neither has one: {given} is given, {missing} is None")
    if gated and weights["w_up"] is None and biases["b_up"] is not None:
        raise LaunchError("b_up goes with w_up; a concatenated gate and up weight carries both biases in b1")
    return d_model, d_ff


def _check_quantized(config: MLPConfig, weights: dict, names: tuple[str, ...], d_model: int) -> None:
    """Each QuantizedWeight's scale shape against its data (their types are checked already),
    and w1's smooth_scale against d_model."""
    for name in names:
        w = weights[name]
        k, n = config.weight_layout.kn_shape(w.data)
        check_weight_scales(w, k, n, name)
    smooth = weights["w1"].smooth_scale
    if smooth is not None and tuple(smooth.shape) != (d_model,):
        raise LaunchError(f"w1.smooth_scale has shape {tuple(smooth.shape)}, expected ({d_model},): one per input channel (d_model)")


def _check_linear(role: str, linear) -> None:
    """from_linears' linears: nn.Linear-like modules with a 2-D [out, in] weight."""
    weight = getattr(linear, "weight", None)
    if not isinstance(linear, nn.Module) or not isinstance(weight, torch.Tensor):
        raise LaunchError(f"{role} must be a linear layer (nn.Linear, with a weight), got {type(linear).__name__}")
    if hasattr(linear, "nf"):
        raise LaunchError(
            f"{role} is a {type(linear).__name__}, which stores its weight [in, out]; from_linears takes nn.Linear "
            "([out, in]): build FusedGeluMLP(fc1.weight, fc1.bias, fc2.weight, fc2.bias, MLPConfig(weight_layout='in_out', ...))"
        )
    if weight.dim() != 2:
        raise LaunchError(
            f"{role} must be a linear layer with a 2-D [out, in] weight; {type(linear).__name__}'s weight has shape {tuple(weight.shape)}"
        )
    bias = getattr(linear, "bias", None)
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise LaunchError(f"{role}.bias must be a tensor or None, got {type(bias).__name__}")
