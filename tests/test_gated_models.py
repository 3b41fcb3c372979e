"""Gated MLPs (GeGLU) through every command, on small random models saved from their real
transformers classes (tests/hf_models.py): Gemma (`mlp.gate_proj`, `up_proj` -> `down_proj`,
tanh GELU, RMSNorm of 1 + weight), T5 v1.1 (`DenseReluDense.wi_0`, `wi_1` -> `wo`,
`feed_forward_proj: gated-gelu`, bf16) and ModernBERT (one `mlp.Wi` whose output halves are
gate and up -> `mlp.Wo`).

quantize writes every linear the model has as compressed-tensors (the library decompresses
them to gelugemm's int8 weights, transformers loads and runs the output), verify grades it
(exit 0), calibrate captures what each gate linear reads, eval swaps the fused gated MLP in
for the model's own MLP module and measures the model; the op as a module computes what the
model's MLP module computes.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel
from transformers.utils import logging as hf_logging
from typer.testing import CliRunner

from calibration.capture import calibrate_model
from calibration.checkpoint import find_mlps
from calibration.evaluate import evaluate_quantized
from calibration.hf import load_model
from calibration.model import load_mlps, plan_swaps
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from calibration.quantized_file import open_quantized
from calibration.verify import verify_checkpoint
from conftest import DEVICE, TOL_GATED_MODEL, TOL_VS_REFERENCE, rel_err
from gelugemm_cli.app import app
from checkpoints import track_weight_reads
from hf_models import build, tiny_model, write_lines
from kernels.module import FusedGeluMLP

hf_logging.set_verbosity_error()
runner = CliRunner()

# kind -> (the MLP module of block 0 in the loaded model, its linears as (gate, up, down)
# module names inside it (up None: the concatenated Wi), the GELU)
GATED = {
    "gemma": ("model.layers.0.mlp", ("gate_proj", "up_proj", "down_proj"), "tanh"),
    "t5": ("encoder.block.0.layer.1.DenseReluDense", ("wi_0", "wi_1", "wo"), "tanh"),
    "modernbert": ("layers.0.mlp", ("Wi", None, "Wo"), "erf"),
}
# What the quantized linears' targets must match, in the loaded model's module names.
LINEAR_NAMES = {"gemma": ("gate_proj", "up_proj", "down_proj"), "t5": ("wi_0", "wi_1", "wo"), "modernbert": ("mlp.Wi", "mlp.Wo")}


def load_file_metadata(directory: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gated")
    write_lines(root / "text.txt")
    return {kind: build(kind, root / kind) for kind in GATED} | {"text": root / "text.txt"}


def test_discovery_finds_each_gated_family(models):
    gemma, t5, modernbert = (find_mlps(models[k]) for k in GATED)
    assert [(m.fc1, m.up, m.fc2, m.gated, m.gelu) for m in gemma[:1]] == [
        ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "separate", "tanh")
    ]
    assert gemma[0].norm == "model.layers.0.post_attention_layernorm" and gemma[0].norm_offset == 1.0
    assert {m.fc1.rsplit(".", 1)[-1] for m in t5} == {"wi_0"} and len(t5) == 4  # encoder and decoder
    assert {(m.activation_dtype, m.gated) for m in t5} == {("bf16", "separate")}
    assert [(m.fc1, m.up, m.gated, m.d_ff) for m in modernbert[:1]] == [("layers.0.mlp.Wi", None, "concatenated", 80)]


@pytest.mark.parametrize("kind", list(GATED))
def test_the_fused_module_computes_the_models_mlp(kind):
    """FusedGeluMLP.from_linears on the model's own linears (gate and up, or the one Wi)
    equals the model's MLP module in fp32, through the torch backend and the Triton kernels
    (the CPU interpreter here, the GPU where there is one)."""
    model = tiny_model(kind).to(DEVICE)  # the Triton backend runs where the weights are
    path, (gate, up, down), gelu = GATED[kind]
    module = model.get_submodule(path)
    x = torch.randn(2, 5, 32, device=DEVICE)
    with torch.no_grad():
        want = module(x)
        for backend in ("torch", "triton"):
            fused = FusedGeluMLP.from_linears(
                getattr(module, gate), getattr(module, down), gelu, backend=backend,
                up=None if up is None else getattr(module, up), gated=True,
            )  # fmt: skip
            assert fused.d_ff == 80 and "gated" in repr(fused)
            assert rel_err(fused(x), want) < TOL_VS_REFERENCE[torch.float32], backend


STATIC = ["--activations", "static", "--calib", "synthetic", "--tokens", "64"]


@pytest.mark.parametrize("kind,scheme,options", [
    ("gemma", "w8a16", []), ("t5", "w8a8", STATIC), ("modernbert", "w8a8", []), ("gemma", "w8a8", ["--activations", "group:32"]),
])  # fmt: skip
def test_quantize_and_verify(models, tmp_path, kind, scheme, options):
    out = tmp_path / f"{kind}-{scheme}"
    result = runner.invoke(app, ["quantize", str(models[kind]), "--scheme", scheme, "-o", str(out), *options])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(out), "--dtype", "all", "--tokens", "64"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect", str(out), "--json", "-"])
    mlps = json.loads(result.stdout)["mlps"]
    assert {m["gated"] for m in mlps} == {"concatenated" if kind == "modernbert" else "separate"}


@pytest.mark.parametrize("kind", list(GATED))
def test_compressed_tensors_output_quantizes_each_linear_the_model_has(models, tmp_path, kind):
    """Every linear of each gated MLP (gate_proj, up_proj, down_proj; Wi, Wo) is a quantized
    linear of the format: targeted by the config, decompressed by the library to gelugemm's
    int8 weights, with x's static scale on the gate and the up projection alike and the
    product's on the down projection; transformers loads the output and computes the model."""
    # the library reads the format as its authors do (the test extra; absent on a bare GPU box)
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name

    options = QuantizeOptions(scheme="w8a8", activations="static", calib="synthetic", tokens=64, layers="encoder" if kind == "t5" else None)
    out = Path(quantize_checkpoint(models[kind], tmp_path / "q", options).output)
    qconfig = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    group = qconfig.config_groups["group_0"]
    model = AutoModel.from_pretrained(models[kind]).eval()
    targeted = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and any(match_name(n, t) for t in group.targets)]
    wanted = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(LINEAR_NAMES[kind])
              and (kind != "t5" or n.startswith("encoder."))]  # fmt: skip
    assert targeted == wanted and len(wanted) == 2 * len(LINEAR_NAMES[kind])
    compressor = BaseCompressor.load_from_registry(qconfig.format)
    tensors = load_file(str(out / "model.safetensors"))
    with open_quantized(out) as q:
        for layer in q.layers:
            loaded = q.load(layer)
            for prefix, qw in zip([p for p, *_ in layer.linears()], [loaded.w1, loaded.w_up, loaded.w2][:: 1 if layer.w_up else 2]):
                state = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".") and not k.endswith("bias")}
                assert torch.equal(compressor.decompress(state, group)["weight"], qw.dequantize()), prefix
            if layer.w_up is not None:
                assert torch.equal(loaded.w_up.input_scale, loaded.w1.input_scale)  # both read x
            assert torch.equal(loaded.w1.output_scale, loaded.w2.input_scale)
    if kind == "t5":
        # transformers keeps T5's wo a float linear (_keep_in_fp32_modules): the report says where it runs
        assert json.loads(load_file_metadata(out)["gelugemm"])["runs_on"].startswith("gelugemm; not transformers")
        return
    quantized = AutoModel.from_pretrained(out).eval()
    ids = torch.randint(4, 40, (2, 9))
    with torch.no_grad():
        assert 0 < rel_err(quantized(ids).last_hidden_state, model(ids).last_hidden_state) < TOL_GATED_MODEL


def test_smoothing_folds_into_gemmas_one_plus_weight_rmsnorm(models, tmp_path):
    """Gemma's RMSNorm multiplies by (1 + weight): folding x / s into it stores (1 + w) / s - 1,
    and the quantized model through transformers then computes the float model."""
    pytest.importorskip("compressed_tensors")  # transformers loads the quantized model through it
    options = QuantizeOptions(scheme="w8a8", smooth=0.5, calib="synthetic", tokens=64)
    out = Path(quantize_checkpoint(models["gemma"], tmp_path / "q", options).output)
    name = "model.layers.0.post_attention_layernorm.weight"
    before, after = load_file(str(models["gemma"] / "model.safetensors"))[name], load_file(str(out / "model.safetensors"))[name]
    with open_quantized(out) as q:
        s = q.smooth_scale(q.layers[0])
        assert q.smoothing(q.layers[0]) == "folded"
    assert torch.allclose(after, (1 + before) / s - 1, rtol=1e-6, atol=1e-6)
    model, quantized = AutoModel.from_pretrained(models["gemma"]).eval(), AutoModel.from_pretrained(out).eval()
    ids = torch.randint(4, 40, (2, 9))
    with torch.no_grad():
        assert rel_err(quantized(ids).last_hidden_state, model(ids).last_hidden_state) < TOL_GATED_MODEL


def test_t5_verifies_against_the_bf16_path_unless_asked(models, tmp_path):
    """T5 v1.1 overflows fp16: its reference path and int8 activations are bf16 (quantize
    records it; verify says so), and --activation-dtype fp16 asks for the fp16 path."""
    options = QuantizeOptions(scheme="w8a8", activations="static", calib="synthetic", tokens=64, layers="encoder")
    out = quantize_checkpoint(models["t5"], tmp_path / "q", options).output
    report = verify_checkpoint(out, "all", tokens=32)
    assert report.passed and {layer.reference_dtype for layer in report.layers} == {"bf16"}
    assert report.gate["against"] == "bf16 path" and any("bf16" in note for note in report.notes)
    assert {row.tolerance for row in report.rows if row.dtype in ("fp16", "fp32")} == {1e-2}  # at least the bf16 path's own
    assert {m.config.activation_dtype for m in load_mlps(out).values()} == {"bf16"}
    fp16 = verify_checkpoint(out, "w8a8", tokens=32, activation_dtype="fp16")
    assert {layer.reference_dtype for layer in fp16.layers} == {"fp16"} and fp16.gate["against"] == "fp16 path"
    result = runner.invoke(app, ["verify", str(out), "--activation-dtype", "fp32"])
    assert result.exit_code == 2 and "--activation-dtype must be one of fp16, bf16" in result.stderr


@pytest.mark.parametrize("kind", list(GATED))
def test_calibrate_then_eval_swaps_the_whole_gated_mlp_module(models, tmp_path, kind):
    """calibrate keys each MLP's rows by its gate linear (or Wi); quantize calibrates on them
    (SmoothQuant folded into the MLP's norm); eval puts the fused gated MLP in place of the
    model's MLP module (Gemma's mlp, T5's DenseReluDense, ModernBERT's mlp) and passes."""
    layers = "encoder" if kind == "t5" else None  # the text reaches T5's encoder
    calib = calibrate_model(models[kind], tmp_path / "calib.safetensors", text=models["text"], layers=layers)
    assert [layer.fc1 for layer in calib.layers] == [m.fc1 for m in find_mlps(models[kind], layers=layers)]
    options = QuantizeOptions(scheme="w8a8", calib=tmp_path / "calib.safetensors", smooth=0.5, layers=layers)
    out = quantize_checkpoint(models[kind], tmp_path / "q", options).output
    report = evaluate_quantized(out, model_dir=models[kind], text=models["text"])
    assert report.passed, report.to_dict()["metrics"]
    assert report.seams[0]["module"] == GATED[kind][0] and report.seams[0]["identities"] == []
    hf = load_model(models[kind], "cpu", layers=layers)
    swaps = plan_swaps(hf.model, load_mlps(out), linears=hf.linears)
    assert swaps.paths[0] == GATED[kind][0]


def test_quantize_holds_one_float_weight_at_a_time_for_a_gated_mlp(models, monkeypatch):
    """The gate, then the up projection, then the down projection: never two float weights
    read at once (the output scale is calibrated on the int8 gate and up)."""
    reads = track_weight_reads(monkeypatch)
    quantize_checkpoint(models["gemma"], Path(models["gemma"]).parent / "gemma-streamed",
                        QuantizeOptions(scheme="w8a8", activations="static", smooth=0.5, calib="synthetic", tokens=32))  # fmt: skip
    weight = 32 * 80 * 4  # fp32
    assert weight <= reads.peak <= weight + 4 * 80 * 4
