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
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from calibration.checkpoint import MLPLayer, open_checkpoint, read_norm
from calibration.errors import CheckpointError, OptionError

SPLITS = ("calibrate", "verify")
HELD_OUT_FRACTION = 0.25
DEFAULT_TOKENS = 512


def split_rows(total: int, split: str) -> tuple[int, int]:
    """[start, stop) of a split's rows in a calibration tensor of `total` rows."""
    if split not in SPLITS:
        raise OptionError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if total < 2:
        raise CheckpointError(f"a calibration tensor needs at least 2 rows (one per split); got {total}")
    cut = total - max(1, math.floor(total * HELD_OUT_FRACTION))
    return (0, cut) if split == "calibrate" else (cut, total)


def _calibration_shape(handle, calib: str | Path, layer: MLPLayer) -> tuple[int, ...]:
    if layer.fc1 not in handle.keys():
        have = ", ".join(sorted(handle.keys())[:6])
        raise CheckpointError(f"{calib} has no tensor {layer.fc1!r} (the key of each MLP is its fc1 prefix); it holds: {have}")
    shape = tuple(handle.get_slice(layer.fc1).get_shape())
    if len(shape) != 2 or shape[1] != layer.d_model:
        raise CheckpointError(f"{calib}: {layer.fc1} has shape {list(shape)}, expected [tokens, {layer.d_model}]")
    return shape


def check_calibration_file(calib: str | Path, layers: list[MLPLayer]) -> None:
    """Fail early, from the header alone, if a calibration file lacks any layer's rows."""
    with open_checkpoint(calib) as handle:
        for layer in layers:
            split_rows(_calibration_shape(handle, calib, layer)[0], "calibrate")


def file_inputs(calib: str | Path, layer: MLPLayer, *, split: str = "calibrate", tokens: int | None = None) -> torch.Tensor:
    """One layer's rows of a calibration file's split (the first `tokens` of them), float32."""
    with open_checkpoint(calib) as handle:
        start, stop = split_rows(_calibration_shape(handle, calib, layer)[0], split)
        if tokens is not None:
            stop = min(stop, start + tokens)
        x = handle.get_slice(layer.fc1)[start:stop].to(torch.float32)
    if not torch.isfinite(x).all():
        raise CheckpointError(f"{calib}: {layer.fc1} holds NaN or Inf")
    return x


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
