"""calibration/verify.py and calibration/metrics.py: the metrics, the two references, the
options, and what a report holds. The command's pass/fail/exit-code behaviour is in
test_verify_cli.py."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from calibration.errors import OptionError
from calibration.metrics import error_metrics
from calibration.options import QuantizeOptions
from calibration.quantize import quantize_checkpoint
from calibration.verify import (
    DEFAULT_TOLERANCES,
    default_key,
    default_tolerance,
    parse_dtypes,
    parse_tolerances,
    torch_mlp,
    verify_checkpoint,
)
from checkpoints import write_checkpoint
from conftest import AUTO_BACKEND, AUTO_BACKEND_REASON, DEVICE, TOL_VS_FLOAT64, TOL_VS_REFERENCE, rel_err
from kernels.op import DTYPES
from kernels.reference import mlp_reference


def test_metrics_of_a_known_error():
    ref = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    out = ref * 1.01  # rel. error 0.01, same direction
    m = error_metrics(out, ref)
    assert m.rel_frobenius == pytest.approx(0.01)
    assert m.sqnr_db == pytest.approx(40.0)
    assert m.cosine == pytest.approx(1.0)
    assert m.max_abs == pytest.approx(0.04)
    orthogonal = error_metrics(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert orthogonal.cosine == pytest.approx(0.0) and orthogonal.rel_frobenius == pytest.approx(math.sqrt(2))


def test_metrics_of_an_exact_match_and_of_nan():
    ref = torch.randn(4, 8)
    exact = error_metrics(ref.clone(), ref)
    assert exact.rel_frobenius == 0 and exact.sqnr_db == math.inf
    assert exact.to_dict()["sqnr_db"] is None  # JSON has no inf
    bad = ref.clone()
    bad[1, 2] = float("nan")
    m = error_metrics(bad, ref)
    assert not m.finite and m.rel_frobenius == math.inf
    json.dumps(m.to_dict(), allow_nan=False)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("gelu", ["erf", "tanh"])
def test_fp16_path_is_eager_torch_in_fp16_and_float64_is_exact(gelu, layout):
    d, f = 24, 40
    w1, b1, w2, b2 = torch.randn(f, d) / d**0.5, torch.randn(f), torch.randn(d, f) / f**0.5, torch.randn(d)
    x = torch.randn(10, d)
    stored1, stored2 = (w1, w2) if layout == "out_in" else (w1.t().contiguous(), w2.t().contiguous())
    fp16 = torch_mlp(x, stored1, b1, stored2, b2, gelu=gelu, weight_layout=layout, dtype=torch.float16)
    h = F.gelu(F.linear(x.half(), w1.half(), b1.half()), approximate="none" if gelu == "erf" else "tanh")
    eager = F.linear(h, w2.half(), b2.half())
    assert fp16.dtype == torch.float16
    if layout == "out_in":
        assert torch.equal(fp16, eager)  # the same three calls on the same tensors
    else:
        # Conv1D weights run through a transposed view: another fp16 GEMM path on CPU, which
        # rounds differently for about 1 seed in 10 (seed 15: 1 ulp); fp16 tolerance, not equality.
        assert rel_err(fp16, eager) <= TOL_VS_REFERENCE[torch.float16]
    # float64 through F.gelu agrees with the op's own reference in float64: two implementations.
    exact = torch_mlp(x, stored1, b1, stored2, b2, gelu=gelu, weight_layout=layout, dtype=torch.float64)
    ours = mlp_reference(*(t.double() for t in (x, stored1, b1, stored2, b2)), gelu_flavour=gelu, weight_layout=layout)
    assert (exact - ours).abs().max() < 1e-12
    other = torch_mlp(x, stored1, b1, stored2, b2, gelu="tanh" if gelu == "erf" else "erf", weight_layout=layout, dtype=torch.float64)
    assert (exact - other).abs().max() > 1e-6  # the flavour is not ignored


def test_parse_dtypes_and_tolerances():
    assert parse_dtypes("bf16, w8a8,bf16") == ["bf16", "w8a8"]
    assert parse_dtypes("all") == ["all"]
    with pytest.raises(OptionError, match="unknown 'int4'"):
        parse_dtypes("fp16,int4")
    assert parse_tolerances("0.02") == 0.02
    assert parse_tolerances("bf16=0.01, w8a8=0.3") == {"bf16": 0.01, "w8a8": 0.3}
    for bad in ("0", "-1", "nan", "inf", "x", "bf16=", "int4=0.1", "bf16=0.1,w8a8"):
        with pytest.raises(OptionError, match="--tol"):
            parse_tolerances(bad)


def test_one_tolerance_per_dtype_and_int8_scheme_written_once():
    assert set(DEFAULT_TOLERANCES) == {
        "fp16", "bf16", "fp32", "w8a16:per-channel", "w8a16:group:128", "w8a8:dynamic", "w8a8:group:128", "w8a8:static"
    }  # fmt: skip
    # every dtype's default scheme has its own
    assert [default_key(d) for d in DTYPES] == ["fp16", "bf16", "fp32", "w8a16:group:128", "w8a8:dynamic"]
    t = DEFAULT_TOLERANCES
    # Looser where the path rounds more: fp16 < bf16 < w8a16, finer scales tighter, static the loosest.
    assert t["fp16"] < t["bf16"] < t["w8a16:group:128"] < t["w8a16:per-channel"] < t["w8a8:dynamic"]
    assert t["w8a8:group:128"] < t["w8a8:dynamic"] < t["w8a8:static"]
    # Group sizes the table does not name: a finer group takes group:128's, a coarser w8a16 one per-channel's.
    assert default_tolerance("w8a8:group:32") == t["w8a8:group:128"] and default_tolerance("w8a16:group:64") == t["w8a16:group:128"]
    assert default_tolerance("w8a16:group:512") == t["w8a16:per-channel"]


def test_tolerances_by_dtype_or_by_scheme():
    assert parse_tolerances("w8a8=0.3,w8a8:static=0.2,w8a16:group:64=0.01") == {"w8a8": 0.3, "w8a8:static": 0.2, "w8a16:group:64": 0.01}
    for bad, message in (("w8a8:per-channel=0.1", "activations must be"), ("w8a16:dynamic=0.1", "granularity must be"),
                         ("fp16:x=0.1", "--tol takes"), ("w4a4=0.1", "--tol takes"), ("w8a8=0.1,bf16", "--tol takes")):  # fmt: skip
        with pytest.raises(OptionError, match=message):
            parse_tolerances(bad)


def test_report_holds_both_distances_and_the_run_facts(tmp_path):
    source = write_checkpoint(tmp_path / "m.safetensors", "bert", config={"hidden_act": "gelu"})
    done = []
    report = verify_checkpoint(source, "fp16,w8a8", tol={"w8a8": 0.3}, progress=lambda *a: done.append(a))
    assert [(r.layer, r.dtype, r.scheme) for r in report.rows] == [
        (f"encoder.layer.{i}.intermediate.dense", d, k) for i in (0, 1) for d, k in (("fp16", "fp16"), ("w8a8", "w8a8:dynamic"))
    ]
    assert [a[:2] for a in done] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    # backend "auto" on the default device: Triton on a CUDA machine, the torch reference elsewhere
    assert report.backend_asked == "auto" and report.device.startswith(DEVICE.type)
    assert report.backend == AUTO_BACKEND and report.backend_reason.startswith(AUTO_BACKEND_REASON)
    assert report.tolerances == {"fp16": DEFAULT_TOLERANCES["fp16"], "w8a8:dynamic": 0.3}
    assert report.tolerance_origin == {"fp16": "default", "w8a8:dynamic": "asked"}
    assert report.calibration["split"] == "verify" and report.calibration["kind"] == "synthetic"
    # quantize's defaults: dynamic activations, no observer, no calibration rows
    assert report.in_memory_quantization["w8a8"] == {"granularity": "per-channel", "activations": "dynamic", "method": None, "smooth": None}
    for layer in report.layers:
        assert layer.gelu == "erf" and layer.tokens == 512
        assert 0 < layer.fp16_path_vs_float64.rel_frobenius < TOL_VS_FLOAT64[torch.float16]
    for row in report.rows:
        assert row.passed and row.backend == AUTO_BACKEND
        # Two references, two distances: they differ by the fp16 path's own rounding.
        assert row.vs_fp16_path.rel_frobenius != row.vs_float64.rel_frobenius
    payload = report.to_dict()
    json.dumps(payload, allow_nan=False)
    assert payload["passed"] is True and payload["failed"] == 0 and payload["backend"] == AUTO_BACKEND


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_in_memory_quantization_is_what_quantize_writes(tmp_path, scheme):
    """An original checkpoint's int8 rows equal those of the file `quantize` writes by default."""
    source = write_checkpoint(tmp_path / "m.safetensors", "gpt2")
    quantized = tmp_path / "q.safetensors"
    quantize_checkpoint(source, quantized, QuantizeOptions(scheme=scheme))
    in_memory = verify_checkpoint(source, scheme)
    from_file = verify_checkpoint(quantized, scheme)
    assert from_file.kind == "quantized" and from_file.reference["how"] == "source recorded in the quantized file"
    for a, b in zip(in_memory.rows, from_file.rows, strict=True):
        assert a.vs_fp16_path == b.vs_fp16_path and a.vs_float64 == b.vs_float64


def test_reading_through_one_staging_buffer_gives_the_mlp_s_own_tensors(tmp_path):
    """On a GPU verify reads each float tensor into one pinned buffer and copies it to the
    device from there: every tensor arrives whole and in its own memory (here on the CPU)."""
    from calibration.checkpoint import find_mlps, open_checkpoint, read_mlp
    from calibration.safetensors_stream import ReadBuffer
    from calibration.timing import PhaseTimer
    from calibration.verify import _read_to_device

    path = write_checkpoint(tmp_path / "m.safetensors", "bert")
    with open_checkpoint(path) as ckpt:
        layer = find_mlps(path)[1]
        want = read_mlp(ckpt, layer)
        timer = PhaseTimer()
        got = _read_to_device(ckpt, layer, torch.device("cpu"), ReadBuffer(), timer)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a, b)
    pointers = [t.data_ptr() for t in got if t is not None]
    assert len(set(pointers)) == len(pointers)  # none left pointing into the buffer
    assert {"read", "to device"} <= set(timer.facts()["phases"])
