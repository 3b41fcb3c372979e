"""Quantized MLPs as modules: loaded from a file `gelugemm quantize` wrote, swapped into a model.

    mlps = load_mlps("model.int8.safetensors")          # {fc1 prefix: FusedGeluMLP}
    swap_mlps(model, mlps)                               # replaces model.layers.{i}.mlp
    model.to("cuda")                                     # moves the int8 weights and scales too
    mlps["encoder.layer.0.intermediate.dense"].backend   # "triton" on CUDA, "torch" elsewhere

Where each MLP goes in a model is explicit: `swap_mlps` asks `find` for the dotted module
path that a checkpoint's fc1 prefix maps to (`bert_mlp_path` by default, the naming of
calibration/bert.py's encoder), or takes a dict {fc1 prefix: module path}.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from calibration.checkpoint import find_mlps
from calibration.errors import CheckpointError
from calibration.quantized_file import is_quantized_file, load_quantized_mlp, read_quantized
from kernels.errors import GelugemmError
from kernels.module import FusedGeluMLP
from kernels.op import MLPConfig


class SwapError(GelugemmError, LookupError):
    """An MLP cannot be put into a model: its prefix has no home there, or the shapes differ."""


def checkpoint_shapes(path: str | Path, gelu: str | None = None) -> tuple[list[tuple[int, int]], str]:
    """(the distinct (d_model, d_ff) of a checkpoint's MLPs, their GELU flavour), for the benchmark.

    A file quantize wrote: from its record; else by discovery. The flavour is `gelu`
    where given, else what config.json or the model family says.
    """
    path = Path(path)
    layers = read_quantized(path)[1] if is_quantized_file(path) else find_mlps(path, gelu=gelu)
    return sorted({(layer.d_model, layer.d_ff) for layer in layers}), gelu or layers[0].gelu


# ---- loading from a quantized checkpoint -------------------------------------------------


def _config_for(record: dict, layer, activation_dtype: str, backend: str) -> MLPConfig:
    """The op config a quantized file's record asks for: its scheme, the layer's GELU and
    layout, and for w8a8 the calibrated (static) input scale the file carries."""
    return MLPConfig(
        dtype=record["scheme"],
        gelu=layer.gelu,
        weight_layout=layer.weight_layout,
        backend=backend,
        activation_dtype=activation_dtype,
        input_quant="static" if record["scheme"] == "w8a8" else "dynamic",
    )


def load_mlps(
    path: str | Path,
    *,
    activation_dtype: str = "fp16",
    backend: str = "auto",
    device: str | torch.device | None = None,
) -> dict[str, FusedGeluMLP]:
    """Every MLP of a file written by `gelugemm quantize`, keyed by its fc1 prefix, in layer order.

    activation_dtype: the float dtype the int8 op runs its activations in, "fp16" or "bf16".
    device: where the weights go (None: CPU, as read).
    """
    record, layers = read_quantized(path)
    return {
        layer.fc1: FusedGeluMLP(
            *load_quantized_mlp(path, layer), _config_for(record, layer, activation_dtype, backend), device=device
        )
        for layer in layers
    }


def load_mlp(
    path: str | Path,
    layer_prefix: str,
    *,
    activation_dtype: str = "fp16",
    backend: str = "auto",
    device: str | torch.device | None = None,
) -> FusedGeluMLP:
    """One MLP of a quantized file, named by its fc1 prefix (`encoder.layer.0.intermediate.dense`)."""
    record, layers = read_quantized(path)
    by_prefix = {layer.fc1: layer for layer in layers}
    if layer_prefix not in by_prefix:
        raise CheckpointError(f"{path} has no quantized MLP {layer_prefix!r}; it holds {', '.join(by_prefix)}")
    layer = by_prefix[layer_prefix]
    config = _config_for(record, layer, activation_dtype, backend)
    return FusedGeluMLP(*load_quantized_mlp(path, layer), config, device=device)


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
