"""A benchmark result made up by hand, for tests of what bench computes and writes from one
(test_bench, test_outputs); tests/conftest.py's `cpu_run` fixture runs bench on the CPU with
these ceilings and run facts.

    result = synthetic_result()  # fp16 peers on BIG at M=2048, a w8a16 group with a wrong row
"""

import kernels.bench as bench
from kernels.bench import (
    BenchResult,
    BenchRow,
    Ceilings,
    MLPShape,
    RunInfo,
    fill_best_peer,
    fill_metrics,
    fill_speedups,
    mlp_flops,
    mlp_min_bytes,
    roofline_floor_us,
)

# The H100 ceilings in DESIGN.md (anchors-h100.json): bf16 808 TFLOP/s, int8 957 TOP/s, copy 3020 GB/s.
H100 = Ceilings(matmul_tflops=807.856, int8_tops=956.736, copy_gbps=3019.997)
BIG = MLPShape(4096, 16384)


def synthetic_info(**kw) -> RunInfo:
    fields = dict(
        device="NVIDIA H100 80GB HBM3", capability="9.0", sm_count=132, l2_bytes=50 * 2**20,
        torch="2.11.0+cu130", triton="3.6.0", cuda="13.0", gelugemm="0.1.0", date="2026-11-25T00:00:00+00:00",
        ceilings=H100, gelu="erf", activation_dtype="fp16", cublaslt_gelu="tanh", warmup_ms=25.0, rep_ms=100.0,
        command="gelugemm bench --dtype fp16",
    )  # fmt: skip
    fields.update(kw)
    return RunInfo(**fields)


def synthetic_row(impl, time_us, m=2048, dtype="fp16", gelu="erf", status="ok", relerr=3e-4, **kw) -> BenchRow:
    flops, nbytes = mlp_flops(m, BIG), mlp_min_bytes(m, BIG, dtype)
    floor_us, bound = roofline_floor_us(flops, nbytes, H100, dtype)
    weights = "int8" if dtype in bench.INT8_DTYPES and impl in ("gelugemm", "dequant", "int_mm") else "fp16"
    row = BenchRow(
        BIG.d_model, BIG.d_ff, dtype, m, impl, gelu, weights, status, flops, nbytes, floor_us, bound,
        time_us=time_us, p20_us=time_us and time_us * 0.99, p80_us=time_us and time_us * 1.02,
        reps=100 if time_us else None, rotation_sets=1, relerr=relerr, relerr_limit=5e-3, **kw,
    )  # fmt: skip
    fill_metrics(row)
    return row


def synthetic_result() -> BenchResult:
    rows = [
        synthetic_row("gelugemm", 760.0),
        synthetic_row("gelugemm", 770.0, gelu="tanh"),
        synthetic_row("eager", 862.0),
        synthetic_row("cublaslt", 823.0, gelu="tanh", note="cuBLASLt's GELU epilogue is tanh"),
        synthetic_row("compile", 876.0),
        synthetic_row("gelugemm", None, dtype="w8a16", status="unavailable", relerr=None,
                      error="dtype w8a16 is not implemented yet for shape [/x] [bold]"),
        synthetic_row("eager", 862.0, dtype="w8a16"),
        synthetic_row("dequant", 1500.0, dtype="w8a16", status="wrong", relerr=0.5),
    ]  # fmt: skip
    fill_speedups(rows)
    fill_best_peer(rows)
    return BenchResult(synthetic_info(), rows)
