"""kernels/op.py with int8 weights: FusedMLP(dtype="w8a16" | "w8a8") through the Triton
kernels and through the torch references, against each other and against the float64
MLP on the same dequantized weights, for every w8a8 activation scheme (dynamic, group:N,
static; with and without SmoothQuant); what each scheme hands GEMM2; the errors a user
gets for missing scales and unsupported group sizes.
"""

import re

import pytest
import torch

import kernels.op as op_module
import kernels.w8a8 as w8a8_module
from conftest import DEVICE, TOL_VS_REFERENCE, TOL_W8A8_VS_FLOAT64, randn, rel_err, tol_int8_vs_float64
from int8_helpers import float64_mlp, int8_mlp, quantize_weight
from kernels.errors import LaunchError
from kernels.int8 import scale_from_absmax
from kernels.schemes import SchemeError
from kernels.op import FusedMLP, MLPConfig
from kernels.quantized import QuantizedWeight

ACT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def run_both_backends(cfg, x, weights, device=DEVICE):
    fused = FusedMLP(MLPConfig(backend="triton", **cfg), device=device)
    plain = FusedMLP(MLPConfig(backend="torch", **cfg), device=device)
    assert (fused.backend, plain.backend) == ("triton", "torch")
    return fused(x, *weights), plain(x, *weights)


def w8a8_activations(variant: str) -> str:
    """"group:32+smooth" -> "group:32": the activation scheme of a test variant."""
    return variant.split("+")[0]


@pytest.mark.parametrize("layout,gelu", [("out_in", "erf"), ("in_out", "tanh")])
@pytest.mark.parametrize("act", list(ACT))
@pytest.mark.parametrize(
    "scheme,variant",
    [("w8a16", "per-channel"), ("w8a16", "group:16"), ("w8a8", "dynamic"), ("w8a8", "dynamic+smooth"),
     ("w8a8", "group:32"), ("w8a8", "group:32+smooth"), ("w8a8", "static"), ("w8a8", "static+smooth")],
)  # fmt: skip
def test_int8_mlp_matches_torch_backend_and_float64(scheme, variant, act, layout, gelu):
    dtype = ACT[act]
    d, f = 48, 80  # multiples of 16: the intermediate [M, f] takes the TMA path
    x = randn(3, 7, d, dtype=dtype, scale=2.0)
    group_size = 16 if variant == "group:16" else None
    weights = int8_mlp(d, f, dtype, scheme, layout=layout, group_size=group_size, smooth="smooth" in variant, gelu=gelu, x=x)
    cfg = dict(dtype=scheme, activation_dtype=act, gelu=gelu, weight_layout=layout)
    if scheme == "w8a8":
        cfg["activations"] = w8a8_activations(variant)
    y, y_torch = run_both_backends(cfg, x, weights)
    assert y.shape == (3, 7, d) and y.dtype == dtype
    assert rel_err(y, y_torch) < TOL_VS_REFERENCE[dtype]
    assert rel_err(y, float64_mlp(x, *weights, gelu, layout)) < tol_int8_vs_float64(scheme, dtype)


@pytest.mark.parametrize(
    "scheme,activations", [("w8a16", "dynamic"), ("w8a8", "dynamic"), ("w8a8", "group:32"), ("w8a8", "static")]
)
def test_decode_and_odd_sizes(scheme, activations):
    # M=1 (the decode path) and d, f that no TMA row alignment allows (the strided path);
    # f = 70: a short last group of h for group:32.
    for m, d, f in ((1, 48, 80), (1, 33, 70), (19, 33, 70)):
        x = randn(m, d, dtype=torch.float16)
        weights = int8_mlp(d, f, torch.float16, scheme, x=x, bias2=False)
        y, y_torch = run_both_backends(dict(dtype=scheme, activations=activations), x, weights)
        assert rel_err(y, y_torch) < TOL_VS_REFERENCE[torch.float16]
        assert rel_err(y, float64_mlp(x, *weights, "erf", "out_in")) < tol_int8_vs_float64(scheme, torch.float16)


def record_w8a8_steps(monkeypatch) -> list:
    """What the op's separate launches (kernels/w8a8.py's w8a8_mlp) pass between them:
    (launch, its inputs, its output) in order."""
    calls = []
    for name in ("quantize_activations", "w8a8_linear"):
        real = getattr(w8a8_module, name)

        def recording(*args, _real=real, _name=name, **kwargs):
            out = _real(*args, **kwargs)
            calls.append((_name, args, out))
            return out

        monkeypatch.setattr(w8a8_module, name, recording)
    return calls


@pytest.mark.parametrize("activations", ["static", "group:32"])
def test_w8a8_intermediate_is_int8(monkeypatch, activations):
    # static and group:N: what GEMM2 reads is the int8 tensor GEMM1 wrote, one byte per
    # element (group:N with its [M, f / N] scales beside it). (The three launches: a small
    # model at few rows runs them as one, tests/test_fused_mlp.py.)
    monkeypatch.setattr(op_module, "fused_w8a8_applies", lambda *args: False)
    calls = record_w8a8_steps(monkeypatch)
    m, d, f = 21, 48, 80
    x = randn(m, d, dtype=torch.float16)
    weights = int8_mlp(d, f, torch.float16, "w8a8", x=x)
    FusedMLP(MLPConfig(dtype="w8a8", activations=activations, backend="triton"), device=DEVICE)(x, *weights)
    assert [name for name, _, _ in calls] == ["quantize_activations", "w8a8_linear", "w8a8_linear"]
    (_, _, (xq, _)), (_, gemm1_args, gemm1_out), (_, gemm2_args, y) = calls
    assert xq.dtype == torch.int8 and gemm1_args[0] is xq
    h = gemm1_out if activations == "static" else gemm1_out[0]
    assert gemm2_args[0] is h
    assert h.dtype == torch.int8 and h.shape == (m, f) and h.element_size() * h.numel() == m * f
    if activations == "group:32":
        h_scale = gemm1_out[1]
        assert gemm2_args[1] is h_scale and h_scale.shape == (m, -(-f // 32)) and h_scale.dtype == torch.float32
    assert y.dtype == torch.float16


def test_w8a8_dynamic_quantizes_16_bit_h_per_token(monkeypatch):
    # dynamic: GEMM1 writes h in the activation dtype, a row kernel quantizes it per token
    # (each row's absmax over all f columns), GEMM2 reads that int8 h with its row scales.
    # (The four launches: a small model at few rows runs them as one, tests/test_fused_mlp.py.)
    monkeypatch.setattr(op_module, "fused_w8a8_applies", lambda *args: False)
    calls = record_w8a8_steps(monkeypatch)
    m, d, f = 21, 48, 80
    x = randn(m, d, dtype=torch.bfloat16)
    weights = int8_mlp(d, f, torch.bfloat16, "w8a8", x=x)
    FusedMLP(MLPConfig(dtype="w8a8", activation_dtype="bf16", backend="triton"), device=DEVICE)(x, *weights)
    assert [name for name, _, _ in calls] == ["quantize_activations", "w8a8_linear", "quantize_activations", "w8a8_linear"]
    h16 = calls[1][2]
    assert h16.dtype == torch.bfloat16 and h16.shape == (m, f)
    assert calls[2][1][0] is h16
    hq, h_scale = calls[2][2]
    assert hq.dtype == torch.int8 and h_scale.shape == (m,)
    assert torch.equal(h_scale, scale_from_absmax(h16.float().abs().amax(dim=1)))
    assert calls[3][1][0] is hq and calls[3][1][1] is h_scale


def test_dynamic_and_group_need_no_calibrated_scales():
    # The run-time schemes read no input_scale or output_scale: weights without them run.
    x = randn(5, 48, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a8", x=x)
    bare1, bare2 = QuantizedWeight(q1.data, q1.scale), QuantizedWeight(q2.data, q2.scale)
    for activations in ("dynamic", "group:32"):
        y, y_torch = run_both_backends(dict(dtype="w8a8", activations=activations), x, (bare1, b1, bare2, b2))
        assert rel_err(y, y_torch) < TOL_VS_REFERENCE[torch.float16]
        assert rel_err(y, float64_mlp(x, bare1, b1, bare2, b2, "erf", "out_in")) < TOL_W8A8_VS_FLOAT64


def test_int8_config_errors():
    x = randn(5, 48, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a8", x=x)
    w8a8 = FusedMLP(MLPConfig(dtype="w8a8", backend="triton"), device=DEVICE)
    static = FusedMLP(MLPConfig(dtype="w8a8", activations="static", backend="triton"), device=DEVICE)
    w8a16 = FusedMLP(MLPConfig(dtype="w8a16", backend="triton"), device=DEVICE)
    for op in (w8a8, w8a16):
        with pytest.raises(LaunchError, match="w1 must be a QuantizedWeight"):
            op(x, q1.dequantize().half(), b1, q2, b2)
        with pytest.raises(LaunchError, match="input is torch.bfloat16"):
            op(x.bfloat16(), q1, b1, q2, b2)
    with pytest.raises(LaunchError, match="activations='static' needs w1.output_scale"):
        static(x, QuantizedWeight(q1.data, q1.scale, input_scale=q1.input_scale), b1, q2, b2)
    with pytest.raises(LaunchError, match="activations='static' needs w1.input_scale"):
        static(x, QuantizedWeight(q1.data, q1.scale, output_scale=q1.output_scale), b1, q2, b2)
    with pytest.raises(LaunchError, match="per-channel weight scales"):
        w8a8(x, q1, b1, quantize_weight(randn(48, 80), 16), b2)
    with pytest.raises(LaunchError, match="differs from w1.output_scale"):
        static(x, q1, b1, QuantizedWeight(q2.data, q2.scale, input_scale=q1.output_scale * 2), b2)
    with pytest.raises(LaunchError, match="smooth_scale"):
        w8a16(x, QuantizedWeight(q1.data, q1.scale, smooth_scale=torch.ones(48, device=DEVICE)), b1, q2, b2)
    with pytest.raises(LaunchError, match=r"scale must have shape \(80,\)"):
        w8a16(x, QuantizedWeight(q1.data, q1.scale[:79]), b1, q2, b2)
    with pytest.raises(LaunchError, match="activation_dtype"):
        MLPConfig(dtype="w8a8", activation_dtype="fp32")
    with pytest.raises(SchemeError, match="activations must be dynamic, group:N or static"):
        MLPConfig(dtype="w8a8", activations="per-tensor")
    with pytest.raises(LaunchError, match="group:48 is not supported; the int8 kernels take group:32, group:64, group:128"):
        MLPConfig(dtype="w8a8", activations="group:48")
    # A matching w2.input_scale is fine, as is the same tensor.
    static(x, q1, b1, QuantizedWeight(q2.data, q2.scale, input_scale=q1.output_scale.clone()), b2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_scale_that_is_not_positive_and_finite_is_refused(backend):
    """A zero, negative or NaN scale used to give a wrong result (a flipped sign, a b2-only
    output, NaN everywhere on one backend and nowhere on the other), not an error."""
    x = randn(5, 48, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a8", x=x)
    dynamic = FusedMLP(MLPConfig(dtype="w8a8", backend=backend), device=DEVICE)
    static = FusedMLP(MLPConfig(dtype="w8a8", activations="static", backend=backend), device=DEVICE)
    nan_one = q1.scale.clone()
    nan_one[3] = float("nan")
    for op, w1, field in (
        (dynamic, QuantizedWeight(q1.data, -q1.scale), "w1.scale"),
        (dynamic, QuantizedWeight(q1.data, q1.scale * 0), "w1.scale"),
        (dynamic, QuantizedWeight(q1.data, nan_one), "w1.scale"),
        (dynamic, QuantizedWeight(q1.data, q1.scale, smooth_scale=torch.zeros(48, device=DEVICE)), "w1.smooth_scale"),
        (static, QuantizedWeight(q1.data, q1.scale, input_scale=q1.input_scale * 0, output_scale=q1.output_scale), "w1.input_scale"),
        (static, QuantizedWeight(q1.data, q1.scale, input_scale=q1.input_scale, output_scale=-q1.output_scale), "w1.output_scale"),
    ):
        with pytest.raises(LaunchError, match=re.escape(field) + " holds a value that is not a positive finite number"):
            op(x, w1, b1, QuantizedWeight(q2.data, q2.scale, input_scale=w1.output_scale), b2)


def count_checks(monkeypatch, op) -> list:
    """A list that gains an entry each time `op` runs its full int8 operand checks."""
    checks = []
    real = op._check_int8
    monkeypatch.setattr(op, "_check_int8", lambda *args: checks.append(1) or real(*args))
    return checks


def test_repeated_calls_skip_the_checks_until_an_operand_changes(monkeypatch):
    # a decode loop calls with the same weights: the op checks them once, and again as soon
    # as any weight, tensor or scale is another object (a wrong one must still be refused)
    x = randn(5, 48, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a16", group_size=16)
    op = FusedMLP(MLPConfig(dtype="w8a16", backend="triton"), device=DEVICE)
    checks = count_checks(monkeypatch, op)
    op(x, q1, b1, q2, b2)
    op(randn(5, 48, dtype=torch.float16), q1, b1, q2, b2)
    assert len(checks) == 1
    q2.scale = q2.scale[:, :2]  # the same weight object, a scale of the wrong shape
    with pytest.raises(LaunchError, match=r"w2 has group scales \(group_size 16 over K=80\): scale must have shape"):
        op(x, q1, b1, q2, b2)
    with pytest.raises(LaunchError, match="input is torch.bfloat16"):
        op(x.bfloat16(), q1, b1, *int8_mlp(48, 80, torch.float16, "w8a16", group_size=16)[2:])
    assert len(checks) == 3


def test_static_compares_the_two_scales_once_per_operand_set(monkeypatch):
    # calibration gives w2 its own copy of w1.output_scale (a file holds both). Comparing
    # them by value is a host sync: it runs with the other checks, once per operand set, not
    # every call (a decode loop would wait on the GPU each step, and a CUDA graph could not
    # capture the op); a w2 whose scale disagrees is still refused when it arrives.
    import kernels.op as op_module

    x = randn(5, 48, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a8", x=x)
    q2 = QuantizedWeight(q2.data, q2.scale, input_scale=q1.output_scale.clone())
    static = FusedMLP(MLPConfig(dtype="w8a8", activations="static", backend="triton"), device=DEVICE)
    compared = []
    real = op_module._check_static_scales_agree
    monkeypatch.setattr(op_module, "_check_static_scales_agree", lambda *a: compared.append(1) or real(*a))
    checks = count_checks(monkeypatch, static)
    for _ in range(3):
        static(randn(5, 48, dtype=torch.float16), q1, b1, q2, b2)
    assert len(checks) == 1 and len(compared) == 1
    off = QuantizedWeight(q2.data, q2.scale, input_scale=q1.output_scale * 2)
    with pytest.raises(LaunchError, match="differs from w1.output_scale"):
        static(x, q1, b1, off, b2)
    assert len(checks) == 2 and len(compared) == 2


def test_torch_backend_runs_without_triton():
    # The reference backend is plain torch: it runs on any device, interpreter or not.
    x = randn(4, 48, dtype=torch.float16, device="cpu")
    weights = [t.to("cpu") for t in int8_mlp(48, 80, torch.float16, "w8a8", x=x.to(DEVICE))]
    for scheme, activations in (("w8a16", "dynamic"), ("w8a8", "dynamic"), ("w8a8", "group:32"), ("w8a8", "static")):
        op = FusedMLP(MLPConfig(dtype=scheme, activations=activations, backend="torch"), device="cpu")
        assert op(x, *weights).shape == (4, 48)


# ---------------------------------------------------------------------------------------
# GPU: real sizes
# ---------------------------------------------------------------------------------------

GPU_CASES = [
    # (scheme, activation dtype, variant, layout); test_w8a8.py's GPU steps use the same
    # w8a8 cases, so the two share compiled kernels and autotuning results.
    ("w8a16", "fp16", "per-channel", "out_in"),
    ("w8a16", "fp16", "group:128", "out_in"),
    ("w8a16", "bf16", "group:128", "in_out"),
    ("w8a16", "fp16", "per-channel", "in_out"),
    ("w8a8", "fp16", "dynamic", "out_in"),
    ("w8a8", "bf16", "dynamic+smooth", "in_out"),
    ("w8a8", "fp16", "group:128", "out_in"),
    ("w8a8", "bf16", "group:128+smooth", "in_out"),
    ("w8a8", "bf16", "static+smooth", "in_out"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 128, 2048])
@pytest.mark.parametrize("scheme,act,variant,layout", GPU_CASES)
@pytest.mark.parametrize("d,f", [(768, 3072), (4096, 16384)])
def test_int8_mlp_real_sizes(d, f, scheme, act, variant, layout, m, record_property):
    dtype = ACT[act]
    x = randn(m, d, dtype=dtype)
    group_size = 128 if scheme == "w8a16" and variant == "group:128" else None
    weights = int8_mlp(d, f, dtype, scheme, layout=layout, group_size=group_size, smooth="smooth" in variant, x=x)
    cfg = dict(dtype=scheme, activation_dtype=act, weight_layout=layout)
    if scheme == "w8a8":
        cfg["activations"] = w8a8_activations(variant)
    y, y_torch = run_both_backends(cfg, x, weights, device="cuda")
    err_ref, err64 = rel_err(y, y_torch), rel_err(y, float64_mlp(x, *weights, "erf", layout))
    print(
        f"GPU-ERR int8-mlp d={d} f={f} {scheme} {act} {variant} {layout} M={m} "
        f"vs_torch_ref={err_ref:.3e} vs_float64_dequantized={err64:.3e}"
    )
    record_property("rel_err_vs_torch_reference", err_ref)
    record_property("rel_err_vs_float64", err64)
    assert err_ref < TOL_VS_REFERENCE[dtype]
    assert err64 < tol_int8_vs_float64(scheme, dtype)
