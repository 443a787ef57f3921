// torch_convt's own single-threaded GEMM for the CPU kernels:
//     C[M x N] (row-major, ldc)  =  A[M x K] . B[K x N]  (+ C if accumulate)
// A and B are addressed by (row, column) element strides, so transposed operands cost nothing extra.
//
// Why our own: the convolution kernels call it from inside their own parallel loops, and need (1) no nested
// threading, (2) a summation order fixed by the shapes alone, so results are bitwise identical for any thread
// count, and (3) speed on CPUs where vendor BLAS is weak. It is a cache-blocked (BLIS-style) driver around a
// register-blocked micro-kernel chosen at run time (AVX-512, AVX2+FMA, or portable C++); the build never
// assumes the build machine's CPU.
#pragma once

#include <cstdint>

namespace torch_convt::cpu {

// Instantiated for float, double, c10::complex<float/double> and the integer types (gemm.cpp).
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t b_row,
          int64_t b_col, bool accumulate, T* C, int64_t ldc);

// The float micro-kernel in use: "avx512", "avx2" or "portable".
const char* gemm_isa();

}  // namespace torch_convt::cpu
