"""kernels/w8a8.py: activation quantization (static, per token, per token group) and the
int8 x int8 GEMMs (per-token, static and per-group input scales; static and per-group
requantized outputs), checked exactly against the step-by-step reference
(kernels/reference.py), and against float64.

The reference computes the same function with the same float32 operations in the same
order, so the int8 results must match it: x's quantization bit for bit, GEMM1's
requantized int8 output to within 1 at a tiny fraction of elements (a float32 op-order
difference, an fma or another erf, can move a value across a rounding tie). GEMM2's
float output is then compared with the dtype's reference tolerance.

On CPU these run in Triton's interpreter (int8 tl.dot is right there); GPU tests at
real sizes are marked `gpu` and print one `GPU-ERR` line per case.
"""

import math

import pytest
import torch

from conftest import DEVICE, SCALE_RTOL, TOL_VS_FLOAT64, TOL_VS_REFERENCE, TOL_W8A8_VS_FLOAT64, on_paths, poisoned, randn, rel_err
from int8_helpers import assert_int8_matches, calibrate, quantize_weight, random_quantized_weight
from kernels.errors import LaunchError
from kernels.reference import (
    linear_reference,
    mlp_reference,
    quantize_activation_reference,
    w8a8_linear_reference,
)
from kernels.w8a8 import quantize_activations, w8a8_linear

# (leading dims, K, N): M=1, M=37 (> 16), batch dims; odd K and N.
STRIDED_SHAPES = [((1,), 70, 45), ((37,), 70, 45), ((2, 3), 33, 100)]
# TMA: int8 rows of 16-byte multiples (K, N multiples of 16), not of the 32 blocks.
# The last two split K under the interpreter (fewer tiles than its 4 programs).
TMA_SHAPES = [((1,), 80, 48), ((37,), 80, 48), ((2, 21), 144, 112), ((3,), 528, 48), ((2,), 1040, 16)]
# Decode (M <= 16): K = 272 splits K in two under the interpreter.
DECODE_SHAPES = [((1,), 80, 48), ((16,), 80, 48), ((2, 3), 272, 48), ((5,), 272, 112)]


def scalar(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=DEVICE)


# ---------------------------------------------------------------------------------------
# Activation quantization
# ---------------------------------------------------------------------------------------


def group_of(mode: str) -> int | None:
    """"group:32" -> 32; None for the other modes."""
    return int(mode.split(":")[1]) if mode.startswith("group:") else None


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("mode", ["dynamic", "static", "group:32", "group:64"])
@pytest.mark.parametrize(
    "lead,k,dtype", [((1,), 70, torch.float16), ((37,), 70, torch.bfloat16), ((2, 3), 33, torch.float32)], ids=str
)
def test_quantize_matches_reference_exactly(lead, k, dtype, mode, smooth):
    # k = 70, 33: the last group is short (6 of 32, 33 of 64 columns)
    x = randn(*lead, k, dtype=dtype, scale=3.0)
    x.view(-1, k)[0, :] = 0  # an all-zero row: finite, non-zero scale; all zeros out
    smooth_scale = (torch.rand(k) + 0.5).to(DEVICE) if smooth else None
    static = scalar(0.05) if mode == "static" else None
    group = group_of(mode)
    out = poisoned((*lead, k), torch.int8)
    q, scale = quantize_activations(x, static, smooth_scale=smooth_scale, group_size=group, out=out)
    q_ref, scale_ref = quantize_activation_reference(x, static, smooth_scale, group_size=group)
    assert q.data_ptr() == out.data_ptr()
    assert torch.equal(q, q_ref)
    assert torch.equal(scale, scale_ref)
    if mode != "static":
        assert scale.shape == (lead if group is None else (*lead, -(-k // group))) and scale.dtype == torch.float32
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert (q.view(-1, k)[0] == 0).all()
        # every other row (group) uses the full range: its absmax maps to +-127
        rows = q.view(-1, k)[1:].abs()
        if group is None:
            assert (rows.amax(dim=-1) == 127).all()
        else:
            for g0 in range(0, k, group):
                assert (rows[:, g0 : g0 + group].amax(dim=-1) == 127).all()


def test_repeated_calls_reuse_the_plan_with_each_calls_own_tensors():
    # a repeated call signature skips the checks (kernels/w8a8.py's plan): each call must
    # still quantize its own x with its own scale and smoothing, into its own output, and
    # calls of one x shape with another scheme or smoothing must not take its plan
    k = 70
    calls = [(mode, smooth) for _ in range(2) for mode in ("dynamic", "static", "group:32") for smooth in (False, True)]
    for i, (mode, smooth) in enumerate(calls):
        group = group_of(mode)
        x = randn(2, 5, k, dtype=torch.float16, scale=1.0 + i)
        static = scalar(0.05 * (i + 1)) if mode == "static" else None
        smooth_scale = (torch.rand(k) + 0.5).to(DEVICE) if smooth else None
        out = poisoned((2, 5, k), torch.int8) if i == 3 else None  # a caller's own output, once
        q, scale = quantize_activations(x, static, smooth_scale=smooth_scale, group_size=group, out=out)
        q_ref, scale_ref = quantize_activation_reference(x, static, smooth_scale, group_size=group)
        assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref), (i, mode, smooth)
        assert out is None or q.data_ptr() == out.data_ptr()


def test_rounding_is_half_to_even_and_clamped():
    # With scale 1, q = round_half_even(clamp(x)): the magic-number rounding must give
    # the ties to even, keep non-ties, and clamp beyond +-127.
    x = torch.tensor(
        [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.4999998, 3.5000002, 126.5, 127.49, 127.5, 300.0, -126.5, -1000.0],
        device=DEVICE,
    )
    want = [0, 2, 2, 0, -2, -2, 3, 4, 126, 127, 127, 127, -126, -127]
    q, _ = quantize_activations(x[None, :], scalar(1.0))
    assert q[0].tolist() == want


# ---------------------------------------------------------------------------------------
# The GEMMs
# ---------------------------------------------------------------------------------------


def gemm_operands(lead, k, n, layout, x_scale_kind):
    """x_scale_kind: "per-token", "static" or "group:G" (per token per G columns)."""
    x = randn(*lead, k, scale=2.0)
    static = scalar(0.04) if x_scale_kind == "static" else None
    xq, x_scale = quantize_activation_reference(x, static, group_size=group_of(x_scale_kind))
    qw = random_quantized_weight(k, n, None, layout)
    return xq, x_scale, qw, randn(n, dtype=torch.float16, scale=0.5)


def dequantized_input(xq, x_scale, group):
    """xq * its scale in float64 (per token, one, or per token group)."""
    if group is not None:
        return xq.double() * x_scale.double().repeat_interleave(group, dim=-1)[..., : xq.shape[-1]]
    return xq.double() * (x_scale.double() if x_scale.numel() == 1 else x_scale.double()[..., None])



def run_gemm1(path, lead, k, n, layout, activation, x_scale_kind, output="static"):
    """GEMM1: int8 in, bias, GELU, requantized int8 out (with one static scale, or per
    "group:G" of columns with scales the kernel writes), against the reference."""
    xq, x_scale, qw, b = gemm_operands(lead, k, n, layout, x_scale_kind)
    kw = dict(activation=activation, weight_layout=layout, input_group_size=group_of(x_scale_kind))
    out = poisoned((*lead, n), torch.int8)
    if output == "static":
        ref_float = w8a8_linear_reference(xq, x_scale, qw, b, out_dtype=torch.float32, **kw)
        output_scale = ref_float.abs().amax() / 100  # some values clamp at +-127
        h = w8a8_linear(xq, x_scale, qw, b, output_scale=output_scale, path=path, out=out, **kw)
        ref = w8a8_linear_reference(xq, x_scale, qw, b, output_scale=output_scale, **kw)
    else:
        g = group_of(output)
        h, h_scale = w8a8_linear(xq, x_scale, qw, b, output_group_size=g, path=path, out=out, **kw)
        ref, ref_scale = w8a8_linear_reference(xq, x_scale, qw, b, output_group_size=g, **kw)
        assert h_scale.shape == ref_scale.shape == (*lead, -(-n // g))
        torch.testing.assert_close(h_scale, ref_scale, rtol=SCALE_RTOL, atol=0)
        # each (row, group of g columns) uses the full range: its absmax maps to +-127
        groups = torch.nn.functional.pad(h.reshape(-1, n).abs(), (0, -n % g)).reshape(-1, -(-n // g), g)
        assert (groups.amax(dim=-1) == 127).all()
    assert h.data_ptr() == out.data_ptr()
    assert_int8_matches(h, ref)


def run_gemm2(path, lead, k, n, layout, out_dtype, x_scale_kind):
    """GEMM2: int8 in, dequantized, bias, out in a float dtype."""
    xq, x_scale, qw, b = gemm_operands(lead, k, n, layout, x_scale_kind)
    group = group_of(x_scale_kind)
    out = poisoned((*lead, n), out_dtype)
    w8a8_linear(xq, x_scale, qw, b, weight_layout=layout, out_dtype=out_dtype, input_group_size=group, path=path, out=out)
    ref = w8a8_linear_reference(xq, x_scale, qw, b, weight_layout=layout, out_dtype=out_dtype, input_group_size=group)
    x_deq = dequantized_input(xq, x_scale, group)
    exact = linear_reference(x_deq, qw.dequantize(layout, torch.float64), b.double(), weight_layout=layout)
    assert rel_err(out, ref) < TOL_VS_REFERENCE[out_dtype]
    assert rel_err(out, exact) < TOL_VS_FLOAT64[out_dtype]


@pytest.mark.parametrize("activation,x_scale_kind", [("erf", "per-token"), ("tanh", "static")])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("lead,k,n", STRIDED_SHAPES)
def test_gemm1_requantized_strided(lead, k, n, layout, activation, x_scale_kind):
    run_gemm1("strided", lead, k, n, layout, activation, x_scale_kind)


@pytest.mark.parametrize("x_scale_kind", ["per-token", "static"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("path,lead,k,n", [("tma", *s) for s in TMA_SHAPES] + [("decode", *s) for s in DECODE_SHAPES])
@pytest.mark.tma
def test_gemm1_requantized_tma_and_decode(path, lead, k, n, layout, x_scale_kind):
    run_gemm1(path, lead, k, n, layout, "erf", x_scale_kind)


@pytest.mark.parametrize("layout,out_dtype", [("out_in", torch.float16), ("in_out", torch.bfloat16)], ids=str)
@pytest.mark.parametrize(
    "path,lead,k,n",
    on_paths([("strided", *s) for s in STRIDED_SHAPES] + [("tma", *s) for s in TMA_SHAPES] + [("decode", *s) for s in DECODE_SHAPES]),
)
def test_gemm2_dequantized(path, lead, k, n, layout, out_dtype):
    run_gemm2(path, lead, k, n, layout, out_dtype, "per-token" if len(lead) == 1 else "static")


ALL_PATHS = on_paths([("strided", *s) for s in STRIDED_SHAPES] + [("tma", *s) for s in TMA_SHAPES] + [("decode", *s) for s in DECODE_SHAPES])


@pytest.mark.parametrize("layout,group", [("out_in", 32), ("in_out", 32), ("out_in", 64)])
@pytest.mark.parametrize("path,lead,k,n", ALL_PATHS)
def test_gemm1_per_group_in_and_out(path, lead, k, n, layout, group):
    # group:G's GEMM1: x's scales per (row, G columns) promoted per K tile; GELU's output
    # requantized per (row, G columns), the kernel writing those scales (N = 45, 48, 100,
    # 112: short last groups; TMA edge tiles whose second epilogue half lies past N).
    run_gemm1(path, lead, k, n, layout, "erf", f"group:{group}", output=f"group:{group}")


@pytest.mark.parametrize("layout,group,out_dtype", [("out_in", 32, torch.float16), ("in_out", 32, torch.bfloat16), ("out_in", 64, torch.float16)], ids=str)
@pytest.mark.parametrize("path,lead,k,n", ALL_PATHS)
def test_gemm2_per_group_input(path, lead, k, n, layout, group, out_dtype):
    run_gemm2(path, lead, k, n, layout, out_dtype, f"group:{group}")


@pytest.mark.parametrize("m", [1, 37])
def test_repeated_calls_read_their_own_inputs(m):
    # A repeated call signature launches its cached plan directly (kernels/gemm_base.py's
    # GemmLauncher): every call must still read its own input, scales and output scale.
    for _ in range(3):
        run_gemm1("auto", (m,), 64, 48, "out_in", "erf", "per-token")
        run_gemm1("auto", (m,), 64, 48, "out_in", "erf", "group:32", output="group:32")
        run_gemm2("auto", (m,), 64, 48, "in_out", torch.bfloat16, "static")
        run_gemm2("auto", (m,), 64, 48, "in_out", torch.bfloat16, "group:32")


def test_intermediate_is_int8_in_memory():
    # GEMM1's output buffer, what GEMM2 reads: int8, one byte per element.
    m, k, f = 37, 80, 112
    xq, x_scale, qw, b = gemm_operands((m,), k, f, "out_in", "per-token")
    h = w8a8_linear(xq, x_scale, qw, b, activation="erf", output_scale=scalar(0.02))
    assert h.dtype == torch.int8 and h.shape == (m, f)
    assert h.element_size() * h.numel() == m * f  # 4144 bytes; fp16 would take 8288
    print(f"w8a8 intermediate: {h.dtype} {tuple(h.shape)}, {h.element_size() * h.numel()} bytes")


def test_launcher_rejects_bad_operands_before_launch():
    xq, x_scale, qw, b = gemm_operands((4,), 64, 16, "out_in", "per-token")
    with pytest.raises(LaunchError, match="must be int8"):
        w8a8_linear(xq.half(), x_scale, qw)
    with pytest.raises(LaunchError, match="per-channel weight scales only"):
        w8a8_linear(xq, x_scale, random_quantized_weight(64, 16, group_size=32))
    with pytest.raises(LaunchError, match="QuantizedWeight"):
        w8a8_linear(xq, x_scale, qw.data)
    with pytest.raises(LaunchError, match="one scale per token"):
        w8a8_linear(xq, x_scale[:3], qw)
    with pytest.raises(LaunchError, match="x_scale must be a float32"):
        w8a8_linear(xq, x_scale.double(), qw)
    with pytest.raises(LaunchError, match="output_scale must be float32"):
        w8a8_linear(xq, x_scale, qw, output_scale=torch.tensor(0.1, dtype=torch.float64, device=DEVICE))
    with pytest.raises(LaunchError, match="output_scale must be a one-element"):
        w8a8_linear(xq, x_scale, qw, output_scale=torch.ones(2, device=DEVICE))
    with pytest.raises(LaunchError, match="out_dtype"):
        w8a8_linear(xq, x_scale, qw, out_dtype=torch.int8)
    with pytest.raises(LaunchError, match="last dim is 63"):
        w8a8_linear(xq[:, :63], x_scale, qw)
    with pytest.raises(LaunchError, match="tma path needs TMA"):
        w8a8_linear(xq[:, :40], x_scale, random_quantized_weight(40, 16), path="tma")
    with pytest.raises(LaunchError, match="one scale per token per 32 columns"):
        w8a8_linear(xq, x_scale, qw, input_group_size=32)
    with pytest.raises(LaunchError, match="group:48 is not supported"):
        w8a8_linear(xq, x_scale, qw, output_group_size=48)
    with pytest.raises(LaunchError, match="not both"):
        w8a8_linear(xq, x_scale, qw, output_scale=scalar(0.1), output_group_size=32)
    x = randn(4, 64, dtype=torch.float16)
    with pytest.raises(LaunchError, match="smooth_scale must be"):
        quantize_activations(x, smooth_scale=torch.ones(63, device=DEVICE))
    with pytest.raises(LaunchError, match="static input scale must be a one-element"):
        quantize_activations(x, torch.ones(2, device=DEVICE))
    with pytest.raises(LaunchError, match="fp16, bf16 or fp32"):
        quantize_activations(x.to(torch.int32))
    with pytest.raises(LaunchError, match="group:16 is not supported"):
        quantize_activations(x, group_size=16)
    with pytest.raises(LaunchError, match="group_size is for dynamic scales"):
        quantize_activations(x, scalar(0.1), group_size=32)


# ---------------------------------------------------------------------------------------
# GPU: real sizes
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 128, 2048])
@pytest.mark.parametrize(
    "dtype,mode,layout",
    [(torch.float16, "dynamic", "out_in"), (torch.bfloat16, "static+smooth", "in_out"),
     (torch.float16, "group:128", "out_in"), (torch.bfloat16, "group:128+smooth", "in_out")],
    ids=str,
)  # fmt: skip
@pytest.mark.parametrize("d,f", [(768, 3072), (4096, 16384)])
def test_w8a8_steps_real_sizes(d, f, dtype, mode, layout, m, record_property):
    # Each step against the reference, on the same inputs: x's quantization exactly,
    # GEMM1's int8 intermediate to within the tie flips (dynamic: its 16-bit output to the
    # dtype's tolerance, then the row quantizer exactly), GEMM2's output to the tolerance.
    gelu_flavour = "erf"
    x = randn(m, d, dtype=dtype)
    smooth = (torch.rand(d, device=DEVICE) + 0.5) if "smooth" in mode else None
    w1 = quantize_weight(randn(f, d, scale=1 / math.sqrt(d)), None, layout)
    w2 = quantize_weight(randn(d, f, scale=1 / math.sqrt(f)), None, layout)
    b1, b2 = randn(f, dtype=dtype, scale=0.5), randn(d, dtype=dtype, scale=0.5)
    input_scale, output_scale = calibrate(x, w1, b1, gelu_flavour, smooth, layout)
    static = input_scale if "static" in mode else None
    group = group_of(mode.split("+")[0])
    kw = dict(activation=gelu_flavour, weight_layout=layout, input_group_size=group)

    xq, x_scale = quantize_activations(x, static, smooth_scale=smooth, group_size=group)
    xq_ref, x_scale_ref = quantize_activation_reference(x, static, smooth, group_size=group)
    x_exact = torch.equal(xq, xq_ref) and torch.equal(x_scale, x_scale_ref)
    h16_err, hq_exact = None, True
    if "static" in mode:
        h = w8a8_linear(xq, x_scale, w1, b1, output_scale=output_scale, **kw)
        h_ref = w8a8_linear_reference(xq, x_scale, w1, b1, output_scale=output_scale, **kw)
        gemm2_scale = output_scale
    elif group is not None:
        h, h_scale = w8a8_linear(xq, x_scale, w1, b1, output_group_size=group, **kw)
        h_ref, gemm2_scale = w8a8_linear_reference(xq, x_scale, w1, b1, output_group_size=group, **kw)
        torch.testing.assert_close(h_scale, gemm2_scale, rtol=SCALE_RTOL, atol=0)
    else:
        h16 = w8a8_linear(xq, x_scale, w1, b1, out_dtype=dtype, **kw)
        h16_ref = w8a8_linear_reference(xq, x_scale, w1, b1, out_dtype=dtype, **kw)
        h16_err = rel_err(h16, h16_ref)
        h, _ = quantize_activations(h16_ref)
        h_ref, gemm2_scale = quantize_activation_reference(h16_ref)
        hq_exact = torch.equal(h, h_ref)
    flips = (h != h_ref).sum().item()
    y = w8a8_linear(h_ref, gemm2_scale, w2, b2, weight_layout=layout, out_dtype=dtype, input_group_size=group)
    y_ref = w8a8_linear_reference(h_ref, gemm2_scale, w2, b2, weight_layout=layout, out_dtype=dtype, input_group_size=group)
    xs = x.double() if smooth is None else x.double() / smooth.double()
    exact = mlp_reference(
        xs, w1.dequantize(layout, torch.float64), b1.double(), w2.dequantize(layout, torch.float64), b2.double(),
        gelu_flavour=gelu_flavour, weight_layout=layout,
    )  # fmt: skip
    err_ref, err64 = rel_err(y, y_ref), rel_err(y, exact)
    print(
        f"GPU-ERR w8a8-steps d={d} f={f} dtype={str(dtype)[6:]} {mode} {layout} M={m} x_exact={x_exact} "
        f"h_flips={flips}/{h.numel()} h_maxdiff={(h.int() - h_ref.int()).abs().max().item()} h16_vs_ref={h16_err} "
        f"y_vs_ref={err_ref:.3e} y_vs_float64={err64:.3e} h_bytes={h.element_size() * h.numel()} ({h.dtype})"
    )
    record_property("h_tie_flips", flips)
    record_property("rel_err_vs_reference", err_ref)
    record_property("rel_err_vs_float64", err64)
    assert x_exact and hq_exact
    assert h16_err is None or h16_err < TOL_VS_REFERENCE[dtype]
    assert_int8_matches(h, h_ref)
    assert err_ref < TOL_VS_REFERENCE[dtype]
    assert err64 < TOL_W8A8_VS_FLOAT64
