// The torch_convt operator library: every schema, in one block, and the one argument check of every op
// (check_conv_args, declared in common/params.h). Kernels register per backend in csrc/cpu/*.cpp and
// csrc/cuda/*.cu; fake (meta) kernels and autograd are registered in torch_convt/ops.py.
//
// Three ops, closed under differentiation (see README "How it works"):
//   conv_transpose  - the transposed convolution, i.e. the input-gradient of conv
//   conv            - the convolution, i.e. the input-gradient of conv_transpose
//   conv_weight_grad- the weight-gradient of both (with the roles of input and grad_output swapped)
// Argument names follow torch.nn.functional. Lists hold one value per spatial dim (1 to 3); the input is
// batched (N, C, *spatial); the weight is [C_small, C_big / groups, *kernel] for both conv and
// conv_transpose, exactly as torch.nn stores it.
// The lists are SymInt[] (as in aten::convolution) so that sizes computed from symbolic shapes under
// torch.compile(dynamic=True) / torch.export (an output_padding derived from an input size, a weight_size) stay
// symbolic instead of specialising the graph; the kernels still take plain int64 lists (IntArrayRef).
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>
#include <string>

#include "common/params.h"
#include "cpu/gemm.h"

TORCH_LIBRARY(torch_convt, m) {
  m.def(
      "conv_transpose(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, "
      "SymInt[] output_padding, SymInt[] dilation, int groups) -> Tensor");
  m.def(
      "conv(Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, SymInt[] dilation, "
      "int groups) -> Tensor");
  m.def(
      "conv_weight_grad(Tensor input, Tensor grad_output, SymInt[] weight_size, SymInt[] stride, "
      "SymInt[] padding, SymInt[] dilation, int groups) -> Tensor");
  // Not an op on tensors: the CPU's fp32 FMA peak (GFLOP/s, all threads), measured by our own register-blocked
  // loop with the GEMM's ISA; the benchmark's "% of peak" reference.
  m.def("cpu_fma_peak_gflops(float seconds) -> float", &torch_convt::cpu::fma_peak_gflops);
  // The same for bfloat16 on AMX tiles where bfloat16 layers use them (else 0).
  m.def("cpu_amx_peak_gflops(float seconds) -> float", &torch_convt::cpu::amx_peak_gflops);
}

namespace torch_convt {

namespace {

std::string join(at::IntArrayRef v, const char* sep = " x ") {
  std::ostringstream os;
  for (size_t i = 0; i < v.size(); ++i) os << (i ? sep : "") << v[i];
  return os.str();
}

void check_list(const char* op, const char* name, at::IntArrayRef v, int64_t dims) {
  TORCH_CHECK(static_cast<int64_t>(v.size()) == dims, op, ": expected ", name, " to be a list of ", dims,
              " values to match the convolution dimensions, but got ", name, "=", v);
}

int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!c10::mul_overflows(a, b, &r), "torch_convt: ", what, " overflows int64");
  return r;
}

int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!c10::add_overflows(a, b, &r), "torch_convt: ", what, " overflows int64");
  return r;
}

void check_tensor_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " to be on the same device as input (",
              input.device(), "), but got ", name, " on ", t.device());
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": input type (", input.scalar_type(), ") and ",
              name, " type (", t.scalar_type(), ") should be the same");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": expected a strided (dense) ", name, ", got layout ",
              t.layout());
}

}  // namespace

// Declared (and documented) in common/params.h.
ConvParams check_conv_args(ConvKind kind, const at::Tensor& input, const at::Tensor& second,
                           at::IntArrayRef weight_size, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef output_padding, at::IntArrayRef dilation,
                           int64_t groups) {
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
  // The CUDA kernels are for floating-point and complex types; torch's CUDA convolutions raise RuntimeError for
  // integer and bool tensors too.
  TORCH_CHECK(!input.is_cuda() || at::isFloatingType(input.scalar_type()) || at::isComplexType(input.scalar_type()),
              op, ": no CUDA kernel for ", input.scalar_type(), " tensors (floating-point and complex types only)");
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
  // An empty batch may have empty spatial dims, and a transposed one an empty output (as torch.nn: an empty result;
  // its weight gradient: zeros, whatever the geometry).
  const bool empty_batch = p.batch == 0;
  for (int64_t j = 2; j < rank; ++j) {
    TORCH_CHECK(input.size(j) > 0 || empty_batch, op,
                ": only zero batch or zero channel inputs are supported, but got input shape ", input.sizes());
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
      TORCH_CHECK(p.big[s] > 0 || (empty_batch && p.big[s] == 0), op, ": given input size per channel (",
                  join(input.sizes().slice(2)), "), the calculated output size per channel is ", p.big[s],
                  " at spatial dim ", j, ": output size is too small (padding ", p.padding[s], " is too large)");
    } else {
      p.big[s] = input.size(2 + j);
      const int64_t padded = checked_add(p.big[s], two_pad, "padded input size");
      TORCH_CHECK(padded >= extent || (empty_batch && kind == ConvKind::WeightGrad), op,
                  ": calculated padded input size per channel at spatial dim ", j, " is ", padded,
                  ", but the dilated kernel size is ", extent, ": kernel size can't be greater than actual input size");
      p.small[s] = padded >= extent ? (padded - extent) / p.stride[s] + 1 : 0;
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
      const bool fits = y > 0 && y <= p.small[s] && p.small[s] - y < std::max(p.stride[s], p.dilation[s]);
      TORCH_CHECK(empty_batch || fits, op, ": grad_output of size ", second.sizes(), " does not match input of size ",
                  input.sizes(), " for this convolution (expected spatial size ", p.small[s], " at dim ", j, ")");
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

}  // namespace torch_convt
