"""Quantized MLPs as modules: loaded from a quantized checkpoint, swapped into a model.

    mlps = load_mlps("model-int8")                       # {fc1 prefix: FusedGeluMLP}; a file or a directory
    model = transformers.AutoModel.from_pretrained(model_dir)
    swap_mlps(model, mlps)                               # each MLP into its place, by checkpoint prefix
    model.to("cuda")                                     # moves the int8 weights and scales too
    mlps["encoder.layer.0.intermediate.dense"].backend   # "triton" on CUDA, "torch" elsewhere

Where each MLP goes is found from the checkpoint prefix and the model's own modules
(`plan_swaps` says how, per family), or given explicitly with `find=`.

A quantized checkpoint is one `gelugemm quantize` wrote (file or model directory) or a
compressed-tensors int8 checkpoint another tool wrote (llm-compressor's W8A8 / W8A16).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from calibration.checkpoint import mlps_in, open_checkpoint
from calibration.families import CONVENTION_NAMES, CONVENTIONS, PLAIN_CONVENTION
from calibration.errors import CheckpointError
from calibration.quantized_file import FormatScheme, QuantizedCheckpoint, is_quantized_checkpoint, open_quantized
from kernels.errors import GelugemmError
from kernels.module import FusedGeluMLP
from kernels.op import MLPConfig
from kernels.w8a8 import W8A8_GROUP_SIZES


class SwapError(GelugemmError, LookupError):
    """An MLP cannot be put into a model: its prefix has no home there, or the shapes differ."""


def checkpoint_shapes(path: str | Path, gelu: str | None = None, gated: bool | None = None) -> tuple[list[tuple[int, int]], str]:
    """(the distinct (d_model, d_ff) of a checkpoint's MLPs, their GELU flavour), for the benchmark.

    A quantized checkpoint: its quantized MLPs; else by discovery. The flavour is `gelu`
    where given, else what config.json or the model family says. gated: only the gated
    MLPs (True) or only the plain ones (False); None takes them all.
    """
    with open_checkpoint(path) as ckpt:
        layers = QuantizedCheckpoint(ckpt, gelu=gelu).layers if is_quantized_checkpoint(ckpt) else mlps_in(ckpt, gelu=gelu)
    chosen = [layer for layer in layers if gated is None or layer.is_gated == gated]
    if not chosen:
        kind = "gated" if gated else "plain (ungated)"
        raise CheckpointError(f"{path} has no {kind} GELU MLP; its {len(layers)} MLP(s) are {'plain' if gated else 'gated'}")
    return sorted({(layer.d_model, layer.d_ff) for layer in chosen}), gelu or chosen[0].gelu


def has_gated_mlps_only(path: str | Path) -> bool:
    """True where every MLP of a checkpoint (its quantized ones, for a quantized checkpoint) is gated."""
    with open_checkpoint(path) as ckpt:
        layers = QuantizedCheckpoint(ckpt).layers if is_quantized_checkpoint(ckpt) else mlps_in(ckpt)
    return all(layer.is_gated for layer in layers)


# ---- loading from a quantized checkpoint -------------------------------------------------


def int8_op_fields(scheme: FormatScheme, where: Path | str = "checkpoint") -> dict:
    """The op config fields (beyond dtype) that run a quantized checkpoint's scheme: for
    w8a8 its activation scheme (dynamic, group:N or static, as the file says), checked to
    be one the kernels run."""
    if scheme.scheme != "w8a8":
        return {}
    activations = scheme.activations
    if activations.kind == "group" and activations.group_size not in W8A8_GROUP_SIZES:
        sizes = ", ".join(f"group:{g}" for g in W8A8_GROUP_SIZES)
        raise CheckpointError(
            f"{where}: w8a8 with {activations} activations (compressed-tensors group_size {activations.group_size}); "
            f"gelugemm's int8 kernels run {sizes}"
        )
    return {"activations": activations}


def _config_for(q: QuantizedCheckpoint, layer, activation_dtype: str | None, backend: str) -> MLPConfig:
    """The op config a quantized checkpoint asks for: its scheme, the layer's GELU, layout,
    gatedness and activation dtype (unless one is asked for)."""
    return MLPConfig(
        dtype=q.scheme.scheme, gelu=layer.gelu, weight_layout=layer.weight_layout, backend=backend,
        activation_dtype=activation_dtype or layer.activation_dtype, gated=layer.is_gated, **int8_op_fields(q.scheme, q.path),
    )  # fmt: skip


def _module(q: QuantizedCheckpoint, layer, original_inputs: bool, activation_dtype, backend, device) -> FusedGeluMLP:
    w1, b1, w2, b2, w_up, b_up = q.load(layer)
    if q.smoothing(layer) == "folded" and not original_inputs:
        w1.smooth_scale = None  # the checkpoint's LayerNorm already divides by it
    config = _config_for(q, layer, activation_dtype, backend)
    return FusedGeluMLP(w1, b1, w2, b2, config, device=device, w_up=w_up, b_up=b_up)


def load_mlps(
    path: str | Path,
    *,
    activation_dtype: str | None = None,
    backend: str = "auto",
    device: str | torch.device | None = None,
    original_inputs: bool = False,
) -> dict[str, FusedGeluMLP]:
    """Every quantized MLP of a checkpoint, keyed by its fc1 prefix, in layer order.

    activation_dtype: the float dtype the int8 op runs its activations in, "fp16" or "bf16";
        None: each MLP's own (quantize recorded it: config.json's, or its family's, T5: bf16).
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
    activation_dtype: str | None = None,
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
#
# A checkpoint names an MLP by its fc1 prefix (`encoder.layer.0.intermediate.dense`); a
# loaded model has modules. The prefix is usually a module path of the model, except
# where the model class adds or drops its base-model prefix (all-MiniLM-L6-v2 is saved as
# a bare BertModel; a BertFor* head loads it under `bert.`), so it is matched exactly,
# then with `model.base_model_prefix` removed or added.
#
# Where the MLP goes (its seam) depends on how the model's code calls it:
#   - fc1 and fc2 share a parent that holds nothing else with weights and is called on one
#     tensor (GPT-2, CLIP, NeoX, Falcon, GPT-J, Phi `mlp`; DistilBERT `ffn`): that parent
#     is replaced by the fused MLP.
#   - fc1's parent holds fc1 and its activation and is called on one tensor, fc2 sits in
#     another module (BERT/RoBERTa/ViT: `intermediate` = dense + GELU, `output` = dense,
#     dropout, residual, LayerNorm): `intermediate` becomes the fused MLP and `output.dense`
#     an identity, so `output` adds the residual and normalises the fused MLP's result.
#   - the parent of both is a whole layer (BART, Whisper: `fc1`, `activation_fn`, `fc2`
#     beside attention) or takes more than the MLP input (BLOOM's MLP adds the residual):
#     fc1 becomes the fused MLP, the one activation module between them and fc2 identities.


class _Identity(nn.Identity):
    """What a linear or activation the fused MLP already computes becomes (named, for repr)."""


def _sibling_prefixes(fc1_prefix: str) -> tuple[str, str | None]:
    """(the fc2 prefix, a gated MLP's up prefix or None) beside an fc1 prefix, by the naming
    families quantize knows."""
    for convention in (*CONVENTIONS, PLAIN_CONVENTION):
        if fc1_prefix == convention.fc1 or fc1_prefix.endswith("." + convention.fc1):
            block = fc1_prefix[: len(fc1_prefix) - len(convention.fc1)]
            return block + convention.fc2, None if convention.up is None else block + convention.up
    raise SwapError(
        f"{fc1_prefix!r} is not an MLP prefix of a family gelugemm knows ({', '.join(CONVENTION_NAMES)}); "
        "pass find= to say which module it replaces"
    )


def module_path(model: nn.Module, prefix: str, modules: Mapping[str, nn.Module] | None = None) -> str:
    """The module path in `model` of a checkpoint prefix: the same name, or the name with the
    model's base-model prefix (`bert.`, `transformer.`, ...) removed or added; SwapError if none."""
    modules = dict(model.named_modules()) if modules is None else modules
    base = getattr(model, "base_model_prefix", "") or ""
    candidates = [prefix]
    if base:
        candidates += [prefix[len(base) + 1 :]] if prefix.startswith(base + ".") else [f"{base}.{prefix}"]
    for candidate in candidates:
        if candidate in modules and candidate:
            return candidate
    raise SwapError(
        f"{prefix!r} names no module of {type(model).__name__} (tried {', '.join(repr(c) for c in candidates)}); "
        "is this the model the checkpoint belongs to?"
    )


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _weighs_only(module: nn.Module, allowed: list[nn.Module]) -> bool:
    """True when every parameter of `module` belongs to one of `allowed` (its linears)."""
    own = {id(p) for p in module.parameters()}
    for child in allowed:
        own -= {id(p) for p in child.parameters()}
    return not own


def _one_input(module: nn.Module) -> bool:
    """True when the module's forward takes exactly one required argument (the MLP input)."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [
        p for p in parameters
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]  # fmt: skip
    return len(required) == 1


def _activation_between(modules: Mapping[str, nn.Module], parent: str, linears: tuple[str, str]) -> str | None:
    """The path of the one parameter-free, non-dropout child of `parent` (its activation), or None."""
    found = []
    for name, child in modules[parent].named_children():
        path = f"{parent}.{name}" if parent else name
        if path in linears or isinstance(child, (nn.Dropout, nn.Identity)) or any(True for _ in child.parameters()):
            continue
        found.append(path)
    return found[0] if len(found) == 1 else None


def find_seam(model: nn.Module, fc1_path: str, fc2_path: str, up_path: str | None = None) -> tuple[str, tuple[str, ...]]:
    """(the module path the fused MLP replaces, the module paths that become identities) for
    the MLP whose linears are at fc1_path and fc2_path (a gated MLP's up projection at
    up_path) in `model` (see the comment above). A gated MLP's module (Gemma's `mlp`, T5's
    `DenseReluDense`, ModernBERT's `mlp`) holds all its linears and is called on one
    tensor: it is replaced whole, or not at all."""
    modules = dict(model.named_modules())
    fc1, fc2 = modules[fc1_path], modules[fc2_path]
    p1, p2 = _parent(fc1_path), _parent(fc2_path)
    if up_path is not None:
        parent = modules[p1] if p1 == p2 == _parent(up_path) else None
        if p1 and parent is not None and _weighs_only(parent, [fc1, fc2, modules[up_path]]) and _one_input(parent):
            return p1, ()
        raise SwapError(
            f"{fc1_path}, {up_path} and {fc2_path}: a gated MLP is replaced as the one module that holds its three "
            "linears and is called on the MLP input; here they sit elsewhere (pass find= to name that module)"
        )
    if p1 == p2:
        parent = modules[p1]
        if p1 and _weighs_only(parent, [fc1, fc2]) and _one_input(parent):
            return p1, ()
        act = _activation_between(modules, p1, (fc1_path, fc2_path))
        if act is not None:
            return fc1_path, (act, fc2_path)
        raise SwapError(
            f"{fc1_path} and {fc2_path}: their module {p1 or type(model).__name__} holds other weights or "
            "takes more than the MLP input, and no single activation module between them was found"
        )
    if p1 and _weighs_only(modules[p1], [fc1]) and _one_input(modules[p1]):
        return p1, (fc2_path,)
    raise SwapError(f"{fc1_path} and {fc2_path} sit in different modules and {p1 or 'the model'} holds more than fc1 and its activation")


def _in_out(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear: nn.Linear ([out, in]) or transformers' Conv1D ([in, out], `nf`)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and hasattr(module, "nf"):
        return weight.shape[0], weight.shape[1]
    return None


def _check_sizes(prefix: str, path: str, linears: Mapping[str, tuple[str, nn.Module | None]], new: nn.Module) -> None:
    """Where both sides say their sizes (the model's linears {"fc1"|"fc2"|"up": (path, module)},
    the new MLP's d_model/d_ff), they must agree: fc1 (and a gated MLP's up) takes d_model and
    gives d_ff (a concatenated gated fc1 twice d_ff), fc2 takes d_ff and gives the width the
    model reads after the MLP, which is the new MLP's output width, d_model."""
    if not hasattr(new, "d_model") or not hasattr(new, "d_ff"):
        return
    config = getattr(new, "config", None)
    concatenated = getattr(config, "gated", False) and "w_up" not in getattr(new, "weight_names", ())
    d_model, d_ff = new.d_model, new.d_ff
    ff = "2 x d_ff" if concatenated else "d_ff"
    for role, (where, linear) in linears.items():
        sizes = None if linear is None else _in_out(linear)
        if sizes is None:
            continue
        if role == "whole":
            want = (d_model, d_model)
            said = (f"{where} takes {sizes[0]} and outputs {sizes[1]} features, "
                    f"but the new MLP takes and outputs d_model={d_model}")  # fmt: skip
        elif role == "fc2":
            want = (d_ff, d_model)
            said = (f"{where} (fc2) takes d_ff={sizes[0]} and outputs {sizes[1]} features, "
                    f"but the new MLP is d_ff={d_ff} and outputs d_model={d_model}")  # fmt: skip
        else:
            want = (d_model, d_ff * (2 if concatenated and role == "fc1" else 1))
            said = (f"{path if role == 'fc1' else where} is d_model={sizes[0]}, {ff if role == 'fc1' else 'd_ff'}={sizes[1]} "
                    f"but the new MLP is d_model={d_model}, d_ff={d_ff}")  # fmt: skip
        if sizes != want:
            raise SwapError(f"{prefix!r}: the model's {said}")


@dataclass
class Seam:
    """One MLP's place in a model: `path` gets `new`, each of `identities` an identity."""

    prefix: str  # the checkpoint's fc1 prefix
    path: str
    identities: tuple[str, ...]
    new: nn.Module
    originals: dict[str, nn.Module] = field(default_factory=dict)  # path -> the module it held


@dataclass
class Swaps:
    """Every MLP's seam in one model, applied or undone together (eval runs both models from one)."""

    model: nn.Module
    seams: list[Seam]
    applied: bool = False

    @property
    def paths(self) -> list[str]:
        return [seam.path for seam in self.seams]

    def _set(self, path: str, module: nn.Module) -> None:
        parent, _, attr = path.rpartition(".")
        setattr(self.model.get_submodule(parent), attr, module)

    def apply(self) -> "Swaps":
        if not self.applied:
            done = []
            try:
                for seam in self.seams:
                    for path in (seam.path, *seam.identities):
                        self._set(path, seam.new if path == seam.path else _Identity())
                        done.append((path, seam.originals[path]))
            except BaseException:
                for path, module in reversed(done):  # all or nothing: put back what was replaced
                    self._set(path, module)
                raise
            self.applied = True
        return self

    def undo(self) -> "Swaps":
        if self.applied:
            for seam in self.seams:
                for path, module in seam.originals.items():
                    self._set(path, module)
            self.applied = False
        return self

    @contextmanager
    def active(self) -> Iterator["Swaps"]:
        """Apply for the duration of a `with` block, then put the model's own modules back."""
        self.apply()
        try:
            yield self
        finally:
            self.undo()


def plan_swaps(
    model: nn.Module,
    mlps: Mapping[str, nn.Module],
    *,
    find: Callable[[str], str] | Mapping[str, str] | None = None,
    linears: Mapping[str, tuple[str, str, str | None]] | None = None,
) -> Swaps:
    """Where each MLP of `mlps` ({fc1 prefix: module}) goes in `model`, checked, nothing replaced yet.

    find: None resolves each checkpoint prefix against the model's own modules (a transformers
        model, or any model named like its checkpoint) and picks the seam as described above.
        A function or dict {fc1 prefix: module path} instead names the module each MLP replaces
        whole (the MLP submodule holding fc1, the GELU and fc2).
    linears: {fc1 prefix: (fc1 module path, fc2 module path, a gated MLP's up module path or
        None)} where the caller has matched them already (`calibration.hf` does, by weights,
        where a model class renames its checkpoint's tensors); the seam is then picked from
        those modules.
    Raises SwapError, before anything is replaced, when a prefix has no home, a replacement is
    not a module, or the sizes differ.
    """
    if not isinstance(model, nn.Module):
        raise SwapError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(mlps, Mapping):
        raise SwapError(f"mlps must be a mapping {{fc1 prefix: module}} (as load_mlps returns), got {type(mlps).__name__}")
    if find is not None and not isinstance(find, Mapping) and not callable(find):
        raise SwapError(f"find= must be a function or a dict {{fc1 prefix: module path}}, got {type(find).__name__}")
    for prefix, new in mlps.items():
        if not isinstance(new, nn.Module):
            raise SwapError(
                f"{prefix!r}: the replacement must be a torch.nn.Module (a FusedGeluMLP from load_mlps or "
                f"FusedGeluMLP(...)), got {type(new).__name__}"
            )
    modules = dict(model.named_modules())
    seams = []
    for prefix, new in mlps.items():
        if find is None and linears is not None and prefix in linears:
            fc1_path, fc2_path, up_path = linears[prefix]
            path, identities = find_seam(model, fc1_path, fc2_path, up_path)
        elif find is None:
            fc1_path = module_path(model, prefix, modules)
            fc2_prefix, up_prefix = _sibling_prefixes(prefix)
            fc2_path = module_path(model, fc2_prefix, modules)
            up_path = None if up_prefix is None else module_path(model, up_prefix, modules)
            path, identities = find_seam(model, fc1_path, fc2_path, up_path)
        else:
            if isinstance(find, Mapping):
                if prefix not in find:
                    raise SwapError(f"{prefix!r} has no entry in find=; it maps {', '.join(map(str, find)) or 'nothing'}")
                path = find[prefix]
            else:
                path = find(prefix)
            if not isinstance(path, str) or path not in modules or not path:
                raise SwapError(f"{prefix!r} maps to {path!r}, which {type(model).__name__} does not have")
            identities = ()
            if _in_out(modules[path]) is not None:
                # a linear replaced whole: it takes and gives what the MLP takes and gives
                found = {"whole": (path, modules[path])}
            else:
                # a module replaced whole: its own fc1 and fc2, where it names them so
                found = {role: (f"{path}.{role}", modules.get(f"{path}.{role}")) for role in ("fc1", "fc2")}
        if find is None:
            found = {"fc1": (fc1_path, modules[fc1_path]), "fc2": (fc2_path, modules[fc2_path])}
            if up_path is not None:
                found["up"] = (up_path, modules[up_path])
        _check_sizes(prefix, path, found, new)
        originals = {p: modules[p] for p in (path, *identities)}
        seams.append(Seam(prefix, path, identities, new, originals))
    taken = [p for seam in seams for p in seam.originals]
    if len(set(taken)) != len(taken):
        raise SwapError("two MLPs map to the same module: " + ", ".join(sorted({p for p in taken if taken.count(p) > 1})))
    return Swaps(model, seams)


def swap_mlps(
    model: nn.Module,
    mlps: Mapping[str, nn.Module],
    *,
    find: Callable[[str], str] | Mapping[str, str] | None = None,
) -> list[str]:
    """Put each MLP of `mlps` ({fc1 prefix: module}, as `load_mlps` returns) into `model`, in
    place; returns the module paths that now hold them. See `plan_swaps` for `find`.

    `plan_swaps(model, mlps).active()` does the same for a `with` block and puts the model's
    own modules back afterwards.
    """
    return plan_swaps(model, mlps, find=find).apply().paths
