"""`gelugemm calibrate`: what each MLP of a real transformers model reads, keyed as quantize names it.

On tiny random models saved with `save_pretrained` (tests/hf_models.py): the file holds one
tensor per MLP quantize finds, under its fc1 prefix, [real tokens, d_model], rows in line
order, equal to what the MLP reads when each line runs alone without padding (hooks of
the test's own on the model's modules); images through the model's image processor;
`--max-tokens`; the file feeds `quantize --calib`; bad input is one red line and exit 2.
The real all-MiniLM-L6-v2 is checked against an independent float64 BERT in test_minilm_e2e.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from calibration.capture import FORMAT, RECORD_KEY, calibrate_model
from calibration.checkpoint import find_mlps
from calibration.data import split_rows
from calibration.errors import CheckpointError, ModelError, OptionError
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from gelugemm_cli.app import app
from hf_models import LINES, build, write_images, write_lines

runner = CliRunner()
# Batched with padding (SDPA with a mask) against one line alone: float32 summation order.
TOL_BATCHED_VS_ALONE = 1e-5


pytestmark = pytest.mark.usefixtures("wide_consoles")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    found = {kind: build(kind, root / kind) for kind in ("bert", "gpt2", "gpt-neox", "vit")}
    found["text"] = write_lines(root / "text.txt")
    found["images"] = write_images(root / "images")
    return found


def alone(model_dir: Path, kind: str, items: list) -> dict[str, torch.Tensor]:
    """Each MLP's input with every line (or image) run by itself, no padding, hooks of our own."""
    import transformers

    auto = transformers.AutoModelForCausalLM if kind in ("gpt2", "gpt-neox") else transformers.AutoModel
    model = auto.from_pretrained(model_dir, local_files_only=True).eval()
    fc1 = {"bert": "intermediate.dense", "gpt2": "mlp.c_fc", "gpt-neox": "mlp.dense_h_to_4h", "vit": "mlp.fc1"}[kind]
    rows: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if name.endswith(fc1):
            module.register_forward_pre_hook(lambda m, args, name=name: rows.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.inference_mode():
        if kind == "vit":
            processor = transformers.AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
            from PIL import Image

            for path in items:
                model(pixel_values=processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")["pixel_values"])
        else:
            tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            for line in items:
                model(**tokenizer([line], return_tensors="pt"))
    return {name: torch.cat(parts) for name, parts in rows.items()}


@pytest.mark.parametrize("kind", ["bert", "gpt2", "gpt-neox", "vit"])
def test_calibrate_writes_what_each_mlp_reads_under_its_checkpoint_prefix(models, kind, tmp_path):
    model_dir = models[kind]
    out = tmp_path / "calib.safetensors"
    inputs = {"images": models["images"]} if kind == "vit" else {"text": models["text"]}
    report = calibrate_model(model_dir, out, batch_size=5, device="cpu", **inputs)  # batches of 5: padding in every batch

    layers = find_mlps(model_dir / "model.safetensors")
    tensors = load_file(str(out))
    assert list(tensors) == [layer.fc1 for layer in layers]  # quantize's names, in layer order
    items = sorted(models["images"].iterdir()) if kind == "vit" else LINES
    expected = alone(model_dir, kind, items)
    assert len(expected) == len(layers)
    for layer, (module, rows) in zip(layers, expected.items()):
        x = tensors[layer.fc1]
        assert x.dtype == torch.float32 and x.shape == (rows.shape[0], layer.d_model)  # padding excluded
        assert (x - rows).abs().max() <= TOL_BATCHED_VS_ALONE * rows.abs().max()  # in line order
    assert [(l.fc1, l.rows, l.d_model) for l in report.layers] == [(l.fc1, x.shape[0], l.d_model) for l, x in zip(layers, tensors.values())]

    with safe_open(str(out), framework="pt") as f:
        record = json.loads(f.metadata()[RECORD_KEY])
    assert record["format"] == FORMAT and record["dtype"] == "float32"
    source = "images" if kind == "vit" else "text"
    rows = tensors[layers[0].fc1].shape[0]
    assert record["held_out"][source]["first_held_out_row"] == split_rows(rows, "verify")[0]
    assert record["inputs"][0]["used"] == len(items)


def test_the_held_out_quarter_is_the_last_lines(models, tmp_path):
    out = tmp_path / "calib.safetensors"
    report = calibrate_model(models["bert"], out, text=models["text"], device="cpu")
    held = report.held_out["text"]
    # Rows per line are its tokens: [CLS] + words + [SEP]; the first line wholly past the cut.
    counts = [len(line.split()) + 2 for line in LINES]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    first = next(i for i, s in enumerate(starts) if s >= held["first_held_out_row"])
    assert held["rows"] == sum(counts) and held["first_whole_input"] == f"line {first + 1}"


def test_max_tokens_keeps_the_first_rows(models, tmp_path):
    full, cut = tmp_path / "full.safetensors", tmp_path / "cut.safetensors"
    calibrate_model(models["gpt2"], full, text=models["text"], device="cpu", batch_size=2)
    report = calibrate_model(models["gpt2"], cut, text=models["text"], device="cpu", batch_size=2, max_tokens=30)
    a, b = load_file(str(full)), load_file(str(cut))
    for key in a:
        assert b[key].shape[0] == 30 and torch.equal(b[key], a[key][:30])
    assert report.inputs[0]["used"] < len(LINES)


def test_the_file_feeds_quantize(models, tmp_path):
    calib = tmp_path / "calib.safetensors"
    calibrate_model(models["gpt-neox"], calib, text=models["text"], device="cpu")
    output = tmp_path / "model.int8.safetensors"
    report = quantize_checkpoint(models["gpt-neox"] / "model.safetensors", output, QuantizeOptions(scheme="w8a8", activations="static", calib=calib))
    assert report.calibration["kind"] == "file" and all(layer.fc1.input_scale > 0 for layer in report.layers)


def test_calibrate_errors(models, tmp_path):
    out = tmp_path / "calib.safetensors"
    with pytest.raises(OptionError, match="--text FILE"):
        calibrate_model(models["bert"], out)
    with pytest.raises(OptionError, match="no such file"):
        calibrate_model(models["bert"], out, text=tmp_path / "missing.txt")
    with pytest.raises(ModelError, match="no config.json"):
        calibrate_model(tmp_path, out, text=models["text"])
    with pytest.raises(ModelError, match="is an encoder model; it takes text"):
        calibrate_model(models["bert"], out, images=models["images"])
    no_processor = shutil.copytree(models["vit"], tmp_path / "vit")
    (no_processor / "preprocessor_config.json").unlink()
    with pytest.raises(ModelError, match="no preprocessor_config.json"):
        calibrate_model(no_processor, out, images=models["images"])
    with pytest.raises(ModelError, match="takes images"):
        calibrate_model(models["vit"], out, text=models["text"])
    with pytest.raises(OptionError, match="--max-tokens"):
        calibrate_model(models["bert"], out, text=models["text"], max_tokens=1)
    out.write_text("mine")
    with pytest.raises(CheckpointError, match="--force"):
        calibrate_model(models["bert"], out, text=models["text"])
    assert out.read_text() == "mine"  # nothing the user had is touched


def calibrate_cli(*args):
    return runner.invoke(app, ["calibrate", *map(str, args)])


def test_cli_writes_json_and_a_table(models, tmp_path):
    out = tmp_path / "calib.safetensors"
    result = calibrate_cli(models["bert"], "--text", models["text"], "-o", out, "--device", "cpu", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["output"] == str(out) and [l["fc1"] for l in report["layers"]] == list(load_file(str(out)))
    result = calibrate_cli(models["bert"], "--text", models["text"], "-o", tmp_path / "again.safetensors")
    assert result.exit_code == 0 and "encoder.layer.1.intermediate.dense" in result.stdout and "held out" in result.stdout


def test_cli_bad_input_is_one_line_and_exit_2(models, tmp_path, monkeypatch):
    out = tmp_path / "calib.safetensors"
    result = calibrate_cli(models["bert"], "-o", out)
    assert result.exit_code == 2 and "--text FILE" in result.output and "Traceback" not in result.output
    # Without the extra: one line saying what to install.
    monkeypatch.setitem(sys.modules, "transformers", None)
    result = calibrate_cli(models["bert"], "--text", models["text"], "-o", out)
    assert result.exit_code == 2 and "pip install 'gelugemm[hf]'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
