"""kernels/gemm.py: the fused GEMM + bias + GELU kernels against float64 and the torch reference.

On CPU these run in Triton's interpreter on small odd shapes. bf16 there: the
interpreter's bf16 tl.dot returns garbage, so the launcher sets DOT_F32, which upcasts
the two bf16 tiles right before the dot; every other step of the bf16 kernel (bf16
loads, masks, bias, GELU, the bf16 store) runs as compiled for the GPU, and the GPU
tests below cover the bf16 dot itself.
"""

import math

import pytest
import torch

from conftest import DEVICE, HAS_CUDA, TOL_TF32, TOL_VS_FLOAT64, TOL_VS_REFERENCE, config_id, poisoned, randn, rel_err
from kernels.errors import LaunchError
from kernels import gemm
from kernels.gemm import gemm_bias_act
from kernels.reference import linear_reference

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# (leading dims, K, N): M=1, M=37, batch dims; K and N multiples of no block size.
# The TMA path needs 16-byte aligned rows, so its shapes keep K and N multiples of 8.
STRIDED_SHAPES = [((1,), 70, 45), ((37,), 70, 45), ((2, 3), 33, 100), ((19,), 130, 7)]
# The last two have fewer output tiles than the interpreter's 4 programs and K long enough
# for the TMA kernel to split it (serial split-K in 2 and 4 shares).
TMA_SHAPES = [((1,), 72, 40), ((37,), 72, 40), ((2, 21), 136, 56), ((3,), 528, 40), ((2,), 1040, 24)]
SPLIT_K_SHAPES = TMA_SHAPES[-2:]


def make_weight(k, n, dtype, layout):
    w = randn(n, k, dtype=dtype, scale=1 / math.sqrt(k))
    return w if layout == "out_in" else w.t().contiguous()


def check_against_references(out, x, w, b, activation, layout):
    exact = linear_reference(x.double(), w.double(), None if b is None else b.double(), activation=activation, weight_layout=layout)
    ref = linear_reference(x, w, b, activation=activation, weight_layout=layout)
    assert out.shape == exact.shape
    assert rel_err(out, exact) < TOL_VS_FLOAT64[x.dtype]
    assert rel_err(out, ref) < TOL_VS_REFERENCE[x.dtype]


def run_case(path, lead, k, n, dtype, layout, activation, with_bias=True):
    x = randn(*lead, k, dtype=dtype)
    w = make_weight(k, n, dtype, layout)
    b = randn(n, dtype=dtype) if with_bias else None
    out = poisoned((*lead, n), dtype)
    got = gemm_bias_act(x, w, b, activation=activation, weight_layout=layout, path=path, out=out)
    assert got.data_ptr() == out.data_ptr()
    check_against_references(out, x, w, b, activation, layout)


@pytest.mark.parametrize("activation", ["none", "erf", "tanh", "quick"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", STRIDED_SHAPES)
def test_strided_kernel(lead, k, n, dtype, layout, activation):
    run_case("strided", lead, k, n, dtype, layout, activation)


@pytest.mark.parametrize("activation", ["none", "erf", "tanh"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", TMA_SHAPES)
@pytest.mark.tma
def test_tma_kernel(lead, k, n, dtype, layout, activation):
    run_case("tma", lead, k, n, dtype, layout, activation)


# Decode (the float path takes M <= 64 through it): K long enough that the interpreter's
# config splits it (serial split-K).
DECODE_SHAPES = [((1,), 264, 40), ((16,), 264, 136), ((2, 3), 72, 40), ((37,), 136, 56), ((60,), 264, 40)]


@pytest.mark.parametrize("activation", ["none", "erf", "tanh"])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,k,n", DECODE_SHAPES)
@pytest.mark.tma
def test_decode_kernel(lead, k, n, dtype, layout, activation):
    run_case("decode", lead, k, n, dtype, layout, activation)


def tma_plans(m: int, k: int) -> list:
    return [p for p in gemm._GEMM.plans.values() if p.path == "tma" and p.scalars[0] == m and p.scalars[2] == k]


@pytest.mark.tma
def test_tma_split_k_leaves_counters_ready_for_the_next_call():
    # As for decode: each launch must find its counters at zero again. Under the
    # interpreter these shapes do split (a workspace was sized for them).
    for lead, k, n in SPLIT_K_SHAPES:
        for _ in range(2):
            run_case("tma", lead, k, n, torch.float16, "in_out", "erf")
        if not HAS_CUDA:
            assert all(p.workspace[0] > 0 for p in tma_plans(math.prod(lead), k))


@pytest.mark.tma
def test_auto_takes_decode_up_to_64_rows_for_small_weights_and_16_for_large():
    # A 4096x16384-class weight runs 17..64 rows faster on the split TMA kernel; a
    # 768x3072-class one on decode (kernels/gemm.py). Only the choice is checked here.
    from kernels.gemm_base import _path

    k = 4096
    for n, m, want in ((1024, 64, "decode"), (gemm.FLOAT_DECODE_LARGE_WEIGHT // k + 8, 64, "tma"),
                       (gemm.FLOAT_DECODE_LARGE_WEIGHT // k + 8, 16, "decode"), (1024, 65, "tma")):  # fmt: skip
        a = torch.empty(m, k, dtype=torch.float16, device=DEVICE)
        w = torch.empty(n, k, dtype=torch.float16, device=DEVICE)
        assert _path(gemm._GEMM.kernels, "auto", m, a, w, 1, k, True) == want, (n, m)


def test_decode_split_k_leaves_counters_ready_for_the_next_call():
    # The same weights twice in a row, then new ones: each launch must find its arrival
    # counters at zero again, or the second result would be missing splits.
    for _ in range(2):
        run_case("decode", (3,), 520, 72, torch.float16, "out_in", "erf")


@pytest.mark.parametrize("path", ["strided", "auto"])
def test_without_bias(path):
    run_case(path, (37,), 72, 40, torch.float16, "out_in", "erf", with_bias=False)


# How close each GELU flavour stays to float64 in x's negative tail, [-5, 0), relatively:
# the erf GELU's A&S erf is good to 1.5e-7 absolute, which is up to 0.16% of 1 + erf there;
# the sigmoid forms have no such term.
GELU_TAIL_TOL = {"erf": 1e-2, "tanh": 1e-5, "quick": 1e-5}


@pytest.mark.parametrize("flavour", ["erf", "tanh", "quick"])
@pytest.mark.parametrize("path", ["strided", "tma", "decode"])
def test_gelu_is_float32_accurate_and_keeps_the_negative_tail(path, flavour):
    # The GELUs are the kernels' own (kernels/gemm_base.py: no libdevice erf, and on the GPU
    # the special-function unit's approximate reciprocal and exp2). Through an identity
    # weight in fp32 (ieee: x @ I is x) the epilogue's GELU is seen element by element:
    # within float32 rounding of float64 everywhere (relative to GELU's size past 1), and
    # for x in [-5, 0) within GELU_TAIL_TOL (for erf 1%, where 1 + erf(x / sqrt(2))
    # computed as written would lose up to 17% to cancellation).
    x = torch.rand(64, 32, dtype=torch.float64) * 20 - 10
    x = x.float().to(DEVICE)
    out = poisoned((64, 32), torch.float32)
    gemm_bias_act(x, torch.eye(32, device=DEVICE), None, activation=flavour, path=path, out=out)
    exact = linear_reference(x.double(), torch.eye(32, dtype=torch.float64, device=DEVICE), None, activation=flavour)
    err = (out.double() - exact).abs()
    assert (err / exact.abs().clamp(min=1)).max().item() < 1e-6
    tail = (x >= -5) & (x < 0)
    assert tail.sum() > 100
    assert (err[tail] / exact[tail].abs()).max().item() < GELU_TAIL_TOL[flavour]


# (the interpreter's numpy warns where float32 overflows to inf, as x^3 does at 1e20)
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("flavour", ["erf", "tanh", "quick"])
@pytest.mark.parametrize("path", ["strided", "tma", "decode"])
def test_gelu_saturates_at_large_inputs(path, flavour):
    # Far out, GELU is x (positive) or next to 0 (negative). The kernels' exp2 overflows to
    # inf or underflows to 0 there (on the GPU the special-function unit's, flushing to zero),
    # and the reciprocal of inf is 0: finite and right for |x| up to float32's largest.
    big = [30.0, 100.0, 1e3, 1e4, 1e6, 1e20, 1e30, 3e38]
    x = torch.tensor([big + [-v for v in big]] * 16, dtype=torch.float32, device=DEVICE)
    eye = torch.eye(x.shape[1], device=DEVICE)
    out = poisoned(x.shape, torch.float32)
    gemm_bias_act(x, eye, None, activation=flavour, path=path, out=out)
    exact = linear_reference(x.double(), eye.double(), None, activation=flavour)
    assert torch.isfinite(out).all()
    assert ((out.double() - exact).abs() <= 1e-6 * exact.abs() + 1e-30).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input_and_weight(dtype):
    # x: every other column of a wider tensor; w: a transposed view of the other layout;
    # x2: a transposed (column-major) input. All are read in place.
    k, n, m = 40, 24, 19
    x = randn(m, 2 * k, dtype=dtype)[:, ::2]
    w = randn(k, n, dtype=dtype, scale=1 / math.sqrt(k)).t()  # [n, k] with stride (1, n)
    b = randn(n, dtype=dtype)
    for layout, weight in (("out_in", w), ("in_out", w.t()[:, :])):
        out = poisoned((m, n), dtype)
        gemm_bias_act(x, weight, b, activation="tanh", weight_layout=layout, out=out)
        check_against_references(out, x, weight, b, "tanh", layout)
    x2 = randn(k, m, dtype=dtype).t()
    out = poisoned((m, n), dtype)
    gemm_bias_act(x2, w, b, activation="erf", out=out)
    check_against_references(out, x2, w, b, "erf", "out_in")


def test_tf32_only_when_asked():
    k, n, m = 72, 40, 37
    x, w, b = randn(m, k), make_weight(k, n, torch.float32, "out_in"), randn(n)
    exact = linear_reference(x.double(), w.double(), b.double(), activation="erf")
    assert rel_err(gemm_bias_act(x, w, b, activation="erf"), exact) < TOL_VS_FLOAT64[torch.float32]
    assert rel_err(gemm_bias_act(x, w, b, activation="erf", allow_tf32=True), exact) < TOL_TF32


def test_launcher_rejects_bad_operands_before_launch():
    x = randn(4, 32, dtype=torch.float16)
    w = make_weight(32, 16, torch.float16, "out_in")
    with pytest.raises(LaunchError, match="last dim is 31"):
        gemm_bias_act(x[:, :31], w)
    with pytest.raises(LaunchError, match="differs from input dtype"):
        gemm_bias_act(x, w.float())
    with pytest.raises(LaunchError, match="bias must have shape"):
        gemm_bias_act(x, w, randn(17, dtype=torch.float16))
    with pytest.raises(LaunchError, match="activation"):
        gemm_bias_act(x, w, activation="relu")
    with pytest.raises(LaunchError, match="input dtype"):
        gemm_bias_act(x.to(torch.int32), w)
    with pytest.raises(LaunchError, match="out must be"):
        gemm_bias_act(x, w, out=poisoned((4, 15), torch.float16))
    # K=33 fp16 rows are not 16-byte aligned: the TMA path says so instead of launching.
    with pytest.raises(LaunchError, match="needs TMA"):
        gemm_bias_act(randn(4, 33, dtype=torch.float16), make_weight(33, 16, torch.float16, "out_in"), path="tma")


def test_empty_rows_launch_nothing():
    w = make_weight(32, 16, torch.float16, "out_in")
    assert gemm_bias_act(randn(0, 32, dtype=torch.float16), w).shape == (0, 16)


# ---------------------------------------------------------------------------------------
# GPU: real sizes
# ---------------------------------------------------------------------------------------

REAL_SHAPES = [(768, 3072), (4096, 16384)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 128, 2048])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d,f", REAL_SHAPES)
def test_gemm1_real_sizes(d, f, dtype, m):
    for layout in ("out_in", "in_out"):
        run_case("auto", (m,), d, f, dtype, layout, "erf")


def test_configs_ask_for_warp_specialization_only_where_triton_does_it():
    # On sm_90 Triton splits a tile loop into producer and consumer warp groups only at 4
    # warps a group, without flatten; at 8 warps the flag is silently a no-op, and with the
    # subtiled epilogue triton 3.6 aborts the process (bench/ws_survey.py). Every table and
    # candidate of the TMA kernels, float and int8, keeps to that.
    from kernels import int8_gemm

    tables = [v for m in (gemm, int8_gemm) for k, v in vars(m).items() if k.endswith("TMA_CONFIGS")]
    configs = [c for t in tables for cs in t.values() for c in cs] + gemm.TMA_WS_CANDIDATES
    assert len(tables) >= 8 and gemm.TMA_WS_CANDIDATES
    for c in configs:
        if c.kwargs.get("WARP_SPECIALIZE"):
            kw = c.kwargs
            assert c.num_warps == 4 and not kw.get("EPILOGUE_SUBTILE") and not kw.get("FLATTEN"), config_id(c)
            assert kw.get("MAX_SPLIT_K", 1) == 1, config_id(c)


@pytest.mark.gpu
@pytest.mark.tma
@pytest.mark.parametrize("config", gemm.TMA_WS_CANDIDATES, ids=config_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_warp_specialized_candidates(forced_config, monkeypatch, config, dtype):
    # Each warp-specialized candidate alone (kernels/gemm.py: one joins a table only once a
    # GPU has run it), on edge tiles in rows and columns and at a real size, both layouts,
    # against the references: wrong code from Triton's warp-specialization pass shows here.
    import kernels.gemm_base as gemm_base

    # (device descriptors, whatever GELUGEMM_HOST_DESCRIPTORS says: with host descriptors the
    # pruner never offers a warp-specialized config, and the kernel refuses one)
    monkeypatch.setattr(gemm_base, "HOST_DESCRIPTORS", False)
    forced_config(gemm._GEMM, gemm._gemm_tma_kernel, gemm.TMA_CONFIGS, config)
    for lead, k, n, activation in (((1000,), 768, 3000, "erf"), ((2, 1100), 4096, 4104, "tanh")):
        for layout in ("out_in", "in_out"):
            run_case("tma", lead, k, n, dtype, layout, activation)
    assert config_id(gemm._gemm_tma_kernel.best_config) == config_id(config)


@pytest.mark.tma
def test_recorded_launches_name_the_kernel_and_the_config_it_ran(forced_config):
    # What `gelugemm bench` reports for each gelugemm row: on the first call (through the
    # autotuner) and on later ones (the direct launch, on a GPU) the config the call ran.
    from kernels.gemm_base import cfg
    from kernels.launch import recorded_launches

    config = cfg(64, 32, 32, 4, 2, group_m=4)
    forced_config(gemm._GEMM, gemm._gemm_tma_kernel, gemm.TMA_CONFIGS, config)
    x, w = randn(80, 48, dtype=torch.float16), make_weight(48, 40, torch.float16, "out_in")
    for _ in range(2):
        with recorded_launches() as launched:
            gemm_bias_act(x, w, None, activation="erf", path="tma")
        assert launched == [("gemm_tma_kernel", str(config))]
    assert str(config).startswith("BLOCK_M: 64, BLOCK_N: 32, BLOCK_K: 32, GROUP_M: 4") and "num_warps: 4" in str(config)
    gemm_bias_act(x, w, None, activation="erf", path="tma")  # outside the block: nothing recorded
    assert len(launched) == 1


@pytest.mark.parametrize("m", [1, 37])
@pytest.mark.tma
def test_a_misaligned_out_after_an_aligned_call_takes_the_strided_path(monkeypatch, m):
    # The first call caches a TMA (or decode) plan for these shapes; a caller's `out` that
    # starts off a 16-byte boundary must not reuse it: TMA stores need aligned rows.
    import kernels.gemm as gemm_module
    import kernels.gemm_base as gemm_base

    k, n = 72, 40
    x = randn(m, k, dtype=torch.float16)
    w = make_weight(k, n, torch.float16, "out_in")
    b = randn(n, dtype=torch.float16)
    gemm_bias_act(x, w, b, activation="erf")
    launched = []
    real_launch = gemm_base.launch
    monkeypatch.setattr(gemm_base, "launch", lambda kernel, *a, **kw: launched.append(kernel) or real_launch(kernel, *a, **kw))
    buffer = poisoned((m * n + 1,), torch.float16)
    out = buffer[1:].view(m, n)  # 2 bytes past the buffer's aligned start
    gemm_bias_act(x, w, b, activation="erf", out=out)
    assert launched == [gemm_module._gemm_strided_kernel]
    check_against_references(out, x, w, b, "erf", "out_in")
    gemm_bias_act(x, w, b, activation="erf")  # and the aligned plan is still there
    assert launched[-1] is not gemm_module._gemm_strided_kernel


@pytest.mark.parametrize("m", [1, 100])
def test_an_output_with_rows_tma_cannot_store_takes_the_strided_path(m):
    # n = 20 fp16: the output the launcher allocates has 40-byte rows, which the TMA path's
    # store cannot take (at 100 rows auto would take it); the auto path must see that, not
    # only in a caller's out
    k, n = 72, 20
    x = randn(m, k, dtype=torch.float16)
    w = make_weight(k, n, torch.float16, "out_in")
    b = randn(n, dtype=torch.float16)
    for _ in range(2):  # and the plan it keeps
        out = gemm_bias_act(x, w, b, activation="erf")
        check_against_references(out, x, w, b, "erf", "out_in")


@pytest.mark.parametrize("m", [1, 37])
def test_repeated_calls_read_their_own_inputs(m):
    # After the first call, launches with the same shapes skip Triton's dispatch
    # (kernels/launch.py): every call must still read the tensors it is given.
    k, n = 72, 40
    for _ in range(3):
        run_case("auto", (m,), k, n, torch.float16, "out_in", "erf")
