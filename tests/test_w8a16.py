"""kernels/w8a16.py: int8 weights, fp16/bf16 activations, against the step-by-step
reference (kernels/reference.py's w8a16_linear_reference) and the float64 GEMM on the
dequantized weight.

On CPU these run in Triton's interpreter on small odd shapes, with group sizes that hit
each per-group branch of the kernel (see DTYPE_GROUPS), partial last groups included. bf16
under the interpreter: the launcher sets DOT_F32, as for the float kernels
(tests/test_gemm.py), so the interpreter's broken bf16 dot is replaced by a float32 dot
on the very values the GPU's bf16 tiles hold, and INTERPRETER, which rounds to nearest
before the interpreter's truncating float32 -> bf16 casts; the bf16 path then matches
its reference as the GPU's does. The GPU tests at real sizes are in
tests/test_op_int8.py (whole MLP).
"""

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, TOL_W8A16_VS_FLOAT64, TOL_W8A16_VS_REFERENCE, on_paths, poisoned, randn, rel_err
from int8_helpers import random_quantized_weight
from kernels.errors import LaunchError
from kernels.quantized import QuantizedWeight
from kernels import int8_gemm
from kernels.reference import linear_reference, w8a16_group_weight, w8a16_linear_reference
from kernels.w8a16 import w8a16_linear

# (leading dims, K, N): M=1, M=37 (> 16), batch dims; K and N multiples of no block size.
STRIDED_SHAPES = [((1,), 70, 45), ((37,), 70, 45), ((2, 3), 33, 100), ((19,), 130, 7)]
# TMA needs 16-byte rows: K and N multiples of 16 for int8, still not of the 32 blocks.
# The last two split K under the interpreter (fewer tiles than its 4 programs).
TMA_SHAPES = [((1,), 80, 48), ((37,), 80, 48), ((2, 21), 144, 112), ((3,), 528, 48), ((2,), 1040, 16)]
# Decode (M <= 16, TMA, swap-AB): K = 272 gives the interpreter's 4 "SMs" a split-K of 2.
DECODE_SHAPES = [((1,), 80, 48), ((16,), 80, 48), ((2, 3), 272, 48), ((5,), 272, 112)]
# (activation dtype, group size): per-channel, and one group size per branch of the
# kernel's per-group dequantization under the interpreter's BLOCK_K = 32: 32 (each tile
# inside one group), 16 (two whole groups per tile), 24 (neither divides: a gather).
DTYPE_GROUPS = [
    (torch.float16, None), (torch.bfloat16, None), (torch.bfloat16, 32), (torch.float16, 16), (torch.float16, 24)
]


def check_w8a16(out, x, qw, b, activation, layout):
    """The kernel's output against the step-by-step reference and float64."""
    exact = linear_reference(
        x.double(), qw.dequantize(layout, torch.float64), None if b is None else b.double(),
        activation=activation, weight_layout=layout,
    )  # fmt: skip
    ref = w8a16_linear_reference(x, qw, b, activation=activation, weight_layout=layout)
    assert out.shape == exact.shape and out.dtype == x.dtype
    assert rel_err(out, ref) < TOL_W8A16_VS_REFERENCE[x.dtype]
    assert rel_err(out, exact) < TOL_W8A16_VS_FLOAT64[x.dtype]


def run_case(path, lead, k, n, dtype, layout, group_size, activation, with_bias=True):
    x = randn(*lead, k, dtype=dtype)
    qw = random_quantized_weight(k, n, group_size, layout)
    b = randn(n, dtype=dtype) if with_bias else None
    out = poisoned((*lead, n), dtype)
    got = w8a16_linear(x, qw, b, activation=activation, weight_layout=layout, path=path, out=out)
    assert got.data_ptr() == out.data_ptr()
    check_w8a16(out, x, qw, b, activation, layout)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype,group_size", DTYPE_GROUPS, ids=str)
@pytest.mark.parametrize("lead,k,n", STRIDED_SHAPES)
def test_strided_kernel(lead, k, n, dtype, layout, group_size):
    run_case("strided", lead, k, n, dtype, layout, group_size, "erf")


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype,group_size", DTYPE_GROUPS, ids=str)
@pytest.mark.parametrize("lead,k,n", TMA_SHAPES)
@pytest.mark.tma
def test_tma_kernel(lead, k, n, dtype, layout, group_size):
    run_case("tma", lead, k, n, dtype, layout, group_size, "tanh")


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype,group_size", DTYPE_GROUPS, ids=str)
@pytest.mark.parametrize("lead,k,n", DECODE_SHAPES)
@pytest.mark.tma
def test_decode_kernel(lead, k, n, dtype, layout, group_size):
    run_case("decode", lead, k, n, dtype, layout, group_size, "erf")


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("path", on_paths(["strided", "tma", "decode"]))
def test_group_dequantized_tile_is_the_reference_bit_for_bit(path, dtype, layout):
    # One-hot rows of x pick rows of W^T out exactly (one non-zero product, float32
    # accumulation, a value already in x's dtype), so each output row is the kernel's
    # dequantized weight: it must equal w8a16_group_weight, the reference's definition
    # (fp16: the scale rounded to fp16 and an fp16 multiply; bf16: a float32 multiply).
    k, n, g, m = 64, 48, 16, 16 if path == "decode" else 40
    qw = random_quantized_weight(k, n, g, layout)
    picks = torch.randint(0, k, (m,))
    x = torch.zeros(m, k, dtype=dtype, device=DEVICE)
    x[torch.arange(m), picks] = 1
    out = w8a16_linear(x, qw, None, weight_layout=layout, path=path)
    tile = w8a16_group_weight(qw, dtype, layout)  # [N, K]
    assert torch.equal(out, tile[:, picks.to(DEVICE)].t())
    if dtype == torch.float16:
        # the definition is not the float32 one: on these scales the two differ somewhere
        q = qw.dequantize(layout).t() if layout == "in_out" else qw.dequantize(layout)
        assert not torch.equal(tile, q.half())
    if path == "tma" and not HAS_CUDA:
        # the interpreter runs w8a16's swap-AB schedule on the TMA path
        assert int8_gemm._int8_weight_tma_kernel.best_config.kwargs.get("SWAP_AB")


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("activation", ["none", "erf", "tanh"])
@pytest.mark.parametrize("path,m", [("strided", 37), ("auto", 37), ("auto", 3)])
def test_activations_and_bias(path, m, activation, with_bias):
    run_case(path, (m,), 80, 48, torch.float16, "out_in", 32, activation, with_bias)


def test_non_contiguous_input_and_weight():
    # x: every other column of a wider tensor; the int8 weight: a transposed view.
    k, n, m = 40, 24, 19
    x = randn(m, 2 * k, dtype=torch.float16)[:, ::2]
    qw = random_quantized_weight(k, n, None, "in_out")
    view = QuantizedWeight(qw.data.t(), qw.scale)  # [N, K] with stride (1, N), read as out_in
    b = randn(n, dtype=torch.float16)
    out = poisoned((m, n), torch.float16)
    w8a16_linear(x, view, b, activation="erf", out=out)
    check_w8a16(out, x, view, b, "erf", "out_in")


def test_launcher_rejects_bad_operands_before_launch():
    x = randn(4, 64, dtype=torch.float16)
    qw = random_quantized_weight(64, 16)
    with pytest.raises(LaunchError, match="fp16 or bf16"):
        w8a16_linear(x.float(), qw)
    with pytest.raises(LaunchError, match="QuantizedWeight"):
        w8a16_linear(x, qw.data)
    with pytest.raises(LaunchError, match="last dim is 63"):
        w8a16_linear(x[:, :63], qw)
    with pytest.raises(LaunchError, match=r"scale must have shape \(16,\)"):
        w8a16_linear(x, QuantizedWeight(qw.data, qw.scale[:15]))
    with pytest.raises(LaunchError, match=r"scale must have shape \(16, 3\)"):
        w8a16_linear(x, QuantizedWeight(qw.data, torch.ones(16, 2, device=DEVICE), group_size=24))
    with pytest.raises(LaunchError, match="positive int"):
        w8a16_linear(x, QuantizedWeight(qw.data, torch.ones(16, 1, device=DEVICE), group_size=0))
    with pytest.raises(LaunchError, match="smooth_scale"):
        w8a16_linear(x, QuantizedWeight(qw.data, qw.scale, smooth_scale=torch.ones(64, device=DEVICE)))
    with pytest.raises(LaunchError, match="bias must have shape"):
        w8a16_linear(x, qw, randn(17, dtype=torch.float16))
    with pytest.raises(LaunchError, match="activation"):
        w8a16_linear(x, qw, activation="relu")
    with pytest.raises(LaunchError, match="out must be"):
        w8a16_linear(x, qw, out=poisoned((4, 16), torch.bfloat16))
    with pytest.raises(LaunchError, match="tma path needs TMA"):
        w8a16_linear(randn(20, 40, dtype=torch.float16), random_quantized_weight(40, 16), path="tma")
    with pytest.raises(LaunchError, match="decode path takes at most 16 rows"):
        w8a16_linear(randn(17, 64, dtype=torch.float16), qw, path="decode")
    with pytest.raises(LaunchError, match="path must be"):
        w8a16_linear(x, qw, path="fast")


def test_empty_rows_launch_nothing():
    assert w8a16_linear(randn(0, 32, dtype=torch.float16), random_quantized_weight(32, 16)).shape == (0, 16)


@pytest.mark.parametrize("m", [1, 37])
def test_repeated_calls_read_their_own_inputs(m):
    # A repeated call signature launches its cached plan directly (kernels/gemm_base.py's
    # GemmLauncher, as for float): every call must still read the tensors it is given.
    for _ in range(3):
        run_case("auto", (m,), 64, 48, torch.float16, "out_in", None, "erf")
