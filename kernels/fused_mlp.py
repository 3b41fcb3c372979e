"""The whole float MLP in one launch, for small models at few rows:

    y = GELU(x @ W1^T + b1) @ W2^T + b2

At 768x3072 (BERT-base, ViT-B, GPT-2 small) each GEMM is a few microseconds of GPU work,
so two launches, two ramp-ups and two tails cost as much as the math, and from Python a
Triton launch costs more host time than the MLP takes on the GPU. Here one persistent
grid walks two lists of work units:

- GEMM1 units, one per [BLOCK_M, BLOCK_F] tile of h = GELU(x @ W1^T + b1): each stores
  its tile (rounded to x's dtype, as the two-launch path stores h) to a workspace and
  counts itself into its row block's `ready` counter (release);
- GEMM2 units, one per share of a [BLOCK_M, BLOCK_D] tile of y, K = d_ff split SPLIT_F
  ways so that the narrow output still fills the SMs: each waits until its row block's
  h is complete (acquire), multiplies it by W2, and the last share of a tile adds the
  partial sums and runs the epilogue (kernels/gemm_base.py's serial split-K).

Every program takes its units in order, GEMM1 units first, and the grid is at most one
program per SM: a program only waits once its own GEMM1 units are done, for units that
programs already resident are working on. (The CPU interpreter runs programs one after
the other, so it gets one program: it does every GEMM1 unit, then every GEMM2 unit.)
That needs every program resident at once, as a persistent grid of one program per SM
assumes: where the process gets fewer SMs than the device has (an MPS client with a low
CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, an SM partition), waiting programs could hold the SMs
that the rest need. GELUGEMM_FUSED_MLP=0 turns this path off (the two GEMM launches run);
so does CUDA_MPS_ACTIVE_THREAD_PERCENTAGE below 100 in the environment.
The counters are left at zero for the next launch: the last GEMM2 unit of a row block to
read h resets them.

Loads are pointer loads (either weight layout, any strides); h travels through L2
(`.cg`: never a stale L1 line).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernels.errors import LaunchError
from kernels.gemm_base import (
    _config_key,
    _dot,
    _epilogue,
    _split_k_arrive,
    _unique,
    autotune_enabled,
    tensor_signature,
)
from kernels.launch import interpreting, launch, num_programs
from kernels.schemes import FLOAT_DTYPES, GELU_FLAVOURS, WeightLayout

# The op runs the MLP in this one launch for float weights of at most FUSED_MAX_WEIGHT
# elements each (1024x4096 and smaller) and at most FUSED_MAX_M rows; larger ones take the
# two GEMM launches. On an H200 at 768x3072 it ran 11-14 us up to 128 rows, 1.1-1.35x eager,
# and 20 us at 256 rows against eager's 16 (bench/probe_fused.py, bench/RESULTS.md section 16).
FUSED_MAX_WEIGHT = 1 << 22
FUSED_MAX_M = 128


@triton.jit
def _gemm1_unit(x_ptr, w1_ptr, b1_ptr, h_ptr, ready_ptr, pid_m, pid_f, M, D, F,
                stride_xm, stride_xk, stride_w1k, stride_w1n,
                HAS_B1: tl.constexpr, ACTIVATION: tl.constexpr, DOT_F32: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # h[rows, cols] = GELU(x[rows] @ W1[cols]^T + b1[cols]), stored in x's dtype; then
    # counted into ready[pid_m].
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.where(offs_m < M, offs_m, 0)
    cols = tl.where(offs_f < F, offs_f, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_in = (k0 + offs_k) < D
        a = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk, mask=k_in[None, :], other=0.0)
        b = tl.load(w1_ptr + (k0 + offs_k)[:, None] * stride_w1k + cols[None, :] * stride_w1n, mask=k_in[:, None],
                    other=0.0)  # fmt: skip
        acc = _dot(a, b, acc, DOT_F32, INPUT_PRECISION)
    h = _epilogue(acc, offs_m, offs_f, M, F, b1_ptr, None, None, None, 0, 0, False, 0, 0, HAS_B1, ACTIVATION,
                  h_ptr.dtype.element_ty, INTERPRETER)  # fmt: skip
    tl.store(h_ptr + offs_m[:, None] * F + offs_f[None, :], h, mask=(offs_m[:, None] < M) & (offs_f[None, :] < F))
    # every thread's stores before the one release that publishes them
    tl.debug_barrier()
    tl.atomic_add(ready_ptr + pid_m, 1, sem="release")


@triton.jit
def fused_mlp_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, y_ptr, h_ptr, partial_ptr, counters_ptr,
    M, D, F, M_BUCKET, NUM_PROGRAMS,
    stride_xm, stride_xk, stride_w1k, stride_w1n, stride_w2k, stride_w2n, stride_ym,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACTIVATION: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_F: tl.constexpr,
):  # fmt: skip
    # x [M, D]; W1 as [K = D, N = F] through (stride_w1k, stride_w1n), W2 as [K = F, N = D]
    # (either layout); h [M, F] contiguous, the workspace; counters: ready[row blocks],
    # consumed[row blocks], then the split-K arrivals of each y tile.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_f = tl.cdiv(F, BLOCK_F)
    num_pid_d = tl.cdiv(D, BLOCK_D)
    units1 = num_pid_m * num_pid_f
    units = units1 + num_pid_m * num_pid_d * SPLIT_F
    ready_ptr = counters_ptr
    consumed_ptr = counters_ptr + num_pid_m
    arrivals_ptr = counters_ptr + 2 * num_pid_m
    k_tiles = tl.cdiv(F, BLOCK_K)
    k_per_split = tl.cdiv(k_tiles, SPLIT_F)
    offs_k = tl.arange(0, BLOCK_K)
    for unit in range(tl.program_id(0), units, NUM_PROGRAMS):
        if unit < units1:
            # row-block-major: the first row block's h completes first
            _gemm1_unit(x_ptr, w1_ptr, b1_ptr, h_ptr, ready_ptr, unit // num_pid_f, unit % num_pid_f, M, D, F,
                        stride_xm, stride_xk, stride_w1k, stride_w1n, HAS_B1, ACTIVATION, DOT_F32, INPUT_PRECISION,
                        INTERPRETER, BLOCK_M, BLOCK_F, BLOCK_K)  # fmt: skip
        else:
            # the shares of one y tile are consecutive units: they run at once, and the
            # last one's reads of the others' partials hit L2
            tile_id = (unit - units1) // SPLIT_F
            share = (unit - units1) % SPLIT_F
            pid_m = tile_id // num_pid_d
            pid_d = tile_id % num_pid_d
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
            rows = tl.where(offs_m < M, offs_m, 0)
            cols = tl.where(offs_d < D, offs_d, 0)
            # wait for every GEMM1 unit of this row block
            ready = tl.atomic_add(ready_ptr + pid_m, 0, sem="acquire")
            while ready < num_pid_f:
                ready = tl.atomic_add(ready_ptr + pid_m, 0, sem="acquire")
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            k_first = share * k_per_split
            k_last = tl.minimum(k_first + k_per_split, k_tiles)
            for ki in range(k_first, k_last):
                k_in = (ki * BLOCK_K + offs_k) < F
                a = tl.load(h_ptr + rows[:, None] * F + (ki * BLOCK_K + offs_k)[None, :], mask=k_in[None, :],
                            other=0.0, cache_modifier=".cg")  # fmt: skip
                b = tl.load(w2_ptr + (ki * BLOCK_K + offs_k)[:, None] * stride_w2k + cols[None, :] * stride_w2n,
                            mask=k_in[:, None], other=0.0)  # fmt: skip
                acc = _dot(a, b, acc, DOT_F32, INPUT_PRECISION)
            # the last unit of the row block to have read h leaves both counters at zero
            tl.debug_barrier()
            consumed = tl.atomic_add(consumed_ptr + pid_m, 1, sem="relaxed")
            if consumed == num_pid_d * SPLIT_F - 1:
                tl.atomic_xchg(ready_ptr + pid_m, 0, sem="relaxed")
                tl.atomic_xchg(consumed_ptr + pid_m, 0, sem="relaxed")
            y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_d[None, :]
            y_mask = (offs_m[:, None] < M) & (offs_d[None, :] < D)
            if SPLIT_F > 1:
                last, total, _ = _split_k_arrive(acc, acc, partial_ptr, arrivals_ptr, tile_id, share, SPLIT_F, False)
                if last:
                    y = _epilogue(total, offs_m, offs_d, M, D, b2_ptr, None, None, None, 0, 0, False, 0, 0, HAS_B2,
                                  "none", y_ptr.dtype.element_ty, INTERPRETER)  # fmt: skip
                    tl.store(y_ptrs, y, mask=y_mask)
            else:
                y = _epilogue(acc, offs_m, offs_d, M, D, b2_ptr, None, None, None, 0, 0, False, 0, 0, HAS_B2, "none",
                              y_ptr.dtype.element_ty, INTERPRETER)  # fmt: skip
                tl.store(y_ptrs, y, mask=y_mask)


# ---------------------------------------------------------------------------------------
# Configs: keyed by fused_bucket(M)
# ---------------------------------------------------------------------------------------
# BLOCK_F is GEMM1's output tile width, BLOCK_D GEMM2's; BLOCK_K is both K steps. The
# time is a chain of latencies (GEMM1's K loop, the wait, GEMM2's share of K, the
# reduction), so the leaders make as many short units as there are SMs: at 768x3072 and
# up to 32 rows, 16x64 GEMM1 tiles (48 a row block) and GEMM2 split four or eight ways over
# 128-deep K steps; from 33 rows one 64-row block. On an H200 (bench/probe_fused.py,
# bench/RESULTS.md section 16) a bucket tuned at 32 rows and reused at 64 ran 16.2 us where
# 64-row tiles ran 13.8 at 128 rows: the buckets are powers of two.


def _fcfg(bm, bf, bd, bk, split, warps=4, stages=3) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_F": bf, "BLOCK_D": bd, "BLOCK_K": bk, "SPLIT_F": split},
        num_warps=warps,
        num_stages=stages,
    )


FUSED_CONFIGS = {
    16: [_fcfg(16, 64, 64, 128, 8), _fcfg(16, 64, 64, 128, 4), _fcfg(16, 32, 64, 128, 4), _fcfg(16, 64, 64, 64, 8)],
    32: [_fcfg(16, 64, 64, 128, 4), _fcfg(16, 64, 64, 128, 8), _fcfg(32, 64, 64, 128, 4), _fcfg(32, 64, 64, 128, 8)],
    64: [_fcfg(64, 64, 64, 128, 4), _fcfg(64, 64, 64, 128, 8), _fcfg(32, 64, 64, 128, 4), _fcfg(32, 64, 64, 128, 8),
         _fcfg(64, 32, 64, 128, 8)],
    128: [_fcfg(64, 64, 64, 128, 4), _fcfg(64, 64, 64, 128, 8), _fcfg(64, 32, 64, 128, 8), _fcfg(64, 64, 64, 64, 4),
          _fcfg(128, 64, 64, 64, 2, warps=8)],
}  # fmt: skip


def fused_bucket(m: int) -> int:
    """Autotuning key for the row count: the next power of two from 16."""
    return max(16, triton.next_power_of_2(m))


# Under the interpreter: small tiles, so test shapes cross several tiles in each dim and
# GEMM2 splits.
_INTERPRETER_CONFIG = _fcfg(16, 32, 32, 32, 2, stages=1)


def _configs_for(m: int) -> list[triton.Config]:
    if interpreting():
        return [_INTERPRETER_CONFIG]
    configs = FUSED_CONFIGS[min(fused_bucket(m), max(FUSED_CONFIGS))]
    return configs if autotune_enabled() else configs[:1]


def _prune(configs, named_args, **kwargs):
    wanted = {_config_key(c) for c in _configs_for(named_args["M"])}
    keep = [c for c in configs if _config_key(c) in wanted]
    return keep or configs[:1]


def _all_configs() -> list[triton.Config]:
    if interpreting():
        # a second (never chosen) config makes the autotuner consult the pruner
        return [_INTERPRETER_CONFIG, _fcfg(16, 32, 32, 32, 1, stages=1)]
    return _unique(c for configs in FUSED_CONFIGS.values() for c in configs)


_fused_mlp = triton.autotune(
    configs=_all_configs(),
    key=["M_BUCKET", "D", "F", "stride_w1k", "stride_w2k"],
    prune_configs_by={"early_config_prune": _prune},
)(fused_mlp_kernel)


# ---------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------

_workspaces: dict = {}


def _workspace(device: torch.device, dtype: torch.dtype, h_elems: int, partial_elems: int, counters: int):
    """(h, fp32 partials, int32 counters) for one device and stream, grown as needed and
    kept between launches: launches on one stream run in order, and each leaves the
    counters at zero."""
    stream = torch._C._cuda_getCurrentRawStream(device.index or 0) if device.type == "cuda" else 0
    key = (device, stream, dtype)
    h, partial, count = _workspaces.get(key, (None, None, None))
    if h is None or h.numel() < h_elems:
        h = torch.empty(max(h_elems, 1 << 16), dtype=dtype, device=device)
    if partial is None or partial.numel() < partial_elems:
        partial = torch.empty(max(partial_elems, 1 << 16), dtype=torch.float32, device=device)
    if count is None or count.numel() < counters:
        count = torch.zeros(max(counters, 1024), dtype=torch.int32, device=device)
    _workspaces[key] = (h, partial, count)
    return h, partial, count


def _sizes(m: int, d: int, f: int) -> tuple[int, int, int]:
    """(h elements, partial elements, counters) for the largest layout any config of m's
    bucket may take."""
    partial, counters = 0, 0
    for c in _configs_for(m):
        bm, bd, split = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_D"], c.kwargs["SPLIT_F"]
        tiles = triton.cdiv(m, bm) * triton.cdiv(d, bd)
        partial = max(partial, tiles * bm * bd * split)
        counters = max(counters, 2 * triton.cdiv(m, bm) + tiles)
    return m * f, partial, counters


@functools.lru_cache(maxsize=None)
def fused_mlp_enabled() -> bool:
    """GELUGEMM_FUSED_MLP=0 turns the one-launch path off (read once; see the module's
    docstring for when to). It is off too for an MPS client whose environment limits its
    share of the SMs (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE below 100); a limit set by the MPS
    control daemon alone is not visible here, hence the switch."""
    if os.environ.get("GELUGEMM_FUSED_MLP", "1") in ("", "0"):
        return False
    share = os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "").strip()
    try:
        return not share or float(share) >= 100
    except ValueError:
        return True


def fused_mlp_applies(m: int, w1: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the op runs a float MLP of m rows in this one launch (small weights, few
    rows: see FUSED_MAX_WEIGHT and FUSED_MAX_M; not with GELUGEMM_FUSED_MLP=0)."""
    return (
        0 < m <= FUSED_MAX_M
        and w1.numel() <= FUSED_MAX_WEIGHT
        and w2.numel() <= FUSED_MAX_WEIGHT
        and fused_mlp_enabled()
    )


_plans: dict = {}


def fused_mlp(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None = None,
    *,
    activation: str = "erf",
    weight_layout: str | WeightLayout = "out_in",
    allow_tf32: bool = False,
) -> torch.Tensor:
    """GELU(x @ W1^T + b1) @ W2^T + b2 in one launch; x [..., d_model] fp16, bf16 or fp32,
    the weights and biases in x's dtype, W1 [d_ff, d_model] and W2 [d_model, d_ff] (or
    [in, out] with weight_layout="in_out"). Returns [..., d_model] in x's dtype.
    activation: the GELU flavour ("erf", "tanh", "quick"); allow_tf32: fp32 only."""
    signature = (
        x.shape, x.stride(), x.dtype, x.device, tensor_signature(w1), tensor_signature(w2),
        tensor_signature(b1), tensor_signature(b2), activation, weight_layout, allow_tf32,
    )  # fmt: skip
    plan = _plans.get(signature)
    if plan is None:
        plan = _plan(x, w1, b1, w2, b2, activation, WeightLayout.parse(weight_layout), allow_tf32)
        _plans[signature] = plan
    grid, scalars, constexprs, key, sizes, slot, d = plan
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # a view where strides allow
    y = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return y
    h, partial, counters = _workspace(x.device, x.dtype, *sizes)
    args = (x2, w1, b1, w2, b2, y, h, partial, counters, *scalars)
    launch(_fused_mlp, grid, args, constexprs, key, slot=slot)
    return y


def _plan(x, w1, b1, w2, b2, activation, layout: WeightLayout, allow_tf32):
    if activation not in GELU_FLAVOURS:
        raise LaunchError(f"activation must be one of {GELU_FLAVOURS}, got {activation!r}")
    if x.dtype not in FLOAT_DTYPES.values():
        raise LaunchError(f"input dtype must be fp16, bf16 or fp32, got {x.dtype}")
    for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise LaunchError(f"{name} dtype {t.dtype} differs from input dtype {x.dtype}")
        if t.device != x.device:
            raise LaunchError(f"{name} is on {t.device} but x is on {x.device}")
    for name, w in (("w1", w1), ("w2", w2)):
        if w.dim() != 2:
            raise LaunchError(f"{name} must be 2-D, got shape {tuple(w.shape)}")
    d = x.shape[-1]
    k1, f = layout.kn_shape(w1)
    k2, n2 = layout.kn_shape(w2)
    if k1 != d:
        raise LaunchError(f"w1 takes {k1} inputs but x has {d} features")
    if (k2, n2) != (f, d):
        raise LaunchError(f"w2 must map d_ff={f} to d_model={d}; its shape is {tuple(w2.shape)} ({layout.value})")
    for name, b, n in (("b1", b1, f), ("b2", b2, d)):
        if b is not None and (b.dim() != 1 or b.shape[0] != n or b.stride(0) != 1):
            raise LaunchError(f"{name} must be a contiguous [{n}] vector, got shape {tuple(b.shape)}")
    x2 = x if x.dim() == 2 else x.reshape(-1, d)  # as fused_mlp reshapes it
    m = x2.shape[0]
    stride_xm, stride_xk = x2.stride()
    stride_w1k, stride_w1n = layout.kn_strides(w1)
    stride_w2k, stride_w2n = layout.kn_strides(w2)
    programs = 1 if interpreting() else num_programs(x.device)

    def grid(meta):
        bm = meta["BLOCK_M"]
        units = triton.cdiv(m, bm) * (triton.cdiv(f, meta["BLOCK_F"]) + triton.cdiv(d, meta["BLOCK_D"]) * meta["SPLIT_F"])
        return (min(programs, units),)

    # The units loop strides by the SM count (NUM_PROGRAMS); with fewer units than SMs the
    # grid has one program per unit, each running one.
    constexprs = dict(
        HAS_B1=b1 is not None,
        HAS_B2=b2 is not None,
        ACTIVATION=activation,
        DOT_F32=interpreting() and x.dtype == torch.bfloat16,
        INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
        INTERPRETER=interpreting(),
    )
    scalars = (m, d, f, fused_bucket(m), programs, stride_xm, stride_xk, stride_w1k, stride_w1n, stride_w2k, stride_w2n, d)
    key = ("fused", x.dtype, m, d, f, stride_xm, stride_xk, stride_w1k, stride_w1n, stride_w2k, stride_w2n,
           activation, allow_tf32, b1 is not None, b2 is not None)  # fmt: skip
    return grid, scalars, constexprs, key, _sizes(m, d, f), [None], d
