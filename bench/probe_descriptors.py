"""Kernel-development probe: what making TMA descriptors on the device costs a small GEMM.

The TMA kernels (kernels/gemm_base.py, kernels/fused_mlp.py's neighbours) build their tensor
descriptors on the device (`tl.make_tensor_descriptor`): every program writes 128-byte tensor
maps to a global scratch buffer and fences them before its first load, and the TMA unit then
fetches them from memory. cuBLAS passes its descriptors as kernel parameters. At 768x3072
from 256 rows our TMA GEMMs trail cuBLAS 1.16-1.44x (bench/RESULTS.md section 20), where a
whole GEMM is 10-25 us and a fixed cost of a few microseconds would show.

This probe times one plain matmul body (c = a @ b^T, fp16, no bias or GELU; the same
persistent tile loop) three ways, as CUDA-graph replays of one call with one input set (GPU
time; the 4.7 MB weight stays in L2, as in the small-gemms probe): descriptors made on the
device, descriptors made on the host (triton.tools.tensor_descriptor.TensorDescriptor,
passed as parameters), and pointer loads; cuBLAS (F.linear) alongside.

    PYTHONPATH=. python3 bench/probe_descriptors.py [--shapes 768x3072,3072x768] [--tokens 256,512,1024]

A shape KxN is one GEMM: [M, K] @ [N, K]^T. Under TRITON_INTERPRET=1 without a GPU it runs
once on small shapes (a smoke run: no timing).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.gemm_base import _tile_coords
from kernels.launch import ensure_tma_allocator, num_programs

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the small-gemms probe's leaders at 768x3072
TILES = [(64, 128, 64, 4, 4), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 64, 128, 4, 4)]


@triton.jit
def _tile_loop(a_desc, b_desc, c_desc, M, N, K, NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, 8)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BLOCK_K)):
            a = a_desc.load([pid_m * BLOCK_M, ki * BLOCK_K])
            b = b_desc.load([pid_n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(a, b.T, acc)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(tl.float16))


@triton.jit
def device_descriptor_kernel(a_ptr, b_ptr, c_ptr, M, N, K, NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    _tile_loop(a_desc, b_desc, c_desc, M, N, K, NUM_SMS, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def host_descriptor_kernel(a_desc, b_desc, c_desc, M, N, K, NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    _tile_loop(a_desc, b_desc, c_desc, M, N, K, NUM_SMS, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def pointer_kernel(a_ptr, b_ptr, c_ptr, M, N, K, NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # the shapes are multiples of the tiles: no masks
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, 8)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(tl.cdiv(K, BLOCK_K)):
            a = tl.load(a_ptr + offs_m[:, None] * K + (ki * BLOCK_K + offs_k)[None, :])
            b = tl.load(b_ptr + offs_n[None, :] * K + (ki * BLOCK_K + offs_k)[:, None])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(tl.float16))


def launches(a: torch.Tensor, w: torch.Tensor, c: torch.Tensor, tile: tuple) -> dict:
    """{way: a call that computes c = a @ w^T with this tile}."""
    bm, bn, bk, warps, stages = tile
    m, k = a.shape
    n = w.shape[0]
    sms = num_programs(a.device)
    grid = (min(sms, triton.cdiv(m, bm) * triton.cdiv(n, bn)),)
    meta = dict(NUM_SMS=sms, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    descs = (TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk]),
             TensorDescriptor.from_tensor(c, [bm, bn]))  # fmt: skip
    return {
        "device descriptors": lambda: device_descriptor_kernel[grid](a, w, c, m, n, k, **meta),
        "host descriptors": lambda: host_descriptor_kernel[grid](*descs, m, n, k, **meta),
        "pointer loads": lambda: pointer_kernel[grid](a, w, c, m, n, k, **meta),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="768x3072,3072x768", help="KxN per GEMM")
    ap.add_argument("--tokens", default="256,512,1024")
    ap.add_argument("--warmup-ms", type=float, default=10)
    ap.add_argument("--rep-ms", type=float, default=60)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    ensure_tma_allocator()
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")] if cuda else [(128, 128)]
    tokens = [int(t) for t in args.tokens.split(",")] if cuda else [128]
    tiles = TILES if cuda else [(64, 64, 64, 4, 2)]
    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, device=dev, dtype=torch.float16) / k**0.5
        for m in tokens:
            a = torch.randn(m, k, device=dev, dtype=torch.float16)
            want = (a.float() @ w.float().t()).half()
            if cuda:
                from kernels.bench import graph_time

                us = graph_time(lambda i: F.linear(a, w), 1, args.warmup_ms, args.rep_ms).median_us
                rows.append((k, n, m, "cuBLAS (F.linear)", "", us))
            for tile in tiles:
                c = torch.full((m, n), float("nan"), device=dev, dtype=torch.float16)
                for way, call in launches(a, w, c, tile).items():
                    c.fill_(float("nan"))
                    try:
                        call()
                        if cuda:
                            torch.cuda.synchronize()
                        err = ((c.float() - want.float()).abs().max() / want.float().abs().max()).item()
                        if not err < 1e-2:
                            rows.append((k, n, m, way, tile, f"WRONG (rel err {err:.1e})"))
                            continue
                        if cuda:
                            us = graph_time(lambda i: call(), 1, args.warmup_ms, args.rep_ms).median_us
                        else:
                            started = time.perf_counter()
                            call()
                            us = (time.perf_counter() - started) * 1e6
                        rows.append((k, n, m, way, tile, us))
                    except Exception as exc:  # noqa: BLE001 - a probe: report and go on
                        rows.append((k, n, m, way, tile, f"FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"))
                    print(*rows[-1], flush=True)
    print(f"\n{'K':>5} {'N':>5} {'M':>5}  {'way':20s} {'tile':24s} {'us':>8}")
    for k, n, m, way, tile, us in rows:
        shown = f"{us:8.1f}" if isinstance(us, float) else us
        print(f"{k:5d} {n:5d} {m:5d}  {way:20s} {str(tile):24s} {shown}")


if __name__ == "__main__":
    main()
