// Direct (GEMM-free) row loops of the CPU kernels (conv_cpu.cpp): per-channel (depthwise) layers, where a one-row
// GEMM would waste its register blocking and the column gather, and conv_transpose with non-finite weights, whose
// out-of-range taps must not contribute at all (a gathered zero times inf is NaN). Vectorised along the innermost
// dim. Every sum runs in a fixed order: results do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <numeric>
#include <utility>
#include <vector>

#include "../common/params.h"
#include "columns.h"
#include "simd.h"

namespace torch_convt::cpu {

constexpr int64_t kRowBlockBytes = int64_t(32) << 10;  // a block of rows' sums, revisited tap by tap: stays in L1

// Innermost-dim range [lo, hi) of grid points whose source lies inside `extent`, per tap.
inline std::vector<std::pair<int64_t, int64_t>> inner_ranges(const std::vector<Tap>& taps, int64_t step, int64_t extent,
                                                      int64_t count) {
  std::vector<std::pair<int64_t, int64_t>> ranges(taps.size());
  for (size_t t = 0; t < taps.size(); ++t)
    valid_range(taps[t].offset[2], step, extent, count, &ranges[t].first, &ranges[t].second);
  return ranges;
}

// The row loops below are compiled twice: for the build's generic x86-64 target (SSE2) and for AVX-512, taken at
// run time where the CPU has it; float rows with an innermost step of 1 or 2 have AVX-512 kernels of their own.
// Measured on the depthwise 3d layer (k=3, s=2), against the SSE2 row-by-row loops: forward x0.63 time, input
// gradient x0.57, weight gradient x0.45.
#if defined(__x86_64__) && defined(__GNUC__)
#define TORCH_CONVT_DIRECT_AVX512 1
#define TORCH_CONVT_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,bmi2")))
inline bool direct_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2");
  return yes;
}
// The generic loops compiled for AVX2 + FMA as well, for CPUs without AVX-512 (built for the baseline x86-64, they
// ran on SSE2: the depthwise 3d training step's channel rows and weight gradient took over half of its time on an
// AVX2 CPU).
#define TORCH_CONVT_AVX2_TARGET __attribute__((target("avx2,fma")))
inline bool direct_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#else
#define TORCH_CONVT_DIRECT_AVX512 0
#endif

// Rows [r0, r1) of a grid whose second dim is `grid1` (row r: i0 = r / grid1, i1 = r % grid1), each `count` points:
//   acc[(r - r0)*count + j] += sum_t w[t] * src[(i0*step0 + offset0_t, i1*step1 + offset1_t, j*step2 + offset2_t)]
// for j in tap t's range (inner_ranges: where its position falls inside `extent`), taps outermost: every point
// sums its taps in their fixed order.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void channel_rows_body(const scalar_t* src, const int64_t* extent,
                                                             const Strides& st, const std::vector<Tap>& taps,
                                                             const acc_t* w,
                                                             const std::vector<std::pair<int64_t, int64_t>>& ranges,
                                                             const int64_t* step, int64_t grid1, int64_t r0, int64_t r1,
                                                             int64_t count, acc_t* acc) {
  const int64_t s2 = step[2] * st.s[2];
  for (size_t t = 0; t < taps.size(); ++t) {
    const acc_t wt = w[t];
    const int64_t lo = ranges[t].first, hi = ranges[t].second;
    for (int64_t r = r0; r < r1 && lo < hi; ++r) {
      const int64_t p0 = r / grid1 * step[0] + taps[t].offset[0], p1 = r % grid1 * step[1] + taps[t].offset[1];
      if (p0 < 0 || p0 >= extent[0] || p1 < 0 || p1 >= extent[1]) continue;
      const scalar_t* __restrict__ row = src + st.at(p0, p1, taps[t].offset[2]);
      acc_t* __restrict__ out = acc + (r - r0) * count;
      if (s2 == 1) {
        for (int64_t j = lo; j < hi; ++j) out[j] += wt * static_cast<acc_t>(row[j]);
      } else {
        for (int64_t j = lo; j < hi; ++j) out[j] += wt * static_cast<acc_t>(row[j * s2]);
      }
    }
  }
}

#if TORCH_CONVT_DIRECT_AVX512
template <typename scalar_t, typename acc_t>
TORCH_CONVT_AVX512_TARGET void channel_rows_avx512(const scalar_t* src, const int64_t* extent, const Strides& st,
                                                   const std::vector<Tap>& taps, const acc_t* w,
                                                   const std::vector<std::pair<int64_t, int64_t>>& ranges,
                                                   const int64_t* step, int64_t grid1, int64_t r0, int64_t r1,
                                                   int64_t count, acc_t* acc) {
  channel_rows_body(src, extent, st, taps, w, ranges, step, grid1, r0, r1, count, acc);
}
template <typename scalar_t, typename acc_t>
TORCH_CONVT_AVX2_TARGET void channel_rows_avx2(const scalar_t* src, const int64_t* extent, const Strides& st,
                                               const std::vector<Tap>& taps, const acc_t* w,
                                               const std::vector<std::pair<int64_t, int64_t>>& ranges,
                                               const int64_t* step, int64_t grid1, int64_t r0, int64_t r1,
                                               int64_t count, acc_t* acc) {
  channel_rows_body(src, extent, st, taps, w, ranges, step, grid1, r0, r1, count, acc);
}

// Lanes [lo - j0, hi - j0) of a 16-lane block starting at j0 (none where the ranges do not meet).
inline __mmask16 lane_mask(int64_t j0, int64_t lo, int64_t hi) {
  lo = std::max(lo, j0), hi = std::min(hi, j0 + 16);
  return lo >= hi ? __mmask16(0) : static_cast<__mmask16>(((1u << (hi - lo)) - 1) << (lo - j0));
}

// channel_rows for float sums with an innermost step of 1 or 2: 16 points of a row stay in a register across all
// taps (the same sums in the same order; a tap's points outside its range are masked off, so they add nothing, not
// even 0 * inf). The compiled loops load and store the sums once per tap and gather stride-2 points one by one.
// Sources of float, or of 16-bit floats (S = uint16_t: bfloat16 where `bf16`, else half) widened as they load
// (the bench's depthwise 3d forward in bfloat16: 4.2-4.3 -> 2.9-3.0 ms, where it was slower than float).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // (GCC 12, inside its own intrinsics' placeholders)
template <typename S>
TORCH_CONVT_AVX512_TARGET inline void channel_rows_f32_avx512(const S* src, const int64_t* extent,
                                                              const Strides& st, const std::vector<Tap>& taps,
                                                              const float* w,
                                                              const std::vector<std::pair<int64_t, int64_t>>& ranges,
                                                              const int64_t* step, int64_t grid1, int64_t r0,
                                                              int64_t r1, int64_t count, float* acc, bool bf16) {
  const int64_t s2 = step[2] * st.s[2], T = static_cast<int64_t>(taps.size());
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i0 = r / grid1 * step[0], i1 = r % grid1 * step[1];
    float* out = acc + (r - r0) * count;
    for (int64_t j0 = 0; j0 < count; j0 += 16) {
      const __mmask16 all = lane_mask(j0, 0, count);
      __m512 a = _mm512_maskz_loadu_ps(all, out + j0);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t p0 = i0 + taps[t].offset[0], p1 = i1 + taps[t].offset[1];
        const __mmask16 m = lane_mask(j0, ranges[t].first, ranges[t].second);
        if (p0 < 0 || p0 >= extent[0] || p1 < 0 || p1 >= extent[1] || !m) continue;
        const S* row = src + st.at(p0, p1, taps[t].offset[2]);
        __m512 v;
        if constexpr (std::is_same_v<S, float>) v = load_step_avx512(row, j0, s2, m);
        else v = load_step16_avx512(row, j0, s2, m, bf16);
        a = _mm512_mask3_fmadd_ps(_mm512_set1_ps(w[t]), v, a, m);
      }
      _mm512_mask_storeu_ps(out + j0, all, a);
    }
  }
}
#pragma GCC diagnostic pop

// channel_rows_f32_avx512 on AVX2 for float rows read at step 2 (channel_rows_f32_avx2): NB blocks of 8 points of a
// row from j0 (the last may end at `count`) stay in registers across all taps; a tap's lanes outside its range keep
// their sums (blended back, so nothing is added, not even 0 * inf). The same sums in the same order.
template <int NB>
TORCH_CONVT_AVX2_TARGET inline void channel_block_f32_avx2(const float* src, const int64_t* extent, const Strides& st,
                                                          const std::vector<Tap>& taps, const float* w,
                                                          const std::vector<std::pair<int64_t, int64_t>>& ranges,
                                                          int64_t s2, int64_t i0, int64_t i1, int64_t j0,
                                                          int64_t count, float* out) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int64_t last = std::min<int64_t>(8, count - j0 - 8 * (NB - 1)), end = j0 + 8 * (NB - 1) + last;
  const auto lanes_of = [last](int b) -> int64_t { return b < NB - 1 ? 8 : last; };  // (block b's points in `count`)
  __m256 a[NB];
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) a[b] = load_step_avx2(out, j0 + 8 * b, 1, 0, lanes_of(b));
  for (size_t t = 0; t < taps.size(); ++t) {
    const int64_t p0 = i0 + taps[t].offset[0], p1 = i1 + taps[t].offset[1];
    if (p0 < 0 || p0 >= extent[0] || p1 < 0 || p1 >= extent[1]) continue;
    const float* row = src + st.at(p0, p1, taps[t].offset[2]);
    const __m256 wt = _mm256_set1_ps(w[t]);
    if (ranges[t].first <= j0 && ranges[t].second >= end) {
      // (the tap reaches every point of the blocks: plain loads, no blend; the lanes of the last block past `count`
      // load zeros and are never stored. The depthwise 3d input gradient x0.69 time, 14 alternated rounds.)
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) {
        const int64_t at = j0 + 8 * b;
        const __m256 v = lanes_of(b) < 8  ? load_step_avx2(row, at, s2, 0, lanes_of(b))
                         : s2 == 1        ? _mm256_loadu_ps(row + at)
                                          : load_even_avx2(row + 2 * at);
        a[b] = _mm256_fmadd_ps(wt, v, a[b]);
      }
      continue;
    }
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      const int64_t at = j0 + 8 * b;
      // (no branch on the lanes: the taps' ranges differ, and branches on them were mispredicted)
      const int64_t lo = std::clamp<int64_t>(ranges[t].first - at, 0, 8);
      const int64_t hi = std::clamp<int64_t>(ranges[t].second - at, 0, 8);
      const __m256 f = _mm256_fmadd_ps(wt, load_step_avx2(row, at, s2, lo, hi), a[b]);
      a[b] = _mm256_blendv_ps(a[b], f, _mm256_castsi256_ps(lane_mask_avx2(lanes, lo, hi)));
    }
  }
#pragma GCC unroll 4
  for (int b = 0; b < NB; ++b) {
    if (lanes_of(b) == 8) _mm256_storeu_ps(out + j0 + 8 * b, a[b]);
    else _mm256_maskstore_ps(out + j0 + 8 * b, lane_mask_avx2(lanes, 0, lanes_of(b)), a[b]);
  }
}

// Rows of up to 32 points (the depthwise 3d layer's 16) in one call of channel_block_f32_avx2, longer ones 32 points
// at a time. Taken for stride-2 reads, which the loops compiled from channel_rows_body gathered point by point: the
// bench's depthwise 3d input gradient x0.71 time with masked loads throughout, and x0.69 of that with plain loads
// for the taps that cover a row (alternated rounds in one process). Unit-stride rows keep those loops, which were
// faster here: this kernel made the forward x1.10 the time.
TORCH_CONVT_AVX2_TARGET inline void channel_rows_f32_avx2(const float* src, const int64_t* extent, const Strides& st,
                                                         const std::vector<Tap>& taps, const float* w,
                                                         const std::vector<std::pair<int64_t, int64_t>>& ranges,
                                                         const int64_t* step, int64_t grid1, int64_t r0, int64_t r1,
                                                         int64_t count, float* acc) {
  const int64_t s2 = step[2] * st.s[2];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i0 = r / grid1 * step[0], i1 = r % grid1 * step[1];
    float* out = acc + (r - r0) * count;
    for (int64_t j0 = 0; j0 < count; j0 += 32) {
      switch (std::min<int64_t>(4, (count - j0 + 7) / 8)) {
        case 1: channel_block_f32_avx2<1>(src, extent, st, taps, w, ranges, s2, i0, i1, j0, count, out); break;
        case 2: channel_block_f32_avx2<2>(src, extent, st, taps, w, ranges, s2, i0, i1, j0, count, out); break;
        case 3: channel_block_f32_avx2<3>(src, extent, st, taps, w, ranges, s2, i0, i1, j0, count, out); break;
        default: channel_block_f32_avx2<4>(src, extent, st, taps, w, ranges, s2, i0, i1, j0, count, out); break;
      }
    }
  }
}
#endif

template <typename scalar_t, typename acc_t>
void channel_rows(const scalar_t* src, const int64_t* extent, const Strides& st, const std::vector<Tap>& taps,
                  const acc_t* w, const std::vector<std::pair<int64_t, int64_t>>& ranges, const int64_t* step,
                  int64_t grid1, int64_t r0, int64_t r1, int64_t count, acc_t* acc) {
#if TORCH_CONVT_DIRECT_AVX512
  if (direct_avx512()) {
    constexpr bool kHalf = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;
    if constexpr ((std::is_same_v<scalar_t, float> || kHalf) && std::is_same_v<acc_t, float>) {
      const int64_t s2 = step[2] * st.s[2];
      using S = std::conditional_t<kHalf, uint16_t, float>;
      if (s2 == 1 || s2 == 2)
        return channel_rows_f32_avx512(reinterpret_cast<const S*>(src), extent, st, taps, w, ranges, step, grid1, r0,
                                       r1, count, acc, std::is_same_v<scalar_t, c10::BFloat16>);
    }
    return channel_rows_avx512(src, extent, st, taps, w, ranges, step, grid1, r0, r1, count, acc);
  }
  if (direct_avx2()) {
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      const int64_t s2 = step[2] * st.s[2];
      if (s2 == 2)
        return channel_rows_f32_avx2(src, extent, st, taps, w, ranges, step, grid1, r0, r1, count, acc);
    }
    return channel_rows_avx2(src, extent, st, taps, w, ranges, step, grid1, r0, r1, count, acc);
  }
#endif
  channel_rows_body(src, extent, st, taps, w, ranges, step, grid1, r0, r1, count, acc);
}

// Per-channel conv: Y[n, c] = sum_k W[c, k] X[n, c, i*stride - padding + k*dilation] + bias[c].
template <typename scalar_t>
void conv_depthwise(const ConvParams& p, const scalar_t* x, const Strides& sx, const scalar_t* w, const scalar_t* bias,
                    scalar_t* y, const Strides& sy) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.small_channels, K = p.kernel_numel(), rows = p.small[0] * p.small[1];
  const int64_t zero[kMaxDims] = {0, 0, 0}, one[kMaxDims] = {1, 1, 1};
  const std::vector<Tap> taps = conv_taps(p);
  const auto ranges = inner_ranges(taps, p.stride[2], p.big[2], p.small[2]);
  // rows in blocks whose sums stay in L1
  const int64_t block =
      std::max<int64_t>(1, kRowBlockBytes / (std::max<int64_t>(1, p.small[2]) * int64_t(sizeof(acc_t))));
  at::parallel_for(0, p.batch * C, grain(2 * K * p.small_spatial()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(std::min(rows, block) * p.small[2]), wt(K);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / C, c = item % C;
      for (int64_t t = 0; t < K; ++t) wt[t] = static_cast<acc_t>(w[c * K + taps[t].k]);
      const acc_t b = bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
      for (int64_t r0 = 0; r0 < rows; r0 += block) {
        const int64_t r1 = std::min(rows, r0 + block);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        channel_rows(x + n * sx.n + c * sx.c, p.big, sx, taps, wt.data(), ranges, p.stride, p.small[1], r0, r1,
                     p.small[2], acc.data());
        store_rows(acc.data(), 0, 1, bias ? &b : nullptr, y + n * sy.n + c * sy.c, sy, one, zero, p.small,
                   r0 * p.small[2], r1 * p.small[2]);
      }
    }
  });
}

// The offsets of row r = (i0, i1) of Y and of the X row that tap `tap` reads for it (strides sy, sx); false where
// that X row lies outside X. (The two depthwise weight-gradient loops below walk rows with it.)
__attribute__((always_inline)) inline bool tap_row(const ConvParams& p, const Tap& tap, const Strides& sx,
                                                   const Strides& sy, int64_t r, int64_t* x_off, int64_t* y_off) {
  const int64_t i0 = r / p.small[1], i1 = r % p.small[1];
  const int64_t p0 = i0 * p.stride[0] + tap.offset[0], p1 = i1 * p.stride[1] + tap.offset[1];
  if (p0 < 0 || p0 >= p.big[0] || p1 < 0 || p1 >= p.big[1]) return false;
  *x_off = sx.at(p0, p1, tap.offset[2]);
  *y_off = sy.at(i0, i1, 0);
  return true;
}

// Per-channel weight gradient of channel c: dW[c, k] = sum_{n, i} Y[n, c, i] X[n, c, i*stride - padding +
// k*dilation], lane-wise partial sums over the innermost dim, then the lanes, in a fixed order.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void weight_grad_channel_body(
    const ConvParams& p, const scalar_t* x, const Strides& sx, const scalar_t* y, const Strides& sy,
    const std::vector<Tap>& taps, const std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t c, scalar_t* dw) {
  constexpr int L = 16;  // independent partial sums: the compiler vectorises the lanes
  const int64_t K = p.kernel_numel(), rows = p.small[0] * p.small[1];
  for (int64_t t = 0; t < K; ++t) {
    acc_t lanes[L] = {};
    const int64_t lo = ranges[t].first, hi = ranges[t].second, s2 = p.stride[2] * sx.s[2], y2 = sy.s[2];
    for (int64_t n = 0; n < p.batch; ++n) {
      const scalar_t* xs = x + n * sx.n + c * sx.c;
      const scalar_t* ys = y + n * sy.n + c * sy.c;
      for (int64_t r = 0; r < rows; ++r) {
        int64_t xo, yo;
        if (!tap_row(p, taps[t], sx, sy, r, &xo, &yo)) continue;
        const scalar_t* xr = xs + xo;
        const scalar_t* yr = ys + yo;
        int64_t j = lo;
        if (s2 == 1 && y2 == 1) {  // (unit strides: plain vector loads)
          for (; j + L <= hi; j += L)
            for (int l = 0; l < L; ++l) lanes[l] += static_cast<acc_t>(yr[j + l]) * static_cast<acc_t>(xr[j + l]);
        } else {
          for (; j + L <= hi; j += L)
            for (int l = 0; l < L; ++l)
              lanes[l] += static_cast<acc_t>(yr[(j + l) * y2]) * static_cast<acc_t>(xr[(j + l) * s2]);
        }
        for (int l = 0; j < hi; ++j, ++l) lanes[l] += static_cast<acc_t>(yr[j * y2]) * static_cast<acc_t>(xr[j * s2]);
      }
    }
    acc_t sum = acc_t(0);
    for (int l = 0; l < L; ++l) sum += lanes[l];
    dw[c * K + taps[t].k] = static_cast<scalar_t>(sum);
  }
}

#if TORCH_CONVT_DIRECT_AVX512
template <typename scalar_t, typename acc_t>
TORCH_CONVT_AVX512_TARGET void weight_grad_channel_avx512(const ConvParams& p, const scalar_t* x, const Strides& sx,
                                                          const scalar_t* y, const Strides& sy,
                                                          const std::vector<Tap>& taps,
                                                          const std::vector<std::pair<int64_t, int64_t>>& ranges,
                                                          int64_t c, scalar_t* dw) {
  weight_grad_channel_body<scalar_t, acc_t>(p, x, sx, y, sy, taps, ranges, c, dw);
}
template <typename scalar_t, typename acc_t>
TORCH_CONVT_AVX2_TARGET void weight_grad_channel_avx2(const ConvParams& p, const scalar_t* x, const Strides& sx,
                                                      const scalar_t* y, const Strides& sy,
                                                      const std::vector<Tap>& taps,
                                                      const std::vector<std::pair<int64_t, int64_t>>& ranges,
                                                      int64_t c, scalar_t* dw) {
  weight_grad_channel_body<scalar_t, acc_t>(p, x, sx, y, sy, taps, ranges, c, dw);
}

// weight_grad_channel_body for float with unit innermost strides in Y and a step of 1 or 2 in X: the same lanes
// (point j of a row adds to lane (j - lo) % 16) and order, 16 lanes a vector.
TORCH_CONVT_AVX512_TARGET inline void weight_grad_channel_f32_avx512(
    const ConvParams& p, const float* x, const Strides& sx, const float* y, const Strides& sy,
    const std::vector<Tap>& taps, const std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t c, float* dw) {
  const int64_t K = p.kernel_numel(), rows = p.small[0] * p.small[1], s2 = p.stride[2] * sx.s[2];
  for (int64_t t = 0; t < K; ++t) {
    __m512 lanes = _mm512_setzero_ps();
    const int64_t lo = ranges[t].first, hi = ranges[t].second;
    for (int64_t n = 0; n < p.batch && lo < hi; ++n) {
      const float* xs = x + n * sx.n + c * sx.c;
      const float* ys = y + n * sy.n + c * sy.c;
      for (int64_t r = 0; r < rows; ++r) {
        int64_t xo, yo;
        if (!tap_row(p, taps[t], sx, sy, r, &xo, &yo)) continue;
        const float* xr = xs + xo + lo * s2;
        const float* yr = ys + yo + lo;
        for (int64_t j = 0; j < hi - lo; j += 16) {
          const __mmask16 m = lane_mask(j, 0, hi - lo);
          lanes = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, yr + j), load_step_avx512(xr, j, s2, m), lanes);
        }
      }
    }
    alignas(64) float part[16];
    _mm512_store_ps(part, lanes);
    float sum = 0.0f;
    for (int l = 0; l < 16; ++l) sum += part[l];
    dw[c * K + taps[t].k] = sum;
  }
}

// weight_grad_channel_f32_avx512 on AVX2 for X read at step 2: the same 16 lanes, as two vectors of 8, in the same
// order. (Compiled from weight_grad_channel_body, the loop gathered X's points one by one, and a row of 16 points
// with a tap's range inside it took its scalar tail loop: the bench's depthwise 3d weight gradient x0.68 time, 10
// alternated rounds in one process.)
TORCH_CONVT_AVX2_TARGET inline void weight_grad_channel_f32_avx2(
    const ConvParams& p, const float* x, const Strides& sx, const float* y, const Strides& sy,
    const std::vector<Tap>& taps, const std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t c, float* dw) {
  const int64_t K = p.kernel_numel(), rows = p.small[0] * p.small[1], s2 = p.stride[2] * sx.s[2];
  for (int64_t t = 0; t < K; ++t) {
    __m256 lanes0 = _mm256_setzero_ps(), lanes1 = _mm256_setzero_ps();  // (lanes 0-7, 8-15)
    const int64_t lo = ranges[t].first, hi = ranges[t].second;
    for (int64_t n = 0; n < p.batch && lo < hi; ++n) {
      const float* xs = x + n * sx.n + c * sx.c;
      const float* ys = y + n * sy.n + c * sy.c;
      for (int64_t r = 0; r < rows; ++r) {
        int64_t xo, yo;
        if (!tap_row(p, taps[t], sx, sy, r, &xo, &yo)) continue;
        const float* xr = xs + xo + lo * s2;
        const float* yr = ys + yo + lo;
        for (int64_t j = 0; j < hi - lo; j += 16) {
          const int64_t n0 = std::min<int64_t>(8, hi - lo - j), n1 = std::min<int64_t>(8, hi - lo - j - 8);
          lanes0 = _mm256_fmadd_ps(load_step_avx2(yr, j, 1, 0, n0), load_step_avx2(xr, j, s2, 0, n0), lanes0);
          if (n1 > 0)
            lanes1 =
                _mm256_fmadd_ps(load_step_avx2(yr, j + 8, 1, 0, n1), load_step_avx2(xr, j + 8, s2, 0, n1), lanes1);
        }
      }
    }
    alignas(32) float part[16];
    _mm256_store_ps(part, lanes0);
    _mm256_store_ps(part + 8, lanes1);
    float sum = 0.0f;
    for (int l = 0; l < 16; ++l) sum += part[l];
    dw[c * K + taps[t].k] = sum;
  }
}
#endif

// Per-channel weight gradient: each channel is summed by one task (weight_grad_channel_body), so the result does
// not depend on the thread count.
template <typename scalar_t>
void conv_weight_grad_depthwise(const ConvParams& p, const scalar_t* x, const Strides& sx, const scalar_t* y,
                                const Strides& sy, scalar_t* dw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.small_channels, K = p.kernel_numel();
  const std::vector<Tap> taps = conv_taps(p);
  const auto ranges = inner_ranges(taps, p.stride[2], p.big[2], p.small[2]);
  at::parallel_for(0, C, grain(2 * K * p.batch * p.small_spatial()), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
#if TORCH_CONVT_DIRECT_AVX512
      if (direct_avx512()) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          const int64_t s2 = p.stride[2] * sx.s[2];
          if (sy.s[2] == 1 && (s2 == 1 || s2 == 2)) {
            weight_grad_channel_f32_avx512(p, x, sx, y, sy, taps, ranges, c, dw);
            continue;
          }
        }
        weight_grad_channel_avx512<scalar_t, acc_t>(p, x, sx, y, sy, taps, ranges, c, dw);
        continue;
      }
      if (direct_avx2()) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          const int64_t s2 = p.stride[2] * sx.s[2];
          if (sy.s[2] == 1 && s2 == 2) {
            weight_grad_channel_f32_avx2(p, x, sx, y, sy, taps, ranges, c, dw);
            continue;
          }
        }
        weight_grad_channel_avx2<scalar_t, acc_t>(p, x, sx, y, sy, taps, ranges, c, dw);
        continue;
      }
#endif
      weight_grad_channel_body<scalar_t, acc_t>(p, x, sx, y, sy, taps, ranges, c, dw);
    }
  });
}

// A phase of a transposed layer (conv_cpu.cpp): the big positions m*stride + r and the taps that reach them.
struct Phase {
  int64_t r[kMaxDims];     // big position = m*stride + r
  int64_t grid[kMaxDims];  // extent of m
  std::vector<Tap> taps;   // offsets are shifts on the small tensor
};

// The phases members[i] in store groups, as positions i in `members`: phases of the same (r0, r1) and grid whose r2
// follow one another (at most kMaxStoreWays, into an output whose innermost stride is 1) are stored together by
// store_rows_interleaved, each output line once; any other phase alone.
inline std::vector<std::vector<int64_t>> store_groups(const std::vector<Phase>& phases,
                                                     const std::vector<int64_t>& members, const Strides& st) {
  std::vector<std::vector<int64_t>> by_row, groups;  // by_row: positions with the same (r0, r1) and grid
  for (size_t i = 0; i < members.size(); ++i) {
    const Phase& ph = phases[members[i]];
    auto it = std::find_if(by_row.begin(), by_row.end(), [&](const std::vector<int64_t>& grp) {
      const Phase& first = phases[members[grp[0]]];
      return first.r[0] == ph.r[0] && first.r[1] == ph.r[1] && std::equal(ph.grid, ph.grid + kMaxDims, first.grid);
    });
    if (it == by_row.end()) it = by_row.insert(by_row.end(), std::vector<int64_t>{});
    it->push_back(static_cast<int64_t>(i));
  }
  for (std::vector<int64_t>& grp : by_row) {
    const auto r2 = [&](int64_t i) { return phases[members[i]].r[2]; };
    std::sort(grp.begin(), grp.end(), [&](int64_t u, int64_t v) { return r2(u) < r2(v); });
    bool runs = grp.size() > 1 && int64_t(grp.size()) <= kMaxStoreWays && st.s[2] == 1;
    for (size_t w = 0; w < grp.size() && runs; ++w) runs = r2(grp[w]) == r2(grp[0]) + int64_t(w);
    if (runs) {
      groups.push_back(grp);
    } else {
      for (int64_t i : grp) groups.push_back({i});
    }
  }
  return groups;
}

// Direct conv_transpose, phase by phase and row by row:
//   X[n, c, m*stride + r] = sum_{cy in c's group} sum_t W[cy, c % Cxg, k_t] Y[n, cy, m + shift_t] + bias[c],
// each sum over the taps inside Y only. For per-channel layers, and for non-finite weights (see columns.h). Phases
// with the same (r0, r1) and grid whose r2 follow one another are computed block by block together and stored
// interleaved, each output line once (store_rows_interleaved), as the GEMM path's teams are.
template <typename scalar_t, typename acc_t>
void conv_transpose_direct(const ConvParams& p, const std::vector<Phase>& phases, const scalar_t* y,
                           const Strides& sy, const scalar_t* w, const acc_t* bias, scalar_t* x, const Strides& sx) {
  const int64_t C = p.big_channels, Cxg = p.big_group(), Cyg = p.small_group(), K = p.kernel_numel();
  const int64_t one[kMaxDims] = {1, 1, 1};
  std::vector<std::vector<std::pair<int64_t, int64_t>>> ranges;
  for (const Phase& ph : phases) ranges.push_back(inner_ranges(ph.taps, 1, p.small[2], ph.grid[2]));
  std::vector<int64_t> all(phases.size());
  std::iota(all.begin(), all.end(), 0);
  const std::vector<std::vector<int64_t>> groups = store_groups(phases, all, sx);
  size_t ways_max = 1;
  for (const auto& grp : groups) ways_max = std::max(ways_max, grp.size());
  at::parallel_for(0, p.batch * C, grain(2 * Cyg * K * p.small_spatial()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc, wt(ways_max * Cyg * K);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / C, c = item % C, g = c / Cxg, cx = c % Cxg;
      const scalar_t* y_g = y + n * sy.n + g * Cyg * sy.c;
      scalar_t* x_c = x + n * sx.n + c * sx.c;
      for (const std::vector<int64_t>& grp : groups) {
        const Phase& lead = phases[grp[0]];
        const int64_t ways = static_cast<int64_t>(grp.size()), g2 = lead.grid[2], rows = lead.grid[0] * lead.grid[1];
        if (rows * g2 == 0) continue;
        for (int64_t m = 0; m < ways; ++m) {
          const Phase& ph = phases[grp[m]];
          const int64_t T = static_cast<int64_t>(ph.taps.size());
          for (int64_t cy = 0; cy < Cyg; ++cy)
            for (int64_t t = 0; t < T; ++t)
              wt[(m * Cyg + cy) * K + t] = static_cast<acc_t>(w[((g * Cyg + cy) * Cxg + cx) * K + ph.taps[t].k]);
        }
        const int64_t block = std::max<int64_t>(1, kRowBlockBytes / (g2 * int64_t(sizeof(acc_t))));
        const int64_t len = std::min(rows, block) * g2;
        acc.resize(ways * len);
        const acc_t* out[kMaxStoreWays];
        for (int64_t r0 = 0; r0 < rows; r0 += block) {
          const int64_t r1 = std::min(rows, r0 + block);
          for (int64_t m = 0; m < ways; ++m) {
            const Phase& ph = phases[grp[m]];
            acc_t* a = acc.data() + m * len;
            out[m] = a;
            std::fill(a, a + (r1 - r0) * g2, acc_t(0));
            for (int64_t cy = 0; cy < Cyg; ++cy)
              channel_rows(y_g + cy * sy.c, p.small, sy, ph.taps, wt.data() + (m * Cyg + cy) * K, ranges[grp[m]], one,
                           lead.grid[1], r0, r1, g2, a);
          }
          const acc_t* b = bias ? bias + c : nullptr;
          if (ways > 1) {
            store_rows_interleaved(out, ways, len, 1, b, x_c, sx, p.stride, lead.r, lead.grid, r0 * g2, r1 * g2);
          } else {
            store_rows(out[0], len, 1, b, x_c, sx, p.stride, lead.r, lead.grid, r0 * g2, r1 * g2);
          }
        }
      }
    }
  });
}

}  // namespace torch_convt::cpu
