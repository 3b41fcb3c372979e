"""Tensor parallelism for the MLP, Megatron-style, over torch.distributed.

    rank r of R holds W1's output rows [s_r, e_r) (a slice of d_ff), b1's, and the same
    slice of W2's input columns; it computes

        y_r = GELU(x @ W1[s_r:e_r]^T + b1[s_r:e_r]) @ W2[:, s_r:e_r]^T

    with no communication between the two GEMMs (each rank's GELU sees whole rows of its own
    slice of the intermediate), then one all-reduce sums the y_r and b2 is added once, after it.

int8 weights are split with their scales: W1's per-channel (or per-group) scales follow its
rows; W2's per-channel scales are per output channel (d_model), so every rank keeps all of
them, and its group scales are split along d_ff with the columns (shard edges fall on group
edges). Static activation scales (x's, the GELU output's) are the same on every rank.
w8a8 `dynamic` quantizes each rank's slice of the GELU output with its own per-row scale: a
row's scale covers d_ff / R columns instead of d_ff, a finer grid than one GPU's, so the result
differs from one GPU's (about 1% relative on MiniLM) and is a little more accurate (bench/
tp_accuracy.py, bench/RESULTS.md section 10). Every other scheme computes one GPU's int8
products; each rank's partial output is rounded to the output dtype before the all-reduce.

    shard = shard_mlp_weights(w1, b1, w2, layout, rank, world)      # this rank's (w1, b1, w2)
    tp = TensorParallelMLP(FusedGeluMLP(*shard, None, config), b2)  # b2 added after the all-reduce
    y = tp(x)                                                        # the same on every rank

`tensor_parallel_in_one_process` computes what R ranks of it compute, one shard after the
other in one process (no process group): to see on one device what a split changes.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from kernels.errors import GelugemmError
from kernels.module import FusedGeluMLP
from kernels.quantized import QuantizedWeight
from kernels.schemes import WeightLayout

# Shard edges fall on multiples of this (when d_ff allows): whole 128-column groups, and
# rows whose bytes keep TMA's 16-byte alignment for int8 and 16-bit operands.
SHARD_ALIGN = 128


class ShardError(GelugemmError, ValueError):
    """An MLP cannot be split this way (d_ff too small for the ranks, group edges)."""


def shard_bounds(d_ff: int, world: int, rank: int, align: int = SHARD_ALIGN) -> tuple[int, int]:
    """[start, stop) of rank's slice of d_ff: contiguous, as equal as `align` allows.

    Every slice but the last is a multiple of `align`; with fewer than `world` blocks of
    `align`, align drops to 1 (odd test sizes). Raises ShardError if a rank would get nothing.
    """
    if not 0 <= rank < world:
        raise ShardError(f"rank {rank} is not in a world of {world}")
    if d_ff < world:
        raise ShardError(f"d_ff={d_ff} cannot be split over {world} ranks")
    if d_ff // align < world:
        align = 1
    blocks = math.ceil(d_ff / align)
    per_rank = blocks // world
    extra = blocks % world  # the first `extra` ranks take one block more
    start_block = rank * per_rank + min(rank, extra)
    stop_block = start_block + per_rank + (1 if rank < extra else 0)
    return start_block * align, min(stop_block * align, d_ff)


def _rows(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return t[start:stop].contiguous()


def _cols(t: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    return t[:, start:stop].contiguous()


def _shard_quantized(w: QuantizedWeight, bounds: tuple[int, int], *, along_n: bool, layout: WeightLayout) -> QuantizedWeight:
    """W1's output rows (along_n) or W2's input columns of a QuantizedWeight, with its scales."""
    start, stop = bounds
    # The stored data is [N, K] (out_in) or [K, N] (in_out): pick the axis that holds the slice.
    data_axis_is_rows = along_n == (layout == WeightLayout.OUT_IN)
    data = _rows(w.data, start, stop) if data_axis_is_rows else _cols(w.data, start, stop)
    if along_n:
        scale = _rows(w.scale, start, stop)  # [N] or [N, groups]: one row per output channel
    elif w.group_size is None:
        scale = w.scale  # per output channel of W2 (d_model): every rank keeps them all
    else:
        g = w.group_size
        if start % g or (stop % g and stop != w.data.shape[0 if layout == WeightLayout.IN_OUT else 1]):
            raise ShardError(f"shard [{start}, {stop}) of d_ff does not fall on W2's group edges (group {g})")
        scale = _cols(w.scale, start // g, -(-stop // g))
    return QuantizedWeight(data, scale, w.group_size, w.input_scale, w.output_scale, w.smooth_scale)


def shard_mlp_weights(
    w1: torch.Tensor | QuantizedWeight,
    b1: torch.Tensor | None,
    w2: torch.Tensor | QuantizedWeight,
    weight_layout: str | WeightLayout,
    rank: int,
    world: int,
) -> tuple:
    """This rank's (w1, b1, w2): W1's rows and W2's columns of its slice of d_ff (in the
    stored layout, contiguous), for float tensors or QuantizedWeights alike."""
    layout = WeightLayout.parse(weight_layout)
    data1 = w1.data if isinstance(w1, QuantizedWeight) else w1
    d_ff = data1.shape[0] if layout == WeightLayout.OUT_IN else data1.shape[1]
    group = getattr(w1, "group_size", None) or getattr(w2, "group_size", None) or 1
    bounds = shard_bounds(d_ff, world, rank, align=math.lcm(SHARD_ALIGN, group))
    start, stop = bounds
    if isinstance(w1, QuantizedWeight):
        w1_r = _shard_quantized(w1, bounds, along_n=True, layout=layout)
        w2_r = _shard_quantized(w2, bounds, along_n=False, layout=layout)
    elif layout == WeightLayout.OUT_IN:
        w1_r, w2_r = _rows(w1, start, stop), _cols(w2, start, stop)
    else:
        w1_r, w2_r = _cols(w1, start, stop), _rows(w2, start, stop)
    return w1_r, None if b1 is None else b1[start:stop].contiguous(), w2_r


class TensorParallelMLP(nn.Module):
    """One rank's shard of the MLP and the all-reduce that completes it.

    shard: a FusedGeluMLP holding this rank's W1 rows, b1 slice and W2 columns, built
        without b2 (b2 must be added once, not once per rank).
    b2: the full second bias, or None.
    group: the process group the MLP is split over (None: the default group).
    """

    def __init__(self, shard: FusedGeluMLP, b2: torch.Tensor | None, group=None):
        super().__init__()
        if shard.b2 is not None:
            raise ShardError("the shard must be built without b2: TensorParallelMLP adds it once, after the all-reduce")
        self.shard = shard
        self.group = group
        self.register_buffer("b2", None if b2 is None else b2.detach())
        self.d_model = shard.d_model

    @property
    def backend(self) -> str:
        return self.shard.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.shard(x)
        dist.all_reduce(y, group=self.group)
        return _add_b2(y, self.b2)


def _add_b2(y: torch.Tensor, b2: torch.Tensor | None) -> torch.Tensor:
    return y if b2 is None else y + b2.to(y.dtype)


def tensor_parallel_in_one_process(
    w1: torch.Tensor | QuantizedWeight,
    b1: torch.Tensor | None,
    w2: torch.Tensor | QuantizedWeight,
    b2: torch.Tensor | None,
    config,
    x: torch.Tensor,
    world: int,
) -> torch.Tensor:
    """What `world` ranks of TensorParallelMLP return for x, computed rank after rank here:
    each rank's FusedGeluMLP shard (shard_mlp_weights), the partial outputs summed in rank
    order in their dtype (an all-reduce may add them in another order: with more than two
    ranks the sum's last bit can differ), then b2. Plain (not gated) MLPs."""
    if config.gated:
        raise ShardError("tensor_parallel_in_one_process splits plain MLPs; a gated MLP's shards come from load_tp_mlp")
    y = None
    for rank in range(world):
        shard = shard_mlp_weights(w1, b1, w2, config.weight_layout, rank, world)
        partial = FusedGeluMLP(*shard, None, config)(x)
        y = partial if y is None else y + partial
    return _add_b2(y, b2)
