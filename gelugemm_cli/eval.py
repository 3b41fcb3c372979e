"""`gelugemm eval`: what a model's output loses with its MLPs quantized.

The work is `calibration.evaluate.evaluate_quantized` (transformers, the optional extra
`hf`); this module parses the options, shows progress, renders the report as a Rich
table and as JSON (`--json`), and exits 1 past tolerance.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from calibration.evaluate import DEFAULT_BATCH_SIZE, EvalReport, evaluate_quantized
from calibration import outputs
from gelugemm_cli.common import (
    check_json_output,
    for_log,
    input_files,
    progress_bar,
    recorded_inputs,
    report_console,
    user_errors,
    write_json,
)

# How each metric is named and printed.
_METRICS = {
    "embedding_cosine_min": ("sentence embedding cosine, min over lines", "{:.5f}"),
    "embedding_cosine_mean": ("sentence embedding cosine, mean", "{:.5f}"),
    "top1_agreement": ("top-1 next-token agreement", "{:.2%}"),
    "kl_mean": ("KL(original || quantized), mean per token (nats)", "{:.3g}"),
    "kl_max": ("KL, worst token (nats)", "{:.3g}"),
    "perplexity_original": ("perplexity, original", "{:.4g}"),
    "perplexity_quantized": ("perplexity, quantized", "{:.4g}"),
    "hidden_rel_error": ("last hidden state, rel. error (all tokens)", "{:.3e}"),
    "hidden_rel_error_max": ("last hidden state, rel. error (worst input)", "{:.3e}"),
    "text_hidden_rel_error": ("text tower last hidden state, rel. error", "{:.3e}"),
    "image_hidden_rel_error": ("vision tower last hidden state, rel. error", "{:.3e}"),
    "image_hidden_rel_error_max": ("vision tower, rel. error (worst image)", "{:.3e}"),
}


def evaluate(
    quantized: Path = typer.Argument(..., help="A file or directory written by `gelugemm quantize`."),
    model: Path | None = typer.Option(None, "--model", help="The original model directory \\[default: the source recorded in QUANTIZED]."),
    text: Path | None = typer.Option(None, "--text", help="A text file: one sample per non-empty line (held out from calibration)."),
    images: Path | None = typer.Option(None, "--images", help="A folder of images (ViT, CLIP), through the model's own image processor."),
    tol: str | None = typer.Option(
        None, "--tol",
        help="The gate's limit: encoders' min embedding cosine (at least), causal LMs' mean KL (at most), others' hidden-state error (at most) \\[default: per scheme, see README].",
    ),
    max_length: int | None = typer.Option(None, "--max-length", help="Tokens per line \\[default: sentence-transformers' max_seq_length, else the model's limit]."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", help="Lines or images per forward."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda \\[default: cuda when there is one]."),
    backend: str = typer.Option("auto", help="The quantized MLPs' backend: auto (Triton on CUDA, torch elsewhere), triton or torch."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file that gelugemm did not write."),
):
    """Run the original model and the model with QUANTIZED's MLPs over the same inputs; exit 1 past tolerance."""
    with user_errors():
        check_json_output(json_path, inputs=input_files(quantized, model, text) + recorded_inputs(quantized), force=force)
        out = report_console(json_path)
        with progress_bar(out, f"loading {quantized.name}", lambda what: f"evaluating on {what.split(':')[0]}") as progress:
            report = evaluate_quantized(
                quantized, model_dir=model, text=text, images=images, tol=tol, max_length=max_length,
                batch_size=batch_size, device=device, backend=backend, progress=progress,
            )  # fmt: skip
        outputs.set_result(0 if report.passed else 1)  # kept by a signal that lands after the --json is written
        render(report, out)
        if json_path is not None:
            write_json(json_path, report.to_dict())
    if not report.passed:
        raise typer.Exit(1)


def render(report: EvalReport, out: Console) -> None:
    out = for_log(out)
    out.print(f"{report.quantized}: {report.scheme}, {report.mlps} MLPs swapped into {report.model} ({report.model_from})", highlight=False)
    out.print(f"{report.kind} model on {report.device}; quantized MLPs on {report.backend} ({report.backend_reason})", highlight=False)
    for source in report.inputs:
        if source["kind"] == "text":
            out.print(f"text: {source['path']}, {source['lines']} lines, max {source['max_length']} tokens per line", highlight=False)
        else:
            out.print(f"images: {source['path']}, {source['images']} images", highlight=False)
    for note in report.notes:
        out.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    table = Table(box=box.SIMPLE_HEAD, title="the quantized model against the original")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("gate", justify="right")
    gate = report.gate
    for key, value in report.metrics.items():
        if key not in _METRICS:
            continue
        name, fmt = _METRICS[key]
        shown = "NaN/Inf" if value is None or value != value else fmt.format(value)
        limit = ""
        if key == gate["metric"]:
            limit = f"{'>=' if gate['how'] == 'min' else '<='} {gate['limit']:.4g} ({gate['origin']})"
        table.add_row(name, shown, limit)
    out.print(table)
    value = gate["value"]
    shown = "NaN/Inf" if value is None or value != value else f"{value:.5g}"
    sign = ">=" if gate["how"] == "min" else "<="
    if report.passed:
        out.print(f"[green]PASS[/green]: {gate['metric']} {shown} {sign} {gate['limit']:.4g} in {report.seconds:.1f} s", highlight=False)
    else:
        out.print(f"[bold red]FAIL[/bold red]: {gate['metric']} {shown}, past the limit ({sign} {gate['limit']:.4g}) ({report.seconds:.1f} s)", highlight=False)
