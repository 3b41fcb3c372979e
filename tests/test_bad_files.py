"""Bad input is one line, exit 2, and leaves every file as it was: JSON the parser cannot take
(nested too deep, an integer past Python's digit limit) wherever a file's JSON is read, MLP
weights with a dimension of size 0, integer or bool biases, an index that lists no tensors,
a gelugemm record whose fields were edited, and a --granularity group too large to run.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calibration.errors import CheckpointError
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from calibration.quantized_file import RECORD_KEY, read_quantized, sha256_file
from checkpoints import FAMILIES, checkpoint_tensors, write_checkpoint, write_sharded
from cli_helpers import invoke, one_line_error
from gelugemm_cli import common

BERT = FAMILIES["bert"]
DEEP = "[" * 100_000 + "]" * 100_000
LONG_INT = "9" * 5000


pytestmark = pytest.mark.usefixtures("wide_consoles")


def snapshot(folder: Path) -> dict:
    """Every file under `folder` and its sha256: nothing changed, nothing left behind."""
    return {p.relative_to(folder): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(folder: Path, *args) -> str:
    """Run the command; it is refused with one line and every file in `folder` is unchanged."""
    before = snapshot(folder)
    line = one_line_error(invoke(*args))
    assert snapshot(folder) == before, args
    return line


# ---- 1. JSON the parser cannot take ---------------------------------------------------------------


def test_a_safetensors_header_nested_too_deep_is_one_line(tmp_path):
    header = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    for command in ("quantize", "inspect", "verify"):
        line = refused(tmp_path, command, path)
        assert "x.safetensors" in line and "nested too deeply" in line, line


def test_a_safetensors_header_with_a_huge_integer_is_one_line(tmp_path):
    header = b'{"a": {"dtype": "F32", "shape": [' + LONG_INT.encode() + b'], "data_offsets": [0, 0]}}'
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    line = refused(tmp_path, "quantize", path)
    assert "x.safetensors" in line and "5000 digits" in line, line


@pytest.mark.parametrize("content, words", [
    (DEEP, "nested too deeply"),
    ('{"hidden_size": ' + LONG_INT + "}", "5000 digits"),
])  # fmt: skip
def test_a_config_json_the_parser_cannot_take_is_one_line(tmp_path, content, words):
    path = write_checkpoint(tmp_path / "model.safetensors", "bert")
    (tmp_path / "config.json").write_text(content)
    for command in ("quantize", "inspect", "verify"):
        line = refused(tmp_path, command, path)
        assert "config.json" in line and words in line, line


@pytest.mark.parametrize("make", ["symlink loop", "directory"])
def test_a_config_json_that_cannot_be_read_is_one_line_not_a_missing_file(tmp_path, make):
    """It used to be taken as absent: the family's default GELU, and "config.json does not say"."""
    path = write_checkpoint(tmp_path / "model.safetensors", "bert", config=None)
    config = tmp_path / "config.json"
    config.symlink_to(config) if make == "symlink loop" else config.mkdir()
    for command in ("quantize", "inspect", "verify"):
        line = refused(tmp_path, command, path)
        assert "config.json: cannot read" in line, line


@pytest.mark.parametrize("content, words", [
    (DEEP, "nested too deeply"),
    ('{"hidden_size": ' + LONG_INT + "}", "5000 digits"),
    ('{"metadata": {"total_size": ' + "1" * 5000 + '}, "weight_map": {}}', "5000 digits"),
])  # fmt: skip
def test_an_index_the_parser_cannot_take_is_one_line(tmp_path, content, words):
    model = write_sharded(tmp_path / "model", checkpoint_tensors("bert"), 2)
    (model / "model.safetensors.index.json").write_text(content)
    for command in ("quantize", "inspect"):
        line = refused(tmp_path, command, model)
        assert "model.safetensors.index.json" in line and words in line, line


# ---- 2, 3. MLP tensors discovery refuses -----------------------------------------------------------


def test_a_weight_with_a_dimension_of_size_0_is_refused_at_discovery(tmp_path):
    tensors = checkpoint_tensors("bert", d_model=16, d_ff=48, dtype=torch.float16)
    fc1, fc2 = BERT.fc1_prefix(0), BERT.fc2_prefix(0)
    tensors[f"{fc1}.weight"] = torch.zeros(0, 16, dtype=torch.float16)
    tensors[f"{fc1}.bias"] = torch.zeros(0, dtype=torch.float16)
    tensors[f"{fc2}.weight"] = torch.zeros(16, 0, dtype=torch.float16)
    path = write_checkpoint(tmp_path / "x.safetensors", tensors=tensors)
    for command in ("quantize", "verify", "inspect"):
        line = refused(tmp_path, command, path)
        assert f"{fc1}.weight has shape [0, 16]" in line and "size 0" in line, line


@pytest.mark.parametrize("which, dtype, stored", [("fc1", torch.int64, "I64"), ("fc2", torch.bool, "BOOL")])
def test_a_bias_that_is_not_float_is_refused_like_a_weight(tmp_path, which, dtype, stored):
    tensors = checkpoint_tensors("bert")
    name = (BERT.fc1_prefix(0) if which == "fc1" else BERT.fc2_prefix(0)) + ".bias"
    tensors[name] = (tensors[name] * 100).to(dtype)
    path = write_checkpoint(tmp_path / "x.safetensors", tensors=tensors)
    for command in ("quantize", "verify"):
        line = refused(tmp_path, command, path)
        assert f"{name} is {stored}; quantize takes float biases" in line, line


# ---- 4. an index that lists no tensors ------------------------------------------------------------


def test_an_index_with_an_empty_weight_map_is_one_line(tmp_path):
    model = write_sharded(tmp_path / "model", checkpoint_tensors("bert"), 2)
    index = model / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": {}}))
    for command in ("quantize", "inspect", "verify"):
        line = refused(tmp_path, command, model)
        assert f"{index}: the index lists no tensors" in line, line


# ---- 5. a gelugemm record with edited fields -----------------------------------------------------


def edit_source(r, **fields):
    r["source"].update(fields)


def drop_sha256(r):
    del r["source"]["sha256"]


DAMAGE = {
    "source empty": (lambda r: r.update(source={}), "source.kind is missing"),
    "source path not text": (lambda r: edit_source(r, path=5), "source.path is 5, expected a string"),
    "source sha256 missing": (drop_sha256, "source.sha256 is missing"),
    "directory files not a list": (lambda r: edit_source(r, kind="directory", files=7), "source.files is 7, expected a list"),
    "separate up without its names": (lambda r: r["layers"][0].update(gated="separate"), "layers[0].up"),
    "activation dtype": (lambda r: r["layers"][0].update(activation_dtype="fp8"), 'layers[0].activation_dtype is "fp8"'),
    "calibration path": (lambda r: r.update(calibration={"kind": "file", "path": ["x"]}), "calibration.path is a list"),
    "smoothing value": (lambda r: r.update(smoothing={"x": 3}), "smoothing['x'] is 3"),
    "d_ff a bool": (lambda r: r["layers"][0].update(d_ff=True), "layers[0].d_ff is true, expected a positive integer"),
}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A small w8a8 file and its (tensors, metadata), to write edited copies from."""
    folder = tmp_path_factory.mktemp("quantized")
    source = write_checkpoint(folder / "model.safetensors", "bert", n_layers=1, config={"hidden_act": "gelu"})
    out = Path(quantize_checkpoint(source, folder / "q.safetensors", QuantizeOptions(scheme="w8a8")).output)
    with safe_open(str(out), framework="pt") as f:
        return out, {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def with_record(path: Path, quantized, text: str) -> Path:
    _, tensors, metadata = quantized
    save_file(tensors, str(path), metadata={**metadata, RECORD_KEY: text})
    return path


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_an_edited_record_is_one_line_naming_what_is_wrong(tmp_path, quantized, damage):
    edit, words = DAMAGE[damage]
    record = json.loads(quantized[2][RECORD_KEY])
    edit(record)
    path = with_record(tmp_path / "q.safetensors", quantized, json.dumps(record))
    for command in ("verify", "inspect"):
        line = refused(tmp_path, command, path)
        assert f"{path}: its {RECORD_KEY} record is malformed: " in line and words in line, (command, line)
    assert common.recorded_inputs(path) == []  # what verify and eval protect: nothing, without a record
    with pytest.raises(CheckpointError):
        read_quantized(path)


@pytest.mark.parametrize("text, words", [(DEEP, "nested too deeply"), ('{"format": ' + LONG_INT + "}", "5000 digits")])
def test_a_record_the_parser_cannot_take_is_one_line(tmp_path, quantized, text, words):
    path = with_record(tmp_path / "q.safetensors", quantized, text)
    for command in ("verify", "inspect"):
        line = refused(tmp_path, command, path)
        assert f"its {RECORD_KEY!r} metadata is not usable JSON" in line and words in line, (command, line)


def test_the_unedited_record_still_verifies(tmp_path, quantized):
    path = with_record(tmp_path / "q.safetensors", quantized, quantized[2][RECORD_KEY])
    record, layers = read_quantized(path)
    assert record["source"]["kind"] == "file" and len(layers) == 1


# ---- 6. --granularity group:N too large ----------------------------------------------------------


@pytest.mark.parametrize("value, words", [
    ("group:99999999999999999999999", "N from 1 to 65536"),
    ("group:65537", "N from 1 to 65536"),
    ("group:" + "9" * 5000, "group:N with N > 0"),
    ("group:\u00b2", "group:N with N > 0"),  # '²' is a digit to str.isdigit, not to int()
])  # fmt: skip
def test_a_group_size_too_large_is_an_option_error(tmp_path, value, words):
    path = write_checkpoint(tmp_path / "model.safetensors", "bert")
    line = refused(tmp_path, "quantize", path, "--granularity", value)
    assert line.startswith("error: --granularity") and words in line and len(line) < 200, line
