"""SmoothQuant: move activation outliers into GEMM1's weight, per input channel j.

    s_j = max|x_j|^alpha / max|W1[:, j]|^(1 - alpha)
    x @ W1^T == (x / s) @ (W1 * s)^T

W1 is multiplied by s along K before it is quantized, and the kernel divides x by s
before quantizing it. With a = max|x_j| and w = max|W1[:, j]|, the smoothed maxima are
a / s = a^(1-alpha) w^(1-alpha) and w * s = a^alpha w^alpha: alpha = 0.5 balances them.
"""

from __future__ import annotations

import torch

from calibration.errors import OptionError
from kernels.schemes import WeightLayout

# The SmoothQuant reference clamps both maxima and s itself at 1e-5, so an all-zero
# channel of x or W1 cannot give a zero or infinite s.
_FLOOR = 1e-5


def check_alpha(alpha: float) -> float:
    if not 0.0 <= alpha <= 1.0:
        raise OptionError(f"--smooth ALPHA must be in [0, 1]; got {alpha}")
    return alpha


def input_channel_absmax(
    w1: torch.Tensor, weight_layout: str | WeightLayout = "out_in", block_elements: int = 1 << 22
) -> torch.Tensor:
    """max |W1[:, j]| over the output channels, float32 [K]; a block of rows at a time (exact:
    a maximum does not depend on the order it is taken in), so no float copy of W1 is made."""
    w_nk = WeightLayout.parse(weight_layout).as_out_in(w1)
    n, k = w_nk.shape
    rows = max(1, block_elements // max(k, 1))
    out = torch.zeros(k, dtype=torch.float32)
    for start in range(0, n, rows):
        out = torch.maximum(out, w_nk[start : start + rows].to(torch.float32).abs().amax(dim=0))
    return out


def smooth_scale(
    x: torch.Tensor,
    w1: torch.Tensor,
    alpha: float,
    weight_layout: str | WeightLayout = "out_in",
    w_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """s [K] float32 from calibration inputs x [tokens, K] and W1 in its stored layout.

    w_up: a gated MLP's up projection, which reads the same x: max|W[:, j]| is taken over
    the gate's and up's output channels together (both are multiplied by the one s)."""
    w_absmax = input_channel_absmax(w1, weight_layout)
    if w_up is not None:
        w_absmax = torch.maximum(w_absmax, input_channel_absmax(w_up, weight_layout))
    return smooth_scale_from_absmax(x, w_absmax, alpha)


def smooth_scale_from_absmax(x: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """smooth_scale from x and max|W1[:, j]| [K] (a caller reading one weight at a time
    takes the maximum over them itself)."""
    check_alpha(alpha)
    x_absmax = x.to(torch.float32).abs().amax(dim=0).clamp_min(_FLOOR)
    w_absmax = w_absmax.clamp_min(_FLOOR)
    return (x_absmax.pow(alpha) / w_absmax.pow(1 - alpha)).clamp_min(_FLOOR)


def fold_into_weight(w1: torch.Tensor, s: torch.Tensor, weight_layout: str | WeightLayout = "out_in") -> torch.Tensor:
    """W1 * s along K, in W1's layout, float32."""
    layout = WeightLayout.parse(weight_layout)
    return layout.as_out_in(layout.as_out_in(w1).to(torch.float32) * s[None, :])
