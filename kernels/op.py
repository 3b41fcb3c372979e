"""The op: one object, built from a config, that computes the whole MLP.

    op = FusedMLP(MLPConfig(dtype="bf16", gelu="tanh"), device="cuda")
    y = op(x, w1, b1, w2, b2)          # GELU(x @ W1^T + b1) @ W2^T + b2
    op.backend                          # "triton" or "torch", chosen once, here

The implementation is picked at construction, by dtype and device: the fused Triton
kernels on CUDA, the torch reference elsewhere. With `backend="auto"` the choice and
its reason are on the object (`op.backend`, `op.backend_reason`) for callers to report;
asking for `backend="triton"` where Triton cannot run raises instead of switching.

The int8 schemes take `QuantizedWeight`s (int8 data with their scales):

    op = FusedMLP(MLPConfig(dtype="w8a8", activation_dtype="bf16", activations="group:128"))
    y = op(x, w1_q, b1, w2_q, b2)      # x and y bf16

w8a16 dequantizes the weights inside the GEMMs (at few rows, both GEMMs in one launch:
kernels/fused_mlp.py). w8a8 quantizes both GEMM inputs, x and GELU's output h, as its
activation scheme says (kernels/schemes.py's ActivationScheme; kernels/w8a8.py has the
launches of each):

    dynamic   per-token scales computed at run time: x quantized per row, GEMM1 writes h
              in the activation dtype, h quantized per row (over all of d_ff), GEMM2
    group:N   per token per N columns, at run time: x per (row, N columns); GEMM1's
              epilogue requantizes h per (row, N columns) to int8 with scales it writes
    static    calibrated per-tensor scales: x with w1.input_scale; GEMM1's epilogue
              requantizes h with w1.output_scale; GEMM2 reads int8 h at that scale

At few rows `dynamic` and `static` run in one launch (kernels/fused_mlp.py), with the same
arithmetic; `group:N` too for small models (weights up to 1024x4096), where the GPU timed it
ahead of its three launches (kernels/fused_mlp.py's FUSED_W8A8_OP_SCHEMES).

A scale the scheme needs and the weights lack is an error.

Gated MLPs (GeGLU: Gemma, T5 v1.1, ModernBERT), y = (GELU(x Wg^T + bg) * (x Wu^T + bu)) W2^T + b2:

    op = FusedMLP(MLPConfig(dtype="bf16", gelu="tanh", gated=True))
    y = op(x, w_gate, None, w_down, None, w_up=w_up)     # gate and up as two weights
    y = op(x, w_i, b_i, w_o, b_o)                        # or one: rows [0, d_ff) gate, [d_ff, 2 d_ff) up

GEMM1 computes the gate and up tiles of the same output columns in one kernel (one read
of x, two accumulators, each dequantized with its own scales for int8) and writes
GELU(gate) * up once; a concatenated weight is read in place, its halves as two views
(kernels/gated.py). Everything else (the int8 scales, w8a8's quantization of the
product, per scheme) is as for the plain MLP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import reference
from kernels.errors import BackendUnavailable, LaunchError
from kernels.fused_mlp import (
    fused_mlp,
    fused_mlp_applies,
    fused_w8a8_applies,
    fused_w8a8_mlp,
    fused_w8a16_applies,
    fused_w8a16_mlp,
)
from kernels.gemm import gemm_bias_act
from kernels.gated import gate_and_up
from kernels.gemm_base import check_shapes, triton_can_run
from kernels.int8_gemm import check_weight_scales
from kernels.quantized import QuantizedWeight
from kernels.schemes import (
    ACTIVATION_DTYPES,
    DTYPES,
    DYNAMIC,
    FLOAT_DTYPES,
    GELU_FLAVOURS,
    INT8_DTYPES,
    ActivationScheme,
    WeightLayout,
)
from kernels.w8a8 import check_group_size, w8a8_mlp
from kernels.w8a16 import w8a16_linear

__all__ = ["DTYPES", "FLOAT_DTYPES", "INT8_DTYPES", "FusedMLP", "MLPConfig", "choose_backend"]

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class MLPConfig:
    """What the op computes and how.

    dtype: fp16 | bf16 | fp32 | w8a16 (int8 weights, float activations) |
        w8a8 (int8 weights and activations).
    gelu: "erf" (exact), "tanh" (the approximation GPT-2-style checkpoints use) or
        "quick" (CLIP's x * sigmoid(1.702 x)).
    weight_layout: "out_in" (nn.Linear, [out, in]) or "in_out" (Conv1D, [in, out]).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    allow_tf32: fp32 only: let the GEMMs use TF32 tensor cores.
    activation_dtype: int8 schemes only: the float dtype of x and y, "fp16" or "bf16".
    activations: w8a8 only: how x and GELU's output are scaled, an ActivationScheme or
        its string: "dynamic" (per token, at run time; the default), "group:N" (per token
        per N columns, at run time; N in kernels.w8a8.W8A8_GROUP_SIZES) or "static" (the
        calibrated w1.input_scale and w1.output_scale the weights carry).
    gated: a gated MLP (GeGLU): GEMM1 is GELU(x Wg^T + bg) * (x Wu^T + bu); forward takes
        the up projection as w_up/b_up, or w1/b1 holding gate and up as their halves.
    """

    dtype: str = "fp16"
    gelu: str = "erf"
    weight_layout: WeightLayout = WeightLayout.OUT_IN
    backend: str = "auto"
    allow_tf32: bool = False
    activation_dtype: str = "fp16"
    activations: ActivationScheme = DYNAMIC
    gated: bool = False

    def __post_init__(self):
        for name, value, allowed in (
            ("dtype", self.dtype, DTYPES),
            ("gelu", self.gelu, GELU_FLAVOURS),
            ("backend", self.backend, BACKENDS),
            ("activation_dtype", self.activation_dtype, tuple(ACTIVATION_DTYPES)),
        ):
            if value not in allowed:
                raise LaunchError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        object.__setattr__(self, "weight_layout", WeightLayout.parse(self.weight_layout))
        object.__setattr__(self, "activations", ActivationScheme.parse(self.activations))
        if self.dtype == "w8a8" and self.activations.kind == "group":
            check_group_size(self.activations.group_size)
        for name in ("gated", "allow_tf32"):
            if not isinstance(getattr(self, name), bool):
                raise LaunchError(f"{name} must be True or False; got {getattr(self, name)!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The float dtype of the op's input and output."""
        return FLOAT_DTYPES.get(self.dtype) or ACTIVATION_DTYPES[self.activation_dtype]


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


def _check_static_scales_agree(w1: QuantizedWeight, w2: QuantizedWeight) -> None:
    # GEMM2 reads the intermediate at w1.output_scale; a separate w2.input_scale must agree
    # (compared on the device: a host sync, so only when they are different tensors).
    if w2.input_scale is not None and w2.input_scale is not w1.output_scale:
        if not torch.equal(w2.input_scale.reshape(-1).cpu(), w1.output_scale.reshape(-1).cpu()):
            raise LaunchError("w2.input_scale differs from w1.output_scale, the scale GEMM1 requantizes to")


def _check_scale_values(w: QuantizedWeight, name: str) -> None:
    """Every scale a QuantizedWeight carries finite and positive (quantization clamps them to
    at least float32's eps): a zero, negative or NaN scale gives a wrong result, not an error.
    It reads the values (a host sync), so it runs once per operand set (_check_int8_once), and
    not while a CUDA graph is being captured, where a sync is not allowed (nor on meta tensors,
    which have no values)."""
    for field in ("scale", "input_scale", "output_scale", "smooth_scale"):
        t = getattr(w, field)
        if t is None or t.is_meta or (t.is_cuda and torch.cuda.is_current_stream_capturing()):
            continue
        if not bool((torch.isfinite(t) & (t > 0)).all()):
            raise LaunchError(f"{name}.{field} holds a value that is not a positive finite number (zero, negative, NaN or inf)")


class FusedMLP:
    """GELU(x @ W1^T + b1) @ W2^T + b2 (gated: (GELU(x Wg^T + bg) * (x Wu^T + bu)) W2^T + b2)
    with the implementation chosen at construction."""

    def __init__(self, config: MLPConfig | None = None, device: str | torch.device | None = None):
        self.config = config or MLPConfig()
        if not isinstance(self.config, MLPConfig):
            raise LaunchError(f"config must be an MLPConfig, got {type(self.config).__name__}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            raise LaunchError(f"device must be a torch device or its name ('cuda', 'cuda:1', 'cpu'); got {device!r}") from None
        self.backend, self.backend_reason = choose_backend(self.config, self.device)
        # the int8 operands that last passed _check_int8, and their ids (see _check_int8_once)
        self._checked: tuple = ((), ())

    def __repr__(self) -> str:
        return f"FusedMLP({self.config}, device={self.device}, backend={self.backend!r})"

    def _check_float(self, x, weights):
        want = self.config.torch_dtype
        if x.dtype != want:
            raise LaunchError(f"op is configured for {self.config.dtype} but input is {x.dtype}")
        for name, w in weights:
            if isinstance(w, QuantizedWeight):
                raise LaunchError(f"{name} is quantized but the op is configured for {self.config.dtype}")
            if not isinstance(w, torch.Tensor):
                raise LaunchError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
            if w.dtype != want:
                raise LaunchError(f"op is configured for {self.config.dtype} but {name} is {w.dtype}")

    def _check_input(self, x):
        try:
            if x.device.type != self.device.type:
                raise LaunchError(f"op was built for {self.device} but input is on {x.device}")
            if x.dim() == 0:
                raise LaunchError("x must have at least one dim ([..., d_model]); got a 0-dim tensor")
        except AttributeError:
            raise LaunchError(f"x must be a torch.Tensor, got {type(x).__name__}") from None

    def _check_reference_operands(self, x, gate, b_gate, up, w2, b2):
        """The torch backend's launcher checks: the shapes, types and devices the Triton
        launchers check (gemm_base.check_shapes), so both backends refuse the same operands."""
        layout = self.config.weight_layout
        def data(w):
            return w.data if isinstance(w, QuantizedWeight) else w

        _, d_ff = check_shapes(x, data(gate), b_gate, layout, "w1", "b1", "x")
        if up:
            check_shapes(x, data(up["up"]), up["up_bias"], layout, "w_up", "b_up", "x")
        h = x.new_empty((0, d_ff))  # GEMM2's input, no data: its width is what is checked
        check_shapes(h, data(w2), b2, layout, "w2", "b2", f"GELU's output (d_ff from w1: {d_ff})")

    def _check_int8_once(self, x, w1, w2, w_up=None):
        """_check_int8, skipped when x's dtype and the very same weight tensors, scales and
        group sizes passed it last call (a decode loop calls with the same weights: the checks
        were a quarter of a forward's host time). They are held, so no id is reused while it
        is remembered. static's comparison of w2.input_scale with w1.output_scale by value
        (a host sync where they are two tensors) runs with the other checks, once per operand
        set: every call, it cost a device round trip and made the op impossible to capture in
        a CUDA graph. A scale changed in place afterwards is the caller's to keep in step."""
        parts = [x.dtype]
        for w in (w1, w2, w_up):
            if isinstance(w, QuantizedWeight):
                # its fields, not the object: FusedGeluMLP builds new QuantizedWeights around
                # the same buffers every forward
                parts += [w.data, w.scale, w.group_size, w.smooth_scale, w.input_scale, w.output_scale]
            else:
                parts.append(w)
        ids = tuple(map(id, parts))
        if ids == self._checked[1]:
            return
        self._check_int8(x, w1, w2, w_up)
        self._checked = (tuple(parts), ids)

    def _check_int8(self, x, w1, w2, w_up=None):
        cfg = self.config
        if x.dtype != cfg.torch_dtype:
            raise LaunchError(
                f"op is configured for {cfg.dtype} with {cfg.activation_dtype} activations but input is {x.dtype}"
            )
        weights = (("w1", w1), ("w2", w2)) + ((("w_up", w_up),) if w_up is not None else ())
        for name, w in weights:
            if not isinstance(w, QuantizedWeight):
                raise LaunchError(f"{name} must be a QuantizedWeight for {cfg.dtype}, got {type(w).__name__}")
            k, n = cfg.weight_layout.kn_shape(w.data)
            check_weight_scales(w, k, n, name)
            _check_scale_values(w, name)
        if w2.smooth_scale is not None or (cfg.dtype == "w8a16" and w1.smooth_scale is not None):
            raise LaunchError("a SmoothQuant smooth_scale applies to w8a8's GEMM1 input only (w1)")
        if w_up is not None and w_up.smooth_scale is not None and w_up.smooth_scale is not w1.smooth_scale:
            raise LaunchError("x is divided by w1.smooth_scale once for gate and up: w_up carries no smooth_scale of its own")
        if cfg.dtype == "w8a16":
            return
        for name, w in weights:
            if w.group_size is not None:
                raise LaunchError(f"w8a8 takes per-channel weight scales; {name} has {w.granularity}")
        if cfg.activations.kind != "static":
            return  # scales computed at run time: any calibrated ones the weights carry go unused
        if w1.input_scale is None or w1.output_scale is None:
            missing = "w1.input_scale" if w1.input_scale is None else "w1.output_scale"
            raise LaunchError(
                f"activations='static' needs {missing}: the calibrated scales of x (w1.input_scale) and of "
                "GELU's output (w1.output_scale); quantize with calibration data, or run activations='dynamic'"
            )
        _check_static_scales_agree(w1, w2)

    def _gemm1_operands(self, w1, b1, w_up, b_up):
        """(w1, b1, {up, up_bias}) of GEMM1: the gate and its up projection for a gated MLP."""
        if not self.config.gated:
            if w_up is not None or b_up is not None:
                raise LaunchError("w_up and b_up are a gated MLP's up projection; this op is configured with gated=False")
            return w1, b1, {}
        gate, b_gate, up, b_upper = gate_and_up(w1, b1, w_up, b_up, self.config.weight_layout)
        return gate, b_gate, dict(up=up, up_bias=b_upper)

    def forward(self, x, w1, b1, w2, b2=None, w_up=None, b_up=None) -> torch.Tensor:
        """y for x [..., d_model]. A gated op takes the up projection as w_up and b_up, or
        w1 and b1 holding gate (first half of the outputs) and up (second half)."""
        self._check_input(x)
        cfg = self.config
        gate, b_gate, up = self._gemm1_operands(w1, b1, w_up, b_up)
        if self.backend == "torch":  # (the Triton launchers run the same checks themselves)
            self._check_reference_operands(x, gate, b_gate, up, w2, b2)
        gated = dict(gated=cfg.gated, w_up=w_up, b_up=b_up)
        if cfg.dtype in FLOAT_DTYPES:
            self._check_float(x, (("w1", w1), ("w2", w2)) + ((("w_up", w_up),) if w_up is not None else ()))
            if self.backend == "torch":
                return reference.mlp_reference(
                    x, w1, b1, w2, b2, gelu_flavour=cfg.gelu, weight_layout=cfg.weight_layout, dtype=x.dtype, **gated
                )
            kw = dict(weight_layout=cfg.weight_layout, allow_tf32=cfg.allow_tf32)
            if not cfg.gated and fused_mlp_applies(x.numel() // max(x.shape[-1], 1), w1, w2):
                return fused_mlp(x, w1, b1, w2, b2, activation=cfg.gelu, **kw)
            h = gemm_bias_act(x, gate, b_gate, activation=cfg.gelu, w_up=up.get("up"), b_up=up.get("up_bias"), **kw)
            return gemm_bias_act(h, w2, b2, activation="none", **kw)

        self._check_int8_once(x, w1, w2, w_up)
        layout = cfg.weight_layout
        if cfg.dtype == "w8a16":
            if self.backend == "torch":
                return reference.w8a16_mlp_reference(
                    x, w1, b1, w2, b2, gelu_flavour=cfg.gelu, weight_layout=layout, **gated
                )
            if not cfg.gated and fused_w8a16_applies(x.numel() // max(x.shape[-1], 1), x.shape[-1], w1, w2):
                # both GEMMs in one launch (kernels/fused_mlp.py): few rows, where host time rules
                return fused_w8a16_mlp(x, w1, b1, w2, b2, activation=cfg.gelu, weight_layout=layout)
            h = w8a16_linear(x, gate, b_gate, activation=cfg.gelu, weight_layout=layout, **up)
            return w8a16_linear(h, w2, b2, weight_layout=layout)

        scheme = cfg.activations
        if self.backend == "torch":
            return reference.w8a8_mlp_reference(
                x, w1, b1, w2, b2, gelu_flavour=cfg.gelu, weight_layout=layout, activations=scheme, **gated
            )
        if not cfg.gated and fused_w8a8_applies(x.numel() // max(x.shape[-1], 1), x.shape[-1], w1, w2, scheme.kind):
            # w8a8_mlp's launches in one (kernels/fused_mlp.py): few rows, where host time rules
            return fused_w8a8_mlp(x, w1, b1, w2, b2, activation=cfg.gelu, weight_layout=layout, activations=scheme)
        # the scheme's separate launches; GEMM1 on the gate (and its up projection: `up`)
        return w8a8_mlp(x, gate, b_gate, w2, b2, activations=scheme, activation=cfg.gelu, weight_layout=layout, **up)

    __call__ = forward
