// One parameter struct and one host function that checks every argument of every torch_convt op and
// computes the output size. Shared by the CPU and CUDA backends (host code only).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <algorithm>
#include <optional>
#include <sstream>
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

namespace detail {

inline std::string join(at::IntArrayRef v, const char* sep = " x ") {
  std::ostringstream os;
  for (size_t i = 0; i < v.size(); ++i) os << (i ? sep : "") << v[i];
  return os.str();
}

inline void check_list(const char* op, const char* name, at::IntArrayRef v, int64_t dims) {
  TORCH_CHECK(static_cast<int64_t>(v.size()) == dims, op, ": expected ", name, " to be a list of ", dims,
              " values to match the convolution dimensions, but got ", name, "=", v);
}

inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &r), "torch_convt: ", what, " overflows int64");
  return r;
}

inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!c10::add_overflows(a, b, &r), "torch_convt: ", what, " overflows int64");
  return r;
}

inline void check_tensor_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " to be on the same device as input (",
              input.device(), "), but got ", name, " on ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": input type (", input.scalar_type(), ") and ",
              name, " type (", t.scalar_type(), ") should be the same");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": expected a strided (dense) ", name, ", got layout ",
              t.layout());
}

}  // namespace detail

// Checks every argument and returns the geometry.
//   Conv:          input = X (big),   weight given,            output = Y (small)
//   ConvTranspose: input = Y (small), weight given,            output = X (big)
//   WeightGrad:    input = X (big),   grad_output = Y (small), weight_size given, output = dW
// Errors are RuntimeError (TORCH_CHECK), as torch's own convolutions raise for these arguments.
inline ConvParams check_conv_args(ConvKind kind, const at::Tensor& input, const at::Tensor& second,
                                  at::IntArrayRef weight_size, const std::optional<at::Tensor>& bias,
                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                  at::IntArrayRef output_padding, at::IntArrayRef dilation, int64_t groups) {
  using namespace detail;
  const char* op = kind == ConvKind::Conv            ? "torch_convt.conv"
                   : kind == ConvKind::ConvTranspose ? "torch_convt.conv_transpose"
                                                     : "torch_convt.conv_weight_grad";
  const bool transposed = kind == ConvKind::ConvTranspose;
  const int64_t rank = input.dim();
  TORCH_CHECK(rank >= 3 && rank <= 5, op, ": expected a batched input of 3 to 5 dims (N, C, *spatial), but got ",
              "input of size ", input.sizes());
  const int64_t dims = rank - 2;
  const char* second_name = kind == ConvKind::WeightGrad ? "grad_output" : "weight";
  TORCH_CHECK(second.dim() == rank, op, ": expected ", second_name, " to have ", rank,
              " dims like the input, but got ", second_name, " of size ", second.sizes());
  TORCH_CHECK(static_cast<int64_t>(weight_size.size()) == rank, op, ": expected a weight of ", rank,
              " dims, but got weight size ", weight_size);
  check_tensor_like(op, second_name, second, input);
  TORCH_CHECK(input.layout() == at::kStrided, op, ": expected a strided (dense) input, got layout ",
              input.layout());
  if (bias.has_value() && bias->defined()) check_tensor_like(op, "bias", *bias, input);
  check_list(op, "stride", stride, dims);
  check_list(op, "padding", padding, dims);
  check_list(op, "dilation", dilation, dims);
  if (transposed) check_list(op, "output_padding", output_padding, dims);

  TORCH_CHECK(groups > 0, op, ": non-positive groups is not supported");
  for (int64_t j = 0; j < dims; ++j) {
    TORCH_CHECK(stride[j] > 0, op, ": non-positive stride is not supported, but got stride=", stride);
    TORCH_CHECK(dilation[j] > 0, op, ": non-positive dilation is not supported, but got dilation=", dilation);
    TORCH_CHECK(padding[j] >= 0, op, ": negative padding is not supported, but got padding=", padding);
    if (transposed) {
      TORCH_CHECK(output_padding[j] >= 0, op, ": negative output_padding is not supported, but got ",
                  "output_padding=", output_padding);
      TORCH_CHECK(output_padding[j] < std::max(stride[j], dilation[j]), op,
                  ": output padding must be smaller than either stride or dilation, but got output_padding=",
                  output_padding, " stride=", stride, " dilation=", dilation);
    }
  }
  for (int64_t j = 0; j < rank; ++j) {
    TORCH_CHECK(weight_size[j] >= 0, op, ": invalid weight size ", weight_size);
  }
  for (int64_t j = 2; j < rank; ++j) {
    TORCH_CHECK(weight_size[j] > 0, op, ": expected a positive kernel size, but got weight of size ",
                weight_size);
  }
  TORCH_CHECK(weight_size[0] >= 1, op, ": given groups=", groups,
              ", expected weight to be at least 1 at dimension 0, but got weight of size ", weight_size);
  TORCH_CHECK(weight_size[0] % groups == 0, op, ": given groups=", groups,
              ", expected weight to be divisible by ", groups, " at dimension 0, but got weight of size ",
              weight_size);

  ConvParams p;
  p.dims = dims;
  p.groups = groups;
  p.batch = input.size(0);
  p.small_channels = weight_size[0];
  p.big_channels = checked_mul(weight_size[1], groups, "channel count");
  const int64_t in_channels = transposed ? p.small_channels : p.big_channels;
  TORCH_CHECK(input.size(1) == in_channels, op, ": given groups=", groups, ", weight of size ", weight_size,
              ", expected input", input.sizes(), " to have ", in_channels, " channels, but got ", input.size(1),
              " channels instead");
  if (bias.has_value() && bias->defined()) {
    const int64_t out_channels = transposed ? p.big_channels : p.small_channels;
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, op, ": expected bias to be 1-dimensional with ",
                out_channels, " elements, but got bias of size ", bias->sizes());
  }
  for (int64_t j = 2; j < rank; ++j) {
    TORCH_CHECK(input.size(j) > 0, op, ": only zero batch or zero channel inputs are supported, but got input ",
                "shape ", input.sizes());
  }

  const int64_t off = kMaxDims - dims;
  for (int64_t j = 0; j < dims; ++j) {
    const int64_t s = off + j;
    p.kernel[s] = weight_size[2 + j];
    p.stride[s] = stride[j];
    p.padding[s] = padding[j];
    p.dilation[s] = dilation[j];
    // extent = dilation*(kernel-1) + 1, the span of the kernel on the big tensor.
    const int64_t extent = checked_add(checked_mul(p.dilation[s], p.kernel[s] - 1, "dilated kernel size"), 1,
                                       "dilated kernel size");
    const int64_t two_pad = checked_mul(2, p.padding[s], "padding");
    if (transposed) {
      p.small[s] = input.size(2 + j);
      // big = (small - 1)*stride - 2*padding + extent + output_padding
      const int64_t grown = checked_add(checked_mul(p.small[s] - 1, p.stride[s], "output size"),
                                        checked_add(extent, output_padding[j], "output size"), "output size");
      p.big[s] = grown - two_pad;
      TORCH_CHECK(p.big[s] > 0, op, ": given input size per channel (", join(input.sizes().slice(2)),
                  "), the calculated output size per channel is ", p.big[s], " at spatial dim ", j,
                  ": output size is too small (padding ", p.padding[s], " is too large)");
    } else {
      p.big[s] = input.size(2 + j);
      const int64_t padded = checked_add(p.big[s], two_pad, "padded input size");
      TORCH_CHECK(padded >= extent, op, ": calculated padded input size per channel at spatial dim ", j, " is ",
                  padded, ", but the dilated kernel size is ", extent,
                  ": kernel size can't be greater than actual input size");
      p.small[s] = (padded - extent) / p.stride[s] + 1;
    }
  }

  if (kind == ConvKind::WeightGrad) {
    // second is grad_output (Y). It may be up to max(stride, dilation) - 1 positions shorter than a conv of X
    // would give (the conv_transpose backward with output_padding >= stride); positions past its end do not
    // contribute.
    TORCH_CHECK(second.size(0) == p.batch && second.size(1) == p.small_channels, op,
                ": expected grad_output of batch ", p.batch, " and ", p.small_channels, " channels, but got ",
                second.sizes());
    for (int64_t j = 0; j < dims; ++j) {
      const int64_t s = off + j;
      const int64_t y = second.size(2 + j);
      TORCH_CHECK(y > 0 && y <= p.small[s] && p.small[s] - y < std::max(p.stride[s], p.dilation[s]), op,
                  ": grad_output of size ", second.sizes(), " does not match input of size ", input.sizes(),
                  " for this convolution (expected spatial size ", p.small[s], " at dim ", j, ")");
      p.small[s] = y;
    }
  }

  // Every tensor of the call must be addressable with int64 offsets.
  int64_t numel = checked_mul(p.batch, std::max(p.big_channels, p.small_channels), "tensor size");
  numel = checked_mul(numel, checked_mul(p.big[0], checked_mul(p.big[1], p.big[2], "tensor size"), "tensor size"),
                      "tensor size");
  (void)numel;
  return p;
}

// The kernels read dense row-major data: conjugate/negative views are materialised (they only flip bits) and
// other strides are made contiguous. An absent bias gives an undefined tensor.
inline at::Tensor dense(const at::Tensor& t) {
  return t.resolve_conj().resolve_neg().contiguous();
}

inline at::Tensor dense(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? dense(*t) : at::Tensor();
}

}  // namespace torch_convt
