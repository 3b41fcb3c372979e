"""Model directories in and out: sharded checkpoints with an index, DIR-int8/ written whole or
not at all, the other model files copied, a lying index refused, and `gelugemm inspect`."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import calibration.quantize as quantize_module
from calibration.checkpoint import find_mlps
from calibration.errors import CheckpointError
from calibration.model import load_mlps
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from calibration.quantized_file import RECORD_KEY, SMOOTH_KEY, open_quantized, read_quantized, sha256_file
from calibration.verify import verify_checkpoint
from checkpoints import all_tensors, checkpoint_tensors, track_weight_reads, write_checkpoint, write_sharded
from gelugemm_cli.app import app

runner = CliRunner()
BERT_CONFIG = {"model_type": "bert", "hidden_act": "gelu", "architectures": ["BertModel"]}


pytestmark = pytest.mark.usefixtures("wide_consoles")


def model_dir(path: Path, family="bert", shards=3, config=BERT_CONFIG, n_layers=3, **kwargs) -> Path:
    """A sharded model directory with the files a real one has beside its weights."""
    tensors = checkpoint_tensors(family, n_layers=n_layers, **kwargs)
    write_sharded(path, tensors, shards, config=config, index_metadata={"format": "pt"}, metadata={"format": "pt"})
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (path / "pytorch_model.bin").write_bytes(b"float weights in another format")
    (path / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (path / "onnx").mkdir()
    (path / "onnx" / "model.onnx").write_bytes(b"an export")
    # as in a hub cache snapshot: a folder that is a link
    (path.parent / f"{path.name}-blobs" / "2_Dense").mkdir(parents=True)
    (path.parent / f"{path.name}-blobs" / "2_Dense" / "config.json").write_text('{"in_features": 16}')
    (path / "2_Dense").symlink_to(path.parent / f"{path.name}-blobs" / "2_Dense")
    return path


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_a_sharded_directory_quantizes_like_the_single_file(tmp_path, scheme):
    source = model_dir(tmp_path / "model")
    (tmp_path / "single").mkdir()
    single = write_checkpoint(tmp_path / "single" / "model.safetensors", tensors=checkpoint_tensors("bert", n_layers=3), config=BERT_CONFIG)
    static = dict(activations="static", calib="synthetic", tokens=64) if scheme == "w8a8" else {}
    options = QuantizeOptions(scheme=scheme, **static)
    report = quantize_checkpoint(source, options=options)
    quantize_checkpoint(single, options=options)

    out = tmp_path / "model-int8"
    assert report.output == str(out) and report.output_kind == "directory"
    # The same tensors, bit for bit, whether the source was sharded or one file.
    assert all_tensors(out).keys() == load_file(str(tmp_path / "single" / "model.int8.safetensors")).keys()
    for name, t in load_file(str(tmp_path / "single" / "model.int8.safetensors")).items():
        assert torch.equal(all_tensors(out)[name], t), name

    # Shards named like the input; each tensor where its source tensor was; the index says so.
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards == report.shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    held = {}
    records = []
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            held.update({name: shard for name in f.keys()})
            records.append(json.loads(f.metadata()[RECORD_KEY]))
            assert records[-1]["format"] == "gelugemm-int8"
            assert f.metadata()["format"] == "pt"
    # every shard's header carries the same record, with the source digests hashed during the run
    assert all(r == records[0] for r in records) and records[0] == report.record
    assert index["weight_map"] == held
    assert index["metadata"] == {"total_size": sum(t.numel() * t.element_size() for t in all_tensors(out).values()), "format": "pt"}
    source_index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    for layer in find_mlps(source):
        assert held[f"{layer.fc1}.weight_scale"] == source_index[layer.w1]

    # config.json gains the quantization_config; the other files and sub-folders are copied.
    config = json.loads((out / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == BERT_CONFIG
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert (out / "1_Pooling" / "config.json").is_file()
    assert not (out / "pytorch_model.bin").exists() and not (out / "onnx").exists() and not (out / ".gitattributes").exists()
    assert sorted(report.files_copied) == ["1_Pooling/config.json", "2_Dense/config.json", "tokenizer.json"]
    assert not (out / "2_Dense").is_symlink() and (out / "2_Dense" / "config.json").read_text() == '{"in_features": 16}'
    assert any("pytorch_model.bin" in s for s in report.files_skipped) and any("onnx" in s for s in report.files_skipped)

    # The record names the source directory and the sha256 of its index and of each shard.
    record, layers = read_quantized(out)
    assert record["source"]["kind"] == "directory" and record["source"]["path"] == str(source.resolve())
    assert record["source"]["index"] == {"name": "model.safetensors.index.json", "sha256": sha256_file(source / "model.safetensors.index.json")}
    assert record["source"]["files"] == [{"name": s, "sha256": sha256_file(source / s), "bytes": (source / s).stat().st_size} for s in shards]
    assert layers == find_mlps(source)
    # Nothing left beside the output but the two models.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model-blobs", "model-int8", "single"]


def test_an_mlp_across_shards_and_smoothing_folded_into_a_layernorm_in_another_shard(tmp_path):
    """GPT-2 is pre-LN: ln_2 feeds only the MLP, so SmoothQuant's 1/s goes into it. Here ln_2
    sits in shard 1, c_fc in shard 2 and c_proj in shard 3."""
    tensors = checkpoint_tensors("gpt2", n_layers=2, d_model=16, d_ff=48)
    layer0 = [n for n in tensors if n.startswith("transformer.h.0.")]
    first = [n for n in layer0 if ".ln_2." in n] + [n for n in tensors if not n.startswith("transformer.h.")]
    second = [n for n in layer0 if ".mlp.c_fc." in n]
    third = [n for n in tensors if n not in first + second]
    source = write_sharded(tmp_path / "gpt2", tensors, [first, second, third],
                           config={"model_type": "gpt2", "activation_function": "gelu_new"})  # fmt: skip
    report = quantize_checkpoint(source, options=QuantizeOptions(scheme="w8a8", smooth=0.5, calib="synthetic", tokens=128))
    out = Path(report.output)
    record, layers = read_quantized(out)
    assert record["smoothing"] == {f"transformer.h.{i}.mlp.c_fc": "folded" for i in (0, 1)}
    assert record["quantization_config"]["quant_method"] == "compressed-tensors"  # any engine runs it
    assert "any compressed-tensors loader" in report.runs_on
    with open_quantized(out) as q:
        s = q.smooth_scale(layers[0])
    # The folded LayerNorm is where the original was, divided by s; s is in the metadata of c_fc's shard.
    shard1 = load_file(str(out / "model-00001-of-00003.safetensors"))
    for what in ("weight", "bias"):
        name = f"transformer.h.0.ln_2.{what}"
        torch.testing.assert_close(shard1[name], tensors[name] / s, rtol=1e-6, atol=0)
    with safe_open(str(out / "model-00002-of-00003.safetensors"), "pt") as f:
        assert SMOOTH_KEY + "transformer.h.0.mlp.c_fc" in f.metadata()
    assert find_mlps(out.parent / "gpt2")[0].norm_feeds_only_mlp

    # The model API: by default each MLP takes the folded LayerNorm's output (x / s) ...
    x = torch.randn(8, 16)
    folded = load_mlps(out, backend="torch", device="cpu")["transformer.h.0.mlp.c_fc"]
    unfolded = load_mlps(out, backend="torch", device="cpu", original_inputs=True)["transformer.h.0.mlp.c_fc"]
    # (the same MLP, up to where x / s is rounded: before the module's fp16 cast or after it;
    # that moves a few int8 values of x by a step: 0 in most of 40 seeds, at most 3.6%)
    a, b = folded(x / s).double(), unfolded(x).double()
    assert ((a - b).norm() / b.norm()).item() < 0.06
    assert ((folded(x).double() - b).norm() / b.norm()).item() > 0.1  # fed the unfolded input, it is wrong
    # ... and verify, which feeds the original LayerNorm's output, passes.
    assert verify_checkpoint(out, "all").passed


def test_post_ln_smoothing_stays_at_run_time_and_is_marked_gelugemm_only(tmp_path):
    source = model_dir(tmp_path / "bert", n_layers=2)
    report = quantize_checkpoint(source, options=QuantizeOptions(scheme="w8a8", smooth=0.5, calib="synthetic", tokens=64))
    out = Path(report.output)
    record, _ = read_quantized(out)
    assert set(record["smoothing"].values()) == {"run-time"} and record["runs_on"].startswith("gelugemm only")
    # Other loaders refuse it (a field compressed-tensors does not know), rather than run it without x / s.
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"]["gelugemm_run_time_smoothing"] is True
    # The LayerNorms are the source's; gelugemm divides at run time, and verify passes.
    for name, t in checkpoint_tensors("bert", n_layers=2).items():
        if "LayerNorm" in name:
            assert torch.equal(all_tensors(out)[name], t)
    assert verify_checkpoint(out, "w8a8").passed


def quantize_cli(*args):
    return runner.invoke(app, ["quantize", *map(str, args)])


def lying_indexes(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a model directory whose index lies, what the one line must say)."""
    cases = {}

    def fresh(name: str) -> tuple[Path, dict]:
        d = model_dir(tmp_path / name, n_layers=2)
        return d, json.loads((d / "model.safetensors.index.json").read_text())

    d, _ = fresh("missing-shard")
    (d / "model-00002-of-00003.safetensors").unlink()
    cases["a shard missing"] = (d, "lists shard model-00002-of-00003.safetensors, which is not in")
    d, index = fresh("elsewhere")
    index["weight_map"]["encoder.layer.0.intermediate.dense.weight"] = "model-00003-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    cases["listed in one shard, stored in another"] = (d, "lists encoder.layer.0.intermediate.dense.weight in model-00003-of-00003.safetensors, but it is stored in model-00001")
    d, index = fresh("twice")
    extra = load_file(str(d / "model-00003-of-00003.safetensors"))
    extra["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(48, 16)
    save_file(extra, str(d / "model-00003-of-00003.safetensors"))
    cases["in two shards"] = (d, "encoder.layer.0.intermediate.dense.weight is stored in both model-00001-of-00003.safetensors and model-00003")
    d, index = fresh("unlisted")
    del index["weight_map"]["encoder.layer.1.output.dense.bias"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    cases["stored but not listed"] = (d, "holds encoder.layer.1.output.dense.bias, which model.safetensors.index.json does not list")
    d, index = fresh("phantom")
    index["weight_map"]["encoder.layer.9.output.dense.weight"] = "model-00001-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    cases["listed but stored nowhere"] = (d, "lists encoder.layer.9.output.dense.weight in model-00001-of-00003.safetensors, but model-00001-of-00003.safetensors does not hold it")
    d, _ = fresh("not-json")
    (d / "model.safetensors.index.json").write_text("{nope")
    cases["index not JSON"] = (d, "model.safetensors.index.json: not valid JSON")
    d, index = fresh("escapes")
    index["weight_map"]["embeddings.position_ids"] = "../elsewhere.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    cases["a shard outside the directory"] = (d, "shards are files in the model directory")
    d = tmp_path / "empty-dir"
    d.mkdir()
    cases["no weights"] = (d, "a model directory holds model.safetensors or model.safetensors.index.json")
    return cases


def test_a_lying_index_is_one_line_exit_2_and_nothing_written(tmp_path):
    cases = lying_indexes(tmp_path)
    before = listing(tmp_path)
    for what, (directory, message) in cases.items():
        for command in ("quantize", "verify", "inspect"):
            result = runner.invoke(app, [command, str(directory)])
            assert result.exit_code == 2, (what, command, result.output)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), (what, command, result.stderr)
            assert message in result.stderr, (what, command, result.stderr)
        assert listing(tmp_path) == before, what


def test_force_replaces_an_output_directory_whole_and_a_failed_run_leaves_it(tmp_path, monkeypatch):
    source = model_dir(tmp_path / "model", n_layers=2)
    out = tmp_path / "model-int8"
    assert quantize_cli(source).exit_code == 0
    (out / "marker").write_text("from the first run")
    result = quantize_cli(source, "--scheme", "w8a8")
    assert result.exit_code == 2 and "exists; pass --force" in result.stderr and (out / "marker").exists()

    # A run that fails half way (here: interrupted at the second MLP) leaves the old output as it was.
    real, calls = quantize_module.quantize_gemm1, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize_module, "quantize_gemm1", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(source, options=QuantizeOptions(scheme="w8a8", force=True))
    assert (out / "marker").exists() and read_quantized(out)[0]["scheme"] == "w8a16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model-blobs", "model-int8"]  # no temporary left

    monkeypatch.setattr(quantize_module, "quantize_gemm1", real)
    assert quantize_cli(source, "--scheme", "w8a8", "--force").exit_code == 0
    assert not (out / "marker").exists() and read_quantized(out)[0]["scheme"] == "w8a8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model-blobs", "model-int8"]


def test_outputs_around_the_input_are_refused(tmp_path):
    source = model_dir(tmp_path / "model", n_layers=2)
    before = listing(tmp_path)
    for args, message in (
        (["-o", source / "int8"], "is inside the model directory"),
        (["-o", tmp_path, "--force"], "holds the input"),
        (["-o", source, "--force"], "is the input checkpoint"),
        (["-o", tmp_path / "q.safetensors"], "a model directory quantizes to a directory"),
        (["-o", tmp_path / "no" / "out"], "does not exist"),
    ):
        result = quantize_cli(source, *args)
        assert result.exit_code == 2 and message in result.stderr, (args, result.output)
    assert listing(tmp_path) == before


def test_verify_reads_directories_and_checks_every_shard(tmp_path):
    source = model_dir(tmp_path / "model", n_layers=2)
    assert verify_checkpoint(source, "fp16,w8a16").passed  # an original, sharded
    out = Path(quantize_checkpoint(source).output)
    report = verify_checkpoint(out, "all")
    assert report.passed and report.kind == "quantized" and report.reference["path"] == str(source.resolve())
    # Moved together, the source is found relative to the output.
    os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-moved"))
    moved = tmp_path.with_name(tmp_path.name + "-moved")
    assert verify_checkpoint(moved / "model-int8", "w8a16").reference["path"] == str(moved / "model")
    # One changed shard: the recorded sha256 no longer matches.
    shard = moved / "model" / "model-00003-of-00003.safetensors"
    tensors = load_file(str(shard))
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in tensors.items()}, str(shard))
    result = runner.invoke(app, ["verify", str(moved / "model-int8")])
    assert result.exit_code == 2 and "has changed since" in result.stderr
    os.rename(moved, tmp_path)


def test_inspect_lists_what_quantize_would_act_on_and_writes_nothing(tmp_path):
    tensors = checkpoint_tensors("gpt2", n_layers=2)
    names = list(tensors)
    cut = names.index("transformer.h.0.mlp.c_proj.weight")
    source = write_sharded(tmp_path / "gpt2", tensors, [names[:cut], names[cut:]], config={"model_type": "gpt2", "activation_function": "gelu_new"})
    before = listing(tmp_path)
    result = runner.invoke(app, ["inspect", str(source), "--json", "-"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "directory" and [s["name"] for s in report["shards"]] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    first = report["mlps"][0]
    assert (first["fc1"], first["fc2"], first["family"], first["weight_layout"]) == ("transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "gpt2", "in_out")
    assert (first["d_model"], first["d_ff"], first["dtype"], first["gelu"]) == (16, 48, "F32", "tanh")
    assert first["gelu_source"] == "config.json activation_function=gelu_new" and "model_type=gpt2" in first["layout_source"]
    assert first["norm"] == "transformer.h.0.ln_2" and first["norm_feeds_only_mlp"]
    assert first["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # it straddles the two
    table = runner.invoke(app, ["inspect", str(source)])
    assert table.exit_code == 0 and "mlp.c_fc -> mlp.c_proj" in table.stdout and "ln_2 (MLP only)" in table.stdout and "GELU tanh: config.json activation_function=gelu_new" in table.stdout
    assert listing(tmp_path) == before
    # A quantized directory is described as one.
    out = quantize_checkpoint(source, options=QuantizeOptions(scheme="w8a8")).output
    report = json.loads(runner.invoke(app, ["inspect", out, "--json", "-"]).stdout)
    assert report["quantized"] == {"made_by": "gelugemm", "scheme": "w8a8", "granularity": "per-channel", "activations": "dynamic",
                                   "format": "int-quantized", "quant_method": "compressed-tensors"}  # fmt: skip


def test_quantizing_a_quantized_directory_is_refused(tmp_path):
    source = model_dir(tmp_path / "model", n_layers=2)
    out = quantize_checkpoint(source).output
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "again")


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_quantize_holds_one_float_weight_at_a_time_and_never_reads_what_it_copies(tmp_path, monkeypatch, scheme):
    """Streaming, checked by what quantize reads: every tensor it reads is released before a
    second weight's worth is, and copied tensors (here a large embedding) are copied as bytes,
    never read into memory. (The memory this gives on a 2 GB model is measured in the README.)"""
    tensors = checkpoint_tensors("gpt-neox", n_layers=4, d_model=32, d_ff=128, dtype=torch.float16)
    tensors["embed_in.weight"] = torch.randn(4096, 32).half()  # 4x an MLP weight
    source = write_sharded(tmp_path / "model", tensors, 3, config={"model_type": "gpt_neox", "hidden_act": "gelu"})
    reads = track_weight_reads(monkeypatch)
    static = dict(activations="static", calib="synthetic", tokens=32) if scheme == "w8a8" else {}
    quantize_checkpoint(source, options=QuantizeOptions(scheme=scheme, **static))
    weight = 32 * 128 * 2
    # one weight, plus the small vectors read with it (its bias, the LayerNorm for synthetic rows)
    assert weight <= reads.peak <= weight + 4 * 128 * 2
    assert "embed_in.weight" not in reads.names and all_tensors(tmp_path / "model-int8")["embed_in.weight"].equal(tensors["embed_in.weight"])


@pytest.mark.parametrize("damage", [
    lambda r: r.pop("layers"),
    lambda r: r["layers"][0].update(d_ff="wide"),
    lambda r: r["layers"][0].update(unknown_field=1),
    lambda r: r["layers"][0].pop("fc1"),
    lambda r: r.update(source="somewhere"),
    lambda r: r["layers"][0].update(gelu="relu"),
])  # fmt: skip
def test_a_damaged_record_is_one_line_exit_2(tmp_path, damage):
    source = write_checkpoint(tmp_path / "m.safetensors", "bert")
    out = Path(quantize_checkpoint(source).output)
    with safe_open(str(out), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    record = json.loads(metadata[RECORD_KEY])
    damage(record)
    save_file(tensors, str(out), metadata={**metadata, RECORD_KEY: json.dumps(record)})
    for command in ("verify", "inspect"):
        result = runner.invoke(app, [command, str(out)])
        assert result.exit_code == 2 and result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1, result.output
