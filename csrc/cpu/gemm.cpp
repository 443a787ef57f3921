// Cache-blocked GEMM driver and its micro-kernels (see gemm.h).
//
// Blocking: B is packed per (KC x NC) block into NR-wide panels, A per (MC x KC) block into MR-high panels,
// both zero-padded to whole panels; the micro-kernel then streams one A panel and one B panel and keeps an
// MR x NR block of C in registers. Every C element sums its K products in increasing k, block by block: the
// order depends on the shapes only.
//
// The SIMD micro-kernels are compiled with per-function target attributes and only called after a run-time
// CPU check, so one binary runs (and is fast) on any x86-64 CPU. They use intrinsics only, no library code,
// so no AVX-512 instruction can leak into code that runs elsewhere.
#include "gemm.h"

#include <c10/util/complex.h>

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TORCH_CONVT_X86 1
#else
#define TORCH_CONVT_X86 0
#endif

namespace torch_convt::cpu {
namespace {

constexpr int64_t KC = 256;  // depth of a packed block: A panel (MR x KC) stays in L1, B panel in L2

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
    const __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16);
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

// dst[panel][k][lane] = src(row = panel*width + lane, col = k) for the block (rows x depth), zero-padded to
// whole panels: the layout the micro-kernel streams for A (width MR, rows = M) and, transposed, for B.
template <typename T>
void pack(const T* src, int64_t row_stride, int64_t depth_stride, int64_t rows, int64_t depth, int64_t width,
          T* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += width) {
    const int64_t w = std::min(width, rows - r0);
    for (int64_t k = 0; k < depth; ++k, dst += width) {
      const T* s = src + r0 * row_stride + k * depth_stride;
      if (row_stride == 1) {
        std::copy(s, s + w, dst);
      } else {
        for (int64_t l = 0; l < w; ++l) dst[l] = s[l * row_stride];
      }
      std::fill(dst + w, dst + width, T(0));
    }
  }
}

}  // namespace

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t b_row,
          int64_t b_col, bool accumulate, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  const MicroKernel<T>& mk = kernel<T>();
  const int64_t MR = mk.mr, NR = mk.nr;
  const int64_t MC = MR * 16, NC = NR * 64;
  thread_local std::vector<T> a_pack, b_pack;
  a_pack.resize(MC * KC);
  b_pack.resize(NC * KC);
  T edge[16 * 32];  // an MR x NR block for ragged edges (MR <= 16, NR <= 32)

  for (int64_t jc = 0; jc < N; jc += NC) {
    const int64_t nc = std::min(NC, N - jc);
    for (int64_t pc = 0; pc < K; pc += KC) {
      const int64_t kc = std::min(KC, K - pc);
      const bool acc = accumulate || pc > 0;
      pack(B + pc * b_row + jc * b_col, b_col, b_row, nc, kc, NR, b_pack.data());
      for (int64_t ic = 0; ic < M; ic += MC) {
        const int64_t mc = std::min(MC, M - ic);
        pack(A + ic * a_row + pc * a_col, a_row, a_col, mc, kc, MR, a_pack.data());
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const T* bp = b_pack.data() + jr * kc;
          const int64_t nr = std::min(NR, nc - jr);
          for (int64_t ir = 0; ir < mc; ir += MR) {
            const T* ap = a_pack.data() + ir * kc;
            const int64_t mr = std::min(MR, mc - ir);
            T* c = C + (ic + ir) * ldc + jc + jr;
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
  }
}

const char* gemm_isa() {
  return kernel<float>().isa;
}

#define TORCH_CONVT_INSTANTIATE_GEMM(T)                                                                     \
  template void gemm<T>(int64_t, int64_t, int64_t, const T*, int64_t, int64_t, const T*, int64_t, int64_t, \
                        bool, T*, int64_t);
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
