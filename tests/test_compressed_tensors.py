"""The compressed-tensors format, both directions, checked with the compressed-tensors library
itself and with transformers' from_pretrained (its compressed-tensors support):

- gelugemm's output validates as a compressed-tensors QuantizationConfig, the library's own
  compressors decompress it to exactly gelugemm's dequantized weights, and transformers loads
  it and computes what the original model computes (up to int8);
- a checkpoint the library compresses (the W8A16 and W8A8 presets, and static W8A8) is read
  by gelugemm: its int8 weights are the library's, and verify runs it against the original.
"""

import json
from pathlib import Path

import pytest
import torch

# The library reads and writes the format as its authors do: the test extra installs it (CI
# runs these); a machine without it (the bare GPU box) skips this module, saying why.
pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import (
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils.match import match_name
from safetensors.torch import load_file
from transformers import AutoModel, BertConfig, BertModel, ViTConfig, ViTModel
from transformers.utils import logging as hf_logging
from typer.testing import CliRunner

from calibration.model import load_mlps
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from calibration.quantized_file import open_quantized, pack_int8, unpack_int8
from calibration.verify import verify_checkpoint
from conftest import TOL_COMPRESSED_TENSORS_MODEL
from gelugemm_cli.app import app

hf_logging.set_verbosity_error()
runner = CliRunner()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bert_dir(path: Path, hidden=32, intermediate=64, layers=2) -> tuple[Path, BertModel]:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=2, vocab_size=100)
    model = BertModel(config).eval()
    model.save_pretrained(path)
    return path, model


def vit_dir(path: Path) -> tuple[Path, ViTModel]:
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8)
    model = ViTModel(config).eval()
    model.save_pretrained(path)
    return path, model


def mlp_prefixes(model) -> list[str]:
    return [name for name, _ in model.named_modules() if name.endswith(("intermediate.dense", "layer.0.output.dense", "layer.1.output.dense"))
            and "attention" not in name]  # fmt: skip


# ---- packing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [4, 7, 32, 45, 128])
def test_packing_is_compressed_tensors_own(k):
    q = torch.randint(-128, 128, (5, k), dtype=torch.int8)
    packed = pack_int8(q)
    assert packed.dtype == torch.int32 and packed.shape == (5, -(-k // 4))
    assert torch.equal(packed, pack_to_int32(q, 8))
    assert torch.equal(unpack_from_int32(packed, 8, torch.Size((5, k))), q)
    assert torch.equal(unpack_int8(pack_to_int32(q, 8), 5, k), q)


# ---- gelugemm's output, read by the library and by transformers -----------------------------------

OUTPUTS = {
    "w8a16 per-channel": QuantizeOptions(granularity="per-channel"),
    "w8a16 group:16": QuantizeOptions(granularity="group:16"),
    "w8a8 dynamic": QuantizeOptions(scheme="w8a8"),
    "w8a8 group:32": QuantizeOptions(scheme="w8a8", activations="group:32"),
    "w8a8 static": QuantizeOptions(scheme="w8a8", activations="static", calib="synthetic", tokens=256),
}


@pytest.mark.parametrize("what", list(OUTPUTS))
def test_the_library_decompresses_gelugemm_output_to_its_own_weights(tmp_path, what):
    source, model = bert_dir(tmp_path / "bert")
    out = Path(quantize_checkpoint(source, options=OUTPUTS[what]).output)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qconfig)  # the library's own validation
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.load_from_registry(config.format)
    # The targets name exactly the MLP linears of the model as transformers names its modules.
    targeted = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and any(match_name(n, t) for t in scheme.targets)]
    assert targeted == mlp_prefixes(model)
    tensors = load_file(str(out / "model.safetensors"))
    with open_quantized(out) as q:
        for layer in q.layers:
            ours = q.load(layer)
            for prefix, qw in ((layer.fc1, ours[0]), (layer.fc2, ours[2])):
                state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".") and k != prefix + ".bias"}
                dense = compressor.decompress(state, scheme)["weight"]
                assert torch.equal(dense, qw.dequantize()), prefix
                if "input_scale" in state:
                    assert torch.equal(state["input_scale"].reshape(()), qw.input_scale)


@pytest.mark.parametrize("what", list(OUTPUTS))
def test_transformers_loads_gelugemm_output_and_computes_the_model(tmp_path, what):
    source, model = bert_dir(tmp_path / "bert")
    out = quantize_checkpoint(source, options=OUTPUTS[what]).output
    loaded = AutoModel.from_pretrained(out).eval()
    ids = torch.randint(0, 100, (3, 12))
    with torch.no_grad():
        expected, got = model(ids).last_hidden_state, loaded(ids).last_hidden_state
    assert 0 < rel(got, expected) < TOL_COMPRESSED_TENSORS_MODEL
    # It ran gelugemm's int8 weights (not a float copy), with gelugemm's static input scales.
    with open_quantized(out) as q:
        w1 = q.load(q.layers[0])[0]
    linear = loaded.encoder.layer[0].intermediate.dense
    assert torch.equal(linear.weight.data, w1.dequantize())
    if w1.input_scale is not None:
        assert torch.equal(linear.input_scale.data.reshape(()), w1.input_scale)


def test_smoothing_folded_into_a_pre_ln_layernorm_loads_anywhere(tmp_path):
    """ViT's layernorm_after feeds only the MLP: the output is a plain compressed-tensors
    checkpoint whose LayerNorm divides by s, and transformers computes the model with it."""
    source, model = vit_dir(tmp_path / "vit")
    out = quantize_checkpoint(source, options=QuantizeOptions(scheme="w8a8", smooth=0.5, calib="synthetic", tokens=256)).output
    loaded = AutoModel.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert 0 < rel(loaded(pixels).last_hidden_state, model(pixels).last_hidden_state) < TOL_COMPRESSED_TENSORS_MODEL
        # (transformers 5 names ViT's modules layers.N.mlp.fc1, not encoder.layer.N.intermediate.dense as stored:
        # config.json's targets name both)
        assert hasattr(loaded.layers[0].mlp.fc1, "quantization_scheme")
        ln = loaded.layers[0].layernorm_after.weight
        assert not torch.allclose(ln, model.layers[0].layernorm_after.weight)  # the smoothing went into it


def test_run_time_smoothing_is_refused_by_other_loaders(tmp_path):
    source, _ = bert_dir(tmp_path / "bert")
    out = quantize_checkpoint(source, options=QuantizeOptions(scheme="w8a8", smooth=0.5, calib="synthetic", tokens=256)).output
    with pytest.raises(Exception, match="gelugemm_run_time_smoothing"):
        AutoModel.from_pretrained(out)
    assert verify_checkpoint(out, "w8a8").passed  # gelugemm runs it


# ---- the library's output, read by gelugemm --------------------------------------------------------


def static_w8a8(targets: list[str]) -> QuantizationScheme:
    """Per-channel int8 weights, per-tensor static int8 inputs (llm-compressor's static W8A8 recipes)."""
    return QuantizationScheme(
        targets=targets,
        weights={"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
        input_activations={"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False},
    )


def library_checkpoint(tmp_path: Path, scheme_name: str) -> tuple[Path, Path]:
    """(the float model, the same model compressed by compressed-tensors) for a preset or "STATIC_W8A8"."""
    source, model = bert_dir(tmp_path / "float", hidden=128, intermediate=256)  # group 128 divides K
    targets = [r"re:.*intermediate\.dense$", r"re:.*output\.dense$"]  # as a recipe writes them: attention.output.dense too
    scheme = static_w8a8(targets) if scheme_name == "STATIC_W8A8" else preset_name_to_scheme(scheme_name, targets)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}))
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach().abs().amax()))
             for n, m in model.named_modules() if hasattr(m, "quantization_scheme")]  # fmt: skip
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "quantization_scheme"):
                module.quantization_enabled = False
        model(torch.randint(0, 100, (4, 16)))  # float activations, for the static input scales
    for hook in hooks:
        hook.remove()
    for name, module in model.named_modules():
        if not hasattr(module, "quantization_scheme"):
            continue
        module.quantization_enabled = True
        args, w = module.quantization_scheme.weights, module.weight.data
        if args.strategy == "group":
            g = w.reshape(w.shape[0], -1, args.group_size)
            low, high = g.amin(dim=-1), g.amax(dim=-1)
        else:
            low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        module.weight_scale.data.copy_(calculate_qparams(low, high, args)[0])
        if hasattr(module, "input_scale"):
            a = inputs[name].reshape(1)
            module.input_scale.data.copy_(calculate_qparams(-a, a, module.quantization_scheme.input_activations)[0])
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    out = tmp_path / f"ct-{scheme_name}"
    model.save_pretrained(out)
    compressor.update_config(out)
    return source, out


@pytest.mark.parametrize("preset,scheme", [("W8A16", "w8a16 group:128"), ("W8A8", "w8a8 per-channel, dynamic activations"),
                                           ("STATIC_W8A8", "w8a8 per-channel, static activations")])  # fmt: skip
def test_gelugemm_reads_what_the_library_compresses(tmp_path, preset, scheme):
    source, ct = library_checkpoint(tmp_path, preset)
    qconfig = QuantizationConfig.model_validate(json.loads((ct / "config.json").read_text())["quantization_config"])
    group = qconfig.config_groups["group_0"]
    compressor = BaseCompressor.load_from_registry(qconfig.format)
    tensors = load_file(str(ct / "model.safetensors"))
    with open_quantized(ct) as q:
        assert q.made_by == "compressed-tensors" and q.record is None and q.scheme.describe() == scheme
        # The MLPs, found by their names; attention.output.dense, quantized too, is not an MLP.
        assert [layer.fc1 for layer in q.layers] == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
        for layer in q.layers:
            w1, b1, w2, b2, *_ = q.load(layer)
            for prefix, qw in ((layer.fc1, w1), (layer.fc2, w2)):
                state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".") and k != prefix + ".bias"}
                assert torch.equal(qw.dequantize(), compressor.decompress(state, group)["weight"]), prefix
            if preset == "STATIC_W8A8":
                assert torch.equal(w1.output_scale, w2.input_scale)  # the GELU output's scale is fc2's input scale

    # verify needs the float model it was made from (another tool records none) ...
    result = runner.invoke(app, ["verify", str(ct), "--dtype", "fp16"])
    assert result.exit_code == 2 and "records no source checkpoint; pass --reference" in result.stderr
    # ... and runs its own scheme (the W8A8 preset: per-token dynamic activations on both GEMMs).
    report = verify_checkpoint(ct, None, reference=source, tokens=64)  # its own scheme, on 64 synthetic rows
    assert report.passed and report.quantized["made_by"] == "compressed-tensors" and report.dtypes == [scheme.split()[0]]
    mlps = load_mlps(ct, backend="torch", device="cpu")
    assert list(mlps) == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    if preset != "W8A16":
        want = "dynamic" if preset == "W8A8" else "static"
        assert all(str(mlp.config.activations) == want for mlp in mlps.values())
