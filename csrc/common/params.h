// One parameter struct and one host function that checks every argument of every torch_convt op and
// computes the output size (defined in torch_convt.cpp). Shared by the CPU and CUDA backends (host code only).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "index_math.h"

namespace torch_convt {

enum class ConvKind { Conv, ConvTranspose, WeightGrad };

// Geometry of one call, in the big/small naming of index_math.h. Spatial dims are padded to three slots with
// leading singletons (kernel 1, stride 1, padding 0, dilation 1), so every kernel handles 1d/2d/3d alike.
// The weight is always [small_channels, big_channels / groups, *kernel], for conv and conv_transpose alike.
struct ConvParams {
  int64_t dims = 0;  // spatial dims of the call, 1..3
  int64_t batch = 0;
  int64_t groups = 1;
  int64_t big_channels = 0;
  int64_t small_channels = 0;
  int64_t big[kMaxDims] = {1, 1, 1};
  int64_t small[kMaxDims] = {1, 1, 1};
  int64_t kernel[kMaxDims] = {1, 1, 1};
  int64_t stride[kMaxDims] = {1, 1, 1};
  int64_t padding[kMaxDims] = {0, 0, 0};
  int64_t dilation[kMaxDims] = {1, 1, 1};

  int64_t big_group() const { return big_channels / groups; }
  int64_t small_group() const { return small_channels / groups; }
  int64_t big_spatial() const { return big[0] * big[1] * big[2]; }
  int64_t small_spatial() const { return small[0] * small[1] * small[2]; }
  int64_t kernel_numel() const { return kernel[0] * kernel[1] * kernel[2]; }

  std::vector<int64_t> shape(int64_t channels, const int64_t* spatial) const {
    std::vector<int64_t> s = {batch, channels};
    for (int64_t j = kMaxDims - dims; j < kMaxDims; ++j) s.push_back(spatial[j]);
    return s;
  }
  std::vector<int64_t> big_shape() const { return shape(big_channels, big); }
  std::vector<int64_t> small_shape() const { return shape(small_channels, small); }
  std::vector<int64_t> weight_shape() const {
    std::vector<int64_t> s = {small_channels, big_group()};
    for (int64_t j = kMaxDims - dims; j < kMaxDims; ++j) s.push_back(kernel[j]);
    return s;
  }
};

// Checks every argument and returns the geometry.
//   Conv:          input = X (big),   weight given,            output = Y (small)
//   ConvTranspose: input = Y (small), weight given,            output = X (big)
//   WeightGrad:    input = X (big),   grad_output = Y (small), weight_size given, output = dW
// Errors are RuntimeError (TORCH_CHECK), as torch's own convolutions raise for these arguments.
// Defined once, in torch_convt.cpp: the backends' translation units (one of them built by nvcc) only call it.
ConvParams check_conv_args(ConvKind kind, const at::Tensor& input, const at::Tensor& second,
                           at::IntArrayRef weight_size, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef output_padding, at::IntArrayRef dilation,
                           int64_t groups);

// The kernels read dense row-major data: conjugate/negative views are materialised (they only flip bits) and
// other strides are made contiguous. An absent bias gives an undefined tensor.
inline at::Tensor dense(const at::Tensor& t) {
  return t.resolve_conj().resolve_neg().contiguous();
}

inline at::Tensor dense(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? dense(*t) : at::Tensor();
}

}  // namespace torch_convt
