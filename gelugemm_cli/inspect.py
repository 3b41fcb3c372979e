"""`gelugemm inspect`: what quantize would act on in a checkpoint, and why; writes nothing but its --json."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from calibration.inspect import InspectReport, inspect_checkpoint
from gelugemm_cli.common import check_json_output, input_files, report_console, user_errors, write_json

LOG_WIDTH = 160  # columns the table is printed in when stdout is not a terminal


def inspect(
    checkpoint: Path = typer.Argument(..., help="A .safetensors file or a model directory (single file or sharded)."),
    layers: str | None = typer.Option(None, help="Only the MLPs whose fc1 or fc2 prefix matches this regex."),
    gelu: str | None = typer.Option(None, help="erf, tanh or quick, overriding config.json (as quantize would)."),
    activation_dtype: str | None = typer.Option(None, "--activation-dtype", help="fp16 or bf16, overriding config.json (as quantize would)."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file that gelugemm did not write."),
):
    """List each GELU MLP (plain or gated) of CHECKPOINT: prefixes, family, layout, sizes, GELU flavour and where each came from."""
    with user_errors():
        check_json_output(json_path, inputs=input_files(checkpoint), force=force)
        report = inspect_checkpoint(checkpoint, layers=layers, gelu=gelu, activation_dtype=activation_dtype)
        out = report_console(json_path)
        render(report, out)
        if json_path is not None:
            write_json(json_path, report.to_dict())


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def header(report: InspectReport) -> list[str]:
    shards = report.shards
    what = f"{report.path}: {report.kind}, {len(shards)} safetensors file{'s' if len(shards) != 1 else ''}"
    what += f" ({_mib(report.total_bytes)}, {report.tensors} tensors)"
    if report.index:
        what += f", index {Path(report.index).name}"
    lines = [what, f"config: {report.config or 'none'}" + (f", model_type {report.model_type}" if report.model_type else "")]
    q = report.quantized
    if q is not None:
        acts = f", {q['activations']} activations" if q["activations"] else ""
        lines.append(f"quantized by {q['made_by']}: {q['scheme']} {q['granularity']}{acts} ({q['quant_method']}, {q['format']})")
    return lines


def _block(names: list[str]) -> str:
    """The dotted path the names share: `transformer.h.0` for its MLP's linears and LayerNorm."""
    common = os.path.commonprefix([n + "." for n in names])
    return common[: common.rfind(".")] if "." in common else ""


def table(report: InspectReport) -> Table:
    grid = Table(box=box.SIMPLE_HEAD, title=f"{len(report.mlps)} GELU MLP{'s' if len(report.mlps) != 1 else ''}")
    for column in ("MLP", "fc1 -> fc2", "family", "layout", "d_model x d_ff", "dtype", "GELU", "LayerNorm", "shard"):
        grid.add_column(column, overflow="fold", justify="right" if column == "d_model x d_ff" else "left")
    for mlp in report.mlps:
        block = _block([mlp.fc1, mlp.fc2] + ([mlp.norm] if mlp.norm else []))
        strip = lambda p: p[len(block) + 1:] if block and p.startswith(block + ".") else p  # noqa: E731
        norm = "-" if mlp.norm is None else f"{strip(mlp.norm)} ({'MLP only' if mlp.norm_feeds_only_mlp else 'shared'})"
        gemm1 = strip(mlp.fc1)
        if mlp.gated == "separate":
            gemm1 = f"GELU({gemm1}) * {strip(mlp.up)}"
        elif mlp.gated == "concatenated":
            gemm1 = escape(f"GELU({gemm1}[:d_ff]) * {gemm1}[d_ff:]")
        grid.add_row(
            block or "-", f"{gemm1} -> {strip(mlp.fc2)}", mlp.family, mlp.weight_layout,
            f"{mlp.d_model} x {mlp.d_ff}", mlp.dtype, mlp.gelu, norm, ", ".join(mlp.shards),
        )  # fmt: skip
    return grid


def sources(report: InspectReport) -> list[str]:
    """Where the family, layout and GELU flavour came from, one line per distinct answer."""
    lines = []
    for what, key in (("family", lambda m: f"{m.family_title}: {m.family_source}"), ("layout", lambda m: f"{m.weight_layout}: {m.layout_source}"),
                      ("GELU", lambda m: f"{m.gelu}: {m.gelu_source}"),
                      ("activations", lambda m: f"{m.activation_dtype}: {m.activation_dtype_source}")):  # fmt: skip
        counts: dict[str, int] = {}
        for mlp in report.mlps:
            counts[key(mlp)] = counts.get(key(mlp), 0) + 1
        for text, n in counts.items():
            lines.append(f"{what} {text}" + (f" ({n} MLPs)" if len(counts) > 1 else ""))
    folds = sum(m.norm_feeds_only_mlp for m in report.mlps)
    lines.append(f"SmoothQuant (--smooth) folds into the LayerNorm of {folds} of {len(report.mlps)} MLPs; the rest divide at run time (gelugemm only)"
                 if folds < len(report.mlps) else "SmoothQuant (--smooth) folds into each MLP's LayerNorm: the output runs on any compressed-tensors engine")  # fmt: skip
    return lines


def render(report: InspectReport, out: Console) -> None:
    if not out.is_terminal:
        out = Console(file=out.file, width=max(out.width, LOG_WIDTH))
    for line in header(report):
        out.print(line, highlight=False, soft_wrap=True)
    out.print(table(report))
    for line in sources(report):
        out.print(line, highlight=False, soft_wrap=True)
