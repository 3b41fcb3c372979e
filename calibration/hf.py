"""Local Hugging Face model directories, run with transformers (the optional extra `hf`).

    hf = load_model("path/to/all-MiniLM-L6-v2", device="cpu")
    hf.kind              # "encoder", "causal-lm", "seq2seq", "vision" or "dual" (CLIP: text and vision towers)
    hf.layers            # the checkpoint's MLPs, as quantize finds them (`find_mlps`)
    hf.fc1_modules()     # {fc1 prefix: the model's own fc1 module}
    for batch in text_batches(hf, read_lines("text.txt"), batch_size=32):
        out = hf.forward(batch)          # last hidden states, or logits for a causal LM

Nothing is fetched from a hub: every file is read from the directory (`local_files_only`,
HF_HUB_OFFLINE set before transformers is imported). transformers, and pillow for images,
are imported inside the functions that need them: gelugemm's core installs without them,
and a missing one is one line saying what to install.

The model runs in float32 in eval mode: calibration rows and eval's reference are the
model's full-precision behaviour.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from calibration.checkpoint import MLPLayer, find_mlps, open_checkpoint
from calibration.devices import resolve_device
from calibration.errors import ModelError, OptionError
from calibration.model import SwapError, module_path

HF_EXTRA = "pip install 'gelugemm[hf]'"
KINDS = ("encoder", "causal-lm", "seq2seq", "vision", "dual")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Weights a base model class may lack in a checkpoint saved from a head class (ViTModel's
# pooler from ViTForImageClassification): initialised at random by transformers, unused here.
_UNUSED_IF_MISSING = re.compile(r"(^|\.)pooler\.")


def transformers_module():
    """transformers, imported offline and quiet; ModelError naming the extra when it is missing."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError:
        raise ModelError(f"this command runs the model with transformers, which is not installed: {HF_EXTRA}") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def checkpoint_of(model_dir: Path) -> Path:
    """What `find_mlps` reads for a model directory: its model.safetensors, else the directory."""
    single = model_dir / "model.safetensors"
    return single if single.is_file() else model_dir


def _check_directory(model_dir: Path) -> None:
    if not model_dir.exists():
        raise ModelError(f"{model_dir}: no such directory")
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a directory; pass the model directory (config.json, weights, tokenizer)")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: no config.json; transformers needs the model directory it was saved to")


def _is_causal(config, transformers) -> bool:
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", "")
    return model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _dtype_argument(transformers) -> str:
    """from_pretrained's dtype keyword: `dtype` since transformers 4.56, `torch_dtype` before."""
    major, minor = (int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


@dataclass
class Batch:
    """One forward's inputs: `inputs` for the model, `mask` [B, T] bool of real tokens (None
    for images: every patch is real), `items` the indices of the lines or images in it."""

    source: str  # "text" or "images"
    inputs: dict[str, torch.Tensor]
    mask: torch.Tensor | None
    items: list[int]
    truncated: int = 0  # lines cut at max_length


@dataclass
class HFModel:
    directory: Path
    model: nn.Module
    config: object
    kind: str
    device: torch.device
    layers: list[MLPLayer]  # the checkpoint's MLPs (find_mlps)
    linears: dict[str, tuple[str, str, str | None]]  # fc1 prefix -> (fc1, fc2, a gated MLP's up module paths in `model`)
    notes: list[str] = field(default_factory=list)

    def fc1_modules(self) -> dict[str, nn.Module]:
        return {prefix: self.model.get_submodule(fc1) for prefix, (fc1, *_) in self.linears.items()}

    def tower(self, source: str) -> nn.Module:
        """The module a batch of this source ("text" or "images") runs through; ModelError where
        the model takes no such input."""
        model = self.model
        if source == "images":
            if self.kind == "dual":
                return model.vision_model
            if self.kind != "vision":
                raise ModelError(f"{self.directory} is {_a(self.kind)} model; it takes text (--text), not images")
            return model
        if self.kind == "vision":
            raise ModelError(f"{self.directory} is a vision model; it takes images (--images DIR), not text")
        if self.kind == "dual":
            return model.text_model
        if self.kind == "seq2seq":
            return model.get_encoder()
        return model

    @torch.inference_mode()
    def forward(self, batch: Batch, *, logits: bool = True) -> torch.Tensor:
        """The model's output on a batch: logits [B, T, vocab] for a causal LM (with `logits`),
        else the last hidden states [B, T, d]. A causal LM without `logits` runs its base model
        only (every MLP, no LM head)."""
        tower = self.tower(batch.source)
        if self.kind == "causal-lm" and not logits:
            tower = self.model.base_model
        accepted = inspect.signature(tower.forward).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        inputs = {k: v for k, v in batch.inputs.items() if takes_any or k in accepted}
        out = tower(**inputs)
        if self.kind == "causal-lm" and logits:
            return out.logits
        return out.last_hidden_state


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def model_kind(model: nn.Module, causal: bool, config) -> str:
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if causal:
        return "causal-lm"
    if hasattr(model, "text_model") and hasattr(model, "vision_model"):
        return "dual"
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        return "vision"
    return "encoder"


def load_model(model_dir: str | Path, device: str | torch.device | None = None, *, layers: str | None = None) -> HFModel:
    """The model in `model_dir` (a directory `save_pretrained` wrote), float32, eval mode, on
    `device` (default: CUDA when there is one), with its checkpoint's MLPs found by quantize's
    rules and matched to the model's modules. `layers`: a regex on fc1/fc2 prefixes, as quantize's."""
    model_dir = Path(model_dir)
    _check_directory(model_dir)
    device = resolve_device(device)
    found = find_mlps(checkpoint_of(model_dir), layers=layers)
    transformers = transformers_module()
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        causal = _is_causal(config, transformers)
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model, info = auto.from_pretrained(
            model_dir, local_files_only=True, output_loading_info=True, **{_dtype_argument(transformers): torch.float32}
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir}: transformers cannot load this model: {str(exc).splitlines()[0]}") from None
    notes = []
    missing = sorted(info.get("missing_keys") or [])
    unused = [k for k in missing if _UNUSED_IF_MISSING.search(k)]
    missing = [k for k in missing if k not in unused]
    if missing or info.get("mismatched_keys"):
        what = missing or [str(k) for k in info["mismatched_keys"]]
        raise ModelError(
            f"{model_dir}: the checkpoint lacks or mis-sizes {len(what)} weight(s) {type(model).__name__} needs "
            f"(e.g. {', '.join(what[:3])}); transformers would fill them at random"
        )
    if unused:
        notes.append(f"{len(unused)} weight(s) of {type(model).__name__} not in the checkpoint and not used here: {', '.join(unused[:3])}")
    model = model.to(device).eval()
    linears = linear_paths(model, found, model_dir)
    return HFModel(model_dir, model, config, model_kind(model, causal, config), device, found, linears, notes)


def _stored_rows(model_dir: Path, name: str) -> tuple[tuple[int, ...], torch.Tensor]:
    """(shape, first and last rows) of a checkpoint tensor, read lazily (one file, or the
    shard a model.safetensors.index.json names)."""
    single = model_dir / "model.safetensors"
    path = single
    if not single.is_file():
        index = model_dir / "model.safetensors.index.json"
        try:
            path = model_dir / json.loads(index.read_text())["weight_map"][name]
        except (OSError, KeyError, TypeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise ModelError(f"{model_dir}: cannot find the shard holding {name} ({exc})") from None
    with open_checkpoint(path) as handle:
        sl = handle.get_slice(name)
        shape = tuple(sl.get_shape())
        return shape, torch.cat([sl[0:1], sl[shape[0] - 1 : shape[0]]]).to(torch.float32)


def _by_weights(model: nn.Module, model_dir: Path, name: str) -> str:
    """The module whose `weight` holds the checkpoint tensor `name` (same or transposed layout)."""
    shape, rows = _stored_rows(model_dir, name)
    found = []
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        w = weight.detach()
        if tuple(w.shape) == shape:
            got = torch.cat([w[0:1], w[-1:]])
        elif tuple(w.shape[::-1]) == shape:
            got = torch.stack([w[:, 0], w[:, -1]])  # the stored tensor's first and last rows
        else:
            continue
        if torch.equal(got.to("cpu", torch.float32), rows):
            found.append(path)
    if len(found) != 1:
        what = "no module" if not found else f"{len(found)} modules ({', '.join(found[:3])})"
        raise ModelError(f"{model_dir}: {name} is not a module name of {type(model).__name__}, and {what} of it holds that weight")
    return found[0]


def linear_paths(model: nn.Module, layers: list[MLPLayer], model_dir: Path) -> dict[str, tuple[str, str, str | None]]:
    """{fc1 prefix: (fc1 module path, fc2 module path, a gated MLP's up module path or None)}
    in `model`: the checkpoint's own names (with the base-model prefix added or removed),
    else the module holding the same weight, for model classes that rename their
    checkpoint's tensors on load (transformers 5's ViT)."""
    modules = dict(model.named_modules())
    found = {}
    for layer in layers:
        paths = []
        for prefix, weight in ((layer.fc1, layer.w1), (layer.fc2, layer.w2), (layer.up, layer.w_up)):
            if prefix is None:
                paths.append(None)
                continue
            try:
                paths.append(module_path(model, prefix, modules))
            except SwapError:
                paths.append(_by_weights(model, model_dir, weight))
        found[layer.fc1] = (paths[0], paths[1], paths[2])
    return found


# ---- text ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lines:
    """A text file's non-empty lines, each one sample, with their 1-based line numbers."""

    path: Path
    texts: list[str]
    numbers: list[int]


def read_lines(path: str | Path) -> Lines:
    path = Path(path)
    if not path.is_file():
        what = "no such file" if not path.exists() else "a directory" if path.is_dir() else "not a regular file"
        raise OptionError(f"--text {path}: {what}; give a text file, one sample per line")
    try:
        raw = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise OptionError(f"--text {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    kept = [(i + 1, line.strip()) for i, line in enumerate(raw) if line.strip()]
    if not kept:
        raise OptionError(f"--text {path}: no non-empty line")
    return Lines(path, [t for _, t in kept], [n for n, _ in kept])


def sentence_transformers_config(model_dir: Path) -> dict:
    """sentence_bert_config.json (max_seq_length, ...) where the directory has one, else {}."""
    path = model_dir / "sentence_bert_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        raise ModelError(f"{path}: not valid JSON ({exc})") from None


def load_tokenizer(hf: HFModel):
    """The model's own tokenizer, padding on the right (position ids start at 0 on every row)."""
    transformers = transformers_module()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(hf.directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{hf.directory}: no tokenizer transformers can load ({str(exc).splitlines()[0]}); text needs the model's tokenizer files") from None
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        # Padding is masked out of the model and of every result; any token id will do.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def default_max_length(hf: HFModel, tokenizer) -> int:
    """sentence-transformers' max_seq_length where given (what it embeds with), else the smaller
    of the tokenizer's model_max_length and the model's position limit."""
    st = sentence_transformers_config(hf.directory).get("max_seq_length")
    if isinstance(st, int) and st > 0:
        return st
    limits = [tokenizer.model_max_length] if 0 < tokenizer.model_max_length < 1e9 else []
    text_config = getattr(hf.config, "text_config", None) or hf.config
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    return min(limits) if limits else 512


def text_batches(hf: HFModel, lines: Lines, *, batch_size: int, max_length: int, tokenizer=None) -> Iterator[Batch]:
    """The lines in order, `batch_size` at a time, tokenized by the model's tokenizer, padded
    to the longest line of the batch, truncated at max_length."""
    tokenizer = tokenizer or load_tokenizer(hf)
    for start in range(0, len(lines.texts), batch_size):
        texts = lines.texts[start : start + batch_size]
        full = tokenizer(texts, padding=True, return_tensors="pt")
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        truncated = int((full["attention_mask"].sum(1) > encoded["attention_mask"].sum(1)).sum())
        mask = encoded["attention_mask"].bool().to(hf.device)
        inputs = {k: v.to(hf.device) for k, v in encoded.items()}
        yield Batch("text", inputs, mask, list(range(start, start + len(texts))), truncated)


# ---- images --------------------------------------------------------------------------------


def image_files(directory: str | Path) -> list[Path]:
    """The images in a folder (not its sub-folders), sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise OptionError(f"--images {directory}: not a directory")
    found = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        raise OptionError(f"--images {directory}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return found


def load_image_processor(hf: HFModel):
    """The model's own image processor, from preprocessor_config.json in its directory."""
    if not (hf.directory / "preprocessor_config.json").is_file():
        raise ModelError(
            f"{hf.directory} has no preprocessor_config.json: images go through the model's own image processor, "
            "saved beside the model"
        )
    transformers = transformers_module()
    try:
        return transformers.AutoImageProcessor.from_pretrained(hf.directory, local_files_only=True)
    except ImportError as exc:
        raise ModelError(f"the image processor needs a package that is missing ({exc}); {HF_EXTRA}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{hf.directory}: transformers cannot load its image processor: {str(exc).splitlines()[0]}") from None


def image_batches(hf: HFModel, paths: list[Path], *, batch_size: int, processor=None) -> Iterator[Batch]:
    """The images in order, `batch_size` at a time, as the model's processor prepares them."""
    processor = processor or load_image_processor(hf)
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise ModelError(f"reading images needs pillow: {HF_EXTRA}") from None
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise OptionError(f"--images: cannot read {path}: {exc}") from None
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(hf.device, torch.float32)
        yield Batch("images", {"pixel_values": pixels}, None, list(range(start, start + len(images))))


def real_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[real tokens, d] of an activation [B, T, d] (or [B*T, d]) given the batch's token mask."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if x.shape[:-1] == mask.shape:
        return x[mask]
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return x[mask.reshape(-1)]
    raise ModelError(f"an MLP read a tensor of shape {list(x.shape)}, which does not line up with the batch's tokens {list(mask.shape)}")

