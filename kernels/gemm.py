"""Fused GEMM + bias + GELU in Triton: out = act(a @ B + bias), float32 accumulation.

This is the float half of the op: GEMM1 runs with `activation="erf"` or `"tanh"`, GEMM2
with `activation="none"`. `a` is fp16, bf16 or fp32; the weight has a's dtype and is read
in place in either layout (`out_in`: nn.Linear's [N, K]; `in_out`: Conv1D's [K, N]).

Two kernels share one epilogue (`_bias_act`):

- `_gemm_tma_kernel`, the Hopper path: a persistent grid (one program per SM walking
  output tiles in grouped order) that loads and stores through TMA tensor descriptors.
  It needs unit stride along the last dim and 16-byte aligned rows.
- `_gemm_strided_kernel`: any strides and alignment, one program per output tile. It is
  also the decode path (M <= 16): there the cost is reading the weight once, and a
  tile-per-program grid with small N tiles keeps every SM streaming weight bytes.

`gemm_bias_act` is the launcher: it flattens leading dims, checks shapes, dtypes,
strides and devices, picks the kernel, and allocates the output.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from kernels.errors import LaunchError
from kernels.schemes import GELU_FLAVOURS
from kernels.launch import device_capability, ensure_tma_allocator, interpreting, launch, num_programs

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = ("none",) + GELU_FLAVOURS
# At or below this many rows a GEMM is bound by reading its weight: use a decode path.
DECODE_MAX_M = 16
# The float decode kernel streams the weight once for up to this many rows (BLOCK_M up
# to 128); on an H100 a 4096x16384 MLP stays bound by its weight bytes up to about here.
FLOAT_DECODE_MAX_M = 128


def m_bucket(m: int) -> int:
    """Autotuning key for the row count: nearby token counts share one tuned config."""
    for bound in (16, 64, 256, 1024, 4096):
        if m <= bound:
            return bound
    return 16384


# ---------------------------------------------------------------------------------------
# Shared device functions
# ---------------------------------------------------------------------------------------


@triton.jit
def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    # Grouped order: GROUP_M row blocks walk the N tiles together, so the band of the
    # weight they share is still in L2 when the next row block reads it.
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile_id // tiles_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % tiles_per_group) % group_rows
    pid_n = (tile_id % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # DOT_F32 upcasts the tiles first. The launcher sets it only for bf16 under the CPU
    # interpreter, whose bf16 tl.dot returns garbage: every other step of the bf16
    # kernel (loads, masks, epilogue, the bf16 store) still runs as on the GPU.
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # One return at the end: Triton 3.6 generates the statements after a return inside
    # an `if` too, so an early return would emit a second, wrongly typed dot.
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    elif a.dtype == tl.int8:
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # int8 x int8 accumulates in int32
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _gelu(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "erf":
        # exact GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "tanh":
        # tanh GELU: 0.5 * x * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 x^3),
        # which equals x * sigmoid(2u); written with sigmoid because libdevice's tanh
        # does not run under the interpreter.
        x = x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))
    elif ACTIVATION == "quick":
        # CLIP's quick GELU: x * sigmoid(1.702 x)
        x = x * tl.sigmoid(1.702 * x)
    return x


@triton.jit
def _bias_act(acc, bias_ptr, offs_n, N, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    return _gelu(acc, ACTIVATION)


# ---------------------------------------------------------------------------------------
# Configs: keyed by m_bucket(M); the CPU interpreter gets one small config that makes
# odd test shapes cross several tiles in each dim.
# ---------------------------------------------------------------------------------------


def _cfg(bm, bn, bk, warps, stages, group_m=8, **extra):
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, **extra},
        num_warps=warps,
        num_stages=stages,
    )


_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}

# Decode (M <= 128) through TMA, swap-AB, split-K; see _gemm_decode_kernel. Every config
# of a bucket has BLOCK_M >= the bucket's largest M: one M tile holds all rows.
DECODE_CONFIGS = {
    16: [
        _cfg(16, 64, 256, 4, 4),
        _cfg(16, 64, 128, 4, 6),
        _cfg(16, 128, 128, 4, 4),
        _cfg(16, 128, 256, 4, 3),
        _cfg(16, 64, 512, 4, 3),
        _cfg(16, 64, 64, 4, 4),  # fits fp32 tiles
    ],
    64: [_cfg(64, 64, 128, 4, 4), _cfg(64, 128, 128, 4, 3), _cfg(64, 64, 64, 4, 4)],
    256: [_cfg(128, 64, 128, 4, 3), _cfg(128, 128, 64, 8, 4), _cfg(128, 64, 64, 4, 3)],
}

STRIDED_CONFIGS = {
    # decode without TMA: stream the weight; small N tiles give enough programs
    16: [
        _cfg(16, 32, 256, 4, 4),
        _cfg(16, 64, 128, 4, 5),
        _cfg(16, 64, 256, 4, 4),
        _cfg(16, 128, 128, 4, 4),
    ],
    64: [_cfg(64, 64, 64, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(32, 64, 128, 4, 4), _cfg(64, 64, 32, 4, 3)],
    "large": [
        _cfg(128, 128, 64, 8, 3),
        _cfg(128, 128, 32, 4, 4),
        _cfg(64, 128, 64, 4, 4),
        _cfg(128, 256, 64, 8, 3),
    ],
}

# Each list ends or starts with a config small enough for fp32 tiles' shared memory.
TMA_CONFIGS = {
    64: [_cfg(64, 64, 128, 4, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 128, 128, 4, 3), _cfg(64, 64, 32, 4, 3)],
    256: [_cfg(64, 128, 64, 4, 4), _cfg(128, 128, 64, 8, 4), _cfg(64, 256, 64, 8, 4), _cfg(64, 128, 32, 4, 3)],
    # Measured on the H100 (bench/RESULTS.md): 128x256x64 with the subtiled epilogue
    # and a flattened or warp-specialized tile loop led at M >= 2048.
    "large": [
        _cfg(128, 256, 64, 8, 3, EPILOGUE_SUBTILE=True, FLATTEN=True),
        _cfg(128, 256, 64, 8, 3, EPILOGUE_SUBTILE=True, WARP_SPECIALIZE=True),
        _cfg(128, 256, 64, 8, 3, FLATTEN=True),
        _cfg(128, 128, 64, 8, 4, FLATTEN=True),
        _cfg(128, 128, 64, 4, 4, EPILOGUE_SUBTILE=True, FLATTEN=True),
        _cfg(128, 128, 32, 8, 3),  # fits fp32 tiles
    ],
}


def _all_configs(table, **interpreter_extra):
    if interpreting():
        return [triton.Config({**_INTERPRETER_CONFIG, **interpreter_extra}, num_warps=4, num_stages=1)]
    return [c for cfgs in table.values() for c in cfgs]


# Hopper gives a block 227 KB of shared memory, less a little for barriers.
_SMEM_BUDGET = 226 * 1024


def _smem_bytes(config: triton.Config, a_bytes: int, b_bytes: int) -> int:
    """Estimated shared memory: the pipelined A and B tiles plus the output staging tile."""
    kw = config.kwargs
    per_stage = kw["BLOCK_M"] * kw["BLOCK_K"] * a_bytes + kw["BLOCK_K"] * kw["BLOCK_N"] * b_bytes
    return per_stage * config.num_stages + kw["BLOCK_M"] * kw["BLOCK_N"] * a_bytes


def autotune_enabled() -> bool:
    """GELUGEMM_AUTOTUNE=0 skips the search and takes each bucket's first config."""
    return os.environ.get("GELUGEMM_AUTOTUNE", "1") not in ("", "0")


def _prune_for(table):
    # Bench only the configs written for this M bucket: the smallest table key at or
    # above it, else the "large" list.
    def prune(configs, named_args, **kwargs):
        if interpreting():
            return configs
        bucket = named_args["M_BUCKET"]
        sizes = [k for k in table if k != "large" and k >= bucket]
        wanted = table[min(sizes)] if sizes else table["large"]
        a_bytes = named_args["a_ptr"].element_size()
        b_bytes = named_args["b_ptr"].element_size()
        keys = {(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) for c in wanted}
        keep = [c for c in configs if (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages) in keys]
        # fp32 tiles take twice the shared memory of fp16 ones: drop configs that cannot fit.
        fits = [c for c in keep if _smem_bytes(c, a_bytes, b_bytes) <= _SMEM_BUDGET]
        keep = fits or sorted(keep, key=lambda c: _smem_bytes(c, a_bytes, b_bytes))[:1]
        return keep if autotune_enabled() else keep[:1]

    return prune


def _autotune_kwargs():
    # Autotune results persist in Triton's cache dir where this Triton supports it, so a
    # second process skips the search.
    import inspect

    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.autotune(
    configs=_all_configs(STRIDED_CONFIGS),
    key=["M_BUCKET", "N", "K", "stride_bk", "stride_bn"],
    prune_configs_by={"early_config_prune": _prune_for(STRIDED_CONFIGS)},
    **_autotune_kwargs(),
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _gemm_strided_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge read row/column 0 (in bounds) and are dropped by the
    # store mask, which keeps M and N masks out of the main loop.
    rows = tl.where(offs_m < M, offs_m, 0)
    cols = tl.where(offs_n < N, offs_n, 0)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - ki * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _dot(a, b, acc, DOT_F32, INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    out = _bias_act(acc, bias_ptr, offs_n, N, HAS_BIAS, ACTIVATION)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(
    configs=_all_configs(TMA_CONFIGS, EPILOGUE_SUBTILE=True),
    key=["M_BUCKET", "N", "K", "B_IS_NK"],
    prune_configs_by={"early_config_prune": _prune_for(TMA_CONFIGS)},
    **_autotune_kwargs(),
)
@triton.jit
def _gemm_tma_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_b, stride_cm,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, B_IS_NK: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLATTEN: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False, EPILOGUE_SUBTILE: tl.constexpr = False,
):  # fmt: skip
    # B_IS_NK: the weight is stored [N, K] (nn.Linear), read as [BLOCK_N, BLOCK_K] tiles
    # and transposed in registers; otherwise it is [K, N] (Conv1D), read as is.
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_IS_NK:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1], block_shape=[BLOCK_K, BLOCK_N])
    # EPILOGUE_SUBTILE stores the tile as two [BLOCK_M, BLOCK_N / 2] halves: half the
    # shared memory for the output staging buffer, which leaves room for a deeper pipeline.
    if EPILOGUE_SUBTILE:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N // 2])
    else:
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])
    out_dtype = c_ptr.dtype.element_ty

    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(
        tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE
    ):
        pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            if B_IS_NK:
                b = b_desc.load([off_n, ki * BLOCK_K]).T
            else:
                b = b_desc.load([ki * BLOCK_K, off_n])
            acc = _dot(a, b, acc, DOT_F32, INPUT_PRECISION)
        # TMA clips stores at the tensor's edge: no mask needed.
        if EPILOGUE_SUBTILE:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            acc0, acc1 = tl.split(halves)
            offs_n = off_n + tl.arange(0, BLOCK_N // 2)
            out0 = _bias_act(acc0, bias_ptr, offs_n, N, HAS_BIAS, ACTIVATION)
            c_desc.store([off_m, off_n], out0.to(out_dtype))
            out1 = _bias_act(acc1, bias_ptr, offs_n + BLOCK_N // 2, N, HAS_BIAS, ACTIVATION)
            c_desc.store([off_m, off_n + BLOCK_N // 2], out1.to(out_dtype))
        else:
            out = _bias_act(acc, bias_ptr, off_n + tl.arange(0, BLOCK_N), N, HAS_BIAS, ACTIVATION)
            c_desc.store([off_m, off_n], out.to(out_dtype))


def _decode_candidates(m: int) -> list:
    """The decode configs autotuning may pick for m rows (the interpreter's one config)."""
    if interpreting():
        return _gemm_decode_kernel.configs
    sizes = [k for k in DECODE_CONFIGS if k >= m_bucket(m)]
    return DECODE_CONFIGS[min(sizes)]


def _decode_split_k(args) -> int:
    # Enough programs for about two per SM: GEMM2 of a decode step has few N tiles and a
    # long K, so its K range is split, keeping at least four K tiles per split for the
    # pipeline to work with.
    tiles_n = triton.cdiv(args["N"], args["BLOCK_N"])
    k_tiles = triton.cdiv(args["K"], args["BLOCK_K"])
    want = triton.cdiv(2 * args["NUM_SMS"], tiles_n)
    return max(1, min(want, k_tiles // 4))


@triton.autotune(
    configs=_all_configs(DECODE_CONFIGS, BLOCK_M=FLOAT_DECODE_MAX_M),
    key=["M_BUCKET", "N", "K", "B_IS_NK"],
    prune_configs_by={"early_config_prune": _prune_for(DECODE_CONFIGS)},
    **_autotune_kwargs(),
)
@triton.heuristics({"SPLIT_K": _decode_split_k})
@triton.jit
def _gemm_decode_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, partial_ptr, arrivals_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_b, stride_cm,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, B_IS_NK: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):  # fmt: skip
    # Decode: M <= BLOCK_M rows, so the cost is streaming the weight once. Swap AB:
    # out^T = W @ a^T puts a weight tile on the MMA's wide side and the few tokens on its
    # narrow side. Program (pid_n, pid_k) covers BLOCK_N outputs over the pid_k-th share
    # of K; the weight arrives through TMA, several tiles in flight.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_IS_NK:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_b, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[stride_b, 1], block_shape=[BLOCK_K, BLOCK_N])
    off_n = pid_n * BLOCK_N
    k_tiles = tl.cdiv(K, BLOCK_K)
    k_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * k_per_split
    k_last = tl.minimum(k_first + k_per_split, k_tiles)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for ki in range(k_first, k_last):
        a = a_desc.load([0, ki * BLOCK_K])
        if B_IS_NK:
            w = b_desc.load([off_n, ki * BLOCK_K])
        else:
            w = b_desc.load([ki * BLOCK_K, off_n]).T
        acc = _dot(w, a.T, acc, DOT_F32, INPUT_PRECISION)

    offs_n = off_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:
        # Serial split-K: each split writes its partial sum; the last split to arrive for
        # this N tile (counted by an acq_rel atomic, so the other partials are visible)
        # adds them up, runs the epilogue, and zeroes the counter for the next launch.
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + offs_m[None, :]
        slots = partial_ptr + pid_n * (SPLIT_K * BLOCK_N * BLOCK_M)
        tl.store(slots + pid_k * (BLOCK_N * BLOCK_M) + tile, acc)
        arrived = tl.atomic_add(arrivals_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for split in range(SPLIT_K):
                total += tl.load(slots + split * (BLOCK_N * BLOCK_M) + tile, cache_modifier=".cg")
            tl.store(arrivals_ptr + pid_n, 0)
            out = _bias_act(total.T, bias_ptr, offs_n, N, HAS_BIAS, ACTIVATION)
            tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        out = _bias_act(acc.T, bias_ptr, offs_n, N, HAS_BIAS, ACTIVATION)
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=c_mask)


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------


_split_k_workspaces: dict = {}


def _split_k_workspace(device: torch.device, partial_elems: int, tiles: int):
    """(fp32 partial sums, int32 arrival counters) for split-K decode.

    One pair per device and stream, kept between launches: launches on one stream run in
    order and each leaves its counters at zero, so the buffers need no clearing."""
    stream = torch._C._cuda_getCurrentRawStream(device.index or 0) if device.type == "cuda" else 0
    key = (device, stream)
    partial, arrivals = _split_k_workspaces.get(key, (None, None))
    if partial is None or partial.numel() < partial_elems:
        partial = torch.empty(max(partial_elems, 1 << 16), dtype=torch.float32, device=device)
    if arrivals is None or arrivals.numel() < tiles:
        arrivals = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
    _split_k_workspaces[key] = (partial, arrivals)
    return partial, arrivals


def triton_can_run(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, or on the CPU under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def _tma_supported(device: torch.device) -> bool:
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    if device.type == "cpu":
        return interpreting()
    return device_capability(device)[0] >= 9


def _tma_aligned(t: torch.Tensor, major_stride: int) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and (major_stride * size) % 16 == 0


def weight_strides(w: torch.Tensor, weight_layout: str) -> tuple[int, int]:
    """(stride along K, stride along N) of a weight stored in `weight_layout`."""
    if weight_layout == "out_in":
        return w.stride(1), w.stride(0)
    if weight_layout == "in_out":
        return w.stride(0), w.stride(1)
    raise LaunchError(f"weight_layout must be 'out_in' or 'in_out', got {weight_layout!r}")


def weight_shape(w: torch.Tensor, weight_layout: str) -> tuple[int, int]:
    """(K, N) of a weight stored in `weight_layout`."""
    if w.dim() != 2:
        raise LaunchError(f"weight must be 2-D, got shape {tuple(w.shape)}")
    return (w.shape[1], w.shape[0]) if weight_layout == "out_in" else (w.shape[0], w.shape[1])


def check_operands(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, weight_layout: str, name: str = "weight"):
    """Shape and device checks shared by every launcher; returns (K, N)."""
    k, n = weight_shape(w, weight_layout)
    if k == 0 or n == 0:
        raise LaunchError(f"{name} has an empty dim: {tuple(w.shape)}")
    if a.dim() < 1 or a.shape[-1] != k:
        raise LaunchError(
            f"input's last dim is {a.shape[-1] if a.dim() else 'missing'} but {name} "
            f"{tuple(w.shape)} ({weight_layout}) expects {k}"
        )
    if w.device != a.device:
        raise LaunchError(f"input is on {a.device} but {name} is on {w.device}")
    if bias is not None:
        if bias.shape != (n,):
            raise LaunchError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if bias.device != a.device:
            raise LaunchError(f"input is on {a.device} but bias is on {bias.device}")
        if not bias.dtype.is_floating_point:
            raise LaunchError(f"bias must be floating point, got {bias.dtype}")
    if not triton_can_run(a.device):
        raise LaunchError(f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU); input is on {a.device}")
    return k, n


def _output(out: torch.Tensor | None, shape: tuple, a: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [M, N] buffer a launcher writes: the caller's `out`, checked, or a new one."""
    dtype = dtype or a.dtype
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=a.device)
        return out if len(shape) == 2 else out.reshape(-1, shape[-1])
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != a.device or not out.is_contiguous():
        raise LaunchError(
            f"out must be a contiguous {dtype} tensor of shape {tuple(shape)} on {a.device}; "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    return out.reshape(-1, shape[-1])


@dataclass(frozen=True)
class _Plan:
    """How one call signature launches: kernel, grid, compile-time args, launch-cache key."""

    path: str
    kernel: object
    grid: object
    scalars: tuple  # the runtime ints after the tensor arguments
    constexprs: dict
    key: tuple
    workspace: tuple | None  # (partial elements, tiles) for split-K decode
    slot: list = field(default_factory=lambda: [None])  # launch's direct-launch slot


_plans: dict = {}


def _plan(a, w, bias, m, k, n, activation, weight_layout, allow_tf32, path, a_row_stride, out_aligned) -> _Plan:
    stride_bk, stride_bn = weight_strides(w, weight_layout)
    common = dict(
        HAS_BIAS=bias is not None,
        ACTIVATION=activation,
        DOT_F32=interpreting() and a.dtype == torch.bfloat16,
        INPUT_PRECISION="tf32" if allow_tf32 else "ieee",
    )
    if path not in ("auto", "tma", "decode", "strided"):
        raise LaunchError(f"path must be 'auto', 'tma', 'decode' or 'strided', got {path!r}")
    tma_ok = (
        _tma_supported(a.device)
        and a.stride(-1) == 1
        and (stride_bk == 1 or stride_bn == 1)
        and a.data_ptr() % 16 == 0
        and (a_row_stride * a.element_size()) % 16 == 0
        and _tma_aligned(w, stride_bn if stride_bk == 1 else stride_bk)
        and out_aligned
    )
    if path in ("tma", "decode") and not tma_ok:
        raise LaunchError(f"the {path} path needs TMA: an SM90+ GPU, unit inner strides and 16-byte aligned rows")
    if path == "decode" and m > FLOAT_DECODE_MAX_M:
        raise LaunchError(f"the decode path takes at most {FLOAT_DECODE_MAX_M} rows, got {m}")
    if path == "auto":
        path = ("decode" if m <= FLOAT_DECODE_MAX_M else "tma") if tma_ok else "strided"
    key = (path, a.dtype, None if bias is None else bias.dtype, m, n, k, a_row_stride, a.stride(-1),
           stride_bk, stride_bn, activation, allow_tf32)  # fmt: skip

    if path == "strided":

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        scalars = (m, n, k, m_bucket(m), a_row_stride, a.stride(-1), stride_bk, stride_bn, n)
        return _Plan(path, _gemm_strided_kernel, grid, scalars, common, key, None)

    b_is_nk = stride_bk == 1
    sms = num_programs(a.device)
    scalars = (m, n, k, m_bucket(m), a_row_stride, stride_bn if b_is_nk else stride_bk, n)
    constexprs = dict(B_IS_NK=b_is_nk, NUM_SMS=sms, **common)
    if path == "tma":

        def grid(meta):
            return (min(sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

        return _Plan(path, _gemm_tma_kernel, grid, scalars, constexprs, key, None)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])

    # Sized for the largest split-K layout among the configs autotuning may pick:
    # BLOCK_N * BLOCK_M fp32 partial sums per split of each N tile.
    configs = _decode_candidates(m)
    partial_elems = max(
        triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_M"]
        * _decode_split_k(dict(N=n, K=k, NUM_SMS=sms, BLOCK_N=c.kwargs["BLOCK_N"], BLOCK_K=c.kwargs["BLOCK_K"]))
        for c in configs
    )  # fmt: skip
    workspace = (partial_elems, max(triton.cdiv(n, c.kwargs["BLOCK_N"]) for c in configs))
    return _Plan(path, _gemm_decode_kernel, grid, scalars, constexprs, key, workspace)


def gemm_bias_act(
    a: torch.Tensor,
    w: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    weight_layout: str = "out_in",
    allow_tf32: bool = False,
    path: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """act(a @ W^T + bias) for a of shape [..., K]; returns [..., N] in a's dtype.

    activation: "none", "erf" (exact GELU) or "tanh" (approximate GELU).
    weight_layout: "out_in" for W stored [N, K], "in_out" for W stored [K, N].
    allow_tf32: let fp32 inputs use TF32 tensor cores (about 1e-3 relative error).
    path: "auto", "tma", "decode" (M <= 16) or "strided"; "tma" and "decode" raise if
        TMA cannot take the inputs.
    out: a contiguous [..., N] tensor of a's dtype to write into (else one is allocated).
    """
    # Every check below depends only on this signature: a repeated call skips them. It holds
    # the alignment of every tensor the kernel reads, which Triton specializes on, so a plan
    # can launch its compiled kernel directly (launch's slot).
    signature = (
        a.shape, a.stride(), a.dtype, a.device, a.data_ptr() % 16 == 0,
        w.shape, w.stride(), w.dtype, w.device, w.data_ptr() % 16 == 0,
        None if bias is None else (bias.shape, bias.dtype, bias.device, bias.data_ptr() % 16 == 0),
        activation, weight_layout, allow_tf32, path,
    )  # fmt: skip
    plan = _plans.get(signature)
    if plan is None or out is not None:
        if activation not in ACTIVATIONS:
            raise LaunchError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if a.dtype not in FLOAT_DTYPES:
            raise LaunchError(f"input dtype must be fp16, bf16 or fp32, got {a.dtype}")
        if w.dtype != a.dtype:
            raise LaunchError(f"weight dtype {w.dtype} differs from input dtype {a.dtype}")
        k, n = check_operands(a, w, bias, weight_layout)
    else:
        n = plan.scalars[1]
        k = plan.scalars[2]
    # A reshape costs microseconds of host time even as a no-op: 2-D a skips it (else a
    # view where strides allow; the kernels take any row stride).
    flat = a.dim() == 2
    a2 = a if flat else a.reshape(-1, k)
    m = a2.shape[0]
    out2 = _output(out, (*a.shape[:-1], n), a)
    if m == 0:
        return out2.reshape(*a.shape[:-1], n)
    # An output we allocate is always 16-byte aligned with rows of n elements; a caller's
    # may not be, and then takes a plan of its own that is not kept.
    out_aligned = out is None or (out2.data_ptr() % 16 == 0 and (n * out2.element_size()) % 16 == 0)
    if plan is None or not out_aligned:
        plan = _plan(a2, w, bias, m, k, n, activation, weight_layout, allow_tf32, path, a2.stride(0), out_aligned)
        if out_aligned:
            _plans[signature] = plan
    bias_arg = bias if bias is not None else out2  # never read when HAS_BIAS is False
    if plan.workspace is None:
        args = (a2, w, out2, bias_arg, *plan.scalars)
    else:
        partial, arrivals = _split_k_workspace(a.device, *plan.workspace)
        args = (a2, w, out2, bias_arg, partial, arrivals, *plan.scalars)
    if plan.path != "strided":
        ensure_tma_allocator()
    launch(plan.kernel, plan.grid, args, plan.constexprs, plan.key, slot=plan.slot if out_aligned else None)
    return out2 if flat else out2.reshape(*a.shape[:-1], n)
