"""Calibration inputs: what each MLP's GEMM1 reads, [tokens, d_model] float32.

Two sources:

- A calibration file (`--calib FILE`): safetensors, one 2-D tensor [tokens, d_model] per
  MLP, keyed by the layer's fc1 prefix (`MLPLayer.fc1`, the GEMM1 weight's name without
  `.weight`: `encoder.layer.0.intermediate.dense`, `h.0.mlp.c_fc`, `w1` for a plain file).
  The rows are the activations that enter GEMM1, i.e. the output of the LayerNorm
  feeding the MLP.
- Synthetic (no file): `tokens` rows drawn from N(0, 1) per channel, times the weight
  plus the bias of the LayerNorm feeding the MLP where the checkpoint holds it (a
  LayerNorm output is a unit-variance row scaled by gamma and shifted by beta), else
  plain N(0, 1). Seeded per (seed, split, layer), so layers draw independent rows.

Verify must not grade scales on the data that chose them, so every source has two
disjoint splits: "calibrate" (what quantize uses) and "verify". A file's rows are cut
at 1 - HELD_OUT_FRACTION: calibrate reads the first part, verify the last. Synthetic
splits draw from different seeds.

What a file's rows must be, checked the same way for quantize and verify (check_calibration_file,
before any work, over every row of every MLP's tensor; file_inputs again on the rows it reads):
floats (F16, BF16, F32, F64), finite, not all zero; and verify grades on at least
MIN_HELD_OUT_ROWS held-out rows. Synthetic rows must fit in memory (check_tokens_fit).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from calibration.checkpoint import FLOAT_DTYPES, MLPLayer, all_finite, open_checkpoint, read_norm
from calibration.errors import CheckpointError, OptionError
from calibration.memory import available_memory, format_bytes

SPLITS = ("calibrate", "verify")
HELD_OUT_FRACTION = 0.25
DEFAULT_TOKENS = 512
# verify refuses to grade on fewer held-out rows than this (a file of at least
# min_rows_for_verify() rows): one or two rows say nothing about a layer's error.
MIN_HELD_OUT_ROWS = 8
# Rows read at a time when a calibration tensor is scanned whole (check_calibration_file).
SCAN_BYTES = 64 << 20


def split_rows(total: int, split: str) -> tuple[int, int]:
    """[start, stop) of a split's rows in a calibration tensor of `total` rows."""
    if split not in SPLITS:
        raise OptionError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if total < 2:
        raise CheckpointError(f"a calibration tensor needs at least 2 rows (one per split); got {total}")
    cut = total - max(1, math.floor(total * HELD_OUT_FRACTION))
    return (0, cut) if split == "calibrate" else (cut, total)


def min_rows_for_verify() -> int:
    """The fewest rows a calibration tensor may have for verify: its held-out split holds
    MIN_HELD_OUT_ROWS."""
    total = MIN_HELD_OUT_ROWS
    while split_rows(total, "verify")[1] - split_rows(total, "verify")[0] < MIN_HELD_OUT_ROWS:
        total += 1
    return total


def _calibration_shape(handle, calib: str | Path, layer: MLPLayer) -> tuple[int, ...]:
    if layer.fc1 not in handle.keys():
        have = ", ".join(sorted(handle.keys())[:6])
        raise CheckpointError(f"{calib} has no tensor {layer.fc1!r} (the key of each MLP is its fc1 prefix); it holds: {have}")
    stored = handle.get_slice(layer.fc1)
    shape = tuple(stored.get_shape())
    if len(shape) != 2 or shape[1] != layer.d_model:
        raise CheckpointError(f"{calib}: {layer.fc1} has shape {list(shape)}, expected [tokens, {layer.d_model}]")
    dtype = stored.get_dtype()
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{calib}: {layer.fc1} is {dtype}; calibration rows are the float activations that enter GEMM1 "
            f"({', '.join(FLOAT_DTYPES)})"
        )  # fmt: skip
    return shape


def _check_split_size(calib: str | Path, layer: MLPLayer, total: int, split: str) -> tuple[int, int]:
    start, stop = split_rows(total, split)
    if split == "verify" and stop - start < MIN_HELD_OUT_ROWS:
        raise CheckpointError(
            f"{calib}: {layer.fc1} has {total} rows; verify grades on the held-out last {HELD_OUT_FRACTION:.0%}, "
            f"{stop - start} row(s) here, and needs at least {MIN_HELD_OUT_ROWS} (a file of at least "
            f"{min_rows_for_verify()} rows)"
        )  # fmt: skip
    return start, stop


def check_rows(x: torch.Tensor, calib: str | Path, layer: MLPLayer, rows: tuple[int, int]) -> float:
    """The one check of calibration rows x (rows [start, stop) of layer's tensor in calib), for
    quantize and verify alike: a CheckpointError if any is NaN or Inf. Returns their absmax."""
    if x.numel() == 0:
        return 0.0
    if not all_finite(x):  # the checkpoint's own check of a float tensor (calibration.checkpoint)
        bad = ~torch.isfinite(x)
        first = rows[0] + int(bad.any(dim=1).nonzero()[0, 0])
        raise CheckpointError(f"{calib}: {layer.fc1} holds NaN or Inf (the first in row {first})")
    low, high = torch.aminmax(x)  # no temporaries the size of x
    return max(-float(low), float(high))


def _all_zero(calib: str | Path, layer: MLPLayer, rows: tuple[int, int], what: str) -> CheckpointError:
    return CheckpointError(
        f"{calib}: {layer.fc1}: {what} (rows {rows[0]}-{rows[1] - 1}) are all zero (absmax 0): they set no activation "
        "scale and test nothing; calibrate on what the MLP reads (gelugemm calibrate)"
    )  # fmt: skip


def check_calibration_file(calib: str | Path, layers: list[MLPLayer], *, split: str = "calibrate") -> None:
    """Fail before any work if a calibration file cannot serve every layer: first from the
    header (a tensor missing, of the wrong shape, not floats, too few rows for `split`), then
    every row of each tensor, a block of rows at a time (NaN or Inf anywhere; either split all
    zero). quantize and verify both call it, so the rows one refuses the other refuses too."""
    with open_checkpoint(calib) as handle:
        shapes = [_calibration_shape(handle, calib, layer) for layer in layers]
        for layer, shape in zip(layers, shapes):
            _check_split_size(calib, layer, shape[0], "calibrate")
            _check_split_size(calib, layer, shape[0], split)
        for layer, (total, d_model) in zip(layers, shapes):
            stored = handle.get_slice(layer.fc1)
            block = max(1, SCAN_BYTES // (8 * d_model))
            for part in SPLITS:  # each split a block at a time: either one all zero is refused
                first, last = split_rows(total, part)
                absmax = 0.0
                for start in range(first, last, block):
                    rows = (start, min(last, start + block))
                    absmax = max(absmax, check_rows(stored[rows[0]:rows[1]], calib, layer, rows))
                if absmax == 0:
                    raise _all_zero(calib, layer, (first, last), f"the {last - first} rows of its {part} split")


def file_inputs(calib: str | Path, layer: MLPLayer, *, split: str = "calibrate", tokens: int | None = None) -> torch.Tensor:
    """One layer's rows of a calibration file's split (the first `tokens` of them), float32,
    checked as check_calibration_file checks them."""
    with open_checkpoint(calib) as handle:
        start, stop = _check_split_size(calib, layer, _calibration_shape(handle, calib, layer)[0], split)
        if tokens is not None:
            stop = min(stop, start + tokens)
        x = handle.get_slice(layer.fc1)[start:stop].to(torch.float32)
    if check_rows(x, calib, layer, (start, stop)) == 0:
        raise _all_zero(calib, layer, (start, stop), f"the {stop - start} rows read from its {split} split")
    return x


def check_tokens_fit(tokens: int, layers: list[MLPLayer]) -> None:
    """An OptionError, before anything is allocated, when `tokens` synthetic rows cannot fit in
    memory: each MLP holds its rows and GEMM1's float32 output together (quantize's static
    scales, verify's references), at least 4 * (d_model + d_ff) bytes a row."""
    if not layers:
        return
    layer = max(layers, key=lambda m: m.d_model + m.d_ff)
    need = tokens * 4 * (layer.d_model + layer.d_ff)
    available = available_memory()
    if available is not None and need > available:
        raise OptionError(
            f"--tokens {tokens}: {tokens} synthetic rows of {layer.fc1} (d_model {layer.d_model}, d_ff {layer.d_ff}) need at "
            f"least {format_bytes(need)} of memory (float32 rows and GEMM1's output), and {format_bytes(available)} is "
            f"available; pass at most {available // (4 * (layer.d_model + layer.d_ff))}"
        )  # fmt: skip


def split_seed(seed: int, split: str, layer: MLPLayer) -> int:
    """An independent generator seed for each (seed, split, layer)."""
    digest = hashlib.sha256(f"{seed}:{split}:{layer.fc1}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def synthetic_inputs(
    layer: MLPLayer,
    norm: tuple[torch.Tensor, torch.Tensor | None] | None,
    *,
    tokens: int = DEFAULT_TOKENS,
    seed: int = 0,
    split: str = "calibrate",
) -> torch.Tensor:
    """[tokens, d_model] float32: N(0, 1) * LayerNorm weight + LayerNorm bias, or N(0, 1)."""
    if split not in SPLITS:
        raise OptionError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    generator = torch.Generator().manual_seed(split_seed(seed, split, layer))
    x = torch.randn(tokens, layer.d_model, generator=generator, dtype=torch.float32)
    if norm is not None:
        weight, bias = norm
        x = x * weight.to(torch.float32)
        if bias is not None:
            x = x + bias.to(torch.float32)
    return x


def calibration_inputs(
    checkpoint_handle,
    layer: MLPLayer,
    *,
    calib: str | Path | None = None,
    tokens: int | None = None,
    seed: int = 0,
    split: str = "calibrate",
) -> tuple[torch.Tensor, str]:
    """(x [tokens, d_model] float32, where it came from) for one MLP.

    checkpoint_handle: the open checkpoint (from `open_checkpoint`), read for the
        LayerNorm statistics when there is no calibration file.
    tokens: rows to use; None means all of a file's split, or DEFAULT_TOKENS synthetic.
    """
    if tokens is not None and tokens < 1:
        raise OptionError(f"--tokens must be at least 1; got {tokens}")
    if calib is not None:
        x = file_inputs(calib, layer, split=split, tokens=tokens)
        return x, f"{Path(calib).name}[{layer.fc1}] {split} split, {x.shape[0]} rows"
    check_tokens_fit(tokens or DEFAULT_TOKENS, [layer])
    norm = read_norm(checkpoint_handle, layer)
    x = synthetic_inputs(layer, norm, tokens=tokens or DEFAULT_TOKENS, seed=seed, split=split)
    drawn = f"N(0,1)*{layer.norm}.weight+bias" if norm is not None else "N(0,1), no LayerNorm found"
    return x, f"synthetic {drawn}, {x.shape[0]} rows, seed {seed} ({split})"


def describe_source(*, calib: str | Path | None, tokens: int | None, seed: int, split: str = "calibrate") -> dict:
    """The file-level record of a calibration source (for metadata and reports)."""
    if calib is not None:
        return {
            "kind": "file",
            "path": str(Path(calib).resolve()),
            "split": split,
            "held_out_fraction": HELD_OUT_FRACTION,
            "tokens": tokens,
        }
    return {
        "kind": "synthetic",
        "distribution": "N(0,1) per channel * LayerNorm weight + LayerNorm bias of the LayerNorm feeding the MLP, else N(0,1)",
        "tokens": tokens or DEFAULT_TOKENS,
        "seed": seed,
        "split": split,
    }
