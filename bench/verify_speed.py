"""Seconds per MLP of `gelugemm verify`, after warm-up, and where they go (GPU or CPU).

    python bench/verify_speed.py                              # GPU: 4 x 4096x16384 fp16 MLPs, fp16,w8a16,w8a8, 512 tokens
    python bench/verify_speed.py --d-model 1024 --d-ff 4096   # a CPU-sized run (torch reference)

Builds a GPT-NeoX-named fp16 model directory in a temporary folder (bench/quantize_memory.py's
builder; deleted at the end) and, with --quantized, `gelugemm quantize`s it too (w8a16).
Then, in this one process, verifies it once to warm up (Triton compiles and autotunes every
kernel variant, CUDA starts) and --runs more times, and prints per run the seconds, the
seconds per MLP and the report's phases (calibration/timing.py; on a GPU each phase waits
for its kernels): read (weights from the page cache, checked finite), quantize (an original
checkpoint's int8 rows, quantized in memory), to device, references (the fp16 path and
float64), op (gelugemm's op, every dtype), metrics, sha256 (a quantized checkpoint's source
checked), inputs (the synthetic rows).

Issue 16's target: at most 0.3 s per 4096x16384 MLP on an H100 after warm-up (measured
1.6 s before, almost all host work).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_memory import build  # noqa: E402

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlps", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--d-ff", type=int, default=16384)
    parser.add_argument("--dtype", default="fp16,w8a16,w8a8")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--runs", type=int, default=2, help="timed runs after the warm-up")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--quantized", action="store_true", help="verify the w8a16 checkpoint quantize writes, against its source")
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the checkout whose gelugemm runs (default: this one), for a before/after")  # fmt: skip
    args = parser.parse_args()
    sys.path.insert(0, str(args.code))
    from calibration.quantize import quantize_checkpoint
    from calibration.verify import verify_checkpoint

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="gelugemm-verify-speed-") as tmp:
        source = Path(tmp) / "model"
        source.mkdir()
        build(source, args.mlps, max(1, args.mlps // 2), args.d_model, args.d_ff)
        target, dtypes = source, args.dtype
        if args.quantized:
            target = Path(quantize_checkpoint(source).output)
            dtypes = ",".join(d for d in args.dtype.split(",") if d != "w8a8")  # the file holds w8a16 only
        name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"verify {'quantized (w8a16) ' if args.quantized else ''}{args.mlps} x {args.d_model}x{args.d_ff} fp16 MLPs, "
              f"--dtype {dtypes}, --tokens {args.tokens}; {name}; torch {torch.__version__}")  # fmt: skip
        print("| run | seconds | per MLP | backend | phases (s) |")
        print("| --- | ---: | ---: | --- | --- |")
        for run in range(args.runs + 1):
            started = time.perf_counter()
            report = verify_checkpoint(target, dtypes, tokens=args.tokens, backend=args.backend)
            wall = time.perf_counter() - started
            timing = getattr(report, "timing", None) or {"phases": {}}  # (code from before the timing line)
            phases = ", ".join(f"{k} {v:.3f}" for k, v in sorted(timing["phases"].items(), key=lambda kv: -kv[1]))
            label = "warm-up" if run == 0 else str(run)
            print(f"| {label} | {wall:.2f} | {wall / len(report.layers):.3f} | {report.backend} | {phases or 'n/a'} |", flush=True)
            if not report.passed:
                print(f"  ({len(report.failures)} rows past tolerance)")


if __name__ == "__main__":
    main()
