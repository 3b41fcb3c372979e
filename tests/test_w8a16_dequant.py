"""w8a16's large-M schedule (kernels/dequant.py, w8a16_linear's "dequant" path): the
per-group weight dequantized in memory is the in-loop tile's value bit for bit, and the
float GEMM on it matches the w8a16 reference; "auto" takes it from W8A16_DEQUANT_MIN_M rows."""

import math

import pytest
import torch

from conftest import DEVICE, TOL_VS_FLOAT64, TOL_VS_REFERENCE, poisoned, randn, rel_err
from kernels import w8a16 as w8a16_module
from kernels.dequant import dequantize_group_weight
from kernels.errors import LaunchError
from kernels.gated import gate_and_up
from kernels.int8 import quantize_weight
from kernels.reference import linear_reference, w8a16_group_weight, w8a16_linear_reference
from kernels.w8a16 import w8a16_linear

DTYPES = [torch.float16, torch.bfloat16]


def group_weight(k, n, group_size, layout):
    w = randn(n, k, scale=1 / math.sqrt(k))
    stored = w if layout == "out_in" else w.t().contiguous()
    qw = quantize_weight(stored.cpu(), weight_layout=layout, group_size=group_size)
    qw.data, qw.scale = qw.data.to(DEVICE), qw.scale.to(DEVICE)
    return qw


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n,group_size", [(64, 48, 16), (70, 300, 32), (96, 40, 24)])
def test_dequantized_weight_is_the_in_loop_tile(k, n, group_size, dtype, layout):
    # (70, 32): a short last group; n = 300 spans two column blocks of the kernel
    qw = group_weight(k, n, group_size, layout)
    got = dequantize_group_weight(qw, dtype, layout)
    want = w8a16_group_weight(qw, dtype, layout)  # [N, K]
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(got, want if layout == "out_in" else want.t())


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(37,), (2, 9)])
def test_dequant_path_matches_the_reference_and_float64(lead, dtype, layout):
    k, n, g = 80, 48, 16
    x = randn(*lead, k, dtype=dtype)
    qw = group_weight(k, n, g, layout)
    b = randn(n, dtype=dtype)
    out = poisoned((*lead, n), dtype)
    got = w8a16_linear(x, qw, b, activation="tanh", weight_layout=layout, path="dequant", out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = w8a16_linear_reference(x, qw, b, activation="tanh", weight_layout=layout)
    exact = linear_reference(x.double(), qw.dequantize(layout, torch.float64), b.double(), activation="tanh",
                             weight_layout=layout)  # fmt: skip
    assert rel_err(out, ref) < TOL_VS_REFERENCE[dtype]
    assert rel_err(out, exact) < TOL_VS_FLOAT64[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_dequant_path_matches_the_reference(dtype):
    k, n, g = 64, 40, 32
    x = randn(21, k, dtype=dtype)
    gate, up = group_weight(k, n, g, "out_in"), group_weight(k, n, g, "out_in")
    bg, bu = randn(n, dtype=dtype), randn(n, dtype=dtype)
    got = w8a16_linear(x, gate, bg, activation="tanh", path="dequant", up=up, up_bias=bu)
    ref = w8a16_linear_reference(x, gate, bg, activation="tanh", up=up, up_bias=bu)
    assert rel_err(got, ref) < TOL_VS_REFERENCE[dtype]


def test_auto_takes_the_dequant_path_from_its_threshold(monkeypatch):
    k, n, g = 64, 48, 16
    qw = group_weight(k, n, g, "out_in")
    monkeypatch.setattr(w8a16_module, "W8A16_DEQUANT_MIN_M", 8)
    calls = []
    real = w8a16_module.dequantize_group_weight
    monkeypatch.setattr(w8a16_module, "dequantize_group_weight", lambda *a: calls.append(1) or real(*a))
    for m, expect_dequant in [(7, False), (8, True), (40, True)]:
        calls.clear()
        x = randn(m, k, dtype=torch.float16)
        auto = w8a16_linear(x, qw, None, activation="erf")
        assert bool(calls) == expect_dequant, m
        if expect_dequant:
            assert torch.equal(auto, w8a16_linear(x, qw, None, activation="erf", path="dequant"))
    # per-channel weights keep the in-loop schedule at any M
    calls.clear()
    pc = quantize_weight(randn(n, k).cpu(), group_size=None)
    pc.data, pc.scale = pc.data.to(DEVICE), pc.scale.to(DEVICE)
    w8a16_linear(randn(40, k, dtype=torch.float16), pc, None)
    assert not calls


def test_dequant_path_rejects_bad_operands():
    k, n = 64, 48
    x = randn(37, k, dtype=torch.float16)
    pc = quantize_weight(randn(n, k).cpu(), group_size=None)
    pc.data, pc.scale = pc.data.to(DEVICE), pc.scale.to(DEVICE)
    with pytest.raises(LaunchError, match="per-group"):
        w8a16_linear(x, pc, None, path="dequant")
    qw = group_weight(k, n, 16, "out_in")
    with pytest.raises(LaunchError, match="fp16 or bf16"):
        w8a16_linear(x.float(), qw, None, path="dequant")
    bad = group_weight(k, n, 16, "out_in")
    bad.scale = bad.scale[:, :-1]
    with pytest.raises(LaunchError, match="scale must have shape"):
        w8a16_linear(x, bad, None, path="dequant")
    with pytest.raises(LaunchError, match="fp16 or bf16"):
        dequantize_group_weight(qw, torch.float32)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_concatenated_gated_weight_dequantizes_each_half_in_place(layout):
    # ModernBERT's Wi: one [2n, k] weight whose halves are views (strided for in_out)
    k, n, g = 64, 40, 16
    x = randn(33, k, dtype=torch.float16)
    wi = group_weight(k, 2 * n, g, layout)
    b = randn(2 * n, dtype=torch.float16)
    gate, b_gate, up, b_up = gate_and_up(wi, b, None, None, layout)
    got = w8a16_linear(x, gate, b_gate, activation="tanh", weight_layout=layout, path="dequant", up=up, up_bias=b_up)
    ref = w8a16_linear_reference(x, gate, b_gate, activation="tanh", weight_layout=layout, up=up, up_bias=b_up)
    assert rel_err(got, ref) < TOL_VS_REFERENCE[torch.float16]
    for half in (gate, up):
        want = w8a16_group_weight(half, torch.float16, layout)
        assert torch.equal(dequantize_group_weight(half, torch.float16, layout), want if layout == "out_in" else want.t())
