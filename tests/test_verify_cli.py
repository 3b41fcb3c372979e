"""`gelugemm verify`: passes what is right, exits 1 on a wrong scale, a perturbed kernel or
a wrong GELU flavour, and exits 2 with one red line on each bad input."""

import json
import traceback
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import kernels.op as op_module
import kernels.reference as reference_module
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from calibration.quantized_file import RECORD_KEY
from calibration.verify import DEFAULT_TOLERANCES, default_key
from checkpoints import checkpoint_tensors, corrupt_files, write_calibration, write_checkpoint
from conftest import AUTO_BACKEND, AUTO_BACKEND_REASON
from gelugemm_cli.app import app
from kernels.op import DTYPES, FusedMLP

runner = CliRunner()
SAMPLES = Path(__file__).resolve().parent.parent / "samples"


pytestmark = pytest.mark.usefixtures("wide_consoles")


def verify(*args):
    return runner.invoke(app, ["verify", *map(str, args)])


def verify_json(tmp_path, *args) -> tuple[int, dict, str]:
    """(exit code, the JSON report, the printed output)."""
    out = tmp_path / "verify.json"
    result = verify(*args, "--json", out)
    assert result.exit_code in (0, 1), result.output
    # Exit 1 is the command's own verdict (typer.Exit -> SystemExit), not a crash: CliRunner
    # reports an uncaught exception as exit code 1 too.
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError("".join(traceback.format_exception(result.exception)) + result.output)
    return result.exit_code, json.loads(out.read_text()), result.stdout


def quantized(tmp_path, scheme, family="bert", name="model", **kwargs) -> Path:
    source = write_checkpoint(tmp_path / f"{name}.safetensors", family, **kwargs)
    output = tmp_path / f"{name}.{scheme}.safetensors"
    quantize_checkpoint(source, output, QuantizeOptions(scheme=scheme))
    return output


def rewrite(path: Path, tensors=None, record=None) -> None:
    """Rewrite a safetensors file in place with changed tensors and/or gelugemm record, the
    rest of its metadata kept. The record holds the source's sha256, not the file's own, so
    a rewritten quantized file still finds its reference: what changed is what is tested."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        current = {name: f.get_tensor(name) for name in f.keys()}
    if tensors is not None:
        tensors(current)
    if record is not None:
        changed = json.loads(metadata[RECORD_KEY])
        record(changed)
        metadata[RECORD_KEY] = json.dumps(changed)
    save_file(current, str(path), metadata=metadata)


def failed_rows(report: dict) -> list[tuple[str, str]]:
    return [(row["layer"], row["dtype"]) for row in report["rows"] if not row["passed"]]


# ---- passes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2"])  # out_in + erf, in_out (Conv1D) + tanh
@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_a_correct_quantization_passes(tmp_path, scheme, family):
    code, report, out = verify_json(tmp_path, quantized(tmp_path, scheme, family), "--dtype", "all")
    assert code == 0, out
    assert report["kind"] == "quantized" and report["dtypes"] == ["fp16", "bf16", "fp32", scheme]
    # --backend auto: Triton on a CUDA machine, the torch reference elsewhere; said in the header
    assert report["backend"] == AUTO_BACKEND and all(row["backend"] == AUTO_BACKEND for row in report["rows"])
    assert f"backend: {AUTO_BACKEND} ({AUTO_BACKEND_REASON}" in out
    assert report["passed"] and "PASS: all 8 rows" in out
    # one timing line: seconds, seconds per MLP, the phases (the source's sha256 checked
    # among them) and the one that dominates; the phases add up to the seconds
    timing = report["timing"]
    assert timing["seconds"] == report["seconds"] and timing["per_mlp_s"] == pytest.approx(timing["seconds"] / 2)
    assert {"read", "to device", "references", "op", "metrics", "sha256", "other"} <= set(timing["phases"])
    assert sum(timing["phases"].values()) == pytest.approx(timing["seconds"], rel=1e-6)
    assert f"time: {timing['seconds']:.1f} s, {timing['per_mlp_s']:.2f} s per MLP; " in out
    assert f"{timing['dominant']} dominates" in out


def test_an_original_checkpoint_passes_every_dtype_and_the_table_shows_the_json(tmp_path):
    source = write_checkpoint(tmp_path / "m.safetensors", "vit")
    code, report, out = verify_json(tmp_path, source)
    assert code == 0, out
    assert report["kind"] == "original" and report["dtypes"] == list(DTYPES)
    assert [row["scheme"] for row in report["rows"][:5]] == ["fp16", "bf16", "fp32", "w8a16:group:128", "w8a8:dynamic"]
    assert "w8a16 group:128" in out and "w8a8 dynamic" in out
    assert len(report["rows"]) == 2 * 5
    for row in report["rows"]:
        assert f"{row['vs_fp16_path']['rel_frobenius']:.2e}" in out
        assert f"{row['vs_float64']['rel_frobenius']:.2e}" in out
    for layer in report["layers"]:
        assert f"{layer['fp16_path_vs_float64']['rel_frobenius']:.2e}" in out
    assert "fp16 path" in out and "PASS: all 10 rows" in out
    assert "quantize" in report["timing"]["phases"]  # its int8 rows, quantized in memory


def test_the_samples_pass_on_real_activations(tmp_path):
    code, report, out = verify_json(
        tmp_path, SAMPLES / "minilm-mlp.safetensors", "--calib", SAMPLES / "minilm-calib.safetensors", "--dtype", "all"
    )
    assert code == 0, out
    assert report["calibration"]["kind"] == "file" and report["calibration"]["split"] == "verify"
    assert [layer["tokens"] for layer in report["layers"]] == [512, 512]  # the held-out quarter of 2048 rows
    assert {layer["gelu"] for layer in report["layers"]} == {"erf"}  # samples/config.json: hidden_act gelu
    assert len(report["rows"]) == 10 and report["passed"]


def test_json_to_stdout_is_pure_json(tmp_path):
    result = verify(write_checkpoint(tmp_path / "m.safetensors", "bert"), "--dtype", "fp16", "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["rows"][0]["dtype"] == "fp16"


def test_help_shows_the_defaults_in_brackets():
    result = runner.invoke(app, ["verify", "--help"], terminal_width=200)
    text = " ".join(line.strip("│ ") for line in result.stdout.splitlines())  # the help column, unwrapped
    assert "[default: all for an original checkpoint" in text and "[tokens, d_model]" in text


def test_the_triton_path_is_wired(tmp_path):
    """Under TRITON_INTERPRET=1 (conftest, no CUDA) the fused kernels run on the CPU."""
    source = write_checkpoint(tmp_path / "m.safetensors", "bert", n_layers=1)
    code, report, out = verify_json(tmp_path, source, "--backend", "triton", "--tokens", "16")
    assert code == 0, out
    assert report["backend"] == "triton" and {row["backend"] for row in report["rows"]} == {"triton"}


# ---- fails: tampered scales --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_a_tampered_scale_fails(tmp_path, scheme):
    path = quantized(tmp_path, scheme)
    code, report, _ = verify_json(tmp_path, path, "--dtype", "all")
    assert code == 0

    def times_four(tensors):
        tensors["encoder.layer.1.output.dense.weight_scale"] *= 4

    rewrite(path, tensors=times_four)
    code, report, out = verify_json(tmp_path, path, "--dtype", "all")
    assert code == 1
    assert failed_rows(report) == [("encoder.layer.1.intermediate.dense", scheme)]  # float rows use the reference
    assert "FAIL: 1 of 8 rows" in out


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_one_channel_scale_times_four_fails(tmp_path, scheme):
    """One of 16 output channels: a quarter of this small MLP's output norm, x4. (One of
    MiniLM's 384 channels moves its output by only 1.4-3.3%, under w8a16's tolerance: the
    gate grades the whole output; docs-verify.md.)"""
    path = quantized(tmp_path, scheme)

    def one_channel(tensors):
        tensors["encoder.layer.0.output.dense.weight_scale"][3] *= 4

    rewrite(path, tensors=one_channel)
    code, report, _ = verify_json(tmp_path, path)
    assert code == 1 and failed_rows(report) == [("encoder.layer.0.intermediate.dense", scheme)]


# ---- fails: a perturbed kernel result ------------------------------------------------------------


def perturb_op(monkeypatch, dtype: str, relative: float) -> None:
    """Add noise of `relative` times the output's norm to what the op returns for `dtype`."""
    real = FusedMLP.forward

    def noisy(self, x, *args):
        out = real(self, x, *args)
        if self.config.dtype != dtype:
            return out
        # drawn on the CPU (the same noise on every device), added where the op's output is
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device)
        return (out.float() + noise * (relative * out.float().norm() / noise.norm())).to(out.dtype)

    monkeypatch.setattr(FusedMLP, "forward", noisy)
    monkeypatch.setattr(FusedMLP, "__call__", noisy)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_perturbed_op_fails_exactly_where_perturbed(tmp_path, monkeypatch, dtype):
    source = write_checkpoint(tmp_path / "m.safetensors", "bert")
    tol = DEFAULT_TOLERANCES[default_key(dtype)]  # quantize's default scheme, for int8
    perturb_op(monkeypatch, dtype, 2 * tol)
    code, report, _ = verify_json(tmp_path, source)
    assert code == 1
    assert failed_rows(report) == [(f"encoder.layer.{i}.intermediate.dense", dtype) for i in (0, 1)]
    row = next(r for r in report["rows"] if r["dtype"] == dtype)
    assert 1.5 * tol < row["vs_fp16_path"]["rel_frobenius"] < 2.5 * tol
    # --tol moves the gate: the same perturbed run passes when allowed 3x the noise.
    code, _, _ = verify_json(tmp_path, source, "--tol", f"{dtype}={6 * tol}")
    assert code == 0


def test_a_perturbed_triton_kernel_fails(tmp_path, monkeypatch):
    """The fused float path's output is 1% off: GEMM2 of the two launches, or the one-launch
    MLP that small models take (the kernels the op calls on CUDA)."""
    source = write_checkpoint(tmp_path / "m.safetensors", "bert", n_layers=1)
    real, real_fused = op_module.gemm_bias_act, op_module.fused_mlp

    def off_by_one_percent(a, w, bias=None, *, activation="none", **kw):
        out = real(a, w, bias, activation=activation, **kw)
        return out * 1.01 if activation == "none" else out

    monkeypatch.setattr(op_module, "gemm_bias_act", off_by_one_percent)
    monkeypatch.setattr(op_module, "fused_mlp", lambda *args, **kw: real_fused(*args, **kw) * 1.01)
    code, report, _ = verify_json(tmp_path, source, "--backend", "triton", "--tokens", "16", "--dtype", "fp16,fp32")
    assert code == 1 and report["backend"] == "triton"
    assert [row["passed"] for row in report["rows"]] == [False, False]


def test_nan_in_the_output_fails(tmp_path, monkeypatch):
    perturb_op(monkeypatch, "w8a8", float("nan"))
    code, report, out = verify_json(tmp_path, write_checkpoint(tmp_path / "m.safetensors", "bert"), "--dtype", "w8a8")
    assert code == 1 and report["rows"][0]["vs_fp16_path"]["rel_frobenius"] is None
    assert "NaN or Inf" in out


# ---- fails: a wrong GELU flavour --------------------------------------------------------------------
#
# On typical activations the two flavours differ by ~1e-4 of the MLP's output: less than
# any tolerance. They differ by 10% and more in GELU's negative tail (GELU(-3) is -0.0040
# with erf, -0.0036 with tanh), so these checkpoints put the pre-activations there.


def gelu_tail_checkpoint(path: Path, center: float, tail_fraction: float) -> Path:
    """A plain MLP whose pre-activations sit near `center` on `tail_fraction` of its d_ff
    channels (their W2 columns x10 so they count in the output), near 0.5 on the rest."""
    g = torch.Generator().manual_seed(1)
    d_model, d_ff = 16, 48
    tail = int(d_ff * tail_fraction)
    w1 = torch.randn(d_ff, d_model, generator=g) * 0.25 / d_model**0.5
    b1 = torch.cat([torch.full((tail,), center), torch.full((d_ff - tail,), 0.5)]) + 0.1 * torch.randn(d_ff, generator=g)
    w2 = torch.randn(d_model, d_ff, generator=g) / d_ff**0.5
    w2[:, :tail] *= 10
    return write_checkpoint(path, tensors={"w1": w1, "b1": b1, "w2": w2})


# Which rows see a wrong flavour, and on what: fp16 and fp32 where half the channels sit at
# -3 (the fp16 path itself stays within 6.4e-4 of exact there); w8a16 needs all of them at
# -3.5 (a 14% change against its 6% tolerance). docs-verify.md says which rows cannot.
SENSITIVE = {"fp16": (-3.0, 0.5), "fp32": (-3.0, 0.5), "w8a16": (-3.5, 1.0)}


@pytest.mark.parametrize("dtype", list(SENSITIVE))
def test_an_op_computing_the_other_flavour_fails(tmp_path, monkeypatch, dtype):
    source = gelu_tail_checkpoint(tmp_path / "m.safetensors", *SENSITIVE[dtype])
    # The torch backend on every machine (auto would pick Triton on CUDA, which has its own test below).
    args = ("--backend", "torch", "--dtype", dtype)
    code, report, out = verify_json(tmp_path, source, *args)
    assert code == 0, out  # the right flavour passes on these inputs

    # The op's torch backend computes GELU with kernels.reference.gelu; verify's references
    # use F.gelu, so only the op is swapped.
    right = reference_module.gelu
    monkeypatch.setattr(reference_module, "gelu", lambda x, flavour="erf": right(x, "tanh" if flavour == "erf" else "erf"))
    code, report, _ = verify_json(tmp_path, source, *args)
    assert code == 1 and report["rows"][0]["backend"] == "torch"
    assert report["rows"][0]["vs_fp16_path"]["rel_frobenius"] > 2 * DEFAULT_TOLERANCES[default_key(dtype)]


def test_a_triton_kernel_computing_the_other_flavour_fails(tmp_path, monkeypatch):
    source = gelu_tail_checkpoint(tmp_path / "m.safetensors", *SENSITIVE["fp16"])
    args = ("--backend", "triton", "--tokens", "32", "--dtype", "fp16")
    assert verify_json(tmp_path, source, *args)[0] == 0
    real, real_fused = op_module.gemm_bias_act, op_module.fused_mlp
    swapped = {"erf": "tanh", "tanh": "erf", "none": "none"}
    monkeypatch.setattr(op_module, "gemm_bias_act", lambda a, w, b=None, *, activation="none", **kw: real(a, w, b, activation=swapped[activation], **kw))
    monkeypatch.setattr(op_module, "fused_mlp", lambda *args, activation, **kw: real_fused(*args, activation=swapped[activation], **kw))
    code, report, _ = verify_json(tmp_path, source, *args)
    assert code == 1 and report["rows"][0]["backend"] == "triton"


def test_quantized_metadata_with_the_wrong_flavour_fails_by_its_numbers(tmp_path):
    """The int8 row runs the flavour the file records; the references run the model's."""
    source = gelu_tail_checkpoint(tmp_path / "m.safetensors", *SENSITIVE["w8a16"])
    path = tmp_path / "q.safetensors"
    quantize_checkpoint(source, path, QuantizeOptions(scheme="w8a16"))
    assert verify_json(tmp_path, path)[0] == 0

    def say_tanh(record):
        for layer in record["layers"]:
            layer["gelu"] = "tanh"

    rewrite(path, record=say_tanh)
    code, report, out = verify_json(tmp_path, path)
    assert code == 1
    row = report["rows"][0]
    assert row["gelu"] == "tanh" and report["layers"][0]["gelu"] == "erf"
    assert row["vs_fp16_path"]["rel_frobenius"] > 2 * DEFAULT_TOLERANCES[row["scheme"]]  # the numbers see it here
    assert "the quantized file says GELU tanh" in out


def test_a_flavour_mismatch_fails_even_where_the_numbers_cannot_see_it(tmp_path):
    """Quantized under a config.json that said tanh; the model's config.json is then corrected.
    On ordinary inputs the flavours differ by less than w8a16's tolerance; verify compares the
    file's flavour with its reference's and fails the row."""
    source = write_checkpoint(tmp_path / "m.safetensors", "bert", config={"hidden_act": "gelu_new"})
    path = tmp_path / "q.safetensors"
    quantize_checkpoint(source, path, QuantizeOptions(scheme="w8a16"))
    assert verify_json(tmp_path, path)[0] == 0
    (tmp_path / "config.json").write_text(json.dumps({"hidden_act": "gelu"}))
    code, report, out = verify_json(tmp_path, path)
    assert code == 1
    for row in report["rows"]:
        assert row["vs_fp16_path"]["rel_frobenius"] < DEFAULT_TOLERANCES[row["scheme"]]
        assert row["problem"] == "runs GELU tanh (config.json hidden_act=gelu_new); the reference is erf (config.json hidden_act=gelu)"
    # Saying the model's flavour outright agrees with the file again.
    code, _, _ = verify_json(tmp_path, path, "--gelu", "tanh")
    assert code == 0


# ---- references and inputs ----------------------------------------------------------------------


def test_a_reference_that_is_not_the_recorded_source_is_used_and_said(tmp_path):
    path = quantized(tmp_path, "w8a16")
    copy = tmp_path / "copy.safetensors"
    # Same tensors, other bytes (metadata): another sha256.
    save_file(checkpoint_tensors("bert"), str(copy), metadata={"note": "a copy"})
    code, report, out = verify_json(tmp_path, path, "--reference", copy)
    assert code == 0, out
    assert report["reference"] == {**report["reference"], "path": str(copy), "how": "--reference", "matches_record": False}
    assert "is not the file" in out


def test_the_recorded_calibration_file_is_the_default_input(tmp_path):
    source = write_checkpoint(tmp_path / "m.safetensors", "bert")
    calib = tmp_path / "calib.safetensors"
    save_file({f"encoder.layer.{i}.intermediate.dense": torch.randn(40, 16) for i in (0, 1)}, str(calib))
    path = tmp_path / "q.safetensors"
    quantize_checkpoint(source, path, QuantizeOptions(scheme="w8a8", activations="static", calib=calib))
    code, report, _ = verify_json(tmp_path, path)
    assert code == 0
    assert report["calibration"]["kind"] == "file" and report["calibration"]["from"].startswith("quantize's")
    assert [layer["tokens"] for layer in report["layers"]] == [10, 10]  # the last quarter of 40 rows
    calib.unlink()
    # Then synthetic inputs, said (they are not what w8a8 was calibrated for: it may fail).
    _, report, out = verify_json(tmp_path, path)
    assert report["calibration"]["kind"] == "synthetic"
    assert "is missing: verifying on synthetic inputs" in out


# ---- bad inputs: exit 2, one line ----------------------------------------------------------------


def bad_inputs(tmp_path) -> dict[str, tuple[list, str]]:
    """name -> (arguments after `verify`, what the one line must say)."""
    good = write_checkpoint(tmp_path / "good.safetensors", "bert")
    q = tmp_path / "good.w8a16.safetensors"
    quantize_checkpoint(good, q, QuantizeOptions(scheme="w8a16"))
    orphan_dir = tmp_path / "orphan"
    orphan_dir.mkdir()
    orphan_source = write_checkpoint(orphan_dir / "source.safetensors", "bert")
    orphan = orphan_dir / "q.safetensors"
    quantize_checkpoint(orphan_source, orphan, QuantizeOptions(scheme="w8a16"))
    orphan_source.unlink()
    changed_dir = tmp_path / "changed"
    changed_dir.mkdir()
    changed_source = write_checkpoint(changed_dir / "source.safetensors", "bert")
    changed = changed_dir / "q.safetensors"
    quantize_checkpoint(changed_source, changed, QuantizeOptions(scheme="w8a16"))
    write_checkpoint(changed_source, "bert", seed=5)
    narrow = write_checkpoint(tmp_path / "narrow.safetensors", "bert", d_ff=32)
    other_names = write_checkpoint(tmp_path / "gpt2.safetensors", "gpt2")
    nan = checkpoint_tensors("bert")
    nan["encoder.layer.1.intermediate.dense.weight"][3, 4] = float("nan")
    corrupt = corrupt_files(tmp_path)
    one_layer_calib = write_calibration(tmp_path / "calib.safetensors", {"encoder.layer.0.intermediate.dense": torch.randn(8, 16)})
    return {
        "missing file": ([tmp_path / "missing.safetensors"], "no such file"),
        "not safetensors": ([corrupt["not safetensors"]], "not a valid safetensors file"),
        "truncated": ([corrupt["truncated data"]], "not a valid safetensors file"),
        "source missing, no --reference": ([orphan], "pass --reference PATH"),
        "source changed": ([changed], "has changed since"),
        "--reference missing": ([orphan, "--reference", tmp_path / "nope.safetensors"], "no such file"),
        "--reference wrong shapes": ([q, "--reference", narrow], "d_ff 32"),
        "--reference without the layers": ([q, "--reference", other_names], "has no MLP encoder.layer.0.intermediate.dense"),
        "--reference is quantized": ([q, "--reference", q], "was written by gelugemm quantize"),
        "--reference with an original": ([good, "--reference", good], "--reference is for a file written by quantize"),
        "unknown dtype": ([good, "--dtype", "int4"], "--dtype: unknown 'int4'"),
        "an empty dtype between commas": ([good, "--dtype", "fp16,,bf16"], "an empty item between commas"),
        "an infinite tol": ([good, "--tol", "inf"], "must be a positive finite number"),
        "the other int8 scheme": ([q, "--dtype", "w8a8"], "cannot be verified as w8a8"),
        "layers matching nothing": ([good, "--layers", "decoder"], "matches none of the 2 MLPs"),
        "bad regex": ([good, "--layers", "("], "not a valid regular expression"),
        "nan weights": ([write_checkpoint(tmp_path / "nan.safetensors", tensors=nan)], "NaN/Inf"),
        "bad tol": ([good, "--tol", "-1"], "--tol"),
        "tol for an unknown dtype": ([good, "--tol", "int4=0.1"], "--tol"),
        "zero tokens": ([good, "--tokens", "0"], "--tokens must be at least 1"),
        "bad backend": ([good, "--backend", "cuda"], "backend must be one of"),
        "bad gelu": ([good, "--gelu", "relu"], "--gelu"),
        "missing calib": ([good, "--calib", tmp_path / "nope.safetensors"], "no such file"),
        "calib without a layer": ([good, "--calib", one_layer_calib], "has no tensor 'encoder.layer.1.intermediate.dense'"),
    }


def test_each_bad_input_is_one_red_line_and_exit_2(tmp_path):
    for what, (args, message) in bad_inputs(tmp_path).items():
        result = verify(*args)
        assert result.exit_code == 2, (what, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), (what, result.stderr)
        assert message in result.stderr, (what, result.stderr)
        assert "Traceback" not in result.output


def test_triton_where_it_cannot_run_is_exit_2(tmp_path, monkeypatch):
    monkeypatch.setattr(op_module, "triton_can_run", lambda device: False)
    result = verify(write_checkpoint(tmp_path / "m.safetensors", "bert"), "--backend", "triton")
    assert result.exit_code == 2 and "needs a CUDA device" in result.stderr


def test_more_tokens_than_the_verify_split_holds_is_said(tmp_path):
    """--tokens past the file's verify split used to be capped without a word."""
    code, report, _ = verify_json(
        tmp_path, SAMPLES / "minilm-mlp.safetensors", "--calib", SAMPLES / "minilm-calib.safetensors", "--dtype", "fp16",
        "--tokens", "100000",
    )  # fmt: skip
    held_out = {layer["tokens"] for layer in report["layers"]}
    assert code == 0 and max(held_out) < 100000
    assert any(f"verified on {max(held_out)} rows" in note and "--tokens 100000" in note for note in report["notes"])
