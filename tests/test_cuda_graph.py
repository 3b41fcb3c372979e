"""The op inside a CUDA graph: captured once, replayed on new inputs, it gives what a direct
call gives. Decode loops in serving stacks replay graphs; the split-K workspace, the TMA
scratch and the launch cache must all survive capture."""

import math

import pytest
import torch

from conftest import randn
from int8_helpers import int8_mlp
from kernels.op import FusedMLP, MLPConfig
from kernels.quantized import QuantizedWeight

pytestmark = pytest.mark.gpu

D, F = 256, 1024


def float_weights(dtype):
    w1 = randn(F, D, dtype=dtype, scale=1 / math.sqrt(D))
    w2 = randn(D, F, dtype=dtype, scale=1 / math.sqrt(F))
    return w1, randn(F, dtype=dtype, scale=0.5), w2, randn(D, dtype=dtype, scale=0.5)


def replayed_equals_direct(op, m, act_dtype, weights):
    x = randn(m, D, dtype=act_dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        op(x, *weights)  # compile, tune and fill the caches outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = op(x, *weights)
    for _ in range(2):  # replays on fresh inputs, copied into the captured buffer
        x.copy_(randn(m, D, dtype=act_dtype))
        graph.replay()
        torch.cuda.synchronize()
        y_direct = op(x, *weights)
        assert torch.isfinite(y_direct).all()
        assert torch.equal(y_graph, y_direct)


@pytest.mark.parametrize("m", [1, 16, 100, 2048])  # decode (split-K) and persistent TMA paths
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_float_op_replays_in_a_cuda_graph(dtype, m):
    act = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    op = FusedMLP(MLPConfig(dtype=dtype, backend="triton"), device="cuda")
    replayed_equals_direct(op, m, act, float_weights(act))


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize(
    "scheme,activations", [("w8a16", "dynamic"), ("w8a8", "dynamic"), ("w8a8", "group:128"), ("w8a8", "static")]
)
def test_int8_op_replays_in_a_cuda_graph(scheme, activations, m):
    x_cal = randn(256, D, dtype=torch.float16)
    weights = int8_mlp(D, F, torch.float16, scheme, x=x_cal)
    op = FusedMLP(MLPConfig(dtype=scheme, activations=activations, backend="triton"), device="cuda")
    replayed_equals_direct(op, m, torch.float16, weights)


@pytest.mark.parametrize("m", [1, 256])  # the one launch and the three launches
def test_static_op_replays_with_w2_input_scale_a_copy_of_w1_output_scale(m):
    # As calibration writes them (calibration/quantize_mlp.py's quantize_gemm2), w2's input
    # scale is its own tensor, equal to w1.output_scale. The op compares the two (a host
    # sync) when it first sees them, outside the capture; inside it, nothing syncs.
    q1, b1, q2, b2 = int8_mlp(D, F, torch.float16, "w8a8", x=randn(256, D, dtype=torch.float16))
    q2 = QuantizedWeight(q2.data, q2.scale, input_scale=q1.output_scale.clone())
    op = FusedMLP(MLPConfig(dtype="w8a8", activations="static", backend="triton"), device="cuda")
    replayed_equals_direct(op, m, torch.float16, (q1, b1, q2, b2))
