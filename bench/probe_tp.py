"""Tensor-parallel MLP on several GPUs of one host: gelugemm's TP op against one GPU and eager TP.

    torchrun --nproc-per-node 2 bench/probe_tp.py [--shape 14336,57344] [--tokens 2048,8192] [--dtype fp16,w8a8,w8a8-static]

Per (dtype, M), timed with CUDA events around each call after warm-up (median over ranks'
medians, the slowest rank reported), all ranks in step (a barrier before each timing):

  one GPU    gelugemm's op on rank 0 with the whole MLP (the other ranks idle)
  TP         gelugemm's TensorParallelMLP: each rank its slice of d_ff, one all-reduce
  eager TP   two cuBLAS GEMMs on the same slices (F.linear, GELU, F.linear), the all-reduce, b2

and the TP output's relative error against one GPU's (fp16) or float64 on a few rows.
The default shape is BLOOM-176B's MLP (14336 -> 57344). NVLink multicast stays off
(NCCL_NVLS_ENABLE=0 is set here too).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.int8 import quantize_weight  # noqa: E402
from kernels.module import FusedGeluMLP  # noqa: E402
from kernels.op import MLPConfig  # noqa: E402
from kernels.parallel import TensorParallelMLP, shard_mlp_weights  # noqa: E402


DEVICE = "cuda"


def median_us(fn, warmup=3, reps=10) -> float:
    for _ in range(warmup):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(reps):
        if DEVICE != "cuda":
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e6)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    ours = torch.tensor(statistics.median(times), device=DEVICE)
    dist.all_reduce(ours, op=dist.ReduceOp.MAX)  # the slowest rank's median
    return ours.item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="14336,57344")
    parser.add_argument("--tokens", default="2048,8192")
    parser.add_argument("--dtype", default="fp16,w8a8")
    parser.add_argument("--cpu", action="store_true", help="a smoke run of this script on CPU (gloo, torch backend)")
    args = parser.parse_args()
    d, f = (int(v) for v in args.shape.split(","))
    global DEVICE
    if args.cpu:
        DEVICE = "cpu"
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("nccl")
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same weights on every rank
    w1 = (torch.randn(f, d, device=DEVICE) / math.sqrt(d)).half()
    w2 = (torch.randn(d, f, device=DEVICE) / math.sqrt(f)).half()
    b1 = (torch.randn(f, device=DEVICE) * 0.5).half()
    b2 = (torch.randn(d, device=DEVICE) * 0.5).half()
    if rank == 0:
        name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
        print(f"{name} x{world} | torch {torch.__version__} | {d}x{f} | us, slowest rank's median")
        print(f"{'dtype':>6s} {'M':>6s} {'one GPU':>9s} {'TP':>9s} {'eager TP':>9s} {'TP speed-up':>11s} {'vs eager TP':>11s} {'TP err':>9s}")
    for name in args.dtype.split(","):
        # w8a8: the default (dynamic) activation scheme; w8a8-static: GELU's output
        # requantized with one calibrated scale in GEMM1's epilogue
        dtype, _, activations = name.partition("-")
        config = MLPConfig(dtype=dtype, backend="torch" if DEVICE == "cpu" else "triton", activations=activations or "dynamic")
        if dtype == "w8a8":
            q1, q2 = quantize_weight(w1.float()), quantize_weight(w2.float())
            if activations == "static":
                x_cal = torch.randn(256, d, device=DEVICE)
                q1.input_scale = (x_cal.abs().amax() / 127).reshape(())
                q1.output_scale = (F.gelu(x_cal @ w1.float().t() + b1.float()).abs().amax() / 127).reshape(())
            full_w = (q1, b1, q2)
        else:
            full_w = (w1, b1, w2)
        one = FusedGeluMLP(*full_w, b2, config) if rank == 0 else None
        shard = shard_mlp_weights(*full_w, "out_in", rank, world)
        tp = TensorParallelMLP(FusedGeluMLP(*shard, None, config), b2)
        w1_r, b1_r, w2_r = shard_mlp_weights(w1, b1, w2, "out_in", rank, world)

        def eager_tp(x):
            y = F.linear(F.gelu(F.linear(x, w1_r, b1_r)), w2_r)
            dist.all_reduce(y)
            return y + b2

        for m in (int(v) for v in args.tokens.split(",")):
            x = torch.randn(m, d, device=DEVICE).half()
            y_tp = tp(x)
            err = float("nan")
            if rank == 0:
                rows = slice(0, min(m, 64))
                exact = F.gelu(x[rows].double() @ w1.double().t() + b1.double()) @ w2.double().t() + b2.double()
                err = ((y_tp[rows].double() - exact).norm() / exact.norm()).item()
            t_one = median_us(lambda: one(x) if one is not None else None)
            t_tp = median_us(lambda: tp(x))
            t_eager = median_us(lambda: eager_tp(x))
            if rank == 0:
                print(f"{name:>6s} {m:6d} {t_one:9.0f} {t_tp:9.0f} {t_eager:9.0f} {t_one / t_tp:10.2f}x "
                      f"{t_eager / t_tp:10.2f}x {err:9.2e}", flush=True)  # fmt: skip
        del one, tp, shard
        torch.cuda.empty_cache()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
