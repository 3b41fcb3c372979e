"""Which fused design for w8a8 with per-token (dynamic) or per-token-group activations?

The GELU output h needs a scale per row (dynamic) before GEMM2 can read it as int8, but
GEMM1's epilogue sees only BLOCK_N columns of a row. The whole MLP (quantize x, GEMM1,
GEMM2) is timed here in each design, standalone kernels, one persistent TMA int8 GEMM
with switchable A-operand and epilogue modes, as CUDA-graph replays beside fp16 eager:

  static    today's fused path: x per token, h requantized in GEMM1's epilogue with one
            calibrated scale (int8 h in memory)                       [the baseline]
  dyn-sep   GEMM1 writes 16-bit h; a row kernel quantizes it per token (absmax read
            pass + quantize pass); GEMM2 int8 x int8 with per-row scales
  dyn-fused GEMM1 writes 16-bit h and gathers each row's absmax by atomic max; GEMM2
            loads 16-bit h tiles and quantizes them to int8 as it loads them
  group     x and h per token per 128 columns: GEMM1's epilogue quantizes each
            (row, 128-column block) of h with its own scale (int8 h + scales); both
            GEMMs promote the int32 partial of each 128-deep K block into an fp32
            accumulator with the A scale of that block

Each design is checked against a float64 torch model of the same quantized math.
Run: PYTHONPATH=. python3 bench/probe_w8a8_schemes.py [d,f ...]   (kernel-development probe)
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
def _round_i8(v):
    v = tl.minimum(tl.maximum(v, -127.0), 127.0)
    v = (v + 12582912.0) - 12582912.0
    return v.to(tl.int8)


@triton.jit
def _gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _quant_rows(x_ptr, q_ptr, s_ptr, amax_ptr, K, GROUPED: tl.constexpr, ZERO_AMAX: tl.constexpr,
                BLOCK_K: tl.constexpr, G: tl.constexpr):  # fmt: skip
    # One program per row: per-token (GROUPED False) or per-(token, G columns) scales.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    if ZERO_AMAX:
        tl.store(amax_ptr + row, 0.0)  # the next GEMM1 gathers this row's |h| max here
    if GROUPED:
        n_groups = K // G
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * K + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            xg = tl.reshape(x, (BLOCK_K // G, G))
            s = tl.maximum(tl.max(tl.abs(xg), axis=1), 1e-12) / 127.0
            q = _round_i8(xg * (1.0 / s)[:, None])
            tl.store(q_ptr + row * K + k0 + offs, tl.reshape(q, (BLOCK_K,)), mask=k0 + offs < K)
            groups = k0 // G + tl.arange(0, BLOCK_K // G)
            tl.store(s_ptr + row * n_groups + groups, s, mask=groups < n_groups)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * K + k0 + offs, mask=k0 + offs < K, other=0.0)
            amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
        s = tl.maximum(tl.max(amax, axis=0), 1e-12) / 127.0
        tl.store(s_ptr + row, s)
        inv = 1.0 / s
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * K + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            tl.store(q_ptr + row * K + k0 + offs, _round_i8(x * inv), mask=k0 + offs < K)


@triton.jit
def _epilogue(acc, offs_m, offs_n, n0, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, c_scale_ptr, amax_ptr, hs_ptr,
              A_MODE: tl.constexpr, OUT_MODE: tl.constexpr, GELU: tl.constexpr, G: tl.constexpr):  # fmt: skip
    out = acc
    if A_MODE == 0:  # int8 A, per-row scale
        out = out * tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    elif A_MODE == 2:  # 16-bit A quantized on load: its row scale is amax / 127
        out = out * (tl.maximum(tl.load(amax_ptr + offs_m, mask=offs_m < M, other=1.0), 1e-12) / 127.0)[:, None]
    # A_MODE 1, 3 (group): the A scales were applied per K block in the main loop
    out = out * tl.load(w_scale_ptr + offs_n)[None, :] + tl.load(bias_ptr + offs_n)[None, :]
    if GELU:
        out = _gelu_erf(out)
    if OUT_MODE == 1:  # int8, one static scale
        res = _round_i8(out * (1.0 / tl.load(c_scale_ptr)))
    elif OUT_MODE == 2:  # 16-bit h and the row's absmax over these columns
        tl.atomic_max(amax_ptr + offs_m, tl.max(tl.abs(out), axis=1), mask=offs_m < M, sem="relaxed")
        res = out.to(tl.float16)
    elif OUT_MODE == 3:  # int8 h, one scale per (row, these G columns)
        s = tl.maximum(tl.max(tl.abs(out), axis=1), 1e-12) / 127.0
        tl.store(hs_ptr + offs_m * (N // G) + n0 // G, s, mask=offs_m < M)
        res = _round_i8(out * (1.0 / s)[:, None])
    else:
        res = out.to(tl.float16)
    return res


@triton.jit
def _int8_gemm(a_ptr, b_ptr, c_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, c_scale_ptr, amax_ptr, hs_ptr,
               M, N, K,
               A_MODE: tl.constexpr, OUT_MODE: tl.constexpr, GELU: tl.constexpr, G: tl.constexpr,
               NUM_SMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, WS: tl.constexpr = False):  # fmt: skip
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N // 2])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN, warp_specialize=WS):
        group = GROUP_M * num_pid_n
        first_m = (tile_id // group) * GROUP_M
        rows = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile_id % group) % rows
        pid_n = (tile_id % group) // rows
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        if A_MODE == 1 or A_MODE == 3:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        if A_MODE == 2:
            inv = 127.0 / tl.maximum(tl.load(amax_ptr + offs_m, mask=offs_m < M, other=1.0), 1e-12)
        for ki in range(k_tiles):
            b = b_desc.load([off_n, ki * BLOCK_K]).T
            if A_MODE == 1:
                a = a_desc.load([off_m, ki * BLOCK_K])
                part = tl.dot(a, b, out_dtype=tl.int32)
                s = tl.load(a_scale_ptr + offs_m * (K // G) + ki, mask=offs_m < M, other=0.0)
                acc += part.to(tl.float32) * s[:, None]
            elif A_MODE == 3:
                # two K blocks a step, two int32 partials: the second MMA can run while
                # the first partial is promoted (K // BLOCK_K must be even)
                if ki % 2 == 0:
                    a0 = a_desc.load([off_m, ki * BLOCK_K])
                    a1 = a_desc.load([off_m, (ki + 1) * BLOCK_K])
                    b1 = b_desc.load([off_n, (ki + 1) * BLOCK_K]).T
                    p0 = tl.dot(a0, b, out_dtype=tl.int32)
                    p1 = tl.dot(a1, b1, out_dtype=tl.int32)
                    s0 = tl.load(a_scale_ptr + offs_m * (K // G) + ki, mask=offs_m < M, other=0.0)
                    s1 = tl.load(a_scale_ptr + offs_m * (K // G) + ki + 1, mask=offs_m < M, other=0.0)
                    acc += p0.to(tl.float32) * s0[:, None] + p1.to(tl.float32) * s1[:, None]
            elif A_MODE == 2:
                a = _round_i8(a_desc.load([off_m, ki * BLOCK_K]).to(tl.float32) * inv[:, None])
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            else:
                a = a_desc.load([off_m, ki * BLOCK_K])
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        accf = acc.to(tl.float32)
        acc0, acc1 = tl.split(tl.permute(tl.reshape(accf, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        offs_n0 = off_n + tl.arange(0, BLOCK_N // 2)
        out0 = _epilogue(acc0, offs_m, offs_n0, off_n, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, c_scale_ptr, amax_ptr,
                         hs_ptr, A_MODE, OUT_MODE, GELU, G)  # fmt: skip
        c_desc.store([off_m, off_n], out0)
        out1 = _epilogue(acc1, offs_m, offs_n0 + BLOCK_N // 2, off_n + BLOCK_N // 2, M, N, a_scale_ptr, w_scale_ptr, bias_ptr, c_scale_ptr,
                         amax_ptr, hs_ptr, A_MODE, OUT_MODE, GELU, G)  # fmt: skip
        c_desc.store([off_m, off_n + BLOCK_N // 2], out1)


_scratch = {}


def _alloc(size, alignment, stream):
    buf = _scratch.get(stream)
    if buf is None or buf.numel() < size:
        buf = _scratch[stream] = torch.empty(max(size, 1 << 20), dtype=torch.int8, device=DEVICE)
    return buf


SMS = None
CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3, FLATTEN=True, WS=False)
# GEMM2 of dyn-fused reads 16-bit A tiles: half the K depth keeps the stages in shared memory.
CONFIG_A16 = dict(CONFIG, BLOCK_K=64, num_stages=4)
DEVICE = "cuda"


def gemm(a, w, c, a_scale, w_scale, bias, *, a_mode, out_mode, gelu, c_scale=None, amax=None, hs=None, cfg=CONFIG):
    m, k = a.shape
    n = w.shape[0]
    dummy = w_scale
    grid = (min(SMS, triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])),)
    _int8_gemm[grid](
        a, w, c, a_scale if a_scale is not None else dummy, w_scale, bias,
        c_scale if c_scale is not None else dummy, amax if amax is not None else dummy, hs if hs is not None else dummy,
        m, n, k, A_MODE=a_mode, OUT_MODE=out_mode, GELU=gelu, G=GROUP, NUM_SMS=SMS, **cfg,
    )  # fmt: skip
    return c


def quant_rows(x, q, s, *, grouped, amax=None):
    m, k = x.shape
    block = min(triton.next_power_of_2(k), 4096)
    _quant_rows[(m,)](x, q, s, amax if amax is not None else s, k, GROUPED=grouped, ZERO_AMAX=amax is not None,
                      BLOCK_K=block, G=GROUP, num_warps=8 if block >= 2048 else 4)  # fmt: skip
    return q, s


# ---- the designs ------------------------------------------------------------------------


class Buffers:
    def __init__(self, m, d, f):
        dev = DEVICE
        self.xq = torch.empty(m, d, dtype=torch.int8, device=dev)
        self.xs = torch.empty(m, device=dev)
        self.xgs = torch.empty(m, d // GROUP, device=dev)
        self.h8 = torch.empty(m, f, dtype=torch.int8, device=dev)
        self.h16 = torch.empty(m, f, dtype=torch.float16, device=dev)
        self.hs = torch.empty(m, device=dev)
        self.hgs = torch.empty(m, f // GROUP, device=dev)
        self.amax = torch.zeros(m, device=dev)
        self.y = torch.empty(m, d, dtype=torch.float16, device=dev)


def design_static_nofill(x, wt, buf, h_rows):
    w1, s1, b1, w2, s2, b2, h_scale = wt
    quant_rows(x, buf.xq, buf.xs, grouped=False)
    gemm(buf.xq, w1, buf.h8, buf.xs, s1, b1, a_mode=0, out_mode=1, gelu=True, c_scale=h_scale)
    return gemm(buf.h8, w2, buf.y, h_rows, s2, b2, a_mode=0, out_mode=0, gelu=False)


def design_dyn_sep(x, wt, buf):
    w1, s1, b1, w2, s2, b2, _ = wt
    quant_rows(x, buf.xq, buf.xs, grouped=False)
    gemm(buf.xq, w1, buf.h16, buf.xs, s1, b1, a_mode=0, out_mode=0, gelu=True)
    quant_rows(buf.h16, buf.h8, buf.hs, grouped=False)
    return gemm(buf.h8, w2, buf.y, buf.hs, s2, b2, a_mode=0, out_mode=0, gelu=False)


def design_dyn_fused(x, wt, buf):
    w1, s1, b1, w2, s2, b2, _ = wt
    quant_rows(x, buf.xq, buf.xs, grouped=False, amax=buf.amax)
    gemm(buf.xq, w1, buf.h16, buf.xs, s1, b1, a_mode=0, out_mode=2, gelu=True, amax=buf.amax)
    return gemm(buf.h16, w2, buf.y, None, s2, b2, a_mode=2, out_mode=0, gelu=False, amax=buf.amax, cfg=CONFIG_A16)


def design_group(x, wt, buf, a_mode=1, cfg=None):
    w1, s1, b1, w2, s2, b2, _ = wt
    cfg = cfg or CONFIG
    quant_rows(x, buf.xq, buf.xgs, grouped=True)
    gemm(buf.xq, w1, buf.h8, buf.xgs, s1, b1, a_mode=a_mode, out_mode=3, gelu=True, hs=buf.hgs, cfg=cfg)
    return gemm(buf.h8, w2, buf.y, buf.hgs, s2, b2, a_mode=a_mode, out_mode=0, gelu=False, cfg=cfg)


# ---- a float64 model of each design's quantized math -------------------------------------


def q_rows(v, group=None):
    if group is None:
        s = v.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        return (v / s).round().clamp(-127, 127) * s
    g = v.reshape(v.shape[0], -1, group)
    s = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
    return ((g / s).round().clamp(-127, 127) * s).reshape(v.shape)


def model(x, wt, design):
    w1, s1, b1, w2, s2, b2, h_scale = (t.double() for t in wt)
    group = GROUP if design.startswith("group") else None
    xd = q_rows(x.double(), group)
    h = F.gelu(xd @ (w1 * s1[:, None]).t() + b1)
    if design.startswith("static"):
        hd = (h / h_scale).round().clamp(-127, 127) * h_scale
    else:
        # dyn designs: the 16-bit h is what gets quantized
        hd = q_rows(h.half().double() if design.startswith("dyn") else h, group)
    return hd @ (w2 * s2[:, None]).t() + b2


def make_case(d, f, m):
    w1f = torch.randn(f, d, device=DEVICE) / math.sqrt(d)
    w2f = torch.randn(d, f, device=DEVICE) / math.sqrt(f)
    b1 = torch.randn(f, device=DEVICE) * 0.5
    b2 = torch.randn(d, device=DEVICE) * 0.5
    s1 = w1f.abs().amax(1) / 127
    s2 = w2f.abs().amax(1) / 127
    w1 = (w1f / s1[:, None]).round().clamp(-127, 127).to(torch.int8)
    w2 = (w2f / s2[:, None]).round().clamp(-127, 127).to(torch.int8)
    x = torch.randn(m, d, device=DEVICE).to(torch.float16)
    h_scale = (F.gelu(x.float() @ w1f.t() + b1).abs().amax() / 127).reshape(1)
    wt = (w1, s1, b1, w2, s2, b2, h_scale)
    exact = F.gelu(x.double() @ w1f.double().t() + b1.double()) @ w2f.double().t() + b2.double()
    return x, wt, (w1f.half(), b1.half(), w2f.half(), b2.half()), exact


def designs(x, wt, buf):
    h_rows = wt[-1].expand(x.shape[0]).contiguous()
    return {
        "static": lambda: design_static_nofill(x, wt, buf, h_rows),
        "dyn-sep": lambda: design_dyn_sep(x, wt, buf),
        "dyn-fused": lambda: design_dyn_fused(x, wt, buf),
        "group": lambda: design_group(x, wt, buf),
        "group-2acc": lambda: design_group(x, wt, buf, a_mode=3),
        "group-ws": lambda: design_group(x, wt, buf, cfg=dict(CONFIG, FLATTEN=False, WS=True)),
        "group-2acc-ws": lambda: design_group(x, wt, buf, a_mode=3, cfg=dict(CONFIG, FLATTEN=False, WS=True)),
        "group-64x256": lambda: design_group(x, wt, buf, cfg=dict(CONFIG, BLOCK_M=64, num_warps=4, num_stages=4)),
    }


def check(name, run, x, wt, exact, buf):
    buf.y.fill_(float("nan"))
    y = run().double()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    ref = model(x, wt, name)
    return ((y - exact).norm() / exact.norm()).item(), ((y - ref).norm() / ref.norm()).item()


def cpu_check():
    """The designs under TRITON_INTERPRET=1 on a small shape: each must match its float64 model."""
    global DEVICE, SMS, CONFIG, CONFIG_A16
    DEVICE, SMS = "cpu", 4
    # BLOCK_N / 2 = GROUP: the group design quantizes h per epilogue half-tile
    CONFIG = dict(BLOCK_M=32, BLOCK_N=256, BLOCK_K=128, GROUP_M=2, num_warps=4, num_stages=1, FLATTEN=False, WS=False)
    CONFIG_A16 = dict(CONFIG, BLOCK_K=64)
    torch.manual_seed(0)
    d, f, m = 256, 512, 40
    x, wt, _, exact = make_case(d, f, m)
    buf = Buffers(m, d, f)
    for name, run in designs(x, wt, buf).items():
        if name.endswith("-ws") or name == "group-64x256":
            continue  # the same code as their plain twins under the interpreter
        rel, vs_model = check(name, run, x, wt, exact, buf)
        print(f"{name:>10s} relerr vs exact {rel:.2e}, vs its float64 model {vs_model:.2e}")
        assert vs_model < 5e-3, name


def main():
    global SMS
    triton.set_allocator(_alloc)
    if sys.argv[1:] == ["--cpu-check"]:
        return cpu_check()
    SMS = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = [tuple(int(v) for v in a.split(",")) for a in sys.argv[1:]] or [(4096, 16384)]
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print(f"{'d x f':>11s} {'M':>5s} {'design':>10s} {'us':>8s} {'x eager':>8s} {'relerr':>9s} {'vs f64 model':>12s}")
    for d, f in shapes:
        for m in (2048, 8192):
            x, wt, (w1h, b1h, w2h, b2h), exact = make_case(d, f, m)
            buf = Buffers(m, d, f)
            eager = graph_time(lambda i: F.linear(F.gelu(F.linear(x, w1h, b1h)), w2h, b2h), 1, 10, 60).median_us
            print(f"{d:>5d}x{f:<5d} {m:5d} {'fp16 eager':>10s} {eager:8.1f}")
            for name, run in designs(x, wt, buf).items():
                try:
                    rel, vs_model = check(name, run, x, wt, exact, buf)
                    t = graph_time(lambda i: run(), 1, 10, 60).median_us
                    print(f"{'':>11s} {'':>5s} {name:>10s} {t:8.1f} {eager / t:7.2f}x {rel:9.2e} {vs_model:12.2e}")
                except Exception as exc:  # noqa: BLE001 - a probe reports and goes on
                    print(f"{'':>11s} {'':>5s} {name:>10s} failed: {str(exc).strip().splitlines()[-1][:150]}")


if __name__ == "__main__":
    main()
