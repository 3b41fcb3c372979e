"""kernels/fused_mlp.py: the whole float MLP in one launch, against the torch reference and
float64; its workspace left ready for the next launch; its checks."""

import math

import pytest
import torch

import kernels.fused_mlp as fused_module
from conftest import DEVICE, TOL_TF32, TOL_VS_FLOAT64, TOL_VS_REFERENCE, randn, rel_err
from kernels.errors import LaunchError
from kernels.fused_mlp import FUSED_MAX_M, FUSED_MAX_WEIGHT, fused_mlp, fused_mlp_applies, fused_mlp_enabled
from kernels.op import FusedMLP, MLPConfig
from kernels.reference import mlp_reference

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
    # every h and partial element NaN: a tile the kernel fails to write (or reads before
    # it is written) shows in the result. (Inference mode: a workspace an earlier test
    # allocated under it is an inference tensor, which only takes writes there.)
    with torch.inference_mode():
        for (_, _, ws_dtype), (h, partial, _) in fused_module._workspaces.items():
            if ws_dtype == dtype:
                h.fill_(float("nan"))
                partial.fill_(float("nan"))


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
    for (_, _, dtype), (_, _, counters) in fused_module._workspaces.items():
        if dtype == torch.float16:
            assert int(counters.abs().sum()) == 0


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
    small = torch.empty(3072, 768)
    large = torch.empty(16384, 4096)
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


def test_op_runs_the_fused_launch_and_matches_the_reference(monkeypatch):
    # the op's triton backend at a small size goes through fused_mlp and keeps its answer
    calls = []
    real = fused_module.fused_mlp

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    import kernels.op as op_module

    monkeypatch.setattr(op_module, "fused_mlp", spy)
    torch.manual_seed(6)
    w1, b1, w2, b2 = weights(48, 80, torch.float16)
    x = randn(2, 5, 48, dtype=torch.float16)
    op = FusedMLP(MLPConfig(dtype="fp16", backend="triton"), device=DEVICE)
    y = op(x, w1, b1, w2, b2)
    assert calls == [x.shape]
    exact = mlp_reference(x, w1, b1, w2, b2, dtype=torch.float64)
    assert rel_err(y, exact) < TOL_VS_FLOAT64[torch.float16]


# ---------------------------------------------------------------------------------------
# GPU: the sizes the fused launch is for
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("d,f", [(768, 3072), (384, 1536), (1024, 4096)])
@pytest.mark.parametrize("m", [1, 16, 33, 64, 100, 128])
def test_fused_mlp_real_sizes(dtype, d, f, m):
    torch.manual_seed(m + d)
    tdtype = FLOAT[dtype]
    w1, b1, w2, b2 = weights(d, f, tdtype)
    fused_mlp(randn(m, d, dtype=tdtype), w1, b1, w2, b2)
    poison_workspace(tdtype)
    for _ in range(3):  # a fresh input each launch: counters and partials reused
        check(randn(m, d, dtype=tdtype), w1, b1, w2, b2, gelu="tanh")
