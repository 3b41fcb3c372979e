"""Reading a safetensors checkpoint lazily and finding the GELU MLPs in it.

Tensors are read one at a time through `safe_open`, never the whole file. An MLP is
found by the naming convention of its family: GEMM1 (`fc1`) and GEMM2 (`fc2`) are two
linears inside one block, and the LayerNorm that feeds the block's MLP sits beside
them. Names are matched as `<block><fc1>.weight`, where `<block>` is any prefix
(`encoder.layer.3.`, `transformer.h.0.`, ...).

    layers = find_mlps("model.safetensors", layers=r"layer\\.[01]\\.")
    with open_checkpoint("model.safetensors") as ckpt:
        w1, b1, w2, b2 = read_mlp(ckpt, layers[0])
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from calibration.errors import CheckpointError, OptionError
from calibration.safetensors_header import HeaderError, read_header
from kernels.schemes import GELU_FLAVOURS, HIDDEN_ACT_GELU

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class Family:
    """A naming convention for the MLP of a transformer block."""

    name: str
    title: str  # how the error messages name it
    fc1: str  # GEMM1's module path inside the block
    fc2: str
    weight_layout: str  # "out_in" (nn.Linear) or "in_out" (GPT-2's Conv1D)
    gelu: str  # the flavour when config.json does not say
    norms: tuple[str, ...]  # the LayerNorm feeding the MLP, inside the block; the first present wins


FAMILIES = (
    # HF ViT uses BERT's names, with `layernorm_after` as the MLP's LayerNorm.
    Family("bert", "BERT/RoBERTa", "intermediate.dense", "output.dense", "out_in", "erf",
           ("attention.output.LayerNorm", "layernorm_after")),
    Family("gpt2", "GPT-2", "mlp.c_fc", "mlp.c_proj", "in_out", "tanh", ("ln_2",)),
    Family("vit", "ViT/CLIP/timm", "mlp.fc1", "mlp.fc2", "out_in", "erf", ("norm2", "layer_norm2")),
    # NeoX and sequential Falcon feed the MLP from post_attention_layernorm, Falcon-40B
    # from ln_mlp, parallel-attention Falcon-7B from the block's input_layernorm.
    Family("gpt-neox", "GPT-NeoX/Falcon", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "out_in", "erf",
           ("post_attention_layernorm", "ln_mlp", "input_layernorm")),
)  # fmt: skip
# A file holding one bare MLP: top-level tensors w1, b1, w2 and optionally b2.
PLAIN = Family("plain", "plain file", "w1", "w2", "out_in", "erf", ())
CONVENTIONS = [f"{f.title} (*.{f.fc1} -> *.{f.fc2})" for f in FAMILIES] + ["plain file (w1, b1, w2[, b2])"]


# Words in tensor names that suggest an MLP, for the "no MLP found" hint.
_MLP_WORDS = ("mlp", "ffn", "feed_forward", "intermediate", "fc", "dense", "c_proj", "h_to_4h", "w1", "w2")


@dataclass(frozen=True)
class MLPLayer:
    """One MLP, y = GELU(x @ W1^T + b1) @ W2^T + b2, as found in a checkpoint.

    fc1, fc2: the prefixes of GEMM1 and GEMM2 (`encoder.layer.0.intermediate.dense`;
        `w1`/`w2` for a plain file). Quantized tensors are named after them, and fc1 is
        the key of this layer's activations in a calibration file.
    w1, b1, w2, b2: tensor names (biases None where the checkpoint has none).
    weight_layout: "out_in" ([d_ff, d_model] for W1) or "in_out" ([d_model, d_ff]).
    norm: the prefix of the LayerNorm that feeds fc1 (`norm.weight`, `norm.bias`), or None.
    dtype: the safetensors dtype of W1 ("F32", "F16", "BF16", "F64").
    gelu_source: why `gelu` is what it is (config.json, the family's default, or asked for).
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

    def to_record(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_record(cls, record: dict) -> "MLPLayer":
        return cls(**record)


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string: "F32", "BF16", "I8", ...
    shape: tuple[int, ...]


@contextmanager
def open_checkpoint(path: str | Path) -> Iterator:
    """safe_open a checkpoint for lazy reads; a missing or invalid file is a CheckpointError."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        read_header(path)  # a file that lies about its layout never reaches safe_open's mmap
        handle = safe_open(str(path), framework="pt")
    except (HeaderError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: not a valid safetensors file (truncated or corrupt?): {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except BaseException as exc:  # a Rust panic in safetensors (pyo3's PanicException)
        if type(exc).__name__ != "PanicException":
            raise
        raise CheckpointError(f"{path}: not a valid safetensors file (the reader failed: {exc})") from None
    with handle:
        yield handle


def tensor_infos(handle) -> dict[str, TensorInfo]:
    """Every tensor's dtype and shape, from the header alone."""
    infos = {}
    for name in handle.keys():
        sl = handle.get_slice(name)
        infos[name] = TensorInfo(sl.get_dtype(), tuple(sl.get_shape()))
    return infos


def read_tensor(handle, name: str) -> torch.Tensor:
    """One tensor as stored; a float tensor holding NaN or Inf is a CheckpointError."""
    t = handle.get_tensor(name)
    if t.is_floating_point() and not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise CheckpointError(f"{name} holds {bad} NaN/Inf value(s); cannot quantize it")
    return t


def read_mlp(handle, layer: MLPLayer) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(w1, b1, w2, b2) of one MLP as stored (dtype and layout), checked finite."""
    read = lambda name: None if name is None else read_tensor(handle, name)  # noqa: E731
    return read(layer.w1), read(layer.b1), read(layer.w2), read(layer.b2)


def read_norm(handle, layer: MLPLayer) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) of the LayerNorm feeding the MLP, or None where the checkpoint has none."""
    if layer.norm is None:
        return None
    bias_name = f"{layer.norm}.bias"
    bias = read_tensor(handle, bias_name) if bias_name in handle.keys() else None
    return read_tensor(handle, f"{layer.norm}.weight"), bias


def gelu_from_config(checkpoint: Path, family: Family, asked: str | None) -> tuple[str, str]:
    """(flavour, why): asked for, else config.json beside the checkpoint, else the family's default."""
    if asked is not None:
        if asked not in GELU_FLAVOURS:
            raise OptionError(f"--gelu must be one of {', '.join(GELU_FLAVOURS)}; got {asked!r}")
        return asked, "asked for"
    config_path = checkpoint.parent / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
        for key in ("hidden_act", "activation_function"):
            act = config.get(key) if isinstance(config, dict) else None
            if act is None:
                continue
            if act not in HIDDEN_ACT_GELU:
                raise CheckpointError(
                    f"{config_path} says {key}={act!r}; gelugemm runs GELU MLPs only "
                    f"({', '.join(HIDDEN_ACT_GELU)}); pass --gelu erf|tanh to override"
                )
            return HIDDEN_ACT_GELU[act], f"config.json {key}={act}"
    return family.gelu, f"{family.title} default (config.json does not say)"


def _natural_key(name: str) -> list:
    # encoder.layer.10 after encoder.layer.9
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _shape_error(block: str, what: str, got: tuple, want: tuple) -> CheckpointError:
    return CheckpointError(f"{block or 'MLP'}: {what} has shape {list(got)}, expected {list(want)} from the other MLP tensors")


def _pair_dims(block: str, w1: TensorInfo, w2: TensorInfo, w1_name: str, w2_name: str, layout: str) -> tuple[int, int]:
    """(d_model, d_ff) of a GEMM1/GEMM2 pair, checking the two shapes agree."""
    for name, info in ((w1_name, w1), (w2_name, w2)):
        if len(info.shape) != 2:
            raise CheckpointError(f"{name} has shape {list(info.shape)}; an MLP weight must be 2-D")
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{name} is {info.dtype}; quantize takes float weights ({', '.join(FLOAT_DTYPES)})")
    d_ff, d_model = w1.shape if layout == "out_in" else w1.shape[::-1]
    if w2.shape != w1.shape[::-1]:
        raise _shape_error(block, w2_name, w2.shape, w1.shape[::-1])
    return d_model, d_ff


def _check_vector(block: str, infos: dict[str, TensorInfo], name: str | None, size: int) -> None:
    if name is not None and infos[name].shape != (size,):
        raise _shape_error(block, name, infos[name].shape, (size,))


def _family_layers(family: Family, infos: dict[str, TensorInfo], gelu: tuple[str, str]) -> list[MLPLayer]:
    suffix = f"{family.fc1}.weight"
    found = []
    for name in infos:
        if not (name == suffix or name.endswith("." + suffix)):
            continue
        block = name[: -len(suffix)]
        fc1, fc2 = block + family.fc1, block + family.fc2
        w2 = f"{fc2}.weight"
        if w2 not in infos:
            raise CheckpointError(f"{name} looks like a {family.title} MLP but {w2} is missing")
        d_model, d_ff = _pair_dims(block, infos[name], infos[w2], name, w2, family.weight_layout)
        b1, b2 = (f"{p}.bias" if f"{p}.bias" in infos else None for p in (fc1, fc2))
        _check_vector(block, infos, b1, d_ff)
        _check_vector(block, infos, b2, d_model)
        norm = next((block + n for n in family.norms if f"{block}{n}.weight" in infos), None)
        if norm is not None:
            _check_vector(block, infos, f"{norm}.weight", d_model)
            _check_vector(block, infos, f"{norm}.bias" if f"{norm}.bias" in infos else None, d_model)
        found.append(MLPLayer(
            family.name, fc1, fc2, name, b1, w2, b2, family.weight_layout, d_model, d_ff,
            gelu[0], gelu[1], norm, infos[name].dtype,
        ))  # fmt: skip
    return found


def _plain_layer(infos: dict[str, TensorInfo], gelu: tuple[str, str]) -> MLPLayer | None:
    if not {"w1", "b1", "w2"} <= infos.keys() or "w3" in infos:  # w3: a gated (SwiGLU) MLP, not ours
        return None
    d_ff = infos["b1"].shape[0] if len(infos["b1"].shape) == 1 else -1
    # The layout follows from b1: W1 is [d_ff, d_model] (out_in) or [d_model, d_ff] (in_out).
    w1_shape = infos["w1"].shape
    layout = "in_out" if len(w1_shape) == 2 and w1_shape[0] != d_ff and w1_shape[1] == d_ff else "out_in"
    d_model, d_ff = _pair_dims("", infos["w1"], infos["w2"], "w1", "w2", layout)
    b2 = "b2" if "b2" in infos else None
    _check_vector("", infos, "b1", d_ff)
    _check_vector("", infos, b2, d_model)
    return MLPLayer("plain", "w1", "w2", "w1", "b1", "w2", b2, layout, d_model, d_ff, gelu[0], gelu[1], None, infos["w1"].dtype)


def _not_found_message(path: Path, infos: dict[str, TensorInfo]) -> str:
    close = [n for n in infos if len(infos[n].shape) == 2 and any(w in n.lower() for w in _MLP_WORDS)]
    close.sort(key=_natural_key)
    hint = f"; names that look close: {', '.join(close[:8])}" if close else ""
    if not close:
        hint = f"; it holds {len(infos)} tensors" + (f", e.g. {', '.join(sorted(infos)[:5])}" if infos else "")
    return f"{path}: no GELU MLP found. Tried {'; '.join(CONVENTIONS)}{hint}"


def mlps_in(path: Path, infos: dict[str, TensorInfo], *, layers: str | None = None, gelu: str | None = None) -> list[MLPLayer]:
    """The MLPs named in a checkpoint's tensor table, in layer order, optionally filtered."""
    found: list[MLPLayer] = []
    for family in FAMILIES:
        found += _family_layers(family, infos, gelu_from_config(path, family, gelu))
    if not found:
        plain = _plain_layer(infos, gelu_from_config(path, PLAIN, gelu))
        found = [plain] if plain else []
    if not found:
        raise CheckpointError(_not_found_message(path, infos))
    found.sort(key=lambda layer: _natural_key(layer.fc1))
    return select_layers(found, layers)


def select_layers(found: list[MLPLayer], layers: str | None) -> list[MLPLayer]:
    """The MLPs whose fc1 or fc2 prefix matches the regex `layers` (re.search); all for None."""
    if layers is None:
        return found
    try:
        pattern = re.compile(layers)
    except re.error as exc:
        raise OptionError(f"--layers {layers!r} is not a valid regular expression: {exc}") from None
    chosen = [layer for layer in found if pattern.search(layer.fc1) or pattern.search(layer.fc2)]
    if not chosen:
        names = ", ".join(layer.fc1 for layer in found[:8]) + (", ..." if len(found) > 8 else "")
        raise CheckpointError(f"--layers {layers!r} matches none of the {len(found)} MLPs found: {names}")
    return chosen


def find_mlps(path: str | Path, *, layers: str | None = None, gelu: str | None = None) -> list[MLPLayer]:
    """The GELU MLPs in a checkpoint, in layer order.

    layers: a regex; an MLP is kept when it matches its fc1 or fc2 prefix (re.search).
    gelu: "erf" or "tanh" to override config.json and the family default.
    """
    path = Path(path)
    with open_checkpoint(path) as handle:
        infos = tensor_infos(handle)
    return mlps_in(path, infos, layers=layers, gelu=gelu)
