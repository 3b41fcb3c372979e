"""`gelugemm eval`: the model's output with its MLPs quantized, against the original.

On tiny random models saved with `save_pretrained` (tests/hf_models.py), quantized by
`quantize_checkpoint` (the source recorded, so eval finds the model by itself): an encoder
reports embedding cosine and hidden-state error, a causal LM agreement, KL and both
perplexities, a ViT the hidden-state error on images. A tampered scale fails the gate
(exit 1); every bad input is one line and exit 2. The real all-MiniLM-L6-v2 numbers are
in test_minilm_e2e.py.
"""

from __future__ import annotations

import json
import shutil
import math
import traceback
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from calibration.evaluate import DEFAULT_LIMITS, evaluate_quantized, pool
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from gelugemm_cli.app import app
from hf_models import build, write_images, write_lines

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("wide_consoles")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    """Model directories, inputs, and each model quantized to w8a16 beside its checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    found = {"text": write_lines(root / "text.txt"), "images": write_images(root / "images")}
    for kind in ("bert", "gpt2", "vit"):
        model_dir = build(kind, root / kind)
        found[kind] = model_dir
        quantize_checkpoint(model_dir / "model.safetensors", root / f"{kind}.int8.safetensors", QuantizeOptions(scheme="w8a16"))
        found[f"{kind}.int8"] = root / f"{kind}.int8.safetensors"
    return found


def eval_cli(tmp_path, *args) -> tuple[int, dict | None, str]:
    """(exit code, the JSON report or None, the printed output)."""
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", *map(str, args), "--json", str(out)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError("".join(traceback.format_exception(result.exception)) + result.output)
    return result.exit_code, json.loads(out.read_text()) if out.exists() else None, result.output


def tampered(path: Path, tensor: str, factor: float, out: Path) -> Path:
    """A copy of a quantized file with one scale tensor multiplied by `factor`, metadata kept."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        metadata = f.metadata()
    tensors[tensor] = tensors[tensor] * factor
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_encoder_reports_embedding_cosine_and_hidden_error_and_passes(setup, tmp_path):
    code, report, output = eval_cli(tmp_path, setup["bert.int8"], "--text", setup["text"], "--device", "cpu")
    assert code == 0, output
    m = report["metrics"]
    assert report["kind"] == "encoder" and report["scheme"] == "w8a16:group:128" and report["mlps"] == 2
    assert report["model"] == str(setup["bert"]) and report["model_from"] == "the source recorded in the quantized file"
    assert 0.99 < m["embedding_cosine_min"] <= m["embedding_cosine_mean"] < 1  # quantized: close, not equal
    assert 0 < m["hidden_rel_error"] <= m["hidden_rel_error_max"] < 0.1
    assert report["gate"] == {
        "metric": "embedding_cosine_min", "how": "min", "limit": DEFAULT_LIMITS["embedding_cosine_min"]["w8a16:group:128"],
        "origin": "default", "value": m["embedding_cosine_min"], "passed": True,
    }  # fmt: skip
    assert report["pooling"] == ["mean_tokens"] and report["passed"] is True
    assert report["seams"][0] == {"mlp": "encoder.layer.0.intermediate.dense", "module": "encoder.layer.0.intermediate", "identities": ["encoder.layer.0.output.dense"]}
    assert "PASS" in output and "sentence embedding cosine" in output


def test_a_tampered_scale_fails_the_gate(setup, tmp_path):
    bad = tampered(setup["bert.int8"], "encoder.layer.1.intermediate.dense.weight_scale", 4.0, tmp_path / "bad.safetensors")
    code, report, output = eval_cli(tmp_path, bad, "--model", setup["bert"], "--text", setup["text"])
    assert code == 1 and report["passed"] is False and "FAIL" in output
    assert report["metrics"]["embedding_cosine_min"] < DEFAULT_LIMITS["embedding_cosine_min"]["w8a16:group:128"]
    # The same file passes a limit the user loosens to what it measured.
    loose = report["metrics"]["embedding_cosine_min"] - 1e-3
    code, report, _ = eval_cli(tmp_path, bad, "--model", setup["bert"], "--text", setup["text"], "--tol", f"{loose}")
    assert code == 0 and report["gate"]["origin"] == "asked"


def test_causal_lm_reports_agreement_kl_and_perplexities(setup, tmp_path):
    code, report, output = eval_cli(tmp_path, setup["gpt2.int8"], "--text", setup["text"], "--batch-size", "5")
    assert code == 0, output
    m = report["metrics"]
    assert report["kind"] == "causal-lm" and report["gate"]["metric"] == "kl_mean"
    assert 0.5 <= m["top1_agreement"] <= 1 and 0 < m["kl_mean"] <= m["kl_max"]
    assert m["tokens"] == sum(len(line.split()) for line in setup["text"].read_text().splitlines())  # no BOS/EOS added
    assert m["next_tokens"] == m["tokens"] - len(setup["text"].read_text().splitlines())
    assert math.isfinite(m["perplexity_original"]) and math.isfinite(m["perplexity_quantized"])
    assert m["perplexity_original"] != m["perplexity_quantized"]
    # A scale x4 on GPT-2's Conv1D MLP moves the distribution far past the gate.
    bad = tampered(setup["gpt2.int8"], "transformer.h.0.mlp.c_fc.weight_scale", 4.0, tmp_path / "bad.safetensors")
    code, report, _ = eval_cli(tmp_path, bad, "--text", setup["text"], "--model", setup["gpt2"])
    assert code == 1 and report["metrics"]["kl_mean"] > DEFAULT_LIMITS["kl_mean"]["w8a16:group:128"]


def test_perplexity_is_the_models_own_loss(setup):
    # Independent: transformers' own loss (mean NLL of the next token), one line at a time.
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(setup["gpt2"], local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(setup["gpt2"], local_files_only=True)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for line in setup["text"].read_text().splitlines():
            ids = tokenizer([line], return_tensors="pt")["input_ids"]
            if ids.shape[1] > 1:
                nll += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
                count += ids.shape[1] - 1
    report = evaluate_quantized(setup["gpt2.int8"], text=setup["text"], device="cpu", batch_size=4)
    assert report.metrics["perplexity_original"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_vision_model_reports_hidden_error_on_images(setup, tmp_path):
    code, report, output = eval_cli(tmp_path, setup["vit.int8"], "--images", setup["images"])
    assert code == 0, output
    assert report["kind"] == "vision" and report["gate"]["metric"] == "hidden_rel_error"
    assert 0 < report["metrics"]["hidden_rel_error"] < DEFAULT_LIMITS["hidden_rel_error"]["w8a16:group:128"]
    assert report["inputs"] == [{"kind": "images", "path": str(setup["images"].resolve()), "images": 5}]


def test_pooling_follows_the_sentence_transformers_config(setup, tmp_path):
    hidden = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    mean = torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)])
    assert torch.allclose(pool(hidden, mask, ["mean_tokens"]), mean)
    assert torch.equal(pool(hidden, mask, ["cls_token"]), hidden[:, 0])
    assert torch.equal(pool(hidden, mask, ["lasttoken"]), torch.stack([hidden[0, 2], hidden[1, 1]]))
    assert torch.equal(pool(hidden, mask, ["max_tokens"]), torch.stack([hidden[0, :3].max(0).values, hidden[1, :2].max(0).values]))
    assert pool(hidden, mask, ["cls_token", "mean_tokens"]).shape == (2, 6)
    # A sentence-transformers directory's own Pooling config is what eval uses.
    pooled = tmp_path / "bert"
    import shutil

    shutil.copytree(setup["bert"], pooled)
    (pooled / "1_Pooling").mkdir()
    (pooled / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    report = evaluate_quantized(setup["bert.int8"], model_dir=pooled, text=setup["text"], device="cpu")
    assert report.pooling == ["cls_token"]


def test_bad_input_is_one_line_and_exit_2(setup, tmp_path):
    # quantized from a lone file whose directory is not the model (config.json beside it, no model.safetensors)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(setup["bert"] / "config.json", lone / "config.json")
    shutil.copy(setup["bert"] / "model.safetensors", lone / "weights.safetensors")
    lone_int8 = tmp_path / "lone.int8.safetensors"
    quantize_checkpoint(lone / "weights.safetensors", lone_int8, QuantizeOptions(scheme="w8a16"))
    cases = [
        ((setup["bert.int8"],), "--text FILE"),
        ((setup["bert.int8"], "--text", tmp_path / "missing.txt"), "no such file"),
        ((setup["bert.int8"], "--text", setup["text"], "--tol", "-1"), "--tol must be a positive finite number"),
        ((setup["bert"] / "model.safetensors", "--text", setup["text"]), "not written by gelugemm quantize"),
        ((setup["bert.int8"], "--text", setup["text"], "--model", setup["gpt2"]), "names no module"),
        ((setup["vit.int8"], "--text", setup["text"]), "vision model; it takes images"),
        ((setup["bert.int8"], "--text", setup["text"], "--model", tmp_path), "no config.json"),
        ((setup["bert.int8"], "--text", tmp_path), "--text " + str(tmp_path) + ": a directory"),
        ((lone_int8, "--text", setup["text"]), "is a safetensors file, not a model directory transformers can run; pass --model"),
    ]
    for args, message in cases:
        code, report, output = eval_cli(tmp_path, *args)
        assert code == 2 and message in output and "Traceback" not in output, (args, output)
        assert len(output.strip().splitlines()) == 1 and report is None


def test_a_moved_source_is_found_or_named(setup, tmp_path):
    # The recorded source gone: eval says to pass --model, exit 2.
    moved = tmp_path / "moved"
    import shutil

    shutil.copytree(setup["bert"], moved)
    quantize_checkpoint(moved / "model.safetensors", tmp_path / "q.safetensors", QuantizeOptions(scheme="w8a16"))
    shutil.rmtree(moved)
    code, _, output = eval_cli(tmp_path, tmp_path / "q.safetensors", "--text", setup["text"])
    assert code == 2 and "pass --model MODEL_DIR" in output
    code, report, _ = eval_cli(tmp_path, tmp_path / "q.safetensors", "--text", setup["text"], "--model", setup["bert"])
    assert code == 0 and report["model_from"] == "--model"


def test_clip_reads_text_with_one_tower_and_images_with_the_other(tmp_path):
    from calibration.capture import calibrate_model
    from calibration.checkpoint import find_mlps

    model_dir = build("clip", tmp_path / "clip")
    text, images = write_lines(tmp_path / "text.txt"), write_images(tmp_path / "images")
    layers = [layer.fc1 for layer in find_mlps(model_dir / "model.safetensors")]
    text_only = calibrate_model(model_dir, tmp_path / "text.safetensors", text=text, device="cpu")
    assert [l.fc1 for l in text_only.layers] == [p for p in layers if p.startswith("text_model.")]
    assert text_only.not_reached == [p for p in layers if p.startswith("vision_model.")]
    assert any("need images (--images DIR)" in note for note in text_only.notes)
    both = calibrate_model(model_dir, tmp_path / "calib.safetensors", text=text, images=images, device="cpu")
    assert [(l.fc1, l.source, l.rows) for l in both.layers] == [
        (p, "text" if p.startswith("text_model.") else "images", 137 if p.startswith("text_model.") else 5 * 17) for p in layers
    ]  # 137 tokens in the lines ([CLS] and [SEP] each), 16 patches and the class token per image
    quantize_checkpoint(model_dir / "model.safetensors", tmp_path / "q.safetensors", QuantizeOptions(scheme="w8a8", activations="static", calib=tmp_path / "calib.safetensors"))
    code, report, output = eval_cli(tmp_path, tmp_path / "q.safetensors", "--text", text, "--images", images)
    assert code == 0, output
    m = report["metrics"]
    assert report["kind"] == "dual" and 0 < m["text_hidden_rel_error"] and 0 < m["image_hidden_rel_error"]
    assert m["hidden_rel_error"] == max(m["text_hidden_rel_error"], m["image_hidden_rel_error"])  # the gate takes the worse
