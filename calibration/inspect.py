"""What `quantize` would act on in a checkpoint, found without writing anything.

    report = inspect_checkpoint("model_dir")
    report.mlps[0].family, report.mlps[0].gelu_source   # "gpt2", "config.json activation_function=gelu_new"
    report.to_dict()                                     # what `gelugemm inspect --json` writes

For each MLP: its two prefixes (a gated MLP's up projection too), family, weight layout,
sizes, dtype, GELU flavour, the activation dtype it runs in, the LayerNorm feeding it (and whether SmoothQuant can be folded into it), the shards its
tensors sit in, and why each of those is what it is. A quantized checkpoint (gelugemm's or
another compressed-tensors tool's) is described as such: its scheme, and its quantized MLPs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from calibration.checkpoint import Checkpoint, MLPLayer, mlps_in, open_checkpoint, select_layers
from calibration.families import FAMILIES
from calibration.quantized_file import QuantizedCheckpoint, is_quantized_checkpoint
from kernels.version import __version__


@dataclass
class InspectedMLP:
    fc1: str
    fc2: str
    family: str
    family_title: str
    family_source: str
    model_type: str | None
    weight_layout: str
    layout_source: str
    d_model: int
    d_ff: int
    dtype: str
    gelu: str
    gelu_source: str
    norm: str | None
    norm_feeds_only_mlp: bool  # SmoothQuant folds into the LayerNorm (else it stays at run time)
    biases: list[str]  # "b1", "b2" (and "b_up") where present
    shards: list[str]  # the files holding its tensors
    gated: str | None = None  # None, "separate" (up: the up projection's prefix) or "concatenated"
    up: str | None = None
    activation_dtype: str = "fp16"  # what verify's reference path and the int8 activations run in
    activation_dtype_source: str = "default"


@dataclass
class InspectReport:
    path: str
    kind: str  # "file" or "directory"
    shards: list[dict]  # name, bytes, tensors
    index: str | None
    config: str | None  # config.json's path, where there is one
    model_type: str | None
    tensors: int
    total_bytes: int
    quantized: dict | None  # made_by, scheme, granularity, activations, format, quant_method
    mlps: list[InspectedMLP]
    version: str = __version__

    def to_dict(self) -> dict:
        return asdict(self)


def _describe(ckpt: Checkpoint, layer: MLPLayer) -> InspectedMLP:
    family = FAMILIES.get(layer.family)
    prefixes = tuple(prefix + "." for prefix, *_ in layer.linears())
    names = [n for n in layer.tensor_names() if n in ckpt.infos]
    names += [n for n in ckpt.infos if n.startswith(prefixes)]
    shards = sorted({ckpt.shard_of(n).name for n in names}, key=[s.name for s in ckpt.shards].index)
    return InspectedMLP(
        layer.fc1, layer.fc2, layer.family, family.title if family else layer.family, layer.family_source,
        layer.model_type, layer.weight_layout, layer.layout_source, layer.d_model, layer.d_ff, layer.dtype,
        layer.gelu, layer.gelu_source, layer.norm, layer.norm_feeds_only_mlp,
        [b for b, name in (("b1", layer.b1), ("b2", layer.b2), ("b_up", layer.b_up)) if name is not None], shards,
        layer.gated, layer.up, layer.activation_dtype, layer.activation_dtype_source,
    )  # fmt: skip


def inspect_checkpoint(
    path: str | Path, *, layers: str | None = None, gelu: str | None = None, activation_dtype: str | None = None
) -> InspectReport:
    """The MLPs `quantize` would act on in `path` (a .safetensors file or a model directory), and why."""
    with open_checkpoint(path) as ckpt:
        quantized = None
        if is_quantized_checkpoint(ckpt):
            q = QuantizedCheckpoint(ckpt, gelu=gelu)
            found = select_layers(q.layers, layers)
            s = q.scheme
            quantized = {
                "made_by": q.made_by, "scheme": s.scheme, "granularity": str(s.granularity),
                "activations": None if s.activations is None else str(s.activations), "format": s.format,
                "quant_method": q.quantization_config.get("quant_method"),
            }  # fmt: skip
        else:
            found = mlps_in(ckpt, layers=layers, gelu=gelu, activation_dtype=activation_dtype)
        config = ckpt.config
        return InspectReport(
            path=str(ckpt.path), kind=ckpt.kind,
            shards=[{"name": s.name, "bytes": s.path.stat().st_size, "tensors": len(s.tensors)} for s in ckpt.shards],
            index=None if ckpt.index_path is None else str(ckpt.index_path),
            config=str(ckpt.config_path) if config is not None else None,
            model_type=(config or {}).get("model_type") if isinstance((config or {}).get("model_type"), str) else None,
            tensors=len(ckpt.infos), total_bytes=ckpt.total_bytes, quantized=quantized,
            mlps=[_describe(ckpt, layer) for layer in found],
        )  # fmt: skip
