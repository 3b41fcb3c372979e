"""w8a8: int8 activations x int8 weights on the int8 tensor cores, int32 accumulation.

The MLP's two GEMM inputs, x and the GELU output h, are quantized per one of three
activation schemes (kernels/schemes.py's ActivationScheme); kernels/op.py runs them as:

    dynamic    xq, xs = quantize_activations(x, smooth_scale=s)          # per token
               h = w8a8_linear(xq, xs, w1, b1, activation="erf", out_dtype=x.dtype)  # 16-bit h
               hq, hs = quantize_activations(h)                          # per token, over all of d_ff
               y = w8a8_linear(hq, hs, w2, b2, out_dtype=x.dtype)
               (at few rows the op runs these four in one launch: kernels/fused_mlp.py's
               fused_w8a8_mlp, the same arithmetic)

w8a8_mlp runs these launches for a scheme; the op calls it where the one launch does not apply.
    group:G    xq, xs = quantize_activations(x, smooth_scale=s, group_size=G)   # xs [M, K/G]
               hq, hs = w8a8_linear(xq, xs, w1, b1, activation="erf", input_group_size=G,
                                    output_group_size=G)             # int8 h, hs [M, d_ff/G]
               y = w8a8_linear(hq, hs, w2, b2, input_group_size=G, out_dtype=x.dtype)
    static     xq, xs = quantize_activations(x, w1.input_scale, smooth_scale=s)
               h = w8a8_linear(xq, xs, w1, b1, activation="erf", output_scale=w1.output_scale)  # int8
               y = w8a8_linear(h, w1.output_scale, w2, b2, out_dtype=x.dtype)

`dynamic` keeps h at 16 bits between GEMM1 and its quantization: GEMM1's epilogue sees
only BLOCK_N columns of a row, not the row's absmax. bench/RESULTS.md section 8 measured
this 1-4% slower than `static`'s int8 intermediate, and a GEMM2 that quantizes 16-bit A
tiles as it loads them 1.5x slower (an A operand computed in registers every K step
breaks Triton's software pipeline). `group:G` and `static` keep h int8 in memory.

Quantization is symmetric, q = round_half_even(clamp(v * (1 / scale), -127, 127)) in
float32 with the reciprocal correctly rounded: kernels/int8.py's definition, which the
reference and calibration use too, so a kernel and its reference agree bit for bit
except where a float32 op-order difference (an fma, the erf implementation) moves a
value across a rounding tie.

- `_quantize_rows_kernel`: one program per row of x. Dynamic per token: a first pass
  over the row finds absmax (after the SmoothQuant division), scale = max(absmax / 127,
  SCALE_EPS); the second pass quantizes. Per token group: one pass, each group's scale
  from its own absmax. Static: one pass with the calibrated scale.
- The GEMMs are kernels/int8_gemm.py's (decode, persistent TMA, strided) with an int8
  input: int8 x int8 tensor-core dots with int32 accumulation (split-K partials added
  in int32 too); the epilogue computes acc * x_scale[m] * w_scale[n] + bias in float32,
  then GELU, then requantizes (with the calibrated output scale, or per group of G
  columns with scales it writes) or rounds to the float output dtype. Per-group input
  scales: the K tile is one group, whose int32 partial is promoted into a float32
  accumulator times the group's scale inside the K loop. Weight scales are per channel:
  per-group weight scales would need that rescale for the weight too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from kernels.errors import LaunchError
from kernels.gemm_base import INT8_MAX_F32, output_buffer, round_to_int8, tensor_signature, triton_can_run
from kernels.int8 import SCALE_EPS
from kernels.int8_gemm import int8_weight_gemm
from kernels.launch import interpreting, launch
from kernels.quantized import QuantizedWeight
from kernels.schemes import FLOAT_DTYPES, ActivationScheme, WeightLayout

# The group sizes of w8a8 `group:N` the kernels run: N is the K tile of the int8 GEMMs
# (the int8 MMA takes K in steps of 32; deeper than 128 the 128x256 tiles' stages no
# longer fit shared memory) and the width of GEMM1's requantized output groups.
W8A8_GROUP_SIZES = (32, 64, 128)


def check_scalar_scale(scale, device: torch.device, what: str) -> None:
    """A calibrated scale: a one-element float32 tensor on the input's device."""
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise LaunchError(f"{what} must be a one-element float32 tensor, got {scale!r}")
    if scale.dtype != torch.float32:
        raise LaunchError(f"{what} must be float32, got {scale.dtype}")
    if scale.device != device:
        raise LaunchError(f"{what} is on {scale.device} but the input is on {device}")


# ---------------------------------------------------------------------------------------
# Activation quantization
# ---------------------------------------------------------------------------------------


@triton.jit
def _load_smoothed(row_ptr, smooth_ptr, offs_k, K, stride_xk, HAS_SMOOTH: tl.constexpr):
    # x[k] in float32, divided by smooth[k] for SmoothQuant (exactly rounded: div_rn,
    # because Triton's plain "/" is an approximate division on the GPU)
    x = tl.load(row_ptr + offs_k * stride_xk, mask=offs_k < K, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = tl.math.div_rn(x, tl.load(smooth_ptr + offs_k, mask=offs_k < K, other=1.0))
    return x


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, smooth_ptr,
    K, stride_xm, stride_xk, stride_qm, stride_sm,
    DYNAMIC: tl.constexpr, GROUP: tl.constexpr, HAS_SMOOTH: tl.constexpr, SCALE_EPS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    if GROUP > 0:
        # One pass: each block of BLOCK_K (a multiple of GROUP) holds whole groups; each
        # group's scale is max(absmax / 127, SCALE_EPS) over its columns (zeros past K).
        tl.static_assert(BLOCK_K % GROUP == 0)
        GROUPS: tl.constexpr = BLOCK_K // GROUP
        n_groups = tl.cdiv(K, GROUP)
        for k0 in range(0, K, BLOCK_K):
            x = tl.reshape(_load_smoothed(x_row, smooth_ptr, k0 + offs, K, stride_xk, HAS_SMOOTH), (GROUPS, GROUP))
            scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), axis=1), INT8_MAX_F32), SCALE_EPS)
            q = round_to_int8(x * tl.math.div_rn(1.0, scale)[:, None])
            tl.store(q_row + k0 + offs, tl.reshape(q, (BLOCK_K,)), mask=k0 + offs < K)
            groups = k0 // GROUP + tl.arange(0, GROUPS)
            tl.store(scale_ptr + row.to(tl.int64) * stride_sm + groups, scale, mask=groups < n_groups)
    else:
        if DYNAMIC:
            absmax = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                x = _load_smoothed(x_row, smooth_ptr, k0 + offs, K, stride_xk, HAS_SMOOTH)
                absmax = tl.maximum(absmax, tl.abs(x))
            # scale = max(absmax / 127, SCALE_EPS): kernels/int8.py's scale_from_absmax, finite
            # and non-zero for an all-zero row
            scale = tl.maximum(tl.math.div_rn(tl.max(absmax, axis=0), INT8_MAX_F32), SCALE_EPS)
            tl.store(scale_ptr + row, scale)
        else:
            scale = tl.load(scale_ptr)
        inv_scale = tl.math.div_rn(1.0, scale)
        # The row is re-read from L2 (dynamic), where the first pass left it.
        for k0 in range(0, K, BLOCK_K):
            x = _load_smoothed(x_row, smooth_ptr, k0 + offs, K, stride_xk, HAS_SMOOTH)
            tl.store(q_row + k0 + offs, round_to_int8(x * inv_scale), mask=k0 + offs < K)


@dataclass
class _QuantizePlan:
    """How one call signature of quantize_activations launches, its checks passed."""

    k: int
    m: int
    dynamic: bool
    group: int
    stride_sm: int
    grid: object
    constexprs: dict
    key: tuple
    launch_key: tuple | None = None  # key, then the output's row stride and every tensor's alignment
    slot: list = field(default_factory=lambda: [None])  # kernels/launch.py's direct-launch slot


# One plan per call signature of the activation quantizer.
_QUANTIZE_PLANS: dict = {}


def _quantize_plan(x, scale, smooth_scale, group_size) -> _QuantizePlan:
    """quantize_activations' checks, and its launch plan for these arguments."""
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES.values():
        raise LaunchError(f"activation quantization takes fp16, bf16 or fp32 input, got {getattr(x, 'dtype', x)}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise LaunchError(f"input must have a non-empty last dim, got shape {tuple(x.shape)}")
    if not triton_can_run(x.device):
        raise LaunchError(f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU); input is on {x.device}")
    k = x.shape[-1]
    if scale is not None:
        check_scalar_scale(scale, x.device, "static input scale")
        if group_size is not None:
            raise LaunchError("group_size is for dynamic scales; a static scale is one for the whole tensor")
    if group_size is not None:
        check_group_size(group_size)
    if smooth_scale is not None:
        if (not isinstance(smooth_scale, torch.Tensor) or smooth_scale.shape != (k,) or smooth_scale.dtype != torch.float32
                or smooth_scale.device != x.device):  # fmt: skip
            raise LaunchError(
                f"smooth_scale must be a float32 tensor of shape ({k},) on {x.device}; got "
                f"{getattr(smooth_scale, 'dtype', type(smooth_scale).__name__)} {tuple(getattr(smooth_scale, 'shape', ()))} "
                f"on {getattr(smooth_scale, 'device', None)}"
            )
    x2 = x if x.dim() == 2 else x.reshape(-1, k)
    m = x2.shape[0]
    dynamic = scale is None
    group = group_size or 0
    # Under the interpreter a small block, so test rows span several.
    block_k = 32 if interpreting() else min(triton.next_power_of_2(k), 4096)
    block_k = max(block_k, group)
    constexprs = dict(
        DYNAMIC=dynamic, GROUP=group, HAS_SMOOTH=smooth_scale is not None, SCALE_EPS=SCALE_EPS, BLOCK_K=block_k,
        num_warps=8 if block_k >= 2048 else 4,
    )  # fmt: skip
    key = (x.dtype, x.device, m, k, x2.stride(0), x2.stride(1), dynamic, group, smooth_scale is not None)
    return _QuantizePlan(k=k, m=m, dynamic=dynamic, group=group, stride_sm=-(-k // group) if group else 0,
                         grid=lambda meta: (m,), constexprs=constexprs, key=key)  # fmt: skip


def check_group_size(group_size: int) -> None:
    """The group sizes w8a8 `group:N` runs with: one K tile of the int8 GEMM per group."""
    if group_size not in W8A8_GROUP_SIZES:
        sizes = ", ".join(f"group:{g}" for g in W8A8_GROUP_SIZES)
        raise LaunchError(f"w8a8 activations group:{group_size} is not supported; the int8 kernels take {sizes}")


def quantize_activations(
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    *,
    smooth_scale: torch.Tensor | None = None,
    group_size: int | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of x [..., K] (fp16, bf16 or fp32).

    scale: None for dynamic scales (per token: absmax of each row / 127; per token group
        with group_size), or a one-element float32 tensor (static, calibrated).
    smooth_scale: float32 [K] or None; x is divided by it per channel first (SmoothQuant).
    group_size: dynamic only: one scale per row per group_size columns (W8A8_GROUP_SIZES).
    out: a contiguous int8 [..., K] tensor to write into (else one is allocated).
    Returns (q int8 [..., K], scale): float32 [...] when dynamic per token, [...,
    cdiv(K, group_size)] per group, else `scale` itself.
    """
    # Everything the checks and the launch depend on; a repeated call skips both (a decode
    # step quantizes twice per MLP, and each check costs host time).
    signature = None
    if (out is None and isinstance(x, torch.Tensor) and (scale is None or isinstance(scale, torch.Tensor))
            and (smooth_scale is None or isinstance(smooth_scale, torch.Tensor))):  # fmt: skip
        signature = (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0, tensor_signature(scale),
                     tensor_signature(smooth_scale), group_size)  # fmt: skip
    plan = _QUANTIZE_PLANS.get(signature) if signature is not None else None
    if plan is None:
        plan = _quantize_plan(x, scale, smooth_scale, group_size)
    k, lead, m, dynamic, group = plan.k, x.shape[:-1], plan.m, plan.dynamic, plan.group
    if smooth_scale is not None:
        smooth_scale = smooth_scale.contiguous()
    x2 = x if x.dim() == 2 else x.reshape(-1, k)  # (2-D: no reshape, whose host cost is microseconds)
    q = output_buffer(out, (*lead, k), x, torch.int8)
    if group:
        scale = torch.empty((*lead, -(-k // group)), dtype=torch.float32, device=x.device)
    elif dynamic:
        scale = torch.empty(lead, dtype=torch.float32, device=x.device)
    if m > 0:
        args = (x2, q, scale, smooth_scale if smooth_scale is not None else scale, k, x2.stride(0), x2.stride(1),
                q.stride(0), plan.stride_sm)  # fmt: skip
        if plan.launch_key is None:
            # The launch key fixes every tensor's 16-byte alignment too, so a repeated call
            # launches the compiled kernel through its slot (kernels/launch.py). A plan kept
            # for its signature keeps this call's key: x's and any given scale's alignment
            # are in the signature, and q and a dynamic scale are fresh allocations (aligned).
            aligned = tuple(t.data_ptr() % 16 == 0 for t in args[:4])
            plan.launch_key = (*plan.key, q.stride(0), aligned)
            if signature is not None and len(_QUANTIZE_PLANS) < 4096:
                _QUANTIZE_PLANS[signature] = plan
        launch(_quantize_rows_kernel, plan.grid, args, plan.constexprs, plan.launch_key, slot=plan.slot)
    return (q if x.dim() == 2 else q.reshape(*lead, k)), scale


# ---------------------------------------------------------------------------------------
# The w8a8 GEMM
# ---------------------------------------------------------------------------------------


def w8a8_linear(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    weight: QuantizedWeight,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    weight_layout: str | WeightLayout = "out_in",
    output_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float16,
    input_group_size: int | None = None,
    output_group_size: int | None = None,
    path: str = "auto",
    out: torch.Tensor | None = None,
    up: QuantizedWeight | None = None,
    up_bias: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """act((xq * x_scale) @ dequant(weight)^T + bias) for int8 xq [..., K], on the int8 tensor cores.

    x_scale: float32, per token (shape [...]) or one element (static); with
        input_group_size G, per token per G columns ([..., cdiv(K, G)], contiguous), as
        quantize_activations(..., group_size=G) returns it.
    weight: int8 data in `weight_layout` with per-channel float32 scales.
    activation: "none" or a GELU flavour ("erf", "tanh", "quick").
    output_scale: a one-element float32 tensor: requantize the result to int8 with it
        (GEMM1 of `static`, whose int8 output GEMM2 reads); returns int8 [..., N].
    output_group_size: G: requantize the result to int8 per token per G columns, each
        group with the scale of its own absmax (GEMM1 of `group:G`); returns (int8
        [..., N], float32 scales [..., cdiv(N, G)]).
    Neither: the result in `out_dtype` (fp16, bf16 or fp32).
    input_group_size, output_group_size: one of W8A8_GROUP_SIZES.
    path: "auto", "decode" (M <= 16), "tma" or "strided", as for w8a16_linear.
    up, up_bias: a gated GEMM1's up projection (weight's shape, layout and granularity):
        act(... + bias) * (the same GEMM on up + up_bias), each dequantized with its own scales.
    out: a contiguous [..., N] tensor of the output dtype to write into.
    """
    requested_dtype = out_dtype
    if output_scale is not None or output_group_size is not None:
        out_dtype = torch.int8
    lead = xq.shape[:-1]

    def check():
        if xq.dtype != torch.int8:
            raise LaunchError(f"w8a8 input must be int8 (quantize it with quantize_activations), got {xq.dtype}")
        if weight.group_size is not None:
            raise LaunchError(
                f"w8a8 takes per-channel weight scales only, got {weight.granularity}: "
                "quantize the weight per channel, or run it as w8a16"
            )
        if not isinstance(x_scale, torch.Tensor) or x_scale.dtype != torch.float32 or x_scale.device != xq.device:
            raise LaunchError(f"x_scale must be a float32 tensor on {xq.device}")
        if input_group_size is not None:
            check_group_size(input_group_size)
            want = (*lead, -(-xq.shape[-1] // input_group_size))
            if tuple(x_scale.shape) != want or not x_scale.is_contiguous():
                raise LaunchError(
                    f"x_scale must hold one scale per token per {input_group_size} columns: a contiguous "
                    f"tensor of shape {want}, got {tuple(x_scale.shape)}"
                )
        elif x_scale.numel() != 1 and tuple(x_scale.shape) != tuple(lead):
            raise LaunchError(
                f"x_scale must hold one scale per token (shape {tuple(lead)}) or one for all, got {tuple(x_scale.shape)}"
            )
        if output_scale is not None and output_group_size is not None:
            raise LaunchError("pass output_scale (one static scale) or output_group_size (per-group scales), not both")
        if output_scale is not None:
            check_scalar_scale(output_scale, xq.device, "output_scale")
        elif output_group_size is not None:
            check_group_size(output_group_size)
        elif requested_dtype not in FLOAT_DTYPES.values():
            raise LaunchError(
                f"out_dtype must be fp16, bf16 or fp32 (int8 comes with an output_scale), got {requested_dtype}"
            )

    c_scale = output_scale
    if output_group_size is not None:
        check_group_size(output_group_size)
        n = WeightLayout.parse(weight_layout).kn_shape(weight.data)[1] if isinstance(weight, QuantizedWeight) else 0
        c_scale = torch.empty((*lead, -(-n // output_group_size)), dtype=torch.float32, device=xq.device)
    result = int8_weight_gemm(
        xq, x_scale, weight, bias, activation=activation, weight_layout=weight_layout, path=path, out=out,
        out_dtype=out_dtype, c_scale=c_scale, check=check, a_group_k=input_group_size or 0,
        c_group_n=output_group_size or 0, up=up, up_bias=up_bias,
    )  # fmt: skip
    return (result, c_scale) if output_group_size is not None else result


def w8a8_mlp(
    x: torch.Tensor,
    w1: QuantizedWeight,
    b1: torch.Tensor | None,
    w2: QuantizedWeight,
    b2: torch.Tensor | None = None,
    *,
    activations: str | ActivationScheme = "dynamic",
    activation: str = "erf",
    weight_layout: str | WeightLayout = "out_in",
    up: QuantizedWeight | None = None,
    up_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """GELU(x @ W1^T + b1) @ W2^T + b2 as the activation scheme's separate launches (the
    module docstring's table): x quantized (divided by w1.smooth_scale first, where there is
    one), GEMM1 with GELU, h quantized, GEMM2. x [..., d_model] fp16, bf16 or fp32; static
    takes w1.input_scale and w1.output_scale. up, up_bias: a gated GEMM1's up projection
    (w8a8_linear's). Returns [..., d_model] in x's dtype."""
    scheme = ActivationScheme.parse(activations)
    gemm1 = dict(activation=activation, weight_layout=weight_layout, up=up, up_bias=up_bias)
    if scheme.kind == "dynamic":
        # h at 16 bits between GEMM1 and its per-row quantization (the module docstring says why)
        xq, x_scale = quantize_activations(x, smooth_scale=w1.smooth_scale)
        h = w8a8_linear(xq, x_scale, w1, b1, out_dtype=x.dtype, **gemm1)
        hq, h_scale = quantize_activations(h)
        return w8a8_linear(hq, h_scale, w2, b2, weight_layout=weight_layout, out_dtype=x.dtype)
    if scheme.kind == "group":
        g = scheme.group_size
        xq, x_scale = quantize_activations(x, smooth_scale=w1.smooth_scale, group_size=g)
        hq, h_scale = w8a8_linear(xq, x_scale, w1, b1, input_group_size=g, output_group_size=g, **gemm1)
        return w8a8_linear(hq, h_scale, w2, b2, weight_layout=weight_layout, input_group_size=g, out_dtype=x.dtype)
    # static: int8 between each launch
    xq, x_scale = quantize_activations(x, w1.input_scale, smooth_scale=w1.smooth_scale)
    h = w8a8_linear(xq, x_scale, w1, b1, output_scale=w1.output_scale, **gemm1)
    return w8a8_linear(h, w1.output_scale, w2, b2, weight_layout=weight_layout, out_dtype=x.dtype)
