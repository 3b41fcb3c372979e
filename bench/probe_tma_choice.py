"""Kernel-development probe: the whole float MLP on the persistent TMA path, as the
autotuner configures it and with each of a few configs forced, timed as CUDA-graph
replays over rotated weight sets (as `gelugemm bench --cuda-graph` times it), with the
autotuner's choice per GEMM printed. Separates "the autotuner picks badly" from "every
config is slow" at shapes where the bench shows the TMA path far behind eager.

    PYTHONPATH=. python3 bench/probe_tma_choice.py --shape 768,3072 --tokens 16,64,128
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from kernels import gemm, launch
from kernels.bench import graph_time
from kernels.gemm_base import cfg

FORCED = [
    cfg(64, 64, 128, 4, 4), cfg(64, 128, 64, 4, 4), cfg(64, 64, 64, 4, 3), cfg(64, 64, 128, 4, 4, MAX_SPLIT_K=8),
    cfg(128, 128, 64, 8, 4, MAX_SPLIT_K=8), cfg(128, 128, 64, 8, 4),
]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="768,3072")
    ap.add_argument("--tokens", default="16,64,128,512")
    args = ap.parse_args()
    d, f = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    dt = torch.float16
    n_sets = max(1, min(24, (150 << 20) // (4 * d * f)))
    sets = [
        (torch.randn(f, d, device="cuda", dtype=dt) / math.sqrt(d), torch.randn(f, device="cuda", dtype=dt),
         torch.randn(d, f, device="cuda", dtype=dt) / math.sqrt(f), torch.randn(d, device="cuda", dtype=dt))
        for _ in range(n_sets)
    ]  # fmt: skip
    kern = gemm._gemm_tma_kernel
    tuned_configs = list(kern.configs)
    print(f"{d}x{f}, {n_sets} weight sets, us per MLP call (CUDA-graph replays)")
    for m in [int(t) for t in args.tokens.split(",")]:
        xs = [torch.randn(m, d, device="cuda", dtype=dt) for _ in range(n_sets)]

        def ours(i):
            w1, b1, w2, b2 = sets[i]
            h = gemm.gemm_bias_act(xs[i], w1, b1, activation="erf", path="tma")
            return gemm.gemm_bias_act(h, w2, b2, path="tma")

        def eager(i):
            w1, b1, w2, b2 = sets[i]
            return F.linear(F.gelu(F.linear(xs[i], w1, b1)), w2, b2)

        def timed(call):
            for i in range(n_sets):
                call(i)
            torch.cuda.synchronize()
            return graph_time(call, n_sets, 10, 50).median_us

        kern.configs = tuned_configs
        kern.cache.clear()
        gemm._GEMM.plans.clear()
        launch._compiled.clear()
        line = [f"M={m:5d} eager {timed(eager):7.1f}", f"autotuned {timed(ours):7.1f}"]
        chosen = [f"{str(k)[:90]}: {c}" for k, c in kern.cache.items()]
        for c in FORCED:
            kern.configs = [c]
            kern.cache.clear()
            gemm._GEMM.plans.clear()
            launch._compiled.clear()
            for table in gemm.TMA_CONFIGS.values():
                table.append(c)  # the pruner keeps configs of the bucket's table only
            try:
                line.append(f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}x{c.kwargs['BLOCK_K']}"
                            f"{' split' if c.kwargs.get('MAX_SPLIT_K') else ''} {timed(ours):7.1f}")  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a probe
                line.append(f"FAIL {type(exc).__name__}")
        print(" | ".join(line))
        for c in chosen:
            print("   chosen", c)


if __name__ == "__main__":
    main()
