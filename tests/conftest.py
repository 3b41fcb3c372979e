"""Shared test setup: the device, per-dtype tolerances (written once), poisoned outputs,
the fixtures more than one test module uses, and the `gpu` and `tma` markers.

Without CUDA the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set
here before anything imports Triton), on small shapes. Tests marked `gpu` run the same
checks at real sizes and are skipped without CUDA.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# After TRITON_INTERPRET: importing the kernels defines their Triton functions.
import kernels.bench as bench  # noqa: E402
from bench_helpers import H100, synthetic_info  # noqa: E402
from kernels.bench import Timing  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")

# What backend="auto" (the op's, verify's, the CLI's default) runs on the default device:
# the fused Triton kernels on a CUDA machine, the torch reference elsewhere, and the
# start of the reason it gives (kernels.op.choose_backend).
AUTO_BACKEND, AUTO_BACKEND_REASON = ("triton", "CUDA device") if HAS_CUDA else ("torch", "no CUDA device")

# Relative Frobenius error ||out - ref|| / ||ref|| allowed per compute dtype.
# Against float64: dominated by rounding the intermediate and the output once each to
# the dtype (fp16: 2^-11, bf16: 2^-8 per element), with headroom for fp32 accumulation
# over K up to 16384. Against the torch reference in the same dtype the two differ only
# in summation order and the odd rounding flip of the intermediate.
TOL_VS_FLOAT64 = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}
TOL_VS_REFERENCE = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}
# fp32 inputs with allow_tf32: operands rounded to 10 mantissa bits.
TOL_TF32 = 5e-3

# int8 kernels (tests/int8_helpers.py makes their weights). w8a16 against float64 on the
# dequantized weight keeps the float dtype's error: a per-channel scale multiplies a float32
# sum of exact int-weight products; a group scale's dequantized weight is rounded once to the
# activation dtype, well inside it. Against its step-by-step reference: summation order and
# the odd output rounding flip.
TOL_W8A16_VS_FLOAT64 = TOL_VS_FLOAT64
TOL_W8A16_VS_REFERENCE = TOL_VS_REFERENCE
# The w8a8 MLP against the float64 MLP on the same dequantized weights: dominated by
# quantizing x (per token or static, 127 levels) and GELU's output (one static scale
# from the calibration max), each about 1% relative noise on random data.
TOL_W8A8_VS_FLOAT64 = 5e-2
# The product of two 16-bit-rounded-once terms: the plain MLP's tolerances hold (the
# intermediate is still rounded once); w8a8's relative noise adds up over gate and up.
TOL_GATED_W8A8_VS_FLOAT64 = TOL_W8A8_VS_FLOAT64
# Except static: one per-tensor step for GELU(gate) * up, a product of two Gaussians whose
# absmax over M x d_ff values is heavy-tailed. The torch reference itself is 5.4% from float64
# at Gemma-2B/7B, M=2048; at M=4 (the CPU test) 3.6% on average over 150 seeds, 5.8% at worst,
# 6.0% for one CI seed: the scheme's error, not the kernel's (a wrong scale gives far more).
TOL_GATED_W8A8_STATIC_VS_FLOAT64 = 1e-1
# int8 results against the step-by-step reference: at most this fraction of elements
# off, each by at most 1 (rounding ties moved by float32 op order).
MAX_TIE_FLIPS = 1e-3
# A w8a8 MLP's output against its step-by-step reference, where such a flip (of x or h) is
# not diluted: one flip moves a test-sized MLP's output by up to about 2e-3 relative. The
# worst of 1,920 fp32 cases at tests/test_fused_mlp.py's shapes was 1.7e-3; 40x2x160 fp16 was
# 1.8e-3. fp32's 1e-5 failed 9 of 480 such cases, fp16's 1e-3 one edge shape. So the kernels
# are held to TOL_VS_REFERENCE against each other (the one launch against the separate
# launches, whose rounding is the same), and to this against the torch reference.
TOL_W8A8_VS_REFERENCE = {dtype: max(tol, 5e-3) for dtype, tol in TOL_VS_REFERENCE.items()}
# A per-group scale of GEMM1's output, kernel against reference: the float32 value it is
# the absmax of may differ in its last bits (another fma, erf, summation order).
SCALE_RTOL = 1e-5


def tol_int8_vs_float64(scheme: str, dtype: torch.dtype) -> float:
    """An int8 MLP's tolerance against the float64 MLP on its dequantized weights."""
    return TOL_W8A16_VS_FLOAT64[dtype] if scheme == "w8a16" else TOL_W8A8_VS_FLOAT64


# Whole MLPs and models against the float ones they replace (relative Frobenius error of the
# output), each measured on the tests' own random weights, with headroom. They are not
# calibration/verify.py's DEFAULT_TOLERANCES (the library's table; tests read it from there),
# which grade a user's checkpoint against its fp16 path at 2-2.4x the worst error measured
# on real weights (all-MiniLM-L6-v2); these hold the tests' random weights to what was
# measured on them.
#
# A quantized MLP, or the tiny BERT of tests/hf_models.py with its MLPs quantized. Measured
# over 200 seeds (MLP on its calibration inputs): w8a16 median 0.6-0.8%, max 1.0%; w8a8
# median 1.5%, max 2.2%. The tiny BERT (last hidden states, w8a8 calibrated on synthetic
# rows), weights seeded 0 as the tests build it: w8a16 1.2%, w8a8 3.0%; seeds 0-4: at most
# 1.7% and 3.7%.
TOL_QUANTIZED_VS_FLOAT = {"w8a16": 0.02, "w8a8": 0.05}
# A model with int8 MLPs read through compressed-tensors, against the float model: int8 noise
# on two small random MLPs, measured at 1e-4 - 3e-3 (test_compressed_tensors).
TOL_COMPRESSED_TENSORS_MODEL = 2e-2
# A tiny gated model (Gemma, T5, ModernBERT) with w8a8 MLPs (calibrated on synthetic rows)
# against the float one: measured 5e-3 - 6e-2 on these tiny random models, whose weights
# are 10x transformers' init (tests/hf_models.py; test_gated_models).
TOL_GATED_MODEL = 1e-1
# Float32 MLPs swapped into a tiny model on the op's torch backend, against the model's own
# float32 modules: the same operations, only the summation order differs, over the tiny
# models' K <= 128 (test_hf_swap). Tighter than TOL_VS_REFERENCE[float32], which also holds
# the Triton kernels (backend "auto" on a GPU, the CPU interpreter) at K up to 16384.
TOL_SWAPPED_FP32 = 1e-6


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or Inf anywhere in out gives inf."""
    out = out.double()
    ref = ref.double().to(out.device)
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def poisoned(shape, dtype, device=DEVICE) -> torch.Tensor:
    """An output buffer full of NaN (int8: -128, outside the symmetric range), so an
    element a kernel fails to write cannot pass as a result."""
    if dtype == torch.int8:
        return torch.full(shape, -128, dtype=dtype, device=device)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def randn(*shape, dtype=torch.float32, scale=1.0, generator=None, device=DEVICE) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


SEED_ENV = "GELUGEMM_TEST_SEED"


def choose_seed() -> int:
    """A fresh seed, or the one GELUGEMM_TEST_SEED replays (a failure prints its seed)."""
    replay = os.environ.get(SEED_ENV, "").strip()
    return int(replay) if replay else int.from_bytes(os.urandom(4), "little")


@pytest.fixture(autouse=True)
def fresh_seed():
    """Every test draws fresh random inputs; the seed is printed (pytest shows it with a
    failure) so the failure can be replayed: GELUGEMM_TEST_SEED=SEED python -m pytest TEST."""
    seed = choose_seed()
    torch.manual_seed(seed)
    print(f"torch seed {seed} (replay: {SEED_ENV}={seed})")
    yield seed


@pytest.fixture(autouse=True)
def quick_configs_for_small_shapes(request, monkeypatch):
    """Small-shape tests take each bucket's first kernel config (no autotuning search,
    which would compile every config for every odd shape); `gpu` tests at real sizes
    autotune as users do."""
    if "gpu" not in request.keywords:
        monkeypatch.setenv("GELUGEMM_AUTOTUNE", "0")


@pytest.fixture
def wide_consoles(monkeypatch):
    """The commands' consoles 400 columns wide, so one message is one line whatever its length
    (modules that check printed lines use it: `pytestmark = pytest.mark.usefixtures(...)`)."""
    from gelugemm_cli import common

    monkeypatch.setattr(common.console, "width", 400)
    monkeypatch.setattr(common.err_console, "width", 400)


@pytest.fixture
def forced_config(monkeypatch):
    """force(launcher, kernel, table, config): the autotuned `kernel` of a GemmLauncher runs
    `config` alone at every M bucket of its `table` (the autotuner's choices, the launcher's
    plans and the launch cache cleared before and after)."""
    from kernels import launch

    forced = []

    def clear():
        for launcher, kernel in forced:
            kernel.cache.clear()
            launcher.plans.clear()
        launch._compiled.clear()

    def force(launcher, kernel, table, config):
        forced.append((launcher, kernel))
        clear()
        for key in table:
            monkeypatch.setitem(table, key, [config])
        monkeypatch.setattr(kernel, "configs", [config])

    yield force
    clear()


def config_id(c) -> str:
    """A kernel config as a test id: 128x256x64-w4s3-warp_specialize."""
    kw = c.kwargs
    flags = "".join(f"-{k.lower()}" for k in ("EPILOGUE_SUBTILE", "FLATTEN", "WARP_SPECIALIZE") if kw.get(k))
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']}-w{c.num_warps}s{c.num_stages}{flags}"


@pytest.fixture
def cpu_run(monkeypatch):
    """run_bench on the CPU: Triton in its interpreter, fixed ceilings, a fake clock."""
    if HAS_CUDA:
        pytest.skip("the CPU stand-in is for machines without CUDA")
    monkeypatch.setattr(bench, "require_cuda", lambda: torch.device("cpu"))
    monkeypatch.setattr(bench, "measure_ceilings", lambda *a: H100)
    monkeypatch.setattr(
        bench, "_run_info",
        lambda device, ceilings, gelu, act, warmup, rep, command, names: synthetic_info(ceilings=ceilings, command=command),
    )  # fmt: skip
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    timed = []

    def fake_time(call, n_sets, warmup_ms, rep_ms):
        call(n_sets - 1)  # the last rotation set, and past it (i wraps around)
        call(n_sets)
        timed.append(call)
        us = 100.0 + len(timed)
        return Timing(us, us, us, 2)

    monkeypatch.setattr(bench, "median_time", fake_time)
    return timed


# The TMA paths: "tma", and "decode", which loads its tiles through TMA too. They need Hopper
# (SM90+) on a GPU; Triton's CPU interpreter runs them anywhere.
TMA_PATHS = ("tma", "decode")


def on_paths(cases: list) -> list:
    """parametrize cases whose first value is a kernel path ("strided", "tma", "decode",
    "auto"), each a path or a tuple starting with one: those on a TMA path marked `tma`.
    Their ids stay those of the plain values."""
    params = []
    for case in cases:
        values = case if isinstance(case, tuple) else (case,)
        params.append(pytest.param(*values, marks=[pytest.mark.tma] if values[0] in TMA_PATHS else []))
    return params


def tma_unavailable() -> bool:
    """A CUDA GPU older than SM90 (asked only when a `tma` test is collected on a CUDA machine)."""
    return HAS_CUDA and torch.cuda.get_device_capability()[0] < 9


def pytest_collection_modifyitems(config, items):
    # `gpu`-marked tests are skipped without CUDA, `tma`-marked ones on a GPU without TMA,
    # each with a visible reason.
    no_tma = None
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if item.get_closest_marker("tma") is not None:
            no_tma = tma_unavailable() if no_tma is None else no_tma
            if no_tma:
                item.add_marker(pytest.mark.skip(reason="TMA needs an SM90+ GPU"))
