#!/usr/bin/env bash
# Where verify's wall time goes on the GPU: a cold and a warm Triton cache, with and
# without the autotuner, on the six MiniLM MLPs (.cache/minilm carried to the device).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
ckpt=${1:-.cache/minilm/minilm-6mlp-fp32.safetensors}
calib=${2:-.cache/minilm/minilm-calib.safetensors}
run() {  # name, autotune, cache dir, extra python args
  local name=$1 tune=$2 cache=$3; shift 3
  local t0=$EPOCHREALTIME
  GELUGEMM_AUTOTUNE=$tune TRITON_CACHE_DIR=$cache python3 "$@" -m gelugemm_cli verify "$ckpt" --calib "$calib" \
    --dtype all --backend triton --json "$OUT/verify-$name.json" >"$OUT/verify-$name.txt" 2>&1
  local rc=$?
  printf '%-22s rc=%d  wall %6.1f s  (%s)\n' "$name" $rc "$(awk "BEGIN{print $EPOCHREALTIME - $t0}")" "$(tail -n 1 "$OUT/verify-$name.txt")"
}
rm -rf /tmp/tc-tune /tmp/tc-notune
python3 -c "import torch; torch.zeros(1, device='cuda')"  # driver warm-up, not counted below
t0=$EPOCHREALTIME; python3 -c "import torch, triton; torch.zeros(1, device='cuda')"; echo "import torch+triton, CUDA init: $(awk "BEGIN{print $EPOCHREALTIME - $t0}") s"
run tune-cold 1 /tmp/tc-tune
run tune-warm 1 /tmp/tc-tune
if [[ ${PROBE_NOTUNE:-1} == 1 ]]; then
  run notune-cold 0 /tmp/tc-notune
  run notune-warm 0 /tmp/tc-notune
fi
