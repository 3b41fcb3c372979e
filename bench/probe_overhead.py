"""Where does a small launch's time go? Host-side cost per call (768x3072, M=1: the GPU waits
on the host) of torch's eager MLP, the op for each dtype and int8 scheme, and the launchers
under it, then a cProfile of the fp16 op. (Kernel-development probe; `gelugemm bench` is the
user-facing benchmark.) The launcher's pieces were timed here in session 2 (bench/RESULTS.md
section 3); that part went when its hand-built kernel arguments fell behind the kernels'."""

import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

from kernels import gemm
from kernels.fused_mlp import fused_w8a8_mlp
from kernels.w8a8 import quantize_activations, w8a8_linear
from kernels.w8a16 import w8a16_linear
from kernels.op import FusedMLP, MLPConfig


def per_call_us(fn, n=3000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    d, f = 768, 3072
    x = torch.randn(1, d, device="cuda", dtype=torch.float16)
    w1 = torch.randn(f, d, device="cuda", dtype=torch.float16)
    b1 = torch.randn(f, device="cuda", dtype=torch.float16)
    w2 = torch.randn(d, f, device="cuda", dtype=torch.float16)
    op = FusedMLP(MLPConfig(), device="cuda")
    op(x, w1, b1, w2, None)
    rows = []

    def row(name, fn):
        rows.append((name, per_call_us(fn)))

    row("torch.empty(1, f)", lambda: torch.empty(1, f, device="cuda", dtype=torch.float16))
    row("F.linear", lambda: F.linear(x, w1, b1))
    row("eager MLP (3 torch ops)", lambda: F.linear(F.gelu(F.linear(x, w1, b1)), w2))
    row("FusedMLP fp16", lambda: op(x, w1, b1, w2, None))
    from kernels.int8 import quantize_weight

    q1, q2 = quantize_weight(w1.float()), quantize_weight(w2.float())
    q1.input_scale = torch.tensor([0.02], device="cuda")
    q1.output_scale = torch.tensor([0.05], device="cuda")
    for scheme, activations in (("w8a16", "dynamic"), ("w8a8", "dynamic"), ("w8a8", "group:128"), ("w8a8", "static")):
        int8_op = FusedMLP(MLPConfig(dtype=scheme, activations=activations), device="cuda")
        int8_op(x, q1, b1, q2, None)
        label = scheme if scheme == "w8a16" else f"{scheme} {activations}"
        row(f"FusedMLP {label}", lambda int8_op=int8_op: int8_op(x, q1, b1, q2, None))
    # static with w2.input_scale its own copy of w1.output_scale, as calibration writes it:
    # the op compares the two once per operand set (a host sync), not every call
    from kernels.quantized import QuantizedWeight

    q2_copy = QuantizedWeight(q2.data, q2.scale, input_scale=q1.output_scale.clone())
    static_op = FusedMLP(MLPConfig(dtype="w8a8", activations="static"), device="cuda")
    static_op(x, q1, b1, q2_copy, None)
    row("FusedMLP w8a8 static, w2.input_scale copy", lambda: static_op(x, q1, b1, q2_copy, None))
    # the one launch of every w8a8 scheme, called directly (the op sends the schemes in
    # kernels/fused_mlp.py's FUSED_W8A8_OP_SCHEMES there, group only for small weights)
    for activations in ("static", "group:128"):
        fused_w8a8_mlp(x, q1, b1, q2, None, activations=activations)
        row(f"fused_w8a8_mlp {activations}", lambda a=activations: fused_w8a8_mlp(x, q1, b1, q2, None, activations=a))
    row("gemm_bias_act decode", lambda: gemm.gemm_bias_act(x, w1, b1, activation="erf"))
    row("gemm_bias_act strided", lambda: gemm.gemm_bias_act(x, w1, b1, activation="erf", path="strided"))
    # the TMA kernel (its descriptors made on the device, or on the host with
    # GELUGEMM_HOST_DESCRIPTORS=1: Triton then encodes them at every launch)
    x128 = torch.randn(128, d, device="cuda", dtype=torch.float16)
    row("gemm_bias_act tma, 128 rows", lambda: gemm.gemm_bias_act(x128, w1, b1, activation="erf", path="tma"))
    row("w8a16_linear decode", lambda: w8a16_linear(x, q1, b1, activation="erf"))
    xq, x_scale = quantize_activations(x)
    row("quantize_activations (per token)", lambda: quantize_activations(x))
    row("w8a8_linear decode, int8 out", lambda: w8a8_linear(xq, x_scale, q1, b1, activation="erf", output_scale=q1.output_scale))

    print(f"{'host cost per call, 768x3072 M=1 fp16':40s} {'us':>8s}")
    for name, us in rows:
        print(f"{name:40s} {us:8.1f}", flush=True)
    print()

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(1000):
        op(x, w1, b1, w2, None)
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
