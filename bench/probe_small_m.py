"""Which float path should small M take? The whole MLP through the decode kernel, the
persistent TMA kernel and the strided kernel, forced per call, timed as CUDA-graph replays
(GPU time, no launch cost) beside torch eager. (Kernel-development probe: picks
FLOAT_DECODE_MAX_M and the path rules of kernels/gemm_base.py's _path.)"""

import math

import torch
import torch.nn.functional as F

from kernels.bench import graph_time
from kernels.gemm import FLOAT_DECODE_MAX_M, gemm_bias_act


def main():
    torch.manual_seed(0)
    dtype = torch.float16
    print(f"{'d x f':>12s} {'M':>5s} {'decode':>8s} {'tma':>8s} {'strided':>8s} {'eager':>8s}  (us, CUDA-graph replays)")
    for d, f in ((768, 3072), (4096, 16384)):
        n_sets = 1 if d == 4096 else 12  # 768x3072: 9 MB of weights a set, rotated past L2
        sets = [
            (torch.randn(f, d, device="cuda", dtype=dtype) / math.sqrt(d), torch.randn(f, device="cuda", dtype=dtype),
             torch.randn(d, f, device="cuda", dtype=dtype) / math.sqrt(f), torch.randn(d, device="cuda", dtype=dtype))
            for _ in range(n_sets)
        ]  # fmt: skip
        for m in (16, 32, 64, 128, 256, 512, 1024):
            xs = [torch.randn(m, d, device="cuda", dtype=dtype) for _ in range(n_sets)]

            def ours(path):
                def call(i):
                    w1, b1, w2, b2 = sets[i]
                    h = gemm_bias_act(xs[i], w1, b1, activation="erf", path=path)
                    return gemm_bias_act(h, w2, b2, path=path)

                return call

            def eager(i):
                w1, b1, w2, b2 = sets[i]
                return F.linear(F.gelu(F.linear(xs[i], w1, b1)), w2, b2)

            row = []
            for call in (ours("decode") if m <= FLOAT_DECODE_MAX_M else None, ours("tma"), ours("strided"), eager):
                if call is None:
                    row.append("-")
                    continue
                for i in range(n_sets):
                    call(i)  # autotune and compile outside the graph
                torch.cuda.synchronize()
                row.append(f"{graph_time(call, n_sets, 10, 50).median_us:.1f}")
            print(f"{d:>5d}x{f:<6d} {m:5d} {row[0]:>8s} {row[1]:>8s} {row[2]:>8s} {row[3]:>8s}")


if __name__ == "__main__":
    main()
