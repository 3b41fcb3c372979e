"""Where does a small launch's time go? Host-side cost per call of gelugemm's launcher,
of the raw Triton launch underneath it, and of torch's F.linear, plus a cProfile of the
launcher. (Kernel-development probe; `gelugemm bench` is the user-facing benchmark.)"""

import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

from kernels import gemm


def per_call_us(fn, n=2000):
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
    w = torch.randn(f, d, device="cuda", dtype=torch.float16)
    b = torch.randn(f, device="cuda", dtype=torch.float16)
    out = torch.empty(1, f, device="cuda", dtype=torch.float16)
    for path in ("decode", "strided"):
        gemm.gemm_bias_act(x, w, b, activation="erf", path=path)
        print(f"gemm_bias_act path={path}: {per_call_us(lambda: gemm.gemm_bias_act(x, w, b, activation='erf', path=path)):.1f} us/call")
    print(f"F.linear: {per_call_us(lambda: F.linear(x, w, b)):.1f} us/call")
    from kernels.op import FusedMLP, MLPConfig

    w2 = torch.randn(d, f, device="cuda", dtype=torch.float16)
    op = FusedMLP(MLPConfig(), device="cuda")
    op(x, w, b, w2, None)
    print(f"FusedMLP whole MLP: {per_call_us(lambda: op(x, w, b, w2, None)):.1f} us/call")
    print(f"eager whole MLP: {per_call_us(lambda: F.linear(F.gelu(F.linear(x, w, b)), w2)):.1f} us/call")
    print(f"torch.empty: {per_call_us(lambda: torch.empty(1, f, device='cuda', dtype=torch.float16)):.1f} us/call")
    cfg = gemm._gemm_strided_kernel.cache[next(iter(gemm._gemm_strided_kernel.cache))]
    jit = gemm._gemm_strided_kernel.fn.fn  # autotuner -> heuristics -> jit

    def raw():
        jit[(48,)](x, w, out, b, 1, f, d, 16, d, 1, 1, d, f, HAS_BIAS=True, ACTIVATION="erf", DOT_F32=False,
                   INPUT_PRECISION="ieee", EVEN_K=d % cfg.kwargs["BLOCK_K"] == 0, **cfg.all_kwargs())

    raw()
    print(f"raw jit launch (strided): {per_call_us(raw):.1f} us/call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        gemm.gemm_bias_act(x, w, b, activation="erf", path="decode")
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
