#!/usr/bin/env bash
# Everything a lent GPU machine (one H100/H200, 16 cores) must run, in one script of under
# 8 minutes there:
#
#   1. environment  nvcc, torch (a CUDA build?), the GPU, medad_fast's build info
#   2. build        the extension with its CUDA kernels (setup.py build_ext --inplace,
#                   MAX_JOBS = all cores, TORCH_CUDA_ARCH_LIST = this GPU's architecture);
#                   build-info checks that the CUDA kernels were built and load
#                   -- or, where torch has no CUDA but nvcc is found, `make cuda-check`
#                   (every .cu file compiles with nvcc alone)
#   3. cuda-tests   tests/test_ops_cuda.py and every other CUDA-marked test (pytest -m cuda;
#                   `@requires_cuda` of tests/conftest.py marks them)
#   4. cuda-ops     the CUDA op benchmarks (benchmarks/report.py -k "cuda and not paper_amp"):
#                   times, GB/s and % of the device's copy rate -> cuda-ops.md
#   5. train-step   each method's paper-preset training step with AMP + channels_last,
#                   images/s (benchmarks/report.py -k "paper_amp and cuda") -> train-step.md
#
# Every step logs to OUT/NN-step.log; a summary closes the output (and OUT/summary.txt).
# A step that cannot run on this machine is SKIPPED with a one-line reason. Exit status:
# 0 when every step that ran passed (also when all were skipped), 1 when one failed.
#
#   scripts/gpu_check.sh              # OUT defaults to ./gpu_check_out
#   OUT=/tmp/gpu scripts/gpu_check.sh
#   scripts/gpu_check.sh --dry-run    # checks and skips only; prints what would run
#
# Environment: PYTHON (default .venv/bin/python, else python3), OUT, MAX_JOBS (default: all
# cores), TORCH_CUDA_ARCH_LIST (default: the GPU's), MEDAD_BENCH_BUDGET_S (seconds of
# timing per benchmark, default 0.5 here), GPU_CHECK_DRY_RUN=1 (same as --dry-run).

set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,27p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown argument $arg (--dry-run, --help)" >&2; exit 2 ;;
  esac
done
[ "$DRY_RUN" = 0 ] || DRY_RUN=1

OUT=${OUT:-$REPO/gpu_check_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
# the extension built here (in place) wins over any installed medad_fast
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export MEDAD_BENCH_BUDGET_S=${MEDAD_BENCH_BUDGET_S:-0.5}
# nproc obeys OMP_NUM_THREADS; the build wants every core
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
SUMMARY=()
FAILED=0
STEP_NO=0
START=$SECONDS

say() { echo "gpu_check: $*"; }

# skip NAME REASON
skip() {
  STEP_NO=$((STEP_NO + 1))
  local line
  line=$(printf 'SKIPPED  %-12s %s' "$1" "$2")
  echo "$line"
  SUMMARY+=("$line")
}

# run NAME COMMAND...: the command's output goes to OUT/NN-NAME.log; PASS or FAIL
run() {
  local name=$1; shift
  STEP_NO=$((STEP_NO + 1))
  local log
  log=$OUT/$(printf '%02d' "$STEP_NO")-$name.log
  if [ "$DRY_RUN" = 1 ]; then
    local line
    line=$(printf 'DRY-RUN  %-12s would run: %s' "$name" "$*")
    echo "$line"
    SUMMARY+=("$line")
    return 0
  fi
  say "step $STEP_NO: $name: $* (log: $log)"
  local began=$SECONDS status
  { echo "\$ $*"; "$@"; } >"$log" 2>&1
  status=$?
  local line
  if [ $status = 0 ]; then
    line=$(printf 'PASS     %-12s %4d s  %s' "$name" $((SECONDS - began)) "$log")
  else
    line=$(printf 'FAIL     %-12s %4d s  %s (exit status %d; last lines below)' "$name" $((SECONDS - began)) \
           "$log" $status)
    FAILED=1
  fi
  echo "$line"
  [ $status = 0 ] || tail -n 15 "$log" | sed 's/^/    | /'
  SUMMARY+=("$line")
  return $status
}

# ------------------------------------------------------------------ 1. environment
HAVE_NVCC=0; HAVE_CUDA_TORCH=0; HAVE_GPU=0; GPU_ARCH=""
command -v nvcc >/dev/null 2>&1 && HAVE_NVCC=1
ENV_LOG=$OUT/01-environment.log
STEP_NO=1
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')  host: $(hostname)  cores: $CORES"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) on $(git rev-parse --abbrev-ref HEAD 2>/dev/null)"
  echo "python: $PYTHON"
  if [ $HAVE_NVCC = 1 ]; then echo "nvcc: $(command -v nvcc)"; nvcc --version | tail -n 2; else echo "nvcc: not found"; fi
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
} >"$ENV_LOG" 2>&1
# one line: <torch version> <torch CUDA or None> <cuda available 0/1> <arch as 9.0 or ->
PROBE=$("$PYTHON" -c '
import torch
gpu = torch.cuda.is_available()
arch = "%d.%d" % torch.cuda.get_device_capability(0) if gpu else "-"
try:  # an extension with CUDA kernels already built (or installed) here
    import medad_fast
    built = int(medad_fast.build_info()["cuda_kernels_built"])
except Exception:
    built = 0
print(torch.__version__, torch.version.cuda, int(gpu), arch, built)
print("GPU:", torch.cuda.get_device_name(0) if gpu else "none")
' 2>>"$ENV_LOG")
PROBE_STATUS=$?
echo "torch version, torch CUDA, CUDA available, GPU architecture, medad_fast CUDA kernels built: $PROBE" >>"$ENV_LOG"
if [ $PROBE_STATUS != 0 ]; then
  line=$(printf 'FAIL     %-12s %s cannot import torch (log: %s)' environment "$PYTHON" "$ENV_LOG")
  echo "$line"; tail -n 5 "$ENV_LOG" | sed 's/^/    | /'
  SUMMARY+=("$line"); FAILED=1
else
  read -r TORCH_VERSION TORCH_CUDA GPU_FLAG GPU_ARCH CUDA_EXT <<<"$(head -n 1 <<<"$PROBE")"
  [ "$TORCH_CUDA" != None ] && HAVE_CUDA_TORCH=1
  [ "$GPU_FLAG" = 1 ] && HAVE_GPU=1
  line=$(printf 'PASS     %-12s torch %s (CUDA %s), %s, nvcc %s  %s' environment "$TORCH_VERSION" "$TORCH_CUDA" \
         "$(tail -n 1 <<<"$PROBE")" "$([ $HAVE_NVCC = 1 ] && echo found || echo 'not found')" "$ENV_LOG")
  echo "$line"; SUMMARY+=("$line")
fi

NO_GPU_REASON=""
if [ $PROBE_STATUS != 0 ]; then NO_GPU_REASON="torch does not import (see the environment step)"
elif [ $HAVE_CUDA_TORCH = 0 ]; then NO_GPU_REASON="torch $TORCH_VERSION is a CPU-only build (torch.version.cuda is None)"
elif [ $HAVE_GPU = 0 ]; then NO_GPU_REASON="no CUDA device (torch.cuda.is_available() is False)"
fi

# ------------------------------------------------------------------ 2. build
BUILT=0
if [ $PROBE_STATUS != 0 ]; then
  skip build "$NO_GPU_REASON"
elif [ $HAVE_NVCC = 0 ]; then
  skip build "nvcc not found on PATH: the CUDA kernels cannot be compiled"
  # an extension built (or installed) earlier with CUDA kernels can still be tested
  [ "${CUDA_EXT:-0}" = 1 ] && BUILT=1 && echo "         (the medad_fast found here has CUDA kernels: testing that one)"
elif [ $HAVE_CUDA_TORCH = 0 ]; then
  skip build "$NO_GPU_REASON: no CUDA torch to build the extension's CUDA kernels against"
  # nvcc alone can still check that every .cu file compiles
  run cuda-check make cuda-check || true
else
  # one architecture (this GPU's) builds in a fraction of the time of torch's default list
  arch_list=${TORCH_CUDA_ARCH_LIST:-}
  if [ -z "$arch_list" ]; then
    if [ "$GPU_ARCH" != - ]; then arch_list=$GPU_ARCH; else arch_list="8.0;9.0"; fi
  fi
  run build env FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$CORES}" TORCH_CUDA_ARCH_LIST="$arch_list" \
    "$PYTHON" setup.py build_ext --inplace &&
  run build-info "$PYTHON" -c 'import json, medad_fast; info = medad_fast.build_info(); print(json.dumps(info, indent=2))
assert info["extension_loaded"] and info["cuda_kernels_built"], "the extension was built without CUDA kernels"' &&
  BUILT=1
fi

# ------------------------------------------------------------------ 3-5. on the GPU
gpu_step() {  # gpu_step NAME COMMAND...: runs only with a GPU and a CUDA build of the extension
  local name=$1; shift
  if [ -n "$NO_GPU_REASON" ]; then skip "$name" "$NO_GPU_REASON"
  elif [ $BUILT = 0 ] && [ "$DRY_RUN" = 0 ]; then
    skip "$name" "no medad_fast with CUDA kernels (step build $([ $HAVE_NVCC = 0 ] && echo 'skipped: no nvcc' || echo failed))"
  else run "$name" "$@"
  fi
}
# the test files with CUDA-marked tests (collecting only them: the others may import test-only
# packages this machine lacks)
mapfile -t CUDA_TEST_FILES < <(grep -l -E 'requires_cuda|mark\.cuda' tests/test_*.py)
gpu_step cuda-tests "$PYTHON" -m pytest "${CUDA_TEST_FILES[@]}" -m cuda -q -rs -p no:cacheprovider
gpu_step cuda-ops "$PYTHON" benchmarks/report.py -k "cuda and not paper_amp" --threads 2 \
  --out "$OUT/cuda-ops.md" --json-dir "$OUT/cuda-ops-json"
gpu_step train-step "$PYTHON" benchmarks/report.py -k "paper_amp and cuda" --threads 2 \
  --out "$OUT/train-step.md" --json-dir "$OUT/train-step-json"

# ------------------------------------------------------------------ summary
{
  echo
  echo "gpu_check summary ($((SECONDS - START)) s; figures and logs in $OUT)$([ $DRY_RUN = 1 ] && echo '; dry run')"
  printf '  %s\n' "${SUMMARY[@]}"
  if [ $FAILED = 1 ]; then echo "gpu_check: FAILED (a step that ran failed)"
  else echo "gpu_check: OK (every step that could run here passed)"
  fi
} | tee "$OUT/summary.txt"
exit $FAILED
