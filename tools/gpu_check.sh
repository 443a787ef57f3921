#!/usr/bin/env bash
# Everything a lent GPU machine is used for, in one command: build with CUDA, the CUDA tests, compute-sanitizer
# over tools/cuda_smoke.py, and the CUDA benchmark. Logs go to $OUT (or ./gpu_out). Each step has its own time
# limit so that one slow step cannot eat the others' time.
#   bash tools/gpu_check.sh [build] [tests] [slow] [sanitize] [bench]    (default: all but slow)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
steps="${*:-build tests sanitize bench}"
t0=$SECONDS
run() {  # run NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name (t=$((SECONDS - t0))s, limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name rc=$rc"
}
nvidia-smi -L
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
if [[ " $steps " == *" build "* ]]; then
  # The compiler on PATH (GPU_CC/GPU_CXX to choose), not an inherited CC/CXX: one such wrapper linked libstdc++
  # statically into _C.so, whose private copy of the iostreams then crashed formatting any error message.
  run build 300 env CC="${GPU_CC:-$(command -v gcc)}" CXX="${GPU_CXX:-$(command -v g++)}" FORCE_CUDA=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
  if ! ldd torch_convt/_C.so | grep -q "libstdc++"; then
    echo "ERROR: torch_convt/_C.so does not load libstdc++.so dynamically (static libstdc++?): error messages crash"
    exit 1
  fi
fi
if [[ " $steps " == *" tests "* ]]; then
  run tests "${TESTS_LIMIT:-300}" "$PY" -m pytest tests -m "cuda and not slow" -q --maxfail="${MAXFAIL:-100}" \
    -p no:cacheprovider -n "${WORKERS:-8}" --timeout 240
fi
if [[ " $steps " == *" slow "* ]]; then
  run slow "${SLOW_LIMIT:-400}" "$PY" -m pytest tests -m "cuda and slow" -q -p no:cacheprovider --timeout 380
fi
if [[ " $steps " == *" sanitize "* ]]; then
  for tool in memcheck racecheck initcheck synccheck; do
    run "sanitizer_$tool" 120 compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" tools/cuda_smoke.py
  done
fi
if [[ " $steps " == *" bench "* ]]; then
  run bench "${BENCH_LIMIT:-200}" "$PY" -m torch_convt.bench --device cuda --quick --json "$OUT/bench_cuda.json"
fi
echo "=== done in $((SECONDS - t0))s"
