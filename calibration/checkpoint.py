"""Reading a safetensors checkpoint lazily, and finding the GELU MLPs in it.

A checkpoint is one `.safetensors` file (its config.json, if any, beside it) or a Hugging
Face model directory: `model.safetensors`, or `model.safetensors.index.json` and the shards
it lists, plus `config.json`. An index is checked against the shards' own headers when the
directory is opened: a shard missing, a tensor listed in one shard and stored in another, a
tensor in two shards or in none is a CheckpointError before anything is read.

Tensors are read one at a time (`get_tensor`), into memory the process owns: the file is
not mapped, so what a run holds is what it allocated, and a shard's pages stay in the page
cache rather than in the resident set.

An MLP is found by the naming convention of its family (`calibration.families`): GEMM1
(`fc1`) and GEMM2 (`fc2`) are two linears inside one block, named
`<block><fc1>.weight`, where `<block>` is any prefix (`encoder.layer.3.`, `transformer.h.0.`).
A gated MLP's fc1 is its gate, with the up projection a third linear (`up`) or the second
half of fc1's own output (`gated="concatenated"`).

    layers = find_mlps("model_dir", layers=r"layer\\.[01]\\.")
    with open_checkpoint("model_dir") as ckpt:
        w1, b1, w2, b2, w_up, b_up = read_mlp(ckpt, layers[0])
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from calibration.errors import CheckpointError, OptionError
from calibration.safetensors_header import HeaderError, JSONTextError, parse_json
from calibration.families import (
    CONVENTION_NAMES,
    CONVENTIONS,
    GPT2,
    PLAIN,
    PLAIN_CONVENTION,
    Convention,
    activation_dtype_for,
    check_asked_activation_dtype,
    check_asked_gelu,
    choose_family,
    conv1d_layout,
    gelu_for,
    model_type_of,
    norm_feeds_only_mlp,
)
from calibration.safetensors_stream import ReadBuffer, StoredTensor, TensorInfo, read_header, read_stored, tensor_bytes

__all__ = ["TensorInfo", "MLPLayer", "MLPTensors", "Checkpoint", "open_checkpoint", "find_mlps", "mlps_in", "select_layers"]

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# Words in tensor names that suggest an MLP, for the "no MLP found" hint.
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "intermediate", "fc", "dense", "c_proj", "h_to_4h", "w1", "w2")


@dataclass(frozen=True)
class MLPLayer:
    """One MLP, y = GELU(x @ W1^T + b1) @ W2^T + b2, as found in a checkpoint; or a gated
    one, y = (GELU(x @ Wg^T + bg) * (x @ Wu^T + bu)) @ W2^T + b2.

    fc1, fc2: the prefixes of GEMM1 and GEMM2 (`encoder.layer.0.intermediate.dense`;
        `w1`/`w2` for a plain file). Quantized tensors are named after them, and fc1 is
        the key of this layer's activations in a calibration file. A gated MLP's fc1 is
        its gate linear (`mlp.gate_proj`) or the linear holding gate and up (`mlp.Wi`).
    w1, b1, w2, b2: tensor names (biases None where the checkpoint has none).
    gated: None (a plain GELU MLP), "separate" (the up projection is the linear `up`, its
        tensors w_up and b_up) or "concatenated" (W1 is [2 * d_ff, d_model] in out_in:
        rows [0, d_ff) the gate, [d_ff, 2 * d_ff) the up projection; b1 likewise).
    d_ff: the width GEMM2 reads (the product's, for a gated MLP).
    weight_layout: "out_in" ([d_ff, d_model] for W1) or "in_out" ([d_model, d_ff]).
    norm: the prefix of the LayerNorm that feeds fc1 (`norm.weight`, `norm.bias`), or None.
    dtype: the safetensors dtype of W1 ("F32", "F16", "BF16", "F64").
    gelu_source: why `gelu` is what it is (config.json, the family's default, or asked for).
    family_source, layout_source: why the family and the layout are what they are.
    model_type: config.json's model_type for this block (its sub-config's), or None.
    norm_feeds_only_mlp: the LayerNorm feeds this MLP and nothing else (pre-LN), so
        SmoothQuant's division can be folded into it.
    norm_offset: the norm multiplies by (norm_offset + its weight) (Gemma's RMSNorm: 1).
    activation_dtype: "fp16" or "bf16", the float dtype the MLP's activations run in
        (verify's reference path, the int8 schemes' x and y), and why.
    """

    family: str
    fc1: str
    fc2: str
    w1: str
    b1: str | None
    w2: str
    b2: str | None
    weight_layout: str
    d_model: int
    d_ff: int
    gelu: str
    gelu_source: str
    norm: str | None
    dtype: str
    family_source: str = "tensor names"
    layout_source: str = "family"
    model_type: str | None = None
    norm_feeds_only_mlp: bool = False
    gated: str | None = None
    up: str | None = None
    w_up: str | None = None
    b_up: str | None = None
    norm_offset: float = 0.0
    activation_dtype: str = "fp16"
    activation_dtype_source: str = "default"

    @property
    def is_gated(self) -> bool:
        return self.gated is not None

    @property
    def fc1_rows(self) -> int:
        """GEMM1's output width as stored: d_ff, or 2 * d_ff for a concatenated gate and up."""
        return 2 * self.d_ff if self.gated == "concatenated" else self.d_ff

    def linears(self) -> list[tuple[str, str, str | None, tuple[int, int]]]:
        """Every linear of the MLP as (prefix, weight name, bias name, (N, K)), GEMM1's first."""
        out = [(self.fc1, self.w1, self.b1, (self.fc1_rows, self.d_model))]
        if self.gated == "separate":
            out.append((self.up, self.w_up, self.b_up, (self.d_ff, self.d_model)))
        out.append((self.fc2, self.w2, self.b2, (self.d_model, self.d_ff)))
        return out

    def tensor_names(self) -> list[str]:
        """The MLP's weight and bias tensors in the checkpoint."""
        return [name for _, w, b, _ in self.linears() for name in (w, b) if name is not None]

    def to_record(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_record(cls, record: dict) -> "MLPLayer":
        return cls(**record)


# ---- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """One safetensors file of a checkpoint: its name in the directory and its tensors."""

    name: str
    path: Path
    tensors: dict[str, StoredTensor]
    metadata: dict[str, str]


class _Slice:
    """`safe_open`'s get_slice for a Checkpoint: shape, dtype, and rows read on demand."""

    def __init__(self, ckpt: "Checkpoint", name: str):
        self._ckpt, self._name = ckpt, name
        self._stored = ckpt.stored(name)

    def get_shape(self) -> list[int]:
        return list(self._stored.info.shape)

    def get_dtype(self) -> str:
        return self._stored.info.dtype

    def __getitem__(self, index):
        if isinstance(index, slice) and index.step in (None, 1) and self._stored.info.shape:
            start, stop, _ = index.indices(self._stored.info.shape[0])
            return read_stored(self._stored, self._ckpt._handle(self._stored.path), rows=(start, max(start, stop)))
        return self._ckpt.get_tensor(self._name)[index]


def _open_shard(path: Path, name: str) -> Shard:
    """A shard's header, validated by safetensors (offsets, lengths, dtypes) before it is trusted."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        tensors, metadata = read_header(path)  # checked before anything reads a tensor
        with safe_open(str(path), framework="pt"):  # and safetensors agrees
            pass
    except (HeaderError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt?): {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError) as exc:  # a header safetensors took but json could not
        raise CheckpointError(f"{path}: not a valid safetensors file (its header: {exc})") from None
    except BaseException as exc:  # a Rust panic in safetensors (pyo3's PanicException)
        if type(exc).__name__ != "PanicException":
            raise
        raise CheckpointError(f"{path}: not a valid safetensors file (the reader failed: {exc})") from None
    return Shard(name, path, tensors, metadata)


def _read_json(path: Path) -> dict:
    """A JSON object file (config.json, an index): anything else is one CheckpointError."""
    try:
        data = parse_json(path.read_bytes())
    except JSONTextError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _natural_key(name: str) -> list:
    # encoder.layer.10 after encoder.layer.9
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _index_shards(directory: Path, index_path: Path) -> tuple[dict, list[Shard]]:
    """The index and its shards, checked against each other (one CheckpointError for any lie)."""
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path}: no weight_map of tensor name -> shard file")
    if not weight_map:
        raise CheckpointError(f"{index_path}: the index lists no tensors (its weight_map is empty)")
    names = sorted(set(weight_map.values()), key=_natural_key)
    shards = []
    for name in names:
        if "/" in name or "\\" in name or name in (".", ".."):
            raise CheckpointError(f"{index_path} lists shard {name!r}: shards are files in the model directory")
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{index_path} lists shard {name}, which is not in {directory}")
        shards.append(_open_shard(path, name))
    stored_in: dict[str, str] = {}
    for shard in shards:
        for tensor in shard.tensors:
            if tensor in stored_in:
                raise CheckpointError(f"{directory}: tensor {tensor} is stored in both {stored_in[tensor]} and {shard.name}")
            stored_in[tensor] = shard.name
    for tensor, listed in weight_map.items():
        if tensor not in stored_in:
            raise CheckpointError(f"{index_path} lists {tensor} in {listed}, but {listed} does not hold it")
        if stored_in[tensor] != listed:
            raise CheckpointError(f"{index_path} lists {tensor} in {listed}, but it is stored in {stored_in[tensor]}")
    unlisted = [t for t in stored_in if t not in weight_map]
    if unlisted:
        raise CheckpointError(f"{stored_in[unlisted[0]]} holds {unlisted[0]}, which {index_path.name} does not list")
    return index, shards


class Checkpoint:
    """A checkpoint open for lazy reads: one file, or a model directory (single file or shards).

    keys(), get_tensor(name), get_slice(name), metadata(): as safetensors' safe_open, across
    every shard. infos: every tensor's dtype and shape. config: config.json as a dict, or None.
    """

    def __init__(self, path: Path, shards: list[Shard], directory: Path | None, index_path: Path | None, index: dict | None):
        self.path = path
        self.shards = shards
        self.directory = directory
        self.index_path = index_path
        self.index = index
        self._where = {name: shard for shard in shards for name in shard.tensors}
        self.infos = {name: shard.tensors[name].info for name, shard in self._where.items()}
        self._handles: dict[Path, object] = {}
        self._config: dict | None | bool = False  # False: not read yet

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        if path.is_dir():
            if (path / SINGLE_FILE).is_file():  # what transformers loads first, too
                return cls(path, [_open_shard(path / SINGLE_FILE, SINGLE_FILE)], path, None, None)
            if (path / INDEX_FILE).is_file():
                index, shards = _index_shards(path, path / INDEX_FILE)
                return cls(path, shards, path, path / INDEX_FILE, index)
            have = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
            raise CheckpointError(f"{path}: a model directory holds {SINGLE_FILE} or {INDEX_FILE}; it holds {have}")
        return cls(path, [_open_shard(path, path.name)], None, None, None)

    @property
    def kind(self) -> str:
        return "directory" if self.directory is not None else "file"

    @property
    def config_path(self) -> Path:
        return (self.directory or self.path.parent) / CONFIG_FILE

    @property
    def config(self) -> dict | None:
        """config.json (in the model directory, or beside a lone file), or None where there is none."""
        if self._config is False:
            # lexists: a config.json that is there but cannot be read (a directory, a symlink
            # loop, no permission) is an error, not a missing file whose defaults would apply
            self._config = _read_json(self.config_path) if os.path.lexists(self.config_path) else None
        return self._config

    def keys(self) -> list[str]:
        return list(self._where)

    def stored(self, name: str) -> StoredTensor:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        return self._where[name].tensors[name]

    def shard_of(self, name: str) -> Shard:
        return self._where[name]

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = open(path, "rb")
        return self._handles[path]

    def get_tensor(self, name: str, buffer: ReadBuffer | None = None) -> torch.Tensor:
        """The tensor as stored (read into `buffer` where given: valid until its next read)."""
        stored = self.stored(name)
        try:
            return read_stored(stored, self._handle(stored.path), buffer=buffer)
        except OSError as exc:
            raise CheckpointError(f"{stored.path}: cannot read {name}: {exc.strerror or exc}") from None

    def get_slice(self, name: str) -> _Slice:
        return _Slice(self, name)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata of the (first) shard."""
        return dict(self.shards[0].metadata)

    @property
    def total_bytes(self) -> int:
        return sum(shard.path.stat().st_size for shard in self.shards)

    @property
    def largest_shard_bytes(self) -> int:
        return max(shard.path.stat().st_size for shard in self.shards)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextmanager
def open_checkpoint(path: str | Path) -> Iterator[Checkpoint]:
    """Open a checkpoint (file or model directory) for lazy reads; anything wrong is a CheckpointError."""
    with Checkpoint.open(path) as ckpt:
        yield ckpt


def tensor_infos(handle) -> dict[str, TensorInfo]:
    """Every tensor's dtype and shape, from the headers alone."""
    if isinstance(handle, Checkpoint):
        return dict(handle.infos)
    return {name: TensorInfo(handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape())) for name in handle.keys()}


def read_tensor(handle, name: str, buffer: ReadBuffer | None = None) -> torch.Tensor:
    """One tensor as stored; a float tensor holding NaN or Inf is a CheckpointError.
    buffer: a Checkpoint reads it there (safetensors_stream.ReadBuffer: valid until its next read)."""
    t = handle.get_tensor(name) if buffer is None else handle.get_tensor(name, buffer=buffer)
    if t.is_floating_point() and not all_finite(t):
        # counted only now: a bool mask is half an fp16 weight again, so a block at a time
        bad = sum(int((~torch.isfinite(block)).sum()) for block in t.reshape(-1).split(1 << 22))
        raise CheckpointError(f"{name} holds {bad} NaN/Inf value(s); cannot quantize it")
    return t


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a float tensor: its min and max are finite (aminmax propagates NaN).
    One reduction without temporaries, ~50x faster than an isfinite mask and its sum."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low) and torch.isfinite(high))


class MLPTensors(NamedTuple):
    """One MLP's weights and biases, in the op's argument order: w1, b1, w2, b2, and a gated
    MLP's separate up projection (w_up, b_up; None otherwise, and for a concatenated one,
    whose w1 and b1 hold gate and up). Float tensors, or int8 QuantizedWeights."""

    w1: object
    b1: torch.Tensor | None
    w2: object
    b2: torch.Tensor | None
    w_up: object = None
    b_up: torch.Tensor | None = None

    def map(self, fn) -> "MLPTensors":
        """fn applied to every tensor present (None stays None)."""
        return MLPTensors(*(None if t is None else fn(t) for t in self))


def read_mlp(handle, layer: MLPLayer) -> MLPTensors:
    """One MLP's tensors as stored (dtype and layout), checked finite."""
    read = lambda name: None if name is None else read_tensor(handle, name)  # noqa: E731
    return MLPTensors(read(layer.w1), read(layer.b1), read(layer.w2), read(layer.b2), read(layer.w_up), read(layer.b_up))


def norm_names(layer: MLPLayer, keys) -> tuple[str, str | None] | None:
    """(weight, bias or None) tensor names of the LayerNorm feeding the MLP, or None."""
    if layer.norm is None:
        return None
    bias = f"{layer.norm}.bias"
    return f"{layer.norm}.weight", bias if bias in keys else None


def read_norm(handle, layer: MLPLayer) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(the multiplier, bias) of the LayerNorm feeding the MLP: its weight (plus the
    family's norm_offset: Gemma's RMSNorm multiplies by 1 + weight) and bias, or None
    where the checkpoint has none."""
    names = norm_names(layer, set(handle.keys()))
    if names is None:
        return None
    weight = read_tensor(handle, names[0])
    if layer.norm_offset:
        weight = weight.to(torch.float32) + layer.norm_offset
    return weight, None if names[1] is None else read_tensor(handle, names[1])


# ---- finding the MLPs ---------------------------------------------------------------------------


def _shape_error(block: str, what: str, got: tuple, want: tuple) -> CheckpointError:
    return CheckpointError(f"{block or 'MLP'}: {what} has shape {list(got)}, expected {list(want)} from the other MLP tensors")


def _pair_dims(block: str, w1: TensorInfo, w2: TensorInfo, w1_name: str, w2_name: str, layout: str,
               weight_dtypes: tuple[str, ...], gated: str | None = None) -> tuple[int, int]:
    """(d_model, d_ff) of a GEMM1/GEMM2 pair, checking the two shapes agree (a concatenated
    gated GEMM1 is twice d_ff wide)."""
    for name, info in ((w1_name, w1), (w2_name, w2)):
        if len(info.shape) != 2:
            raise CheckpointError(f"{name} has shape {list(info.shape)}; an MLP weight must be 2-D")
        if info.dtype not in weight_dtypes:
            raise CheckpointError(f"{name} is {info.dtype}; quantize takes float weights ({', '.join(FLOAT_DTYPES)})")
        if 0 in info.shape:
            raise CheckpointError(f"{name} has shape {list(info.shape)}; an MLP weight cannot have a dimension of size 0")
    rows, d_model = w1.shape if layout == "out_in" else w1.shape[::-1]
    d_ff = rows
    if gated == "concatenated":
        if rows % 2:
            raise CheckpointError(f"{w1_name} has {rows} outputs: gate and up halves need an even count")
        d_ff = rows // 2
    want = (d_model, d_ff) if layout == "out_in" else (d_ff, d_model)
    if w2.shape != want:
        raise _shape_error(block, w2_name, w2.shape, want)
    return d_model, d_ff


def _check_vector(block: str, infos: dict[str, TensorInfo], name: str | None, size: int, what: str = "biases") -> None:
    """A bias (or LayerNorm vector) `name`, where there is one: float, of shape [size]."""
    if name is None:
        return
    if infos[name].shape != (size,):
        raise _shape_error(block, name, infos[name].shape, (size,))
    if infos[name].dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{name} is {infos[name].dtype}; quantize takes float {what} ({', '.join(FLOAT_DTYPES)})")


@dataclass(frozen=True)
class _Context:
    infos: dict[str, TensorInfo]
    config: dict | None
    config_path: Path
    gelu: str | None
    weight_dtypes: tuple[str, ...]
    activation_dtype: str | None = None


def _convention_layers(convention: Convention, ctx: _Context, claimed: set[str]) -> list[MLPLayer]:
    infos = ctx.infos
    found = []
    for name in infos:
        match = convention.pattern.fullmatch(name)
        if match is None or name in claimed:
            continue
        block = match["block"]
        fc1, fc2 = block + convention.fc1, block + convention.fc2
        w2 = f"{fc2}.weight"
        model_type = model_type_of(ctx.config, block)
        family, family_source = choose_family(convention, model_type, lambda norm: f"{block}{norm}.weight" in infos)
        if w2 not in infos:
            raise CheckpointError(f"{name} looks like a {family.title} MLP but {w2} is missing")
        b1, b2 = (f"{p}.bias" if f"{p}.bias" in infos else None for p in (fc1, fc2))
        layout, layout_source = family.layout, f"the family's ({'Conv1D' if family.layout == 'in_out' else 'nn.Linear'})"
        if GPT2 in convention.families:  # mlp.c_fc: GPT-2's Conv1D or GPT-BigCode's nn.Linear
            layout, layout_source = conv1d_layout(model_type, infos[name].shape, infos[b1].shape[0] if b1 and infos[b1].shape else None, name)
            family = convention.families[0] if layout == "in_out" else convention.families[1]
        d_model, d_ff = _pair_dims(block, infos[name], infos[w2], name, w2, layout, ctx.weight_dtypes, convention.gated)
        _check_vector(block, infos, b1, d_ff * (2 if convention.gated == "concatenated" else 1))
        _check_vector(block, infos, b2, d_model)
        up = w_up = b_up = None
        if convention.gated == "separate":
            up = block + convention.up
            w_up = f"{up}.weight"
            if w_up not in infos:
                raise CheckpointError(f"{name} looks like a gated {family.title} MLP but its up projection {w_up} is missing")
            want = (d_ff, d_model) if layout == "out_in" else (d_model, d_ff)
            if infos[w_up].shape != want:
                raise _shape_error(block, w_up, infos[w_up].shape, want)
            if infos[w_up].dtype != infos[name].dtype:
                raise CheckpointError(f"{w_up} is {infos[w_up].dtype} but the gate {name} is {infos[name].dtype}")
            b_up = f"{up}.bias" if f"{up}.bias" in infos else None
            if (b_up is None) != (b1 is None):
                raise CheckpointError(f"{block or 'MLP'}: one of the gate and up projections has a bias and the other not")
            _check_vector(block, infos, b_up, d_ff)
        norm = next((block + n for n, _ in family.norms if f"{block}{n}.weight" in infos), None)
        if norm is not None:
            _check_vector(block, infos, f"{norm}.weight", d_model, "LayerNorm weights")
            _check_vector(block, infos, f"{norm}.bias" if f"{norm}.bias" in infos else None, d_model, "LayerNorm weights")
        by_model_type = family_source.startswith("config.json")
        gelu, gelu_source = gelu_for(ctx.config, ctx.config_path, block, convention, family, by_model_type, ctx.gelu)
        act_dtype, act_dtype_source = activation_dtype_for(ctx.config, block, family, ctx.activation_dtype)
        claimed.update(n for n in (name, w_up) if n is not None)
        found.append(MLPLayer(
            family.name, fc1, fc2, name, b1, w2, b2, layout, d_model, d_ff, gelu, gelu_source, norm, infos[name].dtype,
            family_source, layout_source, model_type, norm_feeds_only_mlp(family, norm, ctx.config),
            convention.gated, up, w_up, b_up, family.norm_offset, act_dtype, act_dtype_source,
        ))  # fmt: skip
    return found


def _plain_layer(ctx: _Context) -> MLPLayer | None:
    infos = ctx.infos
    if not {"w1", "b1", "w2"} <= infos.keys() or "w3" in infos:  # w3: a gated (SwiGLU) MLP, not ours
        return None
    d_ff = infos["b1"].shape[0] if len(infos["b1"].shape) == 1 else -1
    # The layout follows from b1: W1 is [d_ff, d_model] (out_in) or [d_model, d_ff] (in_out).
    w1_shape = infos["w1"].shape
    layout = "in_out" if len(w1_shape) == 2 and w1_shape[0] != d_ff and w1_shape[1] == d_ff else "out_in"
    d_model, d_ff = _pair_dims("", infos["w1"], infos["w2"], "w1", "w2", layout, ctx.weight_dtypes)
    b2 = "b2" if "b2" in infos else None
    _check_vector("", infos, "b1", d_ff)
    _check_vector("", infos, b2, d_model)
    gelu = gelu_for(ctx.config, ctx.config_path, "", PLAIN_CONVENTION, PLAIN, False, ctx.gelu)
    act_dtype = activation_dtype_for(ctx.config, "", PLAIN, ctx.activation_dtype)
    return MLPLayer("plain", "w1", "w2", "w1", "b1", "w2", b2, layout, d_model, d_ff, gelu[0], gelu[1], None,
                    infos["w1"].dtype, "tensor names w1, b1, w2", f"bias length {d_ff}",
                    activation_dtype=act_dtype[0], activation_dtype_source=act_dtype[1])  # fmt: skip


def _not_found_message(path: Path, infos: dict[str, TensorInfo]) -> str:
    close = [n for n in infos if len(infos[n].shape) == 2 and any(w in n.lower() for w in _MLP_WORDS)]
    close.sort(key=_natural_key)
    hint = f"; names that look close: {', '.join(close[:8])}" if close else ""
    if not close:
        hint = f"; it holds {len(infos)} tensors" + (f", e.g. {', '.join(sorted(infos)[:5])}" if infos else "")
    return f"{path}: no GELU MLP found. Tried {'; '.join(CONVENTION_NAMES)}{hint}"


def discover(
    path: Path, infos: dict[str, TensorInfo], config: dict | None, config_path: Path, *,
    layers: str | None = None, gelu: str | None = None, weight_dtypes: tuple[str, ...] = FLOAT_DTYPES,
    activation_dtype: str | None = None,
) -> list[MLPLayer]:  # fmt: skip
    """The MLPs named in a tensor table, in layer order, optionally filtered (see find_mlps)."""
    if gelu is not None:
        check_asked_gelu(gelu)
    if activation_dtype is not None:
        check_asked_activation_dtype(activation_dtype)
    ctx = _Context(infos, config, config_path, gelu, weight_dtypes, activation_dtype)
    claimed: set[str] = set()
    found: list[MLPLayer] = []
    for convention in CONVENTIONS:
        found += _convention_layers(convention, ctx, claimed)
    if not found:
        plain = _plain_layer(ctx)
        found = [plain] if plain else []
    if not found:
        raise CheckpointError(_not_found_message(path, infos))
    found.sort(key=lambda layer: _natural_key(layer.fc1))
    return select_layers(found, layers)


def mlps_in(
    ckpt: Checkpoint, *, layers: str | None = None, gelu: str | None = None, activation_dtype: str | None = None
) -> list[MLPLayer]:
    """The MLPs of an open checkpoint, in layer order, optionally filtered (see find_mlps)."""
    return discover(
        ckpt.path, ckpt.infos, ckpt.config, ckpt.config_path, layers=layers, gelu=gelu, activation_dtype=activation_dtype
    )


def select_layers(found: list[MLPLayer], layers: str | None) -> list[MLPLayer]:
    """The MLPs whose fc1, fc2 (or up) prefix matches the regex `layers` (re.search); all for None."""
    if layers is None:
        return found
    try:
        pattern = re.compile(layers)
    except re.error as exc:
        raise OptionError(f"--layers {layers!r} is not a valid regular expression: {exc}") from None
    chosen = [layer for layer in found if any(pattern.search(p) for p in (layer.fc1, layer.fc2, layer.up) if p is not None)]
    if not chosen:
        names = ", ".join(layer.fc1 for layer in found[:8]) + (", ..." if len(found) > 8 else "")
        raise CheckpointError(f"--layers {layers!r} matches none of the {len(found)} MLPs found: {names}")
    return chosen


def find_mlps(
    path: str | Path, *, layers: str | None = None, gelu: str | None = None, activation_dtype: str | None = None
) -> list[MLPLayer]:
    """The GELU MLPs (plain and gated) in a checkpoint (file or model directory), in layer order.

    layers: a regex; an MLP is kept when it matches its fc1 or fc2 prefix (re.search).
    gelu: "erf", "tanh" or "quick" to override config.json and the family default.
    activation_dtype: "fp16" or "bf16" to override config.json and the family default.
    """
    with open_checkpoint(path) as ckpt:
        return mlps_in(ckpt, layers=layers, gelu=gelu, activation_dtype=activation_dtype)


def largest_tensor_bytes(infos: dict[str, TensorInfo]) -> int:
    return max([tensor_bytes(info) for info in infos.values() if info.dtype in ("F64", "F32", "F16", "BF16", "I8")] + [0])
