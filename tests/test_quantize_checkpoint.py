"""calibration/quantize.py and calibration/quantized_file.py: the int8 checkpoint, written and read back."""

import hashlib
import json
import math
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import calibration.quantize as quantize_module
from calibration.checkpoint import find_mlps, open_checkpoint
from calibration.data import calibration_inputs
from calibration.errors import CheckpointError, OptionError
from calibration.options import QuantizeOptions
from calibration.quantize import default_output, quantize_checkpoint
from kernels.int8 import fake_quantize
from calibration.quantized_file import (
    RECORD_KEY,
    is_quantized_file,
    load_quantized_mlp,
    read_quantized,
    resolve_source,
    sha256_file,
)
from checkpoints import FAMILIES, checkpoint_tensors, write_calibration, write_checkpoint
from kernels.op import FusedMLP, MLPConfig
from kernels.quantized import QuantizedWeight
from kernels.reference import as_out_in, gelu, mlp_reference

# Dequantized weights are within half a step of the originals, up to the float32
# rounding of W / s (see test_calibration_weights.py).
HALF_STEP = 0.5 + 1e-4
# A whole int8 MLP against float64. For w8a8, x and the GELU output each sit on one
# 255-level grid over their calibrated range; with the small, wide-ranging synthetic
# layers here (LayerNorm weights up to 3.5, biases ~N(0, 2)) that is a noise of 1-2% per
# operand, and the weights add under 1%: 2-4% in all, measured. w8a16 has the weights' part only.
INT8_MLP_REL_ERR = 0.05


def dequantized_nk(qw: QuantizedWeight, layout: str) -> torch.Tensor:
    return as_out_in(qw.dequantize(layout, torch.float64), layout)


def check_weight(original: torch.Tensor, qw: QuantizedWeight, layout: str, encodes: torch.Tensor | None = None):
    """int8 in the source layout, within half a step of what it encodes."""
    assert qw.data.dtype == torch.int8 and qw.data.shape == original.shape
    assert qw.scale.dtype == torch.float32 and torch.isfinite(qw.scale).all() and (qw.scale > 0).all()
    target = as_out_in(original if encodes is None else encodes, layout).double()
    n, k = target.shape
    step = qw.scale.double()[:, None] if qw.group_size is None else qw.scale.double()[:, torch.arange(k) // qw.group_size]
    assert ((target - dequantized_nk(qw, layout)).abs() <= HALF_STEP * step).all()


# w8a8 with static activation scales, calibrated on synthetic rows
STATIC_SYNTHETIC = dict(scheme="w8a8", activations="static", calib="synthetic")
VARIANTS = {
    "w8a16": dict(),  # group:128, the default
    "w8a16 per-channel": dict(granularity="per-channel"),
    "w8a8": dict(scheme="w8a8"),  # dynamic, the default: no activation scales in the file
    "w8a8 static": dict(STATIC_SYNTHETIC, tokens=64),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_family_round_trips(tmp_path, family, variant):
    spec = FAMILIES[family]
    scheme = variant.split()[0]
    static = variant == "w8a8 static"
    source = write_checkpoint(tmp_path / "model.safetensors", family, d_model=16, d_ff=48)
    tensors = checkpoint_tensors(family, d_model=16, d_ff=48)
    report = quantize_checkpoint(source, options=QuantizeOptions(**VARIANTS[variant]))
    output = tmp_path / "model.int8.safetensors"
    assert report.output == str(output) and output.is_file()

    written = load_file(str(output))
    layers = find_mlps(source)
    mlp_weights = {name for layer in layers for name in (layer.w1, layer.w2)}
    # Every source tensor is there bit for bit, but the MLP weights: int8 (w8a8) or packed (w8a16).
    for name, t in tensors.items():
        if name not in mlp_weights:
            assert written[name].dtype == t.dtype and torch.equal(written[name], t), name
        elif scheme == "w8a8":
            assert written[name].dtype == torch.int8 and written[name].shape == t.shape
        else:
            assert name not in written
    # compressed-tensors' names and shapes: scales [N, 1] (per channel, or one group of 128
    # covering K <= 48), static input scales [1], packed int32 [N, K/4].
    expected = {}
    for layer in layers:
        for prefix, weight, (n, k) in ((layer.fc1, layer.w1, (48, 16)), (layer.fc2, layer.w2, (16, 48))):
            expected[f"{prefix}.weight_scale"] = (torch.float32, (n, 1))
            if static:
                expected[f"{prefix}.input_scale"] = (torch.float32, (1,))
            elif scheme == "w8a16":
                expected[f"{prefix}.weight_packed"] = (torch.int32, (n, k // 4))
                expected[f"{prefix}.weight_shape"] = (torch.int64, (2,))
    added = {name: (t.dtype, tuple(t.shape)) for name, t in written.items() if name not in tensors}
    assert added == expected

    record, read_layers = read_quantized(output)
    assert read_layers == layers
    for layer in layers:
        assert layer.weight_layout == spec.weight_layout
        w1, b1, w2, b2, *_ = load_quantized_mlp(output, layer)
        check_weight(tensors[layer.w1], w1, layer.weight_layout)
        check_weight(tensors[layer.w2], w2, layer.weight_layout)
        per_channel = variant != "w8a16"
        assert (w1.group_size, w2.group_size) == ((None, None) if per_channel else (128, 128))
        assert w1.scale.shape == ((48,) if per_channel else (48, 1)) and w2.scale.shape == ((16,) if per_channel else (16, 1))
        assert torch.equal(b1, tensors[layer.b1]) and torch.equal(b2, tensors[layer.b2])
        if static:
            assert w1.input_scale.dim() == 0 and w1.input_scale.dtype == torch.float32 and w1.input_scale > 0
            assert torch.equal(w1.output_scale, w2.input_scale) and w2.output_scale is None
        else:
            assert w1.input_scale is None and w1.output_scale is None and w2.input_scale is None
    assert (record["scheme"], record["activations"]) == (scheme, {"w8a8": "dynamic", "w8a8 static": "static"}.get(variant))
    assert record["granularity"] == ("group:128" if variant == "w8a16" else "per-channel")
    assert [lr.fc1.prefix for lr in report.layers] == [layer.fc1 for layer in layers]
    assert all(lr.fc1.max_abs_steps <= HALF_STEP and lr.fc2.max_abs_steps <= HALF_STEP for lr in report.layers)


def test_metadata_record(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "gpt2", config={"activation_function": "gelu_new"},
                              metadata={"format": "pt"})  # fmt: skip
    output = tmp_path / "out" / "q.safetensors"
    output.parent.mkdir()
    options = QuantizeOptions(**STATIC_SYNTHETIC, method="percentile:99.9", smooth=0.5, tokens=32, seed=7)
    quantize_checkpoint(source, output, options)
    with safe_open(str(output), "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"  # the source's own metadata is kept
    assert all(isinstance(v, str) for v in metadata.values())
    record = json.loads(metadata[RECORD_KEY])
    assert is_quantized_file(output) and not is_quantized_file(source)
    assert record["tool"] == "gelugemm" and record["version"]
    assert (record["scheme"], record["granularity"], record["group_size"]) == ("w8a8", "per-channel", None)
    assert (record["method"], record["smooth"], record["activations"]) == ("percentile:99.9", 0.5, "static")
    # GPT-2's ln_2 feeds only the MLP: the smoothing is folded into it, and any engine runs the output.
    assert record["smoothing"] == {f"transformer.h.{i}.mlp.c_fc": "folded" for i in (0, 1)}
    assert record["quantization_config"]["quant_method"] == "compressed-tensors"
    assert record["calibration"] == {**record["calibration"], "kind": "synthetic", "tokens": 32, "seed": 7, "split": "calibrate"}
    assert record["gelu"] == "tanh" and "gelu_new" in record["gelu_source"]
    assert record["source"]["path"] == str(source.resolve()) and record["source"]["kind"] == "file"
    assert record["source"]["sha256"] == sha256_file(source)
    assert record["source"]["files"] == [{"name": "model.safetensors", "sha256": sha256_file(source), "bytes": source.stat().st_size}]
    assert record["source"]["relative_path"] == "../model.safetensors"
    assert [layer["fc1"] for layer in record["layers"]] == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    assert {layer["weight_layout"] for layer in record["layers"]} == {"in_out"}
    assert resolve_source(output, record) == source.resolve()


@pytest.mark.parametrize("layout_family", ["vit", "gpt2"])
def test_group_scales_are_written_and_read_back(tmp_path, layout_family):
    source = write_checkpoint(tmp_path / "model.safetensors", layout_family, d_model=20, d_ff=40)
    tensors = checkpoint_tensors(layout_family, d_model=20, d_ff=40)
    output = tmp_path / "q.safetensors"
    report = quantize_checkpoint(source, output, QuantizeOptions(granularity="group:4"))
    assert report.runs_on.startswith("gelugemm and transformers") and "not 4" in report.runs_on  # vLLM: 32, 64, 128
    record, layers = read_quantized(output)
    assert (record["granularity"], record["group_size"]) == ("group:4", 4)
    for layer in layers:
        w1, _, w2, _, *_ = load_quantized_mlp(output, layer)
        assert w1.group_size == 4 and w1.scale.shape == (40, 5) and w2.scale.shape == (20, 10)
        check_weight(tensors[layer.w1], w1, layer.weight_layout)
        check_weight(tensors[layer.w2], w2, layer.weight_layout)


@pytest.mark.parametrize("layout_family", ["vit", "gpt2"])
def test_the_default_group_on_a_width_it_does_not_divide_is_written_partial_and_said(tmp_path, layout_family):
    """group:128 on d_ff = 160: groups of 128 and 32. compressed-tensors refuses a partial group,
    so the file runs on gelugemm only, and the report says so; an asked group:N is refused."""
    source = write_checkpoint(tmp_path / "model.safetensors", layout_family, d_model=20, d_ff=160)
    tensors = checkpoint_tensors(layout_family, d_model=20, d_ff=160)
    output = tmp_path / "q.safetensors"
    report = quantize_checkpoint(source, output, QuantizeOptions())
    assert report.runs_on.startswith("gelugemm only") and any("per-channel loads anywhere" in w for w in report.warnings)
    record, layers = read_quantized(output)
    for layer in layers:
        w1, _, w2, _, *_ = load_quantized_mlp(output, layer)
        assert w1.scale.shape == (160, 1) and w2.scale.shape == (20, 2)
        check_weight(tensors[layer.w1], w1, layer.weight_layout)
        check_weight(tensors[layer.w2], w2, layer.weight_layout)
    with pytest.raises(OptionError, match="does not divide"):
        quantize_checkpoint(source, tmp_path / "asked.safetensors", QuantizeOptions(granularity="group:128"))
    assert not (tmp_path / "asked.safetensors").exists()


@pytest.mark.parametrize("layout_family", ["vit", "gpt2"])
def test_smooth_scale_is_written_and_folded_into_w1(tmp_path, layout_family):
    source = write_checkpoint(tmp_path / "model.safetensors", layout_family, d_model=20, d_ff=40)
    tensors = checkpoint_tensors(layout_family, d_model=20, d_ff=40)
    output = tmp_path / "q.safetensors"
    quantize_checkpoint(source, output, QuantizeOptions(scheme="w8a8", smooth=0.5, calib="synthetic", tokens=64))
    for layer in find_mlps(source):
        w1, _, w2, _, *_ = load_quantized_mlp(output, layer)
        assert w1.input_scale is None and w1.output_scale is None  # dynamic: smoothing alone needs calibration
        s = w1.smooth_scale
        assert s.shape == (20,) and s.dtype == torch.float32 and torch.isfinite(s).all() and (s > 0).all()
        assert not torch.allclose(s, torch.ones_like(s)) and w2.smooth_scale is None
        # The int8 W1 encodes W1 * s along K, in the source layout.
        w1_src = tensors[layer.w1]
        folded = w1_src * (s[None, :] if layer.weight_layout == "out_in" else s[:, None])
        check_weight(w1_src, w1, layer.weight_layout, encodes=folded)
        check_weight(tensors[layer.w2], w2, layer.weight_layout)


def simulated_w8a8(x, w1: QuantizedWeight, b1, w2: QuantizedWeight, b2, layout: str, flavour: str) -> torch.Tensor:
    """What the w8a8 kernels compute, step by step from the scales in the file."""
    xs = x if w1.smooth_scale is None else x / w1.smooth_scale
    h = gelu(fake_quantize(xs, w1.input_scale).double() @ dequantized_nk(w1, layout).t() + b1.double(), flavour)
    return fake_quantize(h.float(), w1.output_scale).double() @ dequantized_nk(w2, layout).t() + b2.double()


@pytest.mark.parametrize("family,method,smooth", [("bert", "max", None), ("gpt2", "mse", 0.5), ("vit", "percentile:99.9", None)])
def test_w8a8_scales_run_the_mlp_close_to_float(tmp_path, family, method, smooth):
    source = write_checkpoint(tmp_path / "model.safetensors", family, d_model=32, d_ff=96)
    tensors = checkpoint_tensors(family, d_model=32, d_ff=96)
    output = tmp_path / "q.safetensors"
    quantize_checkpoint(source, output, QuantizeOptions(**STATIC_SYNTHETIC, method=method, smooth=smooth, tokens=256))
    for layer in find_mlps(source):
        with open_checkpoint(source) as ckpt:  # held-out inputs, as verify draws them
            x, _ = calibration_inputs(ckpt, layer, tokens=256, split="verify")
        w1, b1, w2, b2, *_ = load_quantized_mlp(output, layer)
        w1f, w2f = (tensors[n].double() for n in (layer.w1, layer.w2))
        exact = mlp_reference(x.double(), w1f, b1.double(), w2f, b2.double(), gelu_flavour=layer.gelu,
                              weight_layout=layer.weight_layout)  # fmt: skip
        rel_err = lambda: ((simulated_w8a8(x, w1, b1, w2, b2, layer.weight_layout, layer.gelu) - exact).norm()  # noqa: E731
                           / exact.norm()).item()  # fmt: skip
        right = rel_err()
        assert right < INT8_MLP_REL_ERR
        # Each scale is where it should be: 4x coarser adds noise, 4x finer clips.
        for field in ("input_scale", "output_scale"):
            calibrated = getattr(w1, field)
            setattr(w1, field, calibrated * 4)
            assert rel_err() > right
            setattr(w1, field, calibrated / 4)
            assert rel_err() > 5 * right
            setattr(w1, field, calibrated)


def test_max_scales_are_the_absmax_of_what_the_kernels_see(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert", d_model=16, d_ff=48)
    output = tmp_path / "q.safetensors"
    quantize_checkpoint(source, output, QuantizeOptions(**STATIC_SYNTHETIC, tokens=100))
    layer = find_mlps(source)[0]
    with open_checkpoint(source) as ckpt:
        x, _ = calibration_inputs(ckpt, layer, tokens=100)  # the calibrate split quantize used
    w1, b1, _, _, *_ = load_quantized_mlp(output, layer)
    torch.testing.assert_close(w1.input_scale * 127, x.abs().max(), rtol=1e-6, atol=0)
    # The GELU output of GEMM1 run on int8 x and int8 W1, in float32.
    h = gelu(fake_quantize(x, w1.input_scale) @ w1.dequantize().t() + b1, layer.gelu)
    torch.testing.assert_close(w1.output_scale * 127, h.abs().max(), rtol=1e-5, atol=0)


def test_calibration_file_is_used_and_recorded(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert", d_model=16, n_layers=2)
    layers = find_mlps(source)
    rows = {layer.fc1: torch.randn(40, 16) * (i + 1) for i, layer in enumerate(layers)}
    rows[layers[0].fc1][35, 3] = 1000.0  # in the held-out quarter: quantize must not see it
    calib = write_calibration(tmp_path / "calib.safetensors", rows)
    output = tmp_path / "q.safetensors"
    report = quantize_checkpoint(source, output, QuantizeOptions(scheme="w8a8", activations="static", calib=calib))
    for layer in layers:
        w1, *_ = load_quantized_mlp(output, layer)
        torch.testing.assert_close(w1.input_scale * 127, rows[layer.fc1][:30].abs().max(), rtol=1e-6, atol=0)
    record, _ = read_quantized(output)
    assert record["calibration"]["kind"] == "file" and record["calibration"]["path"] == str(calib.resolve())
    assert record["calibration"]["sha256"] == sha256_file(calib)
    assert "calibrate split, 30 rows" in report.layers[0].calibration


def test_layers_subset_leaves_the_rest_as_they_were(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert", n_layers=3)
    tensors = checkpoint_tensors("bert", n_layers=3)
    output = tmp_path / "q.safetensors"
    quantize_checkpoint(source, output, QuantizeOptions(layers=r"layer\.1\."))
    written = load_file(str(output))
    assert "encoder.layer.1.intermediate.dense.weight" not in written
    assert written["encoder.layer.1.intermediate.dense.weight_packed"].dtype == torch.int32
    for i in (0, 2):
        name = f"encoder.layer.{i}.intermediate.dense.weight"
        assert torch.equal(written[name], tensors[name])
        assert f"encoder.layer.{i}.intermediate.dense.weight_scale" not in written
    _, layers = read_quantized(output)
    assert [layer.fc1 for layer in layers] == ["encoder.layer.1.intermediate.dense"]


def test_bf16_source_keeps_bf16_biases(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert", dtype=torch.bfloat16)
    tensors = checkpoint_tensors("bert", dtype=torch.bfloat16)
    output = tmp_path / "q.safetensors"
    quantize_checkpoint(source, output)
    for layer in find_mlps(source):
        w1, b1, w2, _, *_ = load_quantized_mlp(output, layer)
        assert b1.dtype == torch.bfloat16 and torch.equal(b1, tensors[layer.b1])
        check_weight(tensors[layer.w1], w1, "out_in")


def test_all_zero_channel_round_trips(tmp_path):
    tensors = checkpoint_tensors("bert")
    tensors["encoder.layer.0.intermediate.dense.weight"][5] = 0
    source = write_checkpoint(tmp_path / "model.safetensors", tensors=tensors)
    output = tmp_path / "q.safetensors"
    report = quantize_checkpoint(source, output, QuantizeOptions(**STATIC_SYNTHETIC, tokens=16))
    w1, *_ = load_quantized_mlp(output, find_mlps(source)[0])
    assert torch.isfinite(w1.scale).all() and w1.scale[5] > 0 and (w1.data[5] == 0).all()
    assert all(math.isfinite(lr.fc1.rel_frobenius) for lr in report.layers)


def test_report_facts(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert")
    report = quantize_checkpoint(source)
    facts = report.to_dict()
    json.dumps(facts)  # the CLI writes it as is
    assert facts["output_bytes"] == (tmp_path / "model.int8.safetensors").stat().st_size
    assert facts["source_bytes"] == source.stat().st_size
    assert facts["memory"]["peak_rss_bytes"] >= facts["memory"]["start_rss_bytes"] > 0
    assert facts["tensors_copied"] == len(checkpoint_tensors("bert")) - 8  # 2 MLPs x (2 weights + 2 biases)
    assert facts["record"]["scheme"] == "w8a16" and facts["method"] is None
    # where the time went: the phases and "other" add up to the run's seconds
    timing = facts["timing"]
    assert timing["seconds"] == facts["seconds"] > 0
    assert {"read", "quantize", "write", "sha256", "other"} <= set(timing["phases"])
    assert sum(timing["phases"].values()) == pytest.approx(timing["seconds"], rel=1e-6)
    assert timing["dominant"] in timing["phases"]
    assert timing["mb_per_s"] == pytest.approx(facts["source_bytes"] / timing["seconds"] / 1e6)


def test_quantize_leaves_torch_threads_as_it_found_them(tmp_path, monkeypatch):
    """quantize computes on every core but one (the writer thread's) and restores torch's setting."""
    seen = []
    real = quantize_module._quantize_layer
    monkeypatch.setattr(quantize_module, "_quantize_layer", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    before = torch.get_num_threads()
    quantize_checkpoint(write_checkpoint(tmp_path / "model.safetensors", "bert"))
    assert torch.get_num_threads() == before
    assert seen and set(seen) == {quantize_module.compute_threads()}
    assert 1 <= quantize_module.compute_threads() <= max(1, before)


def test_default_output_name(tmp_path):
    assert default_output(tmp_path / "model.safetensors") == tmp_path / "model.int8.safetensors"
    assert default_output(tmp_path / "weights") == tmp_path / "weights.int8.safetensors"


def test_refuses_an_existing_output_without_force(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert")
    output = tmp_path / "model.int8.safetensors"
    output.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        quantize_checkpoint(source)
    assert output.read_bytes() == b"keep me"
    quantize_checkpoint(source, options=QuantizeOptions(force=True))
    assert is_quantized_file(output)


def test_never_overwrites_its_input(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert")
    before = sha256_file(source)
    with pytest.raises(CheckpointError, match="never overwrites its input"):
        quantize_checkpoint(source, tmp_path / "." / "model.safetensors", QuantizeOptions(force=True))
    assert sha256_file(source) == before


def test_refuses_to_quantize_a_quantized_file(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert")
    quantize_checkpoint(source)
    with pytest.raises(CheckpointError, match="written by gelugemm quantize"):
        quantize_checkpoint(tmp_path / "model.int8.safetensors", tmp_path / "again.safetensors")


def test_an_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert", n_layers=3)
    calls = []
    real = quantize_module.quantize_gemm1

    def fail_on_the_second_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(quantize_module, "quantize_gemm1", fail_on_the_second_layer)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_nan_weight_fails_before_anything_is_written(tmp_path):
    tensors = checkpoint_tensors("bert", n_layers=2)
    tensors["encoder.layer.1.intermediate.dense.weight"][0, 0] = float("nan")
    source = write_checkpoint(tmp_path / "model.safetensors", tensors=tensors)
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        quantize_checkpoint(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize(
    "options,complaint",
    [
        (dict(scheme="w4a16"), "--scheme"),
        (dict(granularity="per-tensor"), "--granularity"),
        (dict(granularity="group:0"), "--granularity"),
        (dict(scheme="w8a8", method="median"), "--method"),
        (dict(scheme="w8a8", smooth=2.0), "--smooth"),
        (dict(STATIC_SYNTHETIC, tokens=0), "--tokens"),
        (dict(scheme="w8a8", granularity="group:8"), "w8a8 takes per-channel"),
        (dict(method="mse"), "w8a16 quantizes the weights alone"),
        (dict(smooth=0.5), "w8a16 quantizes the weights alone"),
        (dict(activations="dynamic"), "w8a16 quantizes the weights alone"),
        (dict(scheme="w8a8", activations="per-tensor"), "--activations: activations must be dynamic, group:N or static"),
        (dict(scheme="w8a8", activations="group:256"), "--activations group:256: the int8 kernels run group:32, group:64, group:128"),
        # static scales and SmoothQuant's statistics need calibration rows: say what to pass
        (dict(scheme="w8a8", activations="static"), "static activation scales need calibration rows: pass --calib FILE"),
        (dict(scheme="w8a8", smooth=0.5), r"SmoothQuant's statistics \(--smooth\) need calibration rows: pass --calib FILE"),
        (dict(scheme="w8a8", activations="group:128", smooth=0.5), "--calib synthetic"),
        # dynamic scales use no calibration rows: options for them would be ignored
        (dict(scheme="w8a8", calib="synthetic"), "--calib: --activations dynamic computes its scales at run time"),
        (dict(scheme="w8a8", activations="group:64", tokens=64), "--tokens: --activations group:64 computes"),
        (dict(scheme="w8a8", method="mse", smooth=0.5, calib="synthetic"), "--method sets static activation scales"),
    ],
)
def test_bad_options(options, complaint):
    with pytest.raises(OptionError, match=complaint):
        QuantizeOptions(**options)


def test_tampered_file_is_caught_on_load(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert")
    output = tmp_path / "q.safetensors"
    quantize_checkpoint(source, output)
    written = load_file(str(output))
    with safe_open(str(output), "pt") as f:
        metadata = f.metadata()
    written["encoder.layer.0.intermediate.dense.weight_scale"] = written["encoder.layer.0.intermediate.dense.weight_scale"][:5]
    save_file(written, str(output), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"weight_scale has shape \[5, 1\], expected \[48, 1\]"):
        load_quantized_mlp(output, find_mlps(source)[0])
    with pytest.raises(CheckpointError, match="not written by gelugemm quantize"):
        read_quantized(source)


def test_moved_or_changed_source_is_reported(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert")
    output = tmp_path / "q.safetensors"
    quantize_checkpoint(source, output)
    record, _ = read_quantized(output)
    write_checkpoint(source, "bert", seed=1)  # same name, other weights
    with pytest.raises(CheckpointError, match="has changed"):
        resolve_source(output, record)
    source.unlink()
    with pytest.raises(CheckpointError, match="pass --reference"):
        resolve_source(output, record)


def test_output_gets_a_new_files_usual_mode(tmp_path):
    source = write_checkpoint(tmp_path / "model.safetensors", "bert")
    quantize_checkpoint(source)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "model.int8.safetensors").stat().st_mode) == 0o666 & ~umask


@pytest.mark.parametrize(
    "scheme,activations,smooth",
    [("w8a16", None, None), ("w8a8", "dynamic", None), ("w8a8", "group:32", 0.5), ("w8a8", "static", None), ("w8a8", "static", 0.5)],
)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_the_op_runs_a_quantized_file(tmp_path, family, scheme, activations, smooth):
    # The consumer's view: the file's tensors go into the op as they are, on the CPU where
    # they are read (torch backend; the op's default device would be CUDA on a GPU machine).
    source = write_checkpoint(tmp_path / "model.safetensors", family, d_model=32, d_ff=96)
    tensors = checkpoint_tensors(family, d_model=32, d_ff=96)
    output = tmp_path / "q.safetensors"
    calibrated = activations == "static" or smooth is not None
    calib = dict(calib="synthetic", tokens=256) if calibrated else {}
    quantize_checkpoint(source, output, QuantizeOptions(scheme=scheme, activations=activations, smooth=smooth, **calib))
    for layer in find_mlps(source):
        with open_checkpoint(source) as ckpt:
            x, _ = calibration_inputs(ckpt, layer, tokens=256, split="verify")
        w1, b1, w2, b2, *_ = load_quantized_mlp(output, layer)
        acts = {"activations": activations} if scheme == "w8a8" else {}
        config = MLPConfig(dtype=scheme, gelu=layer.gelu, weight_layout=layer.weight_layout, backend="torch", **acts)
        op = FusedMLP(config, device="cpu")
        y = op(x.half(), w1, b1.half(), w2, b2.half()).double()
        w1f, b1f, w2f, b2f = (tensors[n].double() for n in (layer.w1, layer.b1, layer.w2, layer.b2))
        exact = mlp_reference(x.double(), w1f, b1f, w2f, b2f, gelu_flavour=layer.gelu, weight_layout=layer.weight_layout)
        assert ((y - exact).norm() / exact.norm()).item() < INT8_MLP_REL_ERR


def test_source_hashing_stops_when_asked(tmp_path):
    # a failed quantize stops hashing the source instead of waiting for it before exiting
    import threading

    from calibration.quantized_file import HashingStopped

    path = tmp_path / "big.bin"
    path.write_bytes(b"\x01" * (3 << 20))
    assert sha256_file(path) == hashlib.sha256(b"\x01" * (3 << 20)).hexdigest()
    stop = threading.Event()
    stop.set()
    with pytest.raises(HashingStopped):
        sha256_file(path, stop)
