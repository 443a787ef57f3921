// torch_convt C++ API: transposed and regular convolutions computed by torch_convt's own kernels, as plain
// C++ functions with the signatures and defaults of torch's (at::conv_transpose3d, at::conv3d, ...).
//
//   #include <torch_convt/torch_convt.h>
//
//   at::Tensor up = torch_convt::conv_transpose3d(x, weight, bias, /*stride=*/2);
//   at::Tensor y = torch_convt::conv3d(up, weight2, bias2, /*stride=*/1, /*padding=*/1);
//   y.sum().backward();  // gradients (and gradients of gradients) work in a pure C++ program
//
// Arguments are as in torch.nn.functional / at::: the input is batched (N, C, *spatial) or unbatched
// (C, *spatial); stride, padding, output_padding and dilation take one value per spatial dim or a single value
// for all of them (2, {2, 2, 2}, a std::vector or a torch::ExpandingArray all work); the weight is laid out as
// torch.nn stores it ([in, out / groups, *kernel] for the transposed convolutions, [out, in / groups, *kernel]
// for the convolutions). Bad arguments throw c10::Error, as torch's functions do. Under autocast the
// floating-point tensors are cast to the autocast dtype first (float64 excepted), as torch does for its
// convolutions.
//
// Autograd: every function here is differentiable, to any order, without Python. The gradient of each op is
// written with the other two ops of torch_convt::ops below, which are themselves differentiable (see
// README "How it works"). The functions never rely on an autograd kernel registered for the
// torch.ops.torch_convt operators, so they behave the same whether or not the Python package torch_convt
// (which registers one) is loaded in the process.
//
// The operators themselves are registered with the dispatcher when libtorch_convt is loaded; linking it
// (CMake: find_package(torch_convt) and target_link_libraries(... torch_convt::torch_convt)) is enough.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <string_view>

namespace torch_convt {

// ---- torch.nn.functional-style functions ------------------------------------------------------------------

// Like at::conv_transpose1d / torch::nn::functional::conv_transpose1d.
at::Tensor conv_transpose1d(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias = {}, at::IntArrayRef stride = 1,
                            at::IntArrayRef padding = 0, at::IntArrayRef output_padding = 0, int64_t groups = 1,
                            at::IntArrayRef dilation = 1);

// Like at::conv_transpose2d / torch::nn::functional::conv_transpose2d.
at::Tensor conv_transpose2d(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias = {}, at::IntArrayRef stride = 1,
                            at::IntArrayRef padding = 0, at::IntArrayRef output_padding = 0, int64_t groups = 1,
                            at::IntArrayRef dilation = 1);

// Like at::conv_transpose3d / torch::nn::functional::conv_transpose3d.
at::Tensor conv_transpose3d(const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias = {}, at::IntArrayRef stride = 1,
                            at::IntArrayRef padding = 0, at::IntArrayRef output_padding = 0, int64_t groups = 1,
                            at::IntArrayRef dilation = 1);

// Like at::conv1d / torch::nn::functional::conv1d.
at::Tensor conv1d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias = {},
                  at::IntArrayRef stride = 1, at::IntArrayRef padding = 0, at::IntArrayRef dilation = 1,
                  int64_t groups = 1);

// Like at::conv2d / torch::nn::functional::conv2d.
at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias = {},
                  at::IntArrayRef stride = 1, at::IntArrayRef padding = 0, at::IntArrayRef dilation = 1,
                  int64_t groups = 1);

// Like at::conv3d / torch::nn::functional::conv3d.
at::Tensor conv3d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias = {},
                  at::IntArrayRef stride = 1, at::IntArrayRef padding = 0, at::IntArrayRef dilation = 1,
                  int64_t groups = 1);

// padding "valid" (no padding) or "same" (output as long as the input; stride 1 only), as at::conv1d/2d/3d's
// string-padding overloads.
at::Tensor conv1d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, std::string_view padding, at::IntArrayRef dilation = 1,
                  int64_t groups = 1);
at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, std::string_view padding, at::IntArrayRef dilation = 1,
                  int64_t groups = 1);
at::Tensor conv3d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, std::string_view padding, at::IntArrayRef dilation = 1,
                  int64_t groups = 1);

// One padding value for every dim. Without these, a literal 0 would be ambiguous between the two overloads
// above, since it also converts to a null string_view (as it is for at::conv1d/2d/3d). The calls below are
// qualified because argument-dependent lookup would also find at::conv1d/2d/3d.
inline at::Tensor conv1d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, int64_t padding, at::IntArrayRef dilation = 1, int64_t groups = 1) {
  return torch_convt::conv1d(input, weight, bias, stride, at::IntArrayRef(padding), dilation, groups);
}
inline at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, int64_t padding, at::IntArrayRef dilation = 1, int64_t groups = 1) {
  return torch_convt::conv2d(input, weight, bias, stride, at::IntArrayRef(padding), dilation, groups);
}
inline at::Tensor conv3d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, int64_t padding, at::IntArrayRef dilation = 1, int64_t groups = 1) {
  return torch_convt::conv3d(input, weight, bias, stride, at::IntArrayRef(padding), dilation, groups);
}

// ---- the three operators, differentiable --------------------------------------------------------------------
// torch.ops.torch_convt.conv_transpose / conv / conv_weight_grad with autograd attached. Lower level than the
// functions above: the input must be batched, every list must hold one value per spatial dim, and no autocast
// cast is done. "Big" is the conv input / conv_transpose output, "small" the other side.
namespace ops {

// Transposed convolution: small (input) -> big.
at::Tensor conv_transpose(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                          at::IntArrayRef dilation, int64_t groups);

// Convolution: big (input) -> small.
at::Tensor conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// The weight gradient of both (of size weight_size): of conv with input = the conv input and grad_output =
// the gradient of its output; of conv_transpose with input = the gradient of its output and grad_output = its
// input. grad_output may be shorter than a conv of input gives (output_padding of the transposed convolution).
at::Tensor conv_weight_grad(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef weight_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups);

}  // namespace ops

// The memory kept for reuse. A CPU output of 1 MiB or more leaves its memory, when it is freed, to the next output
// that fits (at most 4 blocks, 1 GiB in all unless set_cache_limit says otherwise), so that a layer called again
// does not pay for fresh pages, which the OS zeroes on first touch; float32 layers computed by Winograd keep their
// transformed weights for later calls with the same weights (compared byte for byte; at most 64 MiB, or the limit if
// less, per calling thread). empty_cache() releases the kept blocks and the calling thread's transformed weights and
// returns their bytes; set_cache_limit(bytes) sets the most bytes kept (0: nothing is kept) and returns the previous
// limit. Outputs in use are never affected.
int64_t empty_cache();
int64_t set_cache_limit(int64_t bytes);

// bfloat16 layers compute their GEMMs on the CPU's AMX tile unit where it has one (Intel Sapphire Rapids and
// later; float sums, as on the FMA units, in another order; float subnormals flushed to zero). set_amx(false)
// turns that off for later calls (set_amx(true) back on); returns whether it was in use.
bool set_amx(bool on);

// float32 layers at stride 1 with 3x3 or 3x3x3 kernels (any dilation) compute by Winograd F(2, 3), transposed ones
// at stride 2 with kernel 4 padding 1 or kernel 3 padding 0 or 1 by F(2, 2) on their phases, convolutions at stride 2
// with kernel 4 by F(2, 2) on their input's sub-lattices, kernel 2 at stride 1 by F(2, 2), and 1d transposed layers at
// stride s by kernel 2s (384 or more input channels a group) by F(3, 2) on triples of each phase, on AVX-512 CPUs where
// they have 16 channels a group or more and enough points (0.30 of the multiply-adds for 3x3x3, 0.42 for kernel 4 at
// stride 2 in 3d), errors as those of direct summation. set_winograd(false) turns that off for later
// calls (direct summation, as every other layer); returns whether it was on.
bool set_winograd(bool on);

}  // namespace torch_convt
