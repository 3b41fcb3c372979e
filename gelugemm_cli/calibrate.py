"""`gelugemm calibrate`: run a model over real inputs and write what each MLP reads.

The work is `calibration.capture.calibrate_model` (transformers, the optional extra `hf`);
this module parses the options, shows progress, and renders the report as a Rich table
and as JSON (`--json`).
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from calibration.capture import DEFAULT_BATCH_SIZE, CalibrateReport, calibrate_model
from gelugemm_cli.common import (
    check_json_output,
    for_log,
    input_files,
    progress_bar,
    report_console,
    user_errors,
    write_json,
)


# Help strings are Rich markup: a literal "[" is written "\\[".
def calibrate(
    model_dir: Path = typer.Argument(..., help="A Hugging Face model directory (config.json, weights, tokenizer); read locally, never from a hub."),
    output: Path = typer.Option(..., "-o", "--output", help="The calibration file to write (safetensors, fc1 prefix -> \\[rows, d_model])."),
    text: Path | None = typer.Option(None, "--text", help="A text file: one sample per non-empty line."),
    images: Path | None = typer.Option(None, "--images", help="A folder of images, read through the model's own image processor (ViT, CLIP)."),
    max_length: int | None = typer.Option(None, "--max-length", help="Tokens per line \\[default: sentence-transformers' max_seq_length, else the model's limit]."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Stop after this many rows per MLP."),
    batch_size: int = typer.Option(DEFAULT_BATCH_SIZE, "--batch-size", help="Lines or images per forward."),
    device: str | None = typer.Option(None, "--device", help="cpu or cuda \\[default: cuda when there is one]."),
    layers: str | None = typer.Option(None, help="Capture only the MLPs whose fc1 or fc2 prefix matches this regex."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON to this file ('-' for stdout)."),
):
    """Run MODEL_DIR over real text or images and write what each MLP reads, the --calib file of quantize and verify."""
    with user_errors():
        check_json_output(json_path, inputs=input_files(text, images, model_dir), others=[("-o", output)], force=force)
        out = report_console(json_path)
        with progress_bar(out, f"loading {model_dir.name}", lambda what: f"calibrating on {what.split(':')[0]}") as progress:
            report = calibrate_model(
                model_dir, output, text=text, images=images, max_length=max_length, max_tokens=max_tokens,
                batch_size=batch_size, device=device, layers=layers, force=force, progress=progress,
            )  # fmt: skip
        render(report, out)
        if json_path is not None:
            write_json(json_path, report.to_dict())


def render(report: CalibrateReport, out: Console) -> None:
    out = for_log(out)
    out.print(f"{report.model}: {report.kind} model, on {report.device}", highlight=False)
    for source in report.inputs:
        if source["kind"] == "text":
            what = f"text: {source['path']}, {source['used']} of {source['lines']} lines, max {source['max_length']} tokens per line"
        else:
            what = f"images: {source['path']}, {source['used']} of {source['images']} images"
        out.print(f"{what}; {source['rows']} rows per MLP", highlight=False)
    table = Table(box=box.SIMPLE_HEAD, title="what each MLP read (its fc1's input, padding excluded)")
    table.add_column("MLP (fc1 prefix)", overflow="fold")
    table.add_column("input")
    for column in ("rows", "d_model", "max |x|", "at channel"):
        table.add_column(column, justify="right")
    for layer in report.layers:
        table.add_row(layer.fc1, layer.source, str(layer.rows), str(layer.d_model), f"{layer.absmax:.3g}", str(layer.absmax_channel))
    out.print(table)
    for note in report.notes:
        out.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    for source, held in report.held_out.items():
        whole = f"; from {held['first_whole_input']} on, every {source[:-1] if source == 'images' else 'line'} is in it" if held["first_whole_input"] else ""
        out.print(
            f"held out ({source}): rows {held['first_held_out_row']}-{held['rows'] - 1}, the last {held['held_out_fraction']:.0%}, "
            f"never calibrated on by quantize, graded by verify{whole}",
            highlight=False,
        )
    out.print(f"wrote {report.output} ({report.output_bytes / 2**20:.1f} MiB, float32) in {report.seconds:.1f} s", highlight=False)
