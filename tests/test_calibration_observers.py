"""calibration/observers.py and calibration/smooth.py: activation clipping and SmoothQuant."""

import pytest
import torch

from calibration.errors import OptionError
from calibration.observers import activation_scale, clip_threshold, parse_method
from kernels.int8 import INT8_MAX, fake_quantize, scale_from_absmax
from calibration.smooth import fold_into_weight, smooth_scale


def heavy_tailed(n=20_000) -> torch.Tensor:
    # Student-t with 2 degrees of freedom: a few values far out, the bulk near 0, like
    # the outlier channels of real transformer activations.
    return torch.distributions.StudentT(2.0).sample((n,))


def quant_mse(x: torch.Tensor, clip: float) -> float:
    return (fake_quantize(x, scale_from_absmax(torch.tensor(clip))) - x).square().mean().item()


def test_max_is_the_absmax():
    x = torch.randn(64, 32)
    x[5, 7] = -9.5
    assert clip_threshold(x, "max") == 9.5
    torch.testing.assert_close(activation_scale(x, "max"), torch.tensor(9.5 / INT8_MAX))
    assert activation_scale(x, "max").dtype == torch.float32 and activation_scale(x, "max").dim() == 0


def test_percentile_clips_the_tail_of_heavy_tailed_data():
    x = heavy_tailed()
    p999 = clip_threshold(x, "percentile:99.9")
    assert p999 < clip_threshold(x, "max")
    # Nearest rank: at least 99.9% of |x| is at or below it, and less than that is below.
    a = x.abs()
    assert (a <= p999).float().mean() >= 0.999 > (a < p999).float().mean()
    assert clip_threshold(x, "percentile:100") == clip_threshold(x, "max")


def test_mse_clip_beats_max_on_heavy_tails_and_is_the_grid_minimum():
    x = heavy_tailed()
    clip = clip_threshold(x, "mse")
    absmax = x.abs().max().item()
    assert 0 < clip <= absmax
    assert quant_mse(x, clip) < quant_mse(x, absmax)
    # No clip ratio on a finer grid does much better than the one chosen.
    finer = min(quant_mse(x, absmax * r / 400) for r in range(1, 401))
    assert quant_mse(x, clip) <= finer * 1.05


def test_mse_keeps_the_absmax_where_nothing_is_an_outlier():
    x = torch.linspace(-1, 1, 4001)  # uniform: clipping only adds error
    assert clip_threshold(x, "mse") == pytest.approx(1.0, rel=0.02)


def test_all_zero_activations_give_a_finite_scale():
    for method in ("max", "percentile:99", "mse"):
        scale = activation_scale(torch.zeros(8, 4), method)
        assert torch.isfinite(scale) and scale > 0


@pytest.mark.parametrize("method,canonical", [("max", "max"), ("mse", "mse"), ("percentile:99.90", "percentile:99.9")])
def test_method_names(method, canonical):
    assert parse_method(method) == canonical


@pytest.mark.parametrize("method", ["minmax", "percentile", "percentile:0", "percentile:101", "percentile:abc", "mse:3"])
def test_unknown_methods_are_option_errors(method):
    with pytest.raises(OptionError, match="--method"):
        parse_method(method)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_smoothing_folds_exactly(layout):
    x = torch.randn(32, 16, dtype=torch.float64) * torch.logspace(-1, 2, 16, dtype=torch.float64)
    w_nk = torch.randn(24, 16, dtype=torch.float64)
    w = w_nk if layout == "out_in" else w_nk.t()
    s = smooth_scale(x, w, 0.5, layout).double()
    w_s = fold_into_weight(w.double(), s, layout).double()
    w_s_nk = w_s if layout == "out_in" else w_s.t()
    torch.testing.assert_close((x / s) @ w_s_nk.t(), x @ w_nk.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [0.25, 0.5, 0.8])
def test_smoothing_migrates_by_alpha(alpha):
    # With a = max|x_j|, w = max|W[:, j]|: a/s = (a w)^(1-alpha) and w*s = (a w)^alpha.
    x = torch.randn(64, 8) * torch.tensor([0.1, 1, 3, 10, 30, 100, 0.5, 2])
    w = torch.randn(12, 8)
    s = smooth_scale(x, w, alpha)
    a, wmax = x.abs().amax(0), w.abs().amax(0)
    torch.testing.assert_close((x / s).abs().amax(0), (a * wmax) ** (1 - alpha), rtol=1e-4, atol=0)
    torch.testing.assert_close(fold_into_weight(w, s).abs().amax(0), (a * wmax) ** alpha, rtol=1e-4, atol=0)


def test_smoothing_survives_zero_channels():
    x = torch.randn(16, 4)
    x[:, 1] = 0
    w = torch.randn(8, 4)
    w[:, 2] = 0
    s = smooth_scale(x, w, 0.5)
    assert torch.isfinite(s).all() and (s > 0).all()


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_outside_0_1_is_an_option_error(alpha):
    with pytest.raises(OptionError, match="--smooth"):
        smooth_scale(torch.randn(4, 4), torch.randn(4, 4), alpha)
