"""The Python side of a `FusedMLP` call, with every Triton launch replaced by a no-op: what
the op costs the host before Triton's own launch (CPU only, no GPU needed).

    TRITON_INTERPRET=1 PYTHONPATH=. python bench/probe_host_python.py

Best of 7 x 2,000 calls after warm-up, µs a forward, per dtype: fp16 (768x3072, one launch
up to 128 rows, two at 256), w8a16 group:128, and w8a8 (512x2048, the weights random int8
with per-channel or per-group scales) with each activation scheme: `dynamic`, and `static`
and `group:128` both as the op runs them (one launch: kernels/fused_mlp.py's
FUSED_W8A8_OP_SCHEMES) and in their three launches. Run it on the same machine for a
before/after (`git stash` between runs): the absolute numbers are this host's.
"""

import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined

import torch  # noqa: E402

import kernels.fused_mlp as fused_module  # noqa: E402
import kernels.gemm_base as gemm_base  # noqa: E402
import kernels.w8a8 as w8a8_module  # noqa: E402
from kernels.op import FusedMLP, MLPConfig  # noqa: E402
from kernels.quantized import QuantizedWeight  # noqa: E402


def no_launch(kernel, grid, args, constexprs, key, slot=None):
    pass


def random_int8(n: int, k: int, group_size: int | None) -> QuantizedWeight:
    data = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n, 1 if group_size is None else k // group_size) * 1e-3 + 1e-4
    return QuantizedWeight(data, scale.squeeze(1) if group_size is None else scale, group_size)


def main():
    for module in (gemm_base, fused_module, w8a8_module):
        module.launch = no_launch
    torch.manual_seed(0)
    cases = (("fp16", "", 768, 3072, (1, 16, 256)), ("w8a16", "", 512, 2048, (1, 16)),
             ("w8a8", "dynamic", 512, 2048, (1, 16)), ("w8a8", "static", 512, 2048, (1, 16)),
             ("w8a8", "group:128", 512, 2048, (1, 16)), ("w8a8", "static three", 512, 2048, (1, 16)),
             ("w8a8", "group:128 three", 512, 2048, (1, 16)))  # fmt: skip
    for dtype, activations, d, f, rows in cases:
        if dtype == "fp16":
            w1, w2 = torch.randn(f, d).half(), torch.randn(d, f).half()
        else:
            group = 128 if dtype == "w8a16" else None
            w1, w2 = random_int8(f, d, group), random_int8(d, f, group)
            w1.input_scale, w1.output_scale = torch.tensor([0.02]), torch.tensor([0.05])
        b1, b2 = torch.randn(f).half(), torch.randn(d).half()
        scheme, _, three = activations.partition(" ")
        # "three": the op keeps the scheme on its separate launches
        fused_module.FUSED_W8A8_OP_SCHEMES = ("dynamic",) if three else ("dynamic", "static", "group")
        op = FusedMLP(MLPConfig(dtype=dtype, activations=scheme or "dynamic", backend="triton"), device="cpu")
        for m in rows:
            x = torch.randn(m, d).half()
            for _ in range(50):
                op(x, w1, b1, w2, b2)
            best = float("inf")
            for _ in range(7):
                start = time.perf_counter()
                for _ in range(2000):
                    op(x, w1, b1, w2, b2)
                best = min(best, (time.perf_counter() - start) / 2000 * 1e6)
            print(f"{dtype + ' ' + activations:22s} {d}x{f} M={m:<4d} {best:6.1f} us a forward")


if __name__ == "__main__":
    main()
