"""Verify: how far each path through a checkpoint's MLPs is from the fp16 path, gated per dtype.

    report = verify_checkpoint("model.safetensors", ["bf16", "w8a8"], calib="calib.safetensors")
    report.passed       # every (layer, dtype) row within its tolerance
    report.to_dict()    # what the CLI renders as a table and writes with --json

For each MLP, on the "verify" split of its calibration inputs (rows quantize never
calibrates on; seeded when synthetic):

    fp16 path   the layer as a user runs it in fp16 today: fp16 weights and inputs,
                F.linear -> F.gelu -> F.linear in plain torch (a gated MLP: F.linear for
                gate and up, or one on a concatenated weight, GELU(gate) * up, F.linear).
                The bf16 path instead where the model runs in bf16: config.json's
                torch_dtype says so, the family overflows fp16 (T5 v1.1, Flan-T5), or
                --activation-dtype bf16 asks; the int8 rows then take bf16 activations.
    float64     the same three calls in float64 from the original weights: the exact MLP
    dtype rows  gelugemm's op (`FusedMLP`) in each asked dtype: the fused Triton kernels
                on CUDA, the torch reference elsewhere (reported, never silent)

Each row is measured against both references (`calibration.metrics`); the gate is its
relative Frobenius error against the fp16 path, at most the tolerance of what it ran
(`DEFAULT_TOLERANCES`, keyed by dtype and, for int8, scheme: "w8a16:group:128",
"w8a8:dynamic", "w8a8:static", ...) or what the caller passes (against a bf16 path, a
default tolerance is at least bf16's: the reference's own rounding is part of every row's
distance from it). The fp16 path's own distance from float64 is reported per layer, so a
reader sees how far "what users run today" is from exact.

Where the weights come from:

- an original checkpoint: float rows cast its weights to the dtype; int8 rows quantize
  them in memory with quantize's defaults (w8a16: group:128 scales; w8a8: per-channel
  weights, dynamic per-token activations, no smoothing).
- a quantized checkpoint (written by `quantize`, or a compressed-tensors int8 checkpoint
  another tool wrote): its int8 rows use its int8 weights and scales as written, and both
  references come from the source checkpoint recorded in gelugemm's metadata (found by
  path, checked by sha256) or from `reference=` (the only way for another tool's, which
  records no source); a quantized checkpoint alone has no fp16 path to compare with.
  Float rows run from that reference's float weights. Only the checkpoint's own int8
  scheme can be verified: the other scheme is not in it.

A checkpoint is a .safetensors file or a model directory (single file or shards); each is
opened once.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from calibration.checkpoint import (
    Checkpoint,
    MLPLayer,
    MLPTensors,
    all_finite,
    mlps_in,
    open_checkpoint,
    read_mlp,
    read_tensor,
    select_layers,
)
from calibration.data import DEFAULT_TOKENS, calibration_inputs, check_calibration_file, check_tokens_fit, describe_source
from calibration.errors import CheckpointError, OptionError
from calibration.families import check_asked_activation_dtype
from calibration.metrics import ErrorMetrics, error_metrics, json_safe
from calibration.model import int8_op_fields
from calibration.options import QuantizeOptions, comma_list, positive_number
from calibration.ranks import current as current_ranks
from calibration.ranks import together
from calibration.safetensors_stream import ReadBuffer
from calibration.timing import PhaseTimer
from calibration.quantize_mlp import quantize_gated_mlp, quantize_mlp
from calibration.quantized_file import (
    FormatScheme,
    QuantizedCheckpoint,
    compare_with_source,
    is_quantized_checkpoint,
    resolve_source,
    scheme_from_options,
    sha256_file,
)
from kernels.op import DTYPES, FLOAT_DTYPES, INT8_DTYPES, FusedMLP, MLPConfig, choose_backend
from kernels.version import __version__
from kernels.reference import as_out_in, eager_gelu
from kernels.schemes import ActivationScheme, Granularity, SchemeError, closest_key
from kernels.schemes import scheme_key

GATE_METRIC = "rel_frobenius"
GATE_REFERENCE = "fp16 path"

# The gate: the largest relative Frobenius error against the fp16 path each dtype, and each
# int8 scheme ("w8a16:<granularity>", "w8a8:<activations>"; kernels.schemes.scheme_key), may
# have, written once. Each is 2-2.4x the worst error measured on real weights
# (all-MiniLM-L6-v2's six fp32 MLPs and the two fp16 ones in samples/, on real activations
# and on verify's synthetic rows, with and without --smooth 0.5; torch reference): fp16
# 4.96e-4, bf16 4.57e-3, fp32 6.21e-4; w8a16 per-channel 2.63e-2, group:128 1.40e-2; w8a8
# dynamic 3.75e-2, group:128 3.24e-2 (the worst on synthetic rows: on real ones 3.7e-2 and
# 2.2e-2), static 1.14e-1 (calibrated and graded on real rows; graded on synthetic rows a
# static file calibrated on real ones is up to 3.3e-1 off, and verify says its inputs are
# not what it was calibrated for). bench/RESULTS.md section 11 has every measurement. fp32
# is graded by how far it is from the fp16 path, which is the fp16 path's own rounding (its
# distance from float64 is in the report).
DEFAULT_TOLERANCES = {
    "fp16": 1e-3,
    "bf16": 1e-2,
    "fp32": 1.5e-3,
    "w8a16:per-channel": 6e-2,
    "w8a16:group:128": 3e-2,
    "w8a8:dynamic": 8e-2,
    "w8a8:group:128": 7e-2,
    "w8a8:static": 2.5e-1,
}

# int8 schemes take and return activations in the reference path's dtype: fp16, unless the
# MLP's activation dtype (MLPLayer.activation_dtype: config.json, the family, or asked) is bf16.
INT8_ACTIVATION_DTYPE = "fp16"
REFERENCE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# How `quantize` quantizes by default: the in-memory quantization of an original checkpoint.
QUANTIZE_DEFAULTS = {scheme: QuantizeOptions(scheme=scheme) for scheme in INT8_DTYPES}

Progress = Callable[[int, int, str], None]  # (done, total, what was just verified)


# ---- options -----------------------------------------------------------------------------------


def parse_dtypes(text: str) -> list[str]:
    """'bf16,w8a8' -> ['bf16', 'w8a8']; 'all' stays 'all' (which dtypes apply depends on the file)."""
    names = comma_list(text, "--dtype")
    for name in names:
        if name not in DTYPES and name != "all":
            raise OptionError(f"--dtype: unknown {name!r}; choose from {', '.join(DTYPES)}, all (or a comma list)")
    return names


def _row_key(dtype: str, scheme: FormatScheme | None = None) -> str:
    """What a row runs, as tolerances are keyed: "fp16", "w8a16:group:128", "w8a8:dynamic"."""
    if dtype in FLOAT_DTYPES:
        return dtype
    return scheme_key(dtype, scheme.granularity, scheme.activations)


def _tolerance_key(text: str) -> str:
    """A --tol name: DTYPE, or DTYPE:SCHEME (w8a16:per-channel, w8a16:group:N, w8a8:dynamic,
    w8a8:group:N, w8a8:static), in its canonical spelling."""
    dtype, sep, detail = text.partition(":")
    if dtype not in DTYPES or (sep and dtype in FLOAT_DTYPES):
        raise OptionError(
            f"--tol takes VALUE or NAME=VALUE,... with NAME a dtype ({', '.join(DTYPES)}) or an int8 scheme "
            f"(w8a16:per-channel, w8a16:group:N, w8a8:dynamic, w8a8:group:N, w8a8:static); got {text!r}"
        )
    if not sep:
        return dtype
    try:
        parsed = ActivationScheme.parse(detail) if dtype == "w8a8" else Granularity.parse(detail)
    except SchemeError as exc:
        raise OptionError(f"--tol {text}: {exc}") from None
    return f"{dtype}:{parsed}"


def default_tolerance(key: str) -> float:
    """DEFAULT_TOLERANCES[key]; a group size the table does not name takes group:128's when it is
    finer (at least as accurate), else per-channel's (w8a16: the coarsest scales)."""
    return DEFAULT_TOLERANCES[closest_key(key, DEFAULT_TOLERANCES)]


def parse_tolerances(text: str) -> float | dict[str, float]:
    """'0.02' (every row) or 'bf16=0.01,w8a8=0.05,w8a8:static=0.2' (those dtypes, or one int8
    scheme of a dtype; the rest keep their default)."""
    if "=" not in text:
        return positive_number(text.strip(), "--tol: the tolerance")
    tolerances = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            _tolerance_key("")  # the message says what --tol takes
        key = _tolerance_key(name.strip())
        tolerances[key] = positive_number(value.strip(), f"--tol: {key}")
    return tolerances


def _tolerances(tol: float | dict[str, float] | None, keys: list[str]) -> tuple[dict[str, float], dict[str, str]]:
    """(tolerance per row key, where each came from: "default" or "asked"). A dict names row
    keys ("w8a8:static") or whole dtypes ("w8a8"); the key wins."""
    if isinstance(tol, dict):
        tol = {_tolerance_key(name): value for name, value in tol.items()}
    chosen, origin = {}, {}
    for key in keys:
        if isinstance(tol, (int, float)):
            asked = tol
        else:
            asked = (tol or {}).get(key, (tol or {}).get(key.partition(":")[0]))
        if asked is not None and not (math.isfinite(asked) and asked > 0):
            raise OptionError(f"--tol must be a positive number; got {asked!r}")
        chosen[key] = float(asked) if asked is not None else default_tolerance(key)
        origin[key] = "asked" if asked is not None else "default"
    return chosen, origin


def _resolve_dtypes(asked: Sequence[str] | str | None, scheme: str | None) -> list[str]:
    """The dtypes to verify, in DTYPES order. scheme: a quantized file's, else None.

    Default and "all": every dtype for an original checkpoint; for a quantized file the
    default is its scheme, and "all" the float dtypes (from the reference) plus its scheme.
    """
    if asked is None:
        names = ["all"] if scheme is None else [scheme]
    else:
        names = parse_dtypes(asked if isinstance(asked, str) else ",".join(asked))
    if scheme is not None:
        other = [name for name in names if name in INT8_DTYPES and name != scheme]
        if other:
            raise OptionError(
                f"this file holds {scheme} weights; it cannot be verified as {other[0]} "
                f"(verify the original checkpoint for that, or quantize it with --scheme {other[0]})"
            )
    applicable = list(FLOAT_DTYPES) + ([scheme] if scheme is not None else list(INT8_DTYPES))
    wanted = set(applicable) if "all" in names else set(names)
    return [d for d in DTYPES if d in wanted]


# ---- the references ----------------------------------------------------------------------------


def torch_mlp(
    x, w1, b1, w2, b2, w_up=None, b_up=None, *, gelu: str, weight_layout: str, dtype: torch.dtype, gated: bool = False
) -> torch.Tensor:
    """F.linear -> F.gelu -> F.linear with every operand cast to `dtype`.

    In fp16 this is the fp16 path: what `model.half()` runs today. Eager torch rounds
    GEMM1's output to fp16 before GELU and again after it (the fused kernels round once).
    torch runs fp16 F.linear and F.gelu natively on CPU too (checked with torch 2.13), so
    the fp16 path is the same three calls on every device.
    In float64 it is the exact MLP.
    gated: as the models compute it, GELU(F.linear(x, Wg, bg)) * F.linear(x, Wu, bu)
    (Gemma, T5), or F.linear(x, W1, b1) cut in halves, GELU(first) * second (ModernBERT's
    concatenated Wi: w_up None), each step rounded to `dtype`; then F.linear with W2.
    """
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    # Conv1D ([in, out]) weights are used through a transposed view: the same products.
    h = F.linear(cast(x), as_out_in(cast(w1), weight_layout), cast(b1))
    if gated and w_up is None:
        h, up = h.chunk(2, dim=-1)
    elif gated:
        up = F.linear(cast(x), as_out_in(cast(w_up), weight_layout), cast(b_up))
    h = eager_gelu(h, gelu)
    if gated:
        h = h * up
    return F.linear(h, as_out_in(cast(w2), weight_layout), cast(b2))


# ---- the result --------------------------------------------------------------------------------


@dataclass
class VerifyRow:
    """One MLP run in one dtype, measured against the fp16 path (the gate) and float64."""

    layer: str  # the MLP's fc1 prefix
    dtype: str
    scheme: str  # what ran, as tolerances are keyed: the dtype, or "w8a16:group:128", "w8a8:dynamic", ...
    backend: str  # what ran: "triton" or "torch"
    weights: str  # where the weights came from
    gelu: str  # the flavour the op ran
    vs_fp16_path: ErrorMetrics
    vs_float64: ErrorMetrics
    tolerance: float
    passed: bool  # within tolerance, and no problem
    problem: str | None = None  # a reason to fail that the numbers alone may not show


@dataclass
class LayerResult:
    """One MLP: its inputs and how far the fp16 path itself is from exact."""

    fc1: str
    fc2: str
    d_model: int
    d_ff: int
    weight_dtype: str  # the reference's stored dtype ("F32", "F16", ...)
    gelu: str  # the flavour of both references
    gelu_source: str
    inputs: str  # where x came from (calibration_inputs' description)
    tokens: int
    fp16_path_vs_float64: ErrorMetrics  # the reference path's own error (the bf16 path's, for bf16 MLPs)
    gated: str | None = None  # None, "separate" or "concatenated" (calibration.checkpoint.MLPLayer)
    reference_dtype: str = "fp16"  # the reference path's dtype, and the int8 rows' activations
    reference_dtype_source: str = "default"


@dataclass
class VerifyReport:
    checkpoint: str
    kind: str  # "original" or "quantized"
    quantized: dict | None  # a quantized file's record: scheme, granularity, method, smooth, calibration
    reference: dict  # path, how it was found, sha256, whether it matches the record
    device: str
    backend: str  # what ran: "triton" or "torch"
    backend_reason: str
    backend_asked: str
    gate: dict
    tolerances: dict[str, float]  # per row scheme (VerifyRow.scheme: "fp16", "w8a8:dynamic", ...)
    tolerance_origin: dict[str, str]  # "default" or "asked", per row scheme
    dtypes: list[str]
    calibration: dict  # the verify split's source (calibration.data.describe_source)
    in_memory_quantization: dict | None  # how an original checkpoint's int8 rows were quantized
    layers: list[LayerResult]
    rows: list[VerifyRow]
    notes: list[str] = field(default_factory=list)  # things a reader must not miss (header lines)
    seconds: float = 0.0
    # where the seconds went (calibration.timing): phases, the dominant one, and per_mlp_s,
    # the whole run's seconds over the MLPs verified
    timing: dict = field(default_factory=dict)
    version: str = __version__

    @property
    def failures(self) -> list[VerifyRow]:
        return [row for row in self.rows if not row.passed]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        out = json_safe(asdict(self))
        out["passed"], out["failed"] = self.passed, len(self.failures)
        return out


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class _Operands:
    """What a dtype row runs: the op's weights (float or QuantizedWeight) and biases."""

    tensors: MLPTensors  # w1, b1, w2, b2, w_up, b_up
    gelu: str
    weights: str
    scheme: str  # scheme_key: the dtype, or the int8 scheme ("w8a8:dynamic")
    op_fields: dict = field(default_factory=dict)  # how the op scales w8a8 inputs


def _float_operands(floats, dtype: str, gelu: str, stored: str) -> _Operands:
    want = FLOAT_DTYPES[dtype]
    return _Operands(floats.map(lambda t: t.to(want)), gelu, f"{stored} weights as {dtype}", dtype)


def _run_row(layer: MLPLayer, ref_layer: MLPLayer, dtype: str, operands: _Operands, x, refs, tolerance, backend, device,
             activation_dtype: str, timer: PhaseTimer) -> VerifyRow:  # fmt: skip
    config = MLPConfig(
        dtype=dtype, gelu=operands.gelu, weight_layout=layer.weight_layout, backend=backend,
        activation_dtype=activation_dtype, gated=layer.is_gated, **operands.op_fields,
    )  # fmt: skip
    with timer.phase("to device"):
        tensors = operands.tensors.map(lambda t: t.to(device))
    with timer.phase("op"):
        op = FusedMLP(config, device=device)
        out = op(x.to(config.torch_dtype), *tensors)
    y16, y64 = refs
    with timer.phase("metrics"):
        vs16, vs64 = error_metrics(out, y16), error_metrics(out, y64)
    problem = None
    if operands.gelu != ref_layer.gelu:
        # On typical activations the two flavours differ by ~1e-4 of the output, under every
        # tolerance: the numbers cannot be trusted to show this, so it fails by itself.
        problem = f"runs GELU {operands.gelu} ({layer.gelu_source}); the reference is {ref_layer.gelu} ({ref_layer.gelu_source})"
    passed = vs16.finite and vs16.rel_frobenius <= tolerance and problem is None
    return VerifyRow(
        layer.fc1, dtype, operands.scheme, op.backend, operands.weights, operands.gelu, vs16, vs64, tolerance, passed, problem
    )  # fmt: skip


def _row_tolerance(key: str, tolerances: dict[str, float], origin: dict[str, str], reference_dtype: str) -> float:
    """A row's tolerance: the asked one, or the default, at least the reference path's own
    dtype's (a bf16 path is ~4e-3 from exact: every row is at least that far from it)."""
    if origin[key] == "asked":
        return tolerances[key]
    return max(tolerances[key], default_tolerance(reference_dtype))


def _verify_layer(
    layer: MLPLayer, ref_layer: MLPLayer, floats: MLPTensors, int8: dict[str, _Operands], x: torch.Tensor, inputs: str,
    dtypes: list[str], tolerances: dict[str, float], origin: dict[str, str], backend: str, device: torch.device,
    step: Callable[[str], None], activation: tuple[str, str], timer: PhaseTimer,
) -> tuple[LayerResult, list[VerifyRow]]:
    """Both references, then every asked dtype, for one MLP. floats: the reference's tensors;
    activation: (the reference path's dtype, which the int8 rows' activations take too, why)."""
    with timer.phase("to device"):
        x = x.to(device)
        floats = floats.map(lambda t: t.to(device))
    ref_kw = dict(gelu=ref_layer.gelu, weight_layout=ref_layer.weight_layout, gated=ref_layer.is_gated)
    with timer.phase("references"):
        y64 = torch_mlp(x, *floats, dtype=torch.float64, **ref_kw)
        y16 = torch_mlp(x, *floats, dtype=REFERENCE_DTYPES[activation[0]], **ref_kw)
    with timer.phase("metrics"):
        own_error = error_metrics(y16, y64)
    result = LayerResult(
        layer.fc1, layer.fc2, layer.d_model, layer.d_ff, ref_layer.dtype, ref_layer.gelu, ref_layer.gelu_source,
        inputs, x.shape[0], own_error, layer.gated, activation[0], activation[1],
    )  # fmt: skip
    rows = []
    for dtype in dtypes:
        if dtype in FLOAT_DTYPES:
            with timer.phase("to device"):  # a cast on the device
                operands = _float_operands(floats, dtype, ref_layer.gelu, ref_layer.dtype)
        else:
            operands = int8[dtype]
        tolerance = _row_tolerance(operands.scheme, tolerances, origin, activation[0])
        rows.append(
            _run_row(layer, ref_layer, dtype, operands, x, (y16, y64), tolerance, backend, device, activation[0], timer)
        )
        step(f"{layer.fc1} {dtype}")
    return result, rows


def _default_format(scheme: str) -> FormatScheme:
    options = QUANTIZE_DEFAULTS[scheme]
    return scheme_from_options(scheme, options.granularity, options.activation_scheme)


def default_key(dtype: str) -> str:
    """The scheme an original checkpoint's `dtype` row runs (int8: quantize's defaults), as
    tolerances are keyed: "fp16", "w8a16:group:128", "w8a8:dynamic"."""
    return dtype if dtype in FLOAT_DTYPES else _row_key(dtype, _default_format(dtype))


def _quantize_in_memory(ckpt, layer: MLPLayer, floats: MLPTensors, scheme: str, calib, seed: int) -> _Operands:
    """One MLP quantized as `gelugemm quantize --scheme SCHEME` would by default, on the device
    its float weights are on (the same int8 values and scales as on the CPU: IEEE float32
    arithmetic throughout), so a GPU run neither quantizes on the host nor copies int8 weights."""
    options = QUANTIZE_DEFAULTS[scheme]
    x_cal = None
    if options.needs_calibration:
        # quantize's rows: all of the file's calibrate split, or its synthetic default;
        # calibration computes on the CPU, as quantize does
        x_cal, _ = calibration_inputs(ckpt, layer, calib=calib, tokens=None, seed=seed, split="calibrate")
        floats = floats.map(lambda t: t.cpu())
    w1, b1, w2, b2, w_up, b_up = floats
    kw = dict(scheme=scheme, weight_layout=layer.weight_layout, gelu=layer.gelu, group_size=options.group_size,
              method=options.observer or "max", smooth=options.smooth, activations=options.activations or "dynamic")  # fmt: skip
    if layer.is_gated:
        q1, q2, q_up = quantize_gated_mlp(w1, b1, w2, x_cal, w_up=w_up, b_up=b_up, **kw)
    else:
        (q1, q2), q_up = quantize_mlp(w1, b1, w2, x_cal, **kw), None
    fmt = _default_format(scheme)
    op_fields = int8_op_fields(fmt)
    return _Operands(
        MLPTensors(q1, b1, q2, b2, q_up, b_up), layer.gelu, "quantized in memory (quantize's defaults)", _row_key(scheme, fmt),
        op_fields,
    )  # fmt: skip


def _in_memory_description(dtypes: list[str], calib, seed: int) -> dict | None:
    schemes = [d for d in dtypes if d in INT8_DTYPES]
    if not schemes:
        return None
    described = {}
    for scheme in schemes:
        options = QUANTIZE_DEFAULTS[scheme]
        entry = {"granularity": options.granularity, "activations": options.activations, "method": options.observer,
                 "smooth": options.smooth}  # fmt: skip
        if options.needs_calibration:
            entry["calibration"] = describe_source(calib=calib, tokens=None, seed=seed, split="calibrate")
        described[scheme] = entry
    return described


def _reference_for(q: QuantizedCheckpoint, reference: str | Path | None, notes: list[str]) -> tuple[Path, dict]:
    """The original checkpoint a quantized one is compared with, and how it was found."""
    record = q.record
    qpath = q.path
    if reference is not None:
        reference = Path(reference)
        with open_checkpoint(reference) as ref:  # missing or not safetensors: one clear error
            if is_quantized_checkpoint(ref):
                raise CheckpointError(f"--reference {reference} was written by gelugemm quantize (or is quantized); pass the original checkpoint")
        if record is None:
            return reference, {"path": str(reference), "how": "--reference", "sha256": None, "matches_record": None}
        recorded = record["source"]
        matches = compare_with_source(reference, recorded)
        digest = sha256_file(reference) if reference.is_file() else None
        if not matches:
            notes.append(
                f"--reference {reference} is not the {'file' if recorded.get('kind', 'file') == 'file' else 'model directory'} {qpath.name} was quantized from "
                f"(sha256 differs from the recorded {recorded['path']}): errors include any difference between the two"
            )
        return reference, {"path": str(reference), "how": "--reference", "sha256": digest, "matches_record": matches}
    if record is None:
        raise CheckpointError(
            f"{qpath} was quantized by another tool ({q.made_by}) and records no source checkpoint; "
            "pass --reference PATH (the float model it was made from)"
        )
    try:
        source = resolve_source(qpath, record)
    except CheckpointError as exc:
        if "--reference" in str(exc):
            raise
        raise CheckpointError(f"{exc}; verify needs the weights that were quantized: pass --reference PATH to compare with another copy") from None
    recorded = record["source"]
    return source, {"path": str(source), "how": "source recorded in the quantized file", "sha256": recorded.get("sha256"), "matches_record": True}


def _reference_layers(ref_ckpt: Checkpoint, layers: list[MLPLayer], gelu: str | None) -> list[MLPLayer]:
    """The reference's MLP for each quantized one, checked to have the same names and shapes."""
    reference = ref_ckpt.path
    found = {layer.fc1: layer for layer in mlps_in(ref_ckpt, gelu=gelu)}
    matched = []
    for layer in layers:
        ref = found.get(layer.fc1)
        if ref is None:
            have = ", ".join(list(found)[:6])
            raise CheckpointError(f"reference {reference} has no MLP {layer.fc1} (it has {have})")
        if (ref.d_model, ref.d_ff, ref.weight_layout, ref.gated) != (layer.d_model, layer.d_ff, layer.weight_layout, layer.gated):
            what = lambda m: f"d_model {m.d_model}, d_ff {m.d_ff} ({m.weight_layout}{', gated ' + m.gated if m.gated else ''})"  # noqa: E731
            raise CheckpointError(f"reference {reference}: MLP {layer.fc1} has {what(ref)}; the quantized file's has {what(layer)}")
        matched.append(ref)
    return matched


def _recorded_calibration(record: dict | None, notes: list[str]) -> Path | None:
    """The calibration file a quantized checkpoint was calibrated on, when it is still there unchanged."""
    recorded = (record or {}).get("calibration") or {}
    if recorded.get("kind") != "file":
        return None
    path = Path(recorded["path"])
    if path.is_file() and ("sha256" not in recorded or sha256_file(path) == recorded["sha256"]):
        return path
    why = "is missing" if not path.is_file() else "has changed since quantize (sha256 differs)"
    notes.append(f"the calibration file recorded by quantize, {path}, {why}: verifying on synthetic inputs; pass --calib FILE for real ones")
    return None


@dataclass
class _Plan:
    """What one run compares: the MLPs, their reference, the dtypes, where int8 weights come from."""

    layers: list[MLPLayer]  # as the checkpoint names them (a quantized file: as its record does)
    ref_layers: list[MLPLayer]  # the same MLPs in the reference checkpoint
    reference: Checkpoint  # open
    reference_facts: dict
    dtypes: list[str]
    calib: Path | None
    calib_from: str
    quantized: dict | None  # a quantized file's record: scheme, granularity, method, smooth, calibration
    int8: Callable  # (reference handle, layer, ref_layer, floats) -> {scheme: _Operands}
    keys: list[str]  # every row's scheme_key, in dtype order
    int8_phase: str = "quantize"  # what int8() spends its time on: quantizing in memory, or reading the file


def _plan_original(ckpt: Checkpoint, dtypes, layers, gelu, reference, calib, seed, activation_dtype) -> _Plan:
    path = ckpt.path
    if reference is not None:
        raise OptionError(f"--reference is for a file written by quantize; {path} is an original checkpoint, its own weights are the reference")
    asked = _resolve_dtypes(dtypes, None)
    found = mlps_in(ckpt, layers=layers, gelu=gelu, activation_dtype=activation_dtype)

    def int8(ckpt, layer, ref_layer, floats) -> dict[str, _Operands]:
        return {s: _quantize_in_memory(ckpt, layer, floats, s, calib, seed) for s in asked if s in INT8_DTYPES}

    facts = {"path": str(path), "how": "the checkpoint itself", "sha256": None, "matches_record": None}
    calib_from = "--calib" if calib is not None else "synthetic (no --calib)"
    keys = [default_key(d) for d in asked]
    return _Plan(found, found, ckpt, facts, asked, calib, calib_from, None, int8, keys)


def _plan_quantized(q: QuantizedCheckpoint, stack: ExitStack, dtypes, layers, gelu, reference, calib, notes: list[str],
                    timer: PhaseTimer) -> _Plan:  # fmt: skip
    record = q.record
    chosen = select_layers(q.layers, layers)
    scheme = q.scheme.scheme
    asked = _resolve_dtypes(dtypes, scheme)
    op_fields = int8_op_fields(q.scheme, q.path) if scheme in asked else {}
    with timer.phase("sha256"):  # the reference checked against the record
        ref_path, ref_facts = _reference_for(q, reference, notes)
    ref_ckpt = stack.enter_context(open_checkpoint(ref_path))
    ref_layers = _reference_layers(ref_ckpt, chosen, gelu)
    calib_from = "--calib"
    if calib is None:
        with timer.phase("sha256"):
            calib = _recorded_calibration(record, notes)
        calib_from = "quantize's calibration file, from the record" if calib is not None else "synthetic (no --calib)"
    mismatched = [(layer, ref) for layer, ref in zip(chosen, ref_layers) if layer.gelu != ref.gelu]
    if mismatched and scheme in asked:
        layer, ref = mismatched[0]
        notes.append(
            f"the quantized file says GELU {layer.gelu} ({layer.gelu_source}), its reference {ref.gelu} ({ref.gelu_source}): "
            f"its {scheme} rows fail whatever their error (pass --gelu to state the model's flavour)"
        )

    def int8(ckpt, layer, ref_layer, floats) -> dict[str, _Operands]:
        if scheme not in asked:
            return {}
        loaded = _checked_finite(q, layer, q.load(layer))
        return {scheme: _Operands(loaded, layer.gelu, f"{q.path.name} as written", _row_key(scheme, q.scheme), op_fields)}

    facts = {k: (record or {}).get(k) for k in ("scheme", "granularity", "method", "smooth", "calibration")}
    facts.update(scheme=scheme, granularity=str(q.scheme.granularity),
                 activations=None if q.scheme.activations is None else str(q.scheme.activations), made_by=q.made_by)  # fmt: skip
    keys = [d if d in FLOAT_DTYPES else _row_key(d, q.scheme) for d in asked]
    return _Plan(chosen, ref_layers, ref_ckpt, ref_facts, asked, calib, calib_from, facts, int8, keys, int8_phase="read")


def _checked_finite(q: QuantizedCheckpoint, layer: MLPLayer, tensors: MLPTensors) -> MLPTensors:
    """A quantized file's MLP as loaded, its float tensors (the biases; the int8 weights' scales
    are checked as they are read) and its smoothing scale checked finite as an original
    checkpoint's tensors are (calibration.checkpoint's all_finite, read_tensor's check): a NaN
    in the file is bad input (exit 2), not a row past tolerance."""
    names = MLPTensors(layer.w1, layer.b1, layer.w2, layer.b2, layer.w_up, layer.b_up)
    for name, t in zip(names, tensors):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{q.path}: {name} holds {bad} NaN/Inf value(s); cannot verify it")
    s = getattr(tensors.w1, "smooth_scale", None)  # from the file's metadata
    if s is not None and not (all_finite(s) and bool((s > 0).all())):
        raise CheckpointError(f"{q.path}: {layer.fc1}'s smoothing scale holds a value that is not a positive finite number")
    return tensors


def verify_checkpoint(
    path: str | Path,
    dtypes: Sequence[str] | str | None = None,
    *,
    calib: str | Path | None = None,
    tokens: int | None = None,
    layers: str | None = None,
    tol: float | dict[str, float] | None = None,
    backend: str = "auto",
    reference: str | Path | None = None,
    gelu: str | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    activation_dtype: str | None = None,
) -> VerifyReport:
    """Run every asked dtype of every MLP in `path` and measure it against the fp16 path and float64.

    path: an original checkpoint (a .safetensors file or a model directory), or a quantized
        one: written by `gelugemm quantize`, or a compressed-tensors int8 checkpoint.
    dtypes: names from kernels.op.DTYPES, "all", or a comma list; None: every dtype for an
        original checkpoint, the file's own scheme for a quantized one.
    calib, tokens, seed: the inputs (see calibration.data); verify reads the "verify" split.
        A quantized file without `calib` uses the calibration file its record names, if
        it is still there unchanged.
    layers: regex on the MLPs' fc1/fc2 prefixes.
    tol: one tolerance for every row, or {name: tolerance} with names dtypes ("w8a8") or int8
        schemes ("w8a8:static"); the rest keep DEFAULT_TOLERANCES (default_tolerance).
    backend: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    reference: a quantized file's original checkpoint, instead of the one its metadata records.
    gelu: "erf" | "tanh" | "quick": the model's flavour, over config.json and the family default. It
        sets the references (and an original checkpoint's rows); a quantized file's int8
        rows run the flavour its metadata records, and fail when that is not this one.
    progress: called as progress(done, total, what) after each (layer, dtype) row.
    activation_dtype: "fp16" | "bf16": the reference path's dtype and the int8 rows'
        activations, over each MLP's own (config.json's torch_dtype, the family's: T5 runs
        bf16; a quantized file's as quantize recorded it; else fp16).
    """
    if activation_dtype is not None:
        check_asked_activation_dtype(activation_dtype)
    path = Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # On a GPU each phase's kernels are waited for before its clock stops.
    timer = PhaseTimer(sync=(lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None)
    ran_backend, backend_reason = choose_backend(MLPConfig(backend=backend), device)  # fails now if it cannot run
    if tokens is not None and tokens < 1:
        raise OptionError(f"--tokens must be at least 1; got {tokens}")
    notes: list[str] = []
    with ExitStack() as stack:
        ckpt = stack.enter_context(open_checkpoint(path))  # a missing or invalid checkpoint is a CheckpointError here
        if is_quantized_checkpoint(ckpt):
            plan = _plan_quantized(QuantizedCheckpoint(ckpt, gelu=gelu), stack, dtypes, layers, gelu, reference, calib, notes, timer)
        else:
            plan = _plan_original(ckpt, dtypes, layers, gelu, reference, calib, seed, activation_dtype)
        return _run(plan, path, tokens, tol, backend, device, ran_backend, backend_reason, seed, notes, timer, progress,
                    activation_dtype)  # fmt: skip


def _run(plan: _Plan, path: Path, tokens, tol, backend, device, ran_backend, backend_reason, seed, notes, timer: PhaseTimer,
         progress, activation_dtype) -> VerifyReport:  # fmt: skip
    tolerances, origin = _tolerances(tol, plan.keys)
    if plan.calib is not None:
        # every row (floats, finite, not all zero), and enough held-out rows to grade on
        check_calibration_file(plan.calib, plan.layers, split="verify")
    else:
        check_tokens_fit(tokens or DEFAULT_TOKENS, plan.ref_layers)  # before any row is drawn

    # Under torchrun each rank verifies every world-th MLP; the results are gathered in order.
    ranks = current_ranks()
    mine = [i for i in range(len(plan.layers)) if ranks.mine(i)]
    total, done = len(mine) * len(plan.dtypes), 0

    def step(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, what)

    # On a GPU every float tensor goes through one pinned host buffer on its way there.
    staging = ReadBuffer(pin_memory=True) if device.type == "cuda" else None

    def verify_mine() -> list[tuple[int, LayerResult, list[VerifyRow]]]:
        ref_ckpt = plan.reference
        out = []
        for i in mine:
            layer, ref_layer = plan.layers[i], plan.ref_layers[i]
            # once per MLP: the references, the float rows and in-memory int8 read them there
            floats = _read_to_device(ref_ckpt, ref_layer, device, staging, timer)
            with timer.phase("inputs"):
                x, inputs = calibration_inputs(ref_ckpt, ref_layer, calib=plan.calib, tokens=tokens, seed=seed, split="verify")
            with timer.phase(plan.int8_phase):
                int8 = plan.int8(ref_ckpt, layer, ref_layer, floats)
            # the quantized file's recorded dtype (quantize's), or the original's discovered one
            activation = (activation_dtype, "asked for") if activation_dtype else (layer.activation_dtype, layer.activation_dtype_source)
            result, layer_rows = _verify_layer(
                layer, ref_layer, floats, int8, x, inputs, plan.dtypes, tolerances, origin, backend, device, step, activation,
                timer,
            )  # fmt: skip
            out.append((i, result, layer_rows))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    verified = sorted((entry for part in together(ranks, verify_mine) for entry in part), key=lambda e: e[0])
    results = [result for _, result, _ in verified]
    rows = [row for _, _, layer_rows in verified for row in layer_rows]

    calibration = {**describe_source(calib=plan.calib, tokens=tokens, seed=seed, split="verify"), "from": plan.calib_from}
    short = sorted({result.tokens for result in results if tokens is not None and result.tokens < tokens})
    if short:
        notes.append(
            f"--tokens {tokens} asked for more rows than the calibration file's verify split holds: "
            f"verified on {', '.join(map(str, short))} rows (all of it)"
        )
    paths = sorted({result.reference_dtype for result in results})
    against = f"{'/'.join(paths)} path" if paths else GATE_REFERENCE
    if paths != ["fp16"] and paths:
        notes.append(
            f"the reference path runs in {'/'.join(paths)} where the model does "
            f"({'; '.join(sorted({f'{r.reference_dtype}: {r.reference_dtype_source}' for r in results}))}): "
            "the int8 rows take those activations, and a default tolerance is at least that dtype's"
        )
    timing = timer.facts()
    timing["per_mlp_s"] = timing["seconds"] / max(1, len(results))
    return VerifyReport(
        checkpoint=str(path), kind="original" if plan.quantized is None else "quantized", quantized=plan.quantized,
        reference=plan.reference_facts, device=_device_name(device), backend=ran_backend, backend_reason=backend_reason,
        backend_asked=backend, gate={"metric": GATE_METRIC, "against": against}, tolerances=tolerances,
        tolerance_origin=origin, dtypes=plan.dtypes, calibration=calibration,
        in_memory_quantization=_in_memory_description(plan.dtypes, plan.calib, seed) if plan.quantized is None else None,
        layers=results, rows=rows, notes=notes, seconds=timing["seconds"], timing=timing,
    )  # fmt: skip


def _read_to_device(ckpt: Checkpoint, layer: MLPLayer, device: torch.device, staging: ReadBuffer | None,
                    timer: PhaseTimer) -> MLPTensors:  # fmt: skip
    """The MLP's float tensors (read_mlp's: checked finite) on `device`. With a staging buffer
    (a GPU), each is read into it and copied from it, one tensor at a time: no host memory
    per tensor, and a copy from page-locked memory."""
    if staging is None:
        with timer.phase("read"):
            floats = read_mlp(ckpt, layer)
        with timer.phase("to device"):
            return floats.map(lambda t: t.to(device))

    def one(name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        with timer.phase("read"):
            t = read_tensor(ckpt, name, buffer=staging)
        with timer.phase("to device"):  # a copy, finished before the buffer is read into again
            return t.to(device, copy=True)

    return MLPTensors(one(layer.w1), one(layer.b1), one(layer.w2), one(layer.b2), one(layer.w_up), one(layer.b_up))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
