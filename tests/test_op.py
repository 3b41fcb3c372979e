"""kernels/op.py: backend choice at construction, the whole MLP through each backend."""

import math

import pytest
import torch

import kernels.op as op_module
from conftest import DEVICE, HAS_CUDA, TOL_VS_FLOAT64, TOL_VS_REFERENCE, randn, rel_err
from kernels.errors import BackendUnavailable, LaunchError
from kernels.op import FusedMLP, MLPConfig
from kernels.reference import mlp_reference

FLOAT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def mlp_weights(d, f, dtype, layout="out_in", bias2=True):
    w1 = randn(f, d, dtype=dtype, scale=1 / math.sqrt(d))
    w2 = randn(d, f, dtype=dtype, scale=1 / math.sqrt(f))
    if layout == "in_out":
        w1, w2 = w1.t().contiguous(), w2.t().contiguous()
    b1 = randn(f, dtype=dtype, scale=0.5)
    b2 = randn(d, dtype=dtype, scale=0.5) if bias2 else None
    return w1, b1, w2, b2


def test_auto_picks_torch_off_cuda_and_says_why():
    op = FusedMLP(MLPConfig(), device="cpu")
    assert op.backend == "torch"
    assert "no CUDA device" in op.backend_reason


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_auto_picks_triton_on_cuda():
    assert FusedMLP(MLPConfig(), device="cuda").backend == "triton"


def test_triton_where_it_cannot_run_is_an_error(monkeypatch):
    monkeypatch.setattr(op_module, "triton_can_run", lambda device: False)
    with pytest.raises(BackendUnavailable, match="needs a CUDA device"):
        FusedMLP(MLPConfig(backend="triton"), device="cpu")


@pytest.mark.parametrize(
    "field,value", [("dtype", "fp8"), ("gelu", "relu"), ("weight_layout", "nk"), ("backend", "cuda")]
)
def test_config_rejects_unknown_values(field, value):
    with pytest.raises(LaunchError, match=field):
        MLPConfig(**{field: value})


@pytest.mark.parametrize("bias2", [True, False])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("gelu", ["erf", "tanh"])
@pytest.mark.parametrize("dtype", list(FLOAT))
def test_triton_mlp_matches_torch_backend_and_float64(dtype, gelu, layout, bias2):
    tdtype = FLOAT[dtype]
    w1, b1, w2, b2 = mlp_weights(40, 72, tdtype, layout, bias2)
    x = randn(3, 7, 40, dtype=tdtype)
    cfg = dict(dtype=dtype, gelu=gelu, weight_layout=layout)
    fused = FusedMLP(MLPConfig(backend="triton", **cfg), device=DEVICE)
    plain = FusedMLP(MLPConfig(backend="torch", **cfg), device=DEVICE)
    assert (fused.backend, plain.backend) == ("triton", "torch")
    y = fused(x, w1, b1, w2, b2)
    exact = mlp_reference(*(t.double() if t is not None else None for t in (x, w1, b1, w2, b2)), gelu_flavour=gelu, weight_layout=layout)
    assert y.shape == (3, 7, 40) and y.dtype == tdtype
    assert rel_err(y, exact) < TOL_VS_FLOAT64[tdtype]
    assert rel_err(y, plain(x, w1, b1, w2, b2)) < TOL_VS_REFERENCE[tdtype]


def test_forward_rejects_mismatched_dtype():
    w1, b1, w2, b2 = mlp_weights(16, 32, torch.float32)
    op = FusedMLP(MLPConfig(dtype="fp16", backend="torch"), device="cpu")
    with pytest.raises(LaunchError, match="configured for fp16"):
        op(randn(2, 16, device="cpu"), w1.cpu(), b1.cpu(), w2.cpu(), b2.cpu())


def bad_operands(w1, b1, w2, b2):
    """(what, forward's arguments past x, message): operands either backend must refuse."""
    x = randn(4, 16, dtype=torch.float16)
    return [  # the messages' shared words: the two backends' launchers word them their own way
        ("x one feature short", (x[:, :15], w1, b1, w2, b2), r"\b15\b.*\b16\b|\b16\b.*\b15\b"),
        ("w1 transposed", (x, w1.t().contiguous(), b1, w2, b2), r"w1.*32|32.*w1"),
        ("b1 one short", (x, w1, b1[:-1], w2, b2), r"b1 must .*\[?\(?32"),
        ("b1 of one value, which torch would broadcast", (x, w1, b1[:1], w2, b2), r"b1 must .*\[?\(?32"),
        ("b2 one short", (x, w1, b1, w2, b2[:-1]), r"b2 must .*\[?\(?16"),
        ("w2 reading another width", (x, w1, b1, torch.cat([w2, w2[:, :1]], 1), b2), r"d_ff.*32.*\(16, 33\)"),
        ("b2 a Python number", (x, w1, b1, w2, 0.5), r"b2 must be a torch\.Tensor or None, got float"),
        ("x 0-dim", (x[0, 0], w1, b1, w2, b2), r"at least one dim"),
        ("x a list", (x.tolist(), w1, b1, w2, b2), r"x must be a torch\.Tensor, got list"),
    ]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_both_backends_refuse_the_same_bad_operands_before_any_math(backend):
    """The torch backend used to take them to torch: a shape error from deep in F.linear, or
    with b1[:1] a silently broadcast bias and a wrong result."""
    w1, b1, w2, b2 = (t.to(DEVICE) for t in mlp_weights(16, 32, torch.float16))
    op = FusedMLP(MLPConfig(dtype="fp16", backend=backend), device=DEVICE)
    for what, (x, *weights), message in bad_operands(w1, b1, w2, b2):
        x = x.to(DEVICE) if isinstance(x, torch.Tensor) else x
        with pytest.raises(LaunchError, match=message):
            op(x, *weights)
            pytest.fail(what)


def test_config_and_device_mistakes_are_launch_errors():
    with pytest.raises(LaunchError, match="allow_tf32 must be True or False"):
        MLPConfig(dtype="fp32", allow_tf32="no")
    with pytest.raises(LaunchError, match="device must be a torch device"):
        FusedMLP(MLPConfig(), device="banana")
    with pytest.raises(LaunchError, match="config must be an MLPConfig"):
        FusedMLP("fp16")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 128, 2048])
@pytest.mark.parametrize("dtype", list(FLOAT))
@pytest.mark.parametrize("d,f", [(768, 3072), (4096, 16384)])
def test_whole_mlp_real_sizes(d, f, dtype, m, record_property):
    tdtype = FLOAT[dtype]
    w1, b1, w2, b2 = mlp_weights(d, f, tdtype)
    x = randn(m, d, dtype=tdtype)
    y = FusedMLP(MLPConfig(dtype=dtype, backend="triton"), device="cuda")(x, w1, b1, w2, b2)
    exact = mlp_reference(x.double(), w1.double(), b1.double(), w2.double(), b2.double())
    ref = mlp_reference(x, w1, b1, w2, b2)
    err64, err_ref = rel_err(y, exact), rel_err(y, ref)
    record_property("rel_err_vs_float64", err64)
    record_property("rel_err_vs_torch_reference", err_ref)
    assert err64 < TOL_VS_FLOAT64[tdtype]
    assert err_ref < TOL_VS_REFERENCE[tdtype]
