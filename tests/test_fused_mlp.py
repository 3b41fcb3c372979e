"""kernels/fused_mlp.py: the whole MLP in one launch (float, w8a8 `dynamic` and w8a16), against
the torch reference and float64; its workspace left ready for the next launch; its checks."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernels.fused_mlp as fused_module
import kernels.op as op_module
from conftest import (
    DEVICE,
    TOL_TF32,
    TOL_VS_FLOAT64,
    TOL_VS_REFERENCE,
    TOL_W8A8_VS_FLOAT64,
    TOL_W8A8_VS_REFERENCE,
    TOL_W8A16_VS_FLOAT64,
    TOL_W8A16_VS_REFERENCE,
    randn,
    rel_err,
)
from kernels.errors import LaunchError
from int8_helpers import float64_mlp, int8_mlp, quantize_weight
from kernels.fused_mlp import (
    FUSED_MAX_M,
    FUSED_MAX_WEIGHT,
    FUSED_W8A8_MAX_M,
    FUSED_W8A16_MAX_M,
    FUSED_W8A8_MAX_WEIGHT,
    FUSED_W8A8_SMALL_MAX_M,
    FUSED_W8A16_SMALL_MAX_M,
    fused_mlp,
    fused_mlp_applies,
    fused_mlp_enabled,
    fused_w8a8_applies,
    fused_w8a8_mlp,
    fused_w8a16_applies,
    fused_w8a16_mlp,
)
from kernels.quantized import QuantizedWeight
from kernels.op import FusedMLP, MLPConfig
from kernels.reference import mlp_reference, w8a8_mlp_reference, w8a16_mlp_reference
from kernels.w8a8 import w8a8_mlp

FLOAT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def weights(d, f, dtype, layout="out_in", biases=(True, True), device=DEVICE):
    w1 = randn(f, d, dtype=dtype, scale=1 / math.sqrt(d), device=device)
    w2 = randn(d, f, dtype=dtype, scale=1 / math.sqrt(f), device=device)
    if layout == "in_out":
        w1, w2 = w1.t().contiguous(), w2.t().contiguous()
    b1 = randn(f, dtype=dtype, scale=0.5, device=device) if biases[0] else None
    b2 = randn(d, dtype=dtype, scale=0.5, device=device) if biases[1] else None
    return w1, b1, w2, b2


def poison_workspace(dtype):
    # every h and partial element NaN (int8 h: -128, outside the symmetric int8 range), and
    # group's h scales NaN: a tile the kernel fails to write (or reads before it is written)
    # shows in the result. (dynamic's absmax is left alone: each launch starts from it at
    # zero.) (Inference mode: a workspace an earlier test allocated under it is an inference
    # tensor, which only takes writes there.)
    with torch.inference_mode():
        for (_, _, ws_dtype, kind), (h, partial, _, scales) in fused_module._workspaces.items():
            if ws_dtype == dtype:
                h.fill_(-128 if dtype == torch.int8 else float("nan"))
                partial.fill_(float("nan"))
                if kind == "group":
                    scales.fill_(float("nan"))


def check(x, w1, b1, w2, b2, gelu="erf", layout="out_in", allow_tf32=False):
    y = fused_mlp(x, w1, b1, w2, b2, activation=gelu, weight_layout=layout, allow_tf32=allow_tf32)
    assert y.shape == x.shape and y.dtype == x.dtype
    exact = mlp_reference(x, w1, b1, w2, b2, gelu_flavour=gelu, weight_layout=layout, dtype=torch.float64)
    plain = mlp_reference(x, w1, b1, w2, b2, gelu_flavour=gelu, weight_layout=layout, dtype=x.dtype)
    tol64 = TOL_TF32 if allow_tf32 else TOL_VS_FLOAT64[x.dtype]
    tol_ref = TOL_TF32 if allow_tf32 else TOL_VS_REFERENCE[x.dtype]
    assert rel_err(y, exact) < tol64
    assert rel_err(y, plain) < tol_ref
    return y


# Shapes that cross several tiles in every dim on the interpreter's config (16 rows,
# 32-wide GEMM1 and GEMM2 tiles, 32-deep K steps, GEMM2 split in two), with ragged edges.
SHAPES = [(1, 32, 64), (5, 48, 80), (37, 40, 100), (16, 64, 128)]


@pytest.mark.parametrize("dtype", list(FLOAT))
@pytest.mark.parametrize("m,d,f", SHAPES)
def test_fused_mlp_matches_reference_and_float64(dtype, m, d, f):
    torch.manual_seed(m * 1000 + d + f)
    tdtype = FLOAT[dtype]
    w1, b1, w2, b2 = weights(d, f, tdtype)
    x = randn(m, d, dtype=tdtype)
    fused_mlp(x, w1, b1, w2, b2)  # sizes the workspace, to poison it
    poison_workspace(tdtype)
    check(randn(m, d, dtype=tdtype), w1, b1, w2, b2)


@pytest.mark.parametrize("gelu", ["erf", "tanh", "quick"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("biases", [(True, True), (True, False), (False, True), (False, False)])
def test_fused_mlp_every_gelu_layout_and_bias(gelu, layout, biases):
    torch.manual_seed(7)
    w1, b1, w2, b2 = weights(40, 96, torch.float16, layout, biases)
    check(randn(3, 7, 40, dtype=torch.float16), w1, b1, w2, b2, gelu=gelu, layout=layout)


def test_fused_mlp_tf32():
    torch.manual_seed(3)
    w1, b1, w2, b2 = weights(48, 80, torch.float32)
    check(randn(9, 48, dtype=torch.float32), w1, b1, w2, b2, allow_tf32=True)


def test_fused_mlp_takes_strided_rows():
    torch.manual_seed(4)
    w1, b1, w2, b2 = weights(40, 64, torch.float16)
    x = randn(20, 80, dtype=torch.float16)[:, ::2]  # every other column: strides (80, 2)
    check(x, w1, b1, w2, b2)


def test_back_to_back_launches_each_see_only_their_own_input():
    # the counters must be back at zero after a launch, or the next one reads a stale h
    torch.manual_seed(5)
    w1, b1, w2, b2 = weights(48, 80, torch.float16)
    for m in (21, 21, 5, 37, 21):
        check(randn(m, 48, dtype=torch.float16), w1, b1, w2, b2)
    assert_workspace_at_rest(torch.float16)


def assert_workspace_at_rest(dtype):
    for (_, _, ws_dtype, kind), (_, _, counters, absmax) in fused_module._workspaces.items():
        if ws_dtype == dtype:
            assert int(counters.abs().sum()) == 0
            if kind != "group":  # group's scales are written before they are read
                assert float(absmax.abs().sum()) == 0.0


def test_zero_rows_give_an_empty_result():
    w1, b1, w2, b2 = weights(32, 64, torch.float16)
    y = fused_mlp(randn(0, 32, dtype=torch.float16), w1, b1, w2, b2)
    assert y.shape == (0, 32)


@pytest.mark.parametrize(
    "case,message",
    [
        ("dtype", "differs from input dtype"),
        ("w2_shape", "w2 must map d_ff=64 to d_model=32"),
        ("x_width", "w1 takes 32 inputs but x has 40 features"),
        ("bias", "b1 must be a contiguous [64] vector"),
        ("activation", "activation must be one of"),
        ("int8", "input dtype must be fp16, bf16 or fp32"),
    ],
)
def test_fused_mlp_rejects_bad_operands(case, message):
    w1, b1, w2, b2 = weights(32, 64, torch.float16)
    x = randn(4, 32, dtype=torch.float16)
    kwargs = {}
    if case == "dtype":
        w2 = w2.float()
    elif case == "w2_shape":
        w2 = w2[:, :48]
    elif case == "x_width":
        x = randn(4, 40, dtype=torch.float16)
    elif case == "bias":
        b1 = b1[:60]
    elif case == "activation":
        kwargs["activation"] = "relu"
    elif case == "int8":
        x = x.to(torch.int8)
    with pytest.raises(LaunchError, match=message.replace("[", r"\[")):
        fused_mlp(x, w1, b1, w2, b2, **kwargs)


def test_the_op_takes_one_launch_for_small_models_at_few_rows():
    small = torch.empty(3072, 768, dtype=torch.float16)
    large = torch.empty(16384, 4096, dtype=torch.float16)
    assert fused_mlp_applies(1, small, small.t())
    assert fused_mlp_applies(FUSED_MAX_M, small, small.t())
    assert not fused_mlp_applies(FUSED_MAX_M + 1, small, small.t())
    assert not fused_mlp_applies(16, large, large.t())
    assert large.numel() > FUSED_MAX_WEIGHT >= small.numel()


@pytest.mark.parametrize(
    "env,on",
    [
        ({"GELUGEMM_FUSED_MLP": "0"}, False),
        ({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}, False),
        ({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100"}, True),
        ({"GELUGEMM_FUSED_MLP": "1"}, True),
    ],
)
def test_the_one_launch_is_off_when_asked_or_when_mps_limits_the_sms(monkeypatch, env, on):
    # its programs wait on one another: every one of them must be resident (module docstring)
    small = torch.empty(3072, 768)
    for name in ("GELUGEMM_FUSED_MLP", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fused_mlp_enabled.cache_clear()
    try:
        assert fused_mlp_applies(16, small, small.t()) == on
    finally:
        monkeypatch.undo()
        fused_mlp_enabled.cache_clear()


def spy_on_op(monkeypatch, name: str) -> list:
    """The shapes of x the op passes to its `name` launcher (kernels/op.py's import of it)."""
    calls = []
    real = getattr(op_module, name)

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(op_module, name, spy)
    return calls


def test_op_runs_the_fused_launch_and_matches_the_reference(monkeypatch):
    # the op's triton backend at a small size goes through fused_mlp and keeps its answer
    calls = spy_on_op(monkeypatch, "fused_mlp")
    torch.manual_seed(6)
    w1, b1, w2, b2 = weights(48, 80, torch.float16)
    x = randn(2, 5, 48, dtype=torch.float16)
    op = FusedMLP(MLPConfig(dtype="fp16", backend="triton"), device=DEVICE)
    y = op(x, w1, b1, w2, b2)
    assert calls == [x.shape]
    exact = mlp_reference(x, w1, b1, w2, b2, dtype=torch.float64)
    assert rel_err(y, exact) < TOL_VS_FLOAT64[torch.float16]


# ---------------------------------------------------------------------------------------
# w8a8 `dynamic` in one launch: the four launches' arithmetic (kernels/w8a8.py)
# ---------------------------------------------------------------------------------------


def check_w8a8(x, q1, b1, q2, b2, gelu="erf", layout="out_in", activations="dynamic"):
    # the separate launches' answer (kernels/w8a8.py's w8a8_mlp: the same rounding), the torch
    # reference's up to a rounding tie (TOL_W8A8_VS_REFERENCE), float64's up to quantization
    y = fused_w8a8_mlp(x, q1, b1, q2, b2, activation=gelu, weight_layout=layout, activations=activations)
    assert y.shape == x.shape and y.dtype == x.dtype
    separate = w8a8_mlp(x, q1, b1, q2, b2, activations=activations, activation=gelu, weight_layout=layout)
    assert rel_err(y, separate) < TOL_VS_REFERENCE[x.dtype]
    ref = w8a8_mlp_reference(x, q1, b1, q2, b2, gelu_flavour=gelu, weight_layout=layout, activations=activations)
    assert rel_err(y, ref) < TOL_W8A8_VS_REFERENCE[x.dtype]
    assert rel_err(y, float64_mlp(x, q1, b1, q2, b2, gelu, layout)) < TOL_W8A8_VS_FLOAT64
    return y


# every scheme: dynamic (16-bit h), static and group:G (int8 h). group:32 and group:64 under
# the interpreter's 32-deep K steps: one group a K step either way (fit_group deepens them to
# 64); the shapes' last group is short somewhere
W8A8_SCHEMES = ["dynamic", "static", "group:32", "group:64"]


def h_workspace_dtype(activations, x_dtype):
    """The dtype of the one launch's h workspace: int8 where GEMM1 requantizes h."""
    return x_dtype if activations == "dynamic" else torch.int8


@pytest.mark.parametrize("activations", W8A8_SCHEMES)
@pytest.mark.parametrize("dtype", list(FLOAT))
@pytest.mark.parametrize("m,d,f", SHAPES)
@pytest.mark.parametrize("smooth", [False, True])
def test_fused_w8a8_matches_the_reference_and_float64(activations, dtype, m, d, f, smooth):
    torch.manual_seed(m * 1000 + d + f + smooth)
    tdtype = FLOAT[dtype]
    x = randn(m, d, dtype=tdtype)
    q1, b1, q2, b2 = int8_mlp(d, f, tdtype, "w8a8", x=x, smooth=smooth)
    fused_w8a8_mlp(x, q1, b1, q2, b2, activations=activations)  # sizes the workspace, to poison it
    poison_workspace(h_workspace_dtype(activations, tdtype))
    # (static's scales are calibrated on x: a fresh input would clip, the scheme's error)
    check_w8a8(x if activations == "static" else randn(m, d, dtype=tdtype), q1, b1, q2, b2, activations=activations)


@pytest.mark.parametrize("activations", W8A8_SCHEMES)
@pytest.mark.parametrize("gelu", ["erf", "tanh", "quick"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias2", [True, False])
def test_fused_w8a8_every_gelu_layout_and_bias(activations, gelu, layout, bias2):
    torch.manual_seed(8)
    x = randn(3, 7, 40, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(40, 96, torch.float16, "w8a8", x=x, layout=layout, gelu=gelu, bias2=bias2)
    check_w8a8(x, q1, b1, q2, b2, gelu=gelu, layout=layout, activations=activations)
    check_w8a8(x, q1, None, q2, b2, gelu=gelu, layout=layout, activations=activations)


def test_fused_w8a8_rows_of_very_different_size_get_their_own_scales():
    # per-token scales: a row 1000x larger must not flatten the others to zero
    torch.manual_seed(9)
    x = randn(6, 48, dtype=torch.float16)
    x[2] *= 1000
    x[4] = 0  # an all-zero row: its scale floors at SCALE_EPS, its GEMM1 output is the bias
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a8", x=x)
    y = check_w8a8(x, q1, b1, q2, b2)
    for row in (0, 1, 3, 4, 5):
        assert rel_err(y[row], float64_mlp(x[row : row + 1], q1, b1, q2, b2, "erf", "out_in")[0]) < TOL_W8A8_VS_FLOAT64


def test_fused_w8a8_takes_strided_rows():
    torch.manual_seed(10)
    x = randn(20, 80, dtype=torch.bfloat16)[:, ::2]  # strides (80, 2)
    q1, b1, q2, b2 = int8_mlp(40, 64, torch.bfloat16, "w8a8", x=x, smooth=True)
    check_w8a8(x, q1, b1, q2, b2)


def test_fused_w8a8_back_to_back_launches_leave_the_workspace_at_rest():
    # each launch's h absmax must start from zero: a stale one would shrink the next
    # input's h to a few int8 levels
    torch.manual_seed(11)
    x = randn(37, 48, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a8", x=x)
    for m, scale in ((21, 100.0), (21, 1.0), (5, 1.0), (37, 0.01), (21, 1.0)):
        check_w8a8(randn(m, 48, dtype=torch.float16, scale=scale), q1, b1, q2, b2)
    assert_workspace_at_rest(torch.float16)


@pytest.mark.parametrize(
    "case,message",
    [
        ("float_weight", "w1 must be a QuantizedWeight"),
        ("group_weight", "w8a8 takes per-channel weight scales; w2 has group:32"),
        ("w2_smooth", "smooth_scale applies to w8a8's GEMM1 input only"),
        ("smooth_shape", r"smooth_scale must be a contiguous float32 \[48\] vector"),
        ("scale_shape", r"w1 scale must be a float32 \[80\] vector"),
        ("w2_shape", "w2 must map d_ff=80 to d_model=48"),
        ("int8_input", "input dtype must be fp16, bf16 or fp32"),
    ],
)
def test_fused_w8a8_rejects_bad_operands(case, message):
    x = randn(4, 48, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a8", x=x)
    if case == "float_weight":
        q1 = q1.dequantize()
    elif case == "group_weight":
        q2 = quantize_weight(q2.dequantize(), group_size=32)
    elif case == "w2_smooth":
        q2.smooth_scale = torch.ones(80, device=DEVICE)
    elif case == "smooth_shape":
        q1.smooth_scale = torch.ones(40, device=DEVICE)
    elif case == "scale_shape":
        q1 = QuantizedWeight(q1.data, q1.scale[:40])
    elif case == "w2_shape":
        q2 = QuantizedWeight(q2.data[:, :64], q2.scale)
    elif case == "int8_input":
        x = x.to(torch.int8)
    with pytest.raises(LaunchError, match=message):
        fused_w8a8_mlp(x, q1, b1, q2, b2)


# ---------------------------------------------------------------------------------------
# w8a8 `static` and `group:G` in one launch: what only they have
# ---------------------------------------------------------------------------------------


def test_fused_w8a8_static_reads_the_scales_of_each_call():
    # static's scales are the weights' tensors, read by the kernel at run time: a scale
    # changed in place (a recalibration) changes the next result as the reference's
    torch.manual_seed(19)
    x = randn(9, 48, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a8", x=x)
    y1 = check_w8a8(x, q1, b1, q2, b2, activations="static")
    q1.input_scale.mul_(4)
    q1.output_scale.mul_(0.5)
    y2 = fused_w8a8_mlp(x, q1, b1, q2, b2, activations="static")
    ref = w8a8_mlp_reference(x, q1, b1, q2, b2, activations="static")
    assert rel_err(y2, ref) < TOL_VS_REFERENCE[x.dtype] and not torch.equal(y1, y2)


def test_fused_w8a8_group_scales_are_per_row_and_group():
    # a row 1000x larger, and one group of another row 100x larger, keep the others' scales
    torch.manual_seed(20)
    x = randn(6, 96, dtype=torch.float16)
    x[2] *= 1000
    x[4, 32:64] *= 100
    x[5] = 0  # an all-zero row: its scales floor at SCALE_EPS
    q1, b1, q2, b2 = int8_mlp(96, 128, torch.float16, "w8a8", x=x)
    y = check_w8a8(x, q1, b1, q2, b2, activations="group:32")
    for row in (0, 1, 3, 5):
        want = float64_mlp(x[row : row + 1], q1, b1, q2, b2, "erf", "out_in")[0]
        assert rel_err(y[row], want) < TOL_W8A8_VS_FLOAT64


def test_fused_w8a8_group_back_to_back_launches():
    # group's h scales are rewritten every launch (no stale scale from a larger input) and
    # the counters left at zero
    torch.manual_seed(21)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a8", x=randn(8, 48, dtype=torch.float16))
    for m, scale in ((21, 100.0), (21, 1.0), (5, 1.0), (37, 0.01)):
        check_w8a8(randn(m, 48, dtype=torch.float16, scale=scale), q1, b1, q2, b2, activations="group:32")
    assert_workspace_at_rest(torch.int8)


@pytest.mark.parametrize(
    "scheme,case,message",
    [
        ("static", "no_input_scale", "w8a8 static needs w1.input_scale"),
        ("static", "no_output_scale", "w8a8 static needs w1.output_scale"),
        ("static", "scale_shape", "w1.output_scale must be a one-element float32 tensor"),
        ("group:48", None, "group:48 is not supported"),
        ("group:32", "group_weight", "w8a8 takes per-channel weight scales; w1 has group:32"),
    ],
)
def test_fused_w8a8_static_and_group_reject_bad_operands(scheme, case, message):
    x = randn(4, 48, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a8", x=x)
    if case == "no_input_scale":
        q1.input_scale = None
    elif case == "no_output_scale":
        q1.output_scale = None
    elif case == "scale_shape":
        q1.output_scale = torch.ones(2, device=DEVICE)
    elif case == "group_weight":
        q1 = quantize_weight(q1.dequantize(), group_size=32)
    with pytest.raises(LaunchError, match=message):
        fused_w8a8_mlp(x, q1, b1, q2, b2, activations=scheme)


def test_group_configs_hold_one_group_a_k_step_and_whole_groups_a_tile(monkeypatch):
    monkeypatch.setattr(fused_module, "interpreting", lambda: False)
    table, large = fused_module.FUSED_W8A8_CONFIGS, fused_module.FUSED_W8A8_LARGE_CONFIGS
    for group in (32, 64, 128):
        for m, d, f in ((1, 768, 3072), (100, 768, 3072), (16, 4096, 16384)):
            c = fused_module._config_for(m, d, f, table, large, group).kwargs
            plain = fused_module._config_for(m, d, f, table, large).kwargs
            assert c["BLOCK_K"] == group and c["BLOCK_F"] % group == 0
            assert c["BLOCK_F"] == max(plain["BLOCK_F"], group)
            assert (c["BLOCK_M"], c["BLOCK_D"], c["SPLIT_F"]) == (plain["BLOCK_M"], plain["BLOCK_D"], plain["SPLIT_F"])
    # a register cap (maxnreg) stays with the config, and tells two configs apart
    capped = fused_module._fcfg(16, 64, 64, 256, 8, maxnreg=168)
    assert fused_module.fit_group(capped, 128).maxnreg == 168
    prune = fused_module._pruner({16: capped}, None)
    assert prune([fused_module._fcfg(16, 64, 64, 256, 8), capped], {"M": 1, "D": 768, "F": 3072}) == [capped]


@settings(max_examples=40, deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 40), d=st.integers(1, 96), f=st.integers(1, 160), bias1=st.booleans(), smooth=st.booleans(),
    scheme=st.sampled_from(["dynamic", "static", "group:32", "group:64"]), dtype=st.sampled_from(["fp16", "bf16", "fp32"]),
    seed=st.integers(0, 2**31 - 1),
)  # fmt: skip
def test_fused_w8a8_any_shape_and_scheme_gives_the_separate_launches_answer(m, d, f, bias1, smooth, scheme, dtype,
                                                                             seed):  # fmt: skip
    # shapes no tile divides (d or f below one K step or one group, short last groups, one
    # row), each scheme: the one launch gives the separate launches' answer (the same
    # kernels' arithmetic; only float sums in another order differ). Against the torch
    # reference an int8 value at a rounding tie may land on the other side (the GELU's erf
    # is not torch's): at 40x2x160 one such row put static 1.8e-3 from it, both paths alike.
    torch.manual_seed(seed)
    tdtype = FLOAT[dtype]
    x = randn(m, d, dtype=tdtype)
    q1, b1, q2, b2 = int8_mlp(d, f, tdtype, "w8a8", x=x, smooth=smooth)
    b1 = b1 if bias1 else None
    y = fused_w8a8_mlp(x, q1, b1, q2, b2, activations=scheme)
    separate = w8a8_mlp(x, q1, b1, q2, b2, activations=scheme)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert rel_err(y, separate) < TOL_VS_REFERENCE[tdtype]


def test_the_op_takes_one_w8a8_launch_for_small_models_and_for_decode():
    def qw(n, k, group_size=None):
        return QuantizedWeight(torch.empty(n, k, dtype=torch.int8), torch.empty(n), group_size)

    small, large, larger = qw(3072, 768), qw(16384, 4096), qw(16384, 8192)
    assert fused_w8a8_applies(FUSED_W8A8_SMALL_MAX_M, 768, small, small)
    assert not fused_w8a8_applies(FUSED_W8A8_SMALL_MAX_M + 1, 768, small, small)
    assert fused_w8a8_applies(1, 4096, large, large) and fused_w8a8_applies(FUSED_W8A8_MAX_M, 4096, large, large)
    assert not fused_w8a8_applies(FUSED_W8A8_MAX_M + 1, 4096, large, large)
    assert not fused_w8a8_applies(1, 8192, larger, larger)
    assert not fused_w8a8_applies(1, 768, qw(3072, 768, 128), small)
    assert small.data.numel() <= FUSED_MAX_WEIGHT < large.data.numel() <= FUSED_W8A8_MAX_WEIGHT < larger.data.numel()
    # between the two sizes, only where the pinned config keeps every SM streaming weights
    assert not fused_w8a8_applies(1, 2048, qw(8192, 2048), qw(2048, 8192))  # 64 units a GEMM
    assert fused_w8a8_applies(1, 5120, qw(12800, 5120), qw(5120, 12800))  # 100 and 160
    # the layout does not matter: d_ff is the weight's size over d_model
    assert fused_w8a8_applies(1, 4096, qw(4096, 16384), qw(16384, 4096))
    # static as dynamic; group (128-deep K steps) only for small weights, where it was timed ahead
    assert fused_w8a8_applies(1, 768, small, small, "static") and fused_w8a8_applies(FUSED_W8A8_MAX_M, 4096, large, large, "static")
    assert fused_w8a8_applies(FUSED_W8A8_SMALL_MAX_M, 768, small, small, "group")
    assert not fused_w8a8_applies(FUSED_W8A8_SMALL_MAX_M + 1, 768, small, small, "group")
    assert not fused_w8a8_applies(1, 4096, large, large, "group")
    assert not fused_w8a8_applies(1, 768, small, small, "per-tensor")


@pytest.mark.parametrize("scheme,dtype", [("dynamic", "fp16"), ("static", "bf16"), ("group:64", "bf16")])
def test_the_op_runs_w8a8_in_one_launch_with_the_separate_launches_answer(monkeypatch, scheme, dtype):
    # every activation scheme (FUSED_W8A8_OP_SCHEMES) at a small model's size
    tdtype = FLOAT[dtype]
    x = randn(2, 5, 48, dtype=tdtype)
    weights = int8_mlp(48, 80, tdtype, "w8a8", x=x, smooth=True)
    op = FusedMLP(MLPConfig(dtype="w8a8", activation_dtype=dtype, activations=scheme, backend="triton"), device=DEVICE)
    calls = spy_on_op(monkeypatch, "fused_w8a8_mlp")
    y = op(x, *weights)
    assert calls == [x.shape]
    monkeypatch.setattr(op_module, "fused_w8a8_applies", lambda *args: False)
    y_separate = op(x, *weights)
    assert calls == [x.shape]
    assert rel_err(y, y_separate) < TOL_VS_REFERENCE[tdtype]


def test_each_row_bucket_runs_its_one_measured_config(monkeypatch):
    # Triton's autotuner picked configs 1.2-1.45x slower than the probe's leaders (w8a8
    # decode at 4096x16384: 75-79 us against 57-60): each bucket runs its measured config
    monkeypatch.setattr(fused_module, "interpreting", lambda: False)
    config_for = fused_module._config_for
    tables = {
        "float": (fused_module.FUSED_CONFIGS, None),
        "w8a8": (fused_module.FUSED_W8A8_CONFIGS, fused_module.FUSED_W8A8_LARGE_CONFIGS),
        "w8a16": (fused_module.FUSED_W8A16_CONFIGS, fused_module.FUSED_W8A16_LARGE_CONFIGS),
    }
    for name, (table, large) in tables.items():
        for m, bucket in ((1, 16), (16, 16), (17, 32), (100, 128), (128, 128), (129, 256), (1024, 1024)):
            assert config_for(m, 768, 3072, table, large) is table[min(bucket, max(table))], (name, m)
        if large is not None:  # above FUSED_MAX_WEIGHT, the large-weight configs' buckets
            for m, bucket in ((1, 16), (16, 16), (17, 32), (64, 64)):
                want = large[bucket] if bucket in large else table[bucket]
                assert config_for(m, 4096, 16384, table, large) is want, (name, m)
    # w8a16 has large-weight configs up to 64 rows, w8a8 for decode only
    assert sorted(fused_module.FUSED_W8A16_LARGE_CONFIGS) == [16, 32, 64]
    assert sorted(fused_module.FUSED_W8A8_LARGE_CONFIGS) == [16]
    # the float MLP has no large-weight decode config: 4096x16384 is not its size
    assert config_for(1, 4096, 16384, *tables["float"]) is fused_module.FUSED_CONFIGS[16]


def test_the_dispatcher_runs_the_bucket_config(monkeypatch):
    # the autotuner is only a dispatcher: its pruner keeps exactly the bucket's config
    monkeypatch.setattr(fused_module, "interpreting", lambda: False)
    table, large = fused_module.FUSED_W8A8_CONFIGS, fused_module.FUSED_W8A8_LARGE_CONFIGS
    configs = [c for t in (table, large) for c in t.values()]
    prune = fused_module._pruner(table, large)
    assert prune(configs, {"M": 16, "D": 4096, "F": 16384}) == [large[16]]
    assert prune(configs, {"M": 100, "D": 768, "F": 3072}) == [table[128]]


# ---------------------------------------------------------------------------------------
# w8a16 in one launch
# ---------------------------------------------------------------------------------------


def check_w8a16(x, q1, b1, q2, b2, gelu="erf", layout="out_in"):
    y = fused_w8a16_mlp(x, q1, b1, q2, b2, activation=gelu, weight_layout=layout)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = w8a16_mlp_reference(x, q1, b1, q2, b2, gelu_flavour=gelu, weight_layout=layout)
    assert rel_err(y, ref) < TOL_W8A16_VS_REFERENCE[x.dtype]
    assert rel_err(y, float64_mlp(x, q1, b1, q2, b2, gelu, layout)) < TOL_W8A16_VS_FLOAT64[x.dtype]
    return y


# per channel, and a group size for each branch of the per-group dequantization under the
# interpreter's BLOCK_K = 32: 32 (a tile inside one group), 16 (two whole groups a tile),
# 24 (neither divides: a gather); each shape's last group is short somewhere
W8A16_CASES = [(torch.float16, None), (torch.bfloat16, None), (torch.bfloat16, 32), (torch.float16, 16),
               (torch.float16, 24)]  # fmt: skip


@pytest.mark.parametrize("dtype,group_size", W8A16_CASES)
@pytest.mark.parametrize("m,d,f", SHAPES)
def test_fused_w8a16_matches_the_reference_and_float64(dtype, group_size, m, d, f):
    torch.manual_seed(m * 1000 + d + f + (group_size or 0))
    q1, b1, q2, b2 = int8_mlp(d, f, dtype, "w8a16", group_size=group_size)
    fused_w8a16_mlp(randn(m, d, dtype=dtype), q1, b1, q2, b2)  # sizes the workspace, to poison it
    poison_workspace(dtype)
    check_w8a16(randn(m, d, dtype=dtype), q1, b1, q2, b2)


@pytest.mark.parametrize("gelu", ["erf", "tanh", "quick"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias2", [True, False])
def test_fused_w8a16_every_gelu_layout_and_bias(gelu, layout, bias2):
    torch.manual_seed(13)
    x = randn(3, 7, 40, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(40, 96, torch.float16, "w8a16", layout=layout, group_size=32, bias2=bias2)
    check_w8a16(x, q1, b1, q2, b2, gelu=gelu, layout=layout)
    check_w8a16(x, q1, None, q2, b2, gelu=gelu, layout=layout)


def test_fused_w8a16_takes_strided_rows_and_leaves_the_workspace_at_rest():
    torch.manual_seed(14)
    q1, b1, q2, b2 = int8_mlp(40, 64, torch.bfloat16, "w8a16", group_size=16)
    for m in (20, 3, 20):
        check_w8a16(randn(m, 80, dtype=torch.bfloat16)[:, ::2], q1, b1, q2, b2)  # strides (80, 2)
    assert_workspace_at_rest(torch.bfloat16)


@pytest.mark.parametrize(
    "case,message",
    [
        ("float_weight", "w2 must be a QuantizedWeight"),
        ("mixed_granularity", "one granularity in one launch; got group:32 and per-channel"),
        ("smooth", "w1 carries a SmoothQuant smooth_scale, which only w8a8 applies"),
        ("scale_shape", r"w2 has group scales \(group_size 32 over K=80\): scale must have shape \(48, 3\)"),
        ("w2_shape", "w2 must map d_ff=80 to d_model=48"),
        ("fp32_input", "w8a16 input dtype must be fp16 or bf16"),
    ],
)
def test_fused_w8a16_rejects_bad_operands(case, message):
    x = randn(4, 48, dtype=torch.float16)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a16", group_size=32)
    if case == "float_weight":
        q2 = q2.dequantize()
    elif case == "mixed_granularity":
        q2 = quantize_weight(q2.dequantize())
    elif case == "smooth":
        q1.smooth_scale = torch.ones(48, device=DEVICE)
    elif case == "scale_shape":
        q2 = QuantizedWeight(q2.data, q2.scale[:, :2].contiguous(), 32)
    elif case == "w2_shape":
        q2 = QuantizedWeight(q2.data[:, :64], q2.scale[:, :2].contiguous(), 32)
    elif case == "fp32_input":
        x = x.float()
    with pytest.raises(LaunchError, match=message):
        fused_w8a16_mlp(x, q1, b1, q2, b2)


def test_the_op_takes_one_w8a16_launch_for_small_models_and_for_decode():
    def qw(n, k, group_size=128):
        return QuantizedWeight(torch.empty(n, k, dtype=torch.int8), torch.empty(n), group_size)

    small, large = qw(3072, 768), qw(16384, 4096)
    assert fused_w8a16_applies(FUSED_W8A16_SMALL_MAX_M, 768, small, small)
    assert not fused_w8a16_applies(FUSED_W8A16_SMALL_MAX_M + 1, 768, small, small)
    assert FUSED_W8A16_MAX_M == 64 and FUSED_W8A8_MAX_M == 16
    assert fused_w8a16_applies(1, 4096, large, large) and fused_w8a16_applies(FUSED_W8A16_MAX_M, 4096, large, large)
    assert not fused_w8a16_applies(FUSED_W8A16_MAX_M + 1, 4096, large, large)
    assert not fused_w8a16_applies(1, 2048, qw(8192, 2048), qw(2048, 8192))  # too few units, as w8a8
    assert not fused_w8a16_applies(1, 768, qw(3072, 768, None), small)  # one granularity for both
    assert fused_w8a16_applies(1, 768, qw(3072, 768, None), qw(768, 3072, None))


def test_the_op_runs_w8a16_in_one_launch_with_the_two_launches_answer(monkeypatch):
    torch.manual_seed(15)
    x = randn(2, 5, 48, dtype=torch.bfloat16)
    weights = int8_mlp(48, 80, torch.bfloat16, "w8a16", group_size=16)
    op = FusedMLP(MLPConfig(dtype="w8a16", activation_dtype="bf16", backend="triton"), device=DEVICE)
    calls = spy_on_op(monkeypatch, "fused_w8a16_mlp")
    y = op(x, *weights)
    assert calls == [x.shape]
    monkeypatch.setattr(op_module, "fused_w8a16_applies", lambda *args: False)
    y_two = op(x, *weights)
    assert calls == [x.shape]
    assert rel_err(y, y_two) < TOL_W8A16_VS_REFERENCE[torch.bfloat16]


# ---------------------------------------------------------------------------------------
# GPU: the sizes the fused launch is for
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("d,f", [(768, 3072), (384, 1536), (1024, 4096)])
@pytest.mark.parametrize("m", [1, 16, 33, 64, 100, 128, 256, 700, 1024])
def test_fused_mlp_real_sizes(dtype, d, f, m):
    torch.manual_seed(m + d)
    tdtype = FLOAT[dtype]
    w1, b1, w2, b2 = weights(d, f, tdtype)
    fused_mlp(randn(m, d, dtype=tdtype), w1, b1, w2, b2)
    poison_workspace(tdtype)
    for _ in range(3):  # a fresh input each launch: counters and partials reused
        check(randn(m, d, dtype=tdtype), w1, b1, w2, b2, gelu="tanh")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 256, 1024])
def test_fused_mlp_fp32_real_sizes(m):
    # fp32 runs the 16-bit tables' configs: each within the shared memory a program gets
    # (bench/compile_check.py fused checks the size), here on the GPU
    torch.manual_seed(m + 3)
    w1, b1, w2, b2 = weights(768, 3072, torch.float32)
    check(randn(m, 768, dtype=torch.float32), w1, b1, w2, b2, gelu="tanh")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize(
    "d,f,m",
    [(768, 3072, 1), (768, 3072, 16), (768, 3072, 64), (768, 3072, 128), (384, 1536, 33), (1024, 4096, 100),
     (4096, 16384, 1), (4096, 16384, 16)],
)  # fmt: skip
def test_fused_w8a8_real_sizes(dtype, d, f, m):
    torch.manual_seed(m + d + 1)
    tdtype = FLOAT[dtype]
    q1, b1, q2, b2 = int8_mlp(d, f, tdtype, "w8a8", x=randn(m, d, dtype=tdtype), smooth=True)
    fused_w8a8_mlp(randn(m, d, dtype=tdtype), q1, b1, q2, b2)
    poison_workspace(tdtype)
    for _ in range(3):  # a fresh input each launch: counters, partials and absmax reused
        check_w8a8(randn(m, d, dtype=tdtype), q1, b1, q2, b2, gelu="tanh")
    assert_workspace_at_rest(tdtype)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["static", "group:128", "group:32"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("d,f,m", [(768, 3072, 1), (768, 3072, 33), (768, 3072, 128), (384, 1536, 16), (4096, 16384, 1),
                                   (4096, 16384, 16)])  # fmt: skip
def test_fused_w8a8_static_and_group_real_sizes(scheme, dtype, d, f, m):
    torch.manual_seed(m + d + 4)
    tdtype = FLOAT[dtype]
    # static's scales calibrated on more rows than a launch takes, as a real calibration set
    q1, b1, q2, b2 = int8_mlp(d, f, tdtype, "w8a8", x=randn(256, d, dtype=tdtype), smooth=True)
    fused_w8a8_mlp(randn(m, d, dtype=tdtype), q1, b1, q2, b2, activations=scheme)
    poison_workspace(torch.int8)
    for _ in range(3):  # a fresh input each launch: counters, partials and group scales reused
        check_w8a8(randn(m, d, dtype=tdtype), q1, b1, q2, b2, gelu="tanh", activations=scheme)
    assert_workspace_at_rest(torch.int8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("group_size", [128, None])
@pytest.mark.parametrize(
    "d,f,m",
    [(768, 3072, 1), (768, 3072, 16), (768, 3072, 64), (768, 3072, 128), (384, 1536, 33), (4096, 16384, 16),
     (4096, 16384, 24), (4096, 16384, 64)],
)  # fmt: skip
def test_fused_w8a16_real_sizes(dtype, group_size, d, f, m):
    torch.manual_seed(m + d + 2)
    tdtype = FLOAT[dtype]
    q1, b1, q2, b2 = int8_mlp(d, f, tdtype, "w8a16", group_size=group_size)
    fused_w8a16_mlp(randn(m, d, dtype=tdtype), q1, b1, q2, b2)
    poison_workspace(tdtype)
    # erf at 4096x16384: the GELU whose libdevice version made the decode config spill
    gelu = "erf" if d == 4096 else "tanh"
    for _ in range(3):  # a fresh input each launch: counters and partials reused
        check_w8a16(randn(m, d, dtype=tdtype), q1, b1, q2, b2, gelu=gelu)
    assert_workspace_at_rest(tdtype)
