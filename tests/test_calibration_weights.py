"""kernels/int8.py and calibration/quantize_weights.py: symmetric int8 weights per channel and per group."""

import pytest
import torch

import calibration.quantize_weights as quantize_weights
from calibration.quantize_weights import WeightError, quantize_weight_blocked, weight_error
from kernels.int8 import INT8_MAX, SCALE_EPS, fake_quantize, quantize_int8, quantize_weight

# |W - q*s| <= s/2, up to the float32 rounding of W / s (values up to 127 carry an
# absolute error near 127 * 2^-24 ~ 1e-5 of a step).
HALF_STEP = 0.5 + 1e-4


def as_nk(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "out_in" else t.t()


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("group_size", [None, 8, 5])  # 5 does not divide K = 24: a short last group
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_within_half_a_step(layout, group_size, dtype):
    n, k = 12, 24
    w_nk = torch.randn(n, k) * torch.rand(n, 1).add(0.01) * 3
    w = (w_nk if layout == "out_in" else w_nk.t().contiguous()).to(dtype)
    qw = quantize_weight(w, weight_layout=layout, group_size=group_size)

    assert qw.data.dtype == torch.int8 and qw.data.shape == w.shape
    assert qw.scale.dtype == torch.float32
    groups = -(-k // group_size) if group_size else None
    assert qw.scale.shape == ((n,) if group_size is None else (n, groups))
    assert qw.granularity == ("per-channel" if group_size is None else f"group:{group_size}")
    assert qw.data.min() >= -INT8_MAX and qw.data.max() <= INT8_MAX

    # Independent dequantization: each element times the scale of its row (and group).
    data_nk, w_ref = as_nk(qw.data, layout).double(), as_nk(w, layout).double()
    step = qw.scale.double()[:, None] if group_size is None else qw.scale.double()[:, torch.arange(k) // group_size]
    assert ((w_ref - data_nk * step).abs() <= HALF_STEP * step).all()
    # The op's own dequantization (kernels/quantized.py) reads the scales the same way.
    torch.testing.assert_close(as_nk(qw.dequantize(layout), layout).double(), data_nk * step)
    err = weight_error(w, qw, layout)
    assert err["max_abs_steps"] <= HALF_STEP
    assert 0 < err["rel_frobenius"] < 0.01


@pytest.mark.parametrize("group_size", [None, 4])
def test_each_scale_puts_its_absmax_on_127(group_size):
    w = torch.randn(6, 16)
    qw = quantize_weight(w, group_size=group_size)
    if group_size is None:
        absmax = w.abs().amax(dim=1)
        q_absmax = qw.data.abs().amax(dim=1)
    else:
        absmax = w.abs().view(6, 4, 4).amax(dim=2)
        q_absmax = qw.data.abs().view(6, 4, 4).amax(dim=2)
    torch.testing.assert_close(qw.scale * INT8_MAX, absmax, rtol=1e-6, atol=0)
    assert (q_absmax == INT8_MAX).all()


def test_rounds_half_to_even():
    scale = torch.tensor(1.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 200.0, -200.0])
    assert quantize_int8(x, scale).tolist() == [0, 2, 2, 0, -2, -2, 126, 127, -127]


def test_all_zero_channel_gets_a_finite_nonzero_scale():
    w = torch.randn(4, 8)
    w[2] = 0
    for group_size in (None, 4):
        qw = quantize_weight(w, group_size=group_size)
        assert torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
        assert (qw.scale[2] == SCALE_EPS).all()
        assert (qw.data[2] == 0).all()
        assert torch.isfinite(qw.dequantize()).all() and (qw.dequantize()[2] == 0).all()
        assert weight_error(w, qw)["max_abs_steps"] <= HALF_STEP
    zero = quantize_weight(torch.zeros(3, 5))
    assert weight_error(torch.zeros(3, 5), zero) == {"rel_frobenius": 0.0, "max_abs_steps": 0.0}


def test_weight_error_sees_a_wrong_scale():
    w = torch.randn(8, 32)
    qw = quantize_weight(w)
    qw.scale[3] *= 4  # what a tampered file would hold
    assert weight_error(w, qw)["max_abs_steps"] > 1


def test_fake_quantize_clips_to_the_range():
    scale = torch.tensor(0.1)
    out = fake_quantize(torch.tensor([100.0, -100.0, 0.04, 0.06]), scale)
    torch.testing.assert_close(out, torch.tensor([12.7, -12.7, 0.0, 0.1]))


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("group_size", [None, 8, 5])  # 5 does not divide K = 40: a short last group
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("smoothed", [False, True])
def test_blocked_quantization_is_quantize_weight_bit_for_bit(monkeypatch, layout, group_size, dtype, smoothed):
    """quantize's weights, a few rows at a time in reused buffers (blocks of 3 rows here, the
    last one short), are kernels.int8.quantize_weight's; the error measured while quantizing
    is weight_error's and the float64 one's."""
    monkeypatch.setattr(quantize_weights, "QUANTIZE_BLOCK_ELEMENTS", 3 * 40)
    n, k = 13, 40
    w_nk = torch.randn(n, k) * torch.rand(n, 1).add(0.01) * 3
    w_nk[4] = 0  # an all-zero channel
    w = (w_nk if layout == "out_in" else w_nk.t().contiguous()).to(dtype)
    multiplier = torch.rand(k) + 0.5 if smoothed else None
    error = WeightError()
    got = quantize_weight_blocked(w, weight_layout=layout, group_size=group_size, multiplier=multiplier, error=error)

    encodes = as_nk(w, layout).to(torch.float32) * (1.0 if multiplier is None else multiplier)  # what is quantized
    want = quantize_weight(encodes, group_size=group_size)
    assert torch.equal(as_nk(got.data, layout), want.data) and got.data.shape == w.shape
    assert torch.equal(got.scale, want.scale) and got.scale.shape == want.scale.shape
    assert error.to_dict() == weight_error(w, got, layout, multiplier=multiplier)
    step = got.scale.double()[:, None] if group_size is None else got.scale.double()[:, torch.arange(k) // group_size]
    diff = encodes.double() - as_nk(got.data, layout).double() * step
    measured = error.to_dict()  # float32 differences: about 1e-5 of a step (see HALF_STEP)
    assert measured["rel_frobenius"] == pytest.approx((diff.norm() / encodes.double().norm()).item(), rel=1e-4)
    assert measured["max_abs_steps"] == pytest.approx((diff.abs() / step).max().item(), abs=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("group_size", [None, 128, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantizing_on_the_gpu_gives_the_cpu_s_int8_bit_for_bit(group_size, dtype):
    """verify quantizes an original checkpoint's weights on the GPU it runs them on: the int8
    values, scales and error must be those quantize writes from the CPU (IEEE float32 on both)."""
    n, k = 8192, 3072  # two device blocks (1 << 24 elements each), 48 CPU blocks
    w = (torch.randn(n, k) * torch.rand(n, 1).add(0.01) * 0.05).to(dtype)
    w[7] = 0
    cpu_error, gpu_error = WeightError(), WeightError()
    on_cpu = quantize_weight_blocked(w, group_size=group_size, error=cpu_error)
    on_gpu = quantize_weight_blocked(w.cuda(), group_size=group_size, error=gpu_error)
    assert on_gpu.data.is_cuda and torch.equal(on_gpu.data.cpu(), on_cpu.data)
    assert torch.equal(on_gpu.scale.cpu(), on_cpu.scale)
    assert torch.equal(on_cpu.data, quantize_weight(w, group_size=group_size).data)
    assert gpu_error.to_dict()["max_abs_steps"] == pytest.approx(cpu_error.to_dict()["max_abs_steps"], abs=1e-6)
    assert gpu_error.to_dict()["rel_frobenius"] == pytest.approx(cpu_error.to_dict()["rel_frobenius"], rel=1e-6)
