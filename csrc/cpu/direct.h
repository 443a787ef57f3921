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
  for (size_t t = 0; t < taps.size(); ++t)
    valid_range(taps[t].offset[2], step, extent, count, &ranges[t].first, &ranges[t].second);
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

// A phase of a transposed layer (conv_cpu.cpp): the big positions m*stride + r and the taps that reach them.
struct Phase {
  int64_t r[kMaxDims];     // big position = m*stride + r
  int64_t grid[kMaxDims];  // extent of m
  std::vector<Tap> taps;   // offsets are shifts on the small tensor
};

// Direct conv_transpose, phase by phase and row by row:
//   X[n, c, m*stride + r] = sum_{cy in c's group} sum_t W[cy, c % Cxg, k_t] Y[n, cy, m + shift_t] + bias[c],
// each sum over the taps inside Y only. For per-channel layers, and for non-finite weights (see columns.h).
template <typename scalar_t, typename acc_t>
void conv_transpose_direct(const ConvParams& p, const std::vector<Phase>& phases, const scalar_t* y,
                           const Strides& sy, const scalar_t* w, const acc_t* bias, scalar_t* x, const Strides& sx) {
  const int64_t C = p.big_channels, Cxg = p.big_group(), Cyg = p.small_group(), K = p.kernel_numel();
  const int64_t one[kMaxDims] = {1, 1, 1};
  std::vector<std::vector<std::pair<int64_t, int64_t>>> ranges;
  for (const Phase& ph : phases) ranges.push_back(inner_ranges(ph.taps, 1, p.small[2], ph.grid[2]));
  at::parallel_for(0, p.batch * C, grain(2 * Cyg * K * p.small_spatial()), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(p.big[2]), wt(Cyg * K);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / C, c = item % C, g = c / Cxg, cx = c % Cxg;
      const scalar_t* y_g = y + n * sy.n + g * Cyg * sy.c;
      const acc_t b = bias ? bias[c] : acc_t(0);
      for (size_t q = 0; q < phases.size(); ++q) {
        const Phase& ph = phases[q];
        const int64_t T = static_cast<int64_t>(ph.taps.size());
        for (int64_t cy = 0; cy < Cyg; ++cy)
          for (int64_t t = 0; t < T; ++t)
            wt[cy * T + t] = static_cast<acc_t>(w[((g * Cyg + cy) * Cxg + cx) * K + ph.taps[t].k]);
        for (int64_t r = 0; r < ph.grid[0] * ph.grid[1]; ++r) {
          const int64_t i0 = r / ph.grid[1], i1 = r % ph.grid[1];
          std::fill(acc.begin(), acc.begin() + ph.grid[2], acc_t(0));
          for (int64_t cy = 0; cy < Cyg; ++cy)
            channel_row(y_g + cy * sy.c, p.small, sy, ph.taps, wt.data() + cy * T, ranges[q], one, i0, i1,
                        ph.grid[2], acc.data());
          store_channel_row(acc.data(), b, x + n * sx.n + c * sx.c, sx, p.stride, ph.r, i0, i1, ph.grid[2]);
        }
      }
    }
  });
}

}  // namespace torch_convt::cpu
