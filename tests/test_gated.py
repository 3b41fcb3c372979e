"""Gated MLPs (GeGLU): y = (GELU(x Wg^T + bg) * (x Wu^T + bu)) W2^T + b2.

The gated GEMM1 (kernels/gemm_base.py's GATED variant of each path: gate and up tiles
of the same output columns in one kernel, two accumulators, GELU(gate) * up in the
epilogue) against its plain-torch reference (kernels/reference.py, `up=`) and float64,
for every dtype, both weight forms (two weights; one concatenated weight read in place
as two views, kernels/gated.py), with and without biases; the op (`MLPConfig(gated=True)`)
through both backends; a Gemma-2B-shaped MLP through the torch backend on CPU. Small
shapes under the CPU interpreter; real sizes (Gemma-2B 2048 -> 16384, Gemma-7B 3072 ->
24576) marked `gpu`.
"""

import math

import pytest
import torch

from conftest import (
    DEVICE, SCALE_RTOL, TOL_VS_FLOAT64, TOL_GATED_W8A8_STATIC_VS_FLOAT64, TOL_GATED_W8A8_VS_FLOAT64, TOL_VS_REFERENCE, on_paths, poisoned, randn, rel_err,
)  # fmt: skip
from int8_helpers import assert_int8_matches, quantize_weight
from kernels.errors import LaunchError
from kernels.gated import gate_and_up
from kernels.gemm import gemm_bias_act
from kernels.int8 import quantize_weight as quantize_cpu_weight
from kernels.op import FusedMLP, MLPConfig
from kernels.quantized import QuantizedWeight
from kernels.reference import linear_reference, mlp_reference, quantize_activation_reference, w8a8_linear_reference
from kernels.reference import w8a16_linear_reference
from kernels.w8a8 import w8a8_linear
from kernels.w8a16 import w8a16_linear

FLOAT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ACT = {"fp16": torch.float16, "bf16": torch.bfloat16}


def gated_weights(k, n, dtype=torch.float32, layout="out_in", form="separate", bias=True):
    """(w1, b1, w_up, b_up) of a gated GEMM1 in `form`: "separate" (two weights) or
    "concatenated" (w1 [2n, k] in out_in, gate rows first; w_up and b_up None)."""
    wg = randn(n, k, scale=1 / math.sqrt(k))
    wu = randn(n, k, scale=1 / math.sqrt(k))
    bg = randn(n, scale=0.5) if bias else None
    bu = randn(n, scale=0.5) if bias else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    if form == "concatenated":
        w = torch.cat([wg, wu])
        b = None if not bias else torch.cat([bg, bu])
        return cast(w if layout == "out_in" else w.t().contiguous()), cast(b), None, None
    if layout == "in_out":
        wg, wu = wg.t().contiguous(), wu.t().contiguous()
    return cast(wg), cast(bg), cast(wu), cast(bu)


def float64_gemm1(x, gate, b_gate, up, b_up, activation, layout):
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    return linear_reference(f64(x), f64(gate), f64(b_gate), activation=activation, weight_layout=layout, up=f64(up), up_bias=f64(b_up))


# ---------------------------------------------------------------------------------------
# The float gated GEMM1
# ---------------------------------------------------------------------------------------

# (path, leading dims, K, N): odd shapes for strided; 16-byte rows for TMA and decode
# (K = 264 and 528 split K in two under the interpreter, on decode and on TMA).
FLOAT_CASES = [
    ("strided", (2, 3), 33, 24), ("tma", (2, 21), 136, 56), ("tma", (3,), 528, 40), ("decode", (1,), 264, 40),
    ("decode", (16,), 72, 56),
]  # fmt: skip
# (layout, weight form, biases): both forms in both layouts, with and without biases
FORMS = [("out_in", "separate", True), ("in_out", "concatenated", True), ("out_in", "concatenated", False), ("in_out", "separate", False)]


@pytest.mark.parametrize("layout,form,bias", FORMS)
@pytest.mark.parametrize("dtype", list(FLOAT.values()), ids=str)
@pytest.mark.parametrize("path,lead,k,n", on_paths(FLOAT_CASES))
def test_float_gated_gemm1(path, lead, k, n, dtype, layout, form, bias):
    if form == "concatenated" and layout == "in_out" and path != "strided" and (n * dtype.itemsize) % 16:
        pytest.skip("the up half of an in_out weight starts n elements in: TMA needs that 16-byte aligned")
    run_float_gated(path, lead, k, n, dtype, layout, form, bias)


def run_float_gated(path, lead, k, n, dtype, layout, form, bias):
    """A float gated GEMM1 (tanh) on `path` against float64 and the reference."""
    x = randn(*lead, k, dtype=dtype)
    w1, b1, w_up, b_up = gated_weights(k, n, dtype, layout, form, bias)
    gate, b_gate, up, b_upper = gate_and_up(w1, b1, w_up, b_up, layout)
    if form == "concatenated":  # views into the one weight, not copies
        assert gate.untyped_storage().data_ptr() == up.untyped_storage().data_ptr() == w1.untyped_storage().data_ptr()
    out = poisoned((*lead, n), dtype)
    got = gemm_bias_act(x, gate, b_gate, activation="tanh", weight_layout=layout, path=path, out=out, w_up=up, b_up=b_upper)
    assert got.data_ptr() == out.data_ptr()
    ref = linear_reference(x, gate, b_gate, activation="tanh", weight_layout=layout, up=up, up_bias=b_upper)
    assert rel_err(out, float64_gemm1(x, gate, b_gate, up, b_upper, "tanh", layout)) < TOL_VS_FLOAT64[dtype]
    assert rel_err(out, ref) < TOL_VS_REFERENCE[dtype]


@pytest.mark.parametrize("activation", ["erf", "quick"])
def test_gated_gemm1_each_gelu(activation):
    x = randn(19, 72, dtype=torch.float16)
    gate, b_gate, up, b_up = gated_weights(72, 40, torch.float16)
    out = gemm_bias_act(x, gate, b_gate, activation=activation, w_up=up, b_up=b_up)
    assert rel_err(out, float64_gemm1(x, gate, b_gate, up, b_up, activation, "out_in")) < TOL_VS_FLOAT64[torch.float16]


def test_gated_and_plain_calls_keep_their_own_plans():
    # One weight, called plain and gated in turn: each signature has its own plan and kernel.
    x = randn(5, 72, dtype=torch.float16)
    gate, b_gate, up, b_up = gated_weights(72, 40, torch.float16)
    for _ in range(2):
        plain = gemm_bias_act(x, gate, b_gate, activation="erf")
        gated = gemm_bias_act(x, gate, b_gate, activation="erf", w_up=up, b_up=b_up)
        assert rel_err(plain, linear_reference(x, gate, b_gate, activation="erf")) < TOL_VS_REFERENCE[torch.float16]
        ref = linear_reference(x, gate, b_gate, activation="erf", up=up, up_bias=b_up)
        assert rel_err(gated, ref) < TOL_VS_REFERENCE[torch.float16]


def test_gated_gemm1_rejects_mismatched_up_operands():
    x = randn(4, 32, dtype=torch.float16)
    gate, b_gate, up, b_up = gated_weights(32, 16, torch.float16)
    with pytest.raises(LaunchError, match="up weight must have the gate weight's shape"):
        gemm_bias_act(x, gate, b_gate, w_up=up[:8], b_up=b_up)
    with pytest.raises(LaunchError, match="strides"):
        gemm_bias_act(x, gate, b_gate, w_up=up.t().contiguous().t(), b_up=b_up)
    with pytest.raises(LaunchError, match="bias for gate and up, or for neither"):
        gemm_bias_act(x, gate, b_gate, w_up=up)
    with pytest.raises(LaunchError, match="pass w_up too"):
        gemm_bias_act(x, gate, b_gate, b_up=b_up)


# ---------------------------------------------------------------------------------------
# The int8 gated GEMM1
# ---------------------------------------------------------------------------------------

# int8 rows of 16-byte multiples for TMA and decode (w8a8's int8 output too); K = 528 on
# TMA splits K in two under the interpreter
INT8_CASES = [
    ("strided", (37,), 70, 45), ("tma", (37,), 80, 48), ("tma", (3,), 528, 48), ("decode", (5,), 272, 48),
    ("decode", (1,), 80, 112),
]  # fmt: skip


def int8_gated(k, n, layout, form, group_size=None, bias=True, dtype=torch.float16):
    """(w1, b1, w_up, b_up) as QuantizedWeights: two, or one concatenated (per-row scales
    are each row's own, so quantizing the concatenated weight equals quantizing each half)."""
    w1, b1, w_up, b_up = gated_weights(k, n, torch.float32, "out_in", form, bias)
    q1 = quantize_weight(w1, group_size, layout)
    q_up = None if w_up is None else quantize_weight(w_up, group_size, layout)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return q1, cast(b1), q_up, cast(b_up)


@pytest.mark.parametrize(
    "dtype,group_size,form,bias",
    [(torch.float16, None, "separate", True), (torch.bfloat16, 32, "concatenated", True), (torch.float16, 16, "concatenated", False)],
    ids=str,
)
@pytest.mark.parametrize("path,lead,k,n", on_paths(INT8_CASES))
def test_w8a16_gated_gemm1(path, lead, k, n, dtype, group_size, form, bias):
    layout = "out_in" if form == "separate" else "in_out"
    x = randn(*lead, k, dtype=dtype)
    w1, b1, w_up, b_up = int8_gated(k, n, layout, form, group_size, bias, dtype)
    gate, b_gate, up, b_upper = gate_and_up(w1, b1, w_up, b_up, layout)
    out = poisoned((*lead, n), dtype)
    w8a16_linear(x, gate, b_gate, activation="erf", weight_layout=layout, path=path, out=out, up=up, up_bias=b_upper)
    ref = w8a16_linear_reference(x, gate, b_gate, activation="erf", weight_layout=layout, up=up, up_bias=b_upper)
    exact = float64_gemm1(x, gate.dequantize(layout), b_gate, up.dequantize(layout), b_upper, "erf", layout)
    assert rel_err(out, ref) < TOL_VS_REFERENCE[dtype]
    assert rel_err(out, exact) < TOL_VS_FLOAT64[dtype]


@pytest.mark.parametrize(
    "scheme,form,layout",
    [("static", "separate", "out_in"), ("dynamic", "concatenated", "out_in"), ("group:32", "concatenated", "in_out"),
     ("group:32", "separate", "out_in")],
)  # fmt: skip
@pytest.mark.parametrize("path,lead,k,n", on_paths(INT8_CASES))
def test_w8a8_gated_gemm1_matches_reference_exactly(path, lead, k, n, scheme, form, layout):
    """Each accumulator dequantized with its own weight scales (a's per-group scales promoted
    into both per K tile), GELU(gate) * up in float32, then the product as each activation
    scheme takes it: requantized with the static output scale, written in 16 bits
    (dynamic), or requantized per (row, 32 columns) with the scales the kernel writes."""
    if path != "strided" and scheme != "dynamic" and n % 16:
        pytest.skip("int8 output rows of 16-byte multiples for TMA")
    group = 32 if scheme.startswith("group") else None
    x = randn(*lead, k, scale=2.0)
    xq, x_scale = quantize_activation_reference(x, torch.tensor(0.04, device=DEVICE) if scheme == "static" else None, group_size=group)
    w1, b1, w_up, b_up = int8_gated(k, n, layout, form)
    gate, b_gate, up, b_upper = gate_and_up(w1, b1, w_up, b_up, layout)
    kw = dict(activation="tanh", weight_layout=layout, up=up, up_bias=b_upper, input_group_size=group, output_group_size=group)
    if scheme == "static":
        kw["output_scale"] = torch.tensor(0.03, device=DEVICE)
    dtype = torch.float16 if scheme == "dynamic" else torch.int8
    out = poisoned((*lead, n), dtype)
    got = w8a8_linear(xq, x_scale, gate, b_gate, path=path, out=out, **kw)
    ref = w8a8_linear_reference(xq, x_scale, gate, b_gate, **kw)
    if scheme == "dynamic":
        assert rel_err(out, ref) < TOL_VS_REFERENCE[torch.float16]
        return
    if group:
        (_, scales), (ref, ref_scales) = got, ref
        torch.testing.assert_close(scales, ref_scales, rtol=SCALE_RTOL, atol=0)
    assert_int8_matches(out, ref)
    assert out.abs().max() > 20  # the scale is not so coarse that everything rounds to 0


def test_int8_gated_rejects_mismatched_scales():
    x = randn(4, 32, dtype=torch.float16)
    gate, b_gate, up, b_up = int8_gated(32, 16, "out_in", "separate")
    grouped = quantize_weight(up.dequantize(), 16)
    with pytest.raises(LaunchError, match="group:16 scales, the gate per-channel"):
        w8a16_linear(x, gate, b_gate, up=grouped, up_bias=b_up)
    with pytest.raises(LaunchError, match="must be a QuantizedWeight"):
        w8a16_linear(x, gate, b_gate, up=up.dequantize(), up_bias=b_up)


# ---------------------------------------------------------------------------------------
# The op: every dtype, both weight forms, both backends
# ---------------------------------------------------------------------------------------


def calibrated_gated(d, f, act_dtype, scheme, form, layout, x, bias=True, gelu_flavour="tanh"):
    """(w1, b1, w2, b2, w_up, b_up) int8 with the w8a8 scales calibrated on x (absmax of x and
    of the product GELU(gate) * up on the dequantized weights)."""
    w1, b1, w_up, b_up = int8_gated(d, f, layout, form, bias=bias, dtype=act_dtype)
    w2 = quantize_weight(randn(d, f, scale=1 / math.sqrt(f)), None, layout)
    b2 = randn(d, dtype=act_dtype, scale=0.5) if bias else None
    if scheme == "w8a8":
        gate, b_gate, up, b_upper = gate_and_up(w1, b1, w_up, b_up, layout)
        h = float64_gemm1(x.float(), gate.dequantize(layout), b_gate, up.dequantize(layout), b_upper, gelu_flavour, layout)
        w1.input_scale = (x.float().abs().amax() / 127).float()
        w1.output_scale = (h.abs().amax() / 127).float()
    return w1, b1, w2, b2, w_up, b_up


def float64_gated_mlp(x, w1, b1, w2, b2, w_up, b_up, gelu_flavour, layout):
    deq = lambda w: w.dequantize(layout, torch.float64) if isinstance(w, QuantizedWeight) else w.double()  # noqa: E731
    f64 = lambda t: None if t is None else t.double()  # noqa: E731
    return mlp_reference(
        x.double(), deq(w1), f64(b1), deq(w2), f64(b2), gelu_flavour=gelu_flavour, weight_layout=layout, gated=True,
        w_up=None if w_up is None else deq(w_up), b_up=f64(b_up),
    )  # fmt: skip


def run_both_backends(cfg, x, weights, device=DEVICE):
    fused = FusedMLP(MLPConfig(backend="triton", gated=True, **cfg), device=device)
    plain = FusedMLP(MLPConfig(backend="torch", gated=True, **cfg), device=device)
    return fused(x, *weights), plain(x, *weights)


@pytest.mark.parametrize("form,bias", [("separate", False), ("concatenated", True)])
@pytest.mark.parametrize("dtype", list(FLOAT))
def test_float_gated_mlp_both_backends(dtype, form, bias):
    tdtype = FLOAT[dtype]
    d, f = 40, 72
    x = randn(3, 7, d, dtype=tdtype)
    w1, b1, w_up, b_up = gated_weights(d, f, tdtype, "out_in", form, bias)
    w2 = randn(d, f, dtype=tdtype, scale=1 / math.sqrt(f))
    b2 = randn(d, dtype=tdtype, scale=0.5) if bias else None
    weights = (w1, b1, w2, b2, w_up, b_up)
    y, y_torch = run_both_backends(dict(dtype=dtype, gelu="tanh"), x, weights)
    assert y.shape == (3, 7, d) and y.dtype == tdtype
    assert rel_err(y, y_torch) < TOL_VS_REFERENCE[tdtype]
    assert rel_err(y, float64_gated_mlp(x, *weights, "tanh", "out_in")) < TOL_VS_FLOAT64[tdtype]


@pytest.mark.parametrize("form,layout", [("separate", "out_in"), ("concatenated", "in_out")])
@pytest.mark.parametrize("act", list(ACT))
@pytest.mark.parametrize("scheme,activations", [("w8a16", None), ("w8a8", "dynamic"), ("w8a8", "group:32"), ("w8a8", "static")])
def test_int8_gated_mlp_both_backends(scheme, activations, act, form, layout):
    dtype = ACT[act]
    d, f = 48, 80
    x = randn(3, 5, d, dtype=dtype, scale=2.0)
    weights = calibrated_gated(d, f, dtype, scheme, form, layout, x)
    cfg = dict(dtype=scheme, activation_dtype=act, gelu="tanh", weight_layout=layout)
    if activations:
        cfg["activations"] = activations
    y, y_torch = run_both_backends(cfg, x, weights)
    assert y.shape == (3, 5, d) and y.dtype == dtype
    assert rel_err(y, y_torch) < TOL_VS_REFERENCE[dtype]
    tol = TOL_VS_FLOAT64[dtype] if scheme == "w8a16" else TOL_GATED_W8A8_VS_FLOAT64
    assert rel_err(y, float64_gated_mlp(x, *weights, "tanh", layout)) < tol


def test_gated_op_errors():
    d, f = 16, 32
    w1, b1, w_up, b_up = gated_weights(d, f, torch.float16)
    w2 = randn(d, f, dtype=torch.float16)
    x = randn(2, d, dtype=torch.float16)
    plain = FusedMLP(MLPConfig(dtype="fp16", backend="torch"), device=DEVICE)
    with pytest.raises(LaunchError, match="gated=False"):
        plain(x, w1, b1, w2, None, w_up, b_up)
    gated = FusedMLP(MLPConfig(dtype="fp16", backend="torch", gated=True), device=DEVICE)
    with pytest.raises(LaunchError, match="even number of outputs"):
        gated(x, w1[:-1], None, w2, None)
    with pytest.raises(LaunchError, match="b_up goes with w_up"):
        gated(x, w1, b1, w2, None, None, b_up)
    with pytest.raises(LaunchError, match="a bias each, or neither"):
        gated(x, w1, b1, w2, None, w_up, None)
    with pytest.raises(LaunchError, match="gated must be True or False"):
        MLPConfig(gated="yes")


def test_gemma_2b_shaped_mlp_through_the_torch_backend_on_cpu():
    """A random MLP of Gemma-2B's shape (2048 -> 16384 -> 2048, tanh GELU, no biases) through
    the op's torch backend on the CPU, every float dtype and both int8 schemes, against
    float64 within the plain MLP's tolerances."""
    d, f, m = 2048, 16384, 4
    gate = torch.randn(f, d) / math.sqrt(d)
    up = torch.randn(f, d) / math.sqrt(d)
    down = torch.randn(d, f) / math.sqrt(f)
    x = torch.randn(m, d)
    for name, dtype in FLOAT.items():
        op = FusedMLP(MLPConfig(dtype=name, gelu="tanh", gated=True, backend="torch"), device="cpu")
        c = lambda t: t.to(dtype)  # noqa: E731
        y = op(c(x), c(gate), None, c(down), None, c(up))
        exact = float64_gated_mlp(c(x), c(gate), None, c(down), None, c(up), None, "tanh", "out_in")
        assert rel_err(y, exact) < TOL_VS_FLOAT64[dtype], name
    # the library's quantizer keeps the CPU tensors where they are (the tests' helper moves
    # its result to the test device, a GPU where there is one)
    qg, qu, qd = (quantize_cpu_weight(w) for w in (gate, up, down))
    xh = x.half()
    exact = float64_gated_mlp(xh, qg, None, qd, None, qu, None, "tanh", "out_in")
    y = FusedMLP(MLPConfig(dtype="w8a16", gelu="tanh", gated=True, backend="torch"), device="cpu")(xh, qg, None, qd, None, qu)
    assert rel_err(y, exact) < TOL_VS_FLOAT64[torch.float16]
    h = float64_gemm1(xh.float(), qg.dequantize(), None, qu.dequantize(), None, "tanh", "out_in")
    qg.input_scale, qg.output_scale = (xh.float().abs().amax() / 127).float(), (h.abs().amax() / 127).float()
    for activations in ("dynamic", "group:128", "static"):
        op = FusedMLP(MLPConfig(dtype="w8a8", gelu="tanh", gated=True, backend="torch", activations=activations), device="cpu")
        tol = TOL_GATED_W8A8_STATIC_VS_FLOAT64 if activations == "static" else TOL_GATED_W8A8_VS_FLOAT64
        assert rel_err(op(xh, qg, None, qd, None, qu), exact) < tol, activations


# ---------------------------------------------------------------------------------------
# GPU: real sizes
# ---------------------------------------------------------------------------------------

GEMMA_SHAPES = [(2048, 16384), (3072, 24576)]  # Gemma-2B, Gemma-7B
GPU_INT8_CASES = [
    ("w8a16", "fp16", None), ("w8a16", "bf16", None),
    ("w8a8", "fp16", "dynamic"), ("w8a8", "bf16", "group:128"), ("w8a8", "bf16", "static"),
]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 128, 2048])
@pytest.mark.parametrize("form", ["separate", "concatenated"])
@pytest.mark.parametrize("dtype", list(FLOAT))
@pytest.mark.parametrize("d,f", GEMMA_SHAPES)
def test_float_gated_mlp_real_sizes(d, f, dtype, form, m, record_property):
    tdtype = FLOAT[dtype]
    x = randn(m, d, dtype=tdtype)
    w1, b1, w_up, b_up = gated_weights(d, f, tdtype, "out_in", form, bias=False)
    w2 = randn(d, f, dtype=tdtype, scale=1 / math.sqrt(f))
    weights = (w1, b1, w2, None, w_up, b_up)
    y, y_torch = run_both_backends(dict(dtype=dtype, gelu="tanh"), x, weights, device="cuda")
    err_ref, err64 = rel_err(y, y_torch), rel_err(y, float64_gated_mlp(x, *weights, "tanh", "out_in"))
    print(f"GPU-ERR gated-mlp d={d} f={f} {dtype} {form} M={m} vs_torch_ref={err_ref:.3e} vs_float64={err64:.3e}")
    record_property("rel_err_vs_float64", err64)
    assert err_ref < TOL_VS_REFERENCE[tdtype]
    assert err64 < TOL_VS_FLOAT64[tdtype]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 128, 2048])
@pytest.mark.parametrize("form", ["separate", "concatenated"])
@pytest.mark.parametrize("scheme,act,activations", GPU_INT8_CASES)
@pytest.mark.parametrize("d,f", GEMMA_SHAPES)
def test_int8_gated_mlp_real_sizes(d, f, scheme, act, activations, form, m, record_property):
    dtype = ACT[act]
    x = randn(m, d, dtype=dtype)
    weights = calibrated_gated(d, f, dtype, scheme, form, "out_in", x, bias=False)
    cfg = dict(dtype=scheme, activation_dtype=act, gelu="tanh")
    if activations:
        cfg["activations"] = activations
    y, y_torch = run_both_backends(cfg, x, weights, device="cuda")
    err_ref, err64 = rel_err(y, y_torch), rel_err(y, float64_gated_mlp(x, *weights, "tanh", "out_in"))
    print(f"GPU-ERR gated-mlp d={d} f={f} {scheme} {act} {activations} {form} M={m} vs_torch_ref={err_ref:.3e} vs_float64={err64:.3e}")
    record_property("rel_err_vs_float64", err64)
    assert err_ref < TOL_VS_REFERENCE[dtype]
    if scheme == "w8a16":
        assert err64 < TOL_VS_FLOAT64[dtype]
    else:
        assert err64 < (TOL_GATED_W8A8_STATIC_VS_FLOAT64 if activations == "static" else TOL_GATED_W8A8_VS_FLOAT64)
