#!/usr/bin/env bash
# Every int8 scheme of the real all-MiniLM-L6-v2's six MLPs, quantized and verified, on the
# Triton kernels (GPU) or the torch reference (CPU): the same errors on both is the check.
#
#   bash bench/verify_minilm_schemes.sh [triton|torch] [OUT_DIR]
#
# Needs .cache/minilm/: minilm-6mlp-fp32.safetensors (the six MLPs and their LayerNorms from
# the model's fp32 model.safetensors, with its config.json beside) and minilm-calib.safetensors
# (`gelugemm calibrate MODEL --text bench/heldout.txt --max-tokens 1600`: small enough to carry).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
BACKEND=${1:-triton}; OUTD=${2:-${OUT:-$PWD/gpu-out}}; mkdir -p "$OUTD"
CALIB=.cache/minilm/minilm-calib.safetensors
for v in "w8a8-dynamic:--scheme w8a8" \
         "w8a8-static:--scheme w8a8 --activations static --calib $CALIB" \
         "w8a8-group128:--scheme w8a8 --activations group:128" \
         "w8a8-dynamic-smooth:--scheme w8a8 --smooth 0.5 --calib $CALIB" \
         "w8a16-group128:--scheme w8a16" \
         "w8a16-per-channel:--scheme w8a16 --granularity per-channel"; do
  name=${v%%:*}; opts=${v#*:}
  # shellcheck disable=SC2086
  python3 -m gelugemm_cli quantize .cache/minilm/minilm-6mlp-fp32.safetensors $opts -o "$OUTD/minilm-$name.safetensors" --force >"$OUTD/q-$name.txt" 2>&1
  python3 -m gelugemm_cli verify "$OUTD/minilm-$name.safetensors" --calib $CALIB --dtype all --backend "$BACKEND" --force \
    --json "$OUTD/v-$name-$BACKEND.json" >"$OUTD/v-$name-$BACKEND.txt" 2>&1
  echo "$name: $(tail -n 1 "$OUTD/v-$name-$BACKEND.txt")"
done
