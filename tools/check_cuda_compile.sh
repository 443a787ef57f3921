#!/usr/bin/env bash
# Compile-checks CUDA sources with nvcc for sm_80 and sm_90 against the installed torch's headers. Needs no
# GPU and no CUDA build of torch: the CPU wheel ships the ATen/c10 CUDA headers except the generated
# c10/cuda/impl/cuda_cmake_macros.h, for which a one-line stand-in is written into a temporary include dir.
#
# Usage: tools/check_cuda_compile.sh [file.cu ...]     (default: csrc/cuda/*.cu)
#
# Environment:
#   NVCC           nvcc to use (else $CUDA_HOME/bin/nvcc, else nvcc on PATH)
#   PYTHON         Python with torch installed (else python3, else python)
#   NVCC_FLAGS     extra nvcc flags (word-split)
#   ALLOW_NO_NVCC  1: without nvcc, print SKIP and exit 0 (default: exit 1)
#   CXX_STD        C++ standard (default c++20, as setup.py; torch 2.13's headers make nvcc warn in c++17)
# Prints one "OK <file>" / "FAIL <file>" line per file (with the compiler output on failure) and exits
# non-zero if any file fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Files given on the command line are taken relative to the caller's directory; resolve them before cd.
files=()
if (($# > 0)); then
  for f in "$@"; do
    if [[ ! -f "$f" ]]; then
      echo "check_cuda_compile: no such file: $f" >&2
      exit 2
    fi
    files+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")")
  done
fi
cd "$ROOT"
if ((${#files[@]} == 0)); then
  shopt -s nullglob
  files=(csrc/cuda/*.cu)
  shopt -u nullglob
  if ((${#files[@]} == 0)); then
    echo "check_cuda_compile: no csrc/cuda/*.cu files, nothing to check"
    exit 0
  fi
fi

# nvcc: $NVCC, $CUDA_HOME/bin/nvcc, PATH.
nvcc=""
if [[ -n "${NVCC:-}" ]]; then
  nvcc="$NVCC"
elif [[ -n "${CUDA_HOME:-}" && -x "${CUDA_HOME}/bin/nvcc" ]]; then
  nvcc="${CUDA_HOME}/bin/nvcc"
elif command -v nvcc >/dev/null 2>&1; then
  nvcc="$(command -v nvcc)"
fi
if [[ -z "$nvcc" || ! -x "$(command -v "$nvcc" 2>/dev/null || true)" ]]; then
  msg="nvcc not found (looked at \$NVCC='${NVCC:-}', \$CUDA_HOME/bin/nvcc with CUDA_HOME='${CUDA_HOME:-}', and PATH)"
  if [[ "${ALLOW_NO_NVCC:-0}" == "1" ]]; then
    echo "SKIP check_cuda_compile: $msg"
    exit 0
  fi
  echo "check_cuda_compile: $msg; set NVCC or CUDA_HOME, or ALLOW_NO_NVCC=1 to skip" >&2
  exit 1
fi

# Python with torch: include dirs and the C++ ABI torch was built with.
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  python="$(command -v python3 || command -v python || true)"
fi
if [[ -z "$python" ]] || ! torch_info="$("$python" -c '
import os, sysconfig, torch
print(os.path.join(os.path.dirname(torch.__file__), "include"))
print(sysconfig.get_paths()["include"])
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(torch.__version__)
')"; then
  echo "check_cuda_compile: cannot import torch with '${python:-python3}' (set PYTHON)" >&2
  exit 1
fi
{
  read -r torch_include
  read -r python_include
  read -r cxx11_abi
  read -r torch_version
} <<<"$torch_info"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/include/c10/cuda/impl"
# The generated header of a shared-library CUDA build of c10 (absent from CPU wheels).
echo '#define C10_CUDA_BUILD_SHARED_LIBS' >"$tmp/include/c10/cuda/impl/cuda_cmake_macros.h"

extra_flags=()
if [[ -n "${NVCC_FLAGS:-}" ]]; then
  read -r -a extra_flags <<<"$NVCC_FLAGS"
fi

flags=(
  "-std=${CXX_STD:-c++20}" -O3
  -I "$ROOT/csrc" -I "$tmp/include"
  -I "$torch_include" -I "$torch_include/torch/csrc/api/include" -I "$python_include"
  --expt-relaxed-constexpr
  -Xcompiler -fPIC
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
  "-D_GLIBCXX_USE_CXX11_ABI=$cxx11_abi"
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  ${extra_flags[@]+"${extra_flags[@]}"}
)

echo "check_cuda_compile: nvcc $("$nvcc" --version | grep -o "release [0-9.]*" || true) ($nvcc), torch $torch_version, ${CXX_STD:-c++20}, sm_80 + sm_90"
failed=0
for f in "${files[@]}"; do
  start=$SECONDS
  if "$nvcc" "${flags[@]}" -c "$f" -o "$tmp/x.o" >"$tmp/log" 2>&1; then
    echo "OK   $f ($((SECONDS - start))s)"
  else
    echo "FAIL $f ($((SECONDS - start))s)"
    sed 's/^/    /' "$tmp/log"
    failed=$((failed + 1))
  fi
done

if ((failed > 0)); then
  echo "check_cuda_compile: $failed of ${#files[@]} file(s) failed"
  exit 1
fi
echo "check_cuda_compile: all ${#files[@]} file(s) compile"
