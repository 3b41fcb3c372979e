"""Descriptors made on the host for the TMA kernel (kernels/gemm_base.py's HOST_DESCRIPTORS).

Off by default until a GPU has timed it (bench/RESULTS.md section 22). With it on, a TMA call
passes its operands as TensorDescriptors instead of making them on the device; the kernel body
and its arithmetic are the same, so every result must equal the device-made descriptors' bit
for bit: float (both layouts, bias and GELU, split-K), gated, w8a16 (the swapped schedule
under the interpreter) and w8a8 (int8 in and out, per-group scales). fp32 keeps the device's
descriptors; warp-specialized configs are never tuned with host descriptors. On the GPU the
second call of a signature launches the kept compiled kernel directly (kernels/launch.py),
whose descriptors the launcher encodes with the compiled block shapes.
"""

import math

import pytest
import torch

from conftest import DEVICE, TOL_VS_FLOAT64, rel_err, randn
from int8_helpers import random_quantized_weight
from kernels import gemm, gemm_base, int8_gemm
from kernels.gemm import gemm_bias_act
from kernels.gemm_base import TensorDescriptor, host_block_shapes
from kernels.reference import linear_reference
from kernels.w8a16 import w8a16_linear
from kernels.w8a8 import quantize_activations, w8a8_linear

pytestmark = pytest.mark.tma

# (rows, K, N): one tile, several in each dim, and fewer output tiles than the interpreter's
# 4 programs with K long enough to split (serial split-K)
SHAPES = [(37, 72, 40), (70, 136, 56), (3, 528, 40)]


def on_and_off(monkeypatch, call):
    """call() with device-made descriptors, then twice with host ones (the second through
    the kept plan), each from fresh plans; returns (device result, [host results])."""
    def fresh_plans():  # the flag is read when a signature's plan is made
        monkeypatch.setattr(gemm._GEMM, "plans", {})
        monkeypatch.setattr(int8_gemm._GEMM, "plans", {})

    fresh_plans()
    monkeypatch.setattr(gemm_base, "HOST_DESCRIPTORS", False)  # (whatever the environment says)
    device = call()
    assert all(not p.constexprs["HOST_DESC"] for p in gemm._GEMM.plans.values() if p.path == "tma")
    fresh_plans()
    monkeypatch.setattr(gemm_base, "HOST_DESCRIPTORS", True)
    host = [call(), call()]
    plans = [p for launcher in (gemm._GEMM, int8_gemm._GEMM) for p in launcher.plans.values() if p.path == "tma"]
    assert plans and all(p.constexprs["HOST_DESC"] for p in plans)
    return device, host


def assert_same(device, host):
    for out in host:
        assert out.dtype == device.dtype and out.shape == device.shape
        assert torch.equal(out, device)


@pytest.mark.parametrize("activation", ["none", "erf"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_float_tma_calls_give_the_device_descriptors_answer(monkeypatch, m, k, n, dtype, layout, activation):
    x = randn(m, k, dtype=dtype)
    w = randn(n, k, dtype=dtype, scale=1 / math.sqrt(k))
    w = w if layout == "out_in" else w.t().contiguous()
    b = randn(n, dtype=dtype)
    device, host = on_and_off(
        monkeypatch, lambda: gemm_bias_act(x, w, b, activation=activation, weight_layout=layout, path="tma")
    )
    assert_same(device, host)
    exact = linear_reference(x.double(), w.double(), b.double(), activation=activation, weight_layout=layout)
    assert rel_err(host[-1], exact) < TOL_VS_FLOAT64[dtype]


def test_gated_tma_calls_give_the_device_descriptors_answer(monkeypatch):
    m, k, n = 37, 72, 40
    x = randn(m, k, dtype=torch.float16)
    w, w_up = (randn(n, k, dtype=torch.float16, scale=1 / math.sqrt(k)) for _ in range(2))
    b, b_up = randn(n, dtype=torch.float16), randn(n, dtype=torch.float16)
    device, host = on_and_off(
        monkeypatch, lambda: gemm_bias_act(x, w, b, activation="erf", w_up=w_up, b_up=b_up, path="tma")
    )
    assert_same(device, host)


@pytest.mark.parametrize("group_size", [None, 32])
def test_w8a16_tma_calls_give_the_device_descriptors_answer(monkeypatch, group_size):
    m, k, n = 37, 144, 64  # int8 rows: multiples of 16 elements for TMA
    x = randn(m, k, dtype=torch.float16)
    q = random_quantized_weight(k, n, group_size)
    b = randn(n, dtype=torch.float16)
    device, host = on_and_off(monkeypatch, lambda: w8a16_linear(x, q, b, activation="erf", path="tma"))
    assert_same(device, host)


@pytest.mark.parametrize("scheme", ["static", "group"])
def test_w8a8_tma_calls_give_the_device_descriptors_answer(monkeypatch, scheme):
    # int8 x, int8 weight; static: int8 out at one scale; group: per-group scales in and out
    m, k, n = 37, 128, 64
    x = randn(m, k, dtype=torch.float16)
    q = random_quantized_weight(k, n)
    b = randn(n, dtype=torch.float16)
    if scheme == "static":
        xq, x_scale = quantize_activations(x, torch.tensor([0.02], device=DEVICE))
        kwargs = dict(output_scale=torch.tensor([0.05], device=DEVICE))
    else:
        xq, x_scale = quantize_activations(x, group_size=32)
        kwargs = dict(input_group_size=32, output_group_size=32)

    def call():
        out = w8a8_linear(xq, x_scale, q, b, activation="erf", path="tma", **kwargs)
        return torch.cat([t.float().flatten() for t in out]) if isinstance(out, tuple) else out

    device, host = on_and_off(monkeypatch, call)
    assert_same(device, host)


def test_fp32_keeps_the_device_descriptors(monkeypatch):
    monkeypatch.setattr(gemm._GEMM, "plans", {})
    monkeypatch.setattr(gemm_base, "HOST_DESCRIPTORS", True)
    x, w = randn(37, 72, dtype=torch.float32), randn(40, 72, dtype=torch.float32)
    gemm_bias_act(x, w, activation="erf", path="tma")
    gemm_bias_act(x.half(), w.half(), activation="erf", path="tma")
    host_desc = {p.key[1]: p.constexprs["HOST_DESC"] for p in gemm._GEMM.plans.values()}  # a's dtype -> it
    assert host_desc[torch.float32] == "" and host_desc[torch.float16] != ""


def test_block_shapes_are_the_configs_tiles():
    a, w, c, u = (TensorDescriptor(torch.empty(64, 64), [64, 64], [64, 1], [16, 16]) for _ in range(4))
    nargs = dict(a_ptr=a, b_ptr=w, c_ptr=c, u_ptr=u, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, B_IS_NK=True,
                 EPILOGUE_SUBTILE=True)  # fmt: skip
    host_block_shapes(nargs)
    assert (a.block_shape, w.block_shape, u.block_shape, c.block_shape) == ([128, 64], [256, 64], [256, 64], [128, 128])
    host_block_shapes(dict(nargs, B_IS_NK=False, EPILOGUE_SUBTILE=False, u_ptr=None))
    assert (w.block_shape, c.block_shape) == ([64, 256], [128, 256])


def test_host_descriptors_never_tune_a_warp_specialized_config(monkeypatch):
    # triton 3.6 rejects a warp-specialized loop's split stores to a host descriptor
    # (bench/compile_check.py host); the large float table holds one
    monkeypatch.setattr(gemm_base, "interpreting", lambda: False)
    monkeypatch.setattr(gemm_base, "autotune_enabled", lambda: True)
    tma = gemm._GEMM.kernels.tma
    configs = gemm_base._unique(c for cfgs in gemm.TMA_CONFIGS.values() for c in cfgs)  # (the GPU's list)
    a = torch.empty(4096, 4096, dtype=torch.float16)
    w = torch.empty(16384, 4096, dtype=torch.float16)
    named = dict(a_ptr=a, b_ptr=w, M_BUCKET=4096)
    plain = tma.prune(configs, named, GROUP_K=0, A_GROUP_K=0, C_GROUP_N=0, GATED=False, HOST_DESC="")
    assert any(c.kwargs.get("WARP_SPECIALIZE") for c in plain)
    descs = dict(a_ptr=TensorDescriptor(a, [4096, 4096], [4096, 1], [16, 16]),
                 b_ptr=TensorDescriptor(w, [16384, 4096], [4096, 1], [16, 16]), M_BUCKET=4096)  # fmt: skip
    host = tma.prune(configs, descs, GROUP_K=0, A_GROUP_K=0, C_GROUP_N=0, GATED=False, HOST_DESC="x")
    assert host and not any(c.kwargs.get("WARP_SPECIALIZE") for c in host)
    assert all(c.pre_hook is host_block_shapes for c in host)
    assert len(host) == len(plain) - sum(bool(c.kwargs.get("WARP_SPECIALIZE")) for c in plain)
