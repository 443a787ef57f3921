// Direct (GEMM-free) row loops of the CPU kernels (conv_cpu.cpp): per-channel (depthwise) layers, where a one-row
// GEMM would waste its register blocking and the column gather, and conv_transpose with non-finite weights, whose
// out-of-range taps must not contribute at all (a gathered zero times inf is NaN). Vectorised along the innermost
// dim. Every sum runs in a fixed order: results do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "../common/params.h"
#include "columns.h"

namespace torch_convt::cpu {

// Innermost-dim range [lo, hi) of grid points whose source lies inside `extent`, per tap.
inline std::vector<std::pair<int64_t, int64_t>> inner_ranges(const std::vector<Tap>& taps, int64_t step, int64_t extent,
                                                      int64_t count) {
  std::vector<std::pair<int64_t, int64_t>> ranges(taps.size());
  for (size_t t = 0; t < taps.size(); ++t) valid_range(taps[t].offset[2], step, extent, count, &ranges[t].first, &ranges[t].second);
  return ranges;
}

// acc[j] += sum_t w[t] * src[(i0*step0 + offset0_t, i1*step1 + offset1_t, j*step2 + offset2_t)] for j < count,
// over the taps whose position falls inside `extent`, in their fixed order.
template <typename scalar_t, typename acc_t>
void channel_row(const scalar_t* src, const int64_t* extent, const Strides& st, const std::vector<Tap>& taps,
                 const acc_t* w,
                 const std::vector<std::pair<int64_t, int64_t>>& ranges, const int64_t* step, int64_t i0, int64_t i1,
                 int64_t count, acc_t* acc) {
  for (size_t t = 0; t < taps.size(); ++t) {
    const int64_t p0 = i0 * step[0] + taps[t].offset[0], p1 = i1 * step[1] + taps[t].offset[1];
    if (p0 < 0 || p0 >= extent[0] || p1 < 0 || p1 >= extent[1]) continue;
    const scalar_t* row = src + st.at(p0, p1, taps[t].offset[2]);
    const acc_t wt = w[t];
    const int64_t lo = ranges[t].first, hi = ranges[t].second, s2 = step[2] * st.s[2];
    if (s2 == 1) {
      for (int64_t j = lo; j < hi; ++j) acc[j] += wt * static_cast<acc_t>(row[j]);
    } else {
      for (int64_t j = lo; j < hi; ++j) acc[j] += wt * static_cast<acc_t>(row[j * s2]);
    }
  }
}

// dst[(i0*step0 + offset0, i1*step1 + offset1, j*step2 + offset2)] = acc[j] + bias for j < count.
template <typename scalar_t, typename acc_t>
void store_channel_row(const acc_t* acc, acc_t bias, scalar_t* dst, const Strides& st, const int64_t* step,
                       const int64_t* offset, int64_t i0, int64_t i1, int64_t count) {
  scalar_t* row = dst + st.at(i0 * step[0] + offset[0], i1 * step[1] + offset[1], offset[2]);
  const int64_t inner = step[2] * st.s[2];
  for (int64_t j = 0; j < count; ++j) row[j * inner] = narrow_to<scalar_t>(acc[j] + bias);
}

// Whether every element is finite (integers always are). Lane-wise, so that it vectorises: v - v is 0 for a
// finite v and NaN otherwise.
template <typename scalar_t>
bool all_finite(const scalar_t* data, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = 16;
  acc_t lanes[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L)
    for (int l = 0; l < L; ++l) {
      const acc_t v = static_cast<acc_t>(data[i + l]);
      lanes[l] += v - v;
    }
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(data[i]);
    lanes[0] += v - v;
  }
  for (int l = 0; l < L; ++l)
    if (!(lanes[l] == acc_t(0))) return false;
  return true;
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
  at::parallel_for(0, p.batch * C, grain(2 * K * p.small_spatial()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(p.small[2]), wt(K);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / C, c = item % C;
      for (int64_t t = 0; t < K; ++t) wt[t] = static_cast<acc_t>(w[c * K + taps[t].k]);
      const acc_t b = bias ? static_cast<acc_t>(bias[c]) : acc_t(0);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i0 = r / p.small[1], i1 = r % p.small[1];
        std::fill(acc.begin(), acc.end(), acc_t(0));
        channel_row(x + n * sx.n + c * sx.c, p.big, sx, taps, wt.data(), ranges, p.stride, i0, i1, p.small[2],
                    acc.data());
        store_channel_row(acc.data(), b, y + n * sy.n + c * sy.c, sy, one, zero, i0, i1, p.small[2]);
      }
    }
  });
}

// Per-channel weight gradient: dW[c, k] = sum_{n, i} Y[n, c, i] X[n, c, i*stride - padding + k*dilation]. Each
// channel is summed by one task in a fixed order (lane-wise partial sums, then the lanes), so the result does
// not depend on the thread count.
template <typename scalar_t>
void conv_weight_grad_depthwise(const ConvParams& p, const scalar_t* x, const Strides& sx, const scalar_t* y,
                                const Strides& sy, scalar_t* dw) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = 8;  // independent partial sums: the compiler vectorises the lanes
  const int64_t C = p.small_channels, K = p.kernel_numel(), rows = p.small[0] * p.small[1], n2 = p.small[2];
  const std::vector<Tap> taps = conv_taps(p);
  const auto ranges = inner_ranges(taps, p.stride[2], p.big[2], n2);
  at::parallel_for(0, C, grain(2 * K * p.batch * p.small_spatial()), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t t = 0; t < K; ++t) {
        acc_t lanes[L] = {};
        const int64_t lo = ranges[t].first, hi = ranges[t].second, s2 = p.stride[2] * sx.s[2], y2 = sy.s[2];
        for (int64_t n = 0; n < p.batch; ++n) {
          const scalar_t* xs = x + n * sx.n + c * sx.c;
          const scalar_t* ys = y + n * sy.n + c * sy.c;
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t i0 = r / p.small[1], i1 = r % p.small[1];
            const int64_t p0 = i0 * p.stride[0] + taps[t].offset[0], p1 = i1 * p.stride[1] + taps[t].offset[1];
            if (p0 < 0 || p0 >= p.big[0] || p1 < 0 || p1 >= p.big[1]) continue;
            const scalar_t* xr = xs + sx.at(p0, p1, taps[t].offset[2]);
            const scalar_t* yr = ys + sy.at(i0, i1, 0);
            int64_t j = lo;
            for (; j + L <= hi; j += L)
              for (int l = 0; l < L; ++l)
                lanes[l] += static_cast<acc_t>(yr[(j + l) * y2]) * static_cast<acc_t>(xr[(j + l) * s2]);
            for (; j < hi; ++j) lanes[0] += static_cast<acc_t>(yr[j * y2]) * static_cast<acc_t>(xr[j * s2]);
          }
        }
        acc_t sum = acc_t(0);
        for (int l = 0; l < L; ++l) sum += lanes[l];
        dw[c * K + taps[t].k] = static_cast<scalar_t>(sum);
      }
    }
  });
}

}  // namespace torch_convt::cpu
