// CPU kernels of the three torch_convt ops: conv_transpose, conv and conv_weight_grad.
//
// All three are "gather columns, then GEMM" (our own, gemm.h) over tiles of output positions:
//   conv:             Y[cy, i]       = W[cy, (cx,k)] . col[(cx,k), i],   col = X at i*stride - padding + k*dilation
//   conv_transpose:   X[cx, phase+s*m] = W_phase[cx, (cy,t)] . col[(cy,t), m],  col = Y at m + shift[t]
//   conv_weight_grad: dW[cy, (cx,k)] = sum_i Y[cy, i] * col[(cx,k), i]  (the conv columns)
// conv_transpose uses the phase (sub-pixel) decomposition of index_math.h: every output element is
// computed once, by one GEMM, from its own contributors (a gather, never a scatter), so no atomics are
// needed and results are deterministic. The weight gradient reduces over batch and space in fixed chunks
// whose partial sums are added in a fixed order, so results do not depend on the thread count.
// Work is tiled over output positions, so the scratch space of a call is bounded (kColumnBytes per thread,
// plus at most kPartialBytes of weight-gradient partials), never a full column buffer.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/index_math.h"
#include "../common/params.h"
#include "gemm.h"

namespace torch_convt {
namespace {

constexpr int64_t kColumnBytes = int64_t(2) << 20;   // column tile per thread
constexpr int64_t kPartialBytes = int64_t(64) << 20;  // weight-gradient partial sums, all chunks together
constexpr int64_t kMaxChunks = 8;                     // weight-gradient reduction chunks (fixed: determinism)

// One kernel tap as seen from a tile: the source position of grid point m is m*step + offset per dim.
struct Tap {
  int64_t offset[kMaxDims];
  int64_t k;  // flat kernel index
};

// Output positions per tile: enough columns to amortise the GEMM, few enough to stay in cache.
int64_t tile_size(int64_t rows, int64_t positions, int64_t elem_size) {
  int64_t t = kColumnBytes / (std::max<int64_t>(rows, 1) * elem_size);
  t = std::max<int64_t>(16, t / 16 * 16);
  return std::max<int64_t>(1, std::min(t, positions));
}

// col[(c*T + t)*ld + (m - m_begin)] = src[c*channel_stride + position], where position_d = m_d*step_d +
// taps[t].offset_d over the row-major grid of m, and zero where that falls outside `extent`.
template <typename scalar_t, typename acc_t>
void gather_columns(const scalar_t* src, int64_t channels, const int64_t* extent, const std::vector<Tap>& taps,
                    const int64_t* step, const int64_t* grid, int64_t m_begin, int64_t m_end, acc_t* col,
                    int64_t ld) {
  const int64_t T = static_cast<int64_t>(taps.size());
  const int64_t channel_stride = extent[0] * extent[1] * extent[2];
  for (int64_t t = 0; t < T; ++t) {
    const Tap& tap = taps[t];
    int64_t lo2, hi2;  // innermost-dim grid range that lands inside the source
    valid_range(tap.offset[2], step[2], extent[2], grid[2], &lo2, &hi2);
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* s = src + c * channel_stride;
      acc_t* out = col + (c * T + t) * ld - m_begin;
      int64_t m = m_begin, idx[kMaxDims];
      unflatten3(m, grid, idx);
      while (m < m_end) {
        const int64_t first = idx[2], last = std::min(grid[2], first + (m_end - m));  // this row: [first, last)
        acc_t* o = out + m - first;
        const int64_t p0 = idx[0] * step[0] + tap.offset[0];
        const int64_t p1 = idx[1] * step[1] + tap.offset[1];
        if (p0 < 0 || p0 >= extent[0] || p1 < 0 || p1 >= extent[1]) {
          std::fill(o + first, o + last, acc_t(0));
        } else {
          const int64_t lo = std::clamp(lo2, first, last), hi = std::clamp(hi2, lo, last);
          std::fill(o + first, o + lo, acc_t(0));
          const scalar_t* row = s + (p0 * extent[1] + p1) * extent[2] + tap.offset[2];
          if (step[2] == 1) {
            for (int64_t j = lo; j < hi; ++j) o[j] = static_cast<acc_t>(row[j]);
          } else {
            for (int64_t j = lo; j < hi; ++j) o[j] = static_cast<acc_t>(row[j * step[2]]);
          }
          std::fill(o + hi, o + last, acc_t(0));
        }
        m += last - first;
        idx[2] = 0;
        if (++idx[1] == grid[1]) idx[1] = 0, ++idx[0];
      }
    }
  }
}

// dst[c*channel_stride + position] = rows[c*ld + m - m_begin] (+ bias[c]), position_d = m_d*step_d +
// offset_d over the grid of m. rows == nullptr stores the bias alone (or zero).
template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* rows, int64_t ld, int64_t channels, const acc_t* bias, scalar_t* dst,
                const int64_t* extent, const int64_t* step, const int64_t* offset, const int64_t* grid,
                int64_t m_begin, int64_t m_end) {
  const int64_t channel_stride = extent[0] * extent[1] * extent[2];
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t b = bias ? bias[c] : acc_t(0);
    const acc_t* r = rows ? rows + c * ld - m_begin : nullptr;
    scalar_t* d = dst + c * channel_stride;
    int64_t m = m_begin, idx[kMaxDims];
    unflatten3(m, grid, idx);
    while (m < m_end) {
      const int64_t first = idx[2], last = std::min(grid[2], first + (m_end - m));
      scalar_t* row = d + ((idx[0] * step[0] + offset[0]) * extent[1] + idx[1] * step[1] + offset[1]) * extent[2] +
                      offset[2];
      const acc_t* in = r ? r + m - first : nullptr;
      for (int64_t j = first; j < last; ++j) {
        row[j * step[2]] = static_cast<scalar_t>(in ? in[j] + b : b);
      }
      m += last - first;
      idx[2] = 0;
      if (++idx[1] == grid[1]) idx[1] = 0, ++idx[0];
    }
  }
}

// The data of a tensor in the accumulation type: the pointer itself where the types agree, else a copy.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* data, int64_t n, std::vector<acc_t>& storage) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return data;
  } else {
    storage.assign(n, acc_t(0));
    for (int64_t i = 0; i < n; ++i) storage[i] = static_cast<acc_t>(data[i]);
    return storage.data();
  }
}

// Taps of a conv: every kernel position, reading big position i*stride - padding + k*dilation.
std::vector<Tap> conv_taps(const ConvParams& p) {
  std::vector<Tap> taps;
  for (int64_t k0 = 0; k0 < p.kernel[0]; ++k0)
    for (int64_t k1 = 0; k1 < p.kernel[1]; ++k1)
      for (int64_t k2 = 0; k2 < p.kernel[2]; ++k2) {
        const int64_t k[kMaxDims] = {k0, k1, k2};
        Tap tap;
        for (int d = 0; d < kMaxDims; ++d) tap.offset[d] = big_position(0, k[d], p.stride[d], p.padding[d], p.dilation[d]);
        tap.k = (k0 * p.kernel[1] + k1) * p.kernel[2] + k2;
        taps.push_back(tap);
      }
  return taps;
}

// ---------------------------------------------------------------------------------------------------------
// conv: Y = conv(X, W) + bias
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t>
void conv_kernel(const ConvParams& p, const scalar_t* x, const scalar_t* w, const scalar_t* bias, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = p.groups, Cxg = p.big_group(), Cyg = p.small_group();
  const int64_t KK = Cxg * p.kernel_numel(), M = p.small_spatial(), X_sp = p.big_spatial();
  std::vector<acc_t> w_store, b_store;
  const acc_t* wa = as_acc(w, p.small_channels * KK, w_store);
  const acc_t* ba = bias ? as_acc(bias, p.small_channels, b_store) : nullptr;
  const std::vector<Tap> taps = conv_taps(p);
  const int64_t tile = tile_size(KK, M, sizeof(acc_t)), tiles = ceil_div(M, tile);
  const int64_t zero[kMaxDims] = {0, 0, 0}, one[kMaxDims] = {1, 1, 1};

  at::parallel_for(0, p.batch * G * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> col(KK * tile), out(Cyg * tile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (G * tiles), g = item / tiles % G, m0 = item % tiles * tile;
      const int64_t m1 = std::min(M, m0 + tile), cnt = m1 - m0;
      gather_columns(x + (n * p.big_channels + g * Cxg) * X_sp, Cxg, p.big, taps, p.stride, p.small, m0, m1,
                     col.data(), cnt);
      cpu::gemm<acc_t>(Cyg, cnt, KK, wa + g * Cyg * KK, KK, 1, col.data(), cnt, 1, false, out.data(), cnt);
      store_rows(out.data(), cnt, Cyg, ba ? ba + g * Cyg : nullptr, y + (n * p.small_channels + g * Cyg) * M,
                 p.small, one, zero, p.small, m0, m1);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// conv_transpose: X = conv_transpose(Y, W) + bias, one dense correlation per phase
// ---------------------------------------------------------------------------------------------------------
struct Phase {
  int64_t r[kMaxDims];     // big position = m*stride + r
  int64_t grid[kMaxDims];  // extent of m
  std::vector<Tap> taps;   // offsets are shifts on the small tensor
};

std::vector<Phase> transpose_phases(const ConvParams& p, bool* all_covered) {
  // Only phases r < big exist (stride may exceed the output size); each tap belongs to exactly one phase per
  // dim, so there are at most kernel_numel phases with taps.
  std::vector<Phase> phases;
  int64_t total = 1;
  for (int d = 0; d < kMaxDims; ++d) total *= std::min(p.stride[d], p.big[d]);
  for (int64_t k0 = 0; k0 < p.kernel[0]; ++k0)
    for (int64_t k1 = 0; k1 < p.kernel[1]; ++k1)
      for (int64_t k2 = 0; k2 < p.kernel[2]; ++k2) {
        const int64_t k[kMaxDims] = {k0, k1, k2};
        Phase ph;
        Tap tap;
        bool inside = true;
        for (int d = 0; d < kMaxDims; ++d) {
          ph.r[d] = ((k[d] * p.dilation[d] - p.padding[d]) % p.stride[d] + p.stride[d]) % p.stride[d];
          inside = inside && ph.r[d] < p.big[d];
          phase_tap(ph.r[d], k[d], p.stride[d], p.padding[d], p.dilation[d], &tap.offset[d]);
          ph.grid[d] = phase_count(p.big[d], p.stride[d], ph.r[d]);
        }
        if (!inside) continue;
        tap.k = (k0 * p.kernel[1] + k1) * p.kernel[2] + k2;
        auto it = std::find_if(phases.begin(), phases.end(), [&](const Phase& q) {
          return q.r[0] == ph.r[0] && q.r[1] == ph.r[1] && q.r[2] == ph.r[2];
        });
        if (it == phases.end()) {
          phases.push_back(ph);
          it = phases.end() - 1;
        }
        it->taps.push_back(tap);
      }
  *all_covered = static_cast<int64_t>(phases.size()) == total;
  return phases;
}

template <typename scalar_t>
void conv_transpose_kernel(const ConvParams& p, const scalar_t* y, const scalar_t* w, const scalar_t* bias,
                           scalar_t* x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = p.groups, Cxg = p.big_group(), Cyg = p.small_group(), K = p.kernel_numel();
  const int64_t X_sp = p.big_spatial(), Y_sp = p.small_spatial();
  std::vector<acc_t> b_store;
  const acc_t* ba = bias ? as_acc(bias, p.big_channels, b_store) : nullptr;
  const int64_t zero[kMaxDims] = {0, 0, 0}, one[kMaxDims] = {1, 1, 1};
  bool all_covered = false;
  const std::vector<Phase> phases = transpose_phases(p, &all_covered);

  if (!all_covered) {  // big positions that no tap reaches hold the bias alone
    const int64_t grid[kMaxDims] = {p.big[0], p.big[1], p.big[2]};
    at::parallel_for(0, p.batch * p.big_channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const acc_t* b = ba ? ba + nc % p.big_channels : nullptr;
        store_rows<scalar_t, acc_t>(nullptr, 0, 1, b, x + nc * X_sp, p.big, one, zero, grid, 0, X_sp);
      }
    });
  }

  // Per (group, phase) weight matrix [Cxg, Cyg*T]: W_phase[cx, cy*T + t] = W[g*Cyg + cy, cx, taps[t].k].
  struct Job {
    int64_t phase, m0, m1;
  };
  std::vector<std::vector<acc_t>> w_phase(phases.size());
  std::vector<Job> jobs;
  int64_t max_rows = 0, max_tile = 1;
  for (size_t q = 0; q < phases.size(); ++q) {
    const Phase& ph = phases[q];
    const int64_t T = static_cast<int64_t>(ph.taps.size()), rows = Cyg * T;
    std::vector<acc_t>& wp = w_phase[q];
    wp.resize(G * Cxg * rows);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t cx = 0; cx < Cxg; ++cx)
        for (int64_t cy = 0; cy < Cyg; ++cy)
          for (int64_t t = 0; t < T; ++t)
            wp[(g * Cxg + cx) * rows + cy * T + t] =
                static_cast<acc_t>(w[((g * Cyg + cy) * Cxg + cx) * K + ph.taps[t].k]);
    const int64_t M = ph.grid[0] * ph.grid[1] * ph.grid[2];
    const int64_t tile = tile_size(rows, M, sizeof(acc_t));
    for (int64_t m0 = 0; m0 < M; m0 += tile) jobs.push_back({static_cast<int64_t>(q), m0, std::min(M, m0 + tile)});
    max_rows = std::max(max_rows, rows);
    max_tile = std::max(max_tile, tile);
  }
  const int64_t J = static_cast<int64_t>(jobs.size());

  at::parallel_for(0, p.batch * G * J, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> col(max_rows * max_tile), out(Cxg * max_tile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (G * J), g = item / J % G;
      const Job& job = jobs[item % J];
      const Phase& ph = phases[job.phase];
      const int64_t rows = Cyg * static_cast<int64_t>(ph.taps.size()), cnt = job.m1 - job.m0;
      gather_columns(y + (n * p.small_channels + g * Cyg) * Y_sp, Cyg, p.small, ph.taps, one, ph.grid, job.m0,
                     job.m1, col.data(), cnt);
      cpu::gemm<acc_t>(Cxg, cnt, rows, w_phase[job.phase].data() + g * Cxg * rows, rows, 1, col.data(), cnt, 1, false,
                    out.data(), cnt);
      store_rows(out.data(), cnt, Cxg, ba ? ba + g * Cxg : nullptr, x + (n * p.big_channels + g * Cxg) * X_sp,
                 p.big, p.stride, ph.r, ph.grid, job.m0, job.m1);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// conv_weight_grad: dW[cy, cx, k] = sum_{n, i} Y[n, cy, i] * X[n, cx, i*stride - padding + k*dilation]
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t>
void conv_weight_grad_kernel(const ConvParams& p, const scalar_t* x, const scalar_t* y, scalar_t* dw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = p.groups, Cxg = p.big_group(), Cyg = p.small_group();
  const int64_t KK = Cxg * p.kernel_numel(), M = p.small_spatial(), X_sp = p.big_spatial();
  const int64_t dw_numel = p.small_channels * KK;
  const std::vector<Tap> taps = conv_taps(p);
  const int64_t tile = tile_size(KK, M, sizeof(acc_t)), tiles = ceil_div(M, tile);
  const int64_t items = G * p.batch * tiles;  // ordered (g, n, tile)
  // Fixed chunking of the reduction (independent of the thread count), each chunk with its own partial sum.
  const int64_t chunks = std::max<int64_t>(
      1, std::min({items, kMaxChunks, kPartialBytes / std::max<int64_t>(1, dw_numel * int64_t(sizeof(acc_t)))}));
  std::vector<acc_t> partial(chunks * dw_numel, acc_t(0));

  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    std::vector<acc_t> col(KK * tile), y_tile(std::is_same_v<scalar_t, acc_t> ? 0 : Cyg * tile);
    for (int64_t c = c_begin; c < c_end; ++c) {
      acc_t* acc = partial.data() + c * dw_numel;
      for (int64_t item = items * c / chunks; item < items * (c + 1) / chunks; ++item) {
        const int64_t g = item / (p.batch * tiles), n = item / tiles % p.batch, m0 = item % tiles * tile;
        const int64_t m1 = std::min(M, m0 + tile), cnt = m1 - m0;
        gather_columns(x + (n * p.big_channels + g * Cxg) * X_sp, Cxg, p.big, taps, p.stride, p.small, m0, m1,
                       col.data(), cnt);
        const scalar_t* ys = y + (n * p.small_channels + g * Cyg) * M + m0;
        const acc_t* yt;
        int64_t ldy;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          yt = ys, ldy = M;
        } else {
          for (int64_t cy = 0; cy < Cyg; ++cy)
            for (int64_t j = 0; j < cnt; ++j) y_tile[cy * cnt + j] = static_cast<acc_t>(ys[cy * M + j]);
          yt = y_tile.data(), ldy = cnt;
        }
        cpu::gemm<acc_t>(Cyg, KK, cnt, yt, ldy, 1, col.data(), 1, cnt, true, acc + g * Cyg * KK, KK);
      }
    }
  });

  at::parallel_for(0, dw_numel, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      acc_t s = partial[e];
      for (int64_t c = 1; c < chunks; ++c) s += partial[c * dw_numel + e];
      dw[e] = static_cast<scalar_t>(s);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Op entry points
// ---------------------------------------------------------------------------------------------------------
// Kernels read dense row-major data; conjugate/negative views are materialised (they only flip bits).
at::Tensor dense(const at::Tensor& t) {
  return t.resolve_conj().resolve_neg().contiguous();
}

at::Tensor conv_transpose_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                              at::IntArrayRef dilation, int64_t groups) {
  const ConvParams p = check_conv_args(ConvKind::ConvTranspose, input, weight, weight.sizes(), bias, stride,
                                       padding, output_padding, dilation, groups);
  at::Tensor out = at::empty(p.big_shape(), input.options());
  if (out.numel() == 0) return out;
  const at::Tensor y = dense(input), w = dense(weight);
  const at::Tensor b = bias.has_value() && bias->defined() ? dense(*bias) : at::Tensor();
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES_AND3(at::kBFloat16, at::kHalf, at::kLong, input.scalar_type(),
                                              "torch_convt.conv_transpose", [&] {
    conv_transpose_kernel<scalar_t>(p, y.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                    b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                    out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor conv_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvParams p =
      check_conv_args(ConvKind::Conv, input, weight, weight.sizes(), bias, stride, padding, {}, dilation, groups);
  at::Tensor out = at::empty(p.small_shape(), input.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = dense(input), w = dense(weight);
  const at::Tensor b = bias.has_value() && bias->defined() ? dense(*bias) : at::Tensor();
  AT_DISPATCH_ALL_TYPES_AND_COMPLEX_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "torch_convt.conv", [&] {
    conv_kernel<scalar_t>(p, x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                          b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor conv_weight_grad_cpu(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef weight_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  const ConvParams p = check_conv_args(ConvKind::WeightGrad, input, grad_output, weight_size, std::nullopt, stride,
                                       padding, {}, dilation, groups);
  at::Tensor out = at::empty(p.weight_shape(), input.options());
  if (out.numel() == 0) return out;
  const at::Tensor x = dense(input), y = dense(grad_output);
  AT_DISPATCH_ALL_TYPES_AND_COMPLEX_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                         "torch_convt.conv_weight_grad", [&] {
    conv_weight_grad_kernel<scalar_t>(p, x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                      out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

// ================================ CPU registrations ================================
TORCH_LIBRARY_IMPL(torch_convt, CPU, m) {
  m.impl("conv_transpose", &conv_transpose_cpu);
  m.impl("conv", &conv_cpu);
  m.impl("conv_weight_grad", &conv_weight_grad_cpu);
}

}  // namespace torch_convt
