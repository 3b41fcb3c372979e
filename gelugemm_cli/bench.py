"""`gelugemm bench`: time gelugemm's op against torch eager, cuBLASLt, torch.compile and naive int8.

The work is `kernels.bench.run_bench`; this module parses the options, shows progress,
and renders the one result as a Rich table, JSON (`--json`) and a PNG (`--plot`).
"""

from __future__ import annotations

import shlex
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from calibration import outputs
from calibration.options import comma_list, positive_number
from calibration.outputs import atomic_output
from gelugemm_cli.common import (
    PLOT_BYTES,
    check_json_output,
    err_console,
    for_log,
    input_files,
    report_console,
    state,
    user_errors,
    write_json,
)
from calibration.model import checkpoint_shapes, has_gated_mlps_only
from kernels import peers
from kernels.bench import (
    BENCH_DTYPES,
    DEFAULT_ACTIVATIONS,
    DEFAULT_GRANULARITIES,
    DEFAULT_SHAPES,
    DEFAULT_TOKENS,
    GATED_SHAPES,
    QUICK_TOKENS,
    BenchResult,
    EAGER_CAT,
    BenchRow,
    MLPShape,
    run_bench,
)
from kernels.errors import GelugemmError

DEFAULT_WARMUP_MS, DEFAULT_REP_MS = 25.0, 100.0
QUICK_WARMUP_MS, QUICK_REP_MS = 5.0, 20.0


# ---- options ---------------------------------------------------------------------------------


def parse_names(text: str, allowed: tuple, what: str) -> list[str]:
    """'a,b' -> ['a', 'b'], each one of `allowed`; 'none' -> []."""
    names = comma_list(text, f"--{what}")  # what: the option's name
    if names == ["none"]:
        return []
    for name in names:
        if name not in allowed:
            raise GelugemmError(f"--{what}: unknown {name!r} ({', '.join(allowed)})")
    return names


def parse_list(text: str, what: str) -> list[str]:
    """'dynamic,group:128' -> ['dynamic', 'group:128'] (each checked by run_bench)."""
    return comma_list(text, f"--{what}")


def parse_shape(text: str) -> MLPShape:
    """'4096,16384' (or '4096x16384') -> MLPShape(d_model=4096, d_ff=16384)."""
    parts = text.replace("x", ",").split(",")
    try:
        d, f = (int(p) for p in parts)
    except ValueError:
        raise GelugemmError(f"--shape takes d_model,d_ff, e.g. 4096,16384; got {text!r}") from None
    if d <= 0 or f <= 0:
        raise GelugemmError(f"--shape takes two positive integers; got {text!r}")
    return MLPShape(d, f)


def parse_tokens(text: str) -> list[int]:
    """'1,16,128' -> [1, 16, 128]."""
    try:
        tokens = [int(t) for t in comma_list(text, "--tokens")]
    except ValueError:
        raise GelugemmError(f"--tokens takes positive integers, e.g. 1,16,2048; got {text!r}") from None
    if not tokens or min(tokens) <= 0:
        raise GelugemmError(f"--tokens takes positive integers, e.g. 1,16,2048; got {text!r}")
    return list(dict.fromkeys(tokens))


def require_matplotlib() -> None:
    """Fail before the run, not after it, when --plot cannot be written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        # (no square brackets: the error line is printed as Rich markup)
        raise GelugemmError("--plot needs matplotlib (the plot extra): pip install matplotlib") from None


# ---- progress --------------------------------------------------------------------------------

STAGES = {"ceilings": "device ceilings", "prepare": "autotune, compile, check", "time": "timing"}


@contextmanager
def progress_bar():
    """A Rich progress bar on stderr (stdout stays clean for --json -), as run_bench's callback."""
    columns = (TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("[dim]{task.fields[label]}"))  # fmt: skip
    with Progress(*columns, console=err_console, disable=not err_console.is_terminal) as bar:
        tasks = {}

        def report(stage: str, done: int, total: int, label: str) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(STAGES.get(stage, stage), total=total, label="")
            bar.update(tasks[stage], completed=done, total=total, label=label)

        yield report


# ---- rendering -------------------------------------------------------------------------------


def _impl_label(row: BenchRow, run_gelu: str) -> str:
    label = f"[bold]{row.impl}[/bold]" if row.impl == "gelugemm" else row.impl
    if row.gelu != run_gelu:
        label += f" ({row.gelu})"
    if (row.impl in peers.FLOAT_PEERS or row.impl == EAGER_CAT) and row.weights != row.dtype:
        label += f" [dim]{row.weights}[/dim]"  # a float peer in an int8 group
    return label


def _num(value: float | None) -> str:
    """Three significant figures or more, thousands separated: 0.0123, 4.56, 86.2, 862, 3,544."""
    if value is None:
        return ""
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _vs_best_peer(row: BenchRow) -> str:
    """'✓ 1.08× cublaslt (tanh)' on a gelugemm row ahead of the group's fastest peer, '✗ 0.91× eager' behind."""
    if row.vs_best_peer is None:
        return ""
    mark, colour = ("✓", "green") if row.beats_best_peer else ("✗", "red")
    return f"[{colour}]{mark} {row.vs_best_peer:.2f}×[/{colour}] {escape(row.best_peer)}"


def bench_table(result: BenchResult) -> Table:
    """One row per (shape, dtype, M, impl); gelugemm first in each group, then its peers."""
    info = result.info
    c = info.ceilings
    int8 = f", int8 {c.int8_tops:.0f} TOP/s" if c.int8_tops else ""
    sets: dict[str, set] = {}
    for row in result.rows:
        if row.rotation_sets:
            sets.setdefault(f"{row.d_model}×{row.d_ff}", set()).add(row.rotation_sets)
    rotation = ", ".join(f"{s} {min(n)}" + (f"–{max(n)}" if len(n) > 1 else "") for s, n in sets.items())
    timing = "CUDA-graph replays (GPU time, no launch cost)" if info.timing == "cuda-graph" else "Python calls"
    gated = "gated MLPs (GeGLU) · " if any(row.gated for row in result.rows) else ""
    table = Table(
        title=f"gelugemm bench · {gated}{info.device} · torch {info.torch} · triton {info.triton} · timed: {timing}",
        caption=(
            f"ceilings: bf16 matmul {c.matmul_tflops:.0f} TFLOP/s{int8}, copy {c.copy_gbps:.0f} GB/s · "
            f"µs: median; spread: p20 to p80 in % of it · buffer sets rotated (1 = one call's bytes "
            f"exceed 3× L2, cold by size): {rotation} · "
            f"floor = max(FLOPs/matmul, bytes/copy), B = bytes-bound, F = FLOPs-bound · "
            f"×: gelugemm's speedup over the row (same GELU) · vs best peer: the fastest peer of the group "
            f"(any GELU; int8 groups: the float peers too) ÷ gelugemm, ✓ ahead, ✗ behind · cuBLASLt GELU checked: {info.cublaslt_gelu or 'n/a'} · "
            f"{info.date}"
        ),
        caption_justify="left",
    )
    for name, justify in (("shape", "left"), ("dtype", "left"), ("M", "right"), ("impl", "left"),
                          ("µs", "right"), ("spread %", "right"), ("TFLOP/s", "right"), ("GB/s", "right"),
                          ("floor µs", "right"), ("% floor", "right"), ("gelugemm ×", "right"),
                          ("vs best peer", "left"), ("rel err", "right")):  # fmt: skip
        table.add_column(name, justify=justify)

    groups: dict[tuple, list[BenchRow]] = {}
    for row in result.rows:
        groups.setdefault((row.d_model, row.d_ff, row.variant, row.tokens), []).append(row)
    for (d, f, dtype, m), rows in groups.items():
        for i, row in enumerate(rows):
            first = i == 0
            if row.time_us is not None:
                spread = (row.p80_us - row.p20_us) / row.time_us * 100
                timing = (_num(row.time_us), f"{spread:.0f}", _num(row.tflops), _num(row.gbps))
            else:
                timing = (f"[dim]{row.status}[/dim]", "", "", "")
            if row.speedup is None:
                speedup = ""
            else:
                colour = "green" if row.speedup >= 1 else "red"
                speedup = f"[{colour}]{row.speedup:.2f}×[/{colour}]"
            if row.relerr is None:
                relerr = ""
            elif row.status == "wrong":
                relerr = f"[bold red]✗ {row.relerr:.1e}[/bold red]"
            else:
                relerr = f"{row.relerr:.1e}"
            table.add_row(
                f"{d}×{f}" if first else "", dtype if first else "", str(m) if first else "",
                _impl_label(row, info.gelu), *timing,
                f"{_num(row.floor_us)} {row.floor_bound[0].upper()}" if first else "",
                _num(row.pct_of_floor), speedup, _vs_best_peer(row), relerr,
                end_section=i == len(rows) - 1,
            )  # fmt: skip
    return table


def problems(result: BenchResult) -> list[str]:
    """One line per distinct failure, unavailable impl or note, for under the table."""
    lines = []
    for row in result.rows:
        if row.status == "wrong":
            line = (f"[red]{row.impl} {row.variant} {row.d_model}×{row.d_ff} M={row.tokens}: relative error "
                    f"{row.relerr:.2e} over the limit {row.relerr_limit:.0e}[/red]")  # fmt: skip
        elif row.status in ("error", "unavailable"):
            colour = "red" if row.status == "error" else "yellow"
            line = f"[{colour}]{row.impl} {row.variant}: {row.status}: {escape(row.error or '')}[/{colour}]"
        else:
            continue
        if line not in lines:
            lines.append(line)
    return lines


def write_speedup_plot(result: BenchResult, path: Path) -> None:
    """PNG: speedup over torch eager by token count, one panel per (shape, dtype), a line per impl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, dict[str, dict[int, float]]] = {}
    eager: dict[tuple, float] = {}
    for row in result.rows:
        if row.time_us is None:
            continue
        panel = (row.d_model, row.d_ff, row.variant)
        if row.impl == "eager":
            eager[(*panel, row.tokens)] = row.time_us
        elif row.impl == "gelugemm" and row.gelu != result.info.gelu:
            continue  # the tanh twin is there for the cuBLASLt column; eager runs the run's GELU
        label = row.impl + (f" ({row.gelu})" if row.gelu != result.info.gelu else "")
        panels.setdefault(panel, {}).setdefault(label, {})[row.tokens] = row.time_us
    panels = {p: lines for p, lines in panels.items() if any(k[:3] == p for k in eager)}
    if not panels:
        raise GelugemmError("--plot needs eager rows to compare with: keep 'eager' in --peers")

    shapes = sorted({p[:2] for p in panels})
    tokens = sorted({k[3] for k in eager})
    colours = {}  # one colour per impl across panels
    dtypes = list(dict.fromkeys(p[2] for p in sorted(panels, key=lambda p: BENCH_DTYPES.index(p[2].split()[0]))))
    fig, axes = plt.subplots(len(shapes), len(dtypes), figsize=(4.2 * len(dtypes), 3.4 * len(shapes)),
                             squeeze=False, sharex=True)  # fmt: skip
    for r, shape in enumerate(shapes):
        for c, dtype in enumerate(dtypes):
            ax = axes[r][c]
            ax.set_title(f"{shape[0]}×{shape[1]} {dtype}", fontsize=10)
            ax.axhline(1.0, color="grey", lw=0.8)
            lines = panels.get((*shape, dtype), {})
            for label, times in sorted(lines.items(), key=lambda kv: (not kv[0].startswith("gelugemm"), kv[0])):
                if label.startswith("eager"):
                    continue
                ms = sorted(m for m in times if (*shape, dtype, m) in eager)
                ys = [eager[(*shape, dtype, m)] / times[m] for m in ms]
                ours = label.startswith("gelugemm")
                colour = colours.setdefault(label, f"C{len(colours)}")
                ax.plot(ms, ys, marker="o", color=colour, lw=2.2 if ours else 1.0, ls="-" if ours else "--", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(tokens, [str(m) for m in tokens])
            ax.minorticks_off()
            ax.set_xlabel("tokens M")
            ax.set_ylabel("speedup over eager (×)")
            ax.legend(fontsize=7)
    info = result.info
    fig.suptitle(f"{info.device} · torch {info.torch} · triton {info.triton} · {info.date}", fontsize=9)
    fig.tight_layout()
    try:
        with atomic_output(path) as f:  # tagged, so a re-run replaces it without --force
            fig.savefig(f, format="png", dpi=120, metadata={"Software": outputs.PNG_SOFTWARE})
    finally:
        plt.close(fig)


# ---- the command -----------------------------------------------------------------------------


def bench(
    checkpoint: Optional[Path] = typer.Argument(
        None, help="A safetensors checkpoint: benchmark the shapes of its MLP layers. Without one: 768×3072 and 4096×16384 (--gated: 2048×16384)."
    ),
    dtype: str = typer.Option(",".join(BENCH_DTYPES), "--dtype", help="Comma-separated dtypes: fp16, bf16, w8a16, w8a8."),
    shape: Optional[List[str]] = typer.Option(
        None, "--shape", help="d_model,d_ff to benchmark (repeatable); replaces the checkpoint's and the default shapes."
    ),
    tokens: Optional[str] = typer.Option(
        None, "--tokens", help=f"Comma-separated token counts M. (default {','.join(map(str, DEFAULT_TOKENS))}; with --quick {','.join(map(str, QUICK_TOKENS))})"
    ),
    peer_names: str = typer.Option(
        ",".join(peers.PEERS), "--peers",
        help="Comma-separated peers, or 'none': eager, cublaslt, compile (float); dequant (w8a16), int_mm (w8a8).",
    ),  # fmt: skip
    gelu: Optional[str] = typer.Option(None, "--gelu", help="erf or tanh. (default: what the checkpoint's config.json says, else erf)"),
    activation_dtype: str = typer.Option("fp16", "--activation-dtype", help="x and y of the int8 rows: fp16 or bf16."),
    activations: str = typer.Option(
        ",".join(DEFAULT_ACTIVATIONS), "--activations",
        help="Comma-separated w8a8 activation schemes, a group of rows each: dynamic, group:N (N = 32, 64, 128), static.",
    ),
    granularity: str = typer.Option(
        ",".join(DEFAULT_GRANULARITIES), "--granularity",
        help="Comma-separated w8a16 weight scales, a group of rows each: group:N, per-channel.",
    ),  # fmt: skip
    warmup_ms: Optional[float] = typer.Option(None, "--warmup-ms", help="Warm-up per timing, in ms. (default 25; with --quick 5)"),
    rep_ms: Optional[float] = typer.Option(None, "--rep-ms", help="Repeats per timing, in ms. (default 100; with --quick 20)"),
    quick: bool = typer.Option(False, "--quick", help="Fewer token counts and shorter timings: a smoke run."),
    gated: bool = typer.Option(
        False, "--gated",
        help="Gated MLPs (GeGLU: Gemma, T5 v1.1, ModernBERT): GELU(x Wg) * x Wu -> Wd, against eager on two GEMMs and on one concatenated GEMM (eager-cat). (default shape Gemma-2B's 2048×16384, GELU tanh; a checkpoint whose MLPs are all gated turns it on)",
    ),  # fmt: skip
    cuda_graph: bool = typer.Option(
        False, "--cuda-graph",
        help="Time CUDA-graph replays of every impl instead of Python calls: GPU time without launch cost, as a decode loop that replays graphs sees it.",
    ),  # fmt: skip
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON to this file ('-' for stdout)."),
    plot_path: Optional[Path] = typer.Option(
        None, "--plot", help="Write a PNG of speedup over torch eager by token count (needs matplotlib)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json or --plot file that gelugemm did not write."),
):
    """Time gelugemm's fused MLP against torch eager, cuBLASLt's GELU epilogue, torch.compile and naive int8."""
    with user_errors():
        # Every output checked before the work.
        inputs = input_files(checkpoint)
        check_json_output(json_path, inputs=inputs, others=[("--plot", plot_path)], force=force)
        if plot_path is not None:
            outputs.check_output(plot_path, option="--plot", inputs=inputs, expected_bytes=PLOT_BYTES, force=force, replace="own")
        dtypes = parse_names(dtype, BENCH_DTYPES, "dtype")
        chosen_peers = parse_names(peer_names, peers.PEERS, "peers")
        token_counts = parse_tokens(tokens) if tokens else list(QUICK_TOKENS if quick else DEFAULT_TOKENS)
        for option, value in (("--warmup-ms", warmup_ms), ("--rep-ms", rep_ms)):
            if value is not None:
                positive_number(value, option)
        if gelu is not None and gelu not in ("erf", "tanh"):
            raise GelugemmError(f"--gelu must be erf or tanh; got {gelu!r}")
        if plot_path is not None:
            require_matplotlib()
        if checkpoint is not None and not gated:
            gated = has_gated_mlps_only(checkpoint)
        shapes = list(GATED_SHAPES if gated else DEFAULT_SHAPES)
        if checkpoint is not None:
            found, gelu = checkpoint_shapes(checkpoint, gelu, gated=gated)
            shapes = [MLPShape(*s) for s in found]
        if shape:
            shapes = list(dict.fromkeys(parse_shape(s) for s in shape))
        gelu = gelu or ("tanh" if gated else "erf")  # Gemma's and T5's GELU is the tanh form

        with progress_bar() as report:
            result = run_bench(
                shapes, dtypes, token_counts, chosen_peers,
                gelu=gelu, activation_dtype=activation_dtype,
                activations=parse_list(activations, "activations"), granularities=parse_list(granularity, "granularity"),
                gated=gated, warmup_ms=warmup_ms if warmup_ms is not None else (QUICK_WARMUP_MS if quick else DEFAULT_WARMUP_MS),
                rep_ms=rep_ms if rep_ms is not None else (QUICK_REP_MS if quick else DEFAULT_REP_MS),
                cuda_graph=cuda_graph, progress=report, command=shlex.join(sys.argv), raise_errors=state["debug"],
            )  # fmt: skip

        failed = result.failed("gelugemm")
        outputs.set_result(1 if failed else 0)  # kept by a signal that lands after the outputs are written
        if json_path is not None:
            write_json(json_path, result.to_dict())
        out = for_log(report_console(json_path))
        out.print(bench_table(result))
        for line in problems(result):
            out.print(line, highlight=False)
        if plot_path is not None:
            write_speedup_plot(result, plot_path)
        if failed:
            err_console.print(
                f"[bold red]error:[/bold red] {len(failed)} gelugemm rows were not measured right "
                f"(wrong output, crashed or refused; see above)",
                highlight=False,
            )
            raise typer.Exit(1)
