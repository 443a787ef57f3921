// GEMM on pre-packed operands and its micro-kernels (see gemm.h).
//
// The micro-kernel streams one A panel (MR x kc) and one B panel (kc x NR) and keeps an MR x NR block of C in
// registers. The driver walks B panels outermost (a B panel is reused by every A panel while it sits in L1/L2),
// splitting K into KC-deep blocks so that panel stays cache-resident. Every C element sums its K products in
// increasing k, block by block: the order depends on the shapes only, never on threads.
//
// The SIMD micro-kernels are compiled with per-function target attributes and only called after a run-time
// CPU check, so one binary runs (and is fast) on any x86-64 CPU. They use intrinsics only, no library code,
// so no AVX-512 instruction can leak into code that runs elsewhere.
#include "gemm.h"

#include <c10/util/complex.h>

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TORCH_CONVT_X86 1
#else
#define TORCH_CONVT_X86 0
#endif

namespace torch_convt::cpu {
namespace {

constexpr int64_t KC = 384;  // K block: one B panel (KC x NR floats, 48 KiB at NR 32) stays in L1/L2

template <typename T>
using MicroFn = void (*)(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, bool accumulate);

template <typename T>
struct MicroKernel {
  int64_t mr, nr;
  MicroFn<T> fn;
  const char* isa;
};

// ---- portable micro-kernel (any type; the compiler vectorises the j loop) -----------------------------------
template <typename T, int MR, int NR>
void micro_portable(int64_t kc, const T* a, const T* b, T* c, int64_t ldc, bool accumulate) {
  T acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = T(0);
  for (int64_t k = 0; k < kc; ++k, a += MR, b += NR) {
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i];
      for (int j = 0; j < NR; ++j) acc[i][j] += ai * b[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

#if TORCH_CONVT_X86
// ---- AVX-512: 12 x 32 floats of C in 24 zmm registers ---------------------------------------------------------
__attribute__((target("avx512f,fma"))) void micro_avx512(int64_t kc, const float* a, const float* b, float* c,
                                                         int64_t ldc, bool accumulate) {
  constexpr int MR = 12;
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, a += MR, b += 32) {
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);  // b advances by NR = 32
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(a[i]);
      c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
    }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      c0[i] = _mm512_add_ps(c0[i], _mm512_loadu_ps(ci));
      c1[i] = _mm512_add_ps(c1[i], _mm512_loadu_ps(ci + 16));
    }
    _mm512_storeu_ps(ci, c0[i]);
    _mm512_storeu_ps(ci + 16, c1[i]);
  }
}

// ---- AVX2 + FMA: 6 x 16 floats of C in 12 ymm registers -------------------------------------------------------
__attribute__((target("avx2,fma"))) void micro_avx2(int64_t kc, const float* a, const float* b, float* c,
                                                    int64_t ldc, bool accumulate) {
  constexpr int MR = 6;
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, a += MR, b += 16) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 ai = _mm256_broadcast_ss(a + i);
      c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);
    }
  }
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (accumulate) {
      c0[i] = _mm256_add_ps(c0[i], _mm256_loadu_ps(ci));
      c1[i] = _mm256_add_ps(c1[i], _mm256_loadu_ps(ci + 8));
    }
    _mm256_storeu_ps(ci, c0[i]);
    _mm256_storeu_ps(ci + 8, c1[i]);
  }
}
#endif

template <typename T>
MicroKernel<T> select_kernel() {
  return {4, 8, &micro_portable<T, 4, 8>, "portable"};
}

template <>
MicroKernel<float> select_kernel<float>() {
#if TORCH_CONVT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return {12, 32, &micro_avx512, "avx512"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {6, 16, &micro_avx2, "avx2"};
#endif
  return {4, 16, &micro_portable<float, 4, 16>, "portable"};
}

template <typename T>
const MicroKernel<T>& kernel() {
  static const MicroKernel<T> k = select_kernel<T>();
  return k;
}

}  // namespace

template <typename T>
GemmTile gemm_tile() {
  return {kernel<T>().mr, kernel<T>().nr};
}

template <typename T>
void gemm_packed(int64_t M, int64_t N, int64_t K, const T* a_packed, const T* b_packed, bool accumulate, T* C,
                 int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  const MicroKernel<T>& mk = kernel<T>();
  const int64_t MR = mk.mr, NR = mk.nr;
  T edge[16 * 32];  // an MR x NR block of C for ragged edges (MR <= 16, NR <= 32)
  for (int64_t jr = 0; jr < N; jr += NR) {
    const int64_t nr = std::min(NR, N - jr);
    const T* panel = b_packed + jr * K;
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = std::min(KC, K - pc);
      const bool acc = accumulate || pc > 0;
      for (int64_t ir = 0; ir < M; ir += MR) {
        const int64_t mr = std::min(MR, M - ir);
        const T* ap = a_packed + ir * K + pc * MR;
        const T* bp = panel + pc * NR;
        T* c = C + ir * ldc + jr;
        if (mr == MR && nr == NR) {
          mk.fn(kc, ap, bp, c, ldc, acc);
        } else {
          mk.fn(kc, ap, bp, edge, NR, false);
          for (int64_t i = 0; i < mr; ++i)
            for (int64_t j = 0; j < nr; ++j)
              c[i * ldc + j] = acc ? c[i * ldc + j] + edge[i * NR + j] : edge[i * NR + j];
        }
      }
    }
  }
}

const char* gemm_isa() {
  return kernel<float>().isa;
}

#define TORCH_CONVT_INSTANTIATE_GEMM(T)                                                                  \
  template GemmTile gemm_tile<T>();                                                                      \
  template void gemm_packed<T>(int64_t, int64_t, int64_t, const T*, const T*, bool, T*, int64_t);
TORCH_CONVT_INSTANTIATE_GEMM(float)
TORCH_CONVT_INSTANTIATE_GEMM(double)
TORCH_CONVT_INSTANTIATE_GEMM(c10::complex<float>)
TORCH_CONVT_INSTANTIATE_GEMM(c10::complex<double>)
TORCH_CONVT_INSTANTIATE_GEMM(int64_t)
TORCH_CONVT_INSTANTIATE_GEMM(int32_t)
TORCH_CONVT_INSTANTIATE_GEMM(int16_t)
TORCH_CONVT_INSTANTIATE_GEMM(int8_t)
TORCH_CONVT_INSTANTIATE_GEMM(uint8_t)
#undef TORCH_CONVT_INSTANTIATE_GEMM

}  // namespace torch_convt::cpu
