"""The int8 checkpoint format: compressed-tensors, as vLLM and transformers load it. This
module is its one owner: tensor names, scale shapes, int32 packing, the `quantization_config`,
gelugemm's metadata record, and reading all of it back (gelugemm's own output, or a
compressed-tensors int8 checkpoint another tool wrote).

Per quantized linear with prefix P (`MLPLayer.fc1` or `.fc2`, a gated MLP's `.up` too: every
linear the MLP has, ModernBERT's concatenated `Wi` as the one linear it is), N outputs, K inputs:

    w8a8, format "int-quantized"
      P.weight         int8, the source's layout: [N, K] (nn.Linear); GPT-2's Conv1D keeps
                       [K, N], which vLLM's GPT-2 loader transposes with its float weights
                       (a plain w1/w2 file keeps the names w1, w2)
      P.weight_scale   float32 [N, 1] (strategy "channel")
      P.input_scale    float32 [1], static activations only (strategy "tensor"): on fc1 (and
                       a gated MLP's up, which reads the same x) the scale of x; on fc2
                       the GELU output's (a gated MLP's GELU(gate) * up), which the fused
                       kernel's GEMM1 requantizes to (the loader hands it to the op as
                       w1.output_scale)
    w8a16, format "pack-quantized" (llm-compressor's W8A16 layout, vLLM's weight-only int8)
      P.weight_packed  int32 [N, ceil(K / 4)]: W as [N, K] whatever the source layout,
                       q + 128 in [1, 255], four per word, the first in the lowest byte
      P.weight_scale   float32 [N, 1] per channel, [N, ceil(K / G)] per group of G
      P.weight_shape   int64 [2] = [N, K]

Symmetric int8, no zero points. Biases and every other tensor are the source's; with
SmoothQuant folded into a LayerNorm (pre-LN), that LayerNorm's weight and bias are divided
by the smoothing scale. What the format does not define stays out of the tensors: the
safetensors metadata key RECORD_KEY holds gelugemm's record (scheme, method, calibration,
the MLPs found, the source's path and sha256s, where smoothing went); each layer's smoothing
scale is under SMOOTH_KEY + fc1 in the shard that holds fc1's weight (base64 float32).

A run-time smoothing scale (post-LN BERT, where the LayerNorm also feeds the residual) has no
place in compressed-tensors: such an output's `input_activations` carry the field
RUN_TIME_SMOOTHING, which compressed-tensors' own validation (transformers, vLLM) refuses,
so an engine fails to load it rather than running it without the division.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import math
import os
import threading
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from calibration.checkpoint import (
    FLOAT_DTYPES,
    Checkpoint,
    MLPLayer,
    MLPTensors,
    discover,
    open_checkpoint,
)
from calibration.errors import CheckpointError
from calibration.safetensors_header import JSONTextError, parse_json
from calibration.safetensors_stream import TensorInfo, tensor_bytes
from kernels.errors import LaunchError
from kernels.quantized import QuantizedWeight
from kernels.schemes import ACTIVATION_DTYPES, GELU_FLAVOURS, ActivationScheme, Granularity, SchemeError
from kernels.version import __version__

RECORD_KEY = "gelugemm"
SMOOTH_KEY = "gelugemm.smooth_scale."
FORMAT = "gelugemm-int8"
FORMAT_VERSION = 2
QUANT_METHOD = "compressed-tensors"
# In a config group's input_activations: the MLP input must be divided by gelugemm's smoothing
# scale at run time. Not a compressed-tensors field: other loaders refuse the checkpoint.
RUN_TIME_SMOOTHING = "gelugemm_run_time_smoothing"
WEIGHT_QUANT = "symmetric int8 in [-127, 127], round half to even, scale = absmax / 127"
INT8_FORMATS = ("int-quantized", "naive-quantized", "pack-quantized")
PACK_FACTOR = 4  # int8 values per int32 word

# ---- the scheme, as compressed-tensors writes it ------------------------------------------------


@dataclass(frozen=True)
class FormatScheme:
    """What one quantized linear holds: int8 weights (per channel or per group) and, for
    w8a8, how its input is scaled. Parsed from gelugemm's options or a config group."""

    scheme: str  # "w8a16" or "w8a8"
    granularity: Granularity
    activations: ActivationScheme | None = None  # w8a8 only

    def __post_init__(self):
        if (self.scheme == "w8a8") != (self.activations is not None):
            raise SchemeError("activations go with w8a8, and w8a8 needs them")

    @property
    def format(self) -> str:
        return "int-quantized" if self.scheme == "w8a8" else "pack-quantized"

    @property
    def static(self) -> bool:
        return self.activations is not None and not self.activations.is_dynamic

    def weights_args(self) -> dict:
        g = self.granularity.group_size
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel" if g is None else "group",
                "group_size": g, "dynamic": False, "observer": "minmax"}  # fmt: skip

    def input_args(self, observer: str | None = None, run_time_smoothing: bool = False) -> dict | None:
        if self.activations is None:
            return None
        a = self.activations
        args = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": a.strategy, "group_size": a.group_size,
                "dynamic": a.is_dynamic}  # fmt: skip
        if observer is not None and not a.is_dynamic:
            args["observer"] = observer
        if run_time_smoothing:
            args[RUN_TIME_SMOOTHING] = True
        return args

    def describe(self) -> str:
        acts = f", {self.activations} activations" if self.activations is not None else ""
        return f"{self.scheme} {self.granularity}{acts}"

    @classmethod
    def from_args(cls, weights: dict | None, inputs: dict | None, where: str) -> "FormatScheme":
        """A config group's `weights` / `input_activations`; what gelugemm cannot run is a CheckpointError."""
        if not isinstance(weights, dict):
            raise CheckpointError(f"{where}: no weights quantization; gelugemm reads int8 weights")
        _check_int8(weights, f"{where} weights")
        strategy = weights.get("strategy") or ("group" if weights.get("group_size") else "tensor")
        if strategy in ("channel", "tensor"):
            granularity = Granularity(None)  # a per-tensor scale is expanded to one per channel
        elif strategy == "group" and isinstance(weights.get("group_size"), int) and weights["group_size"] > 0:
            granularity = Granularity(weights["group_size"])
        else:
            raise CheckpointError(f"{where}: weight strategy {strategy!r} (group_size {weights.get('group_size')}); gelugemm reads channel, tensor or group scales")
        if inputs is None:
            return cls("w8a16", granularity)
        _check_int8(inputs, f"{where} input_activations")
        kind = inputs.get("strategy")
        dynamic = inputs.get("dynamic")
        if kind == "tensor" and dynamic is False:
            activations = ActivationScheme("static")
        elif kind == "token" and dynamic is True:
            activations = ActivationScheme("dynamic")
        elif kind == "group" and dynamic is True and isinstance(inputs.get("group_size"), int) and inputs["group_size"] > 0:
            activations = ActivationScheme("group", inputs["group_size"])
        else:
            raise CheckpointError(f"{where}: input activations {kind!r} with dynamic={dynamic!r}; gelugemm runs static tensor, dynamic token or dynamic group scales")
        if not granularity.per_channel:
            raise CheckpointError(f"{where}: w8a8 with group weight scales ({granularity}); gelugemm's w8a8 takes per-channel weight scales")
        return cls("w8a8", granularity, activations)


def _check_int8(args: dict, where: str) -> None:
    if args.get("type", "int") != "int" or args.get("num_bits") != 8:
        raise CheckpointError(f"{where}: {args.get('num_bits')}-bit {args.get('type', 'int')}; gelugemm runs 8-bit int only")
    if args.get("symmetric") is False:
        raise CheckpointError(f"{where}: asymmetric (zero points); gelugemm runs symmetric int8 only")


def scheme_from_options(scheme: str, granularity: str, activations: ActivationScheme | None) -> FormatScheme:
    return FormatScheme(scheme, Granularity.parse(granularity), activations)


# ---- targets: which linears a config group names ------------------------------------------------


def _tail_regex(tail: str) -> str:
    return r"re:(?:.*\.)?" + re.escape(tail) + "$"


def quantized_targets(quantized: list[str], linears: list[str]) -> list[str]:
    """`targets` regexes naming exactly the quantized linears among all the linears.

    Each is the shortest dotted tail of a quantized prefix that no unquantized linear ends
    with, matched after any leading module path: a loader whose module names drop or add a
    prefix (`bert.`, `model.`) still finds them. All layers' `intermediate.dense` is one entry.
    `quantized` and `linears` may hold a loader's other names for the same modules too.
    """
    others = [name for name in linears if name not in set(quantized)]
    targets: list[str] = []
    for name in quantized:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            tail = ".".join(parts[i:])
            if not any(o == tail or o.endswith("." + tail) for o in others):
                break
        target = _tail_regex(tail)
        if target not in targets:
            targets.append(target)
    return targets


def target_matches(target: str, name: str) -> bool:
    """compressed-tensors' name match: `re:` regexes with re.match, else the exact name."""
    if target.startswith("re:"):
        try:
            return re.match(target[3:], name) is not None
        except re.error:
            return False
    return target == name


def quantization_config(
    scheme: FormatScheme, targets: list[str], ignore: list[str], *, observer: str | None = None, gelugemm_only: bool = False
) -> dict:
    """config.json's `quantization_config` for linears quantized with `scheme`.
    gelugemm_only: smoothing stays at run time (RUN_TIME_SMOOTHING): other loaders refuse it."""
    group = {
        "targets": targets,
        "weights": scheme.weights_args(),
        "input_activations": scheme.input_args(observer, run_time_smoothing=gelugemm_only),
        "output_activations": None,
        "format": scheme.format,
    }
    return {
        "quant_method": QUANT_METHOD,
        "format": scheme.format,
        "quantization_status": "compressed",
        "config_groups": {"group_0": group},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


# ---- tensors of one quantized linear -------------------------------------------------------------


def tensor_name(prefix: str, field: str) -> str:
    """`P.weight_scale`, `P.input_scale`, ... for the linear with prefix P."""
    return f"{prefix}.{field}"


def weight_scale_shape(n: int, k: int, granularity: Granularity) -> tuple[int, ...]:
    g = granularity.group_size
    return (n, 1) if g is None else (n, -(-k // g))


def linear_plan(prefix: str, weight_name: str, stored: TensorInfo, n: int, k: int, scheme: FormatScheme) -> dict[str, TensorInfo]:
    """The tensors one quantized linear writes, in write order, with dtypes and shapes.
    stored: the source weight as stored (its layout)."""
    plan: dict[str, TensorInfo] = {}
    if scheme.scheme == "w8a16":
        plan[tensor_name(prefix, "weight_packed")] = TensorInfo("I32", (n, -(-k // PACK_FACTOR)))
        plan[tensor_name(prefix, "weight_scale")] = TensorInfo("F32", weight_scale_shape(n, k, scheme.granularity))
        plan[tensor_name(prefix, "weight_shape")] = TensorInfo("I64", (2,))
    else:
        plan[weight_name] = TensorInfo("I8", stored.shape)
        plan[tensor_name(prefix, "weight_scale")] = TensorInfo("F32", weight_scale_shape(n, k, scheme.granularity))
        if scheme.static:
            plan[tensor_name(prefix, "input_scale")] = TensorInfo("F32", (1,))
    return plan


def pack_int8(q_nk: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> int32 [N, ceil(K / 4)]: q + 128 as bytes, four per word, little-endian
    (compressed-tensors' pack_to_int32 with num_bits=8; the padding bytes are 0).

    q + 128 in [0, 255] is q's two's-complement byte with its top bit flipped, so the packed
    words are the int8 bytes XOR 0x80, viewed four at a time: one byte copy, no wider temporary.
    """
    n, k = q_nk.shape
    # A fresh row-major buffer: an elementwise result (or a pad) keeps a transposed input's
    # strides on CUDA, and an [N, 1] column's rows would not be four bytes apart.
    words = -(-k // PACK_FACTOR)
    biased = torch.empty((n, words * PACK_FACTOR), dtype=torch.uint8, device=q_nk.device)
    torch.bitwise_xor(q_nk.view(torch.uint8), 0x80, out=biased[:, :k])
    biased[:, k:] = 0
    return biased.view(torch.int32)


def unpack_int8(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """int32 [N, ceil(K / 4)] -> int8 [N, K] (compressed-tensors' unpack_from_int32, 8 bits)."""
    return (packed.contiguous().view(torch.uint8)[:, :k] ^ 0x80).view(torch.int8).reshape(n, k).contiguous()


def linear_tensors(prefix: str, weight_name: str, qw: QuantizedWeight, layout: str, scheme: FormatScheme) -> dict[str, torch.Tensor]:
    """The tensors of `linear_plan`, from a QuantizedWeight (scale [N] or [N, groups] in memory)."""
    q_nk = qw.data if layout == "out_in" else qw.data.t()
    n, k = q_nk.shape
    scale = qw.scale.reshape(weight_scale_shape(n, k, scheme.granularity)).to(torch.float32)
    if scheme.scheme == "w8a16":
        return {
            tensor_name(prefix, "weight_packed"): pack_int8(q_nk),
            tensor_name(prefix, "weight_scale"): scale,
            tensor_name(prefix, "weight_shape"): torch.tensor([n, k], dtype=torch.int64),
        }
    out = {weight_name: qw.data, tensor_name(prefix, "weight_scale"): scale}
    if scheme.static:
        out[tensor_name(prefix, "input_scale")] = qw.input_scale.reshape(1).to(torch.float32)
    return out


def encode_scale(s: torch.Tensor) -> str:
    return base64.b64encode(s.to(torch.float32).contiguous().numpy().tobytes()).decode()


def decode_scale(text: str, size: int, where: str) -> torch.Tensor:
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:
        data = b""
    if len(data) != 4 * size:
        raise CheckpointError(f"{where}: its smoothing scale is not {size} float32 values")
    return torch.frombuffer(bytearray(data), dtype=torch.float32).clone()


# ---- the source: where it is and its sha256s -----------------------------------------------------


class HashingStopped(Exception):
    """sha256_file was asked to stop before the end of its file."""


def sha256_file(path: str | Path, stop: threading.Event | None = None) -> str:
    """The file's sha256 (hex); with `stop`, raises HashingStopped once it is set."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            if stop is not None and stop.is_set():
                raise HashingStopped(str(path))
            digest.update(block)
    return digest.hexdigest()


def hashing_workers(files: int) -> int:
    """Threads to hash `files` files at once: one each, up to the cores this process may use
    (hashlib lets go of the GIL while it hashes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(files, cores))


def sha256_files(paths: list[Path]) -> list[str]:
    """sha256_file of each path, several files at once on as many cores: a sharded
    checkpoint hashes about cores times faster."""
    workers = hashing_workers(len(paths))
    if workers <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sha256") as pool:
        return list(pool.map(sha256_file, paths))


# Stands in for a source digest still being computed: a sha256's length, so a header written
# with it keeps its size when the digest replaces it (quantize hashes while it writes).
PENDING_SHA256 = "0" * 64


def source_files(ckpt: Checkpoint) -> list[Path]:
    """The files a source record hashes: each shard, then the index where there is one."""
    return [s.path for s in ckpt.shards] + ([ckpt.index_path] if ckpt.index_path is not None else [])


def source_facts(ckpt: Checkpoint, relative_to: Path | None = None, digests: list[str] | None = None) -> dict:
    """The record of a source checkpoint: its path, and the sha256 of its index and each shard.
    digests: those of source_files(ckpt), in its order, where the caller has them (or
    PENDING_SHA256 placeholders); else they are computed here."""
    path = ckpt.path.resolve()
    if digests is None:
        digests = sha256_files(source_files(ckpt))
    files = [{"name": s.name, "sha256": d, "bytes": s.path.stat().st_size} for s, d in zip(ckpt.shards, digests)]
    facts = {
        "kind": ckpt.kind,
        "path": str(path),
        "relative_path": os.path.relpath(path, relative_to.resolve()) if relative_to is not None else None,
        "index": None if ckpt.index_path is None else {"name": ckpt.index_path.name, "sha256": digests[len(ckpt.shards)]},
        "files": files,
    }
    if ckpt.kind == "file":
        facts["sha256"], facts["bytes"] = files[0]["sha256"], files[0]["bytes"]
    return facts


def _matches(candidate: Path, recorded: dict) -> bool:
    """A checkpoint at `candidate` has the recorded shards (and index), byte for byte."""
    if recorded.get("kind") == "directory":
        if not candidate.is_dir():
            return False
        index = recorded.get("index")
        if index is not None and (not (candidate / index["name"]).is_file() or sha256_file(candidate / index["name"]) != index["sha256"]):
            return False
        paths = [candidate / f["name"] for f in recorded["files"]]
        if not all(p.is_file() for p in paths):
            return False
        return sha256_files(paths) == [f["sha256"] for f in recorded["files"]]
    return candidate.is_file() and sha256_file(candidate) == recorded["sha256"]


def compare_with_source(candidate: Path, recorded: dict) -> bool:
    """True where `candidate` (a file or model directory) is the recorded source, byte for byte."""
    return _matches(Path(candidate), recorded)


def resolve_source(path: str | Path, record: dict) -> Path:
    """The source checkpoint a quantized checkpoint was made from, checked by sha256.

    Tried: the recorded absolute path, then the recorded path relative to the quantized
    checkpoint (for the two moved together). Neither present, or changed since: CheckpointError.
    """
    source = record["source"]
    here = Path(path).resolve().parent
    candidates = [Path(source["path"])]
    if source.get("relative_path"):
        candidates.append(here / source["relative_path"])
    for candidate in candidates:
        if candidate.exists():
            if not _matches(candidate, source):
                raise CheckpointError(f"source checkpoint {candidate} has changed since {path} was quantized (sha256 differs)")
            return candidate
    tried = ", ".join(dict.fromkeys(map(str, candidates)))
    raise CheckpointError(f"source checkpoint of {path} not found (tried {tried}); pass --reference PATH")


# ---- the record -----------------------------------------------------------------------------------


def build_record(
    ckpt: Checkpoint, output: Path, layers: list[MLPLayer], scheme: FormatScheme, method: str | None, smooth: float | None,
    calibration: dict | None, qconfig: dict, smoothing: dict[str, str], runs_on: str, digests: list[str] | None = None,
) -> dict:  # fmt: skip
    """gelugemm's record, stored under RECORD_KEY in the metadata of every output shard.
    digests: the source files' sha256s, as source_facts takes them.

    smoothing: {fc1: "folded" | "run-time"} (their scales go under SMOOTH_KEY + fc1).
    runs_on: which engines can run the output, in words.
    """
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool": "gelugemm",
        "version": __version__,
        "scheme": scheme.scheme,
        "granularity": str(scheme.granularity),
        "group_size": scheme.granularity.group_size,
        "activations": None if scheme.activations is None else str(scheme.activations),
        "weight_quant": WEIGHT_QUANT,
        "method": method,
        "smooth": smooth,
        "smoothing": smoothing,
        "runs_on": runs_on,
        "calibration": calibration,
        "gelu": layers[0].gelu,
        "gelu_source": layers[0].gelu_source,
        "source": source_facts(ckpt, relative_to=output.resolve().parent, digests=digests),
        "quantization_config": qconfig,
        "layers": [layer.to_record() for layer in layers],
    }


# ---- reading a quantized checkpoint --------------------------------------------------------------


def read_record_from(metadata: dict[str, str], where: Path) -> dict | None:
    """The gelugemm record in one shard's metadata, or None; checked field by field (what
    gelugemm reads of it: its MLPs, source, calibration file, smoothing), so that a damaged
    or edited record is one CheckpointError here, never an error where a field is used."""
    text = metadata.get(RECORD_KEY)
    if text is None:
        return None
    try:
        record = parse_json(text)
    except JSONTextError as exc:
        raise CheckpointError(f"{where}: its {RECORD_KEY!r} metadata is {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{where}: its {RECORD_KEY!r} metadata is not a {FORMAT} record")
    if record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: {FORMAT} version {_shown(record.get('format_version'))}; this gelugemm reads version {FORMAT_VERSION} "
            "(quantize the original checkpoint again)"
        )
    _record_layers(record, where)  # a record whose MLPs cannot be read is refused here, in one line
    _check_source(record, where)
    _check_calibration(record, where)
    smoothing = _field(record, "smoothing", "smoothing", where, "object", required=False)
    for fc1, how in (smoothing or {}).items():
        _field(smoothing, fc1, f"smoothing[{fc1!r}]", where, "text", allowed=("folded", "run-time"))
    return record


# ---- checking the record: each field gelugemm reads, its type and allowed values ----------------

_KINDS = {
    "text": ((str,), "a string"),
    "text or null": ((str, type(None)), "a string or null"),
    "object": ((dict,), "an object"),
    "object or null": ((dict, type(None)), "an object or null"),
    "list": ((list,), "a list"),
    "positive integer": ((int,), "a positive integer"),
    "boolean": ((bool,), "true or false"),
    "number": ((int, float), "a number"),
}
# MLPLayer's annotations (strings: `from __future__ import annotations`) -> a kind above.
_ANNOTATION_KINDS = {"str": "text", "str | None": "text or null", "int": "positive integer", "bool": "boolean", "float": "number"}
# The MLPLayer fields that take one of a few values.
_LAYER_VALUES = {
    "weight_layout": ("out_in", "in_out"),
    "gelu": GELU_FLAVOURS,
    "gated": (None, "separate", "concatenated"),
    "activation_dtype": tuple(ACTIVATION_DTYPES),
}


def _shown(value) -> str:
    """A record value as the one line shows it: short JSON, or the kind of a container."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _malformed(where, what: str) -> CheckpointError:
    return CheckpointError(f"{where}: its {RECORD_KEY} record is malformed: {what}")


def _field(owner: dict, key: str, label: str, where, kind: str, *, allowed: tuple | None = None, required: bool = True):
    """owner[key], checked to be of `kind` (a _KINDS key) and, where given, one of `allowed`."""
    if key not in owner:
        if required:
            raise _malformed(where, f"{label} is missing")
        return None
    value = owner[key]
    types, words = _KINDS[kind]
    if allowed is not None:
        words = "one of " + ", ".join(_shown(v) for v in allowed)
    ok = isinstance(value, types) and isinstance(value, bool) == (bool in types)
    if ok and kind == "positive integer":
        ok = value > 0
    if ok and kind == "number":
        ok = isinstance(value, int) or math.isfinite(value)
    if ok and allowed is not None:
        ok = value in allowed
    if not ok:
        raise _malformed(where, f"{label} is {_shown(value)}, expected {words}")
    if isinstance(value, str) and "\x00" in value:
        raise _malformed(where, f"{label} holds a NUL character")
    return value


def _file_name(entry, label: str, where) -> None:
    """{"name": a file in the model directory, "sha256": str}, as source_facts writes it."""
    if not isinstance(entry, dict):
        raise _malformed(where, f"{label} is {_shown(entry)}, expected an object")
    name = _field(entry, "name", f"{label}.name", where, "text")
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise _malformed(where, f"{label}.name is {_shown(name)}, expected a file name in the model directory")
    _field(entry, "sha256", f"{label}.sha256", where, "text")


def _check_source(record: dict, where) -> None:
    """The source checkpoint: what resolve_source and compare_with_source read."""
    source = _field(record, "source", "source", where, "object")
    kind = _field(source, "kind", "source.kind", where, "text", allowed=("file", "directory"))
    _field(source, "path", "source.path", where, "text")
    _field(source, "relative_path", "source.relative_path", where, "text or null", required=False)
    if kind == "file":
        _field(source, "sha256", "source.sha256", where, "text")
        return
    files = _field(source, "files", "source.files", where, "list")
    if not files:
        raise _malformed(where, "source.files is empty, expected the model directory's shards")
    for i, entry in enumerate(files):
        _file_name(entry, f"source.files[{i}]", where)
    if _field(source, "index", "source.index", where, "object or null", required=False) is not None:
        _file_name(source["index"], "source.index", where)


def _check_calibration(record: dict, where) -> None:
    """The calibration source: a file's path and sha256 are read back (verify's default input)."""
    calibration = _field(record, "calibration", "calibration", where, "object or null", required=False)
    if calibration is not None and calibration.get("kind") == "file":
        _field(calibration, "path", "calibration.path", where, "text")
        _field(calibration, "sha256", "calibration.sha256", where, "text", required=False)


def _record_layers(record: dict, where) -> list[MLPLayer]:
    """The MLPs a record lists, each field present with its type and an allowed value; else a CheckpointError."""
    layers = record.get("layers")
    fields = MLPLayer.__dataclass_fields__
    if not isinstance(layers, list) or not layers:
        raise _malformed(where, "it lists no MLPs" if "layers" not in record or layers == [] else f"layers is {_shown(layers)}, expected a list of MLPs")
    out = []
    for i, entry in enumerate(layers):
        label = f"layers[{i}]"
        if not isinstance(entry, dict):
            raise _malformed(where, f"{label} is {_shown(entry)}, expected an object")
        unknown = sorted(set(entry) - set(fields))
        if unknown:
            raise _malformed(where, f"{label} has the unknown field {unknown[0]!r}")
        for name, field in fields.items():
            required = field.default is dataclasses.MISSING
            kind = _ANNOTATION_KINDS[field.type]
            _field(entry, name, f"{label}.{name}", where, kind, allowed=_LAYER_VALUES.get(name), required=required)
        layer = MLPLayer.from_record(entry)
        if layer.gated == "separate":
            for name in ("up", "w_up"):
                _field(entry, name, f"{label}.{name} (a separate up projection's)", where, "text")
        out.append(layer)
    return out


def _quantization_config_of(ckpt: Checkpoint, record: dict | None) -> dict | None:
    config = ckpt.config if ckpt.kind == "directory" else None
    qc = (config or {}).get("quantization_config")
    if qc is None and record is not None:
        qc = record.get("quantization_config")
    return qc if isinstance(qc, dict) else None


def is_quantized_checkpoint(ckpt: Checkpoint) -> bool:
    """Written by gelugemm quantize (its record), or a compressed-tensors checkpoint (config.json)."""
    if read_record_from(ckpt.metadata(), ckpt.shards[0].path) is not None:
        return True
    qc = (ckpt.config or {}).get("quantization_config") if ckpt.kind == "directory" else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def is_quantized_file(path: str | Path) -> bool:
    """True for a checkpoint written by `gelugemm quantize` or another compressed-tensors tool."""
    with open_checkpoint(path) as ckpt:
        return is_quantized_checkpoint(ckpt)


@dataclass(frozen=True)
class _Group:
    name: str
    scheme: FormatScheme
    targets: tuple[str, ...]
    format: str


def _groups(qc: dict, where: Path) -> tuple[list[_Group], list[str]]:
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(f"{where}: quantization_config quant_method {method!r}; gelugemm reads compressed-tensors")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(f"{where}: quantization_status {status!r}: its weights are not stored as int8 (gelugemm reads 'compressed')")
    groups = []
    config_groups = qc.get("config_groups") or {}
    if not isinstance(config_groups, dict):
        raise CheckpointError(f"{where}: quantization_config's config_groups is not an object")
    for name, group in config_groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("targets", []), list):
            raise CheckpointError(f"{where}: config group {name!r} is not an object with a list of targets")
        if not isinstance(group.get("weights"), (dict, type(None))) or not isinstance(group.get("input_activations"), (dict, type(None))):
            raise CheckpointError(f"{where}: config group {name!r}: weights and input_activations must be objects")
        fmt = group.get("format") or qc.get("format")
        if fmt not in INT8_FORMATS:
            raise CheckpointError(f"{where}: config group {name!r} has format {fmt!r}; gelugemm reads {', '.join(INT8_FORMATS)}")
        scheme = FormatScheme.from_args(group.get("weights"), group.get("input_activations"), f"{where}: config group {name!r}")
        groups.append(_Group(name, scheme, tuple(t for t in group.get("targets") or () if isinstance(t, str)), fmt))
    if not groups:
        raise CheckpointError(f"{where}: quantization_config has no config_groups")
    ignore = qc.get("ignore")
    ignore = [t for t in ignore if isinstance(t, str)] if isinstance(ignore, list) else []
    return groups, ignore


def _group_of(prefix: str, groups: list[_Group], ignore: list[str]) -> _Group | None:
    """The config group that quantizes the linear `prefix`: exact name, then regex, then a class name
    (compressed-tensors' precedence; a class name such as "Linear" matches any linear)."""
    if any(target_matches(t, prefix) for t in ignore):
        return None
    for rank in ("exact", "regex", "class"):
        for group in groups:
            for target in group.targets:
                is_regex = target.startswith("re:")
                if rank == "exact" and not is_regex and target == prefix:
                    return group
                if rank == "regex" and is_regex and target_matches(target, prefix):
                    return group
                if rank == "class" and not is_regex and "." not in target and target[:1].isupper():
                    return group
    return None


class QuantizedCheckpoint:
    """A quantized checkpoint open for reading; each file is opened once.

    layers: the quantized MLPs (gelugemm's record, or discovery on another tool's output).
    scheme: their FormatScheme (one for every MLP). record: gelugemm's record or None.
    load(layer): (w1, b1, w2, b2), int8 QuantizedWeights with float32 scales, float biases.
    """

    def __init__(self, ckpt: Checkpoint, *, gelu: str | None = None):
        self.ckpt = ckpt
        self.path = ckpt.path
        self.record = read_record_from(ckpt.metadata(), ckpt.shards[0].path)
        qc = _quantization_config_of(ckpt, self.record)
        if self.record is None and qc is None:
            raise CheckpointError(
                f"{ckpt.path}: not a quantized checkpoint: not written by gelugemm quantize (no {RECORD_KEY!r} metadata record) "
                "and no compressed-tensors quantization_config"
            )
        if qc is None:
            raise CheckpointError(f"{ckpt.path}: its {RECORD_KEY!r} record has no quantization_config")
        self.quantization_config = qc
        self.made_by = "gelugemm" if self.record is not None else "compressed-tensors"
        groups, ignore = _groups(qc, ckpt.config_path if ckpt.kind == "directory" else ckpt.path)
        if self.record is not None:
            self.layers = _record_layers(self.record, self.path)
        else:
            self.layers = self._discover(gelu)
        self._schemes: dict[str, FormatScheme] = {}
        for layer in self.layers:
            for prefix, *_ in layer.linears():
                group = _group_of(prefix, groups, ignore)
                if group is None:
                    raise CheckpointError(f"{self.path}: {prefix} holds int8 tensors but no config group of its quantization_config targets it")
                self._schemes[prefix] = group.scheme
        schemes = {self._schemes[p].scheme for p in self._schemes}
        if len(schemes) > 1:
            raise CheckpointError(f"{self.path}: its MLPs mix {' and '.join(sorted(schemes))}; gelugemm runs one int8 scheme per checkpoint")
        first = self._schemes[self.layers[0].fc1]
        self.scheme = first
        self.gelugemm_only = any(
            isinstance(g, dict) and isinstance(g.get("input_activations"), dict) and g["input_activations"].get(RUN_TIME_SMOOTHING)
            for g in (qc.get("config_groups") or {}).values()
        )

    # -- another tool's checkpoint: the MLPs are found by their names, int8 weights as logical [N, K] tensors
    def _discover(self, gelu: str | None) -> list[MLPLayer]:
        infos = dict(self.ckpt.infos)
        for name in list(infos):
            if name.endswith(".weight_packed"):
                prefix = name[: -len(".weight_packed")]
                n, k = self._weight_shape(prefix)
                infos[f"{prefix}.weight"] = TensorInfo("I8", (n, k))
        found = discover(self.path, infos, self.ckpt.config, self.ckpt.config_path, gelu=gelu, weight_dtypes=FLOAT_DTYPES + ("I8",))
        quantized = []
        for layer in found:
            flags = [infos[weight].dtype == "I8" for _, weight, _, _ in layer.linears()]
            if all(flags):
                quantized.append(layer)
            elif any(flags):
                raise CheckpointError(f"{self.path}: MLP {layer.fc1} has int8 linears and float ones; gelugemm runs them all int8")
        if not quantized:
            raise CheckpointError(f"{self.path}: none of its {len(found)} MLPs is quantized")
        return quantized

    def _weight_shape(self, prefix: str) -> tuple[int, int]:
        name = tensor_name(prefix, "weight_shape")
        if name not in self.ckpt.infos:
            raise CheckpointError(f"{self.path}: {prefix}.weight_packed has no {name}")
        shape = self.ckpt.get_tensor(name).reshape(-1).tolist()
        if len(shape) != 2 or min(shape) < 1:
            raise CheckpointError(f"{self.path}: {name} is {shape}, expected [N, K]")
        return int(shape[0]), int(shape[1])

    def _tensor(self, name: str, shape: tuple[int, ...] | None = None, dtypes: tuple[str, ...] | None = None) -> torch.Tensor:
        if name not in self.ckpt.infos:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        info = self.ckpt.infos[name]
        if shape is not None and info.shape != shape:
            raise CheckpointError(f"{self.path}: {name} has shape {list(info.shape)}, expected {list(shape)}")
        if dtypes is not None and info.dtype not in dtypes:
            raise CheckpointError(f"{self.path}: {name} is {info.dtype}, expected {' or '.join(dtypes)}")
        return self.ckpt.get_tensor(name)

    def _scale(self, name: str, shapes: list[tuple[int, ...]]) -> torch.Tensor:
        if name not in self.ckpt.infos:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        info = self.ckpt.infos[name]
        if info.shape not in shapes:
            raise CheckpointError(f"{self.path}: {name} has shape {list(info.shape)}, expected {' or '.join(str(list(s)) for s in shapes)}")
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{self.path}: {name} is {info.dtype}; a scale is a float")
        scale = self.ckpt.get_tensor(name).to(torch.float32)
        if not torch.isfinite(scale).all() or not (scale > 0).all():
            raise CheckpointError(f"{self.path}: {name} holds a scale that is not a positive finite number")
        return scale

    def _linear(self, prefix: str, weight_name: str, layout: str, n: int, k: int) -> QuantizedWeight:
        scheme = self._schemes[prefix]
        if tensor_name(prefix, "weight_zero_point") in self.ckpt.infos:
            zp = self.ckpt.get_tensor(tensor_name(prefix, "weight_zero_point"))
            if zp.ne(0).any():
                raise CheckpointError(f"{self.path}: {prefix} has non-zero weight zero points; gelugemm runs symmetric int8 only")
        packed_name = tensor_name(prefix, "weight_packed")
        if packed_name in self.ckpt.infos:
            if self._weight_shape(prefix) != (n, k):
                raise CheckpointError(f"{self.path}: {prefix}.weight_shape is {list(self._weight_shape(prefix))}, expected {[n, k]}")
            q_nk = unpack_int8(self._tensor(packed_name, (n, -(-k // PACK_FACTOR)), ("I32",)), n, k)
            data = q_nk if layout == "out_in" else q_nk.t().contiguous()
        else:
            data = self._tensor(weight_name, (n, k) if layout == "out_in" else (k, n), ("I8",))
        g = scheme.granularity.group_size
        if g is None:
            scale = self._scale(tensor_name(prefix, "weight_scale"), [(n, 1), (n,), (1,), ()])
            scale = scale.reshape(-1).expand(n).contiguous() if scale.numel() == 1 else scale.reshape(n)
        else:
            scale = self._scale(tensor_name(prefix, "weight_scale"), [weight_scale_shape(n, k, scheme.granularity)])
        qw = QuantizedWeight(data, scale, g)
        if scheme.static:
            qw.input_scale = self._scale(tensor_name(prefix, "input_scale"), [(1,), ()]).reshape(())
        return qw

    def smooth_scale(self, layer: MLPLayer) -> torch.Tensor | None:
        """The layer's SmoothQuant scale s [d_model] (W1 holds W1 * s; x is divided by s), or None."""
        key = SMOOTH_KEY + layer.fc1
        for shard in self.ckpt.shards:
            if key in shard.metadata:
                return decode_scale(shard.metadata[key], layer.d_model, f"{shard.path}: {layer.fc1}")
        return None

    def smoothing(self, layer: MLPLayer) -> str | None:
        """"folded" (into the LayerNorm: the model feeds x / s), "run-time" (x / s in the op), or None."""
        return ((self.record or {}).get("smoothing") or {}).get(layer.fc1)

    def load(self, layer: MLPLayer) -> MLPTensors:
        """(w1, b1, w2, b2, w_up, b_up) of one MLP: int8 QuantizedWeights with their scales,
        float biases (w_up and b_up: a gated MLP's separate up projection, else None). A
        smoothed layer's w1.smooth_scale is set whether the smoothing was folded or not:
        with it, the MLP takes the original LayerNorm's output."""
        try:
            w1, *rest = (self._linear(prefix, weight, layer.weight_layout, n, k) for prefix, weight, _, (n, k) in layer.linears())
        except LaunchError as exc:  # QuantizedWeight's own checks
            raise CheckpointError(f"{self.path}: {layer.fc1}: {exc}") from None
        w_up, w2 = rest if layer.gated == "separate" else (None, rest[0])
        if self.scheme.static:
            w1.output_scale = w2.input_scale  # GEMM1 requantizes the GELU output to GEMM2's input scale
            if w_up is not None:
                # gate and up read one x, quantized once: at the larger of their scales (vLLM's
                # rule for a merged linear; gelugemm writes the same scale on both)
                w1.input_scale = torch.maximum(w1.input_scale, w_up.input_scale)
        w1.smooth_scale = self.smooth_scale(layer)
        b1, b2, b_up = (None if name is None else self._tensor(name) for name in (layer.b1, layer.b2, layer.b_up))
        return MLPTensors(w1, b1, w2, b2, w_up, b_up)


class _Opened:
    def __init__(self, path, gelu):
        self._ckpt = Checkpoint.open(path)
        try:
            self.q = QuantizedCheckpoint(self._ckpt, gelu=gelu)
        except BaseException:
            self._ckpt.close()
            raise

    def __enter__(self) -> QuantizedCheckpoint:
        return self.q

    def __exit__(self, *exc) -> None:
        self._ckpt.close()


def open_quantized(path: str | Path, *, gelu: str | None = None) -> _Opened:
    """`with open_quantized(path) as q:` a quantized checkpoint (file or directory), opened once."""
    return _Opened(path, gelu)


def read_quantized(path: str | Path) -> tuple[dict, list[MLPLayer]]:
    """(record, the quantized MLPs) of a checkpoint written by gelugemm quantize."""
    with open_checkpoint(path) as ckpt:
        record = read_record_from(ckpt.metadata(), ckpt.shards[0].path)
    if record is None:
        raise CheckpointError(f"{path}: not written by gelugemm quantize (no {RECORD_KEY!r} metadata record)")
    return record, _record_layers(record, path)


def load_quantized_mlp(path: str | Path, layer: MLPLayer) -> MLPTensors:
    """(w1, b1, w2, b2, w_up, b_up) of one MLP of a quantized checkpoint (opens it; see QuantizedCheckpoint.load)."""
    with open_quantized(path) as q:
        return q.load(layer)


def index_for(shard_plans: dict[str, dict[str, TensorInfo]], metadata: dict | None) -> dict:
    """model.safetensors.index.json for shards written from these plans."""
    weight_map = {name: shard for shard, plan in shard_plans.items() for name in plan}
    total = sum(tensor_bytes(info) for plan in shard_plans.values() for info in plan.values())
    return {"metadata": {**(metadata or {}), "total_size": total}, "weight_map": dict(sorted(weight_map.items()))}

