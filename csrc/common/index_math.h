// Index arithmetic shared by the CPU and CUDA kernels. Host/device inline, no CUDA includes.
//
// Naming used throughout torch_convt: a convolution maps the "big" tensor X (conv input, conv_transpose
// output) to the "small" tensor Y (conv output, conv_transpose input). Small position i and kernel tap k
// touch big position o = i*stride - padding + k*dilation. All positions and sizes are int64_t: volumes past
// 2^31 elements are supported, and every product below is bounded by sizes that params.h has already
// checked for overflow.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace torch_convt {

constexpr int kMaxDims = 3;  // 1d and 2d are 3d with leading singleton dims

// Floor division for b > 0 (C++ '/' truncates towards zero).
C10_HOST_DEVICE inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

C10_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) {
  return -floor_div(-a, b);
}

// Big position touched by small position i through tap k.
C10_HOST_DEVICE inline int64_t big_position(int64_t i, int64_t k, int64_t stride, int64_t padding,
                                            int64_t dilation) {
  return i * stride - padding + k * dilation;
}

// The m with 0 <= m*step + offset < extent, intersected with [0, count): returned as [lo, hi).
C10_HOST_DEVICE inline void valid_range(int64_t offset, int64_t step, int64_t extent, int64_t count,
                                        int64_t* lo, int64_t* hi) {
  int64_t l = ceil_div(-offset, step);
  int64_t h = ceil_div(extent - offset, step);
  l = l < 0 ? 0 : l;
  h = h > count ? count : h;
  *lo = l;
  *hi = h < l ? l : h;
}

// Phase (sub-pixel) decomposition of conv_transpose. Big positions o = m*stride + phase (0 <= phase <
// stride) form a dense grid in m. Tap k reaches that phase iff (phase + padding - k*dilation) is a multiple
// of stride, and then reads small position i = m + shift with shift = (phase + padding - k*dilation)/stride:
// each phase is a dense stride-1 correlation with a sub-kernel, with no multiplications by inserted zeros.
C10_HOST_DEVICE inline bool phase_tap(int64_t phase, int64_t k, int64_t stride, int64_t padding,
                                      int64_t dilation, int64_t* shift) {
  const int64_t a = phase + padding - k * dilation;
  if (a % stride != 0) return false;
  *shift = a / stride;  // exact
  return true;
}

// Number of big positions o in [0, extent) with o % stride == phase.
C10_HOST_DEVICE inline int64_t phase_count(int64_t extent, int64_t stride, int64_t phase) {
  return phase < extent ? (extent - phase + stride - 1) / stride : 0;
}

// Splits a flat index over a row-major 3d grid.
C10_HOST_DEVICE inline void unflatten3(int64_t flat, const int64_t* grid, int64_t* m) {
  m[2] = flat % grid[2];
  flat /= grid[2];
  m[1] = flat % grid[1];
  m[0] = flat / grid[1];
}

}  // namespace torch_convt
