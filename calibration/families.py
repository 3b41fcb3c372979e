"""The GELU MLP families gelugemm knows: their tensor names, weight layouts, the LayerNorm
that feeds each MLP, and what a model's config.json says about them.

A *convention* is a pair of module paths inside a transformer block (`intermediate.dense`
-> `output.dense`); several families share one (GPT-NeoX, BLOOM and Falcon all name their
MLP `mlp.dense_h_to_4h` -> `mlp.dense_4h_to_h`). A gated (GeGLU) MLP,
GELU(x W_gate^T) * (x W_up^T) -> W_down, has a third linear: the up projection beside the
gate (`mlp.gate_proj`, `mlp.up_proj` -> `mlp.down_proj`: Gemma; `DenseReluDense.wi_0`,
`wi_1` -> `wo`: T5 v1.1), or gate and up as the two halves of one linear's output
(ModernBERT's `mlp.Wi` -> `mlp.Wo`, GELU on the first half). Which family a block belongs to comes from
config.json's `model_type` (of the sub-config that describes the block: `text_config`,
`vision_config`), else from the LayerNorm names present, else the convention's first family.

The GELU flavour comes from config.json: `hidden_activation` first (Gemma sets both it and a
legacy `hidden_act`), then `hidden_act`, `activation_function`, `activation`, and T5's
`feed_forward_proj` ("gated-gelu" is T5's tanh GELU, `gelu_new`); a block under a vision or
text tower reads its own sub-config first. Gemma 1's legacy `hidden_act: gelu` is the tanh
form (transformers' GemmaConfig runs it so). A config that names no activation
decides by `model_type` where the model has one fixed GELU (BLOOM's is the tanh form); else
the family's default, said as such. A non-GELU activation is refused, named. The names
`mlp.gate_proj`/`up_proj`/`down_proj` are Llama's too (SwiGLU): without a config.json that
names a GELU (or `--gelu`), such an MLP is refused rather than guessed.

The float dtype the MLP's activations run in (verify's reference path, the int8 schemes'
x and y) also comes from config.json: bf16 where its `torch_dtype` (transformers 5:
`dtype`) is bfloat16 or the family overflows fp16 (T5 v1.1 and Flan-T5 were trained in
bf16, and their activations pass fp16's 65504), else fp16.

Nothing here reads a file: `calibration.checkpoint` applies these rules to a checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from calibration.errors import CheckpointError, OptionError
from kernels.schemes import ACTIVATION_DTYPES, GELU_FLAVOURS, HIDDEN_ACT_GELU

# Where a config names its activation, most specific first (T5: feed_forward_proj).
ACTIVATION_KEYS = ("hidden_activation", "hidden_act", "activation_function", "activation", "feed_forward_proj")
# Values a model_type's config writes that mean another activation than their name says:
# (model_type, key, value) -> (the activation it runs, why).
ACTIVATION_ALIASES = {
    ("gemma", "hidden_act", "gelu"): ("gelu_pytorch_tanh", "Gemma's legacy value for the tanh GELU"),
}
# The float dtype of an MLP's activations when neither the user nor config.json says.
DEFAULT_ACTIVATION_DTYPE = "fp16"
# config.json's torch_dtype (transformers 5: dtype) -> the activation dtype it implies.
CONFIG_DTYPES = {"bfloat16": "bf16"}
# Sub-configs of multi-tower models, and the words in a tensor prefix that select each.
SUB_CONFIGS = (("vision_config", ("vision",)), ("text_config", ("text", "language")), ("audio_config", ("audio",)))
# Models whose config names no activation because the model has one fixed GELU.
MODEL_TYPE_GELU = {"bloom": "tanh", "falcon": "erf", "RefinedWeb": "erf", "RefinedWebModel": "erf"}


@dataclass(frozen=True)
class Family:
    """One model family's MLP: how its weights are stored and which LayerNorm feeds it.

    layout: "out_in" (nn.Linear) or "in_out" (GPT-2's Conv1D).
    gelu: the flavour when config.json names none (and the model_type says nothing).
    norms: (LayerNorm path inside the block, True where it feeds only the MLP), the first
        present wins. A LayerNorm that feeds only the MLP (pre-LN: GPT-2 `ln_2`, ViT
        `norm2`) can absorb SmoothQuant's division; one that also feeds the residual or the
        attention (post-LN BERT, parallel-attention GPT-J and Phi) cannot.
    """

    name: str
    title: str
    model_types: tuple[str, ...]
    layout: str
    gelu: str
    norms: tuple[tuple[str, bool], ...]
    # (regex, replacement) turning a checkpoint prefix into the module name a loader uses,
    # where a loader renames modules (transformers >= 5 for HF ViT/DeiT/BEiT): config.json's
    # targets must name both.
    aliases: tuple[tuple[str, str], ...] = ()
    # The norm multiplies by (norm_offset + weight): Gemma's RMSNorm stores weight - 1.
    norm_offset: float = 0.0
    # The activation dtype the family runs in where config.json does not say (None: fp16).
    activation_dtype: str | None = None
    activation_dtype_why: str = ""

    def module_names(self, prefix: str) -> list[str]:
        """Other names a loader gives the module stored under `prefix`."""
        if not self.aliases:
            return []
        name = prefix
        for pattern, replacement in self.aliases:
            name = re.sub(pattern, replacement, name)
        return [name] if name != prefix else []


@dataclass(frozen=True)
class Convention:
    """GEMM1 and GEMM2 as module paths inside a block whose prefix matches `block` (a regex).

    gated: None for GELU(x W1^T + b1) W2^T + b2; "separate" for a gated MLP whose gate is
        fc1 and whose up projection is the linear `up`; "concatenated" for one whose fc1
        output holds the gate (first half) and the up projection (second half).
    needs_config: the names are shared with non-GELU models, so the activation must come
        from config.json (or be asked for); no default is assumed.
    """

    fc1: str
    fc2: str
    families: tuple[Family, ...]  # the first is the default
    gelu: str = "erf"  # the flavour when neither config.json nor a model_type says
    block: str = r"(?:.*\.)?"
    up: str | None = None
    gated: str | None = None
    needs_config: bool = False

    @property
    def title(self) -> str:
        return "/".join(dict.fromkeys(f.title for f in self.families))

    @property
    def pattern(self) -> re.Pattern:
        return re.compile(rf"(?P<block>{self.block}){re.escape(self.fc1)}\.weight")

    def describe(self) -> str:
        if self.gated == "separate":
            return f"{self.title} (*.{self.fc1}, *.{self.up} -> *.{self.fc2}, gated)"
        if self.gated == "concatenated":
            return f"{self.title} (*.{self.fc1} halves -> *.{self.fc2}, gated)"
        return f"{self.title} (*.{self.fc1} -> *.{self.fc2})"


def _family(name, title, model_types, layout, gelu, norms, aliases=(), **extra) -> Family:
    return Family(name, title, tuple(model_types), layout, gelu, tuple(norms), tuple(aliases), **extra)


BERT = _family("bert", "BERT/RoBERTa/ELECTRA/DeBERTa",
               ("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2", "camembert", "mpnet", "ernie"),
               "out_in", "erf", [("attention.output.LayerNorm", False)])
# transformers 5 loads these with other module names (its conversion_mapping.py):
# encoder.layer.N.intermediate.dense -> layers.N.mlp.fc1, output.dense -> mlp.fc2.
VIT_HF = _family("vit", "HF ViT/DeiT/BEiT", ("vit", "deit", "beit", "data2vec-vision", "vit_mae", "vit_msn"),
                 "out_in", "erf", [("layernorm_after", True)],
                 [(r"(^|\.)encoder\.layer\.", r"\1layers."), (r"\.intermediate\.dense$", ".mlp.fc1"), (r"\.output\.dense$", ".mlp.fc2")])
DISTILBERT = _family("distilbert", "DistilBERT", ("distilbert",), "out_in", "erf", [("sa_layer_norm", False)])
GPT2 = _family("gpt2", "GPT-2", ("gpt2",), "in_out", "tanh", [("ln_2", True)])
GPT_BIGCODE = _family("gpt-bigcode", "GPTBigCode/StarCoder", ("gpt_bigcode",), "out_in", "tanh", [("ln_2", True)])
GPTJ = _family("gpt-j", "GPT-J/CodeGen", ("gptj", "codegen"), "out_in", "tanh", [("ln_1", False)])
GPT_NEOX = _family("gpt-neox", "GPT-NeoX/Pythia", ("gpt_neox",), "out_in", "erf", [("post_attention_layernorm", True)])
BLOOM = _family("bloom", "BLOOM", ("bloom",), "out_in", "tanh", [("post_attention_layernorm", True)])
# Falcon-40B's new decoder feeds the MLP from ln_mlp, sequential Falcon from
# post_attention_layernorm, parallel-attention Falcon-7B from the input_layernorm it shares.
FALCON = _family("falcon", "Falcon", ("falcon", "RefinedWeb", "RefinedWebModel"), "out_in", "erf",
                 [("ln_mlp", True), ("post_attention_layernorm", True), ("input_layernorm", False)])
VIT_TIMM = _family("timm-vit", "timm ViT", (), "out_in", "erf", [("norm2", True)])
CLIP = _family("clip", "CLIP", ("clip", "clip_text_model", "clip_vision_model"), "out_in", "quick", [("layer_norm2", True)])
# SigLIP's attention-pooling head has an MLP too, fed by the head's own `layernorm`.
SIGLIP = _family("siglip", "SigLIP", ("siglip", "siglip_text_model", "siglip_vision_model"), "out_in", "tanh",
                 [("layer_norm2", True), ("layernorm", True)])
PHI = _family("phi", "Phi-1/1.5/2", ("phi",), "out_in", "tanh", [("input_layernorm", False)])
# Whisper and mBART are pre-LN (final_layer_norm feeds fc1); BART is post-LN (fc1 reads
# the attention's LayerNorm, also the residual: encoder_attn_layer_norm in a decoder layer).
WHISPER = _family("whisper", "Whisper/mBART", ("whisper", "mbart"), "out_in", "erf", [("final_layer_norm", True)])
BART = _family("bart", "BART", ("bart",), "out_in", "erf",
               [("encoder_attn_layer_norm", False), ("self_attn_layer_norm", False)])
# Without a model_type the LayerNorm feeding fc1 of a `layers.N.fc1` block is not known.
SEQ2SEQ = _family("seq2seq", "Whisper/BART/mBART", (), "out_in", "erf", [])
# Gated (GeGLU) MLPs. Gemma 2/3 feed the MLP from pre_feedforward_layernorm (their
# post_attention_layernorm normalizes the attention output before the residual); Gemma 1
# from post_attention_layernorm. Gemma's RMSNorm multiplies by (1 + weight).
GEMMA = _family("gemma", "Gemma", ("gemma", "gemma2", "gemma3", "gemma3_text"), "out_in", "tanh",
                [("pre_feedforward_layernorm", True), ("post_attention_layernorm", True)], norm_offset=1.0)
# T5 v1.1, Flan-T5, mT5, UMT5: DenseReluDense inside the feed-forward sub-layer
# (`encoder.block.N.layer.1.`, `decoder.block.N.layer.2.`), fed by that sub-layer's own RMSNorm.
T5 = _family("t5", "T5 v1.1/Flan-T5/mT5", ("t5", "mt5", "umt5"), "out_in", "tanh", [("layer_norm", True)],
             activation_dtype="bf16", activation_dtype_why="T5 v1.1/Flan-T5 overflow fp16 (trained in bf16)")
MODERNBERT = _family("modernbert", "ModernBERT", ("modernbert",), "out_in", "erf", [("mlp_norm", True)])

CONVENTIONS = (
    Convention("intermediate.dense", "output.dense", (BERT, VIT_HF)),
    Convention("ffn.lin1", "ffn.lin2", (DISTILBERT,)),
    Convention("mlp.c_fc", "mlp.c_proj", (GPT2, GPT_BIGCODE), gelu="tanh"),
    Convention("mlp.fc_in", "mlp.fc_out", (GPTJ,), gelu="tanh"),
    Convention("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", (GPT_NEOX, BLOOM, FALCON)),
    Convention("mlp.fc1", "mlp.fc2", (VIT_TIMM, CLIP, SIGLIP, PHI)),
    Convention("fc1", "fc2", (SEQ2SEQ, WHISPER, BART), block=r"(?:.*\.)?layers\.\d+\."),
    Convention("mlp.gate_proj", "mlp.down_proj", (GEMMA,), gelu="tanh", up="mlp.up_proj", gated="separate", needs_config=True),
    Convention("DenseReluDense.wi_0", "DenseReluDense.wo", (T5,), gelu="tanh", up="DenseReluDense.wi_1", gated="separate"),
    # T5 with one wi (the original T5 is ReLU: refused, named, by its feed_forward_proj)
    Convention("DenseReluDense.wi", "DenseReluDense.wo", (T5,), gelu="erf", needs_config=True),
    Convention("mlp.Wi", "mlp.Wo", (MODERNBERT,), gated="concatenated"),
)
# A file holding one bare MLP: top-level tensors w1, b1, w2 and optionally b2.
PLAIN = _family("plain", "plain file", (), "out_in", "erf", [])
PLAIN_CONVENTION = Convention("w1", "w2", (PLAIN,), block="")
CONVENTION_NAMES = [c.describe() for c in CONVENTIONS] + ["plain file (w1, b1, w2[, b2])"]
FAMILIES = {f.name: f for c in CONVENTIONS for f in c.families} | {PLAIN.name: PLAIN}


def sub_config(config: dict | None, block: str) -> tuple[dict, str]:
    """(the config describing the tensors under `block`, its key path: "" or "vision_config.")."""
    if not isinstance(config, dict):
        return {}, ""
    for key, words in SUB_CONFIGS:
        sub = config.get(key)
        if isinstance(sub, dict) and any(word in block for word in words):
            return sub, f"{key}."
    return config, ""


def model_type_of(config: dict | None, block: str) -> str | None:
    sub, _ = sub_config(config, block)
    top = config if isinstance(config, dict) else {}
    value = sub.get("model_type") or top.get("model_type")
    return value if isinstance(value, str) else None


def choose_family(convention: Convention, model_type: str | None, norm_present) -> tuple[Family, str]:
    """(family, why) for one block: by model_type, else by the LayerNorm present, else the default."""
    for family in convention.families:
        if model_type in family.model_types:
            return family, f"config.json model_type={model_type}"
    for family in convention.families:
        if any(norm_present(norm) for norm, _ in family.norms):
            return family, "tensor names"
    return convention.families[0], "tensor names"


def conv1d_layout(model_type: str | None, w1_shape: tuple[int, ...], b1_len: int | None, w1_name: str) -> tuple[str, str]:
    """GPT-2 (Conv1D, [in, out]) or GPT-BigCode (nn.Linear, [out, in]) for `mlp.c_fc`: from
    model_type, else from the length of c_fc's bias (d_ff), never assumed."""
    if model_type in GPT2.model_types:
        return "in_out", f"config.json model_type={model_type} (Conv1D)"
    if model_type in GPT_BIGCODE.model_types:
        return "out_in", f"config.json model_type={model_type} (nn.Linear)"
    if b1_len is not None and len(w1_shape) == 2 and w1_shape[0] != w1_shape[1]:
        if w1_shape[1] == b1_len:
            return "in_out", f"bias length {b1_len} = W1's second dim (Conv1D)"
        if w1_shape[0] == b1_len:
            return "out_in", f"bias length {b1_len} = W1's first dim (nn.Linear)"
    raise CheckpointError(
        f"{w1_name}: cannot tell GPT-2's Conv1D [in, out] from GPT-BigCode's nn.Linear [out, in]: "
        "config.json gives no model_type (gpt2 or gpt_bigcode) and the bias does not decide; put the model's config.json beside it"
    )


def norm_feeds_only_mlp(family: Family, norm: str | None, config: dict | None) -> bool:
    """True where smoothing can be folded into the LayerNorm: it feeds the MLP and nothing else."""
    if norm is None:
        return False
    only = dict(family.norms).get(_norm_suffix(family, norm), False)
    # BLOOM's apply_residual_connection_post_layernorm makes the LayerNorm output the residual too.
    if family is BLOOM and isinstance(config, dict) and config.get("apply_residual_connection_post_layernorm"):
        return False
    return only


def _norm_suffix(family: Family, norm_prefix: str) -> str:
    for name, _ in family.norms:
        if norm_prefix == name or norm_prefix.endswith("." + name):
            return name
    return norm_prefix


def check_asked_gelu(asked: str) -> str:
    if asked not in GELU_FLAVOURS:
        raise OptionError(f"--gelu must be one of {', '.join(GELU_FLAVOURS)}; got {asked!r}")
    return asked


def _config_activation(key: str, value, model_type: str | None) -> tuple[object, str]:
    """(the activation name a config value stands for, a note on why where it is not the value)."""
    if isinstance(value, str) and (model_type, key, value) in ACTIVATION_ALIASES:
        act, why = ACTIVATION_ALIASES[(model_type, key, value)]
        return act, f" ({why})"
    if key == "feed_forward_proj" and isinstance(value, str):
        # transformers' T5Config: "gated-ACT" or "ACT"; "gated-gelu" runs gelu_new (tanh).
        if value == "gated-gelu":
            return "gelu_new", " (T5's gated-gelu is gelu_new)"
        return value.split("-")[-1], ""
    return value, ""


def gelu_for(config: dict | None, config_path: Path, block: str, convention: Convention, family: Family,
             by_model_type: bool, asked: str | None) -> tuple[str, str]:
    """(flavour, why) for the MLP under `block`: asked for, else config.json, else model_type,
    else the default of the family (when model_type named it) or of the naming convention.
    A convention that `needs_config` (names a non-GELU model may have too) takes no default."""
    if asked is not None:
        return check_asked_gelu(asked), "asked for"
    if isinstance(config, dict):
        sub, where = sub_config(config, block)
        model_type = model_type_of(config, block)
        scopes = [(sub, where)] + ([(config, "")] if where else [])
        for scope, prefix in scopes:
            for key in ACTIVATION_KEYS:
                value = scope.get(key)
                if value is None:
                    continue
                act, why = _config_activation(key, value, model_type)
                if not isinstance(act, str) or act not in HIDDEN_ACT_GELU:
                    raise CheckpointError(
                        f"{config_path} says {prefix}{key}={value!r}: not a GELU; gelugemm runs GELU MLPs only "
                        f"({', '.join(HIDDEN_ACT_GELU)}); pass --gelu {'|'.join(GELU_FLAVOURS)} to override"
                    )
                if key == "feed_forward_proj" and value.startswith("gated-") != (convention.gated is not None):
                    raise CheckpointError(
                        f"{config_path} says {prefix}{key}={value!r}, but {block}{convention.fc1} is "
                        f"{'a gated' if convention.gated else 'an ungated'} MLP: the config is not this checkpoint's"
                    )
                return HIDDEN_ACT_GELU[act], f"config.json {prefix}{key}={value}{why}"
        if model_type in MODEL_TYPE_GELU:
            return MODEL_TYPE_GELU[model_type], f"config.json model_type={model_type} (names no activation)"
    if convention.needs_config:
        raise CheckpointError(
            f"{block}{convention.fc1}: {convention.describe()} names are shared with non-GELU models (Llama's SwiGLU, "
            f"T5's ReLU), and {'no config.json names the activation' if not isinstance(config, dict) else f'{config_path} names no activation'}; "
            f"put the model's config.json beside it, or pass --gelu {'|'.join(GELU_FLAVOURS)} if it is a GELU MLP"
        )
    if by_model_type:
        return family.gelu, f"{family.title} default (config.json names no activation)"
    return convention.gelu, f"{convention.title} default (config.json does not say)"


def check_asked_activation_dtype(asked: str) -> str:
    if asked not in ACTIVATION_DTYPES:
        raise OptionError(f"--activation-dtype must be one of {', '.join(ACTIVATION_DTYPES)}; got {asked!r}")
    return asked


def activation_dtype_for(config: dict | None, block: str, family: Family, asked: str | None) -> tuple[str, str]:
    """(the float dtype the MLP's activations run in, why): asked for, else config.json's
    torch_dtype / dtype where it implies one (bfloat16 -> bf16), else the family's, else fp16."""
    if asked is not None:
        return check_asked_activation_dtype(asked), "asked for"
    if isinstance(config, dict):
        sub, where = sub_config(config, block)
        scopes = [(sub, where)] + ([(config, "")] if where else [])
        for scope, prefix in scopes:
            for key in ("torch_dtype", "dtype"):
                value = scope.get(key)
                if isinstance(value, str) and value in CONFIG_DTYPES:
                    return CONFIG_DTYPES[value], f"config.json {prefix}{key}={value}"
    if family.activation_dtype is not None:
        return family.activation_dtype, family.activation_dtype_why
    return DEFAULT_ACTIVATION_DTYPE, "default"
