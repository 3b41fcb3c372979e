"""Side-by-side timings of gelugemm's op and what users run instead (the peers in kernels/peers.py).

    result = run_bench([MLPShape(4096, 16384)], dtypes=["fp16"], tokens=[1, 2048])
    result.rows[0].time_us, result.rows[0].pct_of_floor, result.to_dict()

One run, on one CUDA device:

1. Ceilings, measured first on this device: a bf16 matmul (8192^3), an int8 one through
   torch._int_mm, and a device-to-device copy of 1 GiB (bytes read + written).
2. Every (shape, dtype, token count M, impl) is called once before anything is timed
   (int8 dtypes once per variant: w8a16 per weight granularity, w8a8 per activation scheme):
   Triton autotunes, torch.compile compiles, and the output is checked against a float64
   MLP on a slice of rows (the same weights the impl reads, dequantized for int8).
3. Each impl is timed with CUDA events around every call, after warm-up; the median is
   reported. Inputs and weights are rotated over enough copies that between two uses of
   one buffer the op streams at least ROTATE_OVER_L2 x the L2 size, so every call reads
   them from device memory; where one call's bytes exceed that (d=4096: 268 MB of fp16
   weights), a single set is L2-cold by size. gelugemm gets one op per weight set, as a
   model's layers each hold their own (kernels/module.py): an op skips its operand checks
   when called again with the weights of its last call, which one op cycling through every
   set would never be.

Per row: time, TFLOP/s (TOP/s for w8a8), GB/s over the minimum bytes (x, weights with
their scales, biases and y, each once), percent of the roofline floor
max(FLOPs / matmul ceiling, bytes / copy bandwidth), gelugemm's speedup over the row's
impl, and the relative error against float64. Each gelugemm row also names the fastest
peer of its group and says whether it beats it (best_peer, vs_best_peer, beats_best_peer:
fill_best_peer says which peers count).

`gated=True` times gated MLPs (GeGLU) instead, (GELU(x Wg^T) * x Wu^T) Wd^T without
biases, as Gemma runs them (default shape Gemma-2B's, 2048 -> 16384): gelugemm's op on
the gate and up weights, and the peers computing the same: eager on two GEMMs for gate
and up ("eager") and on one GEMM over the concatenated weight ("eager-cat", ModernBERT's
form, planned with eager), cuBLASLt's GELU epilogue on the gate GEMM, torch.compile, and
the int8 peers on the three int8 weights.
"""

from __future__ import annotations

import datetime
import functools
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple

import torch

from kernels import peers
from kernels.errors import BackendUnavailable, GelugemmError
from kernels.int8 import quantize_weight, scale_from_absmax
from kernels.launch import recorded_launches
from kernels.op import FusedMLP, MLPConfig
from kernels.quantized import QuantizedWeight
from kernels.reference import mlp_reference
from kernels.schemes import ACTIVATION_DTYPES, GELU_FLAVOURS, INT8_DTYPES, ActivationScheme, Granularity
from kernels.version import __version__
from kernels.w8a8 import check_group_size

BENCH_DTYPES = ("fp16", "bf16", "w8a16", "w8a8")
ACTIVATION_BYTES = 2  # fp16 and bf16: x, biases and y of every row
IMPLS = ("gelugemm",) + peers.PEERS
DEFAULT_TOKENS = (1, 16, 128, 256, 512, 1024, 2048, 8192)
# The int8 rows' variants: w8a16's weight granularity, w8a8's activation scheme (the
# defaults gelugemm quantize writes). w8a8's weights are per channel.
DEFAULT_GRANULARITIES = ("group:128",)
DEFAULT_ACTIVATIONS = ("dynamic",)
QUICK_TOKENS = (1, 128, 2048)

# A buffer is reused only after the op has streamed this many L2s of other bytes.
ROTATE_OVER_L2 = 3
MAX_ROTATION_SETS = 64
FALLBACK_L2_BYTES = 50 * 2**20  # where torch does not report the L2 size
CHECK_ROWS = 64  # rows of the output compared with float64

# ||out - ref|| / ||ref|| allowed against the float64 MLP on the impl's own weights, by
# what the impl rounds: the fp16/bf16 intermediate and output (K up to 16384), or for
# w8a8 also x and the GELU output quantized to int8 (about 1% each).
RELERR_LIMITS = {"fp16": 5e-3, "bf16": 3e-2, "w8a8": 8e-2}

CEILING_MATMUL_N = 8192
CEILING_COPY_BYTES = 2**30


class MLPShape(NamedTuple):
    d_model: int
    d_ff: int

    def __str__(self) -> str:
        return f"{self.d_model}x{self.d_ff}"


DEFAULT_SHAPES = (MLPShape(768, 3072), MLPShape(4096, 16384))
# Gated runs: Gemma-2B's MLP (Gemma-7B's is 3072 x 24576).
GATED_SHAPES = (MLPShape(2048, 16384),)
# The eager peer over one concatenated gate and up weight, planned beside eager in gated runs.
EAGER_CAT = "eager-cat"


# ---- the arithmetic: FLOPs, bytes, roofline ------------------------------------------------


def mlp_flops(m: int, shape: MLPShape, gated: bool = False) -> int:
    """Multiply-adds of every GEMM, two operations each: 2*M*d*f per GEMM, two GEMMs (three
    for a gated MLP: gate, up, down); bias, GELU and the product not counted."""
    return (6 if gated else 4) * m * shape.d_model * shape.d_ff


def mlp_min_bytes(m: int, shape: MLPShape, dtype: str, granularity: str | None = None, gated: bool = False) -> int:
    """The fewest bytes the MLP must move: x, every weight (int8: 1 byte + a float32 scale
    per output channel, or per group of G inputs with granularity "group:G"), the biases
    and y, each once. x, biases and y are 2-byte floats (fp16 or bf16, the activation dtype
    of int8 rows); the intermediate can stay on chip. A gated MLP has three weights (gate,
    up: d -> f; down: f -> d) and no biases."""
    d, f = shape
    ups = 1 if gated else 0  # the up projection: another d x f weight
    if dtype in INT8_DTYPES:
        group = Granularity.parse(granularity).group_size
        scales = (f + d) if group is None else f * -(-d // group) + d * -(-f // group)
        scales += ups * (f if group is None else f * -(-d // group))
        weights = (2 + ups) * d * f * 1 + scales * 4
    else:
        weights = (2 + ups) * d * f * ACTIVATION_BYTES
    biases = 0 if gated else (f + d) * ACTIVATION_BYTES
    return weights + biases + 2 * m * d * ACTIVATION_BYTES


@dataclass
class Ceilings:
    """Rates measured on the device at the start of the run."""

    matmul_tflops: float  # bf16, also the float ceiling for fp16 and w8a16 (same tensor-core rate)
    int8_tops: float | None  # torch._int_mm; None where it cannot run
    copy_gbps: float  # device-to-device copy, bytes read + written

    def compute_rate(self, dtype: str) -> float:
        """Operations per second of the unit that runs this dtype's GEMMs."""
        if dtype == "w8a8" and self.int8_tops:
            return self.int8_tops * 1e12
        return self.matmul_tflops * 1e12


def roofline_floor_us(flops: int, nbytes: int, ceilings: Ceilings, dtype: str) -> tuple[float, str]:
    """(floor in microseconds, 'flops' or 'bytes'): the larger of compute time and memory time."""
    compute_us = flops / ceilings.compute_rate(dtype) * 1e6
    memory_us = nbytes / (ceilings.copy_gbps * 1e9) * 1e6
    return (compute_us, "flops") if compute_us >= memory_us else (memory_us, "bytes")


def rotation_sets(call_bytes: int, l2_bytes: int) -> int:
    """How many copies of the inputs and weights to rotate over so that each is L2-cold when reused."""
    return max(1, min(MAX_ROTATION_SETS, math.ceil(ROTATE_OVER_L2 * l2_bytes / max(call_bytes, 1))))


def relerr_limit(dtype: str, impl: str, activation_dtype: str = "fp16") -> float:
    """The error an impl of this row may have against float64 on its own weights."""
    if dtype == "w8a8" and impl in ("gelugemm", "int_mm"):
        return RELERR_LIMITS["w8a8"]
    return RELERR_LIMITS[activation_dtype if dtype in INT8_DTYPES else dtype]


# ---- timing ------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    reps: int


def median_time(call: Callable[[int], object], n_sets: int, warmup_ms: float, rep_ms: float,
                min_reps: int = 10, max_reps: int = 20_000) -> Timing:  # fmt: skip
    """Median over repeats of one call's time, measured with CUDA events around each call.

    `call(i)` runs the op on rotation set i. Like triton.testing.do_bench, warm-up and
    repeats are given in milliseconds and turned into counts from a first estimate; unlike
    it, nothing flushes L2 between calls (rotation keeps the data cold, and a flush leaves
    dirty lines that the timed call would pay to write back). Events around each call see
    what a Python caller sees, launch gaps included.
    """
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    call(0)
    torch.cuda.synchronize()
    start.record()
    for i in range(5):
        call(i % n_sets)
    end.record()
    end.synchronize()
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-4)
    for i in range(max(1, int(warmup_ms / estimate_ms))):
        call(i % n_sets)
    reps = max(min_reps, min(max_reps, int(rep_ms / estimate_ms)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda.synchronize()
    for i in range(reps):
        starts[i].record()
        call(i % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
    quantiles = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return Timing(statistics.median(times), quantiles[0], quantiles[3], reps)


def graph_time(call: Callable[[int], object], n_sets: int, warmup_ms: float, rep_ms: float,
               min_reps: int = 10, max_reps: int = 20_000) -> Timing:  # fmt: skip
    """Like median_time, but with the host out of the picture: the calls over all rotation
    sets are captured once in a CUDA graph, and each replay of it is timed with CUDA
    events; a call's time is the replay's over n_sets. What serving stacks that replay
    graphs (decode loops) see; small-M rows measured this way are GPU time, not launch cost.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up torch asks for before a capture
        for i in range(n_sets):
            call(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n_sets):
            call(i)
    timing = median_time(lambda _: graph.replay(), 1, warmup_ms, rep_ms, min_reps, max_reps)
    return Timing(timing.median_us / n_sets, timing.p20_us / n_sets, timing.p80_us / n_sets, timing.reps)


def measure_ceilings(device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> Ceilings:
    """Matmul, int8 and copy rates of this device, on random data (never zeros: they run faster)."""
    n = CEILING_MATMUL_N
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = median_time(lambda i: torch.mm(a, b), 1, warmup_ms, rep_ms)
    matmul_tflops = 2 * n**3 / (t.median_us * 1e-6) / 1e12
    del a, b

    int8_tops = None
    if hasattr(torch, "_int_mm"):
        a8 = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)
        w8 = torch.randint(-127, 128, (n, n), device=device, dtype=torch.int8)
        # W stored [N, K] and passed transposed, as the int_mm peer calls it.
        t = median_time(lambda i: torch._int_mm(a8, w8.t()), 1, warmup_ms, rep_ms)
        int8_tops = 2 * n**3 / (t.median_us * 1e-6) / 1e12
        del a8, w8

    src = torch.empty(CEILING_COPY_BYTES, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = median_time(lambda i: dst.copy_(src), 1, warmup_ms, rep_ms)
    copy_gbps = 2 * CEILING_COPY_BYTES / (t.median_us * 1e-6) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    return Ceilings(matmul_tflops, int8_tops, copy_gbps)


# ---- the result: one object, rendered as a table or written as JSON ---------------------------


@dataclass
class BenchRow:
    """One (shape, dtype, M, impl) measurement and what it means against the floor and gelugemm."""

    d_model: int
    d_ff: int
    dtype: str  # the row's group: fp16 | bf16 | w8a16 | w8a8
    tokens: int  # M
    impl: str  # gelugemm | eager | cublaslt | compile | dequant | int_mm
    gelu: str  # the GELU this impl computed: erf | tanh
    weights: str  # what the impl reads: fp16 | bf16 | int8
    status: str  # ok | wrong (error past the limit; still timed) | unavailable | error
    flops: int
    min_bytes: int
    floor_us: float
    floor_bound: str  # flops | bytes
    time_us: float | None = None  # median
    p20_us: float | None = None
    p80_us: float | None = None
    reps: int | None = None
    rotation_sets: int | None = None
    tflops: float | None = None  # TOP/s for w8a8
    gbps: float | None = None  # min_bytes / time
    pct_of_floor: float | None = None  # floor / time * 100
    speedup: float | None = None  # gelugemm's: this impl's time / gelugemm's time
    speedup_vs: str | None = None  # the gelugemm row it is taken against, e.g. "gelugemm tanh"
    # gelugemm rows: the fastest peer of the group (see fill_best_peer) and how gelugemm fares
    best_peer: str | None = None  # its label: "cublaslt (tanh)", "eager fp16", "int_mm"
    best_peer_us: float | None = None
    vs_best_peer: float | None = None  # best_peer_us / time_us: > 1 is gelugemm ahead
    beats_best_peer: bool | None = None  # vs_best_peer > 1; None where either was not measured right
    relerr: float | None = None  # ||out - ref|| / ||ref|| against float64 on CHECK_ROWS rows
    relerr_limit: float | None = None
    note: str | None = None
    error: str | None = None
    granularity: str | None = None  # int8 rows: the weight scales, per-channel | group:N
    activations: str | None = None  # w8a8 rows: the activation scheme, dynamic | group:N | static
    gated: bool = False  # a gated MLP (GeGLU): gate, up and down weights, no biases
    # gelugemm rows: the kernels one call launches, in order, each with the config it ran
    # (the autotuner's choice for this row, as Triton prints a config:
    # "gemm_tma_kernel BLOCK_M: 128, BLOCK_N: 256, ..., num_warps: 8, ...")
    kernels: list[str] | None = None

    @property
    def shape(self) -> MLPShape:
        return MLPShape(self.d_model, self.d_ff)

    @property
    def variant(self) -> str:
        """The row's group as the table names it: "fp16", "w8a16 group:128", "w8a8 dynamic"."""
        detail = self.activations if self.dtype == "w8a8" else self.granularity
        return f"{self.dtype} {detail}" if detail else self.dtype


@dataclass
class RunInfo:
    device: str
    capability: str
    sm_count: int
    l2_bytes: int
    torch: str
    triton: str
    cuda: str | None
    gelugemm: str
    date: str
    ceilings: Ceilings
    gelu: str  # the GELU asked for; cuBLASLt rows and their gelugemm twins are tanh
    activation_dtype: str  # x and y of the int8 rows
    cublaslt_gelu: str | None  # checked on the device: tanh | erf | unknown
    warmup_ms: float
    rep_ms: float
    command: str | None = None
    timing: str = "calls"  # calls: Python calls, launch cost included | cuda-graph: graph replays
    method: str = (
        "CUDA events around each call, median over repeats after warm-up; inputs and weights "
        f"rotated so each buffer is reused only after {ROTATE_OVER_L2}x L2 of other bytes; "
        "autotuning and torch.compile done before timing; relerr against a float64 MLP on the "
        "impl's own weights (dequantized for int8)."
    )


@dataclass
class BenchResult:
    info: RunInfo
    rows: list[BenchRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"info": asdict(self.info), "rows": [asdict(r) for r in self.rows]}

    def failed(self, impl: str | None = "gelugemm") -> list[BenchRow]:
        """Rows (of one impl, or all with None) that were not measured right: wrong output,
        a crash, or (for gelugemm) an op that refused the config."""
        return [r for r in self.rows if r.status != "ok" and (impl is None or r.impl == impl)]


def fill_metrics(row: BenchRow) -> None:
    """Throughput and floor fraction from the row's time (None where it was not timed)."""
    if row.time_us is None:
        return
    seconds = row.time_us * 1e-6
    row.tflops = row.flops / seconds / 1e12
    row.gbps = row.min_bytes / seconds / 1e9
    row.pct_of_floor = row.floor_us / row.time_us * 100


def fill_speedups(rows: list[BenchRow]) -> None:
    """gelugemm's speedup over every other row of its (shape, dtype, M) group.

    Each peer is compared with the gelugemm row of the same GELU flavour (the cuBLASLt
    epilogue is tanh-only), else with the group's first gelugemm row, said in speedup_vs.
    """
    groups: dict[tuple, list[BenchRow]] = {}
    for row in rows:
        groups.setdefault((row.d_model, row.d_ff, row.variant, row.tokens), []).append(row)
    for group in groups.values():
        ours = {r.gelu: r for r in group if r.impl == "gelugemm" and r.time_us}
        for row in group:
            if row.impl == "gelugemm" or not row.time_us or not ours:
                continue
            base = ours.get(row.gelu) or next(iter(ours.values()))
            row.speedup = row.time_us / base.time_us
            row.speedup_vs = f"gelugemm {base.gelu}"


def peer_label(row: BenchRow) -> str:
    """A peer as best_peer names it: the impl, its GELU where it is not the gelugemm row's,
    its weights where they are not the group's (a float peer in an int8 group)."""
    label = row.impl
    if row.weights != row.dtype and row.weights != "int8":
        label += f" {row.weights}"
    return label


def fill_best_peer(rows: list[BenchRow]) -> None:
    """On every gelugemm row: the fastest peer of its (shape, dtype variant, M) group and
    whether gelugemm beats it.

    The peers are every other impl of the group that was timed and passed its float64
    check (status "ok"): for fp16 and bf16 rows the float peers in that dtype; for int8
    rows the float peers in the activation dtype (eager, cuBLASLt, torch.compile and, in
    gated runs, eager-cat) and the group's int8 peer (dequant for w8a16, int_mm for w8a8).
    A peer counts whatever GELU it computes: cuBLASLt's tanh epilogue is the bar for the
    erf row too, as it is for a user who can switch to it. A gelugemm row that was not
    measured right, or a group without a measured peer, gets None, never a verdict.
    """
    groups: dict[tuple, list[BenchRow]] = {}
    for row in rows:
        groups.setdefault((row.d_model, row.d_ff, row.variant, row.tokens, row.gated), []).append(row)
    for group in groups.values():
        measured = [r for r in group if r.impl != "gelugemm" and r.status == "ok" and r.time_us]
        best = min(measured, key=lambda r: r.time_us, default=None)
        for row in group:
            if row.impl != "gelugemm" or best is None:
                continue
            row.best_peer = peer_label(best) + (f" ({best.gelu})" if best.gelu != row.gelu else "")
            row.best_peer_us = best.time_us
            if row.status == "ok" and row.time_us:
                row.vs_best_peer = best.time_us / row.time_us
                row.beats_best_peer = row.vs_best_peer > 1.0


# ---- running it -----------------------------------------------------------------------------

Progress = Callable[[str, int, int, str], None]  # (stage, done, total, label)


def _no_progress(stage: str, done: int, total: int, label: str) -> None:
    pass


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise BackendUnavailable(f"bench needs a CUDA GPU; torch {torch.__version__} sees none")
    return torch.device("cuda", torch.cuda.current_device())


def validate_request(shapes, dtypes, tokens, peer_names, gelu, activation_dtype, activations=DEFAULT_ACTIVATIONS,
                     granularities=DEFAULT_GRANULARITIES) -> None:  # fmt: skip
    """Raise GelugemmError on anything run_bench cannot run, before any device work."""
    if not shapes:
        raise GelugemmError("no shapes to benchmark")
    for shape in shapes:
        if len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape):
            raise GelugemmError(f"a shape is two positive integers d_model,d_ff; got {tuple(shape)}")
    if not dtypes:
        raise GelugemmError("no dtypes to benchmark")
    for name, values, allowed in (("dtype", dtypes, BENCH_DTYPES), ("peer", peer_names, peers.PEERS)):
        for value in values:
            if value not in allowed:
                raise GelugemmError(f"unknown {name} {value!r} (one of {', '.join(allowed)})")
    if not tokens or not all(isinstance(m, int) and m > 0 for m in tokens):
        raise GelugemmError(f"token counts must be positive integers; got {list(tokens)}")
    if gelu not in GELU_FLAVOURS:
        raise GelugemmError(f"gelu must be one of {', '.join(GELU_FLAVOURS)}; got {gelu!r}")
    if activation_dtype not in ACTIVATION_DTYPES:
        raise GelugemmError(f"activation dtype must be fp16 or bf16; got {activation_dtype!r}")
    if not activations or not granularities:
        raise GelugemmError("no w8a8 activation scheme or w8a16 granularity to benchmark")
    for value in activations:
        scheme = ActivationScheme.parse(value)
        if scheme.kind == "group":
            check_group_size(scheme.group_size)
    for value in granularities:
        Granularity.parse(value)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@dataclass
class _Case:
    """One impl on one workload: what it reads, how to build it, and what it measured."""

    shape: MLPShape
    m: int
    impl: str
    gelu: str
    weights: str  # the weight sets it reads: "fp16" | "bf16" (float) or "w8a16" | "w8a8" (int8)
    n_sets: int  # rotation sets
    build: Callable[[], Callable]  # -> fn(x, w1, b1, w2, b2) -> y
    relerr_limit: float
    note: str | None = None
    granularity: str | None = None  # int8 weight sets: their scales' granularity
    activations: str | None = None  # gelugemm w8a8: the activation scheme
    form: str | None = None  # gated runs: "separate" (gate and up weights) or "concatenated" (one)
    call: Callable[[int], torch.Tensor] | None = None  # fn on rotation set i, bound in _prepare
    status: str = "pending"
    relerr: float | None = None
    timing: Timing | None = None
    error: str | None = None
    kernels: list[str] | None = None  # gelugemm: what one call launches (see BenchRow.kernels)


class _Workloads:
    """The random inputs and weights of one run, made on first use and rotated by index.

    Float weights are drawn per set; int8 weights are the quantization (per channel, or
    per group) of the float set with the same index, so float peers and int8 impls see the
    same matrices. w8a8's carry static scales for x and GELU's output too (used by
    `static` only), calibrated as a max observer would on 256 random tokens.

    gated: each set is (w_gate, None, w_down, None, w_up, None), the op's argument order;
    its "concatenated" form is (cat(w_gate, w_up), None, w_down, None), the same matrices.
    """

    def __init__(self, device: torch.device, activation_dtype: str, gated: bool = False):
        self.device = device
        self.activation_dtype = activation_dtype
        self.gated = gated
        self._float: dict = {}
        self._int8: dict = {}
        self._x: dict = {}
        self._refs: dict = {}
        self._static_scales: dict = {}

    def _randn(self, *shape, dtype, scale=1.0):
        return (torch.randn(*shape, device=self.device, dtype=torch.float32) * scale).to(dtype)

    def x_dtype(self, weights: str) -> torch.dtype:
        return ACTIVATION_DTYPES[self.activation_dtype if weights in INT8_DTYPES else weights]

    def float_weights(self, shape: MLPShape, dtype: torch.dtype, n: int) -> list[tuple]:
        sets = self._float.setdefault((shape, dtype), [])
        d, f = shape
        while len(sets) < n:
            if self.gated:
                sets.append((
                    self._randn(f, d, dtype=dtype, scale=d**-0.5), None, self._randn(d, f, dtype=dtype, scale=f**-0.5),
                    None, self._randn(f, d, dtype=dtype, scale=d**-0.5), None,
                ))  # fmt: skip
                continue
            sets.append((
                self._randn(f, d, dtype=dtype, scale=d**-0.5), self._randn(f, dtype=dtype, scale=0.5),
                self._randn(d, f, dtype=dtype, scale=f**-0.5), self._randn(d, dtype=dtype, scale=0.5),
            ))  # fmt: skip
        return sets

    def static_scales(self, shape: MLPShape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """w8a8's static scales for x and the GELU output (gated: GELU(gate) * up): their amax
        over 256 random tokens / 127."""
        key = (shape, dtype)
        if key not in self._static_scales:
            w1, b1, _, _, *up = self.float_weights(shape, dtype, 1)[0]
            x = self._randn(256, shape.d_model, dtype=torch.float32)
            h = x @ w1.float().t() + (0.0 if b1 is None else b1.float())
            h = torch.nn.functional.gelu(h) * (x @ up[0].float().t() if self.gated else 1.0)
            self._static_scales[key] = (scale_from_absmax(x.abs().amax()), scale_from_absmax(h.abs().amax()))
        return self._static_scales[key]

    def int8_weights(self, shape: MLPShape, dtype: str, granularity: str | None, n: int) -> list[tuple]:
        act = ACTIVATION_DTYPES[self.activation_dtype]
        group = Granularity.parse(granularity).group_size
        sets = self._int8.setdefault((shape, dtype, group), [])
        for w1, b1, w2, b2, *up in self.float_weights(shape, act, n)[len(sets) : n]:
            q1, q2 = quantize_weight(w1, group_size=group), quantize_weight(w2, group_size=group)
            if dtype == "w8a8":
                q1.input_scale, q1.output_scale = self.static_scales(shape, act)
            # gated: (q_gate, None, q_down, None, q_up, None)
            sets.append((q1, b1, q2, b2, *((quantize_weight(up[0], group_size=group), None) if up else ())))
        return sets

    def weight_sets(self, shape: MLPShape, weights: str, n: int, granularity: str | None = None,
                    form: str | None = None) -> list[tuple]:  # fmt: skip
        sets = (self.int8_weights(shape, weights, granularity, n) if weights in INT8_DTYPES
                else self.float_weights(shape, ACTIVATION_DTYPES[weights], n))  # fmt: skip
        if form != "concatenated":
            return sets
        # one [2 d_ff, d_model] weight, gate rows first (made once per set, outside the timing)
        key = (shape, weights, granularity)
        cat = self._float.setdefault(("concatenated", key), [])
        for w1, _, w2, _, w_up, _ in sets[len(cat) : n]:
            cat.append((torch.cat([w1, w_up]), None, w2, None))
        return cat

    def inputs(self, shape: MLPShape, dtype: torch.dtype, m: int, n: int) -> list[torch.Tensor]:
        sets = self._x.setdefault((shape, dtype, m), [])
        while len(sets) < n:
            sets.append(self._randn(m, shape.d_model, dtype=dtype))
        return sets

    def bind(self, case: _Case) -> Callable[[int], torch.Tensor]:
        """case's impl as call(i) on rotation set i, with every buffer looked up beforehand so
        that the timed call does nothing but run the impl."""
        n = case.n_sets
        # gelugemm: an op per weight set (a model's layers each hold one); a peer is one function
        fns = [case.build() for _ in range(n)] if case.impl == "gelugemm" else [case.build()] * n
        xs = self.inputs(case.shape, self.x_dtype(case.weights), case.m, n)
        sets = self.weight_sets(case.shape, case.weights, n, case.granularity, case.form)
        # (x, w1, b1, w2, b2), and a gated set's up projection as the keywords every impl takes
        calls = [functools.partial(fn, x, *w[:4], **dict(zip(("w_up", "b_up"), w[4:]))) for fn, x, w in zip(fns, xs, sets)]

        def call(i: int) -> torch.Tensor:
            return calls[i % n]()

        return call

    def relerr(self, case: _Case, out: torch.Tensor) -> float:
        """||out - ref|| / ||ref|| on up to CHECK_ROWS rows of call(0)'s output, ref in float64."""
        rows, ref = self._reference(case.shape, case.m, case.weights, case.gelu, case.granularity)
        out = out[rows].to(torch.float64)
        if not torch.isfinite(out).all():
            return float("inf")
        return ((out - ref).norm() / ref.norm()).item()

    def _reference(self, shape, m, weights, gelu, granularity) -> tuple[torch.Tensor, torch.Tensor]:
        key = (shape, m, weights, gelu, granularity)
        if key not in self._refs:
            # Rows spread over all of M, so a wrong tile far from the first one shows.
            rows = torch.linspace(0, m - 1, min(m, CHECK_ROWS), device=self.device).round().long().unique()
            x = self.inputs(shape, self.x_dtype(weights), m, 1)[0][rows]
            w1, b1, w2, b2, *up = self.weight_sets(shape, weights, 1, granularity)[0]
            w_up, b_up = up or (None, None)
            ref = mlp_reference(
                f64(x), f64(w1), f64(b1), f64(w2), f64(b2), gelu_flavour=gelu, dtype=torch.float64, gated=self.gated,
                w_up=f64(w_up), b_up=f64(b_up),
            )  # fmt: skip
            self._refs[key] = (rows, ref)
        return self._refs[key]


def f64(t):
    """t in float64: a float tensor cast, an int8 weight dequantized, None kept."""
    if t is None:
        return None
    return t.dequantize(dtype=torch.float64) if isinstance(t, QuantizedWeight) else t.to(torch.float64)


def _gelugemm_op(dtype: str, gelu: str, activation_dtype: str, device: torch.device, activations: str | None,
                 gated: bool = False) -> FusedMLP:  # fmt: skip
    config = MLPConfig(
        dtype=dtype, gelu=gelu, backend="triton", activation_dtype=activation_dtype, activations=activations or "dynamic",
        gated=gated,
    )  # fmt: skip
    return FusedMLP(config, device=device)


def int8_variants(dtype: str, activations, granularities) -> list[tuple[str | None, str | None]]:
    """(granularity, activations) of each group a dtype's rows fall in: w8a16 one per weight
    granularity, w8a8 (per-channel weights) one per activation scheme, floats one."""
    if dtype == "w8a8":
        return [("per-channel", str(ActivationScheme.parse(a))) for a in activations]
    if dtype == "w8a16":
        return [(str(Granularity.parse(g)), None) for g in granularities]
    return [(None, None)]


def _plan(shape, dtype, variant, m, peer_names, gelu, activation_dtype, l2_bytes, device, gated=False) -> list[tuple[tuple, _Case]]:
    """(identity key, case) for every impl of one (shape, dtype, variant, M) group, gelugemm first.

    Float peers of an int8 group run on float weights in the activation dtype; their key
    leaves the group's dtype out, so the fp16 group's measurement is reused, not repeated;
    int_mm (per-token quantization in torch) is one measurement for every w8a8 scheme.
    gated: the gated MLP's ops and peers, eager-cat beside eager.
    """
    granularity, activations = variant
    float_weights = activation_dtype if dtype in INT8_DTYPES else dtype
    form = "separate" if gated else None

    def case(impl, flavour, weights, build, note=None, form=form) -> _Case:
        n_sets = rotation_sets(mlp_min_bytes(m, shape, weights, granularity, gated), l2_bytes)
        limit = relerr_limit(dtype, impl, activation_dtype)
        return _Case(
            shape, m, impl, flavour, weights, n_sets, build, limit, note,
            granularity=granularity if weights in INT8_DTYPES else None,
            activations=activations if impl == "gelugemm" else None, form=form,
        )  # fmt: skip

    plans = []
    # gelugemm in the GELU asked for, and in tanh too when the tanh-only cuBLASLt peer is
    # in the run, so that its speedup compares like with like.
    flavours = [gelu] + (["tanh"] if gelu != "tanh" and "cublaslt" in peer_names else [])
    for flavour in flavours:
        build = functools.partial(_gelugemm_op, dtype, flavour, activation_dtype, device, activations, gated)
        plans.append(((shape, dtype, variant, m, "gelugemm", flavour), case("gelugemm", flavour, dtype, build)))

    for peer in peer_names:
        if peer == "eager":
            build = lambda: functools.partial(peers.eager_mlp, gelu=gelu, gated=gated)  # noqa: E731
            plans.append(((shape, float_weights, m, peer), case(peer, gelu, float_weights, build)))
            if gated:  # the same MLP on one concatenated gate and up weight: one GEMM for both
                note = "one GEMM on the concatenated gate and up weight (ModernBERT's form)"
                plans.append(((shape, float_weights, m, EAGER_CAT),
                              case(EAGER_CAT, gelu, float_weights, build, note, form="concatenated")))  # fmt: skip
        elif peer == "cublaslt":
            note = "cuBLASLt's GELU epilogue is tanh" + (" (on the gate GEMM)" if gated else "")
            build = lambda: functools.partial(peers.cublaslt_mlp, gated=gated)  # noqa: E731
            plans.append(((shape, float_weights, m, peer), case(peer, "tanh", float_weights, build, note)))
        elif peer == "compile":
            build = functools.partial(peers.compiled_mlp, gelu, gated)
            plans.append(((shape, float_weights, m, peer), case(peer, gelu, float_weights, build)))
        elif peers.INT8_PEERS[peer] == dtype:
            fn = peers.dequant_mlp if peer == "dequant" else peers.int_mm_mlp
            build = lambda fn=fn: functools.partial(fn, gelu=gelu, gated=gated)  # noqa: E731
            note = None
            if peer == "int_mm" and m <= 16:
                note = f"x padded to {peers.INT_MM_MIN_ROWS} rows: torch._int_mm needs more than 16"
            key = (shape, dtype, granularity, m, peer)  # int_mm: the same for every activation scheme
            plans.append((key, case(peer, gelu, dtype, build, note)))
    return plans


def run_bench(
    shapes: list[MLPShape] = DEFAULT_SHAPES,
    dtypes: list[str] = BENCH_DTYPES,
    tokens: list[int] = DEFAULT_TOKENS,
    peer_names: list[str] = peers.PEERS,
    *,
    gelu: str = "erf",
    activation_dtype: str = "fp16",
    activations: list[str] = DEFAULT_ACTIVATIONS,
    granularities: list[str] = DEFAULT_GRANULARITIES,
    gated: bool = False,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cuda_graph: bool = False,
    progress: Progress | None = None,
    command: str | None = None,
    raise_errors: bool = False,
) -> BenchResult:
    """Time gelugemm's op and its peers on every (shape, dtype, M); see the module docstring.

    activations: the w8a8 activation schemes to time ("dynamic", "group:N", "static"), a
    group of rows each; granularities: w8a16's weight scales ("group:128", "per-channel").
    gated: time gated MLPs (GeGLU) of these shapes (see the module docstring).

    progress(stage, done, total, label) is called as the run goes; stages are
    "ceilings", "prepare" (autotune, compile, check) and "time".
    cuda_graph=True times graph replays (graph_time) instead of Python calls (median_time).
    A case that fails is kept as a row with its error (raise_errors=True re-raises it);
    a gelugemm dtype whose kernels are not there yet is a row with status "unavailable".
    """
    validate_request(shapes, dtypes, tokens, peer_names, gelu, activation_dtype, activations, granularities)
    shapes = [MLPShape(*s) for s in shapes]
    device = require_cuda()
    report = progress or _no_progress
    with torch.inference_mode(), peers.dynamo_patch():
        report("ceilings", 0, 1, "matmul, int8, copy")
        ceilings = measure_ceilings(device, warmup_ms, max(rep_ms, 100.0))
        report("ceilings", 1, 1, "matmul, int8, copy")
        info = _run_info(device, ceilings, gelu, activation_dtype, warmup_ms, rep_ms, command, peer_names)
        info.timing = "cuda-graph" if cuda_graph else "calls"
        timer = graph_time if cuda_graph else median_time

        groups = []  # ((shape, dtype, variant, m), [case keys])
        cases: dict[tuple, _Case] = {}
        for shape in shapes:
            for dtype in dtypes:
                for variant in int8_variants(dtype, activations, granularities):
                    for m in tokens:
                        plans = _plan(shape, dtype, variant, m, peer_names, gelu, activation_dtype, info.l2_bytes, device, gated)
                        for key, case in plans:
                            cases.setdefault(key, case)
                        groups.append(((shape, dtype, variant, m), [key for key, _ in plans]))

        work = _Workloads(device, activation_dtype, gated)
        for done, (key, case) in enumerate(cases.items()):
            report("prepare", done, len(cases), _label(case))
            _prepare(case, work, raise_errors)
        report("prepare", len(cases), len(cases), "done")

        timed = [(key, case) for key, case in cases.items() if case.status in ("ok", "wrong")]
        for done, (key, case) in enumerate(timed):
            report("time", done, len(timed), _label(case))
            try:
                case.timing = timer(case.call, case.n_sets, warmup_ms, rep_ms)
            except Exception as exc:
                if raise_errors:
                    raise
                case.status, case.error = "error", _one_line(exc)
        report("time", len(timed), len(timed), "done")

    rows = []
    for (shape, dtype, (granularity, scheme), m), keys in groups:
        flops, nbytes = mlp_flops(m, shape, gated), mlp_min_bytes(m, shape, dtype, granularity, gated)
        floor_us, bound = roofline_floor_us(flops, nbytes, ceilings, dtype)
        for key in keys:
            c = cases[key]
            t = c.timing
            row = BenchRow(
                shape.d_model, shape.d_ff, dtype, m, c.impl, c.gelu,
                "int8" if c.weights in INT8_DTYPES else c.weights, c.status, flops, nbytes, floor_us, bound,
                time_us=t and t.median_us, p20_us=t and t.p20_us, p80_us=t and t.p80_us, reps=t and t.reps,
                rotation_sets=c.n_sets, relerr=c.relerr, relerr_limit=c.relerr_limit, note=c.note, error=c.error,
                granularity=granularity, activations=scheme, gated=gated, kernels=c.kernels,
            )  # fmt: skip
            fill_metrics(row)
            rows.append(row)
    fill_speedups(rows)
    fill_best_peer(rows)
    return BenchResult(info, rows)


def _label(case: _Case) -> str:
    detail = " ".join(v for v in (case.granularity if case.weights in INT8_DTYPES else None, case.activations) if v)
    tanh = " (tanh)" if case.impl == "gelugemm" and case.gelu == "tanh" else ""
    return f"{case.shape} {case.weights}{' ' + detail if detail else ''} M={case.m} {case.impl}{tanh}"


def _prepare(case: _Case, work: _Workloads, raise_errors: bool) -> None:
    """Bind the buffers, make the first call (autotune, compile) and check it; sets case.status."""
    try:
        case.call = work.bind(case)
        out = case.call(0)
        torch.cuda.synchronize()
        case.relerr = work.relerr(case, out)
        case.status = "ok" if case.relerr <= case.relerr_limit else "wrong"
        if case.impl == "gelugemm":
            # one more call, recorded: the kernels and the configs the timed calls run
            with recorded_launches() as launched:
                case.call(0)
            case.kernels = [f"{name} {config}".strip() for name, config in launched]
    except GelugemmError as exc:
        # The op refusing a config (a dtype whose kernels have not landed) is not a crash.
        if raise_errors:
            raise
        case.status, case.error = "unavailable", str(exc)
    except Exception as exc:
        if raise_errors:
            raise
        case.status, case.error = "error", _one_line(exc)


def _run_info(device, ceilings, gelu, activation_dtype, warmup_ms, rep_ms, command, peer_names) -> RunInfo:
    import triton

    props = torch.cuda.get_device_properties(device)
    cublaslt = None
    if "cublaslt" in peer_names:
        cublaslt = peers.cublaslt_gelu_flavour(device, torch.float16)
    return RunInfo(
        device=props.name,
        capability="{}.{}".format(*torch.cuda.get_device_capability(device)),
        sm_count=props.multi_processor_count,
        l2_bytes=int(getattr(props, "L2_cache_size", 0) or FALLBACK_L2_BYTES),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        gelugemm=__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        ceilings=ceilings,
        gelu=gelu,
        activation_dtype=activation_dtype,
        cublaslt_gelu=cublaslt,
        warmup_ms=warmup_ms,
        rep_ms=rep_ms,
        command=command,
    )
