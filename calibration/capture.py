"""Calibrate: what each MLP of a real model reads, captured while transformers runs it.

    report = calibrate_model("path/to/model_dir", "calib.safetensors", text="lines.txt")
    report.layers[0].fc1, report.layers[0].rows    # "encoder.layer.0.intermediate.dense", 6575

The model is loaded from its directory with transformers (`calibration.hf`), in float32,
and run over the inputs: one sample per non-empty line of a text file, or per image of a
folder (through the model's own image processor). A forward pre-hook on each MLP's first
linear (fc1) keeps what it reads, real tokens only (padding excluded).

The output is the `--calib` format quantize and verify read (`calibration.data`): one
float32 tensor [rows, d_model] per MLP, keyed by the checkpoint's own fc1 prefix (the
names `find_mlps` gives), rows in input order: line by line, token by token. So the
held-out last quarter that quantize never calibrates on and verify grades on is the
input's last lines (at most one line straddles the cut; the record says where it falls).
A CLIP-style model's text tower reads the text, its vision tower the images; an MLP that
no input reached is left out and named in the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save

from calibration.data import HELD_OUT_FRACTION, split_rows
from calibration import outputs
from calibration.errors import ModelError, OptionError
from calibration.hf import (
    HFModel,
    Lines,
    default_max_length,
    image_batches,
    image_files,
    load_image_processor,
    load_model,
    load_tokenizer,
    read_lines,
    real_rows,
    text_batches,
)
from calibration.quantized_file import sha256_file
from kernels.version import __version__

RECORD_KEY = "gelugemm_calibration"
FORMAT = "gelugemm-calibration"
CAPTURED = "input of each MLP's first linear (fc1), real tokens only (padding excluded), rows in input order"
DEFAULT_BATCH_SIZE = 32

Progress = Callable[[int, int, str], None]  # (done, total, what) after each batch


@dataclass
class CapturedLayer:
    """One MLP's rows: how many, from which input, and their largest magnitude."""

    fc1: str
    source: str  # "text" or "images"
    rows: int
    d_model: int
    absmax: float
    absmax_channel: int  # the channel holding it (BERT's outlier channel shows here)


@dataclass
class CalibrateReport:
    model: str
    kind: str
    output: str
    device: str
    inputs: list[dict]  # per source: what was read and how much of it
    batch_size: int
    max_tokens: int | None
    layers: list[CapturedLayer]
    not_reached: list[str]  # MLPs of the checkpoint no input ran through
    held_out: dict  # per source: the first held-out row and the first input wholly in it
    output_bytes: int
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    version: str = __version__
    record: dict = field(default_factory=dict)  # the metadata record written to the file

    def to_dict(self) -> dict:
        return asdict(self)


def _check_options(text, images, max_length, max_tokens, batch_size) -> None:
    if text is None and images is None:
        raise OptionError("nothing to run the model on: pass --text FILE (one sample per line) and/or --images DIR")
    if batch_size < 1:
        raise OptionError(f"--batch-size must be at least 1; got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise OptionError(f"--max-tokens must be at least 2 (one row for each split); got {max_tokens}")
    if max_length is not None and max_length < 1:
        raise OptionError(f"--max-length must be at least 1; got {max_length}")


def _write(output: Path, tensors: dict[str, torch.Tensor], record: dict) -> int:
    """safetensors, all or nothing (calibration.outputs.atomic_output)."""
    with outputs.atomic_output(output) as f:
        f.write(save(tensors, metadata={RECORD_KEY: json.dumps(record)}))
    return output.stat().st_size


class _Recorder:
    """Forward pre-hooks on every fc1 module, keeping each call's real-token rows on the CPU."""

    def __init__(self, hf: HFModel):
        self.mask: torch.Tensor | None = None
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.handles = [
            module.register_forward_pre_hook(self._hook(prefix), with_kwargs=True)
            for prefix, module in hf.fc1_modules().items()
        ]

    def _hook(self, prefix: str):
        def keep(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            self.parts.setdefault(prefix, []).append(real_rows(x, self.mask).detach().to("cpu", torch.float32))

        return keep

    def rows(self, prefix: str) -> int:
        return sum(p.shape[0] for p in self.parts.get(prefix, []))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _held_out(item_rows: list[int], rows: int, names: list[str]) -> dict:
    """Where verify's held-out quarter starts in this source: the row, and the first input wholly in it."""
    cut = split_rows(rows, "verify")[0]
    first_row, first_whole = 0, None
    for i, n in enumerate(item_rows):
        if first_row >= cut:
            first_whole = names[i]
            break
        first_row += n
    return {"rows": rows, "first_held_out_row": cut, "held_out_fraction": HELD_OUT_FRACTION, "first_whole_input": first_whole}


@dataclass
class Captured:
    """What `capture_rows` kept: {fc1 prefix: [rows, d_model] float32} in layer order, and its facts."""

    tensors: dict[str, torch.Tensor]
    source_of: dict[str, str]  # fc1 prefix -> "text" or "images"
    inputs: list[dict]
    held_out: dict
    not_reached: list[str]
    notes: list[str]


def capture_rows(
    hf: HFModel,
    *,
    lines: Lines | None = None,
    pictures: list[Path] | None = None,
    max_length: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
) -> Captured:
    """Run a loaded model over text lines and/or images and keep what each MLP's fc1 reads,
    real tokens only, in input order (at most `max_tokens` rows per MLP and input source)."""
    notes = list(hf.notes)
    sources = []  # (name, total items, batch iterator, item names, facts)
    for source in ["text"] * (lines is not None) + ["images"] * (pictures is not None):
        hf.tower(source)  # the model takes this kind of input, or one clear error now
    if lines is not None:
        tokenizer = load_tokenizer(hf)
        length = max_length or default_max_length(hf, tokenizer)
        facts = {"kind": "text", "path": str(lines.path.resolve()), "sha256": sha256_file(lines.path), "lines": len(lines.texts), "max_length": length}
        batches = text_batches(hf, lines, batch_size=batch_size, max_length=length, tokenizer=tokenizer)
        sources.append(("text", len(lines.texts), batches, [f"line {n}" for n in lines.numbers], facts))
    if pictures is not None:
        processor = load_image_processor(hf)
        facts = {"kind": "images", "path": str(pictures[0].parent.resolve()), "images": len(pictures)}
        batches = image_batches(hf, pictures, batch_size=batch_size, processor=processor)
        sources.append(("images", len(pictures), batches, [p.name for p in pictures], facts))

    recorder = _Recorder(hf)
    owner: dict[str, str] = {}  # fc1 prefix -> the source that reached it
    inputs, held_out = [], {}
    try:
        for name, total, batches, item_names, facts in sources:
            before = set(recorder.parts)
            item_rows: list[int] = []
            used, truncated = 0, 0
            for batch in batches:
                recorder.mask = batch.mask
                hf.forward(batch, logits=False)
                reached = [p for p in recorder.parts if p not in before]
                if not reached:
                    break
                owner.update({p: name for p in reached})
                if batch.mask is not None:
                    per_item = batch.mask.sum(1).tolist()
                else:  # images: every patch of every image
                    per_item = [recorder.parts[reached[0]][-1].shape[0] // len(batch.items)] * len(batch.items)
                item_rows += per_item
                used += len(batch.items)
                truncated += batch.truncated
                if progress is not None:
                    progress(used, total, f"{name}: {used}/{total}")
                if max_tokens is not None and min(recorder.rows(p) for p in reached) >= max_tokens:
                    break
            if not item_rows:
                notes.append(f"no MLP of the checkpoint ran on the {name}")
                continue
            rows = sum(item_rows) if max_tokens is None else min(sum(item_rows), max_tokens)
            facts = {**facts, "used": sum(1 for start in _starts(item_rows) if start < rows), "rows": rows}
            if name == "text":
                facts["truncated_lines"] = truncated
                if truncated:
                    notes.append(f"{truncated} line(s) longer than {facts['max_length']} tokens were truncated (--max-length)")
            inputs.append(facts)
            if rows >= 2:
                held_out[name] = _held_out(item_rows, rows, item_names)
    finally:
        recorder.remove()

    tensors = {}
    by_prefix = {layer.fc1: layer for layer in hf.layers}
    for prefix, parts in recorder.parts.items():
        rows = held_out.get(owner[prefix], {}).get("rows")
        x = torch.cat(parts)[:rows].contiguous()
        if x.shape[1] != by_prefix[prefix].d_model:
            raise ModelError(f"{prefix} read rows of width {x.shape[1]}; the checkpoint's MLP has d_model {by_prefix[prefix].d_model}")
        if x.shape[0] < 2:
            raise ModelError(f"{prefix}: only {x.shape[0]} row captured; calibration needs at least 2 (one per split)")
        tensors[prefix] = x
    if not tensors:
        raise ModelError(f"no MLP of {hf.directory} ran on the inputs given")
    tensors = {layer.fc1: tensors[layer.fc1] for layer in hf.layers if layer.fc1 in tensors}  # layer order
    not_reached = [layer.fc1 for layer in hf.layers if layer.fc1 not in tensors]
    if not_reached:
        want = "images (--images DIR)" if hf.kind == "dual" and pictures is None else "other inputs"
        notes.append(f"{len(not_reached)} MLP(s) read nothing ({not_reached[0]}, ...): they need {want}")
    return Captured(tensors, {p: owner[p] for p in tensors}, inputs, held_out, not_reached, notes)


def calibrate_model(
    model_dir: str | Path,
    output: str | Path,
    *,
    text: str | Path | None = None,
    images: str | Path | None = None,
    max_length: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device | None = None,
    layers: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> CalibrateReport:
    """Run the model in `model_dir` over `text` (one sample per non-empty line) and/or `images`
    (a folder), and write what each MLP's fc1 read to `output` (see the module docstring).

    max_length: tokens per line (default: sentence-transformers' max_seq_length, else the
        model's limit); longer lines are truncated, and counted in the report.
    max_tokens: stop after this many rows per MLP (per input source).
    layers: a regex on fc1/fc2 prefixes: capture only those MLPs (quantize's --layers).
    """
    started = time.perf_counter()
    _check_options(text, images, max_length, max_tokens, batch_size)
    output = Path(output)
    outputs.check_output(output, option="-o", inputs=[text, images, Path(model_dir)], force=force)
    lines = read_lines(text) if text is not None else None
    pictures = image_files(images) if images is not None else None
    hf = load_model(model_dir, device, layers=layers)
    got = capture_rows(
        hf, lines=lines, pictures=pictures, max_length=max_length, max_tokens=max_tokens, batch_size=batch_size, progress=progress
    )
    captured = []
    for prefix, x in got.tensors.items():
        absmax, channel = x.abs().max(dim=0).values.max(dim=0)
        captured.append(CapturedLayer(prefix, got.source_of[prefix], x.shape[0], x.shape[1], absmax.item(), channel.item()))
    record = {
        "format": FORMAT,
        "version": __version__,
        "model": str(hf.directory.resolve()),
        "model_type": getattr(hf.config, "model_type", None),
        "kind": hf.kind,
        "captured": CAPTURED,
        "dtype": "float32",
        "inputs": got.inputs,
        "held_out": got.held_out,
        "rows": {layer.fc1: layer.rows for layer in captured},
        "batch_size": batch_size,
        "max_tokens": max_tokens,
    }
    size = _write(output, got.tensors, record)
    return CalibrateReport(
        model=str(hf.directory), kind=hf.kind, output=str(output), device=str(hf.device), inputs=got.inputs,
        batch_size=batch_size, max_tokens=max_tokens, layers=captured, not_reached=got.not_reached, held_out=got.held_out,
        output_bytes=size, notes=got.notes, seconds=time.perf_counter() - started, record=record,
    )  # fmt: skip


def _starts(item_rows: list[int]) -> list[int]:
    starts, at = [], 0
    for n in item_rows:
        starts.append(at)
        at += n
    return starts
