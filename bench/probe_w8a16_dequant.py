"""Where does w8a16's dequantize-then-float-GEMM schedule overtake the in-loop conversion?

The whole 4096x16384 MLP (GEMM1 + bias + erf GELU, GEMM2 + bias), group:128 weights, fp16
activations, CUDA-graph replays over weight/input sets larger than L2, at M = 128 ... 8192:

  in-loop   w8a16_linear(path="tma" or "decode"): int8 tiles converted in the main loop
  dequant   w8a16_linear(path="dequant"): both weights dequantized to fp16, then the float kernel
  eager     fp16 F.linear -> F.gelu -> F.linear on fp16 weights (cuBLAS)

kernels/w8a16.py's W8A16_DEQUANT_MIN_M should sit where "dequant" starts to win.

Run: PYTHONPATH=. python3 bench/probe_w8a16_dequant.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.bench import graph_time
from kernels.dequant import dequantize_group_weight
from kernels.int8 import quantize_weight
from kernels.w8a16 import W8A16_DEQUANT_MIN_M, w8a16_linear

D, FF, G = 4096, 16384, 128


def main() -> None:
    torch.manual_seed(0)
    sets = 3  # three weight sets: 3 x 2 x 64 MiB int8 (+ fp16 copies for eager) exceed L2
    w1 = [torch.randn(FF, D, device="cuda") / D**0.5 for _ in range(sets)]
    w2 = [torch.randn(D, FF, device="cuda") / FF**0.5 for _ in range(sets)]
    q1 = [quantize_weight(w, group_size=G) for w in w1]
    q2 = [quantize_weight(w, group_size=G) for w in w2]
    h1 = [w.half() for w in w1]
    h2 = [w.half() for w in w2]
    b1 = torch.randn(FF, device="cuda", dtype=torch.float16)
    b2 = torch.randn(D, device="cuda", dtype=torch.float16)
    print(f"W8A16_DEQUANT_MIN_M = {W8A16_DEQUANT_MIN_M}; {torch.cuda.get_device_name()}")
    t_pass = graph_time(lambda i: (dequantize_group_weight(q1[i], torch.float16), dequantize_group_weight(q2[i], torch.float16)),
                        sets, 25, 200).median_us
    moved = 2 * D * FF * 3  # 1 byte read, 2 written per weight, two weights
    print(f"dequantize pass, both weights: {t_pass:.0f} us, {moved / t_pass / 1e3:.0f} GB/s")
    print(f"{'M':>6} {'in-loop us':>11} {'dequant us':>11} {'eager us':>9} {'in-loop/eager':>14} {'dequant/eager':>14}")
    for m in (128, 256, 512, 1024, 2048, 8192):
        x = [torch.randn(m, D, device="cuda", dtype=torch.float16) for _ in range(sets)]
        inloop_path = "decode" if m <= 16 else "tma"

        def w8a16(i, path):
            h = w8a16_linear(x[i], q1[i], b1, activation="erf", path=path)
            return w8a16_linear(h, q2[i], b2, path=path)

        t_in = graph_time(lambda i: w8a16(i, inloop_path), sets, 25, 200).median_us
        t_dq = graph_time(lambda i: w8a16(i, "dequant"), sets, 25, 200).median_us
        t_ea = graph_time(lambda i: F.linear(F.gelu(F.linear(x[i], h1[i], b1)), h2[i], b2), sets, 25, 200).median_us
        print(f"{m:>6} {t_in:>11.0f} {t_dq:>11.0f} {t_ea:>9.0f} {t_ea / t_in:>13.2f}x {t_ea / t_dq:>13.2f}x", flush=True)


if __name__ == "__main__":
    main()
