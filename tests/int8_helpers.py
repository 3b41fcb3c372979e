"""int8 weights and MLPs for the kernel tests (test_w8a16, test_w8a8, test_op_int8, test_gated,
test_cuda_graph): a symmetric quantizer written here, apart from the library's, absmax
calibration as a max observer would do it, and the int8 comparison that allows rounding-tie
flips.

    qw = random_quantized_weight(k=80, n=48, group_size=32)
    q1, b1, q2, b2 = int8_mlp(48, 80, torch.float16, "w8a8", x=x)  # scales calibrated on x
"""

import math

import torch
import torch.nn.functional as F

from conftest import DEVICE, MAX_TIE_FLIPS, randn
from kernels.quantized import QuantizedWeight
from kernels.reference import as_out_in, gelu, mlp_reference


def quantize_weight(w: torch.Tensor, group_size: int | None = None, layout: str = "out_in") -> QuantizedWeight:
    """Symmetric int8 of a float weight w [N, K]: scale = absmax / 127 per output channel,
    or per group of `group_size` along K; the int8 data stored in `layout`."""
    w = w.float()
    n, k = w.shape
    if group_size is None:
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127
        per_element = scale[:, None]
    else:
        groups = math.ceil(k / group_size)
        padded = F.pad(w.abs(), (0, groups * group_size - k)).reshape(n, groups, group_size)
        scale = padded.amax(dim=-1).clamp_min(1e-8) / 127
        per_element = scale.repeat_interleave(group_size, dim=1)[:, :k]
    q = torch.round(w / per_element).clamp(-127, 127).to(torch.int8)
    data = q if layout == "out_in" else q.t().contiguous()
    return QuantizedWeight(data.to(DEVICE), scale.to(DEVICE), group_size)


def random_quantized_weight(k, n, group_size=None, layout="out_in") -> QuantizedWeight:
    return quantize_weight(randn(n, k, scale=1 / math.sqrt(k)), group_size, layout)


def calibrate(x, w1, b1, gelu_flavour, smooth_scale=None, layout="out_in"):
    """(input_scale, output_scale) by absmax over this data, as a max observer would:
    x / smooth, and GELU(x @ W1^T + b1) on the dequantized weight."""
    xs = x.float() if smooth_scale is None else x.float() / smooth_scale
    h = gelu(xs @ as_out_in(w1.dequantize(layout), layout).t() + b1.float(), gelu_flavour)
    return xs.abs().amax() / 127, h.abs().amax() / 127


def assert_int8_matches(out, ref):
    """Equal except at most MAX_TIE_FLIPS of the elements, each off by 1."""
    assert out.dtype == torch.int8 and out.shape == ref.shape
    assert not (out == -128).any(), "an element was never written (the poison value is outside [-127, 127])"
    diff = (out.int() - ref.int()).abs()
    flips = (diff != 0).sum().item()
    assert diff.max().item() <= 1, f"int8 results differ by up to {diff.max().item()}"
    assert flips <= max(1, MAX_TIE_FLIPS * out.numel()), f"{flips} of {out.numel()} int8 results differ"
    return flips


def int8_mlp(d, f, act_dtype, scheme, *, layout="out_in", group_size=None, smooth=False, gelu="erf", x=None, bias2=True):
    """Quantized MLP weights, with the w8a8 scales calibrated on x."""
    w1 = randn(f, d, scale=1 / math.sqrt(d))
    w2 = randn(d, f, scale=1 / math.sqrt(f))
    smooth_scale = (torch.rand(d, device=DEVICE) + 0.5) if smooth else None
    # SmoothQuant: W1 is stored multiplied by the smoothing scale along its input dim.
    q1 = quantize_weight(w1 if smooth_scale is None else w1 * smooth_scale, group_size, layout)
    q2 = quantize_weight(w2, group_size, layout)
    b1 = randn(f, dtype=act_dtype, scale=0.5)
    b2 = randn(d, dtype=act_dtype, scale=0.5) if bias2 else None
    if scheme == "w8a8":
        q1.smooth_scale = smooth_scale
        q1.input_scale, q1.output_scale = calibrate(x, q1, b1, gelu, smooth_scale, layout)
    return q1, b1, q2, b2


def float64_mlp(x, q1, b1, q2, b2, gelu, layout):
    """The exact MLP on the dequantized weights (x divided by the smoothing scale, which
    W1 carries)."""
    xs = x.double() if q1.smooth_scale is None else x.double() / q1.smooth_scale.double()
    return mlp_reference(
        xs, q1.dequantize(layout, torch.float64), None if b1 is None else b1.double(),
        q2.dequantize(layout, torch.float64), None if b2 is None else b2.double(), gelu_flavour=gelu,
        weight_layout=layout,
    )  # fmt: skip
