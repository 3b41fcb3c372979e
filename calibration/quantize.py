"""Quantize a checkpoint's MLPs to int8 and write a whole checkpoint beside it.

    report = quantize_checkpoint("model_dir", options=QuantizeOptions(scheme="w8a8"))
    report.to_dict()   # what the CLI renders as a table and writes with --json

The input is one `.safetensors` file (output: `NAME.int8.safetensors` beside it) or a model
directory, single file or sharded (output: the directory `DIR-int8/`: the same shard names,
a rewritten index, config.json with a `quantization_config`, the other model files and
sub-folders copied). The format is `calibration.quantized_file`'s.

One shard at a time, and in it one layer at a time: read the MLP's tensors, calibrate,
quantize, stream the result into the output shard, drop it; every other tensor's bytes are
copied through without being held. Peak memory is about one MLP, never the model. The
output is written under a temporary name and renamed into place, so an interrupted run
leaves nothing behind; `--force` replaces an existing output the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from calibration.checkpoint import (
    CONFIG_FILE,
    FLOAT_DTYPES,
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    MLPLayer,
    mlps_in,
    norm_names,
    open_checkpoint,
    read_tensor,
)
from calibration.data import DEFAULT_TOKENS, calibration_inputs, check_calibration_file, check_tokens_fit, describe_source
from calibration.devices import device_name
from calibration.errors import CheckpointError, OptionError
from calibration.families import FAMILIES
from calibration.memory import MemoryMeter, release_free_memory
from calibration.timing import PhaseTimer
from calibration.options import SYNTHETIC_WARNING, QuantizeOptions
from calibration.ranks import Ranks, broadcast, together
from calibration.ranks import current as current_ranks
from calibration.quantize_mlp import calibrate_gemm1, check_gemm1_options, quantize_gemm1, quantize_gemm1_weight, quantize_gemm2
from calibration.quantize_weights import WeightError, compute_threads, intra_op_threads
from calibration.smooth import input_channel_absmax, smooth_scale_from_absmax
from calibration.quantized_file import (
    RECORD_KEY,
    SMOOTH_KEY,
    FormatScheme,
    build_record,
    encode_scale,
    index_for,
    is_quantized_checkpoint,
    linear_plan,
    linear_tensors,
    quantization_config,
    quantized_targets,
    scheme_from_options,
    sha256_file,
    hashing_workers,
    source_facts,
    source_files,
    PENDING_SHA256,
)
from calibration.outputs import atomic_output, check_output
from calibration.safetensors_stream import (
    DTYPE_BYTES,
    ReadBuffer,
    StoredTensor,
    TensorInfo,
    header_bytes,
    tensor_bytes,
    write_stream,
)
from kernels.quantized import QuantizedWeight
from kernels.version import __version__

# Observers as compressed-tensors names them (config.json); percentile has no such name.
CT_OBSERVERS = {"max": "minmax", "mse": "mse"}
# Files of other weight formats, not copied into a quantized model directory: they would be
# float duplicates a loader could pick up instead of the int8 shards.
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf", ".tflite", ".safetensors")
# Sub-folders of other runtimes' exports, not copied.
RUNTIME_FOLDERS = ("onnx", "openvino", "coreml", "tflite")


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
    fc1: LinearReport  # a gated MLP's gate (or its concatenated gate and up)
    fc2: LinearReport
    d_model: int
    d_ff: int
    calibration: str | None  # where the activations came from (w8a8)
    smoothing: str | None = None  # "folded into <LayerNorm>" or "run-time" (--smooth)
    up: LinearReport | None = None  # a gated MLP's separate up projection

    @property
    def linears(self) -> list[LinearReport]:
        """Every quantized linear of the MLP, GEMM1's first."""
        return [self.fc1] + ([self.up] if self.up is not None else []) + [self.fc2]


@dataclass
class QuantizeReport:
    source: str
    output: str
    output_kind: str  # "file" or "directory"
    scheme: str
    granularity: str
    activations: str | None
    method: str | None
    smooth: float | None
    gelu: str
    gelu_source: str
    calibration: dict | None
    layers: list[LayerReport]
    tensors_copied: int
    shards: list[str]  # the output's safetensors files
    files_copied: list[str]  # the other model files copied (directories)
    files_skipped: list[str]  # and those left out, with why
    runs_on: str  # which engines can run the output
    source_bytes: int
    output_bytes: int
    largest_tensor_bytes: int  # the biggest single tensor in the source
    largest_shard_bytes: int
    memory: dict  # calibration.memory.MemoryMeter.facts(): start and peak resident bytes
    seconds: float
    device: str  # where the weights were quantized: "cpu" or "cuda:0 (NVIDIA H100 80GB HBM3)"
    # where the seconds went (calibration.timing): phases, the dominant one, and mb_per_s,
    # the checkpoint's bytes over the whole run's seconds
    timing: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what the user should know about the result
    version: str = __version__
    device_asked: str = "auto"  # --device as given: auto, cpu or cuda
    record: dict = field(default_factory=dict)  # the metadata record written to every shard

    def to_dict(self) -> dict:
        return asdict(self)


def default_output(source: Path) -> Path:
    """model.safetensors -> model.int8.safetensors beside it; a model directory DIR -> DIR-int8."""
    source = Path(source)
    if source.is_dir():
        return source.resolve().with_name(f"{source.resolve().name}-int8")
    stem = source.name[: -len(".safetensors")] if source.name.endswith(".safetensors") else source.name
    return source.with_name(f"{stem}.int8.safetensors")


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def _check_paths(ckpt: Checkpoint, source: Path, output: Path, options: QuantizeOptions, expected_bytes: int) -> None:
    """Before any work: a model directory's output is a directory beside it, and the output is
    no input, its directory takes it, it is replaced only with --force (calibration.outputs)."""
    directory = ckpt.kind == "directory"
    if directory:
        if output.exists() and output.samefile(source):
            raise CheckpointError(f"output {output} is the input checkpoint; quantize never overwrites its input")
        if _inside(output, source):
            raise CheckpointError(f"output {output} is inside the model directory {source}; quantize writes beside it")
        if output.name.endswith(".safetensors"):
            raise CheckpointError(f"output {output}: a model directory quantizes to a directory; -o names the directory (default {default_output(source).name})")
    inputs = [shard.path for shard in ckpt.shards] + [options.calib_file, source.parent / CONFIG_FILE]
    if directory:
        inputs += [source / CONFIG_FILE, source / INDEX_FILE]
    check_output(output, option="output", inputs=inputs, expected_bytes=expected_bytes, force=options.force, directory=directory)


# ---- one layer --------------------------------------------------------------------------------


def _linear_report(prefix: str, qw: QuantizedWeight, err: WeightError) -> LinearReport:
    """One linear's report: its scales (read once calibration has set them) and the error
    of its int8 weight (measured while it was quantized, the float weight in memory)."""
    item = lambda t: None if t is None else t.item()  # noqa: E731
    error = err.to_dict()
    return LinearReport(
        prefix, list(qw.data.shape), qw.scale.min().item(), qw.scale.max().item(),
        error["rel_frobenius"], error["max_abs_steps"], item(qw.input_scale), item(qw.output_scale),
        None if qw.smooth_scale is None else qw.smooth_scale.min().item(),
        None if qw.smooth_scale is None else qw.smooth_scale.max().item(),
    )  # fmt: skip


def _reader(ckpt: Checkpoint, timer: PhaseTimer, weights: ReadBuffer) -> Callable[..., torch.Tensor | None]:
    """read(name), read_tensor timed as "read"; None for a tensor the MLP does not have.
    read(name, dropped=True): a float weight dropped once quantized, read into `weights`
    (overwritten by the next such read); biases, which are written out, get their own memory."""

    def read(name: str | None, dropped: bool = False) -> torch.Tensor | None:
        if name is None:
            return None
        with timer.phase("read"):
            return read_tensor(ckpt, name, buffer=weights if dropped else None)

    return read


def _quantize_gemm1(ckpt: Checkpoint, layer: MLPLayer, options: QuantizeOptions, x, smooth_scale, timer: PhaseTimer,
                    weights: ReadBuffer, device: torch.device) -> tuple:  # fmt: skip
    """GEMM1 of one MLP: (q1, its weight error, b1, q_up, up's weight error, b_up), one float weight
    in memory at a time (a gated MLP's gate, then its up projection, then the output scale
    calibrated on the int8 weights). The stored W1 encodes W1 * smooth_scale: that is what
    its error is measured against. Weights are quantized on `device` and come back to the
    CPU, where the static scales are calibrated."""
    layout = layer.weight_layout
    activations = options.activations or "dynamic"
    read = _reader(ckpt, timer, weights)
    b1 = read(layer.b1)
    w1 = read(layer.w1, dropped=True)
    err1 = WeightError()
    if not layer.is_gated:
        with timer.phase("quantize"):
            q1 = quantize_gemm1(
                w1, b1, x, scheme=options.scheme, weight_layout=layout, gelu=layer.gelu, group_size=options.group_size,
                method=options.observer or "max", smooth=options.smooth, smooth_scale=smooth_scale, activations=activations,
                error=err1, device=device,
            )  # fmt: skip
        return q1, err1, b1, None, None, None
    static = check_gemm1_options(options.scheme, x, options.group_size, options.smooth, smooth_scale, activations)
    kw = dict(weight_layout=layout, group_size=options.group_size, smooth_scale=smooth_scale, device=device)
    with timer.phase("quantize"):
        q1 = quantize_gemm1_weight(w1, **kw, error=err1)
    del w1
    q_up = err_up = b_up = None
    if layer.gated == "separate":
        release_free_memory()  # the gate's temporaries, before the up projection is read
        w_up, b_up = read(layer.w_up, dropped=True), read(layer.b_up)
        err_up = WeightError()
        with timer.phase("quantize"):
            q_up = quantize_gemm1_weight(w_up, **kw, error=err_up)
        del w_up
    if static:
        with timer.phase("quantize"):
            calibrate_gemm1(
                q1, b1, x, weight_layout=layout, gelu=layer.gelu, method=options.observer or "max", gated=True, up=q_up,
                up_bias=b_up,
            )  # fmt: skip
        if q_up is not None:
            q_up.input_scale = q1.input_scale  # the up projection reads the same x
    return q1, err1, b1, q_up, err_up, b_up


def _quantize_layer(
    ckpt: Checkpoint, layer: MLPLayer, options: QuantizeOptions, scheme: FormatScheme, smoothing: str | None,
    smooth_scale: torch.Tensor | None, timer: PhaseTimer, weights: ReadBuffer, device: torch.device,
) -> tuple[LayerReport, dict[str, torch.Tensor]]:
    """One MLP: read, calibrate (w8a8), quantize. (report, its output tensors by name).

    One float weight is in memory at a time: W1 (a gated MLP's gate, then its up
    projection) is read, quantized, measured and dropped before the next weight is read, each
    into the same buffer (`weights`), and quantized on `device` (its int8 values and scales
    come back to the CPU, for the writer).
    """
    read = _reader(ckpt, timer, weights)
    x, calibrated_on = None, None
    if options.observer is not None:  # static activation scales (smoothing's scale is computed beforehand)
        with timer.phase("calibration inputs"):
            x, calibrated_on = calibration_inputs(ckpt, layer, calib=options.calib_file, tokens=options.tokens, seed=options.seed)
    elif smooth_scale is not None:
        calibrated_on = "smoothing only (its scale from the calibration rows; activation scales at run time)"
    q1, err1, b1, q_up, err_up, b_up = _quantize_gemm1(ckpt, layer, options, x, smooth_scale, timer, weights, device)
    del x
    release_free_memory()  # W1's temporaries, before W2 is read
    out = dict(linear_tensors(layer.fc1, layer.w1, q1, layer.weight_layout, scheme))
    if b1 is not None:
        out[layer.b1] = b1
    up_report = None
    if q_up is not None:
        up_report = _linear_report(layer.up, q_up, err_up)
        out.update(linear_tensors(layer.up, layer.w_up, q_up, layer.weight_layout, scheme))
        if b_up is not None:
            out[layer.b_up] = b_up
    w2, b2 = read(layer.w2, dropped=True), read(layer.b2)
    err2 = WeightError()
    with timer.phase("quantize"):
        q2 = quantize_gemm2(w2, q1, weight_layout=layer.weight_layout, group_size=options.group_size, error=err2, device=device)
    fc2_report = _linear_report(layer.fc2, q2, err2)
    del w2
    release_free_memory()
    out.update(linear_tensors(layer.fc2, layer.w2, q2, layer.weight_layout, scheme))
    if b2 is not None:
        out[layer.b2] = b2
    where = None
    if smoothing == "folded":
        where = f"folded into {layer.norm}"
    elif smoothing == "run-time":
        where = "run-time (x / s in the op: gelugemm only)"
    report = LayerReport(_linear_report(layer.fc1, q1, err1), fc2_report, layer.d_model, layer.d_ff, calibrated_on, where, up_report)
    if smoothing == "folded":
        # The norm's output becomes its output / s: its multiplier (offset + weight: Gemma's
        # RMSNorm stores weight - 1) and bias divided by s.
        weight_name, bias_name = norm_names(layer, ckpt.infos)
        t = ckpt.get_tensor(weight_name)
        out[weight_name] = ((t.to(torch.float32) + layer.norm_offset) / q1.smooth_scale - layer.norm_offset).to(t.dtype)
        if bias_name is not None:
            t = ckpt.get_tensor(bias_name)
            out[bias_name] = (t.to(torch.float32) / q1.smooth_scale).to(t.dtype)
    return report, out


def _smooth_scales(ckpt: Checkpoint, layers: list[MLPLayer], options: QuantizeOptions, meter: MemoryMeter) -> dict[str, torch.Tensor]:
    """Each MLP's SmoothQuant scale, before anything is written: a shard's header holds the
    scales of its MLPs, and a LayerNorm that absorbs one may sit in an earlier shard. A
    gated MLP's gate and up read the same x: one scale from both (one weight read at a time)."""
    if options.smooth is None:
        return {}
    scales = {}
    for layer in layers:
        x, _ = calibration_inputs(ckpt, layer, calib=options.calib_file, tokens=options.tokens, seed=options.seed)
        w_absmax = input_channel_absmax(read_tensor(ckpt, layer.w1), layer.weight_layout)
        if layer.w_up is not None:
            w_absmax = torch.maximum(w_absmax, input_channel_absmax(read_tensor(ckpt, layer.w_up), layer.weight_layout))
        scales[layer.fc1] = smooth_scale_from_absmax(x, w_absmax, options.smooth)
        meter.sample()
    return scales


# ---- the plan: every output tensor, per shard, and where it comes from --------------------------


@dataclass
class _Plan:
    shards: dict[str, dict[str, TensorInfo]]  # output shard name -> tensors in write order
    layer_of: dict[str, int]  # output tensor -> the layer that produces it
    copies: dict[str, StoredTensor]  # output tensor -> its source bytes
    smoothing: dict[str, str]  # fc1 -> "folded" | "run-time"


def _smoothing(layers: list[MLPLayer], options: QuantizeOptions) -> dict[str, str]:
    if options.smooth is None:
        return {}
    return {layer.fc1: "folded" if layer.norm_feeds_only_mlp else "run-time" for layer in layers}


def _plan(ckpt: Checkpoint, layers: list[MLPLayer], scheme: FormatScheme, options: QuantizeOptions) -> _Plan:
    """Each output shard holds what its source shard held: a quantized linear's tensors where
    its weight was, biases and LayerNorms where they were. The MLPs come first in a shard,
    so a bad weight fails before its other tensors are copied."""
    smoothing = _smoothing(layers, options)
    mlp_tensors = {name for layer in layers for name in layer.tensor_names()}
    folded_norms: dict[str, int] = {}  # a LayerNorm that absorbs a layer's smoothing -> the layer
    for i, layer in enumerate(layers):
        if smoothing.get(layer.fc1) == "folded":
            folded_norms.update({name: i for name in norm_names(layer, ckpt.infos) if name is not None})
    plan = _Plan({}, {}, {}, smoothing)
    for shard in ckpt.shards:
        tensors: dict[str, TensorInfo] = {}
        for i, layer in enumerate(layers):
            for prefix, weight, bias, (n, k) in layer.linears():
                if weight in shard.tensors:
                    for name, info in linear_plan(prefix, weight, ckpt.infos[weight], n, k, scheme).items():
                        if name in ckpt.infos and name not in mlp_tensors:
                            raise CheckpointError(f"the checkpoint already holds {name}, a name quantize writes; is it already quantized?")
                        tensors[name] = info
                        plan.layer_of[name] = i
                if bias is not None and bias in shard.tensors:
                    tensors[bias] = ckpt.infos[bias]
                    plan.layer_of[bias] = i
        for name, stored in shard.tensors.items():
            if name in mlp_tensors:
                continue  # planned with its MLP, above
            if name in folded_norms:
                tensors[name] = stored.info
                plan.layer_of[name] = folded_norms[name]
                continue
            if stored.info.dtype not in DTYPE_BYTES:
                raise CheckpointError(f"{name} has dtype {stored.info.dtype}, which quantize cannot copy")
            tensors[name] = stored.info
            plan.copies[name] = stored
        plan.shards[shard.name] = tensors
    return plan


# ---- the record -------------------------------------------------------------------------------


def _linear_prefixes(infos: dict[str, TensorInfo]) -> list[str]:
    """Every 2-D float `.weight` (the checkpoint's linears, and a few embeddings) by module prefix."""
    return [name[: -len(".weight")] for name, info in infos.items()
            if name.endswith(".weight") and len(info.shape) == 2 and info.dtype in FLOAT_DTYPES]  # fmt: skip


def _aliases(layers: list[MLPLayer]) -> list[str]:
    """The names a loader that renames modules (transformers 5 for HF ViT) gives these MLPs' linears."""
    return [alias for layer in layers if layer.family in FAMILIES
            for prefix, *_ in layer.linears() for alias in FAMILIES[layer.family].module_names(prefix)]  # fmt: skip


# The weight-group sizes vLLM's int8 weight-only kernels (Marlin) take.
VLLM_GROUP_SIZES = (32, 64, 128)


def _group_not_dividing(layers: list[MLPLayer], group_size: int | None) -> tuple[str, int] | None:
    """(a quantized weight's prefix, its input width) that `group_size` does not divide, or None."""
    if group_size is None:
        return None
    for layer in layers:
        for prefix, k in ((layer.fc1, layer.d_model), (layer.fc2, layer.d_ff)):
            if k % group_size:
                return prefix, k
    return None


def _refuse_ragged(layers: list[MLPLayer], group_size: int, prefix: str, k: int) -> None:
    """compressed-tensors (and so every loader of the format) refuses a group size that does
    not divide a weight's input width: an asked one is refused, with the sizes that fit."""
    fits = [g for g in VLLM_GROUP_SIZES if all(m.d_model % g == 0 and m.d_ff % g == 0 for m in layers)]
    hint = f"; group:{' or group:'.join(map(str, fits))} divides every one" if fits else "; use per-channel"
    raise OptionError(
        f"--granularity group:{group_size} does not divide {prefix}'s input width {k}: compressed-tensors "
        f"loaders need a group size that divides each quantized weight's input width{hint}"
    )


def _config_and_record(ckpt, output, layers, options, scheme, calibration, smoothing, digests):
    quantized = [prefix for layer in layers for prefix, *_ in layer.linears()]
    linears = _linear_prefixes(ckpt.infos) + [p for p in quantized if p in ("w1", "w2")]
    every_mlp = mlps_in(ckpt, gelu=options.gelu, activation_dtype=options.activation_dtype) if options.layers is not None else layers
    gelugemm_only = "run-time" in smoothing.values()
    qconfig = quantization_config(
        scheme, quantized_targets(quantized + _aliases(layers), linears + _aliases(every_mlp)),
        sorted(p for p in set(linears) - set(quantized)),
        observer=CT_OBSERVERS.get(options.observer or "") if scheme.static else None, gelugemm_only=gelugemm_only,
    )  # fmt: skip
    if gelugemm_only:
        runs_on = ("gelugemm only: SmoothQuant's division stays at run time where the LayerNorm also feeds the residual "
                   "(marked gelugemm_run_time_smoothing in config.json, which other loaders refuse)")  # fmt: skip
    elif scheme.activations is not None and scheme.activations.kind == "group":
        runs_on = "gelugemm and transformers (compressed-tensors); vLLM's int8 W8A8 takes token or tensor activations only"
    elif _group_not_dividing(layers, scheme.granularity.group_size) is not None:
        runs_on = "gelugemm only: a weight group is partial (compressed-tensors' loaders refuse it); --granularity per-channel loads anywhere"
    elif scheme.granularity.group_size not in (None, *VLLM_GROUP_SIZES):
        runs_on = (f"gelugemm and transformers (compressed-tensors); vLLM's int8 weight-only kernels take group sizes "
                   f"{', '.join(map(str, VLLM_GROUP_SIZES))} or per-channel, not {scheme.granularity.group_size}")  # fmt: skip
    elif any(layer.family == "t5" for layer in layers):
        # transformers' compressed-tensors loader leaves T5's _keep_in_fp32_modules (wo) as
        # float nn.Linear, which cannot run an int8 wo; vLLM has no T5.
        runs_on = ("gelugemm; not transformers, whose compressed-tensors loader keeps T5's DenseReluDense.wo a float "
                   "linear (T5's _keep_in_fp32_modules) and cannot read it as int8")  # fmt: skip
    else:
        runs_on = "any compressed-tensors loader: vLLM, transformers (compressed-tensors), gelugemm"
    record = build_record(
        ckpt, output, layers, scheme, options.observer, options.smooth, calibration, qconfig, smoothing, runs_on, digests
    )  # fmt: skip
    return qconfig, record, runs_on


class _SourceHashes:
    """The sha256 of every source file (calibration.quantized_file.source_files), hashed on
    background threads while the checkpoint is quantized and written: the record in each
    output header holds PENDING_SHA256 placeholders until the shard's tensors are written,
    and then the digests (write_stream's final_metadata). On a GPU host hashing a 2 GB
    checkpoint took 0.5-0.6 s of a 2.5-3 s run, before any weight was read. close() stops
    the hashing (a failed run exits without waiting for it)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.files = source_files(ckpt)
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=hashing_workers(len(self.files)), thread_name_prefix="source-sha256")
        self._digests = [self._pool.submit(sha256_file, path, self._stop) for path in self.files]

    def pending(self) -> list[str]:
        return [PENDING_SHA256] * len(self.files)

    def digests(self) -> list[str]:
        return [d.result() for d in self._digests]

    def close(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---- writing ----------------------------------------------------------------------------------


def _write_atomically(output: Path, plan: dict[str, TensorInfo], tensors: Iterator, metadata: dict[str, str],
                      final_metadata: Callable[[], dict[str, str]]) -> int:  # fmt: skip
    """Stream into a temporary file beside `output`, then rename it into place (calibration.outputs)."""
    with atomic_output(output) as f:
        return write_stream(f, plan, tensors, metadata, final_metadata)


def _write_file(path: Path, plan: dict[str, TensorInfo], tensors: Iterator, metadata: dict[str, str],
                final_metadata: Callable[[], dict[str, str]]) -> int:  # fmt: skip
    """A shard inside the temporary output directory (atomic_output fsyncs and renames the whole)."""
    with open(path, "wb") as f:
        written = write_stream(f, plan, tensors, metadata, final_metadata)
        f.flush()
        os.fsync(f.fileno())
    return written


def _other_files(ckpt: Checkpoint) -> tuple[list[Path], list[str]]:
    """(the model directory's other files to copy, relative; what is left out and why)."""
    used = {shard.name for shard in ckpt.shards} | {CONFIG_FILE, INDEX_FILE, SINGLE_FILE}
    copy, skipped = [], []
    root = ckpt.directory
    # os.walk with followlinks: a hub cache's snapshot links its files and folders to blobs
    for here, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .cache: not the model's
        for name in sorted(files):
            rel = (Path(here) / name).relative_to(root)
            if name.startswith(".") or (len(rel.parts) == 1 and name in used):
                continue
            if rel.parts[0] in RUNTIME_FOLDERS and len(rel.parts) > 1:
                skipped.append(f"{rel} (another runtime's export)")
            elif len(rel.parts) == 1 and name.endswith(WEIGHT_SUFFIXES):
                skipped.append(f"{rel} (float weights in another file: not part of the int8 model)")
            else:
                copy.append(rel)
    return sorted(copy), skipped


def _copy_files(src_root: Path, dst_root: Path, files: list[Path]) -> None:
    for rel in files:
        (dst_root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src_root / rel, dst_root / rel)  # follows links: a hub cache's blobs come as files


@contextmanager
def _shared_directory_output(output: Path, ranks: Ranks) -> Iterator[Path]:
    """atomic_output(directory=True) on rank 0; every rank writes into the one temporary
    directory (rank 0 broadcasts its path) and rank 0 renames it into place once all are done."""
    if not ranks.distributed:
        with atomic_output(output, directory=True) as tmp:
            yield tmp
        return
    if ranks.root:
        with atomic_output(output, directory=True) as tmp:
            broadcast(str(tmp), ranks)
            yield tmp
        together(ranks, lambda: None)  # renamed into place: the other ranks may return
    else:
        yield Path(broadcast(None, ranks))
        together(ranks, lambda: None)


def _expected_bytes(ckpt: Checkpoint, plan: _Plan, layers: list[MLPLayer], copy: list[Path]) -> int:
    """About what the output takes: every shard's tensors and header (with room for the record,
    under 4 KiB per MLP), the index, config and copied files (free space is checked against it)."""
    total = 0
    for tensors in plan.shards.values():
        total += sum(map(tensor_bytes, tensors.values())) + len(header_bytes(tensors, {})) + 4096 * (1 + len(layers))
    if ckpt.kind == "directory":
        total += sum((ckpt.directory / rel).stat().st_size for rel in copy) + (1 << 16)
    return total


# ---- the run ----------------------------------------------------------------------------------


def quantize_checkpoint(
    source: str | Path,
    output: str | Path | None = None,
    options: QuantizeOptions | None = None,
    progress: Callable[[int, int, MLPLayer], None] | None = None,
) -> QuantizeReport:
    """Quantize the MLPs of `source` (a .safetensors file or a model directory) and write the whole checkpoint.

    output: None writes `<name>.int8.safetensors` beside a file, `DIR-int8/` beside a directory.
    progress: called as progress(done, total, layer) once each MLP is written (a progress bar).
    Runs torch on calibration.quantize_weights.compute_threads() threads (restored after): one
    core is left to the writer thread. options.device: where the weights are quantized and
    their error measured (auto: a CUDA GPU when there is one); reading, calibration,
    smoothing's statistics and writing stay on the CPU, and the output is the same bit for bit.
    """
    with intra_op_threads(compute_threads()):
        return _quantize_checkpoint(source, output, options, progress)


def _quantize_checkpoint(source, output, options, progress) -> QuantizeReport:
    options = options or QuantizeOptions()
    source = Path(source)
    with open_checkpoint(source) as ckpt:
        return _quantize_open_checkpoint(ckpt, source, output, options, progress)


def _quantize_open_checkpoint(ckpt, source, output, options, progress) -> QuantizeReport:
    timer = PhaseTimer()
    meter = MemoryMeter()
    ranks = current_ranks()
    device = options.compute_device
    if is_quantized_checkpoint(ckpt):
        raise CheckpointError(f"{source} is already quantized (written by gelugemm quantize, or a compressed-tensors checkpoint); quantize the original checkpoint instead")
    layers = mlps_in(ckpt, layers=options.layers, gelu=options.gelu, activation_dtype=options.activation_dtype)
    is_dir = ckpt.kind == "directory"
    output = default_output(source) if output is None else Path(output)
    scheme = scheme_from_options(options.scheme, options.granularity, options.activation_scheme)
    warnings = [SYNTHETIC_WARNING] if options.synthetic else []
    ragged = _group_not_dividing(layers, scheme.granularity.group_size)
    if ragged is not None and options.granularity_given:
        _refuse_ragged(layers, scheme.granularity.group_size, *ragged)
    elif ragged is not None:  # the default group:128 on a small model (a toy, a test): written, and said
        warnings.append(
            f"{scheme.granularity} (the default) does not divide {ragged[0]}'s input width {ragged[1]}: the file runs on "
            "gelugemm only (compressed-tensors' loaders refuse a partial group); --granularity per-channel loads anywhere"
        )
    plan = _plan(ckpt, layers, scheme, options)  # from the headers alone
    copy, files_skipped = _other_files(ckpt) if is_dir else ([], [])
    if ranks.root:  # the one rank that creates, renames and reports the output
        _check_paths(ckpt, source, output, options, _expected_bytes(ckpt, plan, layers, copy))
    # the source digests for the record, hashed from here on while the rest runs (_SourceHashes)
    hashes = _SourceHashes(ckpt)
    try:
        calibration = None
        if options.needs_calibration:
            calibration = describe_source(calib=options.calib_file, tokens=options.tokens, seed=options.seed)
        with timer.phase("sha256"):  # of the calibration file, for the record (the source's: _SourceHashes)
            if calibration and calibration["kind"] == "file":
                check_calibration_file(options.calib_file, layers)  # every row: floats, finite, not all zero
                calibration["sha256"] = sha256_file(options.calib_file)
            elif calibration:
                check_tokens_fit(options.tokens or DEFAULT_TOKENS, layers)  # before any row is drawn
        qconfig, record, runs_on = _config_and_record(
            ckpt, output, layers, options, scheme, calibration, plan.smoothing, hashes.pending()
        )  # fmt: skip
        record_text = json.dumps(record)
        smooth_scales = {}
        if options.smooth is not None:
            with timer.phase("smoothing scales"):
                smooth_scales = _smooth_scales(ckpt, layers, options, meter)
        reports: dict[int, LayerReport] = {}
        pending: dict[int, dict[str, torch.Tensor]] = {}
        if device.type == "cuda":
            with timer.phase("cuda init"):  # the context, once: a fixed cost the report shows apart
                torch.zeros(1, device=device)
        # Every float weight is read into it, one at a time; page-locked for a GPU, which copies
        # from it without the driver staging the bytes through a buffer of its own.
        weights = ReadBuffer(pin_memory=device.type == "cuda")

        def produce(i: int, name: str) -> torch.Tensor:
            """Output tensor `name` of layer i, quantizing the layer the first time one is asked for."""
            if i not in pending:
                layer = layers[i]
                reports[i], pending[i] = _quantize_layer(
                    ckpt, layer, options, scheme, plan.smoothing.get(layer.fc1), smooth_scales.get(layer.fc1), timer, weights,
                    device,
                )  # fmt: skip
                meter.sample()  # this layer's float and int8 weights and its calibration inputs are alive here
                if progress is not None:
                    progress(len(reports), len(layers), layer)
            tensor = pending[i].pop(name)
            if not pending[i]:
                del pending[i]
                release_free_memory()  # the layer's temporaries, before the next layer's
            return tensor

        def tensors(shard: str) -> Iterator[tuple[str, torch.Tensor | StoredTensor]]:
            for name in plan.shards[shard]:
                yield name, plan.copies[name] if name in plan.copies else produce(plan.layer_of[name], name)
                meter.sample()

        def metadata(shard, record_text: str = record_text) -> dict[str, str]:
            """The source shard's own metadata, the record, and the smoothing scales of the MLPs whose W1 it holds."""
            meta = {k: v for k, v in shard.metadata.items() if k != RECORD_KEY and not k.startswith(SMOOTH_KEY)}
            meta[RECORD_KEY] = record_text
            for layer in layers:
                if layer.w1 in shard.tensors and layer.fc1 in smooth_scales:
                    meta[SMOOTH_KEY + layer.fc1] = encode_scale(smooth_scales[layer.fc1])
            return meta

        final_text: list[str] = []

        def final_record_text() -> str:
            """The record with the source's digests in it (the first call waits for them)."""
            if not final_text:
                with timer.phase("sha256"):  # only what is left of the hashing when it is needed
                    record["source"] = source_facts(ckpt, relative_to=output.resolve().parent, digests=hashes.digests())
                final_text.append(json.dumps(record))
            return final_text[0]

        def final_metadata(shard) -> Callable[[], dict[str, str]]:
            """metadata(shard) with the final record, for write_stream to rewrite the header with."""
            return lambda: metadata(shard, final_record_text())

        written = 0
        files_copied = []
        if not is_dir:
            # one shard: rank 0's work (other ranks under torchrun have none)
            if ranks.root:
                shard = ckpt.shards[0]
                with timer.phase("write"):  # what quantizing the layers inside it took is theirs
                    written = _write_atomically(
                        output, plan.shards[shard.name], tensors(shard.name), metadata(shard), final_metadata(shard)
                    )  # fmt: skip
            gathered = together(ranks, lambda: dict(reports))
        else:
            with _shared_directory_output(output, ranks) as tmp:

                def write_mine() -> tuple[int, dict[int, LayerReport]]:
                    # under torchrun each rank writes every world-th shard, quantizing the layers they hold
                    with timer.phase("write"):  # what quantizing the layers inside it took is theirs
                        size = sum(
                            _write_file(tmp / shard.name, plan.shards[shard.name], tensors(shard.name), metadata(shard),
                                        final_metadata(shard))  # fmt: skip
                            for i, shard in enumerate(ckpt.shards) if ranks.mine(i)
                        )  # fmt: skip
                    return size, dict(reports)

                parts = together(ranks, write_mine)
                written = sum(size for size, _ in parts)
                gathered = [part for _, part in parts]
                if ranks.root:
                    if ckpt.index is not None:
                        index_meta = ckpt.index.get("metadata")
                        index = index_for(plan.shards, index_meta if isinstance(index_meta, dict) else None)
                        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
                    if ckpt.config is not None:
                        (tmp / CONFIG_FILE).write_text(json.dumps({**ckpt.config, "quantization_config": qconfig}, indent=2) + "\n")
                    with timer.phase("write"):
                        _copy_files(ckpt.directory, tmp, copy)
                files_copied = [str(p) for p in copy]
        for part in gathered:  # a layer whose tensors sit in two ranks' shards is reported by both, alike
            reports.update(part)
        largest = max([tensor_bytes(info) for info in ckpt.infos.values() if info.dtype in DTYPE_BYTES] + [0])
        source_bytes, largest_shard = ckpt.total_bytes, ckpt.largest_shard_bytes
        final_record_text()  # the report's record has the digests too (a rank that wrote no shard included)
        timing = timer.facts()
        timing["mb_per_s"] = source_bytes / timing["seconds"] / 1e6
        return QuantizeReport(
            source=str(source), output=str(output), output_kind="directory" if is_dir else "file", scheme=options.scheme,
            granularity=options.granularity, activations=record["activations"], method=options.observer,
            smooth=options.smooth, gelu=layers[0].gelu, gelu_source=layers[0].gelu_source, calibration=calibration,
            layers=[reports[i] for i in range(len(layers))], tensors_copied=len(plan.copies), shards=list(plan.shards),
            files_copied=files_copied, files_skipped=files_skipped, runs_on=runs_on, source_bytes=source_bytes,
            output_bytes=written, largest_tensor_bytes=largest, largest_shard_bytes=largest_shard, memory=meter.facts(),
            seconds=timing["seconds"], device=device_name(device), device_asked=str(options.device), timing=timing, warnings=warnings, record=record,
        )  # fmt: skip
    finally:
        hashes.close()
