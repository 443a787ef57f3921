// GEMM on pre-packed operands and its micro-kernels (see gemm.h).
//
// The micro-kernel streams one A panel (MR x kc) and one B panel (kc x NR) and keeps an MR x NR block of C in
// registers. The driver walks B panels outermost (a B panel is reused by every A panel while it sits in L1/L2),
// splitting K into KC-deep blocks (k_block) so that panel stays cache-resident. Every C element sums its K products
// in increasing k, block by block: the order depends on the shapes (and the L1 size) only, never on threads.
//
// The SIMD micro-kernels are compiled with per-function target attributes and only called after a run-time
// CPU check, so one binary runs (and is fast) on any x86-64 CPU. They use intrinsics only, no library code,
// so no AVX-512 instruction can leak into code that runs elsewhere.
#include "gemm.h"
#include "simd.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/complex.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define TORCH_CONVT_X86 1
#else
#define TORCH_CONVT_X86 0
#endif
// AMX code needs the compiler's AMX intrinsics (GCC 11, clang 12) and Linux's tile-state permission call.
#if TORCH_CONVT_X86 && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define TORCH_CONVT_AMX 1
#else
#define TORCH_CONVT_AMX 0
#endif

namespace torch_convt::cpu {
namespace {

// K block: one B panel's block (KC x NR) stays in L1 while the A panels run over it: 256 deep where that is at most
// two thirds of L1 (a float panel: 32 KiB, for CPUs with 48 KiB of L1 data cache or more), else 128. (Float layers
// with a 48 KiB L1, 5 alternated runs against 128: DCGAN forward x0.97 time, its input gradient x0.98, HiFi-GAN
// forward x0.98.) Sums are then grouped by 256 products on such CPUs, by 128 elsewhere: the same for any thread count
// on one machine.
constexpr int64_t kPanelBytes = int64_t(32) << 10;  // the most a B panel block copied on the stack takes
int64_t l1_data_bytes() {
#if defined(__linux__) && defined(_SC_LEVEL1_DCACHE_SIZE)
  static const int64_t bytes = std::max<long>(0, sysconf(_SC_LEVEL1_DCACHE_SIZE));
  return bytes;
#else
  return 0;
#endif
}
template <typename T>
int64_t k_block(int64_t nr) {
  const int64_t panel = 256 * nr * int64_t(sizeof(T));
  return panel <= kPanelBytes && 3 * panel <= 2 * l1_data_bytes() ? 256 : 128;
}
constexpr int64_t kAcBytes = 512 << 10;  // one K block of A (MC x KC) stays in L2
constexpr int64_t kCopyPanels = 8;  // A panels from which a block of B rows is worth copying into a packed panel
constexpr int64_t kInPlaceRows = 64;  // blocks of B rows this shallow are read in place by up to kCopyPanels A panels

// B is either a packed panel (`b`, advancing NR per k) or, where `rows` is given, row k of B starts at rows[k] + at
// (the panel is rows[k][at, at + NR)); the kernel then also prefetches rows[k][pf, pf + 32) (the next panel's part
// of the rows, which are runs somewhere in memory, not a packed stream the hardware prefetches: fetched while
// the FMAs run; pf = at where there is nothing to fetch).
template <typename T>
using MicroFn = void (*)(int64_t kc, const T* a, const T* b, const T* const* rows, int64_t at, int64_t pf, T* c,
                         int64_t ldc, bool accumulate);

// A B panel read in place from two runs (gemm_rows with a column map: a panel that crosses from one line of a
// grid to the next at its middle): columns [0, NR/2) from rows[k] + at0 on, [NR/2, NR) from rows[k] + at1 on;
// prefetching as MicroFn.
// (The packing variant also stores the panel at `panel` + 32 * k as it multiplies it, for the other A panels.)
// The next panel's lines are fetched into L1 (prefetcht0), or into L2 (prefetcht1) by the packing variant for blocks
// whose rows alias in L1 (gemm_driver's `aliased`: rows a whole number of 4 KiB apart, channel planes read in place,
// whose lines at a column all fall into one L1 set, more of them than it has ways: fetched there a panel ahead, they
// evict each other and the A block before they are read). (Zen 4, env-switched builds alternated: pointwise 3d
// forward x0.76-0.92 time, large 3d U-Net k=2 x0.93-0.95; the L2 fetch for all rows: seed k=3, s=2 forward x1.009.)
template <typename T>
using HalvesFn = void (*)(int64_t kc, const T* a, const T* const* rows, int64_t at0, int64_t at1, int64_t pf,
                          T* panel, T* c, int64_t ldc, bool accumulate);

// The runs of a panel of mapped columns cols[0, nr) (nr <= 32), by 16-column half: lane l of half h reads
// row + shift[h][i] + l where bit l of mask[h][i] is set, i < count[h] (lanes of no run are zero).
struct PanelRuns {
  int count[2] = {0, 0};
  uint16_t mask[2][16] = {};
  int64_t shift[2][16] = {};
};

// (in place: the drivers keep their tables of runs from call to call, as a PanelRuns is 328 bytes; the first two
// entries of a half are read whatever its count, by the gather kernels, so they are cleared: lanes of no run)
inline void find_runs(const int64_t* cols, int64_t nr, PanelRuns& runs) {
  for (int h = 0; h < 2; ++h) {
    runs.count[h] = 0;
    runs.mask[h][0] = runs.mask[h][1] = 0;
    runs.shift[h][0] = runs.shift[h][1] = 0;
  }
  for (int64_t j = 0; j < nr;) {  // the run [j, e) inside one half
    int64_t e = j + 1;
    while (e < nr && e % 16 != 0 && cols[e] == cols[j] + (e - j)) ++e;
    const int64_t h = j / 16;
    runs.mask[h][runs.count[h]] = static_cast<uint16_t>(((1u << (e - j)) - 1) << (j % 16));
    runs.shift[h][runs.count[h]++] = cols[j] - j + 16 * h;
    j = e;
  }
}

// A B panel (NR = 32) of at most two runs a half (PanelRuns) read from its rows and stored packed while it is
// multiplied: gemm_rows' first A panel over a mapped panel packs it for the others; k's 32 values go to
// panel + 32*k. Prefetching as MicroFn.
template <typename T>
using GatherFn = void (*)(int64_t kc, const T* a, const T* const* rows, const PanelRuns& runs, int64_t pf, T* panel,
                          T* c, int64_t ldc, bool accumulate);

// The register blockings of an ISA, all NR wide: a kernel for each row count MR it has (fn[MR], null where none), so
// that an operand of M rows is padded to few more rows than M (33 output channels: 3 x 11 rows, where 12-row panels
// computed 36, and 8-row ones 40). `mr` is the tallest (most FMAs per load), `small_mr` the smallest.
// halves[MR]: the same for panels of two runs (AVX-512 only; elsewhere null: such panels are assembled first).
constexpr int kMaxMR = 16;
// A MicroFn for fewer rows than its A panel has (a K step of the panel is a_stride floats).
template <typename T>
using TailFn = void (*)(int64_t kc, int64_t a_stride, const T* a, const T* b, const T* const* rows, int64_t at,
                        int64_t pf, T* c, int64_t ldc, bool accumulate);
template <typename T>
struct MicroKernel {
  int64_t mr, small_mr, nr;
  const char* isa;
  MicroFn<T> fn[kMaxMR + 1] = {};
  // tail[r]: the last r rows of an operand (r < MR) from its zero-padded panel of any MR (a_stride floats a K step),
  // so the padding rows are not computed (AVX2 only; elsewhere null: the panel is computed whole).
  TailFn<T> tail[kMaxMR + 1] = {};
  HalvesFn<T> halves[kMaxMR + 1] = {};
  HalvesFn<T> halves_pack[2][kMaxMR + 1] = {};  // [1]: fetching into L2 (HalvesFn)
  GatherFn<T> gather[kMaxMR + 1] = {};
  // A mapped panel (NR = 32) copied from its runs, where the ISA has gather kernels (else assemble_panel).
  void (*assemble)(const T* const* rows, int64_t kc, const PanelRuns& runs, T* panel) = nullptr;
};

// ---- portable micro-kernel (any type; the compiler vectorises the j loop) -----------------------------------
template <typename T, int MR, int NR>
void micro_portable(int64_t kc, const T* a, const T* b, const T* const* rows, int64_t at, int64_t pf, T* c, int64_t ldc,
                    bool accumulate) {
  T acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = T(0);
  for (int64_t k = 0; k < kc; ++k, a += MR, b += NR) {
    if (rows) __builtin_prefetch(rows[k] + pf, 0, 3);
    const T* bk = rows ? rows[k] + at : b;
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i];
      for (int j = 0; j < NR; ++j) acc[i][j] += ai * bk[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

#if TORCH_CONVT_X86
// The mask of the first min(n, 16) lanes of a vector (n >= 0): the part vector at a ragged end.
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1); }
// The same for any n (none for n <= 0): the second half of a 32-wide ragged end.
inline __mmask16 first_lanes_any(int64_t n) { return first_lanes(std::max<int64_t>(0, n)); }

// ---- AVX-512: MR x 32 floats of C in 2*MR zmm registers (MR = 4 to 12) -----------------------------------------
// A k step of the kernels below: C's block (c0: columns 0-15, c1: 16-31) += a[0, MR) x (b0, b1).
template <int MR>
__attribute__((target("avx512f,fma"), always_inline)) inline void fma_rows_avx512(const float* a, __m512 b0, __m512 b1,
                                                                                   __m512 (&c0)[MR], __m512 (&c1)[MR]) {
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    const __m512 ai = _mm512_set1_ps(a[i]);
    c0[i] = _mm512_fmadd_ps(ai, b0, c0[i]);
    c1[i] = _mm512_fmadd_ps(ai, b1, c1[i]);
  }
}

// The block into C (ldc apart), added to C's values where `accumulate`.
template <int MR>
__attribute__((target("avx512f"), always_inline)) inline void store_c_avx512(__m512 (&c0)[MR], __m512 (&c1)[MR], float* c,
                                                                              int64_t ldc, bool accumulate) {
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

template <int MR>
__attribute__((target("avx512f,fma"))) void micro_avx512(int64_t kc, const float* a, const float* b,
                                                         const float* const* rows, int64_t at, int64_t pf, float* c,
                                                         int64_t ldc, bool accumulate) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  // (the loop is written twice so that the packed one has no per-step branch)
  if (rows) {
    for (int64_t k = 0; k < kc; ++k, a += MR) {
      const float* row = rows[k] + at;
      __builtin_prefetch(rows[k] + pf, 0, 3);
      __builtin_prefetch(rows[k] + pf + 16, 0, 3);
      fma_rows_avx512<MR>(a, _mm512_loadu_ps(row), _mm512_loadu_ps(row + 16), c0, c1);
    }
  } else {
    for (int64_t k = 0; k < kc; ++k, a += MR, b += 32)  // (b advances by NR = 32)
      fma_rows_avx512<MR>(a, _mm512_loadu_ps(b), _mm512_loadu_ps(b + 16), c0, c1);
  }
  store_c_avx512<MR>(c0, c1, c, ldc, accumulate);
}

// The same for a panel of two runs (HalvesFn): each half of the panel is one load; with Pack, stored packed too.
template <int MR, bool Pack, int Locality = 3>
__attribute__((target("avx512f,fma"))) void micro_avx512_halves(int64_t kc, const float* a, const float* const* rows,
                                                                int64_t at0, int64_t at1, int64_t pf, float* panel,
                                                                float* c, int64_t ldc, bool accumulate) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k, a += MR) {
    const float* row = rows[k];
    __builtin_prefetch(row + pf, 0, Locality);
    __builtin_prefetch(row + pf + 16, 0, Locality);
    const __m512 b0 = _mm512_loadu_ps(row + at0), b1 = _mm512_loadu_ps(row + at1);
    if constexpr (Pack) {
      _mm512_store_ps(panel + 32 * k, b0);
      _mm512_store_ps(panel + 32 * k + 16, b1);
    }
    fma_rows_avx512<MR>(a, b0, b1, c0, c1);
  }
  store_c_avx512<MR>(c0, c1, c, ldc, accumulate);
}

// The same for a panel gathered from its rows (GatherFn), which it also stores packed.
template <int MR>
__attribute__((target("avx512f,fma"))) void micro_avx512_gather(int64_t kc, const float* a, const float* const* rows,
                                                                const PanelRuns& runs, int64_t pf, float* panel,
                                                                float* c, int64_t ldc, bool accumulate) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  // (a half of one run: its second mask is 0, a load of nothing)
  const __mmask16 m00 = runs.mask[0][0], m01 = runs.mask[0][1], m10 = runs.mask[1][0], m11 = runs.mask[1][1];
  const int64_t s00 = runs.shift[0][0], s01 = runs.shift[0][1], s10 = runs.shift[1][0], s11 = runs.shift[1][1];
  for (int64_t k = 0; k < kc; ++k, a += MR, panel += 32) {
    const float* row = rows[k];
    __builtin_prefetch(row + pf, 0, 3);
    __builtin_prefetch(row + pf + 16, 0, 3);
    const __m512 b0 = _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(m00, row + s00), m01, row + s01);
    const __m512 b1 = _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(m10, row + s10), m11, row + s11);
    _mm512_store_ps(panel, b0);
    _mm512_store_ps(panel + 16, b1);
    fma_rows_avx512<MR>(a, b0, b1, c0, c1);
  }
  store_c_avx512<MR>(c0, c1, c, ldc, accumulate);
}

// A mapped panel (NR = 32) copied aligned from its runs (any count a half), for the row panels' kernels: masked
// loads, merged in a register (MicroKernel::assemble).
__attribute__((target("avx512f"))) void assemble_runs_avx512(const float* const* rows, int64_t kc, const PanelRuns& runs,
                                                              float* panel) {
  for (int64_t k = 0; k < kc; ++k, panel += 32) {
    for (int64_t h = 0; h < 2; ++h) {
      __m512 v = _mm512_setzero_ps();
      for (int i = 0; i < runs.count[h]; ++i) v = _mm512_mask_loadu_ps(v, runs.mask[h][i], rows[k] + runs.shift[h][i]);
      _mm512_store_ps(panel + 16 * h, v);
    }
  }
}

// ---- AVX2 + FMA: MR x 16 floats of C in 2*MR ymm registers (MR = 4 to 6) -------------------------------------
template <int MR>
__attribute__((target("avx2,fma"))) void micro_avx2(int64_t kc, const float* a, const float* b,
                                                    const float* const* rows, int64_t at, int64_t pf, float* c,
                                                    int64_t ldc, bool accumulate) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
#define TORCH_CONVT_AVX2_STEP(bk)                                          \
  {                                                                        \
    const __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps((bk) + 8); \
    _Pragma("GCC unroll 6") for (int i = 0; i < MR; ++i) {                 \
      const __m256 ai = _mm256_broadcast_ss(a + i);                        \
      c0[i] = _mm256_fmadd_ps(ai, b0, c0[i]);                              \
      c1[i] = _mm256_fmadd_ps(ai, b1, c1[i]);                              \
    }                                                                      \
  }
  if (rows) {
    for (int64_t k = 0; k < kc; ++k, a += MR) {
      const float* row = rows[k];
      __builtin_prefetch(row + pf, 0, 3);
      TORCH_CONVT_AVX2_STEP(row + at)
    }
  } else {
    for (int64_t k = 0; k < kc; ++k, a += MR, b += 16) TORCH_CONVT_AVX2_STEP(b)
  }
#undef TORCH_CONVT_AVX2_STEP
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

// The last R rows of an operand whose panels are taller (MicroKernel::tail): R x 16 floats of C from A panels of
// a_stride floats a K step. Under 4 rows, even and odd K steps sum into two sets of accumulators (added at the end,
// a fixed order), so that at least 8 independent FMA chains keep both FMA units busy. (Operands of 16 and 32 rows
// took 18 and 36 rows' work in 6-row panels.)
template <int R>
__attribute__((target("avx2,fma"))) void micro_avx2_tail(int64_t kc, int64_t a_stride, const float* a,
                                                         const float* b, const float* const* rows, int64_t at,
                                                         int64_t pf, float* c, int64_t ldc, bool accumulate) {
  constexpr int S = R < 4 ? 2 : 1;
  __m256 c0[S][R], c1[S][R];
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i)
    for (int s = 0; s < S; ++s) c0[s][i] = c1[s][i] = _mm256_setzero_ps();
#define TORCH_CONVT_AVX2_TAIL_STEP(s, ak, bk)                              \
  {                                                                        \
    const __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps((bk) + 8); \
    _Pragma("GCC unroll 6") for (int i = 0; i < R; ++i) {                  \
      const __m256 ai = _mm256_broadcast_ss((ak) + i);                     \
      c0[s][i] = _mm256_fmadd_ps(ai, b0, c0[s][i]);                        \
      c1[s][i] = _mm256_fmadd_ps(ai, b1, c1[s][i]);                        \
    }                                                                      \
  }
  int64_t k = 0;
  if (rows) {
    for (; k + S <= kc; k += S)
      for (int s = 0; s < S; ++s) {
        __builtin_prefetch(rows[k + s] + pf, 0, 3);
        TORCH_CONVT_AVX2_TAIL_STEP(s, a + (k + s) * a_stride, rows[k + s] + at)
      }
    for (; k < kc; ++k) {
      __builtin_prefetch(rows[k] + pf, 0, 3);
      TORCH_CONVT_AVX2_TAIL_STEP(0, a + k * a_stride, rows[k] + at)
    }
  } else {
    for (; k + S <= kc; k += S)
      for (int s = 0; s < S; ++s) TORCH_CONVT_AVX2_TAIL_STEP(s, a + (k + s) * a_stride, b + 16 * (k + s))
    for (; k < kc; ++k) TORCH_CONVT_AVX2_TAIL_STEP(0, a + k * a_stride, b + 16 * k)
  }
#undef TORCH_CONVT_AVX2_TAIL_STEP
#pragma GCC unroll 6
  for (int i = 0; i < R; ++i) {
    float* ci = c + i * ldc;
    __m256 v0 = c0[0][i], v1 = c1[0][i];
    if constexpr (S == 2) v0 = _mm256_add_ps(v0, c0[1][i]), v1 = _mm256_add_ps(v1, c1[1][i]);
    if (accumulate) v0 = _mm256_add_ps(v0, _mm256_loadu_ps(ci)), v1 = _mm256_add_ps(v1, _mm256_loadu_ps(ci + 8));
    _mm256_storeu_ps(ci, v0);
    _mm256_storeu_ps(ci + 8, v1);
  }
}
#endif

// ---- C += A . B^T with both operands row-major along K ("dot-product" GEMM) -------------------------------------
// For the weight gradient: A = grad rows and B = gathered input rows, both contiguous along positions (the
// reduction), so neither needs a transposing pack. An MB x NB block of C keeps one vector of lane-wise partial
// sums per element, reduced horizontally (fixed order) once the K loop ends.
template <typename T>
using DotFn = void (*)(int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc);
constexpr int kDotMB = 4, kDotNB = 6;

template <typename T, int MB, int NB>
void dot_block_portable(int64_t K, const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc) {
  constexpr int L = 8;  // lanes: independent partial sums the compiler can vectorise
  T acc[MB][NB][L] = {};
  int64_t k = 0;
  for (; k + L <= K; k += L)
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j)
        for (int l = 0; l < L; ++l) acc[i][j][l] += a[i * lda + k + l] * b[j * ldb + k + l];
  for (; k < K; ++k)
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j][0] += a[i * lda + k] * b[j * ldb + k];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NB; ++j) {
      T sum = T(0);
      for (int l = 0; l < L; ++l) sum += acc[i][j][l];
      c[i * ldc + j] += sum;
    }
}

#if TORCH_CONVT_X86
// GCC 12 warns about its own _mm*_undefined_* placeholders inside the AVX-512 intrinsic headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
// Sum of the 8 lanes, halving in a fixed order.
__attribute__((target("avx2"))) inline float hsum_avx2(__m256 v) {
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  s4 = _mm_add_ss(s4, _mm_shuffle_ps(s4, s4, 1));
  return _mm_cvtss_f32(s4);
}

// Sum of the 16 lanes, halving in a fixed order: the two halves added, then as hsum_avx2.
__attribute__((target("avx512f"))) inline float hsum_avx512(__m512 v) {
  const __m512i swap_halves = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  return hsum_avx2(_mm512_castps512_ps256(_mm512_add_ps(v, _mm512_permutexvar_ps(swap_halves, v))));
}

template <int MB, int NB>
__attribute__((target("avx512f,fma"))) void dot_block_avx512(int64_t K, const float* a, int64_t lda, const float* b,
                                                             int64_t ldb, float* c, int64_t ldc) {
  __m512 acc[MB][NB];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    // (a full mask costs nothing extra: the ragged K tail needs no separate loop)
    const __mmask16 mask = first_lanes(K - k);
    __m512 bv[NB];
#pragma GCC unroll 6
    for (int j = 0; j < NB; ++j) bv[j] = _mm512_maskz_loadu_ps(mask, b + j * ldb + k);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const __m512 av = _mm512_maskz_loadu_ps(mask, a + i * lda + k);
#pragma GCC unroll 6
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(av, bv[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 6
    for (int j = 0; j < NB; ++j) c[i * ldc + j] += hsum_avx512(acc[i][j]);
}

// ---- the same on AVX2: 8 lanes of partial sums per element; a block of up to 4 x 3 elements keeps its 12 sums, 3
// B vectors and an A vector in the 16 registers (wider blocks run as parts of 3 columns). (The portable loop was a
// quarter of the pointwise 3d training step on an AVX2 CPU.)

// One step of 8 values along K (FULL), or of the lanes in `mask`.
template <int MB, int NB, bool FULL>
__attribute__((target("avx2,fma"), always_inline)) inline void dot_step_avx2(const float* a, int64_t lda,
                                                                             const float* b, int64_t ldb, __m256i mask,
                                                                             __m256 (&acc)[MB][NB]) {
  __m256 bv[NB];
#pragma GCC unroll 3
  for (int j = 0; j < NB; ++j) bv[j] = FULL ? _mm256_loadu_ps(b + j * ldb) : _mm256_maskload_ps(b + j * ldb, mask);
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i) {
    const __m256 av = FULL ? _mm256_loadu_ps(a + i * lda) : _mm256_maskload_ps(a + i * lda, mask);
#pragma GCC unroll 3
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_fmadd_ps(av, bv[j], acc[i][j]);
  }
}

template <int MB, int NB>
__attribute__((target("avx2,fma"))) void dot_part_avx2(int64_t K, const float* a, int64_t lda, const float* b,
                                                       int64_t ldb, float* c, int64_t ldc) {
  __m256 acc[MB][NB];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) dot_step_avx2<MB, NB, true>(a + k, lda, b + k, ldb, _mm256_setzero_si256(), acc);
  if (k < K) {
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(K - k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    dot_step_avx2<MB, NB, false>(a + k, lda, b + k, ldb, mask, acc);
  }
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 3
    for (int j = 0; j < NB; ++j) c[i * ldc + j] += hsum_avx2(acc[i][j]);
}

template <int MB, int NB>
void dot_block_avx2(int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int kFirst = NB < 3 ? NB : 3;
  dot_part_avx2<MB, kFirst>(K, a, lda, b, ldb, c, ldc);
  if constexpr (NB > 3) dot_part_avx2<MB, NB - 3>(K, a, lda, b + 3 * ldb, ldb, c + 3, ldc);
}
#pragma GCC diagnostic pop
#endif

#if TORCH_CONVT_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // (as above: the intrinsic headers' placeholders)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// ---- transposing pack: 16 rows x 16 k at a time through registers -----------------------------------------------
// r[i] = column i of the 16 x 16 matrix whose rows r held (in-register transpose).
__attribute__((target("avx512f"), always_inline)) inline void transpose16_avx512(__m512 r[16]) {
  __m512 t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {  // r[c] = column c: k + c over the 16 rows
    r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
  }
}

__attribute__((target("avx512f"))) void pack_rows_avx512(const float* src, int64_t row_stride, int64_t rows,
                                                          int64_t depth, int64_t width, float* dst) {
  for (int64_t r0 = 0; r0 < rows; r0 += width, dst += depth * width) {
    for (int64_t h = 0; h < width; h += 16) {  // 16-row groups of the panel
      const int64_t valid = std::clamp<int64_t>(rows - r0 - h, 0, 16);
      const __mmask16 lanes = first_lanes(width - h);
      // rows past the end load nothing (mask 0) from a row that exists
      const float* row[16];
      for (int i = 0; i < 16; ++i) row[i] = src + std::min<int64_t>(r0 + h + i, rows - 1) * row_stride;
      const __mmask16 live = static_cast<__mmask16>((1u << valid) - 1);
      for (int64_t k = 0; k < depth; k += 16) {
        const int64_t kc = std::min<int64_t>(16, depth - k);
        const __mmask16 kmask = first_lanes(kc);
        __m512 r[16];
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i)
          r[i] = _mm512_maskz_loadu_ps(static_cast<__mmask16>((live >> i) & 1 ? kmask : 0), row[i] + k);
        transpose16_avx512(r);  // r[c] = column c: k + c over the 16 rows
        float* d = dst + k * width + h;
        if (kc == 16) {
#pragma GCC unroll 16
          for (int c = 0; c < 16; ++c) _mm512_mask_storeu_ps(d + c * width, lanes, r[c]);
        } else {
          for (int64_t c = 0; c < kc; ++c) _mm512_mask_storeu_ps(d + c * width, lanes, r[c]);
        }
      }
    }
  }
}

// The same by 8 x 8 transposes on AVX2 (any width): r[c] = column c of the 8 x 8 matrix whose rows r held.
__attribute__((target("avx2"), always_inline)) inline void transpose8_avx2(__m256 r[8]) {
  __m256 t[8], s[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    s[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x20);
    r[j + 4] = _mm256_permute2f128_ps(s[j], s[4 + j], 0x31);
  }
}

__attribute__((target("avx2"))) void pack_rows_avx2(const float* src, int64_t row_stride, int64_t rows, int64_t depth,
                                                    int64_t width, float* dst) {
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t r0 = 0; r0 < rows; r0 += width, dst += depth * width) {
    // 8-row groups of the panel, the last first: a group of fewer than 8 lanes stores 8 floats, the ones past its
    // lanes into the next k's row, which is stored after it (the panel's last row: a masked store)
    for (int64_t h = (width - 1) / 8 * 8; h >= 0; h -= 8) {
      const int64_t valid = std::clamp<int64_t>(rows - r0 - h, 0, 8), lanes = std::min<int64_t>(8, width - h);
      const __m256i lane_in = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes)), iota);
      const float* row[8];
      for (int i = 0; i < 8; ++i) row[i] = src + std::min<int64_t>(r0 + h + i, rows - 1) * row_stride;
      for (int64_t k = 0; k < depth; k += 8) {
        const int64_t kc = std::min<int64_t>(8, depth - k);
        const __m256i kmask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(kc)), iota);
        __m256 r[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i)
          r[i] = i >= valid ? _mm256_setzero_ps()
                 : kc == 8  ? _mm256_loadu_ps(row[i] + k)
                            : _mm256_maskload_ps(row[i] + k, kmask);
        transpose8_avx2(r);  // r[c] = column c: k + c over the 8 rows
        float* d = dst + k * width + h;
        for (int64_t c = 0; c < kc; ++c) {
          if (lanes == 8 || k + c + 1 < depth) _mm256_storeu_ps(d + c * width, r[c]);
          else _mm256_maskstore_ps(d + c * width, lane_in, r[c]);
        }
      }
    }
  }
}

// The mask of the first min(n, 8) lanes of a vector (n >= 0), for AVX2's masked loads and stores.
__attribute__((target("avx2"), always_inline)) inline __m256i first_lanes_avx2(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<int64_t>(8, n))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Values s[j * STEP] for the `m` points j in [0, m) (m >= 1) into a vector (at most 8; lanes past m zero), STEP 1 or
// 2 (the even values of 16, de-interleaved); no value past the last one needed, s[(m - 1) * STEP], is read.
template <int STEP>
__attribute__((target("avx2"), always_inline)) inline __m256 load_step_avx2(const float* s, int64_t m) {
  if constexpr (STEP == 1) {
    return m >= 8 ? _mm256_loadu_ps(s) : _mm256_maskload_ps(s, first_lanes_avx2(m));
  } else {
    __m256 ev;
    if (m > 8) {  // (s[15] is s[2m - 2] or before it)
      ev = _mm256_shuffle_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(s + 8), 0x88);  // s0 s2 s8 s10 | s4 s6 s12 s14
    } else if (m == 8) {  // (s[15] is not read: the second load is s[7, 15), whose odd values are wanted)
      ev = _mm256_shuffle_ps(_mm256_loadu_ps(s), _mm256_loadu_ps(s + 7), 0xD8);
    } else {  // (values s[0, 2m - 1))
      ev = _mm256_shuffle_ps(_mm256_maskload_ps(s, first_lanes_avx2(2 * m - 1)),
                             _mm256_maskload_ps(s + 8, first_lanes_avx2(std::max<int64_t>(0, 2 * m - 9))), 0x88);
    }
    return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), 0xD8));  // s0 s2 s4 s6 s8 s10 s12 s14
  }
}

// copy_segments_packed for mr <= 8 and step 1 or 2: 8 points of each of the panel's channels loaded (load_step_avx2:
// step 2 de-interleaved, masked loads at a copy part's end) and transposed in registers into 8 vectors of a point's
// channels (lanes past the panel's channels zero), each stored mr floats wide: 8 floats where that stays within the
// block's points (what it writes past its own point is stored after it), else a masked store.
// (The portable loop, a load per value, was 39% of the seed k=3, s=2 layer's weight gradient on an AVX2 CPU.)
__attribute__((target("avx2"))) void copy_segments_packed_avx2(const float* src, int64_t src_channel_stride,
                                                               int64_t channels, const Segment* segments,
                                                               int64_t count, int64_t step, int64_t mr, int64_t len,
                                                               float* dst) {
  const __m256i lane_in = first_lanes_avx2(mr);
  for (int64_t c0 = 0; c0 < channels; c0 += mr, dst += mr * len) {
    const int n = static_cast<int>(std::min(mr, channels - c0));
    const float* row[8];
    for (int i = 0; i < 8; ++i) row[i] = src + (c0 + std::min(i, n - 1)) * src_channel_stride;
    for (const Segment* sg = segments; sg != segments + count; ++sg) {
      std::fill(dst + sg->j0 * mr, dst + sg->a * mr, 0.0f);
      for (int64_t j = sg->a; j < sg->b; j += 8) {
        const int64_t m = std::min<int64_t>(8, sg->b - j);  // points of this block
        __m256 r[8];
        if (step == 1) {
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i)
            r[i] = i >= n ? _mm256_setzero_ps() : load_step_avx2<1>(row[i] + sg->offset + j, m);
        } else {
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i)
            r[i] = i >= n ? _mm256_setzero_ps() : load_step_avx2<2>(row[i] + sg->offset + 2 * j, m);
        }
        transpose8_avx2(r);  // r[q] = point j + q over the 8 channels
        float* d = dst + j * mr;
        for (int64_t q = 0; q < m; ++q) {
          if (q * mr + 8 <= m * mr) _mm256_storeu_ps(d + q * mr, r[q]);
          else _mm256_maskstore_ps(d + q * mr, lane_in, r[q]);
        }
      }
      std::fill(dst + sg->b * mr, dst + sg->j1 * mr, 0.0f);
    }
  }
}
#pragma GCC diagnostic pop

// out[j0, j1) = 0 (a few points: masked stores, not a call of memset)
__attribute__((target("avx2"), always_inline)) inline void zero_avx2(float* out, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; j += 8) _mm256_maskstore_ps(out + j, first_lanes_avx2(j1 - j), _mm256_setzero_ps());
}

// gather_segments for step 1 or 2 (STEP) on AVX2: 8 points a vector (load_step_avx2); each piece's source in the
// next channel is fetched into L1 as this channel's is copied.
template <int STEP>
__attribute__((target("avx2"))) void gather_segments_avx2(const float* src, int64_t src_channel_stride,
                                                          int64_t channels, const Segment* segments, int64_t count,
                                                          float* dst, int64_t dst_channel_stride) {
  for (int64_t c = 0; c < channels; ++c) {
    const float* in = src + c * src_channel_stride;
    float* out = dst + c * dst_channel_stride;
    for (const Segment* sg = segments; sg != segments + count; ++sg) {
      zero_avx2(out, sg->j0, sg->a);
      const float* s = in + sg->offset;
      if (c + 1 < channels) {  // (the piece's 2 or 3 lines)
        const float* next = s + src_channel_stride;
        _mm_prefetch(reinterpret_cast<const char*>(next + sg->a * STEP), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(next + sg->a * STEP + 16), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(next + (sg->b - 1) * STEP), _MM_HINT_T0);
      }
      int64_t j = sg->a;
      for (; j + 8 <= sg->b; j += 8) _mm256_storeu_ps(out + j, load_step_avx2<STEP>(s + j * STEP, sg->b - j));
      if (j < sg->b)
        _mm256_maskstore_ps(out + j, first_lanes_avx2(sg->b - j), load_step_avx2<STEP>(s + j * STEP, sg->b - j));
      zero_avx2(out, sg->b, sg->j1);
    }
  }
}
#endif

// Table of block kernels by (rows, columns) of the block, so ragged edges get exact-size kernels too.
template <typename T, template <int, int> class Make>
struct DotTable {
  DotFn<T> fn[kDotMB][kDotNB];
  template <int I, int J>
  void fill() {
    fn[I][J] = Make<I + 1, J + 1>::value;
    if constexpr (J + 1 < kDotNB) fill<I, J + 1>();
    else if constexpr (I + 1 < kDotMB) fill<I + 1, 0>();
  }
  DotTable() { fill<0, 0>(); }
};
template <typename T>
struct PortableDot {
  template <int MB, int NB>
  struct Make {
    static constexpr DotFn<T> value = &dot_block_portable<T, MB, NB>;
  };
};
#if TORCH_CONVT_X86
template <int MB, int NB>
struct Avx512Dot {
  static constexpr DotFn<float> value = &dot_block_avx512<MB, NB>;
};
template <int MB, int NB>
struct Avx2Dot {
  static constexpr DotFn<float> value = &dot_block_avx2<MB, NB>;
};
#endif

template <typename T>
const DotTable<T, PortableDot<T>::template Make>& portable_dots() {
  static const DotTable<T, PortableDot<T>::template Make> table;
  return table;
}

template <typename T>
DotFn<T> dot_block(int mb, int nb) {
#if TORCH_CONVT_X86
  if constexpr (std::is_same_v<T, float>) {
    static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
    static const DotTable<float, Avx512Dot> table;
    if (avx512) return table.fn[mb - 1][nb - 1];
    static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    static const DotTable<float, Avx2Dot> table2;
    if (avx2) return table2.fn[mb - 1][nb - 1];
  }
#endif
  return portable_dots<T>().fn[mb - 1][nb - 1];
}

template <typename T>
MicroKernel<T> select_kernel() {
  MicroKernel<T> k{4, 4, 8, "portable"};
  k.fn[4] = &micro_portable<T, 4, 8>;
  return k;
}

#if TORCH_CONVT_X86
// fn[MR], halves[MR] and gather[MR] for MR in [LO, HI].
template <int LO, int HI>
void add_avx512(MicroKernel<float>& k) {
  k.fn[LO] = &micro_avx512<LO>;
  k.halves[LO] = &micro_avx512_halves<LO, false>;
  k.halves_pack[0][LO] = &micro_avx512_halves<LO, true>;
  k.halves_pack[1][LO] = &micro_avx512_halves<LO, true, 2>;
  k.gather[LO] = &micro_avx512_gather<LO>;
  if constexpr (LO < HI) add_avx512<LO + 1, HI>(k);
}
#endif

template <>
MicroKernel<float> select_kernel<float>() {
#if TORCH_CONVT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) {
    // 4 to 12 rows: 2*MR accumulators, 2 B vectors and a broadcast in the 32 registers (fewer rows: slower than 4
    // rows with a padded one)
    MicroKernel<float> k{12, 4, 32, "avx512"};
    add_avx512<4, 12>(k);
    k.assemble = &assemble_runs_avx512;
    return k;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    MicroKernel<float> k{6, 4, 16, "avx2"};
    k.fn[4] = &micro_avx2<4>;
    k.fn[5] = &micro_avx2<5>;
    k.fn[6] = &micro_avx2<6>;
    k.tail[1] = &micro_avx2_tail<1>;
    k.tail[2] = &micro_avx2_tail<2>;
    k.tail[3] = &micro_avx2_tail<3>;
    k.tail[4] = &micro_avx2_tail<4>;
    k.tail[5] = &micro_avx2_tail<5>;
    return k;
  }
#endif
  MicroKernel<float> k{4, 4, 16, "portable"};
  k.fn[4] = &micro_portable<float, 4, 16>;
  return k;
}

template <typename T>
const MicroKernel<T>& kernel() {
  static const MicroKernel<T> k = select_kernel<T>();
  return k;
}

}  // namespace

template <typename T>
GemmTile gemm_tile(int64_t M, double tall_slack) {
  const MicroKernel<T>& mk = kernel<T>();
  const auto padded = [M](int64_t mr) { return (M + mr - 1) / mr * mr; };
  // The blocking of least cost: rows padded, weighted for blockings under 8 rows, whose fewer accumulator chains
  // leave the FMA ports idle part of the time (single core, in L1: 4 rows x0.75 the speed of 8, 6 rows x0.88).
  const auto cost = [&](int64_t mr) { return double(padded(mr)) * (mr < 8 ? 1.0 + double(8 - mr) / 12.0 : 1.0); };
  int64_t best = mk.mr;  // (the taller of equals)
  for (int64_t mr = mk.mr - 1; mr >= mk.small_mr; --mr)
    if (mk.fn[mr] && cost(mr) < cost(best)) best = mr;
  return {double(padded(mk.mr)) <= double(padded(best)) * (1.0 + tall_slack) ? mk.mr : best, mk.nr};
}

template <typename T>
GemmTile gemm_tile_deep(int64_t kc) {
  const MicroKernel<T>& mk = kernel<T>();
  return {mk.mr, mk.nr, kc};
}

namespace {
// How gemm_rows reads a panel of a column map (cols[jr, jr + NR)): as one run from the rows at `at0` (like a panel
// without a map), as two runs (`at0` for the first half, `at1` for the second, each one run), or assembled. `runs`:
// the index of its PanelRuns in the driver's table where the ISA reads panels by runs (else -1).
struct MappedPanel {
  enum Kind { kRun, kHalves, kAssembled } kind;
  int64_t at0, at1;
  int64_t runs = -1;
};

inline MappedPanel map_panel(const int64_t* cols, int64_t nr, int64_t NR) {
  const auto run = [&](int64_t j0, int64_t j1) {  // (no early exit: the compiler vectorises it)
    const int64_t first = cols[j0] - j0;
    int64_t off = 0;
    for (int64_t j = j0 + 1; j < j1; ++j) off |= cols[j] - j - first;
    return off == 0;
  };
  if (nr == NR && run(0, NR)) return {MappedPanel::kRun, cols[0], 0};
  if (nr == NR && run(0, NR / 2) && run(NR / 2, NR)) return {MappedPanel::kHalves, cols[0], cols[NR / 2]};
  return {MappedPanel::kAssembled, 0, 0};
}

// The panels of a column map cols[0, N), classified once for all K blocks of a driver call: mapped[N / NR], and the
// runs of those read by runs (`by_runs`: where the ISA's kernels read panels so) in panel_runs, assembled panels' and,
// where `halves_by_runs`, two-run panels' too (elsewhere the halves kernels read those and need no runs).
inline void map_panels(const int64_t* cols, int64_t N, int64_t NR, bool by_runs, bool halves_by_runs,
                       std::vector<MappedPanel>& mapped, std::vector<PanelRuns>& panel_runs) {
  mapped.resize((N + NR - 1) / NR);
  int64_t n_runs = 0;
  for (int64_t jr = 0; jr < N; jr += NR) {
    MappedPanel& mp = mapped[jr / NR];
    mp = map_panel(cols + jr, std::min(NR, N - jr), NR);
    if (!by_runs || mp.kind == MappedPanel::kRun || (mp.kind == MappedPanel::kHalves && !halves_by_runs)) continue;
    mp.runs = n_runs++;
    if (static_cast<int64_t>(panel_runs.size()) < n_runs) panel_runs.resize(n_runs);
    find_runs(cols + jr, std::min(NR, N - jr), panel_runs[mp.runs]);
  }
}

// panel[k][j] = rows[k][cols[j]] for j < nr, 0 for nr <= j < NR: a mapped panel copied (aligned) for the micro-kernel,
// run by run (columns of consecutive points: a frame line's). (Element by element through the map, this was 15% of
// the dilated 3d training step on an AVX2 CPU, whose kernels read no panel by runs.)
template <typename T>
void assemble_panel(const T* const* rows, int64_t kc, const int64_t* cols, int64_t nr, int64_t NR, T* panel) {
  int64_t first[32], length[32], from[32], runs = 0;  // (NR <= 32)
  for (int64_t j = 0, e; j < nr; j = e) {
    for (e = j + 1; e < nr && cols[e] == cols[e - 1] + 1;) ++e;
    first[runs] = j, length[runs] = e - j, from[runs++] = cols[j];
  }
  for (int64_t k = 0; k < kc; ++k, panel += NR) {
    const T* row = rows[k];
    for (int64_t r = 0; r < runs; ++r)
      for (int64_t j = 0; j < length[r]; ++j) panel[first[r] + j] = row[from[r] + j];
    for (int64_t j = nr; j < NR; ++j) panel[j] = T(0);
  }
}


#if TORCH_CONVT_X86
__attribute__((target("avx2"))) void copy_panel16_avx2(const float* const* rows, int64_t kc, int64_t at, int64_t next,
                                                       float* panel) {
  for (int64_t k = 0; k < kc; ++k) {
    const float* row = rows[k];
    __builtin_prefetch(row + next, 0, 3);
    __builtin_prefetch(row + next + 15, 0, 3);
    _mm256_store_ps(panel + 16 * k, _mm256_loadu_ps(row + at));
    _mm256_store_ps(panel + 16 * k + 8, _mm256_loadu_ps(row + at + 8));
  }
}
#endif

// gemm_driver's copy of a block of B rows (`nr` columns from `at`, `kc` rows) into a panel, fetching the next
// panel's columns (from `next`) as it goes, in one AVX2 call where the panel is 16 floats wide; false where it is
// not (or the CPU lacks AVX2): the caller's row loop copies it then.
template <typename T>
bool copy_panel_avx2(const T* const* rows, int64_t kc, int64_t nr, int64_t at, int64_t next, T* panel) {
#if TORCH_CONVT_X86
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if constexpr (std::is_same_v<T, float>) {
    if (avx2 && nr == 16) {
      copy_panel16_avx2(rows, kc, at, next, panel);
      return true;
    }
  }
#endif
  (void)rows, (void)kc, (void)nr, (void)at, (void)next, (void)panel;
  return false;
}

// Whether `count` rows lie evenly spaced a multiple of 4 KiB apart (the same L1 set at any column).
template <typename T>
bool same_set_rows(const T* const* rows, int64_t count) {
  const std::ptrdiff_t step = (rows[1] - rows[0]) * static_cast<std::ptrdiff_t>(sizeof(T));
  return step != 0 && step % 4096 == 0 && rows[count - 1] - rows[0] == (count - 1) * (rows[1] - rows[0]);
}

// The shared driver: B packed (b_packed) or given by rows (b_rows, row k of panel jr at b_rows[k] + jr, or at
// b_rows[k] + b_cols[jr ...] through a column map).
template <typename T>
void gemm_driver(GemmTile tile, int64_t M, int64_t N, int64_t K, const T* a_packed, int64_t a_stride,
                 const T* b_packed, const T* const* b_rows, const int64_t* b_cols, bool accumulate, T* C,
                 int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
    return;
  }
  const MicroKernel<T>& mk = kernel<T>();
  const int64_t MR = tile.mr, NR = mk.nr;
  const MicroFn<T> fn = mk.fn[MR];
  const HalvesFn<T> halves_fn = mk.halves[MR];
  const GatherFn<T> gather_fn = mk.gather[MR];
  const bool deep = !b_rows && tile.kc > 0;
  const int64_t KC = k_block<T>(NR);
  const int64_t KB = deep ? tile.kc : KC;  // (panel below is used with b_rows only)
  T edge[16 * 32];  // an MR x NR block of C for ragged edges (MR <= 16, NR <= 32)
  alignas(64) T panel[kPanelBytes / sizeof(T)];  // a block of B rows copied or assembled (KC x NR: within it)
  // A column map's panels, classified once for all K blocks.
  thread_local std::vector<MappedPanel> mapped;
  thread_local std::vector<PanelRuns> panel_runs;  // (of the panels not of one run, where mk.assemble reads runs)
  if (b_cols) map_panels(b_cols, N, NR, mk.assemble && NR == 32, !halves_fn, mapped, panel_runs);
  // K blocks outermost, then blocks of MC rows of A: one (MC x KC) block of A stays in L2 while every B panel
  // streams past it, and each B panel's KC x NR block stays in L1 while the A panels of the block run over it.
  const int64_t mc_max = std::max<int64_t>(MR, kAcBytes / (KB * int64_t(sizeof(T))) / MR * MR);
  const int64_t m_blocks = (M + mc_max - 1) / mc_max;  // blocks of about equal rows (not a full one and a sliver)
  const int64_t MC = ((M + m_blocks - 1) / m_blocks + MR - 1) / MR * MR;
  for (int64_t pc = 0; pc < K; pc += KB) {
    const int64_t kc = std::min(KB, K - pc);
    const bool acc = accumulate || pc > 0;
    // B's rows of this block a whole number of 4 KiB apart (channels of an input read in place, whose planes are
    // such multiples: a pointwise layer's): their vectors at a column fall into one set of L1 lines, more rows than
    // it has ways, so a panel's reads miss L1 for every A panel that makes them; copied once into a panel instead,
    // from 3 A panels on. (Measured on an AVX2 CPU, alternated pairs: pointwise 3d forward, 32 rows of A, 64 of B
    // 128 KiB apart, x0.84-0.90 time; the large 3d U-Net k=2 input gradient x0.97. Frame windows, whose rows lie
    // otherwise, took x1.08-1.19 copied from 3 panels on: the seed k=3, s=2 and grouped 2d forwards.) Where the
    // ISA has a packing kernel, the first A panel's kernel packs such a block as it multiplies it (pack_first).
    const bool aliased = b_rows && kc >= 16 && same_set_rows(b_rows + pc, kc);
    const HalvesFn<T> halves_pack_fn = mk.halves_pack[aliased][MR];
    for (int64_t ic = 0; ic < M; ic += MC) {
      const int64_t mc = std::min(MC, M - ic);
      for (int64_t jr = 0; jr < N; jr += NR) {
        const int64_t nr = std::min(NR, N - jr);
        // (a mapped panel: one run is read like a panel of an unmapped B, two runs like its halves, anything else from
        // an assembled copy)
        const MappedPanel mp = b_cols ? mapped[jr / NR] : MappedPanel{MappedPanel::kRun, jr, 0};
        const bool many = mc >= kCopyPanels * MR, several = mc >= 3 * MR;
        // A panel of one or two runs that three or more A panels read: packed by the first one's kernel as it
        // multiplies it (two plain loads a k step: the halves at at0 and at1), the others read the packed copy. The
        // rows' runs start anywhere, so their loads straddle cache lines, and a K block of them takes more of L1 than
        // the panel. (Measured, 6 alternated runs in each order: forward MONAI x0.96 time, stride-1 3d x0.95; input
        // gradients k=4 3d x0.94, stride-1 3d x0.95, HiFi-GAN x0.97; DCGAN and dilated 3d within noise; with two A
        // panels, k=4 3d forward x1.03, so not there. DCGAN forward, 16-point lines in 18-point frame lines: x0.98
        // against the gather kernel's masked loads. The GEMM alone, 32 rows of A, 1024 columns 256 deep, one thread:
        // 73% of the FMA peak instead of 57% reading the rows in place.) Not for a block of at most kInPlaceRows rows
        // that fewer than kCopyPanels A panels read: its rows' lines (12 KiB at 64 rows) stay in L1 from one A panel to
        // the next, and the packing kernel's two stores a k step cost more than the straddled loads save (one thread,
        // 33 rows of A by sets of 128, 64, 64 and 32 rows as the seed k=3, s=2 forward's: x0.97 time; that forward
        // x0.99, the anisotropic seed layer and grouped 2d x0.99; deeper blocks still lose without it: MONAI training
        // step x1.02, k=4 3d x1.01). Aliased blocks (above) are packed so whatever their depth: the pointwise 3d
        // forward, 64 rows 128 KiB apart read by 4 A panels, took x0.62-0.75 the time of copying them first (with
        // HalvesFn's fetch into L2), its training step x0.83-0.86.
        const bool pack_first = b_rows && several && (kc > kInPlaceRows || many || aliased) && halves_pack_fn &&
                                (mp.kind == MappedPanel::kRun || mp.kind == MappedPanel::kHalves);
        const int64_t at1 = mp.kind == MappedPanel::kRun ? mp.at0 + NR / 2 : mp.at1;
        const bool halves = b_rows && mp.kind == MappedPanel::kHalves && !pack_first && halves_fn;
        // (an assembled panel of at most two runs a half: packed by the first A panel's kernel as it multiplies it;
        // the dilated 3d layer, 20-point lines in 32-column panels: x0.92 time)
        const PanelRuns* runs = mp.runs >= 0 ? &panel_runs[mp.runs] : nullptr;
        const bool gathered = b_rows && mp.kind != MappedPanel::kRun && !halves && !pack_first && gather_fn && runs &&
                              runs->count[0] <= 2 && runs->count[1] <= 2;
        const bool assembled = b_rows && mp.kind != MappedPanel::kRun && !halves && !pack_first && !gathered;
        // The next panel's first column: its part of this block's rows is fetched while the A panels run over this
        // one (by the first one's kernel, or while copying).
        const int64_t next = !b_rows || jr + NR >= N ? mp.at0 : b_cols ? b_cols[jr + NR] : jr + NR;
        const T* bp = b_packed ? b_packed + jr * K + pc * NR : nullptr;
        const T* const* rp = b_rows ? b_rows + pc : nullptr;
        if (assembled) {
          if (runs) mk.assemble(b_rows + pc, kc, *runs, panel);
          else assemble_panel(b_rows + pc, kc, b_cols + jr, nr, NR, panel);
          bp = panel;
          rp = nullptr;
        } else if (gathered || pack_first) {
          bp = panel;  // (packed by the first A panel's kernel)
          rp = nullptr;
        } else if (b_rows && (many || (several && aliased)) && mp.kind == MappedPanel::kRun) {
          // (ISAs without a packing kernel) Many A panels will read this block: copy its rows into one aligned panel
          // first (row runs start anywhere, so every vector load from them would straddle two cache lines). For fewer
          // panels the copy costs more than it saves (measured with 4-7 panels of 8 rows, i.e. 32-56 output
          // channels: x0.86-0.94 time without it on the stride-1 3d, k=4 3d, MONAI and grouped layers).
          // (32 columns a fixed-length loop: std::copy became a call of memmove per row, 4% of the U-Net k=2
          // input gradient's time. 16 columns (AVX2): copy_panel_avx2, a block in one AVX2 call, x0.90 the time of
          // memmove per row on the pointwise 3d forward, 12 alternated pairs; a plain 16-value loop, which compiles
          // to SSE moves here, took x1.08)
          if (!copy_panel_avx2(b_rows + pc, kc, NR, mp.at0, next, panel)) {
            for (int64_t k = 0; k < kc; ++k) {
              const T* row = b_rows[pc + k];
              __builtin_prefetch(row + next, 0, 3);
              __builtin_prefetch(row + next + 16, 0, 3);
              if (NR == 32) {
                for (int64_t j = 0; j < 32; ++j) panel[k * 32 + j] = row[mp.at0 + j];
              } else {
                std::copy(row + mp.at0, row + mp.at0 + NR, panel + k * NR);
              }
            }
          }
          bp = panel;
          rp = nullptr;
        }
        const T* ap = a_packed + ic / MR * a_stride + pc * MR;
        for (int64_t ir = ic; ir < ic + mc; ir += MR, ap += a_stride) {
          const int64_t mr = std::min(MR, M - ir);
          T* c = C + ir * ldc + jr;
          const int64_t pf = ir == ic ? next : mp.at0;
          const bool gather = gathered && ir == ic, pack = pack_first && ir == ic;
          // (the last rows of A, fewer than MR: only those computed, where the ISA has a tail kernel)
          const bool tail = mr < MR && mk.tail[mr] && !gather && !pack && !halves;
          if (deep && ir + MR < ic + mc) {
            // (deep K blocks: C is far from cache (the weight gradient's partial sums), so the next A panel's block
            // of C is fetched into L2 while this one's kc steps run; with the equal row blocks above, weight gradient
            // DCGAN x0.975 time, HiFi-GAN x0.965)
            for (int64_t i = 0; i < std::min(MR, M - ir - MR); ++i) {
              __builtin_prefetch(c + (MR + i) * ldc, 1, 2);
              __builtin_prefetch(c + (MR + i) * ldc + NR - 1, 1, 2);
            }
          }
          if (mr == MR && nr == NR) {
            if (gather) gather_fn(kc, ap, b_rows + pc, *runs, pf, panel, c, ldc, acc);
            else if (pack) halves_pack_fn(kc, ap, b_rows + pc, mp.at0, at1, pf, panel, c, ldc, acc);
            else if (halves) halves_fn(kc, ap, rp, mp.at0, mp.at1, pf, nullptr, c, ldc, acc);
            else fn(kc, ap, bp, rp, mp.at0, pf, c, ldc, acc);
          } else if (tail && nr == NR) {
            mk.tail[mr](kc, MR, ap, bp, rp, mp.at0, pf, c, ldc, acc);
          } else {
            if (gather) gather_fn(kc, ap, b_rows + pc, *runs, pf, panel, edge, NR, false);
            else if (pack) halves_pack_fn(kc, ap, b_rows + pc, mp.at0, at1, pf, panel, edge, NR, false);
            else if (halves) halves_fn(kc, ap, rp, mp.at0, mp.at1, pf, nullptr, edge, NR, false);
            else if (tail) mk.tail[mr](kc, MR, ap, bp, rp, mp.at0, pf, edge, NR, false);
            else fn(kc, ap, bp, rp, mp.at0, pf, edge, NR, false);
            for (int64_t i = 0; i < mr; ++i)
              for (int64_t j = 0; j < nr; ++j)
                c[i * ldc + j] = acc ? c[i * ldc + j] + edge[i * NR + j] : edge[i * NR + j];
          }
        }
      }
    }
  }
}
// ---- AMX (bfloat16 layers) ------------------------------------------------------------------------------------
// C = A . B on the tile unit: A in amx_pack_a's tiles, B float panels or rows (as gemm_driver's) narrowed to
// bfloat16 pairs (VNNI tiles: row i of a tile holds k = 2i and 2i + 1 of 16 columns) one K block of a 32-wide panel
// at a time, then every 32 rows of A multiplied over it into 2 x 2 tiles of C (16 x 16 floats each). Each C element
// sums its products in increasing 32-deep steps, K block by K block (the order depends on the shapes only).
#if TORCH_CONVT_AMX
// (GCC 12 warns inside its own AVX-512 intrinsics, as below)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// K block: a panel's VNNI tiles (64 KiB) stay in L2, and each 2 x 2 block of C tiles is loaded and stored once per
// 1024 deep (DCGAN bfloat16 forward: x0.90 time against 512, x0.91 against 256; by AVX512-BF16 on Zen 4, x0.985 and
// x0.97)
constexpr int64_t kAmxKC = 1024;

std::atomic<bool> amx_wanted{true};

bool amx_supported() {
  static const bool ok = [] {
#if defined(SYS_arch_prctl)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    const bool tile = (d >> 24) & 1, bf16 = (d >> 22) & 1;  // AMX-TILE, AMX-BF16
    if (!tile || !bf16 || !__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl"))
      return false;
    // Linux hands out the tile state (8 KiB of registers) only to processes that ask for it (once, for all threads):
    // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA. It refuses where the kernel or the hypervisor does not support it.
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

// The first 64-byte aligned element of a buffer allocated with 64 bytes to spare.
template <typename T>
T* align64(T* p) {
  return p + (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64 / sizeof(T);
}

struct alignas(64) AmxConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// One VNNI row: dst[l] = the bfloat16 pair (r0[l], r1[l]) for 16 columns l (r1 == nullptr: zeros). The values are
// bfloat16 values, so dropping the low half of each is exact.
__attribute__((target("avx512f"), always_inline)) inline void vnni_row(const float* r0, const float* r1,
                                                                        uint16_t* dst) {
  const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
  const __m512i lo = _mm512_srli_epi32(_mm512_castps_si512(_mm512_loadu_ps(r0)), 16);
  const __m512i hi = r1 ? _mm512_and_si512(_mm512_castps_si512(_mm512_loadu_ps(r1)), high) : _mm512_setzero_si512();
  _mm512_store_si512(dst, _mm512_or_si512(lo, hi));
}

// The tiles of C that a block of `rows` x `cols` (<= 32 x 32) at c covers: ragged ones through `edge`.
struct AmxC {
  float* at[4];
  int64_t stride[4];
};

// Where A's tiles lie: row block i (16 rows), step s at p + i * panel + s * step, their rows `ld` bytes apart. Packed
// tiles (amx_pack_a): 64-byte rows, 1024-byte steps; bfloat16 rows: rows ld apart, 64-byte steps.
struct AmxA {
  const char* p;
  int64_t ld, step, panel;
};

// C[rows x cols] (+)= A (MT row blocks, `steps` 32-deep steps) . B (the VNNI tiles at b: step s, half h at byte
// 2048 s + 1024 h). Tiles: C 0-3 (row block i, half j: 2i + j), A 4-5, B 6-7.
template <int MT, int NT, bool Packed>
__attribute__((target("amx-tile,amx-bf16,avx512f"))) void amx_block(int64_t steps, AmxA a, const char* b, float* c,
                                                                     int64_t ldc, int rows, int cols, bool acc) {
  if constexpr (Packed) a.ld = 64, a.step = 1024;  // (constants: x0.97 time of the forward's tile loop)
  alignas(64) float edge[4][256];
  AmxC t;
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) {
      const int q = 2 * i + j, r = std::min(16, rows - 16 * i), n = std::min(16, cols - 16 * j);
      float* ct = c + 16 * i * ldc + 16 * j;
      if (r == 16 && n == 16) {
        t.at[q] = ct, t.stride[q] = ldc * int64_t(sizeof(float));
        continue;
      }
      t.at[q] = edge[q], t.stride[q] = 64;
      if (acc)
        for (int y = 0; y < 16; ++y)
          for (int x = 0; x < 16; ++x) edge[q][16 * y + x] = y < r && x < n ? ct[y * ldc + x] : 0.0f;
    }
  if (acc) {
    _tile_loadd(0, t.at[0], t.stride[0]);
    if constexpr (NT == 2) _tile_loadd(1, t.at[1], t.stride[1]);
    if constexpr (MT == 2) _tile_loadd(2, t.at[2], t.stride[2]);
    if constexpr (MT == 2 && NT == 2) _tile_loadd(3, t.at[3], t.stride[3]);
  } else {
    _tile_zero(0);
    if constexpr (NT == 2) _tile_zero(1);
    if constexpr (MT == 2) _tile_zero(2);
    if constexpr (MT == 2 && NT == 2) _tile_zero(3);
  }
  const char* a0 = a.p;
  for (int64_t s = 0; s < steps; ++s, a0 += a.step, b += 2048) {
    _tile_loadd(4, a0, a.ld);
    _tile_loadd(6, b, 64);
    if constexpr (NT == 2) _tile_loadd(7, b + 1024, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) {
      _tile_loadd(5, a0 + a.panel, a.ld);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NT == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, t.at[0], t.stride[0]);
  if constexpr (NT == 2) _tile_stored(1, t.at[1], t.stride[1]);
  if constexpr (MT == 2) _tile_stored(2, t.at[2], t.stride[2]);
  if constexpr (MT == 2 && NT == 2) _tile_stored(3, t.at[3], t.stride[3]);
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) {
      const int q = 2 * i + j, r = std::min(16, rows - 16 * i), n = std::min(16, cols - 16 * j);
      if (t.at[q] != edge[q]) continue;
      float* ct = c + 16 * i * ldc + 16 * j;
      for (int y = 0; y < r; ++y)
        for (int x = 0; x < n; ++x) ct[y * ldc + x] = edge[q][16 * y + x];
    }
}

// amx_block with the blocking of a `rows` x `cols` block (<= 32 x 32); Packed: A in packed tiles (64-byte rows,
// 1024-byte steps).
template <bool Packed>
inline void amx_tiles(int64_t steps, AmxA a, const char* b, float* c, int64_t ldc, int rows, int cols, bool acc) {
  if (rows > 16) {
    if (cols > 16) amx_block<2, 2, Packed>(steps, a, b, c, ldc, rows, cols, acc);
    else amx_block<2, 1, Packed>(steps, a, b, c, ldc, rows, cols, acc);
  } else {
    if (cols > 16) amx_block<1, 2, Packed>(steps, a, b, c, ldc, rows, cols, acc);
    else amx_block<1, 1, Packed>(steps, a, b, c, ldc, rows, cols, acc);
  }
}

// ---- AVX512-BF16 (bfloat16 layers on CPUs without AMX: AMD Zen 4, Intel Cooper Lake) -----------------------------
// The same operands as amx_block's (A in amx_pack_a's tiles, B in VNNI tiles) on the vector units: vdpbf16ps multiplies
// 16 lanes of bfloat16 pairs and adds both products to a float lane, twice the rate of float FMAs (a Zen 4 core:
// 64 products a cycle against 32). A block of R <= 8 rows of one A panel x 16 H columns (cols of them stored): per
// pair of K, H B vectors (the 16-column halves' VNNI rows) and one broadcast pair per row of A, H R products into H R
// accumulators. Each C element sums its pairs in increasing K (the order depends on the shapes only); bfloat16
// products are exact in float, and the instruction flushes float subnormals, as the tiles do.
bool avx512_bf16_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

template <int R, int H>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dot_block(int64_t steps, const char* a,
                                                                      const uint16_t* b, float* c, int64_t ldc,
                                                                      int cols, bool acc) {
  const __mmask16 m0 = first_lanes(cols), m1 = first_lanes_any(cols - 16);
  __m512 c0[R], c1[R];
  for (int r = 0; r < R; ++r) {
    c0[r] = acc ? _mm512_maskz_loadu_ps(m0, c + r * ldc) : _mm512_setzero_ps();
    if constexpr (H == 2) c1[r] = acc ? _mm512_maskz_loadu_ps(m1, c + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t s = 0; s < steps; ++s, a += 1024, b += 1024) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {
      const __m512bh b0 = (__m512bh)_mm512_load_si512(b + 32 * i);
      __m512bh b1;
      if constexpr (H == 2) b1 = (__m512bh)_mm512_load_si512(b + 512 + 32 * i);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, a + 64 * r + 4 * i, 4);
        const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
        c0[r] = _mm512_dpbf16_ps(c0[r], av, b0);
        if constexpr (H == 2) c1[r] = _mm512_dpbf16_ps(c1[r], av, b1);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(c + r * ldc, m0, c0[r]);
    if constexpr (H == 2) _mm512_mask_storeu_ps(c + r * ldc + 16, m1, c1[r]);
  }
}

// dot_block over `rows` (<= 16) rows of the A panel at a (step 0), `cols` (<= 32) columns.
template <int H>
void dot_panel(int64_t steps, const char* a, const uint16_t* b, float* c, int64_t ldc, int rows, int cols, bool acc) {
  for (int r0 = 0; r0 < rows; r0 += 8, a += 8 * 64, c += 8 * ldc) {
    switch (std::min(8, rows - r0)) {
      case 8: dot_block<8, H>(steps, a, b, c, ldc, cols, acc); break;
      case 7: dot_block<7, H>(steps, a, b, c, ldc, cols, acc); break;
      case 6: dot_block<6, H>(steps, a, b, c, ldc, cols, acc); break;
      case 5: dot_block<5, H>(steps, a, b, c, ldc, cols, acc); break;
      case 4: dot_block<4, H>(steps, a, b, c, ldc, cols, acc); break;
      case 3: dot_block<3, H>(steps, a, b, c, ldc, cols, acc); break;
      case 2: dot_block<2, H>(steps, a, b, c, ldc, cols, acc); break;
      default: dot_block<1, H>(steps, a, b, c, ldc, cols, acc); break;
    }
  }
}

// amx_tiles' twin by dot products: a `rows` x `cols` block (<= 32 x 32) of C from A in packed tiles (64-byte rows,
// 1024-byte steps; a second panel a.panel bytes on) and B's VNNI block, panel by panel.
inline void dot_tiles(int64_t steps, AmxA a, const char* b, float* c, int64_t ldc, int rows, int cols, bool acc) {
  const uint16_t* vnni = reinterpret_cast<const uint16_t*>(b);
  for (int r0 = 0; r0 < rows; r0 += 16, a.p += a.panel, c += 16 * ldc) {
    const int r = std::min(16, rows - r0);
    if (cols > 16) dot_panel<2>(steps, a.p, vnni, c, ldc, r, cols, acc);
    else dot_panel<1>(steps, a.p, vnni, c, ldc, r, cols, acc);
  }
}

// (a static object: GCC 12 dropped the stores into a stack copy, not seeing that the instruction reads it)
__attribute__((target("amx-tile"))) void amx_configure() {
  static const AmxConfig cfg = [] {
    AmxConfig c;
    for (int i = 0; i < 8; ++i) c.rows[i] = 16, c.colsb[i] = 64;
    return c;
  }();
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// amx_pack_a: step s of a panel reads its float rows [32s, 32s + 32) into registers (pairs of rows narrowed into one
// vector of 16 lanes m, then transposed: lane j of row m) before it writes its tile over rows [16s, 16s + 16),
// which steps s/2 .. s have read: in place, front to back.
__attribute__((target("avx512f"))) void amx_pack_a_avx512(float* a, int64_t M, int64_t K) {
  const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
  for (int64_t p = 0; p < (M + 15) / 16; ++p) {
    float* panel = a + p * K * 16;
    for (int64_t s = 0; s < (K + 31) / 32; ++s) {
      __m512 v[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t k = 32 * s + 2 * j;
        const __m512i lo = k < K ? _mm512_castps_si512(_mm512_loadu_ps(panel + k * 16)) : _mm512_setzero_si512();
        const __m512i hi =
            k + 1 < K ? _mm512_castps_si512(_mm512_loadu_ps(panel + (k + 1) * 16)) : _mm512_setzero_si512();
        v[j] = _mm512_castsi512_ps(_mm512_or_si512(_mm512_srli_epi32(lo, 16), _mm512_and_si512(hi, high)));
      }
      transpose16_avx512(v);  // v[m]: row m's 16 pairs
      for (int m = 0; m < 16; ++m) _mm512_storeu_ps(panel + s * 256 + m * 16, v[m]);
    }
  }
}

// amx_pack_rows: row m's step s is its 32 values from k = 32s on, as they lie in the source (masked past K).
__attribute__((target("avx512f,avx512bw"))) void amx_pack_rows_avx512(const uint16_t* src, int64_t ld, int64_t rows,
                                                                      int64_t K, float* panel) {
  for (int64_t s = 0; s < (K + 31) / 32; ++s) {
    const __mmask32 mask = static_cast<__mmask32>(first_lanes_any(K - 32 * s)) |
                           static_cast<__mmask32>(first_lanes_any(K - 32 * s - 16)) << 16;
    for (int64_t m = 0; m < 16; ++m)
      _mm512_storeu_si512(panel + s * 256 + m * 16,
                          m < rows ? _mm512_maskz_loadu_epi16(mask, src + m * ld + 32 * s) : _mm512_setzero_si512());
  }
}

// gemm_driver's twin for bfloat16 pairs (MR 16, NR 32, A in amx_pack_a's layout with panels a_stride floats apart):
// on AMX tiles where the CPU has them, else by AVX512-BF16 dot products (dot_tiles).
__attribute__((target("avx512f"))) void amx_driver(int64_t M, int64_t N, int64_t K, const float* a_packed,
                                                   int64_t a_stride, const float* b_packed, const float* const* b_rows,
                                                   const int64_t* b_cols, bool accumulate, float* C, int64_t ldc) {
  constexpr int64_t NR = 32;
  const MicroKernel<float>& mk = kernel<float>();
  // (vectors: thread-local arrays this large are allocated by the loader, which aborts the process where memory
  // runs out; a vector's allocation fails as torch's do)
  thread_local std::vector<uint16_t> vnni_buffer(kAmxKC / 32 * 1024 + 32);
  thread_local std::vector<float> panel_buffer(kAmxKC * NR + 16);
  uint16_t* const vnni = align64(vnni_buffer.data());
  float* const panel = align64(panel_buffer.data());  // (64-byte aligned: assemble's stores)
  thread_local std::vector<MappedPanel> mapped;
  thread_local std::vector<PanelRuns> panel_runs;
  const bool tiles = amx_supported();
  if (b_cols) map_panels(b_cols, N, NR, mk.assemble && mk.nr == NR, false, mapped, panel_runs);
  if (tiles) amx_configure();
  for (int64_t pc = 0; pc < K; pc += kAmxKC) {
    const int64_t kc = std::min(kAmxKC, K - pc), steps = (kc + 31) / 32;
    const bool acc = accumulate || pc > 0;
    for (int64_t jr = 0; jr < N; jr += NR) {
      const int64_t nr = std::min(NR, N - jr);
      // row k of the block, columns [16h, 16h + 16): src[h][k] (+ k * step)
      const MappedPanel mp = b_cols ? mapped[jr / NR] : MappedPanel{MappedPanel::kRun, jr, 0};
      const float* const* rows = b_rows ? b_rows + pc : nullptr;
      const float* packed = b_packed ? b_packed + jr * K + pc * NR : nullptr;
      int64_t at[2] = {mp.at0, mp.kind == MappedPanel::kHalves ? mp.at1 : mp.at0 + 16};
      if (rows && mp.kind == MappedPanel::kAssembled) {
        if (mp.runs >= 0) mk.assemble(rows, kc, panel_runs[mp.runs], panel);
        else assemble_panel(rows, kc, b_cols + jr, nr, NR, panel);
        rows = nullptr, packed = panel;
      }
      if (packed) at[0] = 0, at[1] = 16;
      const auto row = [&](int64_t k, int h) { return rows ? rows[k] + at[h] : packed + k * NR + at[h]; };
      for (int64_t k = 0; k < steps * 32; k += 2) {
        uint16_t* d = vnni + k / 32 * 1024 + k % 32 / 2 * 32;
        for (int h = 0; h < 2; ++h, d += 512) {
          if (k < kc) vnni_row(row(k, h), k + 1 < kc ? row(k + 1, h) : nullptr, d);
          else _mm512_store_si512(d, _mm512_setzero_si512());
        }
      }
      const char* b = reinterpret_cast<const char*>(vnni);
      for (int64_t ir = 0; ir < M; ir += 32) {
        const int rows_c = static_cast<int>(std::min<int64_t>(32, M - ir)), cols = static_cast<int>(nr);
        const char* a0 = reinterpret_cast<const char*>(a_packed + ir / 16 * a_stride) + pc / 32 * 1024;
        const AmxA a{a0, 64, 1024, a_stride * int64_t(sizeof(float))};
        if (tiles) amx_tiles<true>(steps, a, b, C + ir * ldc + jr, ldc, rows_c, cols, acc);
        else dot_tiles(steps, a, b, C + ir * ldc + jr, ldc, rows_c, cols, acc);
      }
    }
  }
  if (tiles) amx_release();
}

// The 32 bfloat16 values p[0, 32) (lanes off the masks m0, m1 of the two halves: zero) in order, i.e. 16 pairs
// (p[2i], p[2i + 1]) a 32-bit lane.
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512i load32_avx512(const uint16_t* p, __mmask16 m0,
                                                                                         __mmask16 m1) {
  return _mm512_maskz_loadu_epi16(static_cast<__mmask32>(m0) | static_cast<__mmask32>(m1) << 16, p);
}

// The VNNI tiles of a 32-column panel of B[k][n] = rows[n * ld + k] (k < kc, n < min(32, cols); zero elsewhere) for
// `steps` = kc / 32 (rounded up) steps: step s, half h at vnni + s * 1024 + h * 512. Each 16 columns' 32-deep step is
// 16 rows loaded as pairs (load32_avx512), transposed in registers.
__attribute__((target("avx512f,avx512bw"))) void vnni_panel(const uint16_t* rows, int64_t ld, int64_t cols, int64_t kc,
                                                            uint16_t* vnni) {
  for (int64_t h = 0; h < 2; ++h)
    for (int64_t s = 0; s < (kc + 31) / 32; ++s) {
      const int64_t left = kc - 32 * s;
      __m512 v[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t n = 16 * h + i;
        v[i] = n < cols ? _mm512_castsi512_ps(
                              load32_avx512(rows + n * ld + 32 * s, first_lanes_any(left), first_lanes_any(left - 16)))
                        : _mm512_setzero_ps();
      }
      transpose16_avx512(v);  // v[i]: pair i of the 16 columns
      uint16_t* d = vnni + s * 1024 + h * 512;
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(d + 32 * i, v[i]);
    }
}

// gemm_amx_nt's body: A's rows copied into tiles, B's 32-row panels transposed (16 x 16 pairs in registers) into VNNI
// tiles, K block by K block.
__attribute__((target("avx512f,avx512bw"))) void amx_nt_driver(int64_t M, int64_t N, int64_t K, const uint16_t* A,
                                                               int64_t lda, const uint16_t* B, int64_t ldb,
                                                               bool accumulate, float* C, int64_t ldc) {
  const int64_t panels = (M + 15) / 16;
  thread_local std::vector<uint16_t> a_buffer, b_buffer;
  a_buffer.resize(panels * (kAmxKC / 32) * 512 + 32);
  b_buffer.resize(kAmxKC / 32 * 1024 + 32);
  uint16_t* const a_tiles = align64(a_buffer.data());
  uint16_t* const vnni = align64(b_buffer.data());
  const bool tiles = amx_supported();  // (else AVX512-BF16: dot_tiles)
  if (tiles) amx_configure();
  for (int64_t pc = 0; pc < K; pc += kAmxKC) {
    const int64_t kc = std::min(kAmxKC, K - pc), steps = (kc + 31) / 32;
    const bool acc = accumulate || pc > 0;
    // A: tile (panel p, step s) at a_tiles + (p * steps + s) * 512, row m = A's row 16p + m (zero past M)
    for (int64_t r = 0; r < panels * 16; ++r)
      for (int64_t s = 0; s < steps; ++s) {
        uint16_t* d = a_tiles + (r / 16 * steps + s) * 512 + r % 16 * 32;
        const int64_t left = kc - 32 * s;
        const __m512i v =
            r < M ? load32_avx512(A + r * lda + pc + 32 * s, first_lanes_any(left), first_lanes_any(left - 16))
                  : _mm512_setzero_si512();
        _mm512_store_si512(d, v);
      }
    for (int64_t jr = 0; jr < N; jr += 32) {
      vnni_panel(B + jr * ldb + pc, ldb, N - jr, kc, vnni);
      const int cols = static_cast<int>(std::min<int64_t>(32, N - jr));
      const char* b = reinterpret_cast<const char*>(vnni);
      for (int64_t ir = 0; ir < M; ir += 32) {
        const int rows = static_cast<int>(std::min<int64_t>(32, M - ir));
        const AmxA a{reinterpret_cast<const char*>(a_tiles + ir / 16 * steps * 512), 64, 1024, steps * 1024};
        if (tiles) amx_tiles<true>(steps, a, b, C + ir * ldc + jr, ldc, rows, cols, acc);
        else dot_tiles(steps, a, b, C + ir * ldc + jr, ldc, rows, cols, acc);
      }
    }
  }
  if (tiles) amx_release();
}

// gemm_amx_taps' body for taps [t0, t1): per 2 x 2 block of C tiles (32 rows x 32 columns), every (tap, K step)
// loads two A tiles (its weights) and two B tiles (the pair rows at the tap's shift) for four products; C starts at
// zero (t0 == 0) or from c, and leaves the tiles once.
template <int MT>
__attribute__((target("amx-tile,amx-bf16"))) void amx_taps_block(int64_t N, int64_t t0, int64_t t1, int64_t T,
                                                                 int64_t KB, int64_t kp, const uint16_t* a,
                                                                 const uint32_t* b, int64_t ldb, const int64_t* shift,
                                                                 float* c, int64_t ldc) {
  const int64_t a_tile = 32 * kp, a_rows = 4 * kp, b_rows = 4 * ldb, c_rows = 4 * ldc;  // (elements; bytes)
  const int64_t a_block = T * KB * a_tile;  // the next 16 rows' tiles
  for (int64_t j = 0; j < N; j += 32) {
    if (t0 == 0) {
      _tile_zero(0);
      _tile_zero(1);
      if constexpr (MT == 2) {
        _tile_zero(2);
        _tile_zero(3);
      }
    } else {
      _tile_loadd(0, c + j, c_rows);
      _tile_loadd(1, c + j + 16, c_rows);
      if constexpr (MT == 2) {
        _tile_loadd(2, c + 16 * ldc + j, c_rows);
        _tile_loadd(3, c + 16 * ldc + j + 16, c_rows);
      }
    }
    const uint16_t* at = a + t0 * KB * a_tile;
    for (int64_t t = t0; t < t1; ++t) {
      const uint32_t* bt = b + j + shift[t];
      for (int64_t kb = 0; kb < KB; ++kb, at += a_tile, bt += kp * ldb) {
        _tile_loadd(4, at, a_rows);
        _tile_loadd(6, bt, b_rows);
        _tile_loadd(7, bt + 16, b_rows);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        if constexpr (MT == 2) {
          _tile_loadd(5, at + a_block, a_rows);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
    }
    _tile_stored(0, c + j, c_rows);
    _tile_stored(1, c + j + 16, c_rows);
    if constexpr (MT == 2) {
      _tile_stored(2, c + 16 * ldc + j, c_rows);
      _tile_stored(3, c + 16 * ldc + j + 16, c_rows);
    }
  }
}

// Taps a pass of amx_taps_block: as many as A tiles of at most half of L1, so that they stay there across the pass
// while C goes to memory and back between passes (stride-1 3d k=3 layer, 32 channels, 3 passes of 9 taps: x0.88
// time of one pass of 27 (54 KiB of A tiles, read from L2 for every block); dilated x0.85; passes of 7 taps x0.97,
// of 14 and 13 x0.90)
constexpr int64_t kAmxTapGroupBytes = int64_t(24) << 10;

__attribute__((target("amx-tile,amx-bf16"))) void amx_taps_driver(int64_t MB, int64_t N, int64_t T, int64_t KB,
                                                                  int64_t kp, const uint16_t* a, const uint32_t* b,
                                                                  int64_t ldb, const int64_t* shift, float* c,
                                                                  int64_t ldc) {
  AmxConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  cfg.colsb[4] = cfg.colsb[5] = static_cast<uint16_t>(4 * kp);  // A: 16 rows of kp pairs
  cfg.rows[6] = cfg.rows[7] = static_cast<uint8_t>(kp);         // B: kp pair rows of 16 columns
  _tile_loadconfig(&cfg);
  const int64_t a_block = T * KB * 32 * kp;
  for (int64_t mb = 0; mb < MB; mb += 2) {
    const int64_t mt = std::min<int64_t>(2, MB - mb), per_tap = mt * KB * 64 * kp;
    const int64_t most = std::max<int64_t>(1, kAmxTapGroupBytes / per_tap), groups = (T + most - 1) / most;
    const int64_t tg = (T + groups - 1) / groups;
    for (int64_t t0 = 0; t0 < T; t0 += tg) {
      const int64_t t1 = std::min(T, t0 + tg);
      if (mt == 2) amx_taps_block<2>(N, t0, t1, T, KB, kp, a + mb * a_block, b, ldb, shift, c + 16 * mb * ldc, ldc);
      else amx_taps_block<1>(N, t0, t1, T, KB, kp, a + mb * a_block, b, ldb, shift, c + 16 * mb * ldc, ldc);
    }
  }
  _tile_release();
}

// amx_pair_rows' body for source steps (`inner`) of 1 or 2: 16 positions a step, the lanes inside [a, b) loaded (the
// others neither read nor kept; at step 2 only the even elements), the two channels' values merged.
__attribute__((target("avx512f,avx512bw,avx512vl,bmi2"))) void pair_rows_avx512(const uint16_t* c0, const uint16_t* c1,
                                                                               int64_t ld_src, int64_t inner,
                                                                               int64_t rows, int64_t a, int64_t b,
                                                                               int64_t width, uint32_t* dst) {
  const auto at = [](const uint16_t* p, int64_t i) {  // (p + i, which may lie before p: only loaded lanes count)
    return reinterpret_cast<const uint16_t*>(reinterpret_cast<uintptr_t>(p) + uintptr_t(i * 2));
  };
  for (int64_t r = 0; r < rows; ++r, dst += width) {
    for (int64_t j = 0; j < width; j += 16) {
      const __mmask16 m = first_lanes_any(b - j) & ~first_lanes_any(a - j);
      const __m512i lo = load_step16_raw_avx512(at(c0, r * ld_src + (j - a) * inner), inner, m);
      const __m512i hi = c1 ? _mm512_slli_epi32(
                                  load_step16_raw_avx512(at(c1, r * ld_src + (j - a) * inner), inner, m), 16)
                            : _mm512_setzero_si512();
      _mm512_mask_storeu_epi32(dst + j, first_lanes_any(width - j), _mm512_or_si512(lo, hi));
    }
  }
}
#pragma GCC diagnostic pop
#endif

// gemm_driver, or amx_driver for an AMX tile.
template <typename T>
void gemm_any(GemmTile tile, int64_t M, int64_t N, int64_t K, const T* a_packed, int64_t a_stride, const T* b_packed,
              const T* const* b_rows, const int64_t* b_cols, bool accumulate, T* C, int64_t ldc) {
#if TORCH_CONVT_AMX
  if constexpr (std::is_same_v<T, float>) {
    if (tile.amx) {
      if (M <= 0 || N <= 0) return;
      if (K > 0) return amx_driver(M, N, K, a_packed, a_stride, b_packed, b_rows, b_cols, accumulate, C, ldc);
    }
  }
#endif
  gemm_driver<T>(tile, M, N, K, a_packed, a_stride, b_packed, b_rows, b_cols, accumulate, C, ldc);
}
}  // namespace

bool amx_bf16() {
#if TORCH_CONVT_AMX
  return amx_wanted.load(std::memory_order_relaxed) && amx_supported();
#else
  return false;
#endif
}

bool bf16_dot() {
#if TORCH_CONVT_AMX
  return amx_wanted.load(std::memory_order_relaxed) && (amx_supported() || avx512_bf16_supported());
#else
  return false;
#endif
}

bool set_amx(bool on) {
  const bool was = bf16_dot();
#if TORCH_CONVT_AMX
  amx_wanted.store(on, std::memory_order_relaxed);
#endif
  return was;
}

void gemm_amx_nt(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                 bool accumulate, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.0f);
    return;
  }
#if TORCH_CONVT_AMX
  amx_nt_driver(M, N, K, A, lda, B, ldb, accumulate, C, ldc);
#endif
}

int64_t amx_vnni_size(int64_t N, int64_t K) {
  return (N + 31) / 32 * ((K + 31) / 32) * 1024;
}

void amx_vnni_rows(const uint16_t* rows, int64_t ld, int64_t N, int64_t K, uint16_t* vnni) {
#if TORCH_CONVT_AMX
  for (int64_t jr = 0; jr < N; jr += 32, vnni += (K + 31) / 32 * 1024) vnni_panel(rows + jr * ld, ld, N - jr, K, vnni);
#endif
}

void gemm_amx_rows(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint16_t* vnni, float* C,
                   int64_t ldc) {
  if (M <= 0 || N <= 0 || K <= 0) return;
#if TORCH_CONVT_AMX
  const int64_t steps = (K + 31) / 32;
  amx_configure();
  for (int64_t jr = 0; jr < N; jr += 32) {
    const char* b = reinterpret_cast<const char*>(vnni + jr / 32 * steps * 1024);
    const int cols = static_cast<int>(std::min<int64_t>(32, N - jr));
    for (int64_t ir = 0; ir < M; ir += 32) {
      const int rows = static_cast<int>(std::min<int64_t>(32, M - ir));
      const int64_t row_bytes = lda * int64_t(sizeof(uint16_t));
      amx_tiles<false>(steps, AmxA{reinterpret_cast<const char*>(a + ir * lda), row_bytes, 64, 16 * row_bytes}, b,
                       C + ir * ldc + jr, ldc, rows, cols, true);
    }
  }
  amx_release();
#endif
}

void gemm_amx_taps(int64_t MB, int64_t N, int64_t T, int64_t KB, int64_t kp, const uint16_t* a, const uint32_t* b,
                   int64_t ldb, const int64_t* shift, float* C, int64_t ldc) {
  if (MB <= 0 || N <= 0) return;
#if TORCH_CONVT_AMX
  amx_taps_driver(MB, N, T, KB, kp, a, b, ldb, shift, C, ldc);
#endif
}

void amx_pair_rows(const uint16_t* c0, const uint16_t* c1, int64_t ld_src, int64_t inner, int64_t rows, int64_t a,
                   int64_t b, int64_t width, uint32_t* dst) {
#if TORCH_CONVT_AMX
  if ((inner == 1 || inner == 2) && amx_supported()) return pair_rows_avx512(c0, c1, ld_src, inner, rows, a, b, width, dst);
#endif
  for (int64_t r = 0; r < rows; ++r, dst += width, c0 += ld_src, c1 = c1 ? c1 + ld_src : nullptr) {
    std::fill(dst, dst + a, 0u);
    for (int64_t j = a; j < b; ++j)
      dst[j] = uint32_t(c0[(j - a) * inner]) | (c1 ? uint32_t(c1[(j - a) * inner]) << 16 : 0u);
    std::fill(dst + b, dst + width, 0u);
  }
}

void amx_pack_a(float* a, int64_t M, int64_t K) {
#if TORCH_CONVT_AMX
  amx_pack_a_avx512(a, M, K);
#endif
}

void amx_pack_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t K, float* panel) {
#if TORCH_CONVT_AMX
  amx_pack_rows_avx512(src, ld, rows, K, panel);
#endif
}

template <typename T>
void gemm_packed(GemmTile tile, int64_t M, int64_t N, int64_t K, const T* a_packed, const T* b_packed,
                 bool accumulate, T* C, int64_t ldc, int64_t a_stride) {
  gemm_any<T>(tile, M, N, K, a_packed, a_stride > 0 ? a_stride : K * tile.mr, b_packed, nullptr, nullptr, accumulate,
              C, ldc);
}

template <typename T>
void gemm_rows(GemmTile tile, int64_t M, int64_t N, int64_t K, const T* a_packed, const T* const* b_rows,
               bool accumulate, T* C, int64_t ldc, const int64_t* cols) {
  gemm_any<T>(tile, M, N, K, a_packed, K * tile.mr, nullptr, b_rows, cols, accumulate, C, ldc);
}

template <typename T>
int64_t gemm_copied_rows(GemmTile tile) {
  return kCopyPanels * tile.mr;
}

template <typename T>
int64_t gemm_run_width() {
  return kernel<T>().halves[kernel<T>().mr] ? kernel<T>().nr / 2 : kernel<T>().nr;
}

template <typename T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc) {
  if (M <= 0 || N <= 0 || K <= 0) return;
  // B rows outermost: NB rows of B stay in L1 while every row block of A streams past them.
  for (int64_t n0 = 0; n0 < N; n0 += kDotNB) {
    const int nb = static_cast<int>(std::min<int64_t>(kDotNB, N - n0));
    for (int64_t m0 = 0; m0 < M; m0 += kDotMB) {
      const int mb = static_cast<int>(std::min<int64_t>(kDotMB, M - m0));
      dot_block<T>(mb, nb)(K, A + m0 * lda, lda, B + n0 * ldb, ldb, C + m0 * ldc + n0, ldc);
    }
  }
}

bool pack_rows_simd(const float* src, int64_t row_stride, int64_t rows, int64_t depth, int64_t width, float* dst) {
#if TORCH_CONVT_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512 && width <= 32) {
    pack_rows_avx512(src, row_stride, rows, depth, width, dst);
    return true;
  }
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) {
    pack_rows_avx2(src, row_stride, rows, depth, width, dst);
    return true;
  }
#endif
  return false;
}

namespace {
// Stores of interleaved rows (store_interleaved): D is float, or uint16_t for 16-bit floats rounded as c10 rounds.
uint16_t narrow16_portable(float v, bool bf16) {
  return bf16 ? c10::BFloat16(v).x : c10::Half(v).x;
}

// dst[step*j + w] = rows[w][j] + bias for j in [j0, j1), w < ways.
template <typename D>
void store_points_portable(const float* const* rows, int64_t ways, int64_t step, float bias, int64_t j0, int64_t j1,
                           D* dst, bool bf16) {
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t w = 0; w < ways; ++w) {
      const float v = rows[w][j] + bias;
      if constexpr (std::is_same_v<D, float>) {
        dst[step * j + w] = v;
      } else {
        dst[step * j + w] = narrow16_portable(v, bf16);
      }
    }
}

// The points of a run that every row stores: all but the last where the run drops `trim` values of it (StoreRun),
// whose first ways - trim values are stored here. Returns their end.
template <typename D>
int64_t store_trimmed_point(const float* const* rows, int64_t ways, int64_t step, float bias, const StoreRun& run,
                            D* dst, bool bf16) {
  if (run.trim == 0) return run.stop;
  store_points_portable(rows, ways - run.trim, step, bias, run.stop - 1, run.stop, dst, bf16);
  return run.stop - 1;
}

template <typename D>
void store_runs_portable(const float* const* rows, int64_t ways, int64_t step, const StoreChannels& ch,
                         const StoreRun* runs, int64_t count, D* dst, bool bf16) {
  const float* r[kMaxStoreWays];
  for (int64_t k = 0; k < ch.channels; ++k) {
    const float bias = ch.bias ? ch.bias[k] : 0.0f;
    for (const StoreRun* run = runs; run != runs + count; ++run) {
      for (int64_t w = 0; w < ways; ++w) r[w] = rows[w] + k * ch.ld + run->src;
      D* d = dst + k * ch.dst_stride + run->dst;
      const int64_t n = store_trimmed_point(r, ways, step, bias, *run, d, bf16);
      store_points_portable(r, ways, step, bias, run->first, n, d, bf16);
    }
  }
}

#if TORCH_CONVT_X86
// (GCC 12 warns inside its own AVX-512 intrinsics, whose "undefined" pass-through operands it takes for uninitialised)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The 16 pairs (a_j, c_j) as 32 16-bit floats, interleaved: each pair is one 32-bit lane (a low, c high), so no
// permutes.
__attribute__((target("avx512f"))) inline __m512i pairs16_avx512(__m512 va, __m512 vc, bool bf16) {
  if (bf16)  // (a >> 16) | (c & 0xffff0000)
    return _mm512_ternarylogic_epi32(_mm512_srli_epi32(bf16_high_avx512(va), 16), bf16_high_avx512(vc),
                                     _mm512_set1_epi32(int(0xFFFF0000u)), 0xF8);  // A | (B & C)
  const __m512i ha = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(va, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m512i hc = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(vc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return _mm512_or_si512(ha, _mm512_slli_epi32(hc, 16));
}

// 16 values (a 64-byte line of float, 32 bytes of 16-bit floats) at dst.
__attribute__((target("avx512f"))) inline void put16_avx512(__m512 v, float* dst, bool, bool stream) {
  if (stream) {
    _mm512_stream_ps(dst, v);
  } else {
    _mm512_storeu_ps(dst, v);
  }
}
__attribute__((target("avx512f"))) inline void put16_avx512(__m512 v, uint16_t* dst, bool bf16, bool stream) {
  if (stream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), narrow16_avx512(v, bf16));
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), narrow16_avx512(v, bf16));
  }
}

// Points [j, j + cnt) (cnt <= 16) of W rows plus the bias, vector w from row w. A part block (cnt < 16) loads under
// a mask, so no point outside it is read (the lanes past cnt hold the bias).
template <int W>
__attribute__((target("avx512f"), always_inline)) inline void load_points_avx512(const float* const* r, __m512 vb,
                                                                                 int64_t j, int cnt, __m512* v) {
  const __mmask16 m = first_lanes(cnt);
#pragma GCC unroll 16
  for (int w = 0; w < W; ++w)
    v[w] = _mm512_add_ps(cnt == 16 ? _mm512_loadu_ps(r[w] + j) : _mm512_maskz_loadu_ps(m, r[w] + j), vb);
}

// The same points of W rows (a power of two) interleaved into W vectors in output order: log2(W) rounds of
// pairwise interleaving, in which vector i is interleaved with vector i + W/2 into vectors 2i and 2i + 1 (W = 8: 24
// permutes for 128 values).
template <int W>
__attribute__((target("avx512f"), always_inline)) inline void interleave_avx512(const float* const* r, __m512 vb,
                                                                                int64_t j, int cnt, __m512* v) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  load_points_avx512<W>(r, vb, j, cnt, v);
#pragma GCC unroll 4
  for (int h = 1; h < W; h *= 2) {
    __m512 u[W];
#pragma GCC unroll 8
    for (int i = 0; i < W / 2; ++i) {
      u[2 * i] = _mm512_permutex2var_ps(v[i], lo, v[i + W / 2]);
      u[2 * i + 1] = _mm512_permutex2var_ps(v[i], hi, v[i + W / 2]);
    }
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) v[i] = u[i];
  }
}

// Points [j, j + cnt) of W rows interleaved (interleave_avx512) and stored: where the points lie `step` > W apart,
// the vectors go through a buffer from which each point's W values are copied. A part block stores under masks,
// so no point outside it is written, and no call is made: a run loop with calls in it would rebuild its vector
// constants on every run, which cost as much as the stores where runs are one block long.
template <int W, bool Dense, typename D>
__attribute__((target("avx512f"), always_inline)) inline void store_block_avx512(const float* const* r, __m512 vb,
                                                                                 int64_t j, int cnt, int64_t step,
                                                                                 D* d, bool bf16, bool stream) {
  const bool full = cnt == 16;
  __m512 v[W];
  if constexpr (W == 2 && Dense && !std::is_same_v<D, float>) {  // (a point's two 16-bit values are one 32-bit lane)
    load_points_avx512<W>(r, vb, j, cnt, v);
    const __m512i p = pairs16_avx512(v[0], v[1], bf16);
    if (!full) {
      _mm512_mask_storeu_epi32(d + 2 * j, first_lanes(cnt), p);
    } else if (stream) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 2 * j), p);
    } else {
      _mm512_storeu_si512(d + 2 * j, p);
    }
    return;
  }
  interleave_avx512<W>(r, vb, j, cnt, v);
  if (Dense && full) {
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) put16_avx512(v[i], d + W * j + 16 * i, bf16, stream);
  } else if (Dense && (std::is_same_v<D, float> || W > 1)) {
    // vector i holds values [16i, 16i + 16) of the W * cnt (16-bit values: an even count, whole 32-bit lanes;
    // W = 1 takes the buffer below, as masks of 16-bit lanes need AVX512BW)
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) {
      const int c = std::clamp(W * cnt - 16 * i, 0, 16);
      if (c == 0) break;
      if constexpr (std::is_same_v<D, float>) {
        _mm512_mask_storeu_ps(d + W * j + 16 * i, static_cast<__mmask16>((1u << c) - 1), v[i]);
      } else {
        _mm512_mask_storeu_epi32(d + W * j + 16 * i, static_cast<__mmask16>((1u << (c / 2)) - 1),
                                 _mm512_castsi256_si512(narrow16_avx512(v[i], bf16)));
      }
    }
  } else {
    alignas(64) D buf[16 * W];
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) put16_avx512(v[i], buf + 16 * i, bf16, false);
    for (int q = 0; q < cnt; ++q) std::memcpy(d + step * (j + q), buf + W * q, W * sizeof(D));
  }
}

// A 64-byte line of dst being put together across the runs of store_runs_streamed_avx512: lanes [from, fill) of
// the vector held beside it (nullptr: none). A run that goes on where it stops fills it further, and a line full
// from lane 0 is streamed; any other is stored plainly, under a mask, once the next values go elsewhere. So a line
// that one row ends in and the next row starts in (rows contiguous in dst and stored in that order: 201-wide rows
// of the k=3, s=2 seed layer) is written once, whole, instead of by two plain stores, each of which reads the line
// first (interleaved with the streamed lines, those plain stores halved the write bandwidth).
struct PartLine {
  float* at = nullptr;
  int from = 0, fill = 0;
};

__attribute__((target("avx512f"), always_inline)) inline void part_flush(PartLine& pl, __m512 pv) {
  if (pl.at) _mm512_mask_storeu_ps(pl.at, static_cast<__mmask16>(first_lanes(pl.fill) & ~first_lanes(pl.from)), pv);
  pl.at = nullptr;
}

// Values [0, cnt) of v, which belong at p, `sh` floats into its line (sh + cnt <= 16): into the part line where they
// go on from it, else into a new one (the old one stored).
__attribute__((target("avx512f"), always_inline)) inline void part_put(PartLine& pl, __m512& pv, float* p, int sh,
                                                                       int cnt, __m512 v) {
  if (cnt <= 0) return;
  if (pl.at && pl.at + pl.fill != p) part_flush(pl, pv);
  if (!pl.at) pl.at = p - sh, pl.from = pl.fill = sh;
  const __m512i up = _mm512_sub_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                      _mm512_set1_epi32(sh));  // lane i takes v[i - sh]
  pv = _mm512_mask_permutexvar_ps(pv, static_cast<__mmask16>(first_lanes(sh + cnt) & ~first_lanes(sh)), up, v);
  pl.fill = sh + cnt;
  if (pl.fill < 16) return;
  if (pl.from == 0) {
    _mm512_stream_ps(pl.at, pv);
    pl.at = nullptr;
  } else {
    part_flush(pl, pv);
  }
}

// A dense float run [j, n) of W > 1 rows (less `trim` values at its end) whose first value lies `sh` floats past a
// 64-byte line, where sh is not a multiple of W (2 phases interleaved in output rows of an odd width: every other
// row), so no point starts a line: each whole line of it is put together from two consecutive output vectors (one
// permute) and streamed, and the part lines at its ends go through the PartLine.
template <int W>
__attribute__((target("avx512f"), always_inline)) inline void store_run_shifted_avx512(const float* const* r, __m512 vb,
                                                                                       int64_t j, int64_t n, int trim,
                                                                                       float* d, int sh, PartLine& pl,
                                                                                       __m512& pv) {
  float* const base = d + W * j;  // the run's value 0
  const int64_t values = W * (n - j) - trim;
  const int a = 16 - sh;  // values before the first line boundary: line L is values [a + 16L, a + 16L + 16)
  const __m512i shift = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(a));
  __m512 prev = _mm512_setzero_ps();
  int64_t k = 0;  // output vectors so far (vector k holds values [16k, 16k + 16))
  for (int64_t q = j; q < n; q += 16) {
    __m512 v[W];
    interleave_avx512<W>(r, vb, q, static_cast<int>(std::min<int64_t>(16, n - q)), v);
    for (int i = 0; i < W && 16 * k < values; ++i, ++k) {
      if (k == 0) {
        part_put(pl, pv, base, sh, static_cast<int>(std::min<int64_t>(a, values)), v[0]);
      } else {  // line k - 1: values a..15 of vector k - 1, then 0..a-1 of vector k
        const int64_t at = a + 16 * (k - 1), left = values - at;
        const __m512 line = _mm512_permutex2var_ps(prev, shift, v[i]);
        if (left >= 16) {
          _mm512_stream_ps(base + at, line);
        } else {
          part_put(pl, pv, base + at, 0, static_cast<int>(left), line);
        }
      }
      prev = v[i];
    }
  }
  const int64_t at = a + 16 * (k - 1);  // the last vector's values from a on
  if (k > 0 && at < values)
    part_put(pl, pv, base + at, 0, static_cast<int>(values - at),
             _mm512_permutex2var_ps(prev, shift, _mm512_setzero_ps()));
}

constexpr int64_t kPrefetchRuns = 4;  // store_runs_streamed_avx512: runs ahead whose part lines are fetched

// store_runs_avx512 for float, streamed (dense): a run's whole lines are streamed, its part lines (a head up to the
// first line boundary, a tail) put together with those of the runs next to it in dst (PartLine). Where no point
// starts a line (sh below not a multiple of W), store_run_shifted_avx512 puts the lines together. A function of its
// own, with no call in its loop, so that the loop of the others keeps its vector constants in registers (MONAI k=3
// forward, runs of 16 points: x1.04 time when one loop held both).
template <int W>
__attribute__((target("avx512f,prfchw"))) void store_runs_streamed_avx512(const float* const* rows,
                                                                          const StoreChannels& ch, const StoreRun* runs,
                                                                          int64_t count, float* dst) {
  const auto start = [&](int64_t q) { return runs[q].dst + W * runs[q].first; };  // (offsets in a channel)
  const auto end = [&](int64_t q) { return runs[q].dst + W * runs[q].stop - runs[q].trim; };
  const float* r[W];
  PartLine pl;
  __m512 pv = _mm512_setzero_ps();
  for (int64_t k = 0; k < ch.channels; ++k) {
    const __m512 vb = _mm512_set1_ps(ch.bias ? ch.bias[k] : 0.0f);
    float* dk = dst + k * ch.dst_stride;
    for (int64_t q = 0; q < count; ++q) {
      const StoreRun* run = runs + q;
      int64_t j = run->first;
      const int64_t n = run->stop;
      if (j >= n) continue;
      for (int w = 0; w < W; ++w) r[w] = rows[w] + k * ch.ld + run->src;
      float* d = dk + run->dst;
      const int sh = static_cast<int>(reinterpret_cast<uintptr_t>(d + W * j) >> 2 & 15);  // floats into a line
      const int trim = static_cast<int>(run->trim);
      if (sh != 0) {
        // Runs that start inside a line (rows whose width is not a multiple of 16 values): the part lines at the
        // ends of the run kPrefetchRuns on (in this channel or the next) that no run next to it shares are fetched
        // for writing now, so that their plain stores do not each wait for memory in turn (the k=3, s=2 seed layer
        // before its rows were stored as one stream, 201-wide rows: x0.94 time).
        int64_t ahead = q + kPrefetchRuns, next = 0;  // (next: channels on)
        if (ahead >= count) ahead -= count, next = 1;
        if (ahead < count && k + next < ch.channels) {
          const float* at = dk + next * ch.dst_stride;
          if ((reinterpret_cast<uintptr_t>(at + start(ahead)) & 63) && (ahead == 0 || end(ahead - 1) != start(ahead)))
            __builtin_prefetch(at + start(ahead), 1, 3);
          if ((reinterpret_cast<uintptr_t>(at + end(ahead)) & 63) &&
              (ahead + 1 == count || start(ahead + 1) != end(ahead)))
            __builtin_prefetch(at + end(ahead) - 1, 1, 3);
        }
      }
      if (sh % W != 0) {
        store_run_shifted_avx512<W>(r, vb, j, n, trim, d, sh, pl, pv);
        continue;
      }
      __m512 v[W];
      if (sh != 0) {
        const int64_t head = std::min(n, j + (16 - sh) / W);  // (then d + W * head starts a line)
        interleave_avx512<W>(r, vb, j, static_cast<int>(head - j), v);
        part_put(pl, pv, d + W * j, sh, static_cast<int>(W * (head - j) - (head == n ? trim : 0)), v[0]);
        j = head;
      }
      for (; j + 16 <= n - (trim > 0); j += 16) store_block_avx512<W, true>(r, vb, j, 16, W, d, false, true);
      if (j < n) {  // the last points: whole lines streamed, the part line kept
        interleave_avx512<W>(r, vb, j, static_cast<int>(n - j), v);
        const int64_t values = W * (n - j) - trim;
#pragma GCC unroll 16
        for (int i = 0; i < W; ++i) {
          const int64_t c = std::clamp<int64_t>(values - 16 * i, 0, 16);
          if (c == 16) {
            _mm512_stream_ps(d + W * j + 16 * i, v[i]);
          } else {
            part_put(pl, pv, d + W * j + 16 * i, 0, static_cast<int>(c), v[i]);
          }
        }
      }
    }
  }
  part_flush(pl, pv);
}

// The runs of every channel (store_interleaved), 16 points at a time; Dense: step == W (one instance each, as
// the code of the other would be hoisted into every run). With `stream` (Dense), whole 64-byte lines of dst are
// written with non-temporal stores (a run's head up to the first line boundary, and its tail, are stored plainly;
// float: store_runs_streamed_avx512).
template <int W, bool Dense, typename D>
__attribute__((target("avx512f"))) void store_runs_avx512(const float* const* rows, int64_t step,
                                                          const StoreChannels& ch, const StoreRun* runs, int64_t count,
                                                          D* dst, bool bf16, bool stream) {
  constexpr uintptr_t kPoint = W * sizeof(D);  // bytes of one point's W values
  if constexpr (Dense) step = W;
  stream = stream && Dense && (W > 1 || std::is_same_v<D, float>) && (kPoint >= 64 || 64 % kPoint == 0);
  if constexpr (std::is_same_v<D, float> && Dense) {
    if (stream) return store_runs_streamed_avx512<W>(rows, ch, runs, count, dst);
  }
  const float* r[W];
  for (int64_t k = 0; k < ch.channels; ++k) {
    const __m512 vb = _mm512_set1_ps(ch.bias ? ch.bias[k] : 0.0f);
    D* dk = dst + k * ch.dst_stride;
    for (const StoreRun* run = runs; run != runs + count; ++run) {
      for (int w = 0; w < W; ++w) r[w] = rows[w] + k * ch.ld + run->src;
      D* d = dk + run->dst;
      int64_t j = run->first;
      const int64_t n = store_trimmed_point(r, W, step, ch.bias ? ch.bias[k] : 0.0f, *run, d, bf16);
      bool aligned = false;
      if (stream && j < n) {
        int64_t head = j;
        while (head < n && (reinterpret_cast<uintptr_t>(d + W * head) & 63) != 0) ++head;
        aligned = (reinterpret_cast<uintptr_t>(d + W * head) & 63) == 0;
        if (aligned && head > j) {  // (fewer than 16 points: 64 / kPoint at most)
          store_block_avx512<W, Dense>(r, vb, j, static_cast<int>(head - j), step, d, bf16, false);
          j = head;
        }
      }
      for (; j + 16 <= n; j += 16) store_block_avx512<W, Dense>(r, vb, j, 16, step, d, bf16, aligned);
      if (j < n) store_block_avx512<W, Dense>(r, vb, j, static_cast<int>(n - j), step, d, bf16, false);
    }
  }
}
#pragma GCC diagnostic pop
#endif

#if TORCH_CONVT_X86
// ---- store_interleaved on AVX2 (+ F16C for half): 8 points of W rows a block, interleaved in registers; the
// points past a run's last whole block, and 16-bit values, as store_runs_portable rounds them. (The portable loop
// was 42% of the bfloat16 3d U-Net k=2 forward on an AVX2 CPU, where it made bfloat16 x1.35 the float time.)

// 8 values at dst: floats, or 16-bit floats (bfloat16 where `bf16`, else IEEE half).
__attribute__((target("avx2"))) inline void put8_avx2(__m256 v, float* dst, bool, bool stream) {
  if (stream) {
    _mm256_stream_ps(dst, v);
  } else {
    _mm256_storeu_ps(dst, v);
  }
}
__attribute__((target("avx2,f16c"))) inline void put8_avx2(__m256 v, uint16_t* dst, bool bf16, bool) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), narrow8_avx2(v, bf16));
}

// 16 values at dst (a's 8, then b's) as 16-bit floats, in one 32-byte store (non-temporal where `stream`).
__attribute__((target("avx2,f16c"))) inline void put16_avx2(__m256 a, __m256 b, uint16_t* dst, bool bf16,
                                                             bool stream) {
  __m256i h;
  if (bf16) {  // (packus interleaves the halves by 128-bit lane: a0-3 b0-3 a4-7 b4-7, put back in order)
    h = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_low_avx2(a), bf16_low_avx2(b)), 0xD8);
  } else {
    h = _mm256_set_m128i(narrow8_avx2(b, false), narrow8_avx2(a, false));
  }
  if (stream) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), h);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), h);
  }
}

// Points [j, j + 8) of W rows (a power of two) plus the bias, interleaved into W vectors in output order (as
// interleave_avx512: vector i with vector i + W/2 into vectors 2i and 2i + 1, log2(W) rounds).
template <int W>
__attribute__((target("avx2"), always_inline)) inline void interleave_avx2(const float* const* r, __m256 vb, int64_t j,
                                                                           __m256* v) {
#pragma GCC unroll 16
  for (int w = 0; w < W; ++w) v[w] = _mm256_add_ps(_mm256_loadu_ps(r[w] + j), vb);
#pragma GCC unroll 4
  for (int h = 1; h < W; h *= 2) {
    __m256 u[W];
#pragma GCC unroll 8
    for (int i = 0; i < W / 2; ++i) {
      const __m256 lo = _mm256_unpacklo_ps(v[i], v[i + W / 2]), hi = _mm256_unpackhi_ps(v[i], v[i + W / 2]);
      u[2 * i] = _mm256_permute2f128_ps(lo, hi, 0x20);
      u[2 * i + 1] = _mm256_permute2f128_ps(lo, hi, 0x31);
    }
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) v[i] = u[i];
  }
}

// Points [j, n) of two interleaved float rows (dst[2i + w] = r[w][i] + bias) whose first 64-byte boundary falls on
// an odd float, 2j + 1 + 2h (h whole points before it): points [j, j + h) and the first value of point j + h stored
// plainly, then vectors that pair r[1][i] with r[0][i + 1] (the points split at the boundary) written as whole lines
// by non-temporal stores, the rest plainly.
__attribute__((target("avx2"))) void store_pair_rotated_avx2(const float* const* r, __m256 vb, float bias, int64_t j,
                                                             int64_t h, int64_t n, float* d) {
  store_points_portable(r, 2, 2, bias, j, j + h, d, false);
  j += h;
  d[2 * j] = r[0][j] + bias;
  const float* rot[2] = {r[1], r[0] + 1};
  for (; j + 9 <= n; j += 8) {
    __m256 v[2];
    interleave_avx2<2>(rot, vb, j, v);
    _mm256_stream_ps(d + 2 * j + 1, v[0]);
    _mm256_stream_ps(d + 2 * j + 9, v[1]);
  }
  for (; j < n; ++j) {
    d[2 * j + 1] = r[1][j] + bias;
    if (j + 1 < n) d[2 * j + 2] = r[0][j + 1] + bias;
  }
}

// The runs of every channel, 8 points at a time; Dense: step == W. With `stream` (dense: floats, or 16-bit values of
// two or more rows), the blocks that make up whole 64-byte lines are written with non-temporal stores. (16-bit, on
// an AVX2 CPU: two vectors a 32-byte store, the small bfloat16 3d U-Net k=2 forward x0.99 time; streamed, 16 MiB of
// its output x0.96.)
template <int W, bool Dense, typename D>
__attribute__((target("avx2,f16c"))) void store_runs_avx2(const float* const* rows, int64_t step,
                                                          const StoreChannels& ch, const StoreRun* runs, int64_t count,
                                                          D* dst, bool bf16, bool stream) {
  if constexpr (Dense) step = W;
  stream = stream && Dense && (W > 1 || std::is_same_v<D, float>);
  const float* r[W];
  for (int64_t k = 0; k < ch.channels; ++k) {
    const float bias = ch.bias ? ch.bias[k] : 0.0f;
    const __m256 vb = _mm256_set1_ps(bias);
    D* dk = dst + k * ch.dst_stride;
    for (const StoreRun* run = runs; run != runs + count; ++run) {
      for (int w = 0; w < W; ++w) r[w] = rows[w] + k * ch.ld + run->src;
      D* d = dk + run->dst;
      int64_t j = run->first;
      const int64_t n = store_trimmed_point(r, W, step, bias, *run, d, bf16);
      if constexpr (Dense && std::is_same_v<D, float>) {
        // (a run that starts inside a 64-byte line: plain stores up to the first line boundary, then whole lines;
        // where the boundary falls inside a point of two rows, of rotated pairs)
        if (stream && n - j >= 16) {
          const int64_t skip = int64_t((64 - reinterpret_cast<uintptr_t>(d + W * j) % 64) % 64 / sizeof(float));
          if (W == 2 && skip % 2 == 1) {
            store_pair_rotated_avx2(r, vb, bias, j, skip / 2, n, d);
            continue;
          }
          if (skip % W == 0) {
            store_points_portable(r, W, W, bias, j, j + skip / W, d, false);
            j += skip / W;
          }
        }
      }
      // Non-temporal stores write whole 64-byte lines only, the blocks [nt0, nt1): a line written partly by them and
      // partly by plain stores costs far more than plain stores. (Measured on an AVX2 CPU, alternated in one process:
      // bfloat16 pairs streamed in the first half of every line only, x8.5 the time; the k=3, s=2 seed layer, whose
      // lines of 201 floats start anywhere, streamed by whole lines after a plain head instead of where a block
      // happened to start a 32-byte line, x0.83-0.87 the time of its forward.)
      int64_t nt0 = j, nt1 = j;
      if (stream) {
        constexpr uintptr_t kBlock = 8 * W * sizeof(D);  // bytes a block stores: 32, or a multiple of 64
        const uintptr_t at = reinterpret_cast<uintptr_t>(d + W * j);
        if (at % std::min<uintptr_t>(kBlock, 64) == 0) {
          nt0 = j + (at % 64 == 0 ? 0 : 8);
          const int64_t unit = kBlock < 64 ? 16 : 8;  // points of whole lines
          nt1 = nt0 + std::max<int64_t>(0, n - nt0) / unit * unit;
        }
      }
      for (; j + 8 <= n; j += 8) {
        __m256 v[W];
        interleave_avx2<W>(r, vb, j, v);
        if constexpr (Dense) {
          const bool nt = j >= nt0 && j < nt1;
          if constexpr (std::is_same_v<D, float> || W == 1) {
#pragma GCC unroll 16
            for (int i = 0; i < W; ++i) put8_avx2(v[i], d + W * j + 8 * i, bf16, nt);
          } else {
#pragma GCC unroll 8
            for (int i = 0; i < W; i += 2) put16_avx2(v[i], v[i + 1], d + W * j + 8 * i, bf16, nt);
          }
        } else {
          alignas(32) D buf[8 * W];
#pragma GCC unroll 16
          for (int i = 0; i < W; ++i) put8_avx2(v[i], buf + 8 * i, bf16, false);
          for (int q = 0; q < 8; ++q) std::memcpy(d + step * (j + q), buf + W * q, W * sizeof(D));
        }
      }
      if (j < n) store_points_portable(r, W, step, bias, j, n, d, bf16);
    }
  }
  if (stream) _mm_sfence();
}
#endif

template <typename D>
void store_runs_any(const float* const* rows, int64_t ways, int64_t step, const StoreChannels& ch,
                    const StoreRun* runs, int64_t count, D* dst, bool bf16, bool stream) {
#if TORCH_CONVT_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  const bool dense = step == ways;
#define TORCH_CONVT_STORE_RUNS(ISA, W)                                                                \
  case W:                                                                                            \
    return dense ? store_runs_##ISA<W, true>(rows, step, ch, runs, count, dst, bf16, stream)         \
                 : store_runs_##ISA<W, false>(rows, step, ch, runs, count, dst, bf16, stream);
  if (avx512) {
    switch (ways) {
      TORCH_CONVT_STORE_RUNS(avx512, 1)
      TORCH_CONVT_STORE_RUNS(avx512, 2)
      TORCH_CONVT_STORE_RUNS(avx512, 4)
      TORCH_CONVT_STORE_RUNS(avx512, 8)
      TORCH_CONVT_STORE_RUNS(avx512, 16)
      default: break;
    }
  } else if (avx2) {
    switch (ways) {
      TORCH_CONVT_STORE_RUNS(avx2, 1)
      TORCH_CONVT_STORE_RUNS(avx2, 2)
      TORCH_CONVT_STORE_RUNS(avx2, 4)
      TORCH_CONVT_STORE_RUNS(avx2, 8)
      default: break;
    }
  }
#undef TORCH_CONVT_STORE_RUNS
#endif
  store_runs_portable(rows, ways, step, ch, runs, count, dst, bf16);
}
}  // namespace

void store_interleaved(const float* const* rows, int64_t ways, int64_t step, const StoreChannels& ch,
                       const StoreRun* runs, int64_t count, float* dst, bool stream) {
  store_runs_any(rows, ways, step, ch, runs, count, dst, false, stream);
}

void store_interleaved16(const float* const* rows, int64_t ways, int64_t step, const StoreChannels& ch,
                         const StoreRun* runs, int64_t count, uint16_t* dst, bool bf16, bool stream) {
  store_runs_any(rows, ways, step, ch, runs, count, dst, bf16, stream);
}

namespace {
float widen16_portable(uint16_t v, bool bf16) {
  return bf16 ? static_cast<float>(c10::BFloat16(v, c10::BFloat16::from_bits()))
              : static_cast<float>(c10::Half(v, c10::Half::from_bits()));
}

void widen16_panels_portable(const uint16_t* src, int64_t channel_stride, int64_t channels, int64_t count,
                             int64_t nr, float* dst, bool bf16) {
  for (int64_t j0 = 0; j0 < count; j0 += nr)
    for (int64_t c = 0; c < channels; ++c, dst += nr) {
      const uint16_t* s = src + c * channel_stride + j0;
      const int64_t n = std::min(nr, count - j0);
      for (int64_t j = 0; j < n; ++j) dst[j] = widen16_portable(s[j], bf16);
      for (int64_t j = n; j < nr; ++j) dst[j] = 0.0f;
    }
}

#if TORCH_CONVT_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // (as for the stores)
// 16 16-bit floats at s, widened.
template <bool BF16>
__attribute__((target("avx512f"))) inline __m512 widen16_avx512(const uint16_t* s) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
  return BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)) : _mm512_cvtph_ps(h);
}

template <bool BF16>
__attribute__((target("avx512f"))) void widen16_panels_avx512(const uint16_t* src, int64_t channel_stride,
                                                               int64_t channels, int64_t count, int64_t nr,
                                                               float* dst) {
  const auto widen = widen16_avx512<BF16>;
  for (int64_t j0 = 0; j0 < count; j0 += nr) {
    const int64_t n = std::min(nr, count - j0);
    const uint16_t* s = src + j0;
    if (n == nr) {  // (whole panels: the next panel's part of each channel is fetched while this one is widened)
      for (int64_t c = 0; c < channels; ++c, dst += nr, s += channel_stride) {
        _mm_prefetch(reinterpret_cast<const char*>(s + nr), _MM_HINT_T0);
        for (int64_t j = 0; j < nr; j += 16) _mm512_storeu_ps(dst + j, widen(s + j));
      }
      continue;
    }
    for (int64_t c = 0; c < channels; ++c, dst += nr, s += channel_stride) {
      int64_t j = 0;
      for (; j + 16 <= n; j += 16) _mm512_storeu_ps(dst + j, widen(s + j));
      for (; j < n; ++j) dst[j] = widen16_portable(s[j], BF16);
      for (; j < nr; ++j) dst[j] = 0.0f;
    }
  }
}
#pragma GCC diagnostic pop

// widen16_panels on AVX2 (+ F16C for half), 8 values a vector.
template <bool BF16>
__attribute__((target("avx2,f16c"))) void widen16_panels_avx2(const uint16_t* src, int64_t channel_stride,
                                                              int64_t channels, int64_t count, int64_t nr, float* dst) {
  for (int64_t j0 = 0; j0 < count; j0 += nr) {
    const int64_t n = std::min(nr, count - j0);
    const uint16_t* s = src + j0;
    const bool fetch = n == nr;  // (whole panels: as widen16_panels_avx512)
    for (int64_t c = 0; c < channels; ++c, dst += nr, s += channel_stride) {
      if (fetch) _mm_prefetch(reinterpret_cast<const char*>(s + nr), _MM_HINT_T0);
      int64_t j = 0;
      for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(dst + j, widen8_avx2(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j)), BF16));
      for (; j < n; ++j) dst[j] = widen16_portable(s[j], BF16);
      for (; j < nr; ++j) dst[j] = 0.0f;
    }
  }
}
#endif
}  // namespace

void widen16_panels(const uint16_t* src, int64_t channel_stride, int64_t channels, int64_t count, int64_t nr,
                    float* dst, bool bf16) {
#if TORCH_CONVT_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  if (avx512 && nr % 16 == 0)
    return bf16 ? widen16_panels_avx512<true>(src, channel_stride, channels, count, nr, dst)
                : widen16_panels_avx512<false>(src, channel_stride, channels, count, nr, dst);
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  if (avx2)
    return bf16 ? widen16_panels_avx2<true>(src, channel_stride, channels, count, nr, dst)
                : widen16_panels_avx2<false>(src, channel_stride, channels, count, nr, dst);
#endif
  widen16_panels_portable(src, channel_stride, channels, count, nr, dst, bf16);
}

namespace {
// copy_segments (and copy_segments16) on any CPU: dst = convert(src) on a segment's copy part, zero on the rest.
// (STEP: the source step where it is 1 or 2, which the compiler vectorises as copies and de-interleaving; 0: the
// runtime `step`. On AVX2 CPUs this is the path: the runtime step alone kept every copy scalar.)
template <int STEP, typename Src, typename Out, typename Convert>
void copy_segments_step(const Src* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                        int64_t count, int64_t step, Out* dst, int64_t dst_channel_stride, Convert convert) {
  if constexpr (STEP > 0) step = STEP;
  for (int64_t c = 0; c < channels; ++c) {
    const Src* in = src + c * src_channel_stride;
    Out* out = dst + c * dst_channel_stride;
    for (const Segment* sg = segments; sg != segments + count; ++sg) {
      std::fill(out + sg->j0, out + sg->a, Out(0));
      const Src* from = in + sg->offset;
      for (int64_t j = sg->a; j < sg->b; ++j) out[j] = convert(from[j * step]);
      std::fill(out + sg->b, out + sg->j1, Out(0));
    }
  }
}

template <typename Src, typename Out, typename Convert>
void copy_segments_portable(const Src* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                            int64_t count, int64_t step, Out* dst, int64_t dst_channel_stride, Convert convert) {
  if (step == 1)
    return copy_segments_step<1>(src, src_channel_stride, channels, segments, count, step, dst, dst_channel_stride,
                                 convert);
  if (step == 2)
    return copy_segments_step<2>(src, src_channel_stride, channels, segments, count, step, dst, dst_channel_stride,
                                 convert);
  copy_segments_step<0>(src, src_channel_stride, channels, segments, count, step, dst, dst_channel_stride, convert);
}

// copy_segments into the packed layout [c / mr][j][c % mr] (rows of `len`), lanes past `channels` zero: a point's
// mr values from mr channel rows, each read in order. (An element loop that tested every lane for the channel
// count and the segment's copy part was 15% of the 3d U-Net k=2 training step on an AVX2 CPU.)
void copy_segments_packed_portable(const float* src, int64_t src_channel_stride, int64_t channels,
                                   const Segment* segments, int64_t count, int64_t step, int64_t mr, int64_t len,
                                   float* dst) {
  for (int64_t c0 = 0; c0 < channels; c0 += mr, dst += mr * len) {
    const int64_t n = std::min(mr, channels - c0);
    for (const Segment* sg = segments; sg != segments + count; ++sg) {
      std::fill(dst + sg->j0 * mr, dst + sg->a * mr, 0.0f);
      const float* in = src + c0 * src_channel_stride + sg->offset;
      for (int64_t j = sg->a; j < sg->b; ++j) {
        float* d = dst + j * mr;
        const float* from = in + j * step;
        for (int64_t i = 0; i < n; ++i) d[i] = from[i * src_channel_stride];
        for (int64_t i = n; i < mr; ++i) d[i] = 0.0f;
      }
      std::fill(dst + sg->b * mr, dst + sg->j1 * mr, 0.0f);
    }
  }
}

#if TORCH_CONVT_X86
// out[j0, j1) = 0 with masked stores: the pads of copy_segments are a few points each, where a zeroing loop became
// a call of memset per pad (2% of the dilated 3d layer's time).
__attribute__((target("avx512f"), always_inline)) inline void zero_avx512(float* out, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; j += 16)
    _mm512_mask_storeu_ps(out + j, first_lanes(j1 - j), _mm512_setzero_ps());
}

__attribute__((target("avx512f,bmi2"))) void copy_segments_avx512(const float* src, int64_t src_channel_stride,
                                                                   int64_t channels, const Segment* segments,
                                                                   int64_t count, int64_t step, float* dst,
                                                                   int64_t dst_channel_stride) {
  for (int64_t c = 0; c < channels; ++c) {
    const float* in = src + c * src_channel_stride;
    float* out = dst + c * dst_channel_stride;
    for (const Segment* sg = segments; sg != segments + count; ++sg) {
      zero_avx512(out, sg->j0, sg->a);
      const float* s = in + sg->offset;
      // The piece's first lines and its last in the next channel are fetched into L1 now, and where it is read at a
      // stride its other lines into L2: gathers read many pieces, each from lines not cached, one after another
      // (the seed k=3, s=2 layer's 113 MB gradient read at stride 2: its input gradient's column pieces of ~20
      // points x0.80 time, its weight gradient's windows, rows of 100 points, x0.95 by the first lines, x0.91 more
      // by the rest; the forwards' windows and step-1 sources: no change, or slower).
      if (c + 1 < channels && sg->b > sg->a) {
        const char* next = reinterpret_cast<const char*>(s + src_channel_stride + sg->a * step);
        const char* last = reinterpret_cast<const char*>(s + src_channel_stride + (sg->b - 1) * step);
        _mm_prefetch(next, _MM_HINT_T0);
        _mm_prefetch(next + 64, _MM_HINT_T0);
        _mm_prefetch(last, _MM_HINT_T0);
        if (step != 1)
          for (const char* line = next + 128; line < last; line += 64) _mm_prefetch(line, _MM_HINT_T1);
      }
      // (masked loads read no element past the last one needed, s[(b - 1) * step]: they do not fault there)
      for (int64_t j = sg->a; j < sg->b; j += 16) {
        const __mmask16 m = first_lanes(sg->b - j);  // the elements left; this vector takes up to 16
        _mm512_mask_storeu_ps(out + j, m, load_step_avx512(s, j, step, m));
      }
      zero_avx512(out, sg->b, sg->j1);
    }
  }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// zero_avx512 for copy_segments16's outputs: floats, or 16-bit values.
template <typename Out>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline void zero16_avx512(Out* out, int64_t j0,
                                                                                            int64_t j1) {
  if constexpr (std::is_same_v<Out, float>) {
    zero_avx512(out, j0, j1);
  } else {
    for (int64_t j = j0; j < j1; j += 16)
      _mm256_mask_storeu_epi16(out + j, first_lanes(j1 - j), _mm256_setzero_si256());
  }
}

// copy_segments16 for step 1 or 2 (load_step16_raw_avx512: every element, or the even ones, and none past the last one
// needed), into floats (Out = float: widened as widen16_panels widens, bfloat16 where BF16) or as they are (Out =
// uint16_t).
template <typename Out, bool BF16>
__attribute__((target("avx512f,avx512bw,avx512vl,bmi2,f16c"))) void copy_segments16_avx512(const uint16_t* src,
                                                                             int64_t src_channel_stride,
                                                                             int64_t channels, const Segment* segments,
                                                                             int64_t count, int64_t step, Out* dst,
                                                                             int64_t dst_channel_stride) {
  for (int64_t c = 0; c < channels; ++c) {
    const uint16_t* in = src + c * src_channel_stride;
    Out* out = dst + c * dst_channel_stride;
    for (const Segment* sg = segments; sg != segments + count; ++sg) {
      zero16_avx512(out, sg->j0, sg->a);
      const uint16_t* s = in + sg->offset;
      for (int64_t j = sg->a; j < sg->b; j += 16) {
        const __mmask16 m = first_lanes(sg->b - j);
        const __m512i v = load_step16_raw_avx512(s + step * j, step, m);  // (in the low halves of 32-bit lanes)
        if constexpr (std::is_same_v<Out, float>) {
          const __m512 f = BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(v, 16))
                                : _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v));
          _mm512_mask_storeu_ps(out + j, m, f);
        } else {
          _mm256_mask_storeu_epi16(out + j, m, _mm512_cvtepi32_epi16(v));
        }
      }
      zero16_avx512(out, sg->b, sg->j1);
    }
  }
}
#pragma GCC diagnostic pop

// (GCC 12 warns inside its own AVX-512 intrinsics, as above)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// copy_segments_packed for mr = 8: 16 points of the 8 channels are loaded (load_step_avx512, as copy_segments_avx512
// loads them) and transposed in registers into 8 vectors of 2 points x 8 channels, stored in point order.
__attribute__((target("avx512f,bmi2"))) void copy_segments_packed8_avx512(const float* src,
                                                                          int64_t src_channel_stride,
                                                                          int64_t channels, const Segment* segments,
                                                                          int64_t count, int64_t step, int64_t len,
                                                                          float* dst) {
  for (int64_t c0 = 0; c0 < channels; c0 += 8, dst += 8 * len) {
    const int lanes = static_cast<int>(std::min<int64_t>(8, channels - c0));
    for (const Segment* sg = segments; sg != segments + count; ++sg) {
      zero_avx512(dst, 8 * sg->j0, 8 * sg->a);
      for (int64_t j = sg->a; j < sg->b; j += 16) {
        const int64_t n = std::min<int64_t>(16, sg->b - j);
        const __mmask16 m = first_lanes(n);
        __m512 v[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) {
          v[i] = i < lanes ? load_step_avx512(src + (c0 + i) * src_channel_stride + sg->offset, j, step, m)
                           : _mm512_setzero_ps();
        }
        // q[h][p]: channels 4h..4h+3 of point 4L + p in 128-bit lane L
        __m512 q[2][4];
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const __m512 a0 = _mm512_unpacklo_ps(v[4 * h], v[4 * h + 1]);
          const __m512 a1 = _mm512_unpackhi_ps(v[4 * h], v[4 * h + 1]);
          const __m512 a2 = _mm512_unpacklo_ps(v[4 * h + 2], v[4 * h + 3]);
          const __m512 a3 = _mm512_unpackhi_ps(v[4 * h + 2], v[4 * h + 3]);
          q[h][0] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a0), _mm512_castps_pd(a2)));
          q[h][1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a0), _mm512_castps_pd(a2)));
          q[h][2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a1), _mm512_castps_pd(a3)));
          q[h][3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a1), _mm512_castps_pd(a3)));
        }
        // r[p][e]: lanes (q[0][p].L, q[0][p].L + 1, q[1][p].L, q[1][p].L + 1) for L = 2e
        __m512 r[4][2];
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) {
          r[p][0] = _mm512_shuffle_f32x4(q[0][p], q[1][p], _MM_SHUFFLE(1, 0, 1, 0));
          r[p][1] = _mm512_shuffle_f32x4(q[0][p], q[1][p], _MM_SHUFFLE(3, 2, 3, 2));
        }
        // vector k holds points 2k and 2k + 1 (point 4L + p: L = k / 2, p = 2 (k % 2) and p + 1)
        float* out = dst + 8 * j;
#pragma GCC unroll 8
        for (int k = 0; k < 8; ++k) {
          const int L = k / 2, p = 2 * (k % 2), e = L / 2;
          const __m512 o = L % 2 == 0 ? _mm512_shuffle_f32x4(r[p][e], r[p + 1][e], _MM_SHUFFLE(2, 0, 2, 0))
                                      : _mm512_shuffle_f32x4(r[p][e], r[p + 1][e], _MM_SHUFFLE(3, 1, 3, 1));
          const int64_t left = 8 * n - 16 * k;  // values of this vector inside the run
          if (left <= 0) break;
          _mm512_mask_storeu_ps(out + 16 * k, first_lanes(left), o);
        }
      }
      zero_avx512(dst, 8 * sg->b, 8 * sg->j1);
    }
  }
}
#pragma GCC diagnostic pop
#endif
}  // namespace

void copy_segments(const float* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                   int64_t count, int64_t step, float* dst, int64_t dst_channel_stride) {
#if TORCH_CONVT_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("bmi2");
  if (avx512 && (step == 1 || step == 2))
    return copy_segments_avx512(src, src_channel_stride, channels, segments, count, step, dst, dst_channel_stride);
#endif
  copy_segments_portable(src, src_channel_stride, channels, segments, count, step, dst, dst_channel_stride,
                         [](float v) { return v; });
}

void gather_segments(const float* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                     int64_t count, int64_t step, float* dst, int64_t dst_channel_stride) {
#if TORCH_CONVT_X86
  static const bool avx2 = __builtin_cpu_supports("avx2") && !__builtin_cpu_supports("avx512f");
  if (avx2 && step == 1)
    return gather_segments_avx2<1>(src, src_channel_stride, channels, segments, count, dst, dst_channel_stride);
  if (avx2 && step == 2)
    return gather_segments_avx2<2>(src, src_channel_stride, channels, segments, count, dst, dst_channel_stride);
#endif
  copy_segments(src, src_channel_stride, channels, segments, count, step, dst, dst_channel_stride);
}

namespace {
bool copy_segments16_avx512_ok() {
#if TORCH_CONVT_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

}  // namespace

void copy_segments16(const uint16_t* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                     int64_t count, int64_t step, bool bf16, float* dst, int64_t dst_channel_stride) {
#if TORCH_CONVT_X86
  if (copy_segments16_avx512_ok() && (step == 1 || step == 2)) {
    return bf16 ? copy_segments16_avx512<float, true>(src, src_channel_stride, channels, segments, count, step, dst,
                                                      dst_channel_stride)
                : copy_segments16_avx512<float, false>(src, src_channel_stride, channels, segments, count, step, dst,
                                                       dst_channel_stride);
  }
#endif
  copy_segments_portable(src, src_channel_stride, channels, segments, count, step, dst, dst_channel_stride,
                         [bf16](uint16_t v) { return widen16_portable(v, bf16); });
}

void copy_segments16(const uint16_t* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                     int64_t count, int64_t step, uint16_t* dst, int64_t dst_channel_stride) {
#if TORCH_CONVT_X86
  if (copy_segments16_avx512_ok() && (step == 1 || step == 2)) {
    return copy_segments16_avx512<uint16_t, true>(src, src_channel_stride, channels, segments, count, step, dst,
                                                  dst_channel_stride);
  }
#endif
  copy_segments_portable(src, src_channel_stride, channels, segments, count, step, dst, dst_channel_stride,
                         [](uint16_t v) { return v; });
}

void copy_segments_packed(const float* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                          int64_t count, int64_t step, int64_t mr, int64_t len, float* dst) {
#if TORCH_CONVT_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("bmi2");
  if (avx512 && mr == 8 && (step == 1 || step == 2))
    return copy_segments_packed8_avx512(src, src_channel_stride, channels, segments, count, step, len, dst);
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2 && mr <= 8 && (step == 1 || step == 2))
    return copy_segments_packed_avx2(src, src_channel_stride, channels, segments, count, step, mr, len, dst);
#endif
  copy_segments_packed_portable(src, src_channel_stride, channels, segments, count, step, mr, len, dst);
}

void stream_fence() {
#if TORCH_CONVT_X86
  _mm_sfence();
#endif
}

const char* gemm_isa() {
  return kernel<float>().isa;
}

// ---- the machine's fp32 FMA peak: independent FMA chains in registers, no memory traffic ----------------------
namespace {
// Runs `iters` rounds of `chains` independent vector FMAs; returns a value the compiler must compute.
float fma_rounds_portable(int64_t iters, double* flops) {
  constexpr int L = 64;
  float acc[L];
  for (int l = 0; l < L; ++l) acc[l] = 1e-3f * l;
  for (int64_t k = 0; k < iters; ++k)
    for (int l = 0; l < L; ++l) acc[l] = acc[l] * 0.999999f + 1e-7f;
  *flops = 2.0 * L * iters;
  float s = 0;
  for (int l = 0; l < L; ++l) s += acc[l];
  return s;
}
#if TORCH_CONVT_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
__attribute__((target("avx512f,fma"))) float fma_rounds_avx512(int64_t iters, double* flops) {
  constexpr int C = 24;  // > FMA latency x ports: the FMA units never wait
  __m512 acc[C];
#pragma GCC unroll 24
  for (int i = 0; i < C; ++i) acc[i] = _mm512_set1_ps(1e-3f * i);
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (int64_t k = 0; k < iters; ++k)
#pragma GCC unroll 24
    for (int i = 0; i < C; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  *flops = 2.0 * 16 * C * iters;
  for (int i = 1; i < C; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  return hsum_avx512(acc[0]);
}
#pragma GCC diagnostic pop
__attribute__((target("avx2,fma"))) float fma_rounds_avx2(int64_t iters, double* flops) {
  constexpr int C = 12;
  __m256 acc[C];
#pragma GCC unroll 12
  for (int i = 0; i < C; ++i) acc[i] = _mm256_set1_ps(1e-3f * i);
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (int64_t k = 0; k < iters; ++k)
#pragma GCC unroll 12
    for (int i = 0; i < C; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  *flops = 2.0 * 8 * C * iters;
  float lanes[8];
  for (int i = 1; i < C; ++i) acc[0] = _mm256_add_ps(acc[0], acc[i]);
  _mm256_storeu_ps(lanes, acc[0]);
  float s = 0;
  for (float v : lanes) s += v;
  return s;
}
#endif

float fma_rounds(int64_t iters, double* flops) {
#if TORCH_CONVT_X86
  const std::string isa = gemm_isa();
  if (isa == "avx512") return fma_rounds_avx512(iters, flops);
  if (isa == "avx2") return fma_rounds_avx2(iters, flops);
#endif
  return fma_rounds_portable(iters, flops);
}

#if TORCH_CONVT_AMX
// `iters` rounds of 4 independent tile products (2 x 2 tiles of C, as amx_block's) on tiles in registers.
__attribute__((target("amx-tile,amx-bf16"))) float amx_rounds(int64_t iters, double* flops) {
  alignas(64) static const uint16_t ones[512] = {};  // (zeros: the rate does not depend on the values)
  alignas(64) float c[256];
  amx_configure();
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones, 64);
  _tile_loadd(5, ones, 64);
  _tile_loadd(6, ones, 64);
  _tile_loadd(7, ones, 64);
  for (int64_t k = 0; k < iters; ++k) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, 64);
  amx_release();
  *flops = 4.0 * 2 * 16 * 16 * 32 * iters;
  return c[0];
}

// The same for AVX512-BF16 dot products (dot_block's instruction; pairs of zeros: the rate does not depend on them).
__attribute__((target("avx512f,avx512bf16"))) float dot_rounds(int64_t iters, double* flops) {
  constexpr int C = 24;  // (as fma_rounds_avx512)
  __m512 acc[C];
#pragma GCC unroll 24
  for (int i = 0; i < C; ++i) acc[i] = _mm512_set1_ps(1e-3f * i);
  const __m512bh a = (__m512bh)_mm512_setzero_si512();
  for (int64_t k = 0; k < iters; ++k)
#pragma GCC unroll 24
    for (int i = 0; i < C; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, a);
  *flops = 2.0 * 32 * C * iters;
  for (int i = 1; i < C; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  return hsum_avx512(acc[0]);
}
#endif

// The rate of `rounds` (calibrated on one thread to about `seconds`) on every thread of torch's pool at once.
double peak_gflops(float (*rounds)(int64_t, double*), double seconds) {
  using clock = std::chrono::steady_clock;
  double flops = 0;
  volatile float sink = 0;
  // calibrate on one thread: rounds for about `seconds`
  int64_t iters = 1 << 16;
  for (;;) {
    const auto t0 = clock::now();
    sink = sink + rounds(iters, &flops);
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    if (s > 0.02 || iters > (int64_t(1) << 40)) {
      iters = std::max<int64_t>(1, static_cast<int64_t>(iters * seconds / s));
      break;
    }
    iters *= 4;
  }
  // every thread of torch's pool at once, one task each, each timing itself (threads that start late do not
  // count as slow); the machine's rate is the sum of the threads' rates
  const int threads = at::get_num_threads();
  std::vector<double> rate(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double f = 0;
      const auto t0 = clock::now();
      sink = sink + rounds(iters, &f);
      rate[i] = f / std::chrono::duration<double>(clock::now() - t0).count();
    }
  });
  double total = 0;
  for (double r : rate) total += r;
  return total / 1e9;
}
}  // namespace

double fma_peak_gflops(double seconds) {
  return peak_gflops(&fma_rounds, seconds);
}

double amx_peak_gflops(double seconds) {
#if TORCH_CONVT_AMX
  if (amx_bf16()) return peak_gflops(&amx_rounds, seconds);
  if (bf16_dot()) return peak_gflops(&dot_rounds, seconds);
#endif
  return 0.0;
}

#define TORCH_CONVT_INSTANTIATE_GEMM(T)                                                                  \
  template GemmTile gemm_tile<T>(int64_t, double);                                                       \
  template GemmTile gemm_tile_deep<T>(int64_t);                                                          \
  template void gemm_packed<T>(GemmTile, int64_t, int64_t, int64_t, const T*, const T*, bool, T*, int64_t,      \
                               int64_t);                                                                 \
  template void gemm_rows<T>(GemmTile, int64_t, int64_t, int64_t, const T*, const T* const*, bool, T*, int64_t,    \
                             const int64_t*);                                                            \
  template int64_t gemm_copied_rows<T>(GemmTile);                                                        \
  template int64_t gemm_run_width<T>();                                                                  \
  template void gemm_nt<T>(int64_t, int64_t, int64_t, const T*, int64_t, const T*, int64_t, T*, int64_t);
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
