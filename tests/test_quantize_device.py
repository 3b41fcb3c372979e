"""`quantize --device auto|cpu|cuda`: where the weights are quantized. The option is checked
before any work (cuda without a CUDA device: one error, exit 2, nothing written), the report
says where it ran, and on a GPU the output is the CPU's bit for bit (`gpu` test)."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from calibration import quantize_weights
from calibration.devices import resolve_device
from calibration.errors import OptionError
from calibration.options import QuantizeOptions
from calibration.quantized_file import sha256_file
from checkpoints import checkpoint_tensors, write_checkpoint
from conftest import HAS_CUDA
from gelugemm_cli.app import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("wide_consoles")


def quantize(*args):
    return runner.invoke(app, ["quantize", *map(str, args)])


def test_cuda_without_a_cuda_device_is_one_error_exit_2_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    source = write_checkpoint(tmp_path / "model.safetensors", "bert")
    before = {p: sha256_file(p) for p in tmp_path.iterdir()}
    result = quantize(source, "--device", "cuda", "--json", tmp_path / "report.json")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: no CUDA device here"), result.stderr
    assert "Traceback" not in result.output
    assert {p: sha256_file(p) for p in tmp_path.iterdir()} == before  # no output, no report, no temporary file
    with pytest.raises(OptionError, match="no CUDA device here"):
        QuantizeOptions(device="cuda")


@pytest.mark.parametrize("asked", ["tpu", "mps", "cuda:x"])
def test_an_unknown_device_is_refused_with_the_choices(asked):
    with pytest.raises(OptionError, match=re.escape(f"--device must be one of auto, cpu, cuda; got {asked!r}")):
        QuantizeOptions(device=asked)


@pytest.mark.parametrize("available", [False, True])
def test_auto_is_cuda_exactly_where_torch_sees_a_gpu(monkeypatch, available):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    want = "cuda" if available else "cpu"
    assert resolve_device("auto").type == want and resolve_device(None).type == want
    assert QuantizeOptions().compute_device.type == want  # auto is the default
    assert QuantizeOptions(device="cpu").compute_device == torch.device("cpu")


@pytest.mark.parametrize("asked", ["auto", "cpu"])
def test_the_report_says_where_the_weights_were_quantized(tmp_path, asked):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert")
    result = quantize(source, "--device", asked, "--json", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["device_asked"] == asked
    if asked == "cpu" or not HAS_CUDA:
        assert report["device"] == "cpu"
    else:
        assert report["device"].startswith("cuda:") and "cuda init" in report["timing"]["phases"]
    line = next(line for line in result.stdout.splitlines() if line.startswith("time: "))
    assert f"device: {report['device']};" in line


# ---- on a GPU: the same file as the CPU writes ---------------------------------------------------


def gated_checkpoint(path, dtype, d_model=256, d_ff=640):
    """Two Gemma-named GeGLU MLPs (gate, up, down) with config.json: gated quantize without transformers."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(2):
        p = f"model.layers.{i}."
        for name, shape in (("gate_proj", (d_ff, d_model)), ("up_proj", (d_ff, d_model)), ("down_proj", (d_model, d_ff))):
            tensors[f"{p}mlp.{name}.weight"] = torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g).add(0.1) * 0.05
        tensors[p + "post_attention_layernorm.weight"] = torch.rand(d_model, generator=g)
        tensors[p + "input_layernorm.weight"] = torch.rand(d_model, generator=g)
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(path))
    (path.parent / "config.json").write_text(json.dumps({"model_type": "gemma", "hidden_act": "gelu_pytorch_tanh"}))
    return path


SYNTHETIC = ("--calib", "synthetic", "--tokens", "64")
# (family, dtype, quantize's arguments, d_model): every scheme, both layouts, the three float
# dtypes, a last group cut short (the default group:128 over K = 320: an explicit group:N that
# does not divide K is refused, the default only warns), SmoothQuant's multiplier (applied on
# the GPU), a gated MLP.
CASES = [
    ("bert", torch.float16, ("--scheme", "w8a16"), 256),  # group:128
    ("gpt2", torch.bfloat16, ("--scheme", "w8a16"), 320),  # group:128, 64 columns in the last group
    ("gpt2", torch.float32, ("--scheme", "w8a16", "--granularity", "per-channel"), 256),
    ("bert", torch.float16, ("--scheme", "w8a8"), 256),  # dynamic
    ("gpt2", torch.float16, ("--scheme", "w8a8", "--smooth", "0.5", *SYNTHETIC), 256),
    ("bert", torch.float32, ("--scheme", "w8a8", "--activations", "static", *SYNTHETIC), 256),
    ("gemma", torch.bfloat16, ("--scheme", "w8a8", "--activations", "static", "--smooth", "0.5", *SYNTHETIC), 256),
    ("gemma", torch.float16, ("--scheme", "w8a16",), 256),
]


@pytest.mark.gpu
@pytest.mark.parametrize("small_blocks", [False, True], ids=["blocks", "small-blocks"])
@pytest.mark.parametrize("family, dtype, args, d_model", CASES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else str(v))
def test_quantizing_on_the_gpu_writes_the_cpu_s_file(tmp_path, monkeypatch, family, dtype, args, d_model, small_blocks):
    """--device cuda and --device cpu write the same tensors (int8 values, weight scales, static
    scales, biases, folded LayerNorms) bit for bit: the same IEEE float32 steps on both. The
    weight-error report's float64 sums run in another order on the GPU: close, not equal."""
    if small_blocks:  # several device blocks per weight, as a 4096 x 16384 weight has
        monkeypatch.setattr(quantize_weights, "DEVICE_BLOCK_ELEMENTS", 64 * 1024)
    if family == "gemma":
        source = gated_checkpoint(tmp_path / "model.safetensors", dtype)
    else:
        tensors = checkpoint_tensors(family, d_model=d_model, d_ff=4 * d_model, dtype=dtype)
        source = write_checkpoint(tmp_path / "model.safetensors", tensors=tensors)
    reports, files = {}, {}
    for device in ("cpu", "cuda"):
        files[device] = tmp_path / f"{device}.safetensors"
        result = quantize(source, *args, "--device", device, "-o", files[device], "--json", tmp_path / f"{device}.json")
        assert result.exit_code == 0, result.output
        reports[device] = json.loads((tmp_path / f"{device}.json").read_text())
    assert reports["cpu"]["device"] == "cpu" and reports["cuda"]["device"].startswith("cuda:")
    on_cpu, on_gpu = load_file(files["cpu"]), load_file(files["cuda"])
    assert on_cpu.keys() == on_gpu.keys()
    # int8 weights (w8a16's packed four to an int32, as compressed-tensors' pack-quantized format has them)
    assert any(t.dtype == torch.int8 or name.endswith(".weight_packed") for name, t in on_cpu.items())
    assert any(name.endswith(".weight_scale") for name in on_cpu)
    for name, t in on_cpu.items():
        assert on_gpu[name].dtype == t.dtype and torch.equal(on_gpu[name], t), name
    for layer_cpu, layer_gpu in zip(reports["cpu"]["layers"], reports["cuda"]["layers"], strict=True):
        for gemm in ("fc1", "up", "fc2"):
            cpu, gpu = layer_cpu[gemm], layer_gpu[gemm]
            if cpu is None:
                assert gpu is None
                continue
            for key in ("weight_scale_min", "weight_scale_max", "input_scale", "output_scale", "smooth_scale_min", "smooth_scale_max"):
                assert gpu[key] == cpu[key], (gemm, key)
            assert gpu["rel_frobenius"] == pytest.approx(cpu["rel_frobenius"], rel=1e-5)
            assert gpu["max_abs_steps"] == pytest.approx(cpu["max_abs_steps"], rel=1e-5)
