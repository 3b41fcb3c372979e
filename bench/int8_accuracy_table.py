"""Print issue 13's accuracy tables from bench/int8_accuracy.sh's JSON (markdown, for RESULTS.md).

    python3 bench/int8_accuracy_table.py .cache/int8-accuracy
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (variant file name, what it is, the worst-layer target vs the fp16 path)
ROWS = [
    ("w8a8-static", "w8a8 static (max observer; today's scheme)", None),
    ("w8a8-static-smooth0.5", "w8a8 static, --smooth 0.5", None),
    ("w8a8-dynamic", "w8a8 dynamic (default)", 0.038),
    ("w8a8-dynamic-smooth0.5", "w8a8 dynamic, --smooth 0.5", 0.029),
    ("w8a8-group128", "w8a8 group:128", 0.024),
    ("w8a8-group128-smooth0.5", "w8a8 group:128, --smooth 0.5", None),
    ("w8a16-per-channel", "w8a16 per-channel", None),
    ("w8a16-group128", "w8a16 group:128 (default)", 0.008),
]


def main(out: Path) -> None:
    print("| scheme | " + " | ".join(f"layer {i}" for i in range(6)) + " | worst | best | target | tolerance | eval cos min / mean | hidden err |")
    print("| --- |" + " ---: |" * 6 + " ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, label, target in ROWS:
        verify = out / f"{name}.verify.json"
        if not verify.exists():
            continue
        report = json.loads(verify.read_text())
        rows = [r for r in report["rows"] if r["dtype"] in ("w8a8", "w8a16")]
        errs = [r["vs_fp16_path"]["rel_frobenius"] for r in rows]
        tol = rows[0]["tolerance"]
        ev = json.loads((out / f"{name}.eval.json").read_text())["metrics"]
        mark = "" if target is None else (" ✓" if max(errs) <= target else " ✗")
        print(
            f"| {label} | " + " | ".join(f"{e:.2%}" for e in errs) + f" | **{max(errs):.2%}** | {min(errs):.2%} | "
            f"{'' if target is None else f'≤ {target:.1%}{mark}'} | {tol:g} | "
            f"{ev['embedding_cosine_min']:.5f} / {ev['embedding_cosine_mean']:.5f} | {ev['hidden_rel_error']:.4f} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/int8-accuracy"))
