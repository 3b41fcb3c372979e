"""`gelugemm quantize`: find the MLPs of a checkpoint, calibrate, write an int8 checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from calibration.options import QuantizeOptions
from calibration.outputs import size_text
from calibration.quantize import QuantizeReport, default_output, quantize_checkpoint
from calibration.timing import phases_text
from gelugemm_cli.common import (
    check_json_output,
    err_console,
    for_log,
    input_files,
    plural,
    progress_bar,
    report_console,
    user_errors,
    write_json,
)


def quantize(
    checkpoint: Path = typer.Argument(..., help="A .safetensors file or a model directory (single file or sharded; fp32, fp16 or bf16)."),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Output (default: NAME.int8.safetensors beside a file, DIR-int8/ beside a model directory)."
    ),
    scheme: str = typer.Option("w8a16", help="w8a16 (int8 weights) or w8a8 (int8 weights and activations)."),
    granularity: str | None = typer.Option(
        None, help="Weight scales: per-channel, or group:N along the input dim. [default: w8a16 group:128; w8a8 per-channel, the only one it takes]"
    ),
    activations: str | None = typer.Option(
        None, help="w8a8: dynamic (per token, at run time), group:N (per token per N channels, at run time; N = 32, 64, 128) or static (calibrated per tensor: needs --calib). [default: dynamic]",
    ),
    method: str | None = typer.Option(None, help="w8a8 static: activation observer, max, percentile:P or mse (default: max)."),
    smooth: float | None = typer.Option(None, help="w8a8: SmoothQuant migration strength ALPHA in [0, 1] (needs --calib)."),
    calib: str | None = typer.Option(
        None, help="w8a8 static or --smooth: calibration rows, a safetensors file from gelugemm calibrate (fc1 prefix -> tokens x d_model), or 'synthetic' (rows drawn from the LayerNorms: they miss outlier channels)."
    ),
    tokens: int | None = typer.Option(None, help="Calibration rows (default: all of --calib's calibrate split, or 512 synthetic)."),
    seed: int = typer.Option(0, help="Seed of the synthetic calibration rows."),
    layers: str | None = typer.Option(None, help="Quantize only the MLPs whose fc1 or fc2 prefix matches this regex."),
    gelu: str | None = typer.Option(None, help="erf, tanh or quick, overriding config.json (default: from config.json or the family)."),
    activation_dtype: str | None = typer.Option(
        None, "--activation-dtype",
        help="fp16 or bf16: the float dtype the quantized MLPs run their activations in, recorded for verify and eval "
        "(default: bf16 where config.json's torch_dtype is bfloat16 or the family overflows fp16 (T5), else fp16).",
    ),
    device: str = typer.Option(
        "auto", "--device",
        help="auto, cpu or cuda: where the weights are quantized and their error measured (the same int8 either way; "
        "auto: cuda when torch sees a GPU). Reading, calibration and writing stay on the CPU.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing output (and a --json file gelugemm did not write)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
):
    """Quantize the GELU MLPs of CHECKPOINT to int8 and write the whole checkpoint (compressed-tensors format)."""
    with user_errors():
        options = QuantizeOptions(scheme, granularity, method, smooth, calib, tokens, seed, layers, gelu, force, activations,
                                  activation_dtype=activation_dtype, device=device)  # fmt: skip
        output_path = output if output is not None else default_output(checkpoint)
        # Every output checked before the work (the checkpoint's by quantize_checkpoint itself).
        check_json_output(
            json_path, inputs=input_files(checkpoint, options.calib_file), others=[("-o" if output else "checkpoint", output_path)], force=force
        )
        out = report_console(json_path)
        with progress_bar(out, f"quantizing {checkpoint.name} ({scheme})") as progress:
            report = quantize_checkpoint(checkpoint, output, options, progress=progress)
        render(report, for_log(out))
        for warning in report.warnings:
            err_console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=True)
        if json_path is not None:
            write_json(json_path, report.to_dict())


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _block(fc1: str, fc2: str) -> str:
    """The part two prefixes share, cut at a dot: `encoder.layer.0` for its two GEMMs."""
    common = os.path.commonprefix([fc1, fc2])
    return common[: common.rfind(".")] if "." in common else ""


def render(report: QuantizeReport, out: Console) -> None:
    """One row per quantized GEMM, then the file-level facts."""
    acts = f", {report.activations} activations" if report.activations else ""
    table = Table(box=box.SIMPLE_HEAD, title=f"{report.scheme} {report.granularity}{acts}, GELU {report.gelu} ({report.gelu_source})")
    table.add_column("MLP", overflow="fold")
    table.add_column("GEMM", overflow="fold")
    for column in ("shape", "weight scale", "rel. err", "max err (steps)", "in scale", "out scale"):
        table.add_column(column, justify="right")
    for layer in report.layers:
        block = _block(layer.fc1.prefix, layer.fc2.prefix)
        for i, linear in enumerate(layer.linears):
            table.add_row(
                block if i == 0 else "",
                linear.prefix[len(block):].lstrip("."),
                "x".join(map(str, linear.shape)),
                f"{linear.weight_scale_min:.2g}..{linear.weight_scale_max:.2g}",
                f"{linear.rel_frobenius:.2e}",
                f"{linear.max_abs_steps:.3f}",
                _short(linear.input_scale),
                _short(linear.output_scale),
            )
    out.print(table)
    if report.scheme == "w8a8":
        smooth = f", SmoothQuant alpha {report.smooth}" if report.smooth is not None else ""
        if report.method is not None:
            scales = f"static, {report.method} observer{smooth}; calibrated on {_calibrated_on(report)}"
        else:
            scales = f"{report.activations}, computed from each token at run time{smooth}"
            if report.calibration is not None:
                scales += f"; smoothing statistics from {_calibrated_on(report)}"
        out.print(f"activation scales: {scales}", highlight=False, soft_wrap=True)
    smoothed = sorted({layer.smoothing for layer in report.layers if layer.smoothing})
    if smoothed:
        out.print(f"smoothing: {'; '.join(smoothed)}", highlight=False, soft_wrap=True)
    mem = report.memory
    shards = f"{len(report.shards)} shards, " if len(report.shards) > 1 else ""
    out.print(
        f"wrote {report.output} ({shards}{size_text(report.output_bytes)}, from {size_text(report.source_bytes)}; "
        f"{plural(len(report.layers), 'MLP')} quantized, {plural(report.tensors_copied, 'tensor')} copied) in {report.seconds:.1f} s",
        highlight=False, soft_wrap=True,
    )
    if report.output_kind == "directory":
        copied = ", ".join(report.files_copied) or "none"
        out.print(f"other model files copied: {copied}", highlight=False, soft_wrap=True)
        for skipped in report.files_skipped:
            out.print(f"[yellow]not copied:[/yellow] {skipped}", highlight=False, soft_wrap=True)
    out.print(f"runs on: {report.runs_on}", highlight=False, soft_wrap=True)
    out.print(timing_line(report), highlight=False, soft_wrap=True)
    out.print(
        f"peak memory: {size_text(mem['peak_rss_bytes'])} resident ({mem['peak_rss_scope']}; {size_text(mem['start_rss_bytes'])} at start, "
        f"mapped file pages included), heap {size_text(mem['peak_anon_bytes'])} ({size_text(mem['start_anon_bytes'])} at start)",
        highlight=False, soft_wrap=True,
    )


def timing_line(report: QuantizeReport) -> str:
    """'time: 8.1 s, 265 MB/s of checkpoint (2.1 GB), device: cpu; quantize 3.2 s, write 1.6 s, ...: quantize dominates'."""
    timing = report.timing
    return (
        f"time: {timing['seconds']:.1f} s, {timing['mb_per_s']:.0f} MB/s of checkpoint ({size_text(report.source_bytes)}), "
        f"device: {report.device}; "
        f"{phases_text(timing['phases'])}: {timing['dominant']} dominates"
    )


def _calibrated_on(report: QuantizeReport) -> str:
    source = report.calibration
    if source["kind"] == "file":
        return f"{source['path']} ({source['split']} split)"
    norms = [layer.get("norm") for layer in report.record.get("layers", [])]
    if norms and all(norms):
        drawn = "from its LayerNorm's weight and bias"
    elif any(norms):
        drawn = "from its LayerNorm's weight and bias where it has one, else N(0, 1)"
    else:
        drawn = "N(0, 1) (no LayerNorm feeds it in this checkpoint)"
    return f"{source['tokens']} synthetic tokens per MLP, {drawn}, seed {source['seed']}"
