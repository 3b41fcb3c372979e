#!/usr/bin/env bash
# The one GPU check: run every test on the GPU, then the benchmark, in a single device call.
#   bash bench/gpu_check.sh [tests|bench|all]      (default: all)
# Writes logs under $OUT (or ./gpu-out); prints a short summary last.
# Runs from the checkout with the device's own torch/triton (no installs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
what=${1:-all}

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} | tee "$OUT/env.txt"

status=0
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -s -p no:cacheprovider -rs tests/ >"$OUT/pytest.log" 2>&1 || status=1
  grep -E "^GPU-ERR" "$OUT/pytest.log" >"$OUT/gpu-errors.txt" || true
fi
if [[ $what == bench || $what == all ]]; then
  if [[ -f gelugemm_cli/bench.py ]]; then
    python3 -m gelugemm_cli bench --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1 || status=1
  fi
fi
# Keep compiled kernels and autotune results for the next call (carry .cache back in).
tar czf "$OUT/triton-cache.tgz" -C "$PWD" .cache/triton 2>/dev/null || true

echo "== summary"
cat "$OUT/env.txt"
[[ -f $OUT/pytest.log ]] && { tail -n 3 "$OUT/pytest.log"; grep -cE "^GPU-ERR" "$OUT/pytest.log" | sed 's/^/GPU-ERR lines: /'; grep -E "FAILED|Error" "$OUT/pytest.log" | head -20; }
[[ -f $OUT/bench.log ]] && tail -n 60 "$OUT/bench.log"
exit $status
