"""Why is w8a16 slower than fp16 from M=128 up, and does a swap-AB schedule fix it?

Today's w8a16 GEMM loads the int8 weight tile through TMA, converts it to fp16 in
registers and hands it to tl.dot as the B operand, which Hopper's wgmma reads from shared
memory only: the converted tile makes a round trip through shared memory every K step.
wgmma takes its A operand from registers, so computing the transposed product,
out^T = dequant(W) @ x^T, puts the converted weight where it can stay in registers.

Timed here, one GEMM (GEMM1 with bias + erf GELU: d -> f, and GEMM2: f -> d), CUDA-graph
replays, against the fp16 GEMM through torch (cuBLAS) and the same GEMM on fp16 weights:

  normal    persistent TMA tile loop, int8 B tile converted in registers (today's design)
  swap-ab   persistent TMA tile loop over (N tile, M tile), A = dequantized weight tile
            in registers, B = x tile from shared memory; the output tile is transposed in
            the epilogue
each with per-channel scales (applied in the epilogue) and group-128 scales (applied to
the weight tile in registers).

Run: PYTHONPATH=. python3 bench/probe_w8a16_schedule.py   (kernel-development probe)
     TRITON_INTERPRET=1 PYTHONPATH=. python3 bench/probe_w8a16_schedule.py --cpu-check
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.bench import graph_time

GROUP = 128


@triton.jit
def _gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _w8a16_gemm(x_ptr, w_ptr, c_ptr, scale_ptr, bias_ptr, M, N, K,
                SWAP_AB: tl.constexpr, MAGIC: tl.constexpr, GROUPED: tl.constexpr, G: tl.constexpr, GELU: tl.constexpr,
                NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, WS: tl.constexpr = False):  # fmt: skip
    # x [M, K] fp16, w int8 [N, K] (nn.Linear layout), scale [N] or [N, K // G] float32.
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN, warp_specialize=WS):
        # grouped order over (m, n); GROUP_M row blocks share a band of the weight in L2
        group = GROUP_M * num_pid_n
        first_m = (tile_id // group) * GROUP_M
        rows = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile_id % group) % rows
        pid_n = (tile_id % group) // rows
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_n = off_n + tl.arange(0, BLOCK_N)
        if SWAP_AB:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            x = x_desc.load([off_m, ki * BLOCK_K])
            q = w_desc.load([off_n, ki * BLOCK_K])  # [BLOCK_N, BLOCK_K] int8
            if MAGIC:
                # int8 -> fp16 without the converter: the fp16 with bits 0x6480 + q is 1152 + q
                # exactly (exponent of 1024, q + 128 in the mantissa); subtract 1152
                w = (q.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
                if GROUPED:
                    s = tl.load(scale_ptr + offs_n * (K // G) + (ki * BLOCK_K) // G)
                    w = w * s.to(tl.float16)[:, None]
            elif GROUPED:
                s = tl.load(scale_ptr + offs_n * (K // G) + (ki * BLOCK_K) // G)
                w = (q.to(tl.float32) * s[:, None]).to(tl.float16)
            else:
                w = q.to(tl.float16)
            if SWAP_AB:
                acc = tl.dot(w, x.T, acc)
            else:
                acc = tl.dot(x, w.T, acc)
        if SWAP_AB:
            out = acc.T
        else:
            out = acc
        if not GROUPED:
            out = out * tl.load(scale_ptr + offs_n)[None, :]
        out = out + tl.load(bias_ptr + offs_n)[None, :]
        if GELU:
            out = _gelu_erf(out)
        c_desc.store([off_m, off_n], out.to(tl.float16))


_scratch = {}
DEVICE = "cuda"
SMS = 132


def _alloc(size, alignment, stream):
    buf = _scratch.get(stream)
    if buf is None or buf.numel() < size:
        buf = _scratch[stream] = torch.empty(max(size, 1 << 20), dtype=torch.int8, device=DEVICE)
    return buf


CONFIGS = {
    "normal": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, FLATTEN=True),
    "swap-ab": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, FLATTEN=True),
    "swap-ab-n256": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, FLATTEN=True),
    "swap-ab-m64": dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, FLATTEN=True),
    "swap-ab-magic": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4, FLATTEN=True),
    "swap-ab-n256-magic": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4, FLATTEN=True),
    "swap-ab-n256-magic-ws": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4,
                                  FLATTEN=False, WS=True),
}


def w8a16(x, q, scale, bias, out, *, grouped, gelu, variant):
    cfg = dict(CONFIGS[variant])
    m, k = x.shape
    n = q.shape[0]
    grid = (min(SMS, triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])),)
    _w8a16_gemm[grid](x, q, out, scale, bias, m, n, k, SWAP_AB=variant.startswith("swap"), MAGIC="magic" in variant,
                      GROUPED=grouped, G=GROUP,
                      GELU=gelu, NUM_SMS=SMS, **cfg)  # fmt: skip
    return out


def quantize(w, grouped):
    n, k = w.shape
    if grouped:
        g = w.reshape(n, k // GROUP, GROUP)
        s = g.abs().amax(-1) / 127
        q = (g / s[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
        deq = (q.float().reshape(n, k // GROUP, GROUP) * s[..., None]).reshape(n, k).half()
    else:
        s = w.abs().amax(1) / 127
        q = (w / s[:, None]).round().clamp(-127, 127).to(torch.int8)
        deq = None
    return q, s, deq


def run(shapes, tokens, variants, timed):
    for d, f in shapes:
        for which, (k, n, gelu) in (("GEMM1", (d, f, True)), ("GEMM2", (f, d, False))):
            w = torch.randn(n, k, device=DEVICE) / math.sqrt(k)
            bias = torch.randn(n, device=DEVICE) * 0.5
            wh, bh = w.half(), bias.half()
            quantized = {g: quantize(w, g) for g in (False, True)}
            for m in tokens:
                x = torch.randn(m, k, device=DEVICE).half()
                act = (lambda t: F.gelu(t)) if gelu else (lambda t: t)
                exact = act(x.double() @ w.double().t() + bias.double())
                line = f"{d:>5d}x{f:<5d} {which} {m:5d}"
                if timed:
                    t16 = graph_time(lambda i: act(F.linear(x, wh, bh)), 1, 10, 50).median_us
                    line += f" fp16-torch {t16:7.1f}"
                for grouped in (False, True):
                    q, s, _ = quantized[grouped]
                    for variant in variants:
                        out = torch.full((m, n), float("nan"), device=DEVICE, dtype=torch.float16)
                        try:
                            w8a16(x, q, s, bias, out, grouped=grouped, gelu=gelu, variant=variant)
                            rel = ((out.double() - exact).norm() / exact.norm()).item()
                            t = ""
                            if timed:
                                us = graph_time(lambda i: w8a16(x, q, s, bias, out, grouped=grouped, gelu=gelu,
                                                                variant=variant), 1, 10, 50).median_us  # fmt: skip
                                t = f" {us:7.1f} ({t16 / us:4.2f}x)"
                            line += f" | {'g128' if grouped else 'chan'} {variant}{t} err {rel:.1e}"
                        except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
                            line += f" | {variant} failed: {str(exc).strip().splitlines()[-1][:80]}"
                print(line, flush=True)


def main():
    global DEVICE, SMS, CONFIGS
    triton.set_allocator(_alloc)
    torch.manual_seed(0)
    if sys.argv[1:] == ["--cpu-check"]:
        DEVICE, SMS = "cpu", 4
        CONFIGS = {name: dict(cfg, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=2, num_stages=1, FLATTEN=False)
                   for name, cfg in CONFIGS.items() if name in ("normal", "swap-ab", "swap-ab-magic")}  # fmt: skip
        run([(256, 512)], [40], list(CONFIGS), timed=False)
        return
    SMS = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | us, graph replays")
    variants = [v for v in CONFIGS if v not in ("swap-ab-m64", "swap-ab-n256")] if len(sys.argv) < 2 else sys.argv[1:]
    run([(4096, 16384)], [128, 2048, 8192], variants, timed=True)


if __name__ == "__main__":
    main()
