"""kernels/bench.py, kernels/peers.py and `gelugemm bench`: everything but the timings.

The arithmetic is checked against numbers worked out by hand (and the floors against
DESIGN.md's table); the run itself goes through on the CPU with Triton's interpreter,
fake ceilings and a fake clock, so planning, rotation, the float64 check, shared peer
measurements and speedups are exercised without a GPU. No test asserts a time.
"""

import json
import math
import re
import sys

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

import kernels.bench as bench
from bench_helpers import BIG, H100, synthetic_result, synthetic_row
from checkpoints import write_checkpoint
from conftest import HAS_CUDA, randn, rel_err
from gelugemm_cli import bench as bench_cli
from gelugemm_cli.app import app
from kernels import peers
from kernels.bench import (
    Ceilings,
    MLPShape,
    Timing,
    fill_best_peer,
    mlp_flops,
    mlp_min_bytes,
    relerr_limit,
    roofline_floor_us,
    rotation_sets,
)
from kernels.errors import GelugemmError
from kernels.reference import mlp_reference, w8a8_mlp_reference
from calibration.model import checkpoint_shapes
from kernels.int8 import quantize_weight

SMALL = MLPShape(768, 3072)

runner = CliRunner()


# ---- arithmetic -------------------------------------------------------------------------------


def test_flops_and_min_bytes_by_hand():
    assert mlp_flops(1, BIG) == 2 * 2 * 4096 * 16384 == 268_435_456
    assert mlp_flops(2048, BIG) == 549_755_813_888
    # fp16: two weights 2*4096*16384*2 = 268,435,456; biases (16384+4096)*2 = 40,960;
    # x and y 2*1*4096*2 = 16,384.
    assert mlp_min_bytes(1, BIG, "fp16") == 268_435_456 + 40_960 + 16_384 == 268_492_800
    assert mlp_min_bytes(1, BIG, "bf16") == 268_492_800
    # int8: weights 134,217,728 + float32 scales (16384+4096)*4 = 81,920; biases and x, y as fp16.
    assert mlp_min_bytes(1, BIG, "w8a16") == 134_217_728 + 81_920 + 40_960 + 16_384 == 134_356_992
    assert mlp_min_bytes(1, BIG, "w8a8") == mlp_min_bytes(1, BIG, "w8a16")
    # x and y grow with M: 2 * M * d * 2 bytes.
    assert mlp_min_bytes(8192, BIG, "fp16") - mlp_min_bytes(1, BIG, "fp16") == 2 * 8191 * 4096 * 2
    # 768x3072 fp16: 9,437,184 + 7,680 + 3,072.
    assert mlp_min_bytes(1, SMALL, "fp16") == 9_447_936


@pytest.mark.parametrize(
    "m,dtype,floor_us,bound",
    [
        (1, "fp16", 88.905, "bytes"),  # DESIGN.md: 89 (bytes)
        (128, "fp16", 89.59, "bytes"),  # 90 (bytes)
        (2048, "fp16", 680.52, "flops"),  # 681 (FLOPs)
        (8192, "bf16", 2722.1, "flops"),  # 2722 (FLOPs)
        (1, "w8a16", 44.49, "bytes"),  # "int8 bytes floor: 44 µs"
        (8192, "w8a8", 2298.4, "flops"),  # on the int8 ceiling
    ],
)
def test_roofline_floor_matches_design_table(m, dtype, floor_us, bound):
    got_us, got_bound = roofline_floor_us(mlp_flops(m, BIG), mlp_min_bytes(m, BIG, dtype), H100, dtype)
    assert got_bound == bound
    assert got_us == pytest.approx(floor_us, rel=1e-3)


def test_w8a8_falls_back_to_the_float_ceiling_without_int8():
    no_int8 = Ceilings(807.856, None, 3019.997)
    got_us, _ = roofline_floor_us(mlp_flops(8192, BIG), mlp_min_bytes(8192, BIG, "w8a8"), no_int8, "w8a8")
    assert got_us == pytest.approx(2722.1, rel=1e-3)


def test_rotation_sets_cover_three_l2s():
    l2 = 50 * 2**20
    # 768x3072 fp16 at M=1 moves 9,447,936 bytes a call: ceil(3 * 52,428,800 / 9,447,936) = 17.
    assert rotation_sets(mlp_min_bytes(1, SMALL, "fp16"), l2) == 17
    assert rotation_sets(mlp_min_bytes(1, SMALL, "w8a16"), l2) == 34  # half the weight bytes
    assert rotation_sets(mlp_min_bytes(1, BIG, "fp16"), l2) == 1  # 268 MB: L2-cold by size
    assert rotation_sets(100, l2) == bench.MAX_ROTATION_SETS


def test_relerr_limits_follow_what_each_impl_rounds():
    assert relerr_limit("fp16", "gelugemm") == bench.RELERR_LIMITS["fp16"]
    assert relerr_limit("bf16", "eager") == bench.RELERR_LIMITS["bf16"]
    assert relerr_limit("w8a8", "gelugemm") == relerr_limit("w8a8", "int_mm") == bench.RELERR_LIMITS["w8a8"]
    # a float peer in an int8 group, and w8a16 (weights dequantized exactly in the reference)
    assert relerr_limit("w8a8", "eager", "bf16") == bench.RELERR_LIMITS["bf16"]
    assert relerr_limit("w8a16", "gelugemm", "fp16") == bench.RELERR_LIMITS["fp16"]


# ---- a synthetic result: metrics, speedups, JSON, table -----------------------------------------


def test_metrics_by_hand():
    row = synthetic_row("gelugemm", 800.0)
    assert row.tflops == pytest.approx(549_755_813_888 / 800e-6 / 1e12)  # 687.2
    assert row.gbps == pytest.approx(mlp_min_bytes(2048, BIG, "fp16") / 800e-6 / 1e9)
    assert row.pct_of_floor == pytest.approx(680.52 / 800 * 100, rel=1e-3)
    untimed = synthetic_row("gelugemm", None, status="error")
    assert untimed.tflops is None and untimed.pct_of_floor is None


def test_speedups_compare_like_gelu_with_like():
    result = synthetic_result()
    by = {(r.dtype, r.impl, r.gelu): r for r in result.rows}
    assert by[("fp16", "eager", "erf")].speedup == pytest.approx(862 / 760)
    assert by[("fp16", "eager", "erf")].speedup_vs == "gelugemm erf"
    assert by[("fp16", "cublaslt", "tanh")].speedup == pytest.approx(823 / 770)  # against gelugemm tanh
    assert by[("fp16", "cublaslt", "tanh")].speedup_vs == "gelugemm tanh"
    assert by[("fp16", "gelugemm", "erf")].speedup is None
    # No timed gelugemm in the group: no speedup rather than a wrong one.
    assert by[("w8a16", "eager", "erf")].speedup is None


def test_best_peer_is_the_fastest_measured_peer_of_any_gelu():
    by = {(r.dtype, r.impl, r.gelu): r for r in synthetic_result().rows}
    erf, tanh = by[("fp16", "gelugemm", "erf")], by[("fp16", "gelugemm", "tanh")]
    # cuBLASLt (823, tanh) is faster than eager (862) and compile (876): the bar for both rows
    assert (erf.best_peer, erf.best_peer_us) == ("cublaslt (tanh)", 823.0)
    assert erf.vs_best_peer == pytest.approx(823 / 760) and erf.beats_best_peer is True
    assert (tanh.best_peer, tanh.vs_best_peer, tanh.beats_best_peer) == ("cublaslt", pytest.approx(823 / 770), True)
    # a gelugemm row that was not measured has no verdict; peers carry none
    w8a16 = by[("w8a16", "gelugemm", "erf")]
    assert (w8a16.best_peer, w8a16.vs_best_peer, w8a16.beats_best_peer) == ("eager fp16", None, None)
    assert all(r.best_peer is None and r.beats_best_peer is None for r in synthetic_result().rows if r.impl != "gelugemm")


def test_best_peer_of_an_int8_row_counts_the_float_peers_and_skips_wrong_ones():
    w8a8 = dict(dtype="w8a8", activations="dynamic")  # every row of a group carries its variant
    rows = [
        synthetic_row("gelugemm", 900.0, **w8a8),
        synthetic_row("eager", 862.0, **w8a8),  # fp16 eager in the int8 group: the fastest measured right
        synthetic_row("cublaslt", 700.0, gelu="tanh", status="wrong", relerr=0.5, **w8a8),  # does not count
        synthetic_row("compile", None, status="error", relerr=None, **w8a8),
        synthetic_row("int_mm", 1200.0, **w8a8),
        synthetic_row("gelugemm", 500.0, m=16, **w8a8),
        synthetic_row("int_mm", 520.0, m=16, **w8a8),  # another M: its own group
        synthetic_row("gelugemm", 300.0, m=1, **w8a8),  # no peer at M=1
        synthetic_row("int_mm", 250.0, m=1, dtype="w8a8", activations="static"),  # another variant's peer
    ]  # fmt: skip
    fill_best_peer(rows)
    big, small, alone = rows[0], rows[5], rows[7]
    assert (big.best_peer, big.best_peer_us) == ("eager fp16", 862.0)
    assert big.vs_best_peer == pytest.approx(862 / 900) and big.beats_best_peer is False
    assert (small.best_peer, small.vs_best_peer, small.beats_best_peer) == ("int_mm", pytest.approx(520 / 500), True)
    assert (alone.best_peer, alone.vs_best_peer, alone.beats_best_peer) == (None, None, None)
    # a wrong gelugemm row is not said to beat anything, however fast
    wrong = [synthetic_row("gelugemm", 1.0, status="wrong", relerr=0.5), synthetic_row("eager", 862.0)]
    fill_best_peer(wrong)
    assert (wrong[0].best_peer, wrong[0].vs_best_peer, wrong[0].beats_best_peer) == ("eager", None, None)


def test_default_tokens_include_the_medium_m_points():
    assert {256, 512, 1024} <= set(bench.DEFAULT_TOKENS)
    assert list(bench.DEFAULT_TOKENS) == sorted(bench.DEFAULT_TOKENS)


def test_failed_lists_rows_not_measured_right():
    result = synthetic_result()
    assert [(r.impl, r.status) for r in result.failed("gelugemm")] == [("gelugemm", "unavailable")]
    assert [r.impl for r in result.failed(None)] == ["gelugemm", "dequant"]


def test_json_has_rows_and_run_info():
    payload = json.loads(json.dumps(synthetic_result().to_dict()))
    info = payload["info"]
    for key in ("device", "torch", "triton", "date", "command", "cublaslt_gelu", "method", "l2_bytes"):
        assert key in info
    assert info["ceilings"] == {"matmul_tflops": 807.856, "int8_tops": 956.736, "copy_gbps": 3019.997}
    row = payload["rows"][2]
    for key in ("d_model", "d_ff", "dtype", "tokens", "impl", "gelu", "time_us", "tflops", "gbps", "floor_us",
                "floor_bound", "pct_of_floor", "speedup", "speedup_vs", "relerr", "relerr_limit", "status",
                "best_peer", "best_peer_us", "vs_best_peer", "beats_best_peer"):  # fmt: skip
        assert key in row
    ours = payload["rows"][0]
    assert (ours["impl"], ours["best_peer"], ours["beats_best_peer"]) == ("gelugemm", "cublaslt (tanh)", True)
    assert (row["impl"], row["time_us"], row["floor_bound"]) == ("eager", 862.0, "flops")


def render(renderable, width=220) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_table_renders_every_row_with_speedups_and_flags():
    result = synthetic_result()
    text = render(bench_cli.bench_table(result))
    assert "H100" in text and "torch 2.11.0+cu130" in text and "808 TFLOP/s" in text
    assert text.count("gelugemm") >= 3
    assert "1.13×" in text  # 862 / 760
    assert "1.07×" in text  # cuBLASLt (tanh) against gelugemm tanh: 823 / 770
    assert "cublaslt (tanh)" in text
    assert "vs best peer" in text
    assert "✓ 1.08× cublaslt (tanh)" in text  # 823 / 760, on the erf row
    assert "✓ 1.07× cublaslt" in text  # 823 / 770, on the tanh row
    assert "681 F" in text  # floor of the group, FLOPs-bound
    assert "unavailable" in text
    assert "✗ 5.0e-01" in text  # the wrong row is flagged, not hidden
    lines = bench_cli.problems(result)
    assert any("not implemented yet" in line for line in lines)
    assert "shape [/x] [bold]" in render("\n".join(lines))  # error text is not read as markup
    assert any("dequant" in line and "over the limit" in line for line in lines)


@pytest.mark.skipif("matplotlib" not in sys.modules and not __import__("importlib").util.find_spec("matplotlib"),
                    reason="matplotlib not installed")  # fmt: skip
def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "speedup.png"
    bench_cli.write_speedup_plot(synthetic_result(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- the CLI: options and the no-GPU path -------------------------------------------------------


@pytest.fixture(autouse=True)
def wide_stderr(monkeypatch):
    """Rich wraps at the terminal's width (80 under CliRunner): count lines of a wide one."""
    from gelugemm_cli import common

    monkeypatch.setattr(common.err_console, "width", 400)


def one_line_error(result, code=2) -> str:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--dtype", "fp16,fp8"], "--dtype: unknown 'fp8'"),
        (["--peers", "eager,tensorrt"], "--peers: unknown 'tensorrt'"),
        (["--shape", "4096"], "--shape takes d_model,d_ff"),
        (["--shape", "4096,-1"], "two positive integers"),
        (["--tokens", "1,x"], "--tokens takes positive integers"),
        (["--tokens", "0,16"], "--tokens takes positive integers"),
        (["--gelu", "relu"], "--gelu must be erf or tanh"),
        (["--activations", "dynamic,per-tensor"], "activations must be dynamic, group:N or static"),
        (["--activations", "group:48"], "group:48 is not supported"),
        (["--granularity", "group:0"], "group:N needs a positive integer N"),
        (["--dtype", "fp16,,bf16"], "--dtype 'fp16,,bf16': an empty item between commas"),
        (["--peers", "eager,"], "--peers 'eager,': an empty item between commas"),
        (["--warmup-ms", "-1"], "--warmup-ms must be a positive finite number"),
        (["--rep-ms", "0"], "--rep-ms must be a positive finite number"),
        (["--rep-ms", "nan"], "--rep-ms must be a positive finite number"),
        (["missing.safetensors"], "no such file"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args, message):
    assert message in one_line_error(runner.invoke(app, ["bench", *args]))


def test_parsers():
    assert bench_cli.parse_shape("4096,16384") == MLPShape(4096, 16384)
    assert bench_cli.parse_shape("768x3072") == MLPShape(768, 3072)
    assert bench_cli.parse_tokens("1, 16,16,2048") == [1, 16, 2048]
    assert bench_cli.parse_names("eager,compile,eager", peers.PEERS, "peers") == ["eager", "compile"]
    assert bench_cli.parse_names("none", peers.PEERS, "peers") == []


def test_plot_without_matplotlib_fails_before_the_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert "--plot needs matplotlib" in one_line_error(runner.invoke(app, ["bench", "--plot", "x.png"]))


@pytest.mark.skipif(HAS_CUDA, reason="checks the message given without a GPU")
def test_without_cuda_one_line_and_exit_2():
    line = one_line_error(runner.invoke(app, ["bench", "--dtype", "fp16", "--tokens", "1"]))
    assert "needs a CUDA GPU" in line


def test_run_bench_without_cuda_raises_a_gelugemm_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GelugemmError, match="needs a CUDA GPU"):
        bench.run_bench([SMALL], ["fp16"], [1], ["eager"])


# ---- shapes from a checkpoint -----------------------------------------------------------------


def test_checkpoint_shapes_deduplicated(tmp_path):
    path = write_checkpoint(tmp_path / "model.safetensors", "bert", n_layers=3, d_model=32, d_ff=128)
    assert checkpoint_shapes(path) == ([MLPShape(32, 128)], "erf")


def test_checkpoint_gelu_from_family_config_or_asked(tmp_path):
    gpt2 = write_checkpoint(tmp_path / "gpt2.safetensors", "gpt2", n_layers=2, d_model=16, d_ff=64)
    assert checkpoint_shapes(gpt2) == ([MLPShape(16, 64)], "tanh")  # GPT-2's default
    assert checkpoint_shapes(gpt2, "erf")[1] == "erf"
    (tmp_path / "bert").mkdir()
    bert = write_checkpoint(tmp_path / "bert" / "m.safetensors", "bert", config={"hidden_act": "gelu_new"})
    assert checkpoint_shapes(bert)[1] == "tanh"


def test_checkpoint_without_mlps_is_one_line(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "empty.safetensors"
    save_file({"embeddings.weight": torch.randn(4, 4)}, str(path))
    assert "no GELU MLP found" in one_line_error(runner.invoke(app, ["bench", str(path)]))


# ---- peers on the CPU ---------------------------------------------------------------------------


@pytest.mark.parametrize("gelu", ["erf", "tanh"])
def test_eager_and_dequant_peers_compute_the_mlp(gelu):
    d, f, m = 32, 96, 5
    w1, b1 = randn(f, d, scale=d**-0.5, device="cpu"), randn(f, scale=0.5, device="cpu")
    w2, b2 = randn(d, f, scale=f**-0.5, device="cpu"), randn(d, scale=0.5, device="cpu")
    x = randn(m, d, device="cpu")
    ref = mlp_reference(x.double(), w1.double(), b1.double(), w2.double(), b2.double(), gelu_flavour=gelu)
    assert rel_err(peers.eager_mlp(x, w1, b1, w2, b2, gelu), ref) < 1e-6
    q1, q2 = quantize_weight(w1), quantize_weight(w2)
    deq = mlp_reference(x.double(), q1.dequantize(dtype=torch.float64), b1.double(), q2.dequantize(dtype=torch.float64),
                        b2.double(), gelu_flavour=gelu)  # fmt: skip
    assert rel_err(peers.dequant_mlp(x, q1, b1, q2, b2, gelu), deq) < 1e-6


@pytest.mark.parametrize("m", [3, 40])  # 3: padded past torch._int_mm's 16-row minimum
def test_int_mm_peer_matches_the_w8a8_reference(m):
    d, f = 32, 96
    w1, b1 = randn(f, d, scale=d**-0.5, device="cpu"), randn(f, scale=0.5, device="cpu")
    w2, b2 = randn(d, f, scale=f**-0.5, device="cpu"), randn(d, scale=0.5, device="cpu")
    x = randn(m, d, device="cpu", dtype=torch.float16)
    q1, q2 = quantize_weight(w1), quantize_weight(w2)
    b1h, b2h = b1.half(), b2.half()
    out = peers.int_mm_mlp(x, q1, b1h, q2, b2h)
    assert out.shape == (m, d) and out.dtype == torch.float16
    # per-token x and h, as `dynamic` (which rounds h to fp16 before quantizing it)
    assert rel_err(out, w8a8_mlp_reference(x, q1, b1h, q2, b2h, activations="dynamic")) < 1e-2


@pytest.mark.parametrize("flavour", ["erf", "tanh"])
def test_cublaslt_gelu_flavour_tells_the_two_apart(monkeypatch, flavour):
    def addmm_activation(b, x, w, use_gelu=True):
        return torch.nn.functional.gelu(torch.addmm(b.float(), x.float(), w.float()),
                                        approximate="tanh" if flavour == "tanh" else "none").to(x.dtype)  # fmt: skip

    monkeypatch.setattr(torch, "_addmm_activation", addmm_activation)
    assert peers.cublaslt_gelu_flavour("cpu", torch.float16) == flavour


# ---- the run, on the CPU -----------------------------------------------------------------------


class FakeEvent:
    """torch.cuda.Event on a counter: each record() is one tick later."""

    clock = 0

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        FakeEvent.clock += 1
        self.t = FakeEvent.clock

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e-3  # ms


def test_median_time_counts_and_quantiles(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    calls = []
    timing = bench.median_time(lambda i: calls.append(i), n_sets=3, warmup_ms=0.01, rep_ms=0.05)
    assert 10 <= timing.reps <= 20_000
    assert timing.p20_us <= timing.median_us <= timing.p80_us
    assert set(calls) == {0, 1, 2}  # every rotation set is used


def test_run_bench_on_cpu_plans_checks_and_shares_float_peers(cpu_run):
    shape = MLPShape(32, 64)
    stages = []
    result = bench.run_bench(
        [shape], ["fp16", "w8a16", "w8a8"], [3, 20], ["eager", "cublaslt", "dequant", "int_mm"],
        progress=lambda stage, done, total, label: stages.append(stage),
    )  # fmt: skip
    assert {"ceilings", "prepare", "time"} <= set(stages)
    groups = {}
    for row in result.rows:
        groups.setdefault((row.dtype, row.tokens), []).append(row)
    assert len(groups) == 6
    for (dtype, m), rows in groups.items():
        impls = [(r.impl, r.gelu) for r in rows]
        assert impls[:2] == [("gelugemm", "erf"), ("gelugemm", "tanh")]  # tanh twin for cuBLASLt
        assert ("eager", "erf") in impls and ("cublaslt", "tanh") in impls
        assert ("dequant", "erf") in impls if dtype == "w8a16" else ("dequant", "erf") not in impls
        assert ("int_mm", "erf") in impls if dtype == "w8a8" else ("int_mm", "erf") not in impls
        for row in rows:
            assert row.status == "ok", (row.impl, row.dtype, row.error)
            if row.status == "ok":
                assert row.relerr <= row.relerr_limit
                assert row.time_us is not None and row.pct_of_floor is not None
            assert row.floor_us > 0 and row.rotation_sets == bench.MAX_ROTATION_SETS  # tiny shapes
    # The float peers of the int8 groups are the fp16 group's measurements, not new ones.
    eager = {(r.dtype, r.tokens): r.time_us for r in result.rows if r.impl == "eager"}
    assert eager[("w8a16", 20)] == eager[("w8a8", 20)] == eager[("fp16", 20)]
    fp16 = groups[("fp16", 20)]
    assert all(r.status == "ok" for r in fp16)
    assert all(r.speedup is not None for r in fp16 if r.impl != "gelugemm")
    assert [r for r in result.rows if r.impl == "int_mm" and r.tokens == 3][0].note.startswith("x padded")
    assert result.failed(None) == []


def test_gelugemm_gets_an_op_per_weight_set_as_a_models_layers_do(cpu_run, monkeypatch):
    # The op skips its checks for the weights of its last call; a bench cycling one op through
    # every rotation set would time the checks on every call, which a model (an op per layer)
    # never runs.
    made, used = [], []
    make_op = bench._gelugemm_op

    def recording_op(*args):
        op = make_op(*args)
        made.append(op)
        return lambda *a, **k: used.append(op) or op(*a, **k)

    monkeypatch.setattr(bench, "_gelugemm_op", recording_op)
    result = bench.run_bench([MLPShape(32, 64)], ["w8a8"], [3], ["eager"], activations=["static"], progress=None)
    assert all(r.status == "ok" for r in result.rows), [(r.impl, r.error) for r in result.rows]
    n_sets = next(r.rotation_sets for r in result.rows if r.impl == "gelugemm")
    assert n_sets > 1 and len(made) == n_sets and len(set(map(id, made))) == n_sets
    # the timed calls (the last set, then the first: cpu_run's clock) ran two different ops
    assert used[-1] is not used[-2]


def test_gelugemm_rows_name_the_kernels_and_configs_they_ran(cpu_run, monkeypatch):
    # The autotuner's pick can differ between processes: each gelugemm row (and its JSON)
    # says which kernels one call launched and the config each ran; peers' rows say nothing.
    def ran(rows):
        return {r.tokens: r.kernels for r in rows if r.impl == "gelugemm" and r.gelu == "erf"}

    result = bench.run_bench([MLPShape(32, 64)], ["fp16"], [3, 80], ["eager"], progress=None)
    launched = ran(result.rows)
    assert [k.split()[0] for k in launched[3]] == ["fused_mlp_kernel"]  # the one launch
    assert all(r.kernels is None for r in result.rows if r.impl != "gelugemm")
    from kernels import fused_mlp

    monkeypatch.setattr(fused_mlp, "fused_mlp_enabled", lambda: False)  # as GELUGEMM_FUSED_MLP=0
    result = bench.run_bench([MLPShape(32, 64)], ["fp16"], [80], ["eager"], progress=None)
    launched = ran(result.rows)[80]
    assert [k.split()[0] for k in launched] == ["gemm_tma_kernel", "gemm_tma_kernel"]  # GEMM1, GEMM2
    assert all(" BLOCK_M: " in k and " num_warps: " in k and " num_stages: " in k for k in launched)
    in_json = [r["kernels"] for r in result.to_dict()["rows"] if r["impl"] == "gelugemm" and r["gelu"] == "erf"]
    assert in_json == [launched]


def best_measured_peer(result, row):
    """The fastest peer row measured right in gelugemm row's group, found from the rows."""
    group = [r for r in result.rows if (r.d_model, r.d_ff, r.variant, r.tokens) == (row.d_model, row.d_ff, row.variant, row.tokens)]
    return min((r for r in group if r.impl != "gelugemm" and r.status == "ok"), key=lambda r: r.time_us)


def test_run_bench_says_whether_gelugemm_beats_the_best_peer(cpu_run):
    # The fake clock times each measurement 1 µs after the one before, in plan order: the
    # fp16 group's gelugemm rows come first (ahead of every peer); an int8 group's gelugemm
    # rows come after the fp16 group's eager and cuBLASLt, which are its float peers (behind).
    result = bench.run_bench([MLPShape(32, 64)], ["fp16", "w8a16", "w8a8"], [3, 20], ["eager", "cublaslt", "dequant", "int_mm"])
    ours = [r for r in result.rows if r.impl == "gelugemm"]
    assert len(ours) == 12  # 3 dtypes x 2 M x (erf, tanh twin)
    for row in ours:
        best = best_measured_peer(result, row)
        assert row.best_peer_us == best.time_us and row.vs_best_peer == pytest.approx(best.time_us / row.time_us)
        assert row.beats_best_peer is (row.dtype == "fp16")
        if row.dtype == "fp16":
            assert row.best_peer == ("eager" if row.gelu == "erf" else "eager (erf)")
        else:  # fp16 eager, measured once for the three groups, is the bar for the int8 ones
            assert row.best_peer == ("eager fp16" if row.gelu == "erf" else "eager fp16 (erf)")
    text = render(bench_cli.bench_table(result))
    assert len(re.findall(r"✓ \d", text)) == 4 and len(re.findall(r"✗ \d", text)) == 8


def test_int8_rows_per_activation_scheme_and_granularity(cpu_run):
    # A group of rows per w8a8 activation scheme and per w8a16 weight granularity, each
    # gelugemm row running its own; int_mm (per-token in torch) measured once for all schemes.
    schemes, granularities = ["dynamic", "group:32", "static"], ["group:32", "per-channel"]
    result = bench.run_bench(
        [MLPShape(64, 96)], ["w8a16", "w8a8"], [3, 20], ["eager", "dequant", "int_mm"],
        activations=schemes, granularities=granularities,
    )  # fmt: skip
    variants = {(r.tokens, r.variant) for r in result.rows}
    assert variants == {(m, v) for m in (3, 20) for v in
                        ["w8a16 group:32", "w8a16 per-channel", "w8a8 dynamic", "w8a8 group:32", "w8a8 static"]}  # fmt: skip
    assert result.failed(None) == []
    for row in result.rows:
        assert row.relerr <= row.relerr_limit, (row.variant, row.impl, row.relerr)
        if row.dtype == "w8a8":
            assert row.granularity == "per-channel" and row.activations in schemes
    int_mm = {r.tokens: r.time_us for r in result.rows if r.impl == "int_mm" and r.activations == "dynamic"}
    assert all(r.time_us == int_mm[r.tokens] for r in result.rows if r.impl == "int_mm")
    ours = [r.time_us for r in result.rows if r.impl == "gelugemm"]
    assert len(set(ours)) == len(ours)  # each variant timed on its own
    # group scales add bytes: 4 per group of 32 of each weight row
    g32, chan = (mlp_min_bytes(1, MLPShape(64, 96), "w8a16", g) for g in granularities)
    assert g32 - chan == 4 * (96 * 2 + 64 * 3) - 4 * (96 + 64)
    table = Console(width=200, record=True)
    table.print(bench_cli.bench_table(result))
    text = table.export_text()
    assert "w8a8 group:32" in text and "w8a16 per-channel" in text


def test_a_crashing_impl_becomes_an_error_row(cpu_run, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    monkeypatch.setattr(peers, "cublaslt_mlp", broken)
    result = bench.run_bench([MLPShape(32, 64)], ["fp16"], [3], ["eager", "cublaslt"])
    row = next(r for r in result.rows if r.impl == "cublaslt")
    assert row.status == "error" and row.time_us is None
    assert row.error == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert next(r for r in result.rows if r.impl == "eager").status == "ok"
    with pytest.raises(RuntimeError):
        bench.run_bench([MLPShape(32, 64)], ["fp16"], [3], ["cublaslt"], raise_errors=True)


def test_a_wrong_kernel_is_flagged_and_fails_the_command(cpu_run, monkeypatch):
    import kernels.op

    real = kernels.op.FusedMLP.forward
    monkeypatch.setattr(kernels.op.FusedMLP, "__call__", lambda self, *a: real(self, *a) * 1.5)
    result = runner.invoke(app, ["bench", "--shape", "32,64", "--dtype", "fp16", "--tokens", "3", "--peers", "eager"])
    assert result.exit_code == 1, result.output
    assert "not measured right" in result.stderr
    assert "✗" in result.stdout


def test_cli_json_carries_the_command_and_rows(cpu_run, tmp_path):
    path = tmp_path / "bench.json"
    args = ["bench", "--shape", "32,64", "--dtype", "fp16", "--tokens", "3", "--peers", "eager", "--json", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(path.read_text())
    assert [(r["impl"], r["status"]) for r in payload["rows"]] == [("gelugemm", "ok"), ("eager", "ok")]
    assert math.isfinite(payload["rows"][1]["speedup"])
    assert isinstance(payload["info"]["command"], str)
    assert "gelugemm ×" in result.stdout and "% floor" in result.stdout  # not squeezed to 80 columns


# ---- on a GPU: the real run, small -------------------------------------------------------------


@pytest.mark.gpu
def test_real_run_small_every_impl_correct():
    """Every impl runs and passes its float64 check; the ceilings are measured. No time is asserted."""
    result = bench.run_bench(
        [MLPShape(256, 1024)], list(bench.BENCH_DTYPES), [1, 33], list(peers.PEERS), warmup_ms=1, rep_ms=5
    )
    info = result.info
    assert info.ceilings.matmul_tflops > 0 and info.ceilings.copy_gbps > 0 and info.l2_bytes > 0
    assert info.cublaslt_gelu == "tanh"
    for row in result.rows:
        assert row.status == "ok", (row.dtype, row.tokens, row.impl, row.gelu, row.error, row.relerr)
        assert row.time_us > 0 and row.relerr <= row.relerr_limit
    assert all(r.speedup is not None for r in result.rows if r.impl != "gelugemm")


def test_cuda_graph_flag_times_graph_replays_and_says_so(cpu_run, monkeypatch, tmp_path):
    replayed = []

    def fake_graph_time(call, n_sets, warmup_ms, rep_ms):
        call(0)
        replayed.append(n_sets)
        return Timing(50.0, 50.0, 50.0, 2)

    monkeypatch.setattr(bench, "graph_time", fake_graph_time)
    path = tmp_path / "bench.json"
    args = ["bench", "--shape", "32,64", "--dtype", "fp16", "--tokens", "3", "--peers", "eager", "--cuda-graph", "--json", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert len(replayed) == 2 and cpu_run == []  # gelugemm and eager, none through median_time
    assert "CUDA-graph replays" in result.stdout
    payload = json.loads(path.read_text())
    assert payload["info"]["timing"] == "cuda-graph"
    assert [r["time_us"] for r in payload["rows"]] == [50.0, 50.0]
    plain = runner.invoke(app, args[:-3] + ["--json", str(path)])
    assert plain.exit_code == 0 and json.loads(path.read_text())["info"]["timing"] == "calls"


# ---- gated MLPs (GeGLU) -------------------------------------------------------------------------


def test_gated_flops_and_min_bytes_by_hand():
    gemma_2b = MLPShape(2048, 16384)
    # three GEMMs (gate, up, down): 3 * 2 * M * d * f
    assert mlp_flops(2048, gemma_2b, gated=True) == 6 * 2048 * 2048 * 16384 == 412_316_860_416
    # fp16: three weights 3*2048*16384*2 = 201,326,592, no biases, x and y 2*1*2048*2 = 8,192
    assert mlp_min_bytes(1, gemma_2b, "fp16", gated=True) == 201_326_592 + 8_192
    # int8 per channel: 3*2048*16384 bytes + float32 scales (2*16384 + 2048)*4 = 139,264
    assert mlp_min_bytes(1, gemma_2b, "w8a8", "per-channel", gated=True) == 100_663_296 + 139_264 + 8_192


def gated_weights(d, f, dtype=torch.float32):
    scale = lambda n: n**-0.5  # noqa: E731
    return randn(f, d, scale=scale(d), device="cpu", dtype=dtype), randn(d, f, scale=scale(f), device="cpu", dtype=dtype), \
        randn(f, d, scale=scale(d), device="cpu", dtype=dtype)  # fmt: skip


@pytest.mark.parametrize("gelu", ["erf", "tanh"])
def test_gated_peers_compute_the_gated_mlp(gelu):
    """eager on two GEMMs and on the concatenated weight, cuBLASLt's epilogue on the gate,
    and the dequant and int_mm peers all compute (GELU(x Wg) * x Wu) Wd."""
    d, f, m = 32, 96, 5
    wg, wd, wu = gated_weights(d, f)
    x = randn(m, d, device="cpu")
    ref = mlp_reference(x.double(), wg.double(), None, wd.double(), None, gelu_flavour=gelu, gated=True, w_up=wu.double())
    assert rel_err(peers.eager_mlp(x, wg, None, wd, None, gelu, w_up=wu, gated=True), ref) < 1e-6
    assert rel_err(peers.eager_mlp(x, torch.cat([wg, wu]), None, wd, None, gelu, gated=True), ref) < 1e-6
    # cuBLASLt's epilogue is the tanh GELU (on the GPU; the two flavours differ by ~1e-4 here)
    assert rel_err(peers.cublaslt_mlp(x, wg, None, wd, None, w_up=wu, gated=True), ref) < 1e-3
    qg, qd, qu = (quantize_weight(w) for w in (wg, wd, wu))
    deq = mlp_reference(x.double(), qg.dequantize(dtype=torch.float64), None, qd.dequantize(dtype=torch.float64), None,
                        gelu_flavour=gelu, gated=True, w_up=qu.dequantize(dtype=torch.float64))  # fmt: skip
    assert rel_err(peers.dequant_mlp(x, qg, None, qd, None, gelu, w_up=qu, gated=True), deq) < 1e-6
    xh = x.half()
    out = peers.int_mm_mlp(xh, qg, None, qd, None, gelu, w_up=qu, gated=True)
    want = w8a8_mlp_reference(xh, qg, None, qd, None, gelu_flavour=gelu, activations="dynamic", gated=True, w_up=qu)
    assert out.dtype == torch.float16 and rel_err(out, want) < 1e-2


def test_run_bench_gated_on_cpu(cpu_run):
    """A gated run: gelugemm's gated op on the gate and up weights, eager on two GEMMs and
    eager-cat on one concatenated GEMM (the same matrices), the int8 peers; every row
    checked against the float64 gated MLP, counted with three GEMMs."""
    shape = MLPShape(32, 64)
    result = bench.run_bench(
        [shape], ["fp16", "w8a16", "w8a8"], [3, 20], ["eager", "cublaslt", "dequant", "int_mm"], gelu="tanh", gated=True
    )  # fmt: skip
    assert all(row.gated for row in result.rows) and result.failed(None) == []
    for dtype in ("fp16", "w8a16", "w8a8"):
        impls = [r.impl for r in result.rows if r.dtype == dtype and r.tokens == 20]
        assert impls[0] == "gelugemm" and {"eager", "eager-cat", "cublaslt"} <= set(impls)
    row = next(r for r in result.rows if r.impl == "gelugemm" and r.dtype == "fp16" and r.tokens == 20)
    assert row.flops == mlp_flops(20, shape, gated=True) and row.relerr <= row.relerr_limit
    cat = next(r for r in result.rows if r.impl == "eager-cat" and r.dtype == "fp16" and r.tokens == 20)
    assert cat.speedup is not None and "concatenated" in cat.note
    for ours in (r for r in result.rows if r.impl == "gelugemm"):
        assert ours.best_peer_us == best_measured_peer(result, ours).time_us and ours.beats_best_peer is not None


def test_gated_best_peer_counts_eager_cat(cpu_run, monkeypatch):
    """With a clock that runs backwards, the last peer planned in a group is its fastest:
    eager-cat, planned after eager, is the bar the gated rows are held to."""
    timed = []

    def backwards(call, n_sets, warmup_ms, rep_ms):
        call(0)
        timed.append(call)
        us = 1000.0 - len(timed)
        return Timing(us, us, us, 2)

    monkeypatch.setattr(bench, "median_time", backwards)
    result = bench.run_bench([MLPShape(32, 64)], ["fp16"], [3], ["cublaslt", "eager"], gelu="tanh", gated=True)
    ours = next(r for r in result.rows if r.impl == "gelugemm")
    cat = next(r for r in result.rows if r.impl == "eager-cat")
    assert (ours.best_peer, ours.best_peer_us, ours.beats_best_peer) == ("eager-cat", cat.time_us, False)


def test_cli_gated_and_a_gated_checkpoint_turns_it_on(cpu_run, tmp_path):
    path = tmp_path / "bench.json"
    args = ["bench", "--gated", "--shape", "32,64", "--dtype", "fp16", "--tokens", "3", "--peers", "eager", "--json", str(path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(path.read_text())
    assert [(r["impl"], r["gated"], r["gelu"]) for r in payload["rows"]] == [
        ("gelugemm", True, "tanh"), ("eager", True, "tanh"), ("eager-cat", True, "tanh")
    ]  # fmt: skip
    assert "gated MLPs (GeGLU)" in result.stdout
    from hf_models import build

    gemma = build("gemma", tmp_path / "gemma")
    assert bench_cli.has_gated_mlps_only(gemma)
    assert checkpoint_shapes(gemma, gated=True) == ([MLPShape(32, 80)], "tanh")
    with pytest.raises(GelugemmError, match="no plain .*GELU MLP"):
        checkpoint_shapes(gemma, gated=False)
