"""Quantize a checkpoint's MLPs to int8 and write a whole checkpoint beside it.

    report = quantize_checkpoint("model.safetensors", options=QuantizeOptions(scheme="w8a8"))
    report.to_dict()   # what the CLI renders as a table and writes with --json

One layer at a time: read its tensors lazily, calibrate, quantize, stream the result
into the output, drop it. Every other tensor is copied through unchanged, one at a
time. The output is written to a temporary file in the destination directory and
renamed into place, so an interrupted run leaves no partial file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from calibration.checkpoint import MLPLayer, TensorInfo, mlps_in, open_checkpoint, read_mlp, tensor_infos
from calibration.data import calibration_inputs, check_calibration_file, describe_source
from calibration.errors import CheckpointError
from calibration.memory import MemoryMeter
from calibration.options import QuantizeOptions
from calibration.quantize_mlp import quantize_mlp
from calibration.quantize_weights import weight_error
from calibration.quantized_file import FORMAT, FORMAT_VERSION, RECORD_KEY, scale_name, sha256_file
from calibration.outputs import atomic_output, check_output
from calibration.safetensors_stream import DTYPE_BYTES, header_bytes, tensor_bytes, write_stream
from calibration.smooth import fold_into_weight
from kernels.quantized import QuantizedWeight
from kernels.version import __version__

WEIGHT_QUANT = "symmetric int8 in [-127, 127], round half to even, scale = absmax / 127"


@dataclass
class LinearReport:
    """One quantized GEMM: its scales and how far its int8 weight is from the float one."""

    prefix: str
    shape: list[int]  # the stored weight's shape
    weight_scale_min: float
    weight_scale_max: float
    rel_frobenius: float  # ||W - q*s|| / ||W||, W as quantized (W1 * smooth_scale when smoothed)
    max_abs_steps: float  # max |W - q*s| / s: at most 0.5
    input_scale: float | None = None
    output_scale: float | None = None
    smooth_scale_min: float | None = None
    smooth_scale_max: float | None = None


@dataclass
class LayerReport:
    fc1: LinearReport
    fc2: LinearReport
    d_model: int
    d_ff: int
    calibration: str | None  # where the activations came from (w8a8)


@dataclass
class QuantizeReport:
    source: str
    output: str
    scheme: str
    granularity: str
    method: str | None
    smooth: float | None
    gelu: str
    gelu_source: str
    calibration: dict | None
    layers: list[LayerReport]
    tensors_copied: int
    source_bytes: int
    output_bytes: int
    largest_tensor_bytes: int  # the biggest single tensor in the source
    memory: dict  # calibration.memory.MemoryMeter.facts(): start and peak resident bytes
    seconds: float
    version: str = __version__
    record: dict = field(default_factory=dict)  # the metadata record written to the file

    def to_dict(self) -> dict:
        return asdict(self)


def default_output(source: Path) -> Path:
    """model.safetensors -> model.int8.safetensors, beside the source."""
    stem = source.name[: -len(".safetensors")] if source.name.endswith(".safetensors") else source.name
    return source.with_name(f"{stem}.int8.safetensors")


def _check_paths(source: Path, output: Path, options: QuantizeOptions, expected_bytes: int) -> None:
    """Before any work: the output is not an input, its directory takes it (calibration.outputs)."""
    inputs = [source, options.calib, source.parent / "config.json"]
    check_output(output, option="output", inputs=inputs, expected_bytes=expected_bytes, force=options.force)


def _output_plan(layers: list[MLPLayer], infos: dict[str, TensorInfo], options: QuantizeOptions) -> dict[str, TensorInfo]:
    """Every output tensor's dtype and shape, in write order: the MLPs first (so a bad
    weight fails before gigabytes are copied), then everything else."""
    group_size = options.group_size
    w8a8 = options.scheme == "w8a8"
    plan: dict[str, TensorInfo] = {}
    for layer in layers:
        for prefix, weight, bias, (n, k), is_fc1 in (
            (layer.fc1, layer.w1, layer.b1, (layer.d_ff, layer.d_model), True),
            (layer.fc2, layer.w2, layer.b2, (layer.d_model, layer.d_ff), False),
        ):
            plan[weight] = TensorInfo("I8", infos[weight].shape)
            plan[scale_name(prefix, "weight_scale")] = TensorInfo("F32", (n,) if group_size is None else (n, -(-k // group_size)))
            if w8a8:
                plan[scale_name(prefix, "input_scale")] = TensorInfo("F32", ())
            if w8a8 and is_fc1:
                plan[scale_name(prefix, "output_scale")] = TensorInfo("F32", ())
                if options.smooth is not None:
                    plan[scale_name(prefix, "smooth_scale")] = TensorInfo("F32", (k,))
            if bias is not None:
                plan[bias] = infos[bias]
    clashes = [name for name in plan if name in infos and name not in {*_mlp_tensor_names(layers)}]
    if clashes:
        raise CheckpointError(f"the checkpoint already holds {clashes[0]}, a name quantize writes; is it already quantized?")
    for name, info in infos.items():
        if name not in plan:
            if info.dtype not in DTYPE_BYTES:
                raise CheckpointError(f"{name} has dtype {info.dtype}, which quantize cannot copy")
            plan[name] = info
    return plan


def _mlp_tensor_names(layers: list[MLPLayer]) -> set[str]:
    return {name for layer in layers for name in (layer.w1, layer.b1, layer.w2, layer.b2) if name is not None}


def _linear_tensors(prefix: str, weight_name: str, qw: QuantizedWeight) -> Iterator[tuple[str, torch.Tensor]]:
    yield weight_name, qw.data
    yield scale_name(prefix, "weight_scale"), qw.scale
    for field_name in ("input_scale", "output_scale", "smooth_scale"):
        value = getattr(qw, field_name)
        if value is not None:
            yield scale_name(prefix, field_name), value


def _linear_report(prefix: str, w: torch.Tensor, qw: QuantizedWeight, layout: str) -> LinearReport:
    err = weight_error(w, qw, layout)
    item = lambda t: None if t is None else t.item()  # noqa: E731
    return LinearReport(
        prefix, list(qw.data.shape), qw.scale.min().item(), qw.scale.max().item(),
        err["rel_frobenius"], err["max_abs_steps"], item(qw.input_scale), item(qw.output_scale),
        None if qw.smooth_scale is None else qw.smooth_scale.min().item(),
        None if qw.smooth_scale is None else qw.smooth_scale.max().item(),
    )  # fmt: skip


def _quantize_layer(ckpt, layer: MLPLayer, options: QuantizeOptions) -> tuple[LayerReport, list[tuple[str, torch.Tensor]]]:
    """One MLP: read, calibrate (w8a8), quantize; its report and its output tensors in plan order."""
    w1, b1, w2, b2 = read_mlp(ckpt, layer)
    x, calibrated_on = None, None
    if options.scheme == "w8a8":
        x, calibrated_on = calibration_inputs(ckpt, layer, calib=options.calib, tokens=options.tokens, seed=options.seed)
    q1, q2 = quantize_mlp(
        w1, b1, w2, x, scheme=options.scheme, weight_layout=layer.weight_layout, gelu=layer.gelu,
        group_size=options.group_size, method=options.observer or "max", smooth=options.smooth,
    )  # fmt: skip
    # The stored W1 encodes W1 * smooth_scale: that is what its error is measured against.
    w1_encoded = w1 if q1.smooth_scale is None else fold_into_weight(w1, q1.smooth_scale, layer.weight_layout)
    report = LayerReport(
        _linear_report(layer.fc1, w1_encoded, q1, layer.weight_layout),
        _linear_report(layer.fc2, w2, q2, layer.weight_layout),
        layer.d_model, layer.d_ff, calibrated_on,
    )  # fmt: skip
    out = list(_linear_tensors(layer.fc1, layer.w1, q1))
    if b1 is not None:
        out.append((layer.b1, b1))
    out += _linear_tensors(layer.fc2, layer.w2, q2)
    if b2 is not None:
        out.append((layer.b2, b2))
    return report, out


def build_record(source: Path, output: Path, layers: list[MLPLayer], options: QuantizeOptions, calibration: dict | None) -> dict:
    """The JSON record stored under RECORD_KEY in the output's metadata."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": "gelugemm",
        "version": __version__,
        "scheme": options.scheme,
        "granularity": options.granularity,
        "group_size": options.group_size,
        "weight_quant": WEIGHT_QUANT,
        "method": options.observer,
        "smooth": options.smooth,
        "calibration": calibration,
        "gelu": layers[0].gelu,
        "gelu_source": layers[0].gelu_source,
        "source": {
            "path": str(source.resolve()),
            "relative_path": os.path.relpath(source.resolve(), output.resolve().parent),
            "sha256": sha256_file(source),
            "bytes": source.stat().st_size,
        },
        "layers": [layer.to_record() for layer in layers],
    }


def quantize_checkpoint(
    source: str | Path,
    output: str | Path | None = None,
    options: QuantizeOptions | None = None,
    progress: Callable[[int, int, MLPLayer], None] | None = None,
) -> QuantizeReport:
    """Quantize the MLPs of `source` and write the whole checkpoint to `output`.

    output: None writes `<name>.int8.safetensors` beside the source.
    progress: called as progress(done, total, layer) once each MLP is written (a progress bar).
    """
    started = time.perf_counter()
    meter = MemoryMeter()
    options = options or QuantizeOptions()
    source = Path(source)
    with open_checkpoint(source) as ckpt:
        infos = tensor_infos(ckpt)
        if RECORD_KEY in (ckpt.metadata() or {}):
            raise CheckpointError(f"{source} was written by gelugemm quantize; quantize the original checkpoint instead")
        layers = mlps_in(source, infos, layers=options.layers, gelu=options.gelu)
        output = default_output(source) if output is None else Path(output)
        plan = _output_plan(layers, infos, options)
        # the tensors, and the header with room for the record (under 4 KiB per MLP)
        expected = sum(map(tensor_bytes, plan.values())) + len(header_bytes(plan, ckpt.metadata() or {})) + 4096 * (1 + len(layers))
        _check_paths(source, output, options, expected)
        w8a8 = options.scheme == "w8a8"
        calibration = describe_source(calib=options.calib, tokens=options.tokens, seed=options.seed) if w8a8 else None
        if calibration and calibration["kind"] == "file":
            check_calibration_file(options.calib, layers)
            calibration["sha256"] = sha256_file(options.calib)
        record = build_record(source, output, layers, options, calibration)
        metadata = {**(ckpt.metadata() or {}), RECORD_KEY: json.dumps(record)}
        reports: list[LayerReport] = []
        mlp_names = _mlp_tensor_names(layers)
        copied = [name for name in plan if name in infos and name not in mlp_names]

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for done, layer in enumerate(layers, 1):
                report, layer_tensors = _quantize_layer(ckpt, layer, options)
                meter.sample()  # this layer's float and int8 weights and its calibration inputs are alive here
                reports.append(report)
                yield from layer_tensors
                del layer_tensors
                if progress is not None:
                    progress(done, len(layers), layer)
            for name in copied:
                tensor = ckpt.get_tensor(name)
                meter.sample()
                yield name, tensor

        output_bytes = _write_atomically(output, plan, tensors(), metadata)
    largest = max([tensor_bytes(info) for info in infos.values() if info.dtype in DTYPE_BYTES] + [0])
    return QuantizeReport(
        source=str(source), output=str(output), scheme=options.scheme, granularity=options.granularity,
        method=options.observer, smooth=options.smooth, gelu=layers[0].gelu, gelu_source=layers[0].gelu_source,
        calibration=calibration, layers=reports, tensors_copied=len(copied),
        source_bytes=source.stat().st_size, output_bytes=output_bytes, largest_tensor_bytes=largest,
        memory=meter.facts(), seconds=time.perf_counter() - started, record=record,
    )  # fmt: skip


def _write_atomically(output: Path, plan: dict[str, TensorInfo], tensors: Iterator, metadata: dict[str, str]) -> int:
    """Stream into a temporary file beside `output`, then rename it into place (calibration.outputs)."""
    with atomic_output(output) as f:
        return write_stream(f, plan, tensors, metadata)
