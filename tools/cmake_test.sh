#!/usr/bin/env bash
# Builds the operator library with CMake against the installed libtorch and runs the C++ test (ctest).
set -euo pipefail
cd "$(dirname "$0")/.."
build="${CMAKE_BUILD_DIR:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
cmake --build "$build" -j"${MAX_JOBS:-2}"
ctest --test-dir "$build" --output-on-failure
