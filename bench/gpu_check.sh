#!/usr/bin/env bash
# The one GPU check, the same every session: the test suite on the GPU, the benchmark,
# and verify on the real MiniLM MLPs, from the checkout with the machine's own
# torch/triton (nothing is installed).
#
#   bash bench/gpu_check.sh [STAGE ...]    stages: tests bench-float bench-int8 bench-graph int8-schemes gated verify
#                                          eval (default: all), and verify-dir, w8a16-dequant, quantize-speed,
#                                          medium-m, fused, fused-w8a8, fused-sweep, fused-medium, fused-final, gelu-erf, w8a16-rows, host-cost, tables, small-gemms, w8a8-one, ws-gelu, ncu, w8a8-route, host-desc, tp, tests-a, tests-b (not in the default; tests-a + tests-b
#                                          = tests, in two device calls; tp needs a host with two or more GPUs)
#
# Logs and JSON go to $OUT (default ./gpu-out); a short summary is printed last.
# verify also runs the full six-MLP MiniLM file when .cache/minilm/ holds it (see
# bench/RESULTS.md for how it is made; carry .cache/minilm to the device).
# eval runs calibrate -> quantize -> eval on the whole MiniLM through transformers and the
# Triton kernels; it needs transformers on the device and the model directory in
# $MINILM_DIR (default .cache/minilm-model: config.json, model.safetensors, tokenizer files,
# 1_Pooling/), and says why it is skipped otherwise.
# gated runs the gated-MLP (GeGLU) GPU tests (Gemma-2B and Gemma-7B shapes, every dtype,
# both weight forms; GPU-ERR lines) and `bench --gated` at M=2048 and 8192, and prints
# gelugemm's speedups over the faster eager (two GEMMs or one concatenated GEMM).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
stages=("$@"); [[ ${#stages[@]} -eq 0 ]] && stages=(tests bench-float bench-int8 bench-graph int8-schemes gated verify eval)
MINILM_DIR=${MINILM_DIR:-$PWD/.cache/minilm-model}
gg() { python3 -m gelugemm_cli "$@"; }
# gpu_tests NAME TEST_FILE...: the files' GPU tests (pytest -m gpu, 8 workers) into
# $OUT/NAME-tests.log; the summary gets the result line and every failure.
gpu_tests() {
  local name=$1; shift
  python3 -m pytest -q -rf -p no:cacheprovider -n 8 -m gpu "$@" >"$OUT/$name-tests.log" 2>&1 || status=1
  summary+=("$name tests: $(tail -n 1 "$OUT/$name-tests.log")")
  while read -r line; do summary+=("  $line"); done < <(grep -E '^(FAILED|ERROR) ' "$OUT/$name-tests.log")
}
status=0
summary=()
# pytest workers for the whole suite: one per 8 GiB of GPU memory, at most 12 (15 workers
# on an 80 GB H100 ran one real-size test out of memory, session 15)
gpu_gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -n 1)
suite_workers=$(( ${gpu_gib:-81920} / 8192 )); (( suite_workers > 12 )) && suite_workers=12

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
} | tee "$OUT/env.txt"

for stage in "${stages[@]}"; do
  t0=$SECONDS
  case $stage in
    tests|tests-a|tests-b)
      # -n (suite_workers, above): compiles run in parallel; the autotuner's choices under that load are not
      # kept (the benchmark stages tune again, alone). tests-a and tests-b are the suite's
      # two halves by file name (test_a* .. test_fuzz, the rest: 2470 and 3210 test-seconds on
      # an H100, session 15), each inside one device call's limit. The whole suite (5690
      # test-seconds) took 409 s on 15 workers; on an H100's 9 it would pass the limit, so
      # there run tests-a and tests-b. -rf names every failure in the log.
      files=(tests/test_*.py)
      case $stage in
        tests-a) files=($(printf '%s\n' "${files[@]}" | awk '$0 <= "tests/test_fuzz.py"')) ;;
        tests-b) files=($(printf '%s\n' "${files[@]}" | awk '$0 > "tests/test_fuzz.py"')) ;;
      esac
      python3 -m pytest -q -rf -p no:cacheprovider -n "$suite_workers" --junitxml="$OUT/junit-$stage.xml" "${files[@]}" \
        >"$OUT/pytest-$stage.log" 2>&1 || status=1
      find "$TRITON_CACHE_DIR" -name '*.autotune.json' -delete 2>/dev/null
      summary+=("$stage: $(tail -n 1 "$OUT/pytest-$stage.log")")
      while read -r line; do summary+=("  $line"); done < <(grep -E '^(FAILED|ERROR) ' "$OUT/pytest-$stage.log")
      ;;
    bench-float)
      gg bench --dtype fp16,bf16 --json "$OUT/bench-float.json" --plot "$OUT/bench-float.png" >"$OUT/bench-float.txt" 2>&1 || status=1
      summary+=("bench-float: see bench-float.txt")
      ;;
    bench-int8)
      gg bench --dtype w8a16,w8a8 --activations dynamic,group:128,static --granularity group:128,per-channel \
        --json "$OUT/bench-int8.json" --plot "$OUT/bench-int8.png" >"$OUT/bench-int8.txt" 2>&1 || status=1
      summary+=("bench-int8: see bench-int8.txt")
      ;;
    bench-graph)
      # The same rows timed as CUDA-graph replays: GPU time, without the host's launch cost.
      gg bench --cuda-graph --json "$OUT/bench-graph.json" >"$OUT/bench-graph.txt" 2>&1 || status=1
      summary+=("bench-graph: see bench-graph.txt")
      ;;
    int8-schemes)
      # Issue 13's check: every w8a8 activation scheme and w8a16 granularity against its
      # reference at real sizes (GPU-ERR lines), then 4096x16384 timed against fp16 eager,
      # CUDA-graph replays and Python calls.
      python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_w8a8.py tests/test_op_int8.py tests/test_w8a16.py \
        tests/test_cuda_graph.py >"$OUT/int8-schemes-tests.log" 2>&1 || status=1
      for timing in --cuda-graph ""; do
        name=int8-schemes$([[ -n $timing ]] && echo -graph)
        gg bench $timing --shape 4096,16384 --dtype w8a16,w8a8 --activations dynamic,group:128,static \
          --granularity group:128,per-channel --tokens 1,16,128,2048,8192 --peers eager,int_mm,dequant \
          --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1 || status=1
      done
      summary+=("int8-schemes: $(tail -n 1 "$OUT/int8-schemes-tests.log"); see int8-schemes-graph.txt, int8-schemes.txt")
      ;;
    gated)
      # Issue 17's check: the gated GEMM1 (GELU(gate) * up in one kernel) against its reference
      # and float64 at Gemma sizes, then Gemma-2B's and Gemma-7B's MLPs timed at M=2048, 8192.
      python3 -m pytest -q -p no:cacheprovider -n 8 -m gpu -rA tests/test_gated.py >"$OUT/gated-tests.log" 2>&1 || status=1
      gg bench --gated --shape 2048,16384 --shape 3072,24576 --dtype fp16,bf16,w8a16,w8a8 --tokens 2048,8192 \
        --peers eager,cublaslt,compile,dequant,int_mm --json "$OUT/bench-gated.json" >"$OUT/bench-gated.txt" 2>&1 || status=1
      python3 - "$OUT/bench-gated.json" >"$OUT/gated-summary.txt" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
def t(shape, dtype, m, impls):
    ts = [r["time_us"] for r in rows if (r["d_model"], r["d_ff"]) == shape and r["dtype"] == dtype and r["tokens"] == m
          and r["impl"] in impls and r["time_us"] and (dtype == "fp16" or r["impl"] == "gelugemm")]
    return min(ts) if ts else None
for shape in sorted({(r["d_model"], r["d_ff"]) for r in rows}):
    for m in sorted({r["tokens"] for r in rows}):
        eager = t(shape, "fp16", m, ("eager", "eager-cat"))
        for dtype in ("fp16", "bf16", "w8a16", "w8a8"):
            ours = t(shape, dtype, m, ("gelugemm",))
            if ours and eager:
                print(f"{shape[0]}x{shape[1]} M={m} {dtype}: gelugemm {ours:.0f} us, {eager / ours:.2f}x fp16 eager (faster of two GEMMs / concatenated: {eager:.0f} us)")
PY
      summary+=("gated: $(tail -n 1 "$OUT/gated-tests.log")")
      while read -r line; do summary+=("  $line"); done <"$OUT/gated-summary.txt"
      ;;
    verify)
      gg verify samples/minilm-mlp.safetensors --calib samples/minilm-calib.safetensors --dtype all --backend triton \
        --json "$OUT/verify-samples.json" >"$OUT/verify-samples.txt" 2>&1 || status=1
      if [[ -f .cache/minilm/minilm-6mlp-fp32.safetensors ]]; then
        gg verify .cache/minilm/minilm-6mlp-fp32.safetensors --calib .cache/minilm/minilm-calib.safetensors --dtype all \
          --backend triton --json "$OUT/verify-minilm.json" >"$OUT/verify-minilm.txt" 2>&1 || status=1
      fi
      summary+=("verify: $(tail -n 1 "$OUT/verify-samples.txt")")
      ;;
    eval)
      if ! python3 -c "import transformers" 2>/dev/null; then
        summary+=("eval: skipped, transformers is not installed here")
      elif [[ ! -f $MINILM_DIR/config.json ]]; then
        summary+=("eval: skipped, no model directory at $MINILM_DIR")
      else
        gg calibrate "$MINILM_DIR" --text samples/text.txt -o "$OUT/minilm-calib.safetensors" --device cuda --force \
          --json "$OUT/calibrate.json" >"$OUT/eval.txt" 2>&1 || status=1
        # the defaults (w8a16 group:128, w8a8 dynamic: no calibration rows), group:128 and static
        for scheme in w8a16 w8a8 w8a8-group128 w8a8-static; do
          args=(--scheme "${scheme%%-*}")
          [[ $scheme == w8a8-group128 ]] && args+=(--activations group:128)
          [[ $scheme == w8a8-static ]] && args+=(--activations static --calib "$OUT/minilm-calib.safetensors")
          gg quantize "$MINILM_DIR/model.safetensors" "${args[@]}" \
            -o "$OUT/minilm.$scheme.safetensors" --force >>"$OUT/eval.txt" 2>&1 || status=1
          gg eval "$OUT/minilm.$scheme.safetensors" --text bench/heldout.txt --device cuda --backend triton \
            --json "$OUT/eval-$scheme.json" >>"$OUT/eval.txt" 2>&1 || status=1
        done
        summary+=("eval: $(grep -E '^(PASS|FAIL)' "$OUT/eval.txt" | tr '\n' ' ')")
      fi
      ;;
    verify-dir)
      # A sharded model directory through quantize (w8a16, w8a8) and verify on the Triton
      # kernels: samples/'s two MiniLM MLPs split into three shards with an index.
      rm -rf "$OUT/minilm-dir" "$OUT/minilm-dir-int8"
      python3 - "$OUT/minilm-dir" <<'PY'
import json, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
out = Path(sys.argv[1]); out.mkdir()
tensors = load_file("samples/minilm-mlp.safetensors"); names = sorted(tensors)
shards = [names[i::3] for i in range(3)]; weight_map = {}
for i, members in enumerate(shards, 1):
    name = f"model-{i:05d}-of-00003.safetensors"
    save_file({n: tensors[n] for n in members}, str(out / name)); weight_map.update({n: name for n in members})
(out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
(out / "config.json").write_text(Path("samples/config.json").read_text())
PY
      for scheme in w8a16 w8a8; do
        gg quantize "$OUT/minilm-dir" --scheme $scheme --force \
          >"$OUT/quantize-dir-$scheme.txt" 2>&1 || status=1
        gg verify "$OUT/minilm-dir-int8" --dtype all --backend triton --json "$OUT/verify-dir-$scheme.json" \
          >"$OUT/verify-dir-$scheme.txt" 2>&1 || status=1
        summary+=("verify-dir $scheme: $(tail -n 1 "$OUT/verify-dir-$scheme.txt")")
      done
      ;;
    w8a16-dequant)
      # Where w8a16's dequantize-then-float-GEMM schedule overtakes the in-loop conversion
      # (kernels/w8a16.py's W8A16_DEQUANT_MIN_M), and the pass's own bandwidth.
      python3 bench/probe_w8a16_dequant.py >"$OUT/w8a16-dequant.txt" 2>&1 || status=1
      while read -r line; do summary+=("  $line"); done <"$OUT/w8a16-dequant.txt"
      ;;
    quantize-speed)
      # Issue 16's quantize target, >= 1 GB/s of checkpoint where a GPU is present: bench/quantize_speed.py's
      # 2.15 GB fp16 model (8 x 4096x16384 MLPs, read from the page cache), the weights quantized on the
      # GPU, then on this host's CPU (two runs per scheme each; about 2 minutes in all).
      rm -f "$OUT/quantize-speed.txt"
      for device in cuda cpu; do
        python3 bench/quantize_speed.py --device $device >>"$OUT/quantize-speed.txt" 2>&1 || status=1
      done
      summary+=("quantize-speed: MB/s of checkpoint over the report's seconds (wall), see quantize-speed.txt")
      while read -r line; do summary+=("  $line"); done < <(awk -F'|' '$2 ~ /w8a/ {gsub(/ +$|^ +/, "", $2); gsub(/ +$|^ +/, "", $3);
        printf "%s on %s, run %d: %d MB/s (%d wall)\n", $2, $3, $4, $8, $6}' "$OUT/quantize-speed.txt")
      ;;
    medium-m)
      # Issue 16's medium rows (bench/RESULTS.md section 15): the whole MLP at both standard
      # shapes from 16 to 1024 rows as CUDA-graph replays, and which float path each row
      # count wants (decode, TMA, strided; FLOAT_DECODE_MAX_M and the large-weight bound).
      gg bench --cuda-graph --shape 4096,16384 --shape 768,3072 --dtype fp16,bf16,w8a8,w8a16 \
        --tokens 16,32,64,128,256,512,1024 --peers eager,cublaslt --json "$OUT/medium-m.json" >"$OUT/medium-m.txt" 2>&1 || status=1
      python3 bench/probe_small_m.py >"$OUT/medium-m-paths.txt" 2>&1 || status=1
      summary+=("medium-m: see medium-m.txt; the paths, us:")
      while read -r line; do summary+=("  $line"); done <"$OUT/medium-m-paths.txt"
      ;;
    w8a8-one)
      # Session 12: w8a8 `static` and `group:G` in one launch (kernels/fused_mlp.py), not yet
      # run on a GPU: their GPU tests, every candidate config against the three launches and
      # eager (graph; bench/probe_fused_configs.py), the op (still three launches for them:
      # FUSED_W8A8_OP_SCHEMES) through the bench, and the host cost per call of each path
      # (probe_overhead.py: the op's rows and fused_w8a8_mlp's). Where the one launch leads,
      # its kinds go into FUSED_W8A8_OP_SCHEMES.
      gpu_tests w8a8-one tests/test_fused_mlp.py -k "static or group"
      for act in static group:128; do
        name=w8a8-one-${act/:/}
        { python3 bench/probe_fused_configs.py --dtype w8a8 --activations "$act" --gelu erf --shapes 768x3072 \
            --tokens 1,16,64,128 --json "$OUT/$name-768.json"
          python3 bench/probe_fused_configs.py --dtype w8a8 --activations "$act" --gelu erf --shapes 4096x16384 \
            --tokens 1,16 --json "$OUT/$name-4096.json"; } >"$OUT/$name.txt" 2>&1 || status=1
        while read -r line; do summary+=("  $line"); done < <(grep -A2 '^w8a8' "$OUT/$name.txt" | grep -v '^--')
      done
      for mode in --cuda-graph ""; do  # the op through the bench, graph then calls
        gg bench $mode --shape 4096,16384 --dtype w8a8 --activations static,group:128,dynamic --tokens 1,16 \
          --peers eager >>"$OUT/w8a8-one-bench.txt" 2>&1 || status=1
      done
      summary+=("w8a8-one: bench graph/calls in w8a8-one-bench.txt")
      python3 bench/probe_overhead.py >"$OUT/host-cost.txt" 2>&1 || status=1
      while read -r line; do summary+=("  $line"); done < <(sed -n '/^host cost per call/,/^ *$/p' "$OUT/host-cost.txt" | head -n 11)
      ;;
    ws-gelu)
      # Session 13 (bench/RESULTS.md section 21), neither yet on a GPU: (1) the GELU epilogue on
      # the special-function unit (15 instructions an element for erf, 8 for tanh; 27 and 16
      # before): the bench's float rows where section 19 measured the GELU's cost, and the w8a16
      # decode rows; (2) the warp-specialized TMA candidates (kernels/gemm.py
      # TMA_WS_CANDIDATES, 12 warps): each one's GPU test, then every large-M config alone
      # (probe_float.py --wide, the autotuner's per-config TIMING lines) next to eager and
      # cuBLASLt. A candidate that passes and leads its bucket goes into the table. (Session 13's
      # w8a8 candidates gave wrong int8 results on the GPU and were dropped: section 21.)
      gpu_tests ws tests/test_gemm.py -k "warp_specialized"
      {
        gg bench --cuda-graph --shape 768,3072 --dtype fp16,bf16 --tokens 256,512,1024 --peers eager,cublaslt
        gg bench --cuda-graph --shape 768,3072 --dtype fp16 --gelu tanh --tokens 512,1024 --peers eager,cublaslt
        gg bench --cuda-graph --shape 4096,16384 --dtype fp16,bf16 --tokens 2048,8192 --peers eager,cublaslt
        gg bench --cuda-graph --shape 4096,16384 --dtype fp16 --gelu tanh --tokens 2048 --peers eager,cublaslt
        gg bench --cuda-graph --shape 4096,16384 --dtype w8a16 --tokens 1,16 --peers eager
      } >"$OUT/ws-gelu-bench.txt" 2>&1 || status=1
      python3 bench/probe_float.py --wide --dtype fp16,bf16 --shapes 4096x16384 --tokens 2048,8192 \
        --json "$OUT/ws-probe-float.json" >"$OUT/ws-probe-float.txt" 2>&1 || status=1
      summary+=("ws-gelu: see ws-gelu-bench.txt; per-config large-M float timings (TIMING lines) in ws-probe-float.txt:")
      while read -r line; do summary+=("  $line"); done < <(grep -E '^(DROP|fp16|bf16) ' "$OUT/ws-probe-float.txt" | cut -c1-100)
      while read -r line; do summary+=("  $line"); done < <(grep -E 'WARP_SPECIALIZE: True' "$OUT/ws-probe-float.txt" | sed -E 's/BLOCK_|GROUP_M: 8, |num_ctas: 1, |, maxnreg: None//g' | cut -c1-120 | head -32)
      ;;
    small-gemms)
      # Issue 16's 768x3072 rows from 256 to 1024, where the one launch trails eager (0.72-0.89x,
      # bench/RESULTS.md section 19): each GEMM alone, every candidate tile config against
      # cuBLAS (bench/probe_medium_m.py), to tell a slow GEMM main loop from the one launch's
      # GEMM2 waiting on GEMM1.
      python3 bench/probe_medium_m.py --d 768 --f 3072 --tokens 256,512,1024 --kinds fp16,w8a8 \
        --json "$OUT/small-gemms.json" >"$OUT/small-gemms.txt" 2>&1 || status=1
      # Session 13: one matmul body with descriptors made on the device, on the host, and with
      # pointer loads (bench/probe_descriptors.py): the device-side descriptors' fixed cost
      python3 bench/probe_descriptors.py >"$OUT/descriptors.txt" 2>&1 || status=1
      summary+=("small-gemms: see small-gemms.txt; descriptors (us, graph):")
      while read -r line; do summary+=("  $line"); done < <(sed -n '/^ *K  *N  *M/,$p' "$OUT/descriptors.txt")
      ;;
    fused)
      # Issue 16's small model: the one-launch MLP (kernels/fused_mlp.py) against the two
      # GEMM launches and eager, graph and calls (bench/probe_fused.py); then the op through
      # `gelugemm bench` at 768x3072 in both modes, and the host cost at 4096x16384, M <= 16
      # (calls against graph, every dtype).
      python3 bench/probe_fused.py >"$OUT/fused-probe.txt" 2>&1 || status=1
      gg bench --cuda-graph --shape 768,3072 --dtype fp16,bf16 --tokens 1,16,32,64,128 --peers eager,cublaslt \
        >"$OUT/fused-graph.txt" 2>&1 || status=1
      gg bench --shape 768,3072 --dtype fp16,bf16 --tokens 1,16,32,64,128 --peers eager,cublaslt \
        >"$OUT/fused-calls.txt" 2>&1 || status=1
      for mode in --cuda-graph ""; do
        gg bench $mode --shape 4096,16384 --dtype fp16,bf16,w8a8,w8a16 --tokens 1,16 --peers eager \
          >>"$OUT/host-cost.txt" 2>&1 || status=1
      done
      summary+=("fused: see fused-graph.txt, fused-calls.txt, host-cost.txt; the probe, us:")
      while read -r line; do summary+=("  $line"); done <"$OUT/fused-probe.txt"
      ;;
    fused-w8a8)
      # Issue 16's w8a8 host cost: the one-launch w8a8 `dynamic` MLP (kernels/fused_mlp.py's
      # fused_w8a8_mlp) on the GPU tests, the probe against its four launches and fp16 eager
      # (graph and calls), then the op through `gelugemm bench` in both modes.
      gpu_tests fused-w8a8 tests/test_fused_mlp.py tests/test_cuda_graph.py
      python3 bench/probe_fused.py --dtype w8a8 --shapes 768x3072 --tokens 1,16,32,64,128 \
        >"$OUT/fused-w8a8-probe.txt" 2>&1 || status=1
      python3 bench/probe_fused.py --dtype w8a8 --shapes 4096x16384 --tokens 1,16 | tail -n +2 \
        >>"$OUT/fused-w8a8-probe.txt" 2>&1 || status=1
      for mode in --cuda-graph ""; do
        gg bench $mode --shape 4096,16384 --dtype w8a8 --activations dynamic --tokens 1,16 --peers eager \
          >>"$OUT/fused-w8a8-host-cost.txt" 2>&1 || status=1
        gg bench $mode --shape 768,3072 --dtype w8a8 --activations dynamic --tokens 1,16,64,128 --peers eager \
          >>"$OUT/fused-w8a8-768.txt" 2>&1 || status=1
      done
      summary+=("fused-w8a8: see fused-w8a8-host-cost.txt, fused-w8a8-768.txt; the probe, us:")
      while read -r line; do summary+=("  $line"); done <"$OUT/fused-w8a8-probe.txt"
      ;;
    fused-medium)
      # Issue 16 after the sweep: the one-launch float MLP up to 1024 rows on small models and
      # w8a16 in one launch (small models up to 128 rows, 4096x16384 decode): their GPU tests
      # with the op's and CUDA graphs', then the op through `gelugemm bench`, graph and calls.
      gpu_tests fused-medium tests/test_fused_mlp.py tests/test_cuda_graph.py tests/test_op_int8.py tests/test_w8a16.py
      # (graph, then calls, in each file: a device call brings back few files)
      for mode in --cuda-graph ""; do
        gg bench $mode --shape 768,3072 --shape 384,1536 --dtype fp16,bf16 --tokens 256,512,1024 --peers eager,cublaslt \
          >>"$OUT/fused-medium-float.txt" 2>&1 || status=1
        gg bench $mode --shape 768,3072 --dtype w8a16 --tokens 1,16,64,128 --peers eager >>"$OUT/fused-medium-w8a16.txt" 2>&1 || status=1
        gg bench $mode --shape 4096,16384 --dtype w8a16,w8a8 --activations dynamic --tokens 1,2,16 --peers eager \
          >>"$OUT/fused-medium-decode.txt" 2>&1 || status=1
      done
      summary+=("fused-medium: see fused-medium-float.txt, fused-medium-w8a16.txt, fused-medium-decode.txt")
      ;;
    fused-final)
      # Issue 16, session 10's last check: the pinned one-launch configs (one per row bucket)
      # on the GPU tests of the one launch, the op, CUDA graphs and w8a16; the op through
      # `gelugemm bench` (graph) at 768x3072 float and w8a16; the 4096x16384 int8 decode rows
      # with tanh (the bench's default is erf) and the probe with erf, to place the bench's
      # slower M=1 w8a8 row.
      gpu_tests fused-final tests/test_fused_mlp.py tests/test_cuda_graph.py tests/test_op_int8.py tests/test_w8a16.py \
        tests/test_op.py
      {
        gg bench --cuda-graph --shape 768,3072 --dtype fp16 --tokens 128,256,512,1024 --peers eager,cublaslt
        gg bench --cuda-graph --shape 768,3072 --dtype w8a16 --tokens 64,128 --peers eager
        gg bench --cuda-graph --shape 4096,16384 --dtype w8a16,w8a8 --activations dynamic --gelu tanh --tokens 1,2,16 --peers eager
        python3 bench/probe_fused.py --dtype w8a8 --gelu erf --shapes 4096x16384 --tokens 1,2,16
      } >"$OUT/final-bench.txt" 2>&1 || status=1
      summary+=("fused-final: see final-bench.txt")
      while read -r line; do summary+=("  $line"); done < <(grep -E '^ *4096x16384 ' "$OUT/final-bench.txt")
      ;;
    gelu-erf)
      # Issue 16, session 11: the erf GELU written from tl.exp instead of libdevice's erf, which
      # made ptxas spill the pinned w8a16 decode config and the 1024-row float one launch
      # (bench/fused_resources.py). The bench's default GELU is erf: w8a16/w8a8 decode (graph,
      # then calls twice for the host cost), 768x3072 float at medium M, 4096x16384 fp16 at
      # large M; then the w8a16 one launch's candidates at 4096x16384 from 32 to 128 rows.
      {
        gg bench --cuda-graph --shape 4096,16384 --dtype w8a16,w8a8 --tokens 1,2,16 --peers eager
        gg bench --cuda-graph --shape 4096,16384 --dtype w8a16 --gelu tanh --tokens 1,16 --peers eager
        gg bench --cuda-graph --shape 768,3072 --dtype fp16,bf16 --tokens 128,256,512,1024 --peers eager,cublaslt
        gg bench --cuda-graph --shape 4096,16384 --dtype fp16 --tokens 2048,8192 --peers eager,cublaslt
      } >"$OUT/erf-bench.txt" 2>&1 || status=1
      for run in 1 2; do
        gg bench --shape 4096,16384 --dtype w8a16 --tokens 1,16 --peers eager >>"$OUT/erf-host-cost.txt" 2>&1 || status=1
      done
      python3 bench/probe_fused_configs.py --dtype w8a16 --gelu erf --shapes 4096x16384 --tokens 32,64,128 \
        --json "$OUT/sweep-w8a16-mid.json" >"$OUT/sweep-w8a16-mid.txt" 2>&1 || status=1
      summary+=("gelu-erf: see erf-bench.txt, erf-host-cost.txt, sweep-w8a16-mid.txt")
      ;;
    w8a16-rows)
      # Issue 16, session 11: w8a16 group:128 at 4096x16384 through `gelugemm bench` (erf) from
      # decode to 128 rows, the one launch now taking up to 64 rows, in GPU time (graph) and
      # called from Python, against fp16 eager and the dequantize-then-fp16 peer.
      {
        gg bench --cuda-graph --shape 4096,16384 --dtype w8a16 --tokens 1,16,32,64,128 --peers eager,dequant
        gg bench --shape 4096,16384 --dtype w8a16 --tokens 1,16,32,64 --peers eager
      } >"$OUT/w8a16-rows.txt" 2>&1 || status=1
      summary+=("w8a16-rows: see w8a16-rows.txt")
      ;;
    host-cost)
      # The host's time per call, where the GPU waits on it (768x3072, M=1): torch eager's three
      # ops against the op for each dtype and scheme, and the launchers under it
      # (bench/probe_overhead.py; its cProfile of the fp16 op follows the table in the file).
      python3 bench/probe_overhead.py >"$OUT/host-cost.txt" 2>&1 || status=1
      summary+=("host-cost: us a call (bench/probe_overhead.py, see host-cost.txt)")
      while read -r line; do summary+=("  $line"); done < <(sed -n '/^host cost per call/,/^ *$/p' "$OUT/host-cost.txt" | head -n 9)
      ;;
    tables)
      # Session 11 removed the configs that no dtype can launch (more shared memory than sm_90
      # gives: the autotuner skipped them, bench/compile_check.py refuses them): the GPU tests of
      # the float and gated GEMMs, whose tables lost them.
      gpu_tests tables tests/test_gemm.py tests/test_gated.py
      ;;
    fused-sweep)
      # Issue 16's medium rows on small models and the one-launch w8a16: every candidate config
      # of the one-launch MLP forced alone (bench/probe_fused_configs.py), fp16 from 256 rows,
      # w8a8 from 64, w8a16 (group:128) from 1, against the op's other path and eager; then
      # the 4096x16384 w8a8 decode rows through the probe and `gelugemm bench` (M = 1, 2, 16).
      sweep() { python3 bench/probe_fused_configs.py "$@" >>"$OUT/sweep.txt" 2>&1 || status=1; }
      sweep --dtype fp16 --shapes 768x3072 --tokens 256,512,1024 --json "$OUT/sweep-fp16.json"
      sweep --dtype w8a8 --shapes 768x3072 --tokens 64,128,256 --json "$OUT/sweep-w8a8.json"
      sweep --dtype fp16 --shapes 384x1536,1024x4096 --tokens 256,1024 --json "$OUT/sweep-fp16-other.json"
      sweep --dtype w8a16 --shapes 768x3072,384x1536 --tokens 1,16,64,128 --json "$OUT/sweep-w8a16.json"
      sweep --dtype w8a16 --shapes 4096x16384 --tokens 1,16 --json "$OUT/sweep-w8a16-large.json"
      python3 bench/probe_fused.py --dtype w8a8 --shapes 4096x16384 --tokens 1,2,16 >"$OUT/fused-w8a8-probe.txt" 2>&1 || status=1
      gg bench --cuda-graph --shape 4096,16384 --dtype w8a8 --activations dynamic --tokens 1,2,16 --peers eager \
        >"$OUT/fused-w8a8-host-cost.txt" 2>&1 || status=1
      summary+=("fused-sweep: see sweep.txt; the leaders:")
      while read -r line; do summary+=("  $line"); done < <(grep -A2 -E '^(fp16|bf16|w8a8|w8a16) ' "$OUT/sweep.txt" | grep -v '^--')
      while read -r line; do summary+=("  $line"); done < <(grep -E 'FAILED|WRONG|Error' "$OUT/sweep.txt" | head -5)
      summary+=("w8a8 4096x16384 decode, probe (graph | calls):")
      while read -r line; do summary+=("  $line"); done <"$OUT/fused-w8a8-probe.txt"
      while read -r line; do summary+=("  $line"); done < <(grep -E '│ +(4096|  )' "$OUT/fused-w8a8-host-cost.txt" | grep -E 'gelugemm|eager' | cut -c1-80)
      ;;
    w8a8-route)
      # Session 14: the op sends w8a8 static (and group:G for small weights) to the one launch,
      # and GEMM1's "large" table holds a warp-specialized config: the GPU tests of both, the op
      # through the bench (graph, then calls) at the rows that moved, the host cost per call,
      # and the float rows at 4096x16384 (graph).
      gpu_tests w8a8-route tests/test_op_int8.py tests/test_cuda_graph.py tests/test_fused_mlp.py \
        -k "op and (static or group)"
      gpu_tests gemm-large tests/test_gemm.py -k "warp or large"
      for mode in --cuda-graph ""; do
        gg bench $mode --shape 768,3072 --dtype w8a8 --activations static,group:128 --tokens 1,16,64,128 \
          --peers eager >>"$OUT/w8a8-route-bench.txt" 2>&1 || status=1
        gg bench $mode --shape 4096,16384 --dtype w8a8 --activations static,group:128 --tokens 1,16 \
          --peers eager >>"$OUT/w8a8-route-bench.txt" 2>&1 || status=1
      done
      python3 bench/probe_overhead.py >"$OUT/host-cost.txt" 2>&1 || status=1
      while read -r line; do summary+=("  $line"); done < <(sed -n '/^host cost per call/,/^ *$/p' "$OUT/host-cost.txt" | head -n 11)
      gg bench --cuda-graph --shape 4096,16384 --dtype fp16,bf16 --tokens 2048,8192 --peers eager,cublaslt \
        >"$OUT/w8a8-route-float.txt" 2>&1 || status=1
      summary+=("w8a8-route: bench in w8a8-route-bench.txt, float rows in w8a8-route-float.txt")
      ;;
    host-desc)
      # Session 14: the TMA GEMM with descriptors made on the host (GELUGEMM_HOST_DESCRIPTORS=1,
      # off by default): its tests on the GPU (the second call of each signature is a direct
      # launch), the host cost per call, and the op's GPU time with and without them where
      # the TMA GEMM runs (768x3072 from 1025 rows, 4096x16384 from 65).
      GELUGEMM_HOST_DESCRIPTORS=1 python3 -m pytest -q -rf -p no:cacheprovider -n 8 tests/test_host_descriptors.py \
        tests/test_gemm.py -k "tma or real or repeated or split" >"$OUT/host-desc-tests.log" 2>&1 || status=1
      summary+=("host-desc tests: $(tail -n 1 "$OUT/host-desc-tests.log")")
      for flag in 0 1; do
        GELUGEMM_HOST_DESCRIPTORS=$flag python3 bench/probe_overhead.py >"$OUT/host-cost-desc$flag.txt" 2>&1 || status=1
        GELUGEMM_HOST_DESCRIPTORS=$flag gg bench --cuda-graph --shape 768,3072 --dtype fp16,bf16 --tokens 2048,4096 \
          --peers eager,cublaslt >"$OUT/host-desc$flag-768.txt" 2>&1 || status=1
        GELUGEMM_HOST_DESCRIPTORS=$flag gg bench --cuda-graph --shape 4096,16384 --dtype fp16,w8a8 \
          --tokens 128,512,2048 --peers eager >"$OUT/host-desc$flag-4096.txt" 2>&1 || status=1
      done
      summary+=("host-desc: bench rows in host-desc{0,1}-*.txt, host cost in host-cost-desc{0,1}.txt")
      ;;
    ncu)
      # Issue 16's profile (session 14): Nsight Compute's counters for gelugemm's GEMMs next to
      # cuBLAS's at the rows where a target is missed (bench/profile_ncu.py). The clocks are
      # left alone (--clock-control none, METHOD.md); the full report is kept as CSV.
      NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
      for dt in fp16 bf16; do
        rep="$OUT/ncu-$dt"
        timeout 240 "$NCU" --profile-from-start off --clock-control none --target-processes all \
          --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
          --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --export "$rep" --force-overwrite \
          python3 bench/profile_ncu.py --dtype $dt --shapes 4096x16384,768x3072 --tokens 2048,1024 \
          >"$rep.log" 2>&1 || status=1
        "$NCU" --import "$rep.ncu-rep" --csv --page raw >"$rep.csv" 2>>"$rep.log" || status=1
        python3 bench/profile_ncu.py --parse "$rep.csv" >"$rep.txt" 2>&1 || status=1
        summary+=("ncu $dt (grep CASE $rep.log for the launch order):")
        while read -r line; do summary+=("  $line"); done <"$rep.txt"
      done
      ;;
    tp)
      # Issue 18 on every GPU of this host (two or more): BLOOM-176B's MLP split across them
      # against one GPU and eager TP (bench/probe_tp.py; NVLink multicast off).
      gpus=$(nvidia-smi -L | wc -l)
      if [[ $gpus -lt 2 ]]; then
        summary+=("tp: skipped, this host has $gpus GPU (use a two-GPU machine kind)")
      else
        NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node "$gpus" bench/probe_tp.py --shape 14336,57344 --tokens 2048,8192 \
          --dtype fp16,w8a8,w8a8-static >"$OUT/tp.txt" 2>&1 || status=1
        while read -r line; do summary+=("  $line"); done < <(grep -E '^ *(dtype|fp16|w8a8)' "$OUT/tp.txt")
      fi
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
  summary+=("  ($stage took $((SECONDS - t0)) s)")
done

# A device session brings back a few files: GPU_CHECK_PACK=FILE.tgz packs every log and
# JSON under $OUT into one (quantized checkpoints left out).
if [[ -n ${GPU_CHECK_PACK:-} ]]; then
  tar czf "$GPU_CHECK_PACK" -C "$OUT" --exclude='*.safetensors' . || status=1
fi

echo "== summary"
cat "$OUT/env.txt"
printf '%s\n' "${summary[@]}"
exit $status
