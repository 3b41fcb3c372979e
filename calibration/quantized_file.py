"""The int8 checkpoint quantize writes, and reading it back.

Tensors, for each quantized linear with prefix P (`MLPLayer.fc1` or `.fc2`):

    P.weight         int8, the layout of the source checkpoint (the name of the source
                     weight: `w1`/`w2` in a plain file)
    P.weight_scale   float32 [N] per channel, or [N, ceil(K / group_size)] per group,
                     indexed by output channel whatever the layout
    P.input_scale    w8a8: float32 scalar, the static scale of the GEMM's int8 input
                     (compressed-tensors naming); on fc2 it is the GELU output scale
    P.output_scale   w8a8, fc1 only: float32 scalar, the scale GEMM1's epilogue
                     requantizes the GELU output to (equal to fc2's input_scale)
    P.smooth_scale   w8a8 with --smooth, fc1 only: float32 [K]; W1 was multiplied by
                     it along K, the input is divided by it

Biases and every other tensor are the source's, unchanged. The safetensors metadata
holds the source's own entries plus RECORD_KEY: a JSON record (see `quantize.build_record`)
with the scheme, granularity, method, calibration source, GELU flavour, the MLPs
(`MLPLayer` fields) and the source checkpoint's path and sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from calibration.checkpoint import MLPLayer, open_checkpoint
from calibration.errors import CheckpointError
from calibration.options import parse_granularity
from kernels.quantized import QuantizedWeight

RECORD_KEY = "gelugemm"
FORMAT = "gelugemm-int8"
FORMAT_VERSION = 1


def scale_name(prefix: str, field: str) -> str:
    """`P.weight_scale`, `P.input_scale`, ... for the linear with prefix P."""
    return f"{prefix}.{field}"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_record(path: str | Path) -> dict | None:
    """The gelugemm record of a safetensors file, or None for a file quantize did not write."""
    with open_checkpoint(path) as handle:
        text = (handle.metadata() or {}).get(RECORD_KEY)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: its {RECORD_KEY!r} metadata is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: its {RECORD_KEY!r} metadata is not a {FORMAT} record")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: {FORMAT} version {record.get('format_version')}; this gelugemm reads {FORMAT_VERSION}")
    return record


def is_quantized_file(path: str | Path) -> bool:
    """True for a file written by `gelugemm quantize` (told by its metadata record)."""
    return read_record(path) is not None


def read_quantized(path: str | Path) -> tuple[dict, list[MLPLayer]]:
    """(record, the quantized MLPs) of a file written by quantize."""
    record = read_record(path)
    if record is None:
        raise CheckpointError(f"{path}: not written by gelugemm quantize (no {RECORD_KEY!r} metadata record)")
    return record, [MLPLayer.from_record(layer) for layer in record["layers"]]


def _linear(
    handle, path, prefix: str, weight_name: str, layout: str, shape_nk: tuple[int, int], group_size: int | None,
    fields: tuple[str, ...],
) -> QuantizedWeight:
    """One int8 linear and the scale tensors named in `fields`, checked against its shape [N, K]."""
    n, k = shape_nk
    names = set(handle.keys())
    if weight_name not in names:
        raise CheckpointError(f"{path}: tensor {weight_name} is missing")
    data = handle.get_tensor(weight_name)
    stored = (n, k) if layout == "out_in" else (k, n)
    if tuple(data.shape) != stored:
        raise CheckpointError(f"{path}: {weight_name} has shape {list(data.shape)}, expected {list(stored)}")
    expected = {
        "weight_scale": (n,) if group_size is None else (n, -(-k // group_size)),
        "input_scale": (),
        "output_scale": (),
        "smooth_scale": (k,),
    }
    tensors = {}
    for field in fields:
        name = scale_name(prefix, field)
        if name not in names:
            raise CheckpointError(f"{path}: tensor {name} is missing")
        tensors[field] = handle.get_tensor(name)
        if tuple(tensors[field].shape) != expected[field]:
            raise CheckpointError(f"{path}: {name} has shape {list(tensors[field].shape)}, expected {list(expected[field])}")
    try:
        return QuantizedWeight(data, tensors.pop("weight_scale"), group_size, **tensors)
    except ValueError as exc:  # LaunchError: not int8, or a scale not float32
        raise CheckpointError(f"{path}: {prefix}: {exc}") from None


def load_quantized_mlp(
    path: str | Path, layer: MLPLayer
) -> tuple[QuantizedWeight, torch.Tensor | None, QuantizedWeight, torch.Tensor | None]:
    """(w1, b1, w2, b2) of one MLP of a quantized file: int8 weights with their scales, float biases."""
    record, _ = read_quantized(path)
    group_size = parse_granularity(record["granularity"])
    fc1_fields, fc2_fields = ("weight_scale",), ("weight_scale",)
    if record["scheme"] == "w8a8":
        fc1_fields += ("input_scale", "output_scale") + (("smooth_scale",) if record["smooth"] is not None else ())
        fc2_fields += ("input_scale",)
    with open_checkpoint(path) as handle:
        w1 = _linear(handle, path, layer.fc1, layer.w1, layer.weight_layout, (layer.d_ff, layer.d_model), group_size, fc1_fields)
        w2 = _linear(handle, path, layer.fc2, layer.w2, layer.weight_layout, (layer.d_model, layer.d_ff), group_size, fc2_fields)
        b1, b2 = (None if name is None else handle.get_tensor(name) for name in (layer.b1, layer.b2))
    return w1, b1, w2, b2


def resolve_source(path: str | Path, record: dict) -> Path:
    """The source checkpoint a quantized file was made from, checked by sha256.

    Tried: the recorded absolute path, then the recorded path relative to the quantized
    file (for the two moved together). Neither present, or changed since: CheckpointError.
    """
    source = record["source"]
    here = Path(path).resolve().parent
    candidates = [Path(source["path"]), here / source["relative_path"]]
    for candidate in candidates:
        if candidate.is_file():
            if sha256_file(candidate) != source["sha256"]:
                raise CheckpointError(f"source checkpoint {candidate} has changed since {path} was quantized (sha256 differs)")
            return candidate
    raise CheckpointError(f"source checkpoint of {path} not found (tried {', '.join(map(str, candidates))}); pass --reference PATH")
