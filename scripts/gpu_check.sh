#!/usr/bin/env bash
# Everything worth checking on a GPU machine, in one command (`make gpu-check`), without
# network access: builds kdfast against the installed CUDA torch (for this GPU's
# architecture, with the ptxas register / spill report), runs the CUDA tests,
# compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over every code path of
# every op, a bitwise determinism check and the CUDA benchmark. Every step runs even when an
# earlier one failed; the results land in benchmarks/results/<gpu>/gpu-check/ (short
# logs and gpu_check.md, the summary) and the benchmark in benchmarks/results/<gpu>/.
#
# Usage: bash scripts/gpu_check.sh [--all-tests] [--quick] [--skip STEPS] [--out DIR]
#   --all-tests     after the CUDA tests (pytest -m cuda), also run the rest of the suite
#   --quick         sanitizers on every third case, benchmark with --quick
#   --skip STEPS    comma-separated: build, tests, sanitize, determinism, bench
#   --out DIR       results folder (default benchmarks/results/<gpu-slug>, e.g. nvidia-h200)
#   PYTHON          interpreter with the CUDA torch (default python3)
#   GPU_CHECK_STEP_TIMEOUT  seconds a step may run before it is stopped (default 3600)
#   PIP_BREAK_SYSTEM_PACKAGES=1  (read by pip) when that Python is marked externally managed
# Full logs stay in build/gpu-check/. Exit status: 0 when every step passed, else 1.
set -uo pipefail  # no -e: a failing step is recorded and the next one runs
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
STEP_TIMEOUT=${GPU_CHECK_STEP_TIMEOUT:-3600}
ALL_TESTS=0 QUICK=0 SKIP="" OUT=""

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while (( $# )); do
  case $1 in
    --all-tests) ALL_TESTS=1 ;;
    --quick) QUICK=1 ;;
    --skip) SKIP=${2:?--skip needs a list}; shift ;;
    --out) OUT=${2:?--out needs a folder}; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for s in ${SKIP//,/ }; do
  case $s in build|tests|sanitize|determinism|bench) ;;
    *) echo "gpu_check: --skip: unknown step '$s' (build, tests, sanitize, determinism, bench)" >&2; exit 2 ;;
  esac
done
skipped() { [[ ",$SKIP," == *",$1,"* ]]; }

# --- the machine ---------------------------------------------------------------------
GPU_INFO=$("$PY" - <<'EOF'
import re, sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (torch.version.cuda = {torch.version.cuda})")
name = torch.cuda.get_device_name()
major, minor = torch.cuda.get_device_capability()
props = torch.cuda.get_device_properties(torch.cuda.current_device())
print(name)
print(f"{major}.{minor}")
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
print(f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
EOF
) || { echo "gpu_check: this needs a machine with a CUDA GPU and a CUDA build of torch ($PY)" >&2; exit 2; }
{ read -r GPU_NAME; read -r CC; read -r SLUG; read -r GPU_MEM; read -r TORCH_DESC; } <<<"$GPU_INFO"
DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)
NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
NVCC_VERSION=$("$NVCC" --version 2>/dev/null | grep -o 'release [^,]*' || echo "not found")
SANITIZER=""
for c in "$(command -v compute-sanitizer 2>/dev/null)" "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
         /usr/local/cuda/bin/compute-sanitizer; do
  if [[ -n $c && -x $c ]]; then SANITIZER=$c; break; fi
done
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]] && COMMIT="$COMMIT-dirty"

OUT=${OUT:-benchmarks/results/$SLUG}
CHECK=$OUT/gpu-check
LOGS=$ROOT/build/gpu-check
mkdir -p "$CHECK" "$LOGS"
rm -f "$CHECK"/*.log "$CHECK"/*.md "$LOGS"/*.log  # no stale results from an earlier run or step
TIMEOUT=()
command -v timeout >/dev/null && TIMEOUT=(timeout --kill-after=30 "$STEP_TIMEOUT")
echo "gpu_check: $GPU_NAME (sm_${CC/./}, $GPU_MEM), driver ${DRIVER:-unknown}, $TORCH_DESC, nvcc $NVCC_VERSION"
echo "gpu_check: results in $CHECK, full logs in $LOGS"

# --- step bookkeeping ----------------------------------------------------------------
NAMES=() RESULTS=() SECS=() DETAILS=()
record() { NAMES+=("$1"); RESULTS+=("$2"); SECS+=("$3"); DETAILS+=("$4"); }

# run_step NAME GROUP DETAIL_FN COMMAND...: runs COMMAND (a function or program) with its
# output in $LOGS/NAME.log; DETAIL_FN LOG prints the one-line detail for the summary.
run_step() {
  local name=$1 group=$2 detail_fn=$3 t0=$SECONDS rc=0
  shift 3
  if skipped "$group"; then
    record "$name" skipped 0 "--skip $group"
    echo "== $name: skipped =="
    return 0
  fi
  echo "== $name =="
  "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  local result=passed detail
  (( rc == 0 )) || result="FAILED (exit $rc)"
  (( rc == 124 || rc == 137 )) && result="FAILED (timed out after ${STEP_TIMEOUT} s)"
  detail=$("$detail_fn" "$LOGS/$name.log" | tr '|' '/' | paste -sd ';' - | head -c 300)
  record "$name" "$result" $((SECONDS - t0)) "$detail"
  echo "   $result in $((SECONDS - t0)) s: $detail"
  return 0
}

last_line() { grep -v '^\s*$' "$1" | tail -n 1; }
# Copies LOG into the results folder, cut to its first and last N lines when longer.
keep_log() {
  local log=$1 dest=$2 n=${3:-100} total
  total=$(wc -l < "$log")
  if (( total <= 2 * n )); then
    cp "$log" "$dest"
  else
    { head -n "$n" "$log"
      echo "... [$((total - 2 * n)) lines cut; the full log is $log on the machine that ran it] ..."
      tail -n "$n" "$log"; } > "$dest"
  fi
}

# --- a. build for this GPU and report registers / spills ------------------------------
step_build() {
  echo "KDFAST_CUDA=1 KDFAST_PTXAS_VERBOSE=1 KDFAST_CUDA_ARCHS=$CC $PY -m pip install -v --no-build-isolation --no-deps --no-index -e ."
  KDFAST_CUDA=1 KDFAST_PTXAS_VERBOSE=1 KDFAST_CUDA_ARCHS=$CC "${TIMEOUT[@]}" \
    "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . || return $?
  "$PY" -m kdfast info
}
detail_build() {
  grep -E '^(extension|with_cuda|cuda_archs) ' "$1" | tr -s ' ' '='
  grep -E 'error|externally-managed' "$1" | head -n 1
}
run_step build build detail_build step_build
keep_log "$LOGS/build.log" "$CHECK/build.log" 60

step_ptxas() {
  [[ -s $LOGS/build.log ]] || { echo "no build log (the build step was skipped)"; return 1; }
  "$PY" .ci/ptxas_report.py "$LOGS/build.log" --format markdown
}
detail_ptxas() { grep -E '^(FAIL|ok):|kernel instantiations|^no build log|^ptxas_report:' "$1"; }
run_step ptxas build detail_ptxas step_ptxas
cp "$LOGS/ptxas.log" "$CHECK/ptxas_report.md" 2>/dev/null

# --- b. tests ---------------------------------------------------------------------------
step_tests() {
  local rc=0
  "${TIMEOUT[@]}" "$PY" -m pytest -q -m cuda tests || rc=$?
  # every CUDA test skipped (no kernels, no GPU) is not a pass
  if (( rc == 0 )) && ! tail -n 3 "$LOGS/tests-cuda.log" | grep -qE '[0-9]+ passed'; then
    echo "gpu_check: no CUDA test passed (are the CUDA kernels built? see the skip reasons above)"
    return 1
  fi
  return "$rc"
}
run_step tests-cuda tests last_line step_tests
keep_log "$LOGS/tests-cuda.log" "$CHECK/pytest-cuda.log" 80
# The same tests on the streaming kernels alone (forward, then the gradient kernel),
# which otherwise serve only rows too long for the one-pass kernels' shared memory.
step_tests_streaming() { KDFAST_CUDA_STAGED=0 "${TIMEOUT[@]}" "$PY" -m pytest -q -m cuda tests; }
run_step tests-cuda-streaming tests last_line step_tests_streaming
keep_log "$LOGS/tests-cuda-streaming.log" "$CHECK/pytest-cuda-streaming.log" 80
if (( ALL_TESTS )); then
  step_tests_rest() { "${TIMEOUT[@]}" "$PY" -m pytest -q -m "not cuda" tests; }
  run_step tests-rest tests last_line step_tests_rest
  keep_log "$LOGS/tests-rest.log" "$CHECK/pytest-rest.log" 80
fi

# --- c. compute-sanitizer over every code path of every op ---------------------------------
QUICK_ARGS=()
(( QUICK )) && QUICK_ARGS=(--quick)
step_sanitize() {
  local tool=$1
  if [[ -z $SANITIZER ]]; then
    echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
    return 1
  fi
  # Without the caching allocator every tensor is its own allocation, so memcheck sees
  # an access past a tensor's end instead of landing in a neighbour in the same block.
  local rc=0
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${TIMEOUT[@]}" "$SANITIZER" --tool "$tool" --error-exitcode 1 \
    "$PY" scripts/gpu_sanitize_cases.py --device cuda -v "${QUICK_ARGS[@]}" || rc=$?
  # dkd_loss, feature_loss and attention_transfer_loss
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${TIMEOUT[@]}" "$SANITIZER" --tool "$tool" --error-exitcode 1 \
    "$PY" scripts/gpu_sanitize_ops.py --device cuda -v "${QUICK_ARGS[@]}" || rc=$?
  return $rc
}
detail_sanitize() {
  { grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$1" | tail -n 1
    grep -E '^gpu_sanitize_(cases|ops):|compute-sanitizer not found' "$1" | tail -n 2; } | paste -sd ';' -
}
step_sanitize_streaming() { (export KDFAST_CUDA_STAGED=0; step_sanitize memcheck); }
for tool in memcheck racecheck synccheck initcheck streaming; do
  if [[ $tool == streaming ]]; then  # memcheck over the streaming kernels alone
    run_step "sanitize-memcheck-streaming" sanitize detail_sanitize step_sanitize_streaming
    tool=memcheck-streaming
  else
    run_step "sanitize-$tool" sanitize detail_sanitize step_sanitize "$tool"
  fi
  # the sanitizer's reports, each with the case line printed before it, and the verdicts
  if [[ -f $LOGS/sanitize-$tool.log ]]; then
    grep -B1 -E '^(=========|FAIL |gpu_sanitize_(cases|ops):|compute-sanitizer not found)' \
      "$LOGS/sanitize-$tool.log" | head -n 400 > "$CHECK/sanitize-$tool.log"
  fi
done

# --- d. bitwise determinism ---------------------------------------------------------------
step_determinism() { "${TIMEOUT[@]}" "$PY" scripts/gpu_determinism.py --device cuda; }
run_step determinism determinism last_line step_determinism
keep_log "$LOGS/determinism.log" "$CHECK/determinism.log" 100

# --- e. the CUDA benchmark -----------------------------------------------------------------
step_bench() {
  local quick=()
  (( QUICK )) && quick=(--quick)
  "${TIMEOUT[@]}" "$PY" -m kdfast bench --op all --device cuda --out "$OUT" "${quick[@]}"
}
detail_bench() {
  local met=0 missed=0 unmeasured=0 f
  for f in "$OUT"/{kd_loss,feature_loss,attention_transfer,dkd}.md; do
    [[ -f $f ]] && grep -q '^## Targets' "$f" || continue
    met=$((met + $(grep -c '| met |' "$f"))); missed=$((missed + $(grep -c '\*\*missed\*\*' "$f")))
    unmeasured=$((unmeasured + $(grep -c '| not measured |' "$f")))
  done
  if (( met + missed + unmeasured > 0 )); then
    echo "targets: $met met, $missed missed, $unmeasured not measured (see $OUT/<op>.md)"
  else
    last_line "$1"
  fi
}
run_step bench bench detail_bench step_bench
keep_log "$LOGS/bench.log" "$CHECK/bench.log" 60

# --- f. the summary -------------------------------------------------------------------------
failed=0
{
  echo "# kdfast GPU check on $GPU_NAME"
  echo
  echo "- date: $(date -Iseconds), git $COMMIT, host $(hostname)"
  echo "- GPU: $GPU_NAME (sm_${CC/./}, $GPU_MEM), driver ${DRIVER:-unknown}"
  echo "- $TORCH_DESC, $("$PY" -c 'import platform; print("Python", platform.python_version())'), nvcc $NVCC_VERSION"
  echo "- compute-sanitizer: ${SANITIZER:-not found}"
  echo "- command: \`bash scripts/gpu_check.sh$( ((ALL_TESTS)) && echo ' --all-tests')$( ((QUICK)) && echo ' --quick')${SKIP:+ --skip $SKIP}\`"
  echo
  echo "| step | result | seconds | details |"
  echo "| --- | --- | --- | --- |"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${SECS[$i]} | ${DETAILS[$i]} |"
    [[ ${RESULTS[$i]} == FAILED* ]] && failed=$((failed + 1))
  done
  echo
  echo "Files here: build.log (head and tail of the build), ptxas_report.md (registers, stack and"
  echo "spills per kernel), pytest-*.log, sanitize-<tool>.log (the sanitizer's reports and the"
  echo "driver's verdicts), determinism.log, bench.log; the benchmark itself is in \`$OUT/\`."
} > "$CHECK/gpu_check.md"

echo
cat "$CHECK/gpu_check.md"
if (( failed )); then
  echo "gpu_check: $failed step(s) failed" >&2
  exit 1
fi
echo "gpu_check: every step passed"
