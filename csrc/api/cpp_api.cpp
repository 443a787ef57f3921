// The C++ API of include/torch_convt/torch_convt.h: torch.nn.functional-style functions over the three
// torch_convt operators, with autograd written in C++ (torch::autograd::Function), so that gradients work in a
// libtorch program, where the Python package's register_autograd does not exist.
//
// The ops are closed under differentiation (X big, Y small, W weight; see torch_convt/ops.py):
//   conv_transpose(Y, W) -> X     d/dY = conv(gX, W)                 d/dW = conv_weight_grad(gX, Y)
//   conv(X, W) -> Y               d/dX = conv_transpose(gY, W)       d/dW = conv_weight_grad(X, gY)
//   conv_weight_grad(X, Y) -> dW  d/dX = conv_transpose(Y, g)        d/dY = conv(X, g)
// Each backward below calls the other Functions' apply, so double (and higher) backward works. For complex
// tensors the adjoint conjugates the other operand (torch's conjugate-Wirtinger convention).
//
// Built into the CMake library (libtorch_convt) and into the Python extension, whose entry points record these
// nodes where no forward-mode AD or torch.func transform needs ops.py's autograd.Functions (see ops.py).
#include <torch_convt/torch_convt.h>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>
#include <vector>

namespace torch_convt {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using IntVec = std::vector<int64_t>;

// ---- the operators, below autograd -------------------------------------------------------------------------
using ConvTransposeSchema = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                       at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t);
using ConvSchema = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                              at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t);
using WeightGradSchema = at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                    at::IntArrayRef, at::IntArrayRef, int64_t);

template <typename Schema>
c10::TypedOperatorHandle<Schema> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Schema>();
}

// Runs an operator's backend kernel (CPU, CUDA, Meta) directly. Autograd and autocast keys are skipped: the
// autograd of this API is the Functions below, and the public functions do the autocast cast themselves. That
// matters when the Python package is loaded too: it registers autograd and autocast kernels for the ops (in
// Python), which must neither run a second time nor be needed here.
class BelowAutogradAndAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard_{c10::autograd_dispatch_keyset_with_ADInplaceOrView |
                                            c10::autocast_dispatch_keyset};
};

at::Tensor raw_conv_transpose(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef output_padding, at::IntArrayRef dilation, int64_t groups) {
  static const auto op = find_op<ConvTransposeSchema>("torch_convt::conv_transpose");
  BelowAutogradAndAutocast below;
  return op.call(input, weight, bias, stride, padding, output_padding, dilation, groups);
}

at::Tensor raw_conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static const auto op = find_op<ConvSchema>("torch_convt::conv");
  BelowAutogradAndAutocast below;
  return op.call(input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor raw_conv_weight_grad(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef weight_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  static const auto op = find_op<WeightGradSchema>("torch_convt::conv_weight_grad");
  BelowAutogradAndAutocast below;
  return op.call(input, grad_output, weight_size, stride, padding, dilation, groups);
}

// ---- backward helpers --------------------------------------------------------------------------------------

// conv_transpose's output size for output_padding 0.
int64_t conv_transpose_out_size(int64_t small, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation) {
  return (small - 1) * stride - 2 * padding + dilation * (kernel - 1) + 1;
}

// The output_padding that makes conv_transpose of a tensor of spatial size `small` exactly `big` long: the
// positions that the conv dropped at the end of its input (its stride did not reach them).
IntVec output_padding_for(at::IntArrayRef big, at::IntArrayRef small, at::IntArrayRef kernel, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  IntVec out(big.size());
  for (size_t j = 0; j < big.size(); ++j) {
    out[j] = big[j] - conv_transpose_out_size(small[j], kernel[j], stride[j], padding[j], dilation[j]);
  }
  return out;
}

// Crops trailing positions to `sizes`: with output_padding >= stride (possible with dilation), conv of the big
// tensor is longer than the small one (the extra positions read only output padding).
at::Tensor narrow_spatial(at::Tensor t, at::IntArrayRef sizes) {
  for (size_t j = 0; j < sizes.size(); ++j) {
    if (t.size(2 + j) != sizes[j]) t = t.narrow(2 + j, 0, sizes[j]);
  }
  return t;
}

// The bias gradient: grad_output summed over batch and space.
at::Tensor bias_grad(const at::Tensor& grad) {
  IntVec dims = {0};
  for (int64_t d = 2; d < grad.dim(); ++d) dims.push_back(d);
  return grad.sum(dims);
}

// The gradient of a tensor of an empty batch (any geometry, which the ops may not take back): zeros, if needed.
at::Tensor empty_batch_grad(AutogradContext* ctx, size_t i, const at::Tensor& t) {
  return ctx->needs_input_grad(i) ? at::zeros_like(t, at::MemoryFormat::Contiguous) : at::Tensor();
}

// An optional bias as the operators take it: absent if not given or undefined.
std::optional<at::Tensor> present(const std::optional<at::Tensor>& bias) {
  return bias.has_value() && bias->defined() ? bias : std::nullopt;
}

// ---- the three autograd Functions --------------------------------------------------------------------------
// Edges (ctx->needs_input_grad) exist for the tensor arguments only, in order: input, weight[, bias]. backward
// returns one entry per forward argument (undefined for the non-tensors).

class ConvTransposeFunction : public torch::autograd::Function<ConvTransposeFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef output_padding, at::IntArrayRef dilation, int64_t groups) {
    ctx->save_for_backward({input, weight});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = bias.has_value();
    return raw_conv_transpose(input, weight, bias, stride, padding, output_padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];  // gX
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];  // Y
    const at::Tensor& weight = saved[1];
    const IntVec stride = ctx->saved_data["stride"].toIntVector();
    const IntVec padding = ctx->saved_data["padding"].toIntVector();
    const IntVec dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    at::Tensor grad_input, grad_weight, grad_bias;
    if (input.size(0) == 0) {
      grad_input = empty_batch_grad(ctx, 0, input), grad_weight = empty_batch_grad(ctx, 1, weight);
    } else if (ctx->needs_input_grad(0)) {
      grad_input = narrow_spatial(ops::conv(grad, weight.conj(), std::nullopt, stride, padding, dilation, groups),
                                  input.sizes().slice(2));
    }
    if (input.size(0) > 0 && ctx->needs_input_grad(1)) {
      grad_weight = ops::conv_weight_grad(grad, input.conj(), weight.sizes(), stride, padding, dilation, groups);
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) grad_bias = bias_grad(grad);
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

class ConvFunction : public torch::autograd::Function<ConvFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
    ctx->save_for_backward({input, weight});
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["has_bias"] = bias.has_value();
    return raw_conv(input, weight, bias, stride, padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];  // gY
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];  // X
    const at::Tensor& weight = saved[1];
    const IntVec stride = ctx->saved_data["stride"].toIntVector();
    const IntVec padding = ctx->saved_data["padding"].toIntVector();
    const IntVec dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    at::Tensor grad_input, grad_weight, grad_bias;
    if (input.size(0) == 0) {
      grad_input = empty_batch_grad(ctx, 0, input), grad_weight = empty_batch_grad(ctx, 1, weight);
    } else if (ctx->needs_input_grad(0)) {
      const IntVec output_padding = output_padding_for(input.sizes().slice(2), grad.sizes().slice(2),
                                                       weight.sizes().slice(2), stride, padding, dilation);
      grad_input = ops::conv_transpose(grad, weight.conj(), std::nullopt, stride, padding, output_padding, dilation,
                                       groups);
    }
    if (input.size(0) > 0 && ctx->needs_input_grad(1)) {
      grad_weight = ops::conv_weight_grad(input.conj(), grad, weight.sizes(), stride, padding, dilation, groups);
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) grad_bias = bias_grad(grad);
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

class ConvWeightGradFunction : public torch::autograd::Function<ConvWeightGradFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& grad_output,
                            at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
    ctx->save_for_backward({input, grad_output});
    ctx->saved_data["weight_size"] = weight_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    return raw_conv_weight_grad(input, grad_output, weight_size, stride, padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];  // the gradient of dW, weight-shaped
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];        // X
    const at::Tensor& grad_output = saved[1];  // Y
    const IntVec weight_size = ctx->saved_data["weight_size"].toIntVector();
    const IntVec stride = ctx->saved_data["stride"].toIntVector();
    const IntVec padding = ctx->saved_data["padding"].toIntVector();
    const IntVec dilation = ctx->saved_data["dilation"].toIntVector();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    at::Tensor grad_input, grad_grad_output;
    if (input.size(0) == 0) {
      return {empty_batch_grad(ctx, 0, input), empty_batch_grad(ctx, 1, grad_output), at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor(), at::Tensor()};
    }
    if (ctx->needs_input_grad(0)) {
      const IntVec output_padding =
          output_padding_for(input.sizes().slice(2), grad_output.sizes().slice(2),
                             at::IntArrayRef(weight_size).slice(2), stride, padding, dilation);
      grad_input = ops::conv_transpose(grad_output.conj(), grad, std::nullopt, stride, padding, output_padding,
                                       dilation, groups);
    }
    if (ctx->needs_input_grad(1)) {
      grad_grad_output = narrow_spatial(
          ops::conv(input.conj(), grad, std::nullopt, stride, padding, dilation, groups), grad_output.sizes().slice(2));
    }
    return {grad_input, grad_grad_output, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---- torch.nn.functional-style argument handling -----------------------------------------------------------

// A list of one value per spatial dim; a single value is used for every dim, as torch does. Any other length
// is passed on for the operator to report.
IntVec expand(at::IntArrayRef values, int64_t dims) {
  return values.size() == 1 ? IntVec(dims, values[0]) : values.vec();
}

// Whether the input is batched (N, C, *spatial) rather than unbatched (C, *spatial); throws as torch does for
// any other rank.
bool is_batched(const char* fn, const at::Tensor& input, int64_t dims) {
  TORCH_CHECK(input.defined(), fn, ": expected a defined input tensor");
  TORCH_CHECK(input.dim() == dims + 1 || input.dim() == dims + 2, "Expected ", dims + 1, "D (unbatched) or ",
              dims + 2, "D (batched) input to ", fn, ", but got input of size: ", input.sizes());
  return input.dim() == dims + 2;
}

// The three tensors of a call, cast to the autocast dtype when autocast is on for the input's device (float64
// and non-floating tensors are left alone), as torch's autocast does for its convolutions.
struct CallTensors {
  at::Tensor input, weight;
  std::optional<at::Tensor> bias;

  CallTensors(const at::Tensor& input_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_)
      : input(input_), weight(weight_), bias(present(bias_)) {
    const c10::DeviceType device_type = input.device().type();
    if (at::autocast::is_autocast_available(device_type) && at::autocast::is_autocast_enabled(device_type)) {
      const at::ScalarType dtype = at::autocast::get_autocast_dtype(device_type);
      input = at::autocast::cached_cast(dtype, input, device_type);
      weight = at::autocast::cached_cast(dtype, weight, device_type);
      bias = at::autocast::cached_cast(dtype, bias, device_type);
    }
  }
};

at::Tensor conv_transpose_nd(int64_t dims, const char* fn, const at::Tensor& input, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef output_padding, int64_t groups, at::IntArrayRef dilation) {
  const bool batched = is_batched(fn, input, dims);
  // torch.nn refuses a transposed convolution with no output channels; so do we.
  TORCH_CHECK(!weight.defined() || weight.dim() < 2 || weight.size(1) > 0, fn,
              ": expected weight to have at least 1 output channel per group at dimension 1, but got weight of "
              "size ", weight.sizes());
  CallTensors t(input, weight, bias);
  const at::Tensor out = ops::conv_transpose(batched ? t.input : t.input.unsqueeze(0), t.weight, t.bias,
                                             expand(stride, dims), expand(padding, dims),
                                             expand(output_padding, dims), expand(dilation, dims), groups);
  return batched ? out : out.squeeze(0);
}

at::Tensor conv_nd(int64_t dims, const char* fn, const at::Tensor& input, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation, int64_t groups) {
  const bool batched = is_batched(fn, input, dims);
  CallTensors t(input, weight, bias);
  const at::Tensor out = ops::conv(batched ? t.input : t.input.unsqueeze(0), t.weight, t.bias, expand(stride, dims),
                                   expand(padding, dims), expand(dilation, dims), groups);
  return batched ? out : out.squeeze(0);
}

// padding="valid" is padding 0. padding="same" (stride 1 only) pads dilation*(kernel-1) in total per dim, half
// on each side and the odd one on the right, as torch defines it: the symmetric part is the operator's
// padding, the odd extra an explicit zero pad of the input (a copy, as in torch, which warns about it).
at::Tensor conv_nd_padding_mode(int64_t dims, const char* fn, const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                std::string_view padding, at::IntArrayRef dilation, int64_t groups) {
  if (padding == "valid") return conv_nd(dims, fn, input, weight, bias, stride, IntVec{0}, dilation, groups);
  TORCH_CHECK(padding == "same", "Invalid padding string: '", padding, "'");
  is_batched(fn, input, dims);  // (checks the rank)
  const IntVec strides = expand(stride, dims);
  const IntVec dilations = expand(dilation, dims);
  for (int64_t s : strides) TORCH_CHECK(s == 1, "padding='same' is not supported for strided convolutions");
  if (!weight.defined() || weight.dim() != dims + 2 || static_cast<int64_t>(dilations.size()) != dims) {
    // not a valid call: let the operator report what is wrong
    return conv_nd(dims, fn, input, weight, bias, strides, IntVec{0}, dilations, groups);
  }
  IntVec symmetric(dims), pad_right_last_dim_first;
  bool asymmetric = false;
  for (int64_t j = dims - 1; j >= 0; --j) {
    const int64_t total = dilations[j] * (weight.size(2 + j) - 1);
    symmetric[j] = total / 2;
    const int64_t extra = total - 2 * symmetric[j];
    asymmetric = asymmetric || extra != 0;
    pad_right_last_dim_first.insert(pad_right_last_dim_first.end(), {0, extra});
  }
  at::Tensor padded = input;
  if (asymmetric) {
    TORCH_WARN_ONCE("Using padding='same' with even kernel lengths and odd dilation may require a zero-padded "
                    "copy of the input be created");
    padded = at::constant_pad_nd(input, pad_right_last_dim_first, 0);  // pads the trailing (spatial) dims
  }
  return conv_nd(dims, fn, padded, weight, bias, strides, symmetric, dilations, groups);
}

}  // namespace

// ---- public: the differentiable operators ------------------------------------------------------------------
namespace ops {

at::Tensor conv_transpose(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                          at::IntArrayRef dilation, int64_t groups) {
  return ConvTransposeFunction::apply(input, weight, present(bias), stride, padding, output_padding, dilation,
                                      groups);
}

at::Tensor conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return ConvFunction::apply(input, weight, present(bias), stride, padding, dilation, groups);
}

at::Tensor conv_weight_grad(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef weight_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                            int64_t groups) {
  return ConvWeightGradFunction::apply(input, grad_output, weight_size, stride, padding, dilation, groups);
}

}  // namespace ops

// ---- public: torch.nn.functional-style functions -----------------------------------------------------------

at::Tensor conv_transpose1d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                            int64_t groups, at::IntArrayRef dilation) {
  return conv_transpose_nd(1, "conv_transpose1d", input, weight, bias, stride, padding, output_padding, groups,
                           dilation);
}

at::Tensor conv_transpose2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                            int64_t groups, at::IntArrayRef dilation) {
  return conv_transpose_nd(2, "conv_transpose2d", input, weight, bias, stride, padding, output_padding, groups,
                           dilation);
}

at::Tensor conv_transpose3d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                            int64_t groups, at::IntArrayRef dilation) {
  return conv_transpose_nd(3, "conv_transpose3d", input, weight, bias, stride, padding, output_padding, groups,
                           dilation);
}

at::Tensor conv1d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv_nd(1, "conv1d", input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv_nd(2, "conv2d", input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor conv3d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return conv_nd(3, "conv3d", input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor conv1d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, std::string_view padding, at::IntArrayRef dilation, int64_t groups) {
  return conv_nd_padding_mode(1, "conv1d", input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, std::string_view padding, at::IntArrayRef dilation, int64_t groups) {
  return conv_nd_padding_mode(2, "conv2d", input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor conv3d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  at::IntArrayRef stride, std::string_view padding, at::IntArrayRef dilation, int64_t groups) {
  return conv_nd_padding_mode(3, "conv3d", input, weight, bias, stride, padding, dilation, groups);
}

}  // namespace torch_convt
