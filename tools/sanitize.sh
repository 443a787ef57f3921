#!/usr/bin/env bash
# Builds the CPU extension with AddressSanitizer + UndefinedBehaviorSanitizer (in a scratch copy of the tracked
# files, so the normal build is untouched) and runs the test suite under them. Any report aborts the run.
#   bash tools/sanitize.sh                 # whole CPU suite (slow: ~10x the normal run time)
#   bash tools/sanitize.sh -k parity       # extra pytest arguments select a subset
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$work"
cd "$work"
echo "building with -fsanitize=address,undefined in $work"
TORCH_CONVT_SANITIZE=address,undefined MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py -q build_ext --inplace
# The sanitizer runtimes must be loaded before Python itself; leaks are Python's own business.
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
"$PY" -m pytest tests -q -x -p no:cacheprovider -m "not slow" "$@"
