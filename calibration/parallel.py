"""Tensor-parallel MLPs built from a checkpoint, each rank reading only its slice.

    tp = load_tp_mlp("model.safetensors", "encoder.layer.0.intermediate.dense",
                     MLPConfig(dtype="fp16"), rank=dist.get_rank(), world=dist.get_world_size())
    y = tp(x)            # every rank gets the whole MLP's output

W1's rows and W2's columns of the rank's slice of d_ff are read through safetensors slices
(`get_slice(name)[a:b]`, `[:, a:b]`): a rank's reads are its share of the MLP's bytes, never
the whole weight (a gated MLP's up rows too: the gate and up of one output column stay on
one rank). See kernels/parallel.py for the split.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from calibration.checkpoint import MLPLayer, MLPTensors, find_mlps, open_checkpoint
from calibration.errors import CheckpointError
from kernels.module import FusedGeluMLP
from kernels.op import FLOAT_DTYPES, MLPConfig
from kernels.parallel import SHARD_ALIGN, TensorParallelMLP, shard_bounds
from kernels.schemes import WeightLayout


def _finite(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise CheckpointError(f"{name} holds NaN/Inf value(s)")
    return t


def read_mlp_shard(handle, layer: MLPLayer, rank: int, world: int) -> MLPTensors:
    """(w1 rows, b1 slice, w2 columns, b2, and a gated MLP's up rows and slice) of this rank's
    slice of d_ff, as stored, from an open checkpoint. A concatenated gate and up weight
    keeps its form: the rank's gate rows, then its up rows (from the second half)."""
    start, stop = shard_bounds(layer.d_ff, world, rank, SHARD_ALIGN)
    by_rows = WeightLayout.parse(layer.weight_layout) == WeightLayout.OUT_IN  # W1 [d_ff, d_model]

    def rows(name: str | None, offset: int = 0):
        if name is None:
            return None
        sl = handle.get_slice(name)
        if len(sl.get_shape()) == 1:
            return sl[offset + start : offset + stop]
        return sl[offset + start : offset + stop] if by_rows else sl[:, offset + start : offset + stop]

    w2 = handle.get_slice(layer.w2)
    w1_r, b1_r = rows(layer.w1), rows(layer.b1)
    if layer.gated == "concatenated":  # gate rows, then the same rows of the up half
        cat = lambda a, b: None if a is None else torch.cat([a, b], dim=0 if by_rows or a.dim() == 1 else 1)  # noqa: E731
        w1_r, b1_r = cat(w1_r, rows(layer.w1, layer.d_ff)), cat(b1_r, rows(layer.b1, layer.d_ff))
    w2_r = w2[:, start:stop] if by_rows else w2[start:stop]
    b2 = None if layer.b2 is None else handle.get_tensor(layer.b2)
    named = ((layer.w1, w1_r), (layer.b1, b1_r), (layer.w2, w2_r), (layer.b2, b2), (layer.w_up, rows(layer.w_up)),
             (layer.b_up, rows(layer.b_up)))  # fmt: skip
    return MLPTensors(*(None if t is None else _finite(name, t.contiguous()) for name, t in named))


def load_tp_mlp(
    path: str | Path,
    layer_prefix: str,
    config: MLPConfig,
    *,
    rank: int,
    world: int,
    device: str | torch.device | None = None,
    group=None,
) -> TensorParallelMLP:
    """This rank's share of one float MLP of an original checkpoint, named by its fc1 prefix.

    config: the op's config; its weight layout and GELU are the checkpoint's (taken from
        discovery, whatever config says).
    """
    if config.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor-parallel loading from an original checkpoint runs float dtypes; got {config.dtype}")
    layers = {layer.fc1: layer for layer in find_mlps(path)}
    if layer_prefix not in layers:
        raise CheckpointError(f"{path} has no MLP {layer_prefix!r}; it holds {', '.join(layers)}")
    layer = layers[layer_prefix]
    with open_checkpoint(path) as handle:
        w1, b1, w2, b2, w_up, b_up = read_mlp_shard(handle, layer, rank, world)
    config = dataclasses.replace(config, weight_layout=layer.weight_layout, gelu=layer.gelu, gated=layer.is_gated)
    shard = FusedGeluMLP(w1, b1, w2, None, config, device=device, w_up=w_up, b_up=b_up)
    if b2 is not None:
        b2 = b2.to(device=shard.w1.device, dtype=config.torch_dtype)
    return TensorParallelMLP(shard, b2, group=group)
