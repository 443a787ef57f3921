#!/usr/bin/env bash
# Builds the operator library and its C++ API with CMake against the installed libtorch, runs the C++ tests
# (ctest: tests/cpp/test_ops, test_api), installs the package into a prefix inside the build directory, and
# builds and runs the example examples/cpp against that installed package (find_package(torch_convt)).
#
# Environment: CMAKE_BUILD_DIR (default: a new temporary directory; reuse one for incremental rebuilds),
# PYTHON (the interpreter whose torch is used), MAX_JOBS (parallel compile jobs, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
build="${CMAKE_BUILD_DIR:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
jobs="${MAX_JOBS:-2}"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_PREFIX_PATH="$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
cmake --build "$build" -j"$jobs"
ctest --test-dir "$build" --output-on-failure

# The installed package, as a downstream project sees it: only the install prefix is given; the package
# config finds Torch by itself. (No build type for the example: it compiles faster, and runs in well under
# a second either way.)
prefix="$build/install"
rm -rf "$prefix"
cmake --install "$build" --prefix "$prefix"
cmake -S examples/cpp -B "$build/example" -G Ninja -DCMAKE_PREFIX_PATH="$prefix"
cmake --build "$build/example" -j"$jobs"
"$build/example/upsample3d"
