"""Small safetensors checkpoints in each MLP naming family, for quantize and verify tests.

    path = write_checkpoint(tmp_path / "model.safetensors", "gpt2", n_layers=2)
    spec = FAMILIES["gpt2"]; spec.fc1(0)  # "transformer.h.0.mlp.c_fc"

Each checkpoint holds the MLPs under the family's own names and layout, the LayerNorm
feeding each MLP, and tensors that must not be taken for an MLP (attention projections
with look-alike names, embeddings, an int64 buffer), so discovery and copy-through are
both exercised. Weights have a different magnitude per output channel so per-channel
scales differ, and LayerNorm weights and biases are far from 1 and 0 so synthetic
calibration inputs visibly follow them. `corrupt_files` writes files that are not valid
safetensors, each broken its own way; `all_tensors` reads a (sharded) directory back.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calibration.checkpoint import Checkpoint


@dataclass(frozen=True)
class FamilySpec:
    block: str  # the block prefix, with {i} for the layer index
    fc1: str
    fc2: str
    norm: str | None  # the LayerNorm feeding the MLP, inside the block
    weight_layout: str
    gelu: str  # the flavour discovery defaults to without config.json
    others: tuple[tuple[str, str], ...] = ()  # (name inside the block, "square" | "wide" | "vector")

    def fc1_prefix(self, i: int) -> str:
        return self.block.format(i=i) + self.fc1

    def fc2_prefix(self, i: int) -> str:
        return self.block.format(i=i) + self.fc2

    def norm_prefix(self, i: int) -> str | None:
        return None if self.norm is None else self.block.format(i=i) + self.norm


FAMILIES = {
    "bert": FamilySpec("encoder.layer.{i}.", "intermediate.dense", "output.dense", "attention.output.LayerNorm", "out_in", "erf",
                       (("attention.output.dense.weight", "square"), ("attention.self.query.weight", "square"),
                        ("output.LayerNorm.weight", "vector"))),
    "gpt2": FamilySpec("transformer.h.{i}.", "mlp.c_fc", "mlp.c_proj", "ln_2", "in_out", "tanh",
                       (("attn.c_proj.weight", "square"), ("attn.c_attn.weight", "wide"), ("ln_1.weight", "vector"))),
    "vit": FamilySpec("blocks.{i}.", "mlp.fc1", "mlp.fc2", "norm2", "out_in", "erf",
                      (("attn.proj.weight", "square"), ("norm1.weight", "vector"))),
    "clip": FamilySpec("text_model.encoder.layers.{i}.", "mlp.fc1", "mlp.fc2", "layer_norm2", "out_in", "erf",
                       (("self_attn.out_proj.weight", "square"),)),
    "gpt-neox": FamilySpec("gpt_neox.layers.{i}.", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "post_attention_layernorm",
                           "out_in", "erf", (("attention.dense.weight", "square"), ("input_layernorm.weight", "vector"))),
    "falcon": FamilySpec("transformer.h.{i}.", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "input_layernorm", "out_in", "erf",
                         (("self_attention.dense.weight", "square"),)),
    "distilbert": FamilySpec("distilbert.transformer.layer.{i}.", "ffn.lin1", "ffn.lin2", "sa_layer_norm", "out_in", "erf",
                             (("attention.out_lin.weight", "square"), ("output_layer_norm.weight", "vector"))),
    "gpt-j": FamilySpec("transformer.h.{i}.", "mlp.fc_in", "mlp.fc_out", "ln_1", "out_in", "tanh", (("attn.out_proj.weight", "square"),)),
    # GPT-2's names in nn.Linear's layout: told apart by the bias length (no config.json here)
    "gpt-bigcode": FamilySpec("transformer.h.{i}.", "mlp.c_fc", "mlp.c_proj", "ln_2", "out_in", "tanh", (("attn.c_proj.weight", "square"),)),
    "plain": FamilySpec("", "w1", "w2", None, "out_in", "erf"),
    "plain-in_out": FamilySpec("", "w1", "w2", None, "in_out", "erf"),
}  # fmt: skip


def mlp_weights(d_model: int, d_ff: int, layout: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(W1, W2) in `layout`, each output channel with its own magnitude."""
    w1 = torch.randn(d_ff, d_model, generator=generator) * torch.rand(d_ff, 1, generator=generator).add(0.1) / d_model**0.5
    w2 = torch.randn(d_model, d_ff, generator=generator) * torch.rand(d_model, 1, generator=generator).add(0.1) / d_ff**0.5
    if layout == "in_out":
        return w1.t().contiguous(), w2.t().contiguous()
    return w1, w2


def checkpoint_tensors(
    family: str,
    *,
    d_model: int = 16,
    d_ff: int = 48,
    n_layers: int = 2,
    dtype: torch.dtype = torch.float32,
    bias2: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The tensors of a small checkpoint in one family's names."""
    spec = FAMILIES[family]
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    if spec.block == "":  # a plain file: one bare MLP
        w1, w2 = mlp_weights(d_model, d_ff, spec.weight_layout, g)
        tensors.update(w1=w1, b1=torch.randn(d_ff, generator=g) * 0.1, w2=w2)
        if bias2:
            tensors["b2"] = torch.randn(d_model, generator=g) * 0.1
        return {k: v.to(dtype) for k, v in tensors.items()}
    for i in range(n_layers):
        block = spec.block.format(i=i)
        w1, w2 = mlp_weights(d_model, d_ff, spec.weight_layout, g)
        tensors[f"{block}{spec.fc1}.weight"] = w1
        tensors[f"{block}{spec.fc1}.bias"] = torch.randn(d_ff, generator=g) * 0.1
        tensors[f"{block}{spec.fc2}.weight"] = w2
        if bias2:
            tensors[f"{block}{spec.fc2}.bias"] = torch.randn(d_model, generator=g) * 0.1
        tensors[f"{block}{spec.norm}.weight"] = torch.rand(d_model, generator=g) * 3 + 0.5
        tensors[f"{block}{spec.norm}.bias"] = torch.randn(d_model, generator=g) * 2
        shapes = {"square": (d_model, d_model), "wide": (d_model, 3 * d_model), "vector": (d_model,)}
        for name, kind in spec.others:
            tensors[block + name] = torch.randn(*shapes[kind], generator=g)
    tensors["embeddings.word_embeddings.weight"] = torch.randn(50, d_model, generator=g)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors["embeddings.position_ids"] = torch.arange(8, dtype=torch.int64)[None]  # stays int64
    return tensors


def write_checkpoint(
    path: Path,
    family: str = "bert",
    *,
    config: dict | None = None,
    metadata: dict[str, str] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    **kwargs,
) -> Path:
    """Write a small checkpoint (and `config` as config.json beside it); returns its path."""
    path = Path(path)
    save_file(tensors if tensors is not None else checkpoint_tensors(family, **kwargs), str(path), metadata=metadata)
    if config is not None:
        (path.parent / "config.json").write_text(json.dumps(config))
    return path


def write_calibration(path: Path, rows: dict[str, torch.Tensor]) -> Path:
    """A --calib file: fc1 prefix -> [tokens, d_model]."""
    save_file({k: v.contiguous() for k, v in rows.items()}, str(path))
    return Path(path)


def write_sharded(
    directory: Path,
    tensors: dict[str, torch.Tensor],
    shards: list[list[str]] | int = 3,
    *,
    config: dict | None = None,
    index_metadata: dict | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A Hugging Face model directory: `shards` (lists of tensor names, or a count to split the
    tensors into in order), `model.safetensors.index.json`, and `config` as config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if isinstance(shards, int):
        per = -(-len(names) // shards)
        shards = [names[i : i + per] for i in range(0, len(names), per)]
    weight_map = {}
    for i, members in enumerate(shards, 1):
        shard = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in members}, str(directory / shard), metadata=metadata)
        weight_map.update({n: shard for n in members})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, **(index_metadata or {})}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return directory


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every .safetensors file in `directory`, by name."""
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def corrupt_files(tmp_path: Path) -> dict[str, Path]:
    """{what is wrong: path}: a BERT checkpoint written in tmp_path, then broken six ways
    (truncated, empty, not safetensors, a bad header), none a valid safetensors file."""
    good = write_checkpoint(tmp_path / "good.safetensors", "bert")
    data = good.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    files = {
        "truncated data": data[: len(data) - 100],
        "truncated header": data[:30],
        "empty": b"",
        "not safetensors": b"PK\x03\x04 this is a zip file, not a checkpoint",
        "corrupt header": data[:8] + data[8 : 8 + header_len].replace(b'"dtype"', b'"dtipe"', 1) + data[8 + header_len :],
        "header length past the end": (len(data) * 2).to_bytes(8, "little") + data[8:],
    }
    paths = {}
    for what, content in files.items():
        paths[what] = tmp_path / (what.replace(" ", "_") + ".safetensors")
        paths[what].write_bytes(content)
    return paths


@dataclass
class WeightReads:
    """What quantize read through Checkpoint.get_tensor: the most bytes of read tensors alive
    at once, and the names read, in order."""

    peak: int = 0
    names: list = field(default_factory=list)


def track_weight_reads(monkeypatch) -> WeightReads:
    """Wrap Checkpoint.get_tensor so that each tensor it returns counts until it is freed."""
    reads, live = WeightReads(), {}
    real = Checkpoint.get_tensor

    def tracked(self, name, **kw):  # kw: the ReadBuffer quantize reads weights into
        t = real(self, name, **kw)
        key = id(t)
        live[key] = t.numel() * t.element_size()
        weakref.finalize(t, live.pop, key, None)
        reads.peak = max(reads.peak, sum(live.values()))
        reads.names.append(name)
        return t

    monkeypatch.setattr(Checkpoint, "get_tensor", tracked)
    return reads
