"""Quantized MLPs as modules: loaded from a quantized checkpoint, swapped into a model.

    mlps = load_mlps("model-int8")                       # {fc1 prefix: FusedGeluMLP}
    swap_mlps(model, mlps)                               # replaces model.layers.{i}.mlp
    model.to("cuda")                                     # moves the int8 weights and scales too
    mlps["encoder.layer.0.intermediate.dense"].backend   # "triton" on CUDA, "torch" elsewhere

Where each MLP goes in a model is explicit: `swap_mlps` asks `find` for the dotted module
path that a checkpoint's fc1 prefix maps to (`bert_mlp_path` by default, the naming of
calibration/bert.py's encoder), or takes a dict {fc1 prefix: module path}.

A quantized checkpoint is one `gelugemm quantize` wrote (file or model directory) or a
compressed-tensors int8 checkpoint another tool wrote (llm-compressor's W8A8 / W8A16).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from calibration.checkpoint import mlps_in, open_checkpoint
from calibration.errors import CheckpointError
from calibration.quantized_file import FormatScheme, QuantizedCheckpoint, is_quantized_checkpoint, open_quantized
from kernels.errors import GelugemmError
from kernels.module import FusedGeluMLP
from kernels.op import MLPConfig


class SwapError(GelugemmError, LookupError):
    """An MLP cannot be put into a model: its prefix has no home there, or the shapes differ."""


def checkpoint_shapes(path: str | Path, gelu: str | None = None) -> tuple[list[tuple[int, int]], str]:
    """(the distinct (d_model, d_ff) of a checkpoint's MLPs, their GELU flavour), for the benchmark.

    A quantized checkpoint: its quantized MLPs; else by discovery. The flavour is `gelu`
    where given, else what config.json or the model family says.
    """
    with open_checkpoint(path) as ckpt:
        layers = QuantizedCheckpoint(ckpt, gelu=gelu).layers if is_quantized_checkpoint(ckpt) else mlps_in(ckpt, gelu=gelu)
    return sorted({(layer.d_model, layer.d_ff) for layer in layers}), gelu or layers[0].gelu


# ---- loading from a quantized checkpoint -------------------------------------------------


def int8_op_fields(scheme: FormatScheme, where: Path | str = "checkpoint") -> dict:
    """The op config fields (beyond dtype) that run a quantized checkpoint's scheme.

    The op's w8a8 runs static activation scales (x's and the GELU output's, from the file);
    checkpoints with dynamic (per-token) or group activations load, but run only once the
    op has those schemes.
    """
    if scheme.scheme != "w8a8":
        return {}
    if scheme.static:
        return {"input_quant": "static"}
    raise CheckpointError(
        f"{where}: w8a8 with {scheme.activations} activations (compressed-tensors strategy "
        f"{scheme.activations.strategy!r}); gelugemm's w8a8 op runs static activation scales so far"
    )


def _config_for(q: QuantizedCheckpoint, layer, activation_dtype: str, backend: str) -> MLPConfig:
    """The op config a quantized checkpoint asks for: its scheme, the layer's GELU and layout."""
    return MLPConfig(
        dtype=q.scheme.scheme, gelu=layer.gelu, weight_layout=layer.weight_layout, backend=backend,
        activation_dtype=activation_dtype, **int8_op_fields(q.scheme, q.path),
    )  # fmt: skip


def _module(q: QuantizedCheckpoint, layer, original_inputs: bool, activation_dtype, backend, device) -> FusedGeluMLP:
    w1, b1, w2, b2 = q.load(layer)
    if q.smoothing(layer) == "folded" and not original_inputs:
        w1.smooth_scale = None  # the checkpoint's LayerNorm already divides by it
    return FusedGeluMLP(w1, b1, w2, b2, _config_for(q, layer, activation_dtype, backend), device=device)


def load_mlps(
    path: str | Path,
    *,
    activation_dtype: str = "fp16",
    backend: str = "auto",
    device: str | torch.device | None = None,
    original_inputs: bool = False,
) -> dict[str, FusedGeluMLP]:
    """Every quantized MLP of a checkpoint, keyed by its fc1 prefix, in layer order.

    activation_dtype: the float dtype the int8 op runs its activations in, "fp16" or "bf16".
    device: where the weights go (None: CPU, as read).
    original_inputs: where SmoothQuant was folded into a LayerNorm (pre-LN models), the
        modules take that LayerNorm's output as the quantized checkpoint computes it (x / s)
        by default; True makes them take the original model's (they divide by s themselves),
        for swapping into the unquantized model. Run-time smoothing (post-LN) always divides.
    """
    with open_quantized(path) as q:
        return {layer.fc1: _module(q, layer, original_inputs, activation_dtype, backend, device) for layer in q.layers}


def load_mlp(
    path: str | Path,
    layer_prefix: str,
    *,
    activation_dtype: str = "fp16",
    backend: str = "auto",
    device: str | torch.device | None = None,
    original_inputs: bool = False,
) -> FusedGeluMLP:
    """One MLP of a quantized checkpoint, named by its fc1 prefix (`encoder.layer.0.intermediate.dense`)."""
    with open_quantized(path) as q:
        by_prefix = {layer.fc1: layer for layer in q.layers}
        if layer_prefix not in by_prefix:
            raise CheckpointError(f"{path} has no quantized MLP {layer_prefix!r}; it holds {', '.join(by_prefix)}")
        return _module(q, by_prefix[layer_prefix], original_inputs, activation_dtype, backend, device)


# ---- swapping into a model -------------------------------------------------------------

_BERT_FC1 = re.compile(r"^(?:bert\.)?encoder\.layer\.(\d+)\.intermediate\.dense$")


def bert_mlp_path(fc1_prefix: str) -> str:
    """calibration/bert.py's encoder: `[bert.]encoder.layer.{i}.intermediate.dense` -> `layers.{i}.mlp`."""
    match = _BERT_FC1.match(fc1_prefix)
    if match is None:
        raise SwapError(
            f"{fc1_prefix!r} is not a BERT MLP prefix (encoder.layer.N.intermediate.dense); "
            "pass find= to say where it goes in the model"
        )
    return f"layers.{match.group(1)}.mlp"


def swap_mlps(
    model: nn.Module,
    mlps: Mapping[str, nn.Module],
    *,
    find: Callable[[str], str] | Mapping[str, str] = bert_mlp_path,
) -> list[str]:
    """Replace, in place, each MLP submodule of `model` (the one holding fc1, the GELU and fc2)
    with the module `mlps` gives for its checkpoint prefix; returns the replaced module paths.

    find: fc1 prefix -> dotted module path in `model` (`layers.3.mlp`), as a function or a
        dict. Every prefix must have a home whose linears have the same shapes; otherwise
        SwapError, raised before anything is replaced.
    """
    targets: list[tuple[str, nn.Module, str, nn.Module]] = []
    for prefix, new in mlps.items():
        if isinstance(find, Mapping):
            if prefix not in find:
                raise SwapError(f"{prefix!r} has no entry in find=; it maps {', '.join(find) or 'nothing'}")
            path = find[prefix]
        else:
            path = find(prefix)
        parent_path, _, attr = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
            old = parent.get_submodule(attr)
        except AttributeError:
            raise SwapError(f"{prefix!r} maps to {path!r}, which {type(model).__name__} does not have") from None
        _check_shapes(prefix, path, old, new)
        targets.append((path, parent, attr, new))
    for _, parent, attr, new in targets:
        setattr(parent, attr, new)
    return [path for path, *_ in targets]


def _check_shapes(prefix: str, path: str, old: nn.Module, new: nn.Module) -> None:
    """Where both sides say their sizes (the old MLP's fc1, the new one's d_model/d_ff), they must agree."""
    fc1 = getattr(old, "fc1", None)
    if not isinstance(fc1, nn.Linear) or not hasattr(new, "d_model"):
        return
    if (fc1.in_features, fc1.out_features) != (new.d_model, new.d_ff):
        raise SwapError(
            f"{prefix!r}: the model's {path} is d_model={fc1.in_features}, d_ff={fc1.out_features} "
            f"but the new MLP is d_model={new.d_model}, d_ff={new.d_ff}"
        )
