"""Every GELU family quantize knows, on a small random model with the family's real tensor
names and config.json (built with transformers and saved with `save_pretrained`): the MLP
pairs found, their layout, GELU flavour and where it came from, and the LayerNorm feeding
each (and whether SmoothQuant can fold into it). Non-GELU models are refused, named."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel
from transformers.utils import logging as hf_logging

from calibration.checkpoint import find_mlps
from calibration.errors import CheckpointError, OptionError
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from calibration.verify import verify_checkpoint
from checkpoints import checkpoint_tensors, write_checkpoint

hf_logging.set_verbosity_error()

SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
IMAGE = dict(image_size=8, patch_size=4)
GPT = dict(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
SEQ2SEQ = dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=60, pad_token_id=1, bos_token_id=0, eos_token_id=2,
               decoder_start_token_id=0)  # fmt: skip


GEMMA = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
             head_dim=8, vocab_size=50)
T5 = dict(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)
MODERNBERT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)  # fmt: skip


def hf_model_dir(path: Path, model_type: str, **config) -> Path:
    """A tiny random model of `model_type`, saved as transformers saves it (config.json + model.safetensors)."""
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.for_model(model_type, **config)).save_pretrained(path)
    return path


def one(block: str, fc1: str, fc2: str, family: str, layout: str, gelu: str, source: str, norm: str | None, folds: bool):
    return dict(fc1=block + fc1, fc2=block + fc2, family=family, weight_layout=layout, gelu=gelu, gelu_source=source,
                norm=None if norm is None else block + norm, norm_feeds_only_mlp=folds)  # fmt: skip


def bert_like(model_type, family, norm, folds, **extra):
    return (model_type, {**SMALL, **extra},
            [one("encoder.layer.0.", "intermediate.dense", "output.dense", family, "out_in", "erf", "config.json hidden_act=gelu", norm, folds)])  # fmt: skip


# (model_type, config, the MLPs discovery must find)
CASES = [
    bert_like("bert", "bert", "attention.output.LayerNorm", False),  # post-LN: the LayerNorm is also the residual
    bert_like("roberta", "bert", "attention.output.LayerNorm", False),
    bert_like("electra", "bert", "attention.output.LayerNorm", False, embedding_size=16),
    bert_like("deberta-v2", "bert", "attention.output.LayerNorm", False),
    bert_like("vit", "vit", "layernorm_after", True, **IMAGE),  # pre-LN
    bert_like("deit", "vit", "layernorm_after", True, **IMAGE),
    bert_like("beit", "vit", "layernorm_after", True, **IMAGE),
    ("distilbert", dict(dim=16, hidden_dim=32, n_layers=1, n_heads=2, vocab_size=50),
     [one("transformer.layer.0.", "ffn.lin1", "ffn.lin2", "distilbert", "out_in", "erf", "config.json activation=gelu", "sa_layer_norm", False)]),
    ("gpt2", GPT, [one("h.0.", "mlp.c_fc", "mlp.c_proj", "gpt2", "in_out", "tanh", "config.json activation_function=gelu_new", "ln_2", True)]),
    ("gpt_bigcode", GPT,  # the same names as GPT-2, but nn.Linear: the layout comes from model_type
     [one("h.0.", "mlp.c_fc", "mlp.c_proj", "gpt-bigcode", "out_in", "tanh", "config.json activation_function=gelu_pytorch_tanh", "ln_2", True)]),
    ("gptj", dict(GPT, rotary_dim=4),  # parallel attention: ln_1 feeds both
     [one("h.0.", "mlp.fc_in", "mlp.fc_out", "gpt-j", "out_in", "tanh", "config.json activation_function=gelu_new", "ln_1", False)]),
    ("codegen", dict(GPT, rotary_dim=4),
     [one("h.0.", "mlp.fc_in", "mlp.fc_out", "gpt-j", "out_in", "tanh", "config.json activation_function=gelu_new", "ln_1", False)]),
    ("gpt_neox", SMALL, [one("layers.0.", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "gpt-neox", "out_in", "erf", "config.json hidden_act=gelu",
                             "post_attention_layernorm", True)]),
    ("bloom", dict(hidden_size=16, n_layer=1, n_head=2, vocab_size=50),  # BLOOM's config names no activation: tanh by model_type
     [one("h.0.", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "bloom", "out_in", "tanh", "config.json model_type=bloom (names no activation)",
          "post_attention_layernorm", True)]),
    ("falcon", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=50),  # parallel attention (7B)
     [one("h.0.", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "falcon", "out_in", "erf", "config.json activation=gelu", "input_layernorm", False)]),
    ("falcon", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=50, new_decoder_architecture=True, num_kv_heads=2),
     [one("h.0.", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "falcon", "out_in", "erf", "config.json activation=gelu", "ln_mlp", True)]),
    ("falcon", dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=50, parallel_attn=False),
     [one("h.0.", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "falcon", "out_in", "erf", "config.json activation=gelu", "post_attention_layernorm", True)]),
    ("phi", SMALL, [one("layers.0.", "mlp.fc1", "mlp.fc2", "phi", "out_in", "tanh", "config.json hidden_act=gelu_new", "input_layernorm", False)]),
    ("clip", dict(text_config=SMALL, vision_config=dict(SMALL, **IMAGE), projection_dim=8),  # quick GELU from each tower's sub-config
     [one("text_model.encoder.layers.0.", "mlp.fc1", "mlp.fc2", "clip", "out_in", "quick", "config.json text_config.hidden_act=quick_gelu", "layer_norm2", True),
      one("vision_model.encoder.layers.0.", "mlp.fc1", "mlp.fc2", "clip", "out_in", "quick", "config.json vision_config.hidden_act=quick_gelu", "layer_norm2", True)]),
    ("siglip", dict(text_config=SMALL, vision_config=dict(SMALL, **IMAGE)),
     [one("text_model.encoder.layers.0.", "mlp.fc1", "mlp.fc2", "siglip", "out_in", "tanh", "config.json text_config.hidden_act=gelu_pytorch_tanh", "layer_norm2", True),
      one("vision_model.encoder.layers.0.", "mlp.fc1", "mlp.fc2", "siglip", "out_in", "tanh", "config.json vision_config.hidden_act=gelu_pytorch_tanh", "layer_norm2", True),
      one("vision_model.head.", "mlp.fc1", "mlp.fc2", "siglip", "out_in", "tanh", "config.json vision_config.hidden_act=gelu_pytorch_tanh", "layernorm", True)]),
    # Gemma 3: the vision tower (SigLIP) reads vision_config; the language model's gated MLP (GeGLU) its text_config.
    ("gemma3", dict(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                     head_dim=8, vocab_size=300), vision_config=dict(SMALL, **IMAGE), mm_tokens_per_image=4),
     [one("language_model.model.layers.0.", "mlp.gate_proj", "mlp.down_proj", "gemma", "out_in", "tanh",
          "config.json text_config.hidden_activation=gelu_pytorch_tanh", "pre_feedforward_layernorm", True),
      one("vision_tower.encoder.layers.0.", "mlp.fc1", "mlp.fc2", "siglip", "out_in", "tanh", "config.json vision_config.hidden_act=gelu_pytorch_tanh", "layer_norm2", True),
      one("vision_tower.head.", "mlp.fc1", "mlp.fc2", "siglip", "out_in", "tanh", "config.json vision_config.hidden_act=gelu_pytorch_tanh", "layernorm", True)]),
    # Gated MLPs (GeGLU): Gemma 1 (its config's hidden_act, transformers' GemmaConfig field), Gemma 2
    # (hidden_activation; pre_feedforward_layernorm feeds the MLP), T5 v1.1 (feed_forward_proj
    # gated-gelu: the tanh GELU; its feed-forward sub-layer's own RMSNorm), ModernBERT (one Wi).
    ("gemma", GEMMA, [one("layers.0.", "mlp.gate_proj", "mlp.down_proj", "gemma", "out_in", "tanh",
                          "config.json hidden_act=gelu_pytorch_tanh", "post_attention_layernorm", True)]),
    ("gemma2", GEMMA, [one("layers.0.", "mlp.gate_proj", "mlp.down_proj", "gemma", "out_in", "tanh",
                           "config.json hidden_activation=gelu_pytorch_tanh", "pre_feedforward_layernorm", True)]),
    ("t5", dict(T5, feed_forward_proj="gated-gelu"),
     [one(f"{part}.block.0.layer.{i}.", "DenseReluDense.wi_0", "DenseReluDense.wo", "t5", "out_in", "tanh",
          "config.json feed_forward_proj=gated-gelu (T5's gated-gelu is gelu_new)", "layer_norm", True)
      for part, i in (("decoder", 2), ("encoder", 1))]),
    ("modernbert", MODERNBERT, [one("layers.0.", "mlp.Wi", "mlp.Wo", "modernbert", "out_in", "erf",
                                    "config.json hidden_activation=gelu", "mlp_norm", True)]),
    ("whisper", dict(SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=16),  # pre-LN
     [one(f"{part}.layers.0.", "fc1", "fc2", "whisper", "out_in", "erf", "config.json activation_function=gelu", "final_layer_norm", True)
      for part in ("decoder", "encoder")]),
    ("mbart", dict(SEQ2SEQ, max_position_embeddings=16),
     [one(f"{part}.layers.0.", "fc1", "fc2", "whisper", "out_in", "erf", "config.json activation_function=gelu", "final_layer_norm", True)
      for part in ("decoder", "encoder")]),
    ("bart", dict(SEQ2SEQ, max_position_embeddings=16),  # post-LN: fc1 reads the attention's LayerNorm, also the residual
     [one("decoder.layers.0.", "fc1", "fc2", "bart", "out_in", "erf", "config.json activation_function=gelu", "encoder_attn_layer_norm", False),
      one("encoder.layers.0.", "fc1", "fc2", "bart", "out_in", "erf", "config.json activation_function=gelu", "self_attn_layer_norm", False)]),
]  # fmt: skip


@pytest.mark.parametrize("model_type,config,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_family_is_found_with_its_layout_and_gelu(tmp_path, model_type, config, expected):
    path = hf_model_dir(tmp_path / model_type, model_type, **config)
    fields = ("fc1", "fc2", "family", "weight_layout", "gelu", "gelu_source", "norm", "norm_feeds_only_mlp")
    found = [{f: getattr(layer, f) for f in fields} for layer in find_mlps(path)]
    assert found == expected
    # The layout read right: d_model is the hidden size (16), d_ff the MLP's (32 or 4 x 16).
    for layer in find_mlps(path):
        assert layer.d_model == 16 and layer.d_ff in (32, 64)
        # gated: the up projection beside the gate, or ModernBERT's Wi holding both
        if layer.family in ("gemma", "t5"):
            assert layer.gated == "separate" and layer.up == layer.fc1.replace("gate_proj", "up_proj").replace("wi_0", "wi_1")
        else:
            assert layer.gated == ("concatenated" if layer.family == "modernbert" else None) and layer.up is None


@pytest.mark.parametrize("model_type,config", [("gpt2", GPT), ("gpt_bigcode", GPT), ("vit", {**SMALL, **IMAGE}), ("whisper", dict(SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=16))])
def test_a_real_layout_quantizes_and_verifies(tmp_path, model_type, config):
    path = hf_model_dir(tmp_path / model_type, model_type, **config)
    out = quantize_checkpoint(path, options=QuantizeOptions(scheme="w8a8")).output
    assert verify_checkpoint(out, "all").passed


def test_the_conv1d_layout_is_never_assumed(tmp_path):
    """GPT-2 (Conv1D) and GPT-BigCode (nn.Linear) share their names: without config.json the
    bias length decides; where it cannot (d_ff == d_model), that is an error, not a guess."""
    gpt2 = hf_model_dir(tmp_path / "gpt2", "gpt2", **GPT)
    bigcode = hf_model_dir(tmp_path / "bigcode", "gpt_bigcode", **GPT)
    for path, layout in ((gpt2, "in_out"), (bigcode, "out_in")):
        (path / "config.json").unlink()
        layer = find_mlps(path)[0]
        assert layer.weight_layout == layout and "bias length 64" in layer.layout_source  # n_inner defaults to 4 * n_embd
    square = hf_model_dir(tmp_path / "square", "gpt2", **{**GPT, "n_inner": 16})
    (square / "config.json").unlink()
    with pytest.raises(CheckpointError, match="cannot tell GPT-2's Conv1D .* from GPT-BigCode's nn.Linear"):
        find_mlps(square)
    (square / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert find_mlps(square)[0].weight_layout == "in_out"


def test_hidden_activation_wins_over_hidden_act(tmp_path):
    """Gemma sets both: hidden_act (a legacy "gelu") and hidden_activation (what it runs)."""
    path = write_checkpoint(tmp_path / "m.safetensors", "bert",
                            config={"model_type": "bert", "hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"})  # fmt: skip
    layers = find_mlps(path)
    assert {(layer.gelu, layer.gelu_source) for layer in layers} == {("tanh", "config.json hidden_activation=gelu_pytorch_tanh")}


@pytest.mark.parametrize("model_type,config,key,act", [
    ("opt", dict(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50, word_embed_proj_dim=16,
                 max_position_embeddings=16), "activation_function", "relu"),
    ("bert", dict(SMALL, hidden_act="silu"), "hidden_act", "silu"),
    ("clip", dict(text_config=dict(SMALL, hidden_act="relu"), vision_config=dict(SMALL, **IMAGE), projection_dim=8), "text_config.hidden_act", "relu"),
])  # fmt: skip
def test_a_non_gelu_model_is_refused_with_its_activation_named(tmp_path, model_type, config, key, act):
    path = hf_model_dir(tmp_path / model_type, model_type, **config)
    with pytest.raises(CheckpointError, match=f"says {key}='{act}': not a GELU"):
        find_mlps(path)


def test_t5_runs_bf16_and_a_bfloat16_config_says_bf16(tmp_path):
    """T5 v1.1 / Flan-T5 overflow fp16: their activation dtype is bf16 (the reference path and
    the int8 rows' activations); a config whose torch_dtype is bfloat16 says bf16 for any
    family; --activation-dtype overrides both."""
    t5 = hf_model_dir(tmp_path / "t5", "t5", **dict(T5, feed_forward_proj="gated-gelu"))
    assert {(layer.activation_dtype, layer.activation_dtype_source) for layer in find_mlps(t5)} == {
        ("bf16", "T5 v1.1/Flan-T5 overflow fp16 (trained in bf16)")
    }
    assert {layer.activation_dtype for layer in find_mlps(t5, activation_dtype="fp16")} == {"fp16"}
    path = write_checkpoint(tmp_path / "m.safetensors", "bert", config={"model_type": "bert", "hidden_act": "gelu", "torch_dtype": "bfloat16"})
    assert {(layer.activation_dtype, layer.activation_dtype_source) for layer in find_mlps(path)} == {("bf16", "config.json torch_dtype=bfloat16")}
    (tmp_path / "plain").mkdir()
    plain = write_checkpoint(tmp_path / "plain" / "m.safetensors", "bert")  # no config.json
    assert {layer.activation_dtype for layer in find_mlps(plain)} == {"fp16"}
    with pytest.raises(OptionError, match="--activation-dtype must be one of fp16, bf16"):
        find_mlps(plain, activation_dtype="fp32")


def test_gemma_legacy_hidden_act_gelu_is_the_tanh_form(tmp_path):
    """Gemma 1's released configs say hidden_act "gelu"; transformers runs that as
    gelu_pytorch_tanh (GemmaConfig), and so does discovery, saying why."""
    path = hf_model_dir(tmp_path / "gemma", "gemma", **GEMMA)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    layer = find_mlps(path)[0]
    assert (layer.gelu, layer.gelu_source) == ("tanh", "config.json hidden_act=gelu (Gemma's legacy value for the tanh GELU)")


def test_plain_relu_t5_is_refused_with_its_activation_named(tmp_path):
    path = hf_model_dir(tmp_path / "t5", "t5", **T5)  # feed_forward_proj defaults to relu
    with pytest.raises(CheckpointError, match="says feed_forward_proj='relu': not a GELU"):
        find_mlps(path)
    gated_relu = hf_model_dir(tmp_path / "t5g", "t5", **dict(T5, feed_forward_proj="gated-relu"))
    with pytest.raises(CheckpointError, match="says feed_forward_proj='gated-relu': not a GELU"):
        find_mlps(gated_relu)


def test_gate_proj_names_need_a_config_that_names_a_gelu(tmp_path):
    """Llama's SwiGLU MLP has Gemma's names: its config's silu is refused, named; without a
    config.json such an MLP is not guessed to be GELU, unless --gelu says so."""
    llama = hf_model_dir(tmp_path / "llama", "llama", **dict(GEMMA, head_dim=8))
    with pytest.raises(CheckpointError, match="says hidden_act='silu': not a GELU"):
        find_mlps(llama)
    (llama / "config.json").unlink()
    with pytest.raises(CheckpointError, match="names are shared with non-GELU models.*pass --gelu"):
        find_mlps(llama)
    assert find_mlps(llama, gelu="tanh")[0].gated == "separate"


def test_timm_vit_names_and_no_activation_in_its_config(tmp_path):
    """timm's config.json names an architecture, not an activation: its nn.GELU is the exact one."""
    path = tmp_path / "timm"
    path.mkdir()
    save_file(checkpoint_tensors("vit", n_layers=2), str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architecture": "vit_small_patch16_224", "num_classes": 10}))
    layers = find_mlps(path)
    assert [(layer.fc1, layer.family, layer.gelu, layer.norm, layer.norm_feeds_only_mlp) for layer in layers] == [
        (f"blocks.{i}.mlp.fc1", "timm-vit", "erf", f"blocks.{i}.norm2", True) for i in (0, 1)
    ]
    assert layers[0].gelu_source == "timm ViT/CLIP/SigLIP/Phi-1/1.5/2 default (config.json does not say)"
