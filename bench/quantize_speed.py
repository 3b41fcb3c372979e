"""Speed of `gelugemm quantize` on a synthetic sharded fp16 model (CPU; no GPU needed).

    python bench/quantize_speed.py                          # 8 x 4096x16384 fp16 MLPs, 4 shards (2.1 GB)
    python bench/quantize_speed.py --runs 3 --code /tmp/old --code .   # two checkouts, runs alternating
    python bench/quantize_speed.py --device cuda            # quantize --device cuda (a GPU host); cpu, auto

Builds a GPT-NeoX-named model directory in a temporary folder (bench/quantize_memory.py's
builder: one shard in memory at a time; deleted at the end), then runs
`gelugemm quantize DIR --scheme S --force --json FILE` in a fresh process per run and
scheme (w8a16: group:128, w8a8: dynamic, the defaults), and prints per run: the device the
weights were quantized on (the report's; `--device` is passed through, and without it
quantize's default, auto, decides), the wall time of the process (interpreter and imports
included), the run's own seconds (the report's), MB/s of checkpoint over each, and where the
time went (the report's `timing`, where the code has it). The checkpoint was just written, so it is read from the page cache: this
measures quantize, not the disk it reads from.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_memory import build, model_arguments  # noqa: E402


def run(source: Path, scheme: str, code: Path, report: Path, device: str | None) -> tuple[float, dict]:
    command = [sys.executable, "-m", "gelugemm_cli", "quantize", str(source), "--scheme", scheme, "--force", "--json", str(report)]
    if device is not None:
        command += ["--device", device]
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=code)
    if done.returncode:
        sys.exit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr or done.stdout}")
    return time.perf_counter() - started, json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser)
    parser.add_argument("--runs", type=int, default=2, help="runs per scheme")
    parser.add_argument("--device", default=None, help="quantize's --device: auto, cpu or cuda (default: not passed, so auto)")
    parser.add_argument("--code", type=Path, action="append",
                        help="a checkout whose gelugemm runs; given twice or more, their runs alternate on the same "
                             "model, for a before/after (default: this one)")  # fmt: skip
    args = parser.parse_args()
    codes = [c.resolve() for c in args.code] if args.code else [Path(__file__).resolve().parent.parent]
    with tempfile.TemporaryDirectory(prefix="gelugemm-quantize-speed-") as tmp:
        source = Path(tmp) / "model"
        source.mkdir()
        build(source, args.mlps, args.shards, args.d_model, args.d_ff)
        total = sum(p.stat().st_size for p in source.glob("*.safetensors"))
        print(f"model: {args.mlps} x {args.d_model}x{args.d_ff} fp16 MLPs, {args.shards} shards, {total / 1e9:.2f} GB; "
              f"code: {', '.join(map(str, codes))}; {os.cpu_count()} CPUs; --device {args.device or '(not passed)'}")  # fmt: skip
        print("| code | scheme | device | run | wall s | MB/s (wall) | report s | MB/s (report) | phases (s) |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for scheme in args.schemes.split(","):
            for i, code in ((i, code) for i in range(args.runs) for code in codes):
                wall, report = run(source, scheme, code, Path(tmp) / "report.json", args.device)
                seconds = report["seconds"]
                timing = report.get("timing") or {}
                phases = ", ".join(f"{k} {v:.2f}" for k, v in sorted(timing.get("phases", {}).items(), key=lambda kv: -kv[1]))
                device = report.get("device", "n/a (code without --device)")
                print(f"| {code.name} | {scheme} | {device} | {i + 1} | {wall:.1f} | {total / wall / 1e6:.0f} | {seconds:.1f} | "
                      f"{total / seconds / 1e6:.0f} | {phases or 'n/a'} |")  # fmt: skip


if __name__ == "__main__":
    main()
