#!/usr/bin/env bash
# The first thing to run on a CUDA machine (under 8 minutes, every stage with its own timeout):
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (or OUT=DIR bash ...; default benchmarks/results/gpu)
#
#   1. env    the GPU (nvidia-smi), Python, torch, CUDA, Triton                         <= 20 + 90 s
#   2. tests  the compiled Triton kernels against the naive spec (tests/test_triton_gpu.py,
#             tests/test_triton.py; fp32, fp16, bf16, fwd and bwd), pytest-xdist if there   <= 210 s
#   3. bench  Triton paper mode vs SDPA flash, causal, bf16, fwd+bwd time and peak memory,
#             L = 2048, 8192, 16384, D = 64 then 128 (benchmarks/triton_gpu.py)          <= 240 s
#   4. report the markdown table (GPU named) to benchmarks/results/<gpu>/gpu_check.md and OUT_DIR  <= 25 s
#
# All of it lands in OUT_DIR, flat, in 7 files (env.txt, tests.log, tests.xml, bench.log, bench.json,
# bench.md, gpu_check.md). A stage that fails or times out is recorded and the next one still runs; the
# stages share a deadline of GPU_CHECK_TOTAL_S (440 s): tests leave the benchmark at least 170 s, and the
# benchmark gets whatever the tests left. Nothing is installed: the repository goes on PYTHONPATH, and
# torch and Triton are the machine's own (PYTHON picks the interpreter, default python3).
#
# Exit status: 0 every stage passed, or no CUDA GPU is visible to torch (it says "no CUDA GPU" and checks
# nothing); 1 a stage failed or timed out (the report says which); 4 torch does not import.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || exit 1
OUT_DIR="${1:-${OUT:-$ROOT/benchmarks/results/gpu}}" # a relative one is taken from the current folder
[ -d "$OUT_DIR" ] && made_out=0 || made_out=1
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)" || { echo "cannot create $OUT_DIR"; exit 1; }
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
unset TRITON_INTERPRET  # the compiled kernels are the point here
TOTAL_S="${GPU_CHECK_TOTAL_S:-440}"
START=$SECONDS
STAGES=()
FAILED=0

# Seconds a stage may take: its cap, or less so that RESERVE seconds stay for the stages after it.
allowed() {
  local cap=$1 reserve=$2 t
  t=$((TOTAL_S - (SECONDS - START) - reserve))
  ((t > cap)) && t=$cap
  echo "$t"
}

# stage NAME SECONDS LOG CMD...: run CMD under `timeout`, its output to LOG; record how it ended.
stage() {
  local name=$1 t=$2 log=$3 rc t0=$SECONDS
  shift 3
  if ((t < 15)); then
    STAGES+=("$name=skipped (no time left)")
    FAILED=1
    echo "[$name] skipped: no time left"
    return
  fi
  echo "[$name] (up to ${t} s) $*"
  # SIGINT first: pytest then still writes its summary and JUnit XML; KILL 15 s later if it hangs.
  timeout -s INT -k 15 "$t" "$@" >"$log" 2>&1
  rc=$?
  case $rc in
    0) STAGES+=("$name=ok ($((SECONDS - t0)) s)") ;;
    124 | 137) STAGES+=("$name=TIMED OUT after $t s") && FAILED=1 ;;
    *) STAGES+=("$name=FAILED (exit $rc, $((SECONDS - t0)) s)") && FAILED=1 ;;
  esac
  echo "[$name] ${STAGES[${#STAGES[@]} - 1]#*=}"
}

# --- 1. environment ----------------------------------------------------------------------------------
{
  echo "# nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout -k 5 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 ||
      echo "(nvidia-smi failed or timed out)"
  else
    echo "(nvidia-smi not found)"
  fi
  echo "# host: $(uname -srm), $(nproc 2>/dev/null || echo '?') CPUs; repository $(git describe --always --dirty 2>/dev/null || echo '?')"
  echo "# $PY benchmarks/gpu_check_report.py env"
} >"$OUT_DIR/env.txt"
timeout -k 5 90 "$PY" benchmarks/gpu_check_report.py env >>"$OUT_DIR/env.txt" 2>&1
env_rc=$?
cat "$OUT_DIR/env.txt"
case $env_rc in
  0) STAGES+=("env=ok ($((SECONDS - START)) s)") ;;
  3)
    echo "no CUDA GPU: torch sees none (torch.cuda.is_available() is False), so there is nothing to check here."
    if [ $# -eq 0 ] && [ -z "${OUT:-}" ] && [ "$made_out" = 1 ]; then
      rm -f "$OUT_DIR/env.txt" && rmdir "$OUT_DIR" # the default folder in the repository: leave no trace
      echo "Nothing was run. Exit 0."
    else
      echo "Nothing was run; $OUT_DIR/env.txt says what this machine has. Exit 0."
    fi
    exit 0
    ;;
  4)
    echo "torch does not import with $PY (set PYTHON=...): nothing can be checked. Exit 4."
    exit 4
    ;;
  *)
    STAGES+=("env=FAILED (exit $env_rc)")
    FAILED=1
    ;;
esac

# --- 2. GPU tests --------------------------------------------------------------------------------------
# a module that fails to import (another transformers there) must not stop the others from running
pytest_args=(-v -rfE --tb=short -p no:cacheprovider --continue-on-collection-errors --junitxml="$OUT_DIR/tests.xml")
timeout_method=signal
if "$PY" -c "import xdist" >/dev/null 2>&1; then
  # Triton compiles each kernel variant on first use, on the CPU: workers compile in parallel.
  cpus=$(nproc 2>/dev/null || echo 2)
  workers="${GPU_CHECK_WORKERS:-$((cpus > 14 ? 12 : (cpus > 3 ? cpus - 2 : 1)))}"
  pytest_args+=(-n "$workers")
  timeout_method=thread # a hung kernel blocks signals; under xdist the worker is replaced
fi
if "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
  pytest_args+=(--timeout=150 "--timeout-method=$timeout_method")
fi
rm -f "$OUT_DIR/tests.xml"
stage tests "$(allowed 210 170)" "$OUT_DIR/tests.log" \
  "$PY" -m pytest "${pytest_args[@]}" tests/test_triton_gpu.py tests/test_triton.py \
  tests/test_hf.py::test_fast_path_forward_and_generate_match_the_spec \
  tests/test_train.py::test_resume_on_a_gpu_with_dropout_equals_uninterrupted
grep -E "^(FAILED|ERROR) |^=+ .*(passed|failed|error).* =+$" "$OUT_DIR/tests.log" | tail -n 25

# --- 3. benchmark --------------------------------------------------------------------------------------
t_bench=$(allowed 240 25)
rm -f "$OUT_DIR/bench.json" "$OUT_DIR/bench.md"
stage bench "$t_bench" "$OUT_DIR/bench.log" \
  "$PY" benchmarks/triton_gpu.py --lengths 2048 8192 16384 --dims 64 128 --dtype bf16 --methods flash triton \
  --repeats 10 --out "$OUT_DIR" --name bench --budget-s "$((t_bench > 90 ? t_bench - 45 : t_bench / 2))"
tail -n 3 "$OUT_DIR/bench.log"

# --- 4. report -----------------------------------------------------------------------------------------
stage_args=()
for s in "${STAGES[@]}"; do stage_args+=(--stage "$s"); done
if ! timeout -k 5 20 "$PY" benchmarks/gpu_check_report.py report "$OUT_DIR" --md "benchmarks/results/{gpu}/gpu_check.md" \
  "${stage_args[@]}" --seconds "$((SECONDS - START))"; then
  echo "the report failed; stages: ${STAGES[*]}"
  FAILED=1
fi
echo "outputs in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
echo "gpu_check: $((SECONDS - START)) s, $([ "$FAILED" = 0 ] && echo 'every stage passed' || echo 'a stage FAILED (see above)')"
exit "$FAILED"
