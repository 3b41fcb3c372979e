"""`gelugemm verify`: the error of every path through a checkpoint's MLPs against the fp16 path.

The work is `calibration.verify.verify_checkpoint`; this module parses the options, shows
progress, renders the one report as a Rich table and as JSON (`--json`), and exits 1
when any row is past its tolerance.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from calibration.timing import phases_text
from calibration.verify import VerifyReport, VerifyRow, parse_dtypes, parse_tolerances, verify_checkpoint
from calibration import outputs
from gelugemm_cli.common import (
    check_json_output,
    for_log,
    input_files,
    plural,
    progress_bar,
    recorded_inputs,
    report_console,
    user_errors,
    write_json,
)
from gelugemm_cli.quantize import _block as mlp_block

# Help strings are Rich markup (Typer's default): a literal "[" is written "\\[", or Rich eats "[default: ...]".
def verify(
    checkpoint: Path = typer.Argument(..., help="An original checkpoint (file or model directory), or a quantized one (gelugemm's or compressed-tensors int8)."),
    dtype: str | None = typer.Option(
        None, "--dtype",
        help=r"fp16, bf16, fp32, w8a16, w8a8, all, or a comma list \[default: all for an original checkpoint, its scheme for a quantized file].",
    ),
    calib: Path | None = typer.Option(None, help=r"safetensors of activations, fc1 prefix -> \[tokens, d_model]; verify reads its held-out last quarter."),
    tokens: int | None = typer.Option(None, help=r"Rows per MLP \[default: all of --calib's verify split, or 512 synthetic]."),
    layers: str | None = typer.Option(None, help="Verify only the MLPs whose fc1 or fc2 prefix matches this regex."),
    tol: str | None = typer.Option(
        None, help=r"Gate on rel. error vs the fp16 path: VALUE for every row, or NAME=VALUE,... with NAME a dtype (w8a8) or an int8 scheme (w8a8:static, w8a16:group:128) \[default: per dtype and scheme, see the README's verify section]."
    ),
    backend: str = typer.Option("auto", help="auto (Triton on CUDA, torch elsewhere), triton or torch."),
    reference: Path | None = typer.Option(None, help="A quantized file's original checkpoint, instead of the one its metadata records."),
    gelu: str | None = typer.Option(None, help=r"erf, tanh or quick: the model's GELU, overriding config.json \[default: from config.json or the family]."),
    activation_dtype: str | None = typer.Option(
        None, "--activation-dtype",
        help=r"fp16 or bf16: the reference path's dtype and the int8 rows' activations \[default: the model's: bf16 where config.json's torch_dtype is bfloat16 or the family overflows fp16 (T5), else fp16].",
    ),
    seed: int = typer.Option(0, help="Seed of the synthetic inputs (without --calib)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file that gelugemm did not write."),
):
    """Run each MLP of CHECKPOINT in each dtype, measure it against the fp16 path and float64; exit 1 past tolerance."""
    with user_errors():
        dtypes = parse_dtypes(dtype) if dtype is not None else None
        tolerances = parse_tolerances(tol) if tol is not None else None
        inputs = input_files(checkpoint, calib, reference) + recorded_inputs(checkpoint)
        check_json_output(json_path, inputs=inputs, force=force)
        out = report_console(json_path)
        with progress_bar(out, f"verifying {checkpoint.name}", lambda what: f"verifying {what}") as progress:
            report = verify_checkpoint(
                checkpoint, dtypes, calib=calib, tokens=tokens, layers=layers, tol=tolerances,
                backend=backend, reference=reference, gelu=gelu, seed=seed, progress=progress, activation_dtype=activation_dtype,
            )  # fmt: skip
        outputs.set_result(0 if report.passed else 1)  # kept by a signal that lands after the --json is written
        render(report, out)
        if json_path is not None:
            write_json(json_path, report.to_dict())
    if not report.passed:
        raise typer.Exit(1)


def _sci(value: float) -> str:
    return f"{value:.2e}"


def header(report: VerifyReport) -> list[str]:
    """The run's facts, one line each: what was compared, on what, and what ran."""
    ref = report.reference
    if report.kind == "quantized":
        q = report.quantized
        acts = f", {q['activations']} activations" if q.get("activations") else ""
        what = f"{report.checkpoint}: {q['scheme']} {q['granularity']}{acts} file; reference {ref['path']} ({ref['how']})"
    else:
        what = f"{report.checkpoint}: original checkpoint"
    source = report.calibration
    if source["kind"] == "file":
        inputs = f"inputs: {source['path']} ({source['from']}), verify split: its last {source['held_out_fraction']:.0%}, never calibrated on"
    else:
        # calibration.data says "no LayerNorm found" in a layer's inputs where none feeds it
        normless = ["no LayerNorm" in layer.inputs for layer in report.layers]
        drawn = ("N(0, 1): no LayerNorm feeds the MLPs" if normless and all(normless)
                 else "from each MLP's LayerNorm weight and bias" + (" where it has one, else N(0, 1)" if any(normless) else ""))  # fmt: skip
        inputs = f"inputs: synthetic, {drawn}, seed {source['seed']}, verify split"
    tokens = sorted({layer.tokens for layer in report.layers})
    inputs += f"; {'/'.join(map(str, tokens))} tokens per MLP"
    gelu = "; ".join(sorted({f"{layer.gelu} ({layer.gelu_source})" for layer in report.layers}))
    lines = [
        what,
        f"backend: {report.backend} ({report.backend_reason}); device {report.device}",
        inputs,
        f"GELU: {gelu}",
        f"gate: relative Frobenius error vs the {_path_dtype(report)} path ({_path_dtype(report)} weights and inputs, "
        "F.linear -> F.gelu -> F.linear in torch)",
    ]
    for scheme, how in (report.in_memory_quantization or {}).items():
        cal = how.get("calibration")
        on = ""
        if cal is not None:
            on = f", calibrated on {'the calibrate split of ' + Path(cal['path']).name if cal['kind'] == 'file' else 'synthetic inputs'}"
        method = f", {how['method']} observer" if how["method"] else ""
        acts = f", {how['activations']} activations" if how.get("activations") else ""
        lines.append(f"{scheme}: quantized in memory with quantize's defaults ({how['granularity']}{acts}{method}{on})")
    return lines


def _path_dtype(report: VerifyReport) -> str:
    """The reference path's dtype: fp16, bf16 where the model runs in bf16 (or fp16/bf16)."""
    return "/".join(sorted({layer.reference_dtype for layer in report.layers})) or "fp16"


def table(report: VerifyReport) -> Table:
    """One row per MLP x dtype, after a row for the reference path (fp16, or bf16) itself."""
    grid = Table(box=box.SIMPLE_HEAD, title=f"error vs the {_path_dtype(report)} path (the gate) and vs float64 (exact)")
    grid.add_column("MLP", overflow="fold")
    grid.add_column("dtype", overflow="fold")
    grid.add_column("backend")
    for column in ("rel. err", "tolerance", "SQNR dB", "cosine", "max abs err", "rel. err vs f64"):
        grid.add_column(column, justify="right")
    grid.add_column("result")
    rows_by_layer: dict[str, list] = {}
    for row in report.rows:
        rows_by_layer.setdefault(row.layer, []).append(row)
    for layer in report.layers:
        block = mlp_block(layer.fc1, layer.fc2) or layer.fc1
        own = layer.fp16_path_vs_float64
        grid.add_row(block, f"{layer.reference_dtype} path", "torch", "-", "-", "-", "-", "-", _sci(own.rel_frobenius), "[dim]reference[/dim]")
        for row in rows_by_layer.get(layer.fc1, []):
            m = row.vs_fp16_path
            grid.add_row(
                "", row.scheme.replace(":", " ", 1), row.backend, _sci(m.rel_frobenius), f"{row.tolerance:.3g}", f"{m.sqnr_db:.1f}",
                f"{m.cosine:.6f}", f"{m.max_abs:.3g}", _sci(row.vs_float64.rel_frobenius),
                "[green]pass[/green]" if row.passed else "[bold red]FAIL[/bold red]",
            )  # fmt: skip
        grid.add_section()
    return grid


def summary(report: VerifyReport) -> str:
    rows = len(report.rows)
    shape = f"{plural(len(report.layers), 'MLP')} x {plural(len(report.dtypes), 'dtype')}"
    if report.passed:
        every = "the one row" if rows == 1 else f"all {rows} rows"
        return f"[green]PASS[/green]: {every} within tolerance ({shape}) in {report.seconds:.1f} s"
    failed = [f"{row.layer} {row.scheme} ({_why(row)})" for row in report.failures]
    listed = "; ".join(failed[:5]) + (f"; and {len(failed) - 5} more" if len(failed) > 5 else "")
    return f"[bold red]FAIL[/bold red]: {len(failed)} of {rows} rows past tolerance: {listed} ({report.seconds:.1f} s)"


def _why(row: VerifyRow) -> str:
    m = row.vs_fp16_path
    if not m.finite:
        return "output holds NaN or Inf"
    past = f"{m.rel_frobenius:.3g} > {row.tolerance:.3g}" if m.rel_frobenius > row.tolerance else None
    return "; ".join(filter(None, (past, row.problem)))


def render(report: VerifyReport, out: Console) -> None:
    out = for_log(out)
    for line in header(report):
        out.print(line, highlight=False, soft_wrap=True)
    for note in report.notes:
        out.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    out.print(table(report))
    out.print(summary(report), highlight=False, soft_wrap=True)
    out.print(timing_line(report), highlight=False, soft_wrap=True)


def timing_line(report: VerifyReport) -> str:
    """'time: 12.3 s, 1.54 s per MLP; quantize 4.1 s, read 2.0 s, ...: quantize dominates'."""
    timing = report.timing
    return (
        f"time: {timing['seconds']:.1f} s, {timing['per_mlp_s']:.2f} s per MLP; "
        f"{phases_text(timing['phases'])}: {timing['dominant']} dominates"
    )
