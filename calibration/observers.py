"""Observers: the clipping threshold an activation's static int8 scale maps to 127.

The method names are the same in the CLI (`--method`), the JSON report and the file
metadata:

    max           the absolute maximum of the calibration data
    percentile:P  the P-th percentile of |x| (nearest rank), 0 < P <= 100
    mse           the threshold that minimises the mean squared quantization error of
                  the data: a grid search over MSE_GRID clip ratios of the absmax
"""

from __future__ import annotations

import math

import torch

from calibration.errors import OptionError
from kernels.int8 import fake_quantize, scale_from_absmax

METHODS = ("max", "percentile:P", "mse")
MSE_GRID = 100
# The MSE search scores each candidate on at most this many evenly strided elements, so
# its cost stays flat in the token count; the absmax is still taken over all of them.
MSE_SAMPLE = 1 << 20


def parse_method(method: str) -> str:
    """Check a method name; returns it canonical ("percentile:99.9")."""
    if method in ("max", "mse"):
        return method
    name, _, value = method.partition(":")
    if name == "percentile":
        try:
            p = float(value)
        except ValueError:
            p = math.nan
        if 0 < p <= 100:
            return f"percentile:{p:g}"
        raise OptionError(f"--method percentile:P needs 0 < P <= 100; got {method!r}")
    raise OptionError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")


def _percentile_absmax(a: torch.Tensor, p: float) -> float:
    # kthvalue, not torch.quantile, which refuses inputs over 2^24 elements.
    # Rounded before the ceiling: 99.9 / 100 * 20000 is 19980.000000000004 in floating point.
    k = max(1, math.ceil(round(p / 100 * a.numel(), 6)))
    return a.kthvalue(k).values.item()


def _mse_absmax(a: torch.Tensor) -> float:
    absmax = a.max().item()
    if absmax == 0:
        return 0.0
    sample = a[:: max(1, a.numel() // MSE_SAMPLE)]
    best, best_err = absmax, math.inf
    for i in range(1, MSE_GRID + 1):
        clip = absmax * i / MSE_GRID
        err = (fake_quantize(sample, scale_from_absmax(torch.tensor(clip))) - sample).square().mean().item()
        if err < best_err:
            best, best_err = clip, err
    return best


def clip_threshold(x: torch.Tensor, method: str) -> float:
    """The |x| value the int8 scale maps to 127, chosen by `method` over all of x."""
    a = x.detach().to(torch.float32).abs().flatten()
    method = parse_method(method)
    if method == "max":
        return a.max().item()
    if method == "mse":
        return _mse_absmax(a)
    return _percentile_absmax(a, float(method.partition(":")[2]))


def activation_scale(x: torch.Tensor, method: str) -> torch.Tensor:
    """A static per-tensor int8 scale for x: a float32 scalar."""
    return scale_from_absmax(torch.tensor(clip_threshold(x, method)))
