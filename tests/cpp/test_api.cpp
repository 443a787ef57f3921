// C++ test of the torch_convt C++ API (include/torch_convt/torch_convt.h), in a program without Python.
//
// Checks, against torch's own functions (at::conv_transpose{1,2,3}d, at::conv{1,2,3}d):
//   - values, gradients and second-order gradients (d/d input, weight and grad_output of the gradients) in
//     float64, for 1d/2d/3d, batched and unbatched, with and without bias, groups, stride, padding,
//     output_padding, dilation, batch 0, complex128; padding="same"/"valid"; argument forms (single values,
//     braced lists, std::vector, torch::ExpandingArray); float32; autocast;
//   - that the API never relies on an autograd kernel of the operators: the Python package registers one
//     (register_autograd) that a libtorch program lacks. A stand-in is registered here, and the checks run
//     again with it; the API must not call it;
//   - that bad arguments throw c10::Error, as torch's functions do;
//   - the value and gradient checks again on CUDA, where a GPU is present (skipped otherwise).
// Prints one line per failure and "N passed, M failed"; the exit status is non-zero on any failure.
#include <torch_convt/torch_convt.h>

#include "check.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/expanding_array.h>
#include <torch/library.h>

#include <atomic>
#include <cstdio>
#include <functional>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using IntVec = std::vector<int64_t>;
using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr double kTol = 1e-10;  // float64

using torch_convt_test::record;
using torch_convt_test::run_case;

// An undefined gradient (input unused) counts as zeros, as autograd means it.
void expect_close(const std::string& name, const Tensor& ours, const Tensor& ref, double tol = kTol) {
  if (!ours.defined() || !ref.defined()) {
    const Tensor& other = ours.defined() ? ours : ref;
    const bool ok = !other.defined() || other.numel() == 0 || other.abs().max().item<double>() == 0.0;
    record(ok, name, ours.defined() ? "reference gradient is undefined, ours is not zero"
                                    : "our gradient is undefined, the reference is not zero");
    return;
  }
  if (ours.sizes() != ref.sizes()) {
    std::ostringstream os;
    os << "size " << ours.sizes() << " != reference " << ref.sizes();
    record(false, name, os.str());
    return;
  }
  if (ours.scalar_type() != ref.scalar_type()) {
    record(false, name, std::string("dtype ") + c10::toString(ours.scalar_type()) + " != reference " +
                            c10::toString(ref.scalar_type()));
    return;
  }
  const double diff = ours.numel() == 0 ? 0.0 : (ours - ref).abs().max().item<double>();
  std::ostringstream os;
  os << "max abs diff " << diff << " (tolerance " << tol << ")";
  record(diff <= tol, name, os.str());
}

// Expects both ours and torch's reference to throw c10::Error, ours with `needle` in its message.
void expect_error(const std::string& name, const std::string& needle, const std::function<void()>& ours,
                  const std::function<void()>& ref = nullptr) {
  try {
    ours();
    record(false, name, "no exception thrown");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    record(msg.find(needle) != std::string::npos, name, "message lacks \"" + needle + "\": " + msg);
  } catch (const std::exception& e) {
    record(false, name, std::string("threw a non-c10::Error: ") + e.what());
  }
  if (!ref) return;
  try {
    ref();
    record(false, name + " (torch)", "torch throws nothing here: the test is wrong");
  } catch (const c10::Error&) {
    record(true, name + " (torch)");
  } catch (const std::exception& e) {
    record(false, name + " (torch)", std::string("torch threw a non-c10::Error: ") + e.what());
  }
}

// A function under test: (input, weight, bias) -> output, geometry bound.
using ConvCall = std::function<Tensor(const Tensor&, const Tensor&, const OptTensor&)>;

// Compares ours with ref on the same leaves: the output, the gradients of <output, grad_output> with respect to
// input, weight and bias, and (if second_order) the gradients of <gradients, random directions> with respect to
// input, weight and grad_output - which runs every backward formula of the API, conv_weight_grad's included.
void compare(const std::string& name, const ConvCall& ours, const ConvCall& ref, const Tensor& input0,
             const Tensor& weight0, const OptTensor& bias0, bool second_order = true, double tol = kTol) {
  run_case(name, [&] {
    const Tensor input = input0.detach().clone().requires_grad_(true);
    const Tensor weight = weight0.detach().clone().requires_grad_(true);
    const OptTensor bias =
        bias0.has_value() ? OptTensor(bias0->detach().clone().requires_grad_(true)) : std::nullopt;
    std::vector<Tensor> leaves = {input, weight};
    if (bias) leaves.push_back(*bias);
    const char* leaf_names[] = {"input", "weight", "bias"};

    const Tensor out = ours(input, weight, bias);
    const Tensor ref_out = ref(input, weight, bias);
    expect_close(name + " value", out, ref_out, tol);
    if (out.sizes() != ref_out.sizes()) return;

    const Tensor grad_out = at::randn_like(ref_out).requires_grad_(true);
    const auto grads = torch::autograd::grad({out}, leaves, {grad_out}, /*retain_graph=*/true,
                                             /*create_graph=*/second_order, /*allow_unused=*/true);
    const auto ref_grads = torch::autograd::grad({ref_out}, leaves, {grad_out}, /*retain_graph=*/true,
                                                 /*create_graph=*/second_order, /*allow_unused=*/true);
    for (size_t i = 0; i < leaves.size(); ++i) {
      expect_close(name + " grad " + leaf_names[i], grads[i], ref_grads[i], tol);
    }
    if (!second_order) return;

    Tensor ours_sum = at::zeros({}, out.options()), ref_sum = at::zeros({}, out.options());
    for (size_t i = 0; i < leaves.size(); ++i) {
      const Tensor direction = at::randn_like(leaves[i]);
      if (grads[i].defined()) ours_sum = ours_sum + (grads[i] * direction).sum();
      if (ref_grads[i].defined()) ref_sum = ref_sum + (ref_grads[i] * direction).sum();
    }
    if (ours_sum.is_complex()) {  // a real function to differentiate
      ours_sum = at::real(ours_sum);
      ref_sum = at::real(ref_sum);
    }
    const std::vector<Tensor> second_inputs = {input, weight, grad_out};
    const char* second_names[] = {"input", "weight", "grad_output"};
    const auto second = torch::autograd::grad({ours_sum}, second_inputs, {}, true, false, true);
    const auto ref_second = torch::autograd::grad({ref_sum}, second_inputs, {}, true, false, true);
    for (size_t i = 0; i < second_inputs.size(); ++i) {
      expect_close(name + " second-order grad " + second_names[i], second[i], ref_second[i], tol);
    }
  });
}

// One geometry, in conv_transpose terms (as nn.ConvTranspose: weight [in, out/groups, *kernel]); the conv
// check uses the same weight as nn.Conv's [out, in/groups, *kernel], mapping big -> small.
struct Config {
  std::string name;
  IntVec small;  // spatial size of the conv_transpose input (empty: no batch dim given below)
  int64_t batch;  // -1: unbatched
  int64_t in_channels, out_channels;
  IntVec kernel, stride, padding, output_padding, dilation;
  int64_t groups;
  bool bias;
  at::ScalarType dtype = at::kDouble;
};

Tensor api_conv_transpose(const Tensor& x, const Tensor& w, const OptTensor& b, const Config& c) {
  switch (c.small.size()) {
    case 1: return torch_convt::conv_transpose1d(x, w, b, c.stride, c.padding, c.output_padding, c.groups, c.dilation);
    case 2: return torch_convt::conv_transpose2d(x, w, b, c.stride, c.padding, c.output_padding, c.groups, c.dilation);
    default: return torch_convt::conv_transpose3d(x, w, b, c.stride, c.padding, c.output_padding, c.groups, c.dilation);
  }
}

Tensor ref_conv_transpose(const Tensor& x, const Tensor& w, const OptTensor& b, const Config& c) {
  switch (c.small.size()) {
    case 1: return at::conv_transpose1d(x, w, b, c.stride, c.padding, c.output_padding, c.groups, c.dilation);
    case 2: return at::conv_transpose2d(x, w, b, c.stride, c.padding, c.output_padding, c.groups, c.dilation);
    default: return at::conv_transpose3d(x, w, b, c.stride, c.padding, c.output_padding, c.groups, c.dilation);
  }
}

Tensor api_conv(const Tensor& x, const Tensor& w, const OptTensor& b, const Config& c) {
  switch (c.small.size()) {
    case 1: return torch_convt::conv1d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
    case 2: return torch_convt::conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
    default: return torch_convt::conv3d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
  }
}

Tensor ref_conv(const Tensor& x, const Tensor& w, const OptTensor& b, const Config& c) {
  switch (c.small.size()) {
    case 1: return at::conv1d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
    case 2: return at::conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
    default: return at::conv3d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
  }
}

IntVec shape_of(int64_t batch, int64_t channels, const IntVec& spatial) {
  IntVec s;
  if (batch >= 0) s.push_back(batch);
  s.push_back(channels);
  s.insert(s.end(), spatial.begin(), spatial.end());
  return s;
}

void check_config(const Config& c, at::Device device = at::kCPU) {
  const auto opts = at::TensorOptions().dtype(c.dtype).device(device);
  IntVec w_shape = {c.in_channels, c.out_channels / c.groups};
  w_shape.insert(w_shape.end(), c.kernel.begin(), c.kernel.end());
  const Tensor w = at::randn(w_shape, opts);
  const Tensor x = at::randn(shape_of(c.batch, c.in_channels, c.small), opts);
  const OptTensor b = c.bias ? OptTensor(at::randn({c.out_channels}, opts)) : std::nullopt;
  const bool second_order = c.batch != 0;
  compare(c.name + " conv_transpose",
          [&](const Tensor& x_, const Tensor& w_, const OptTensor& b_) { return api_conv_transpose(x_, w_, b_, c); },
          [&](const Tensor& x_, const Tensor& w_, const OptTensor& b_) { return ref_conv_transpose(x_, w_, b_, c); },
          x, w, b, second_order);

  // conv on the big side, same weight (nn.Conv layout [out=in_channels, in=out_channels/groups, *kernel]).
  const Tensor big = at::randn(ref_conv_transpose(x, w, b, c).sizes(), opts);
  const OptTensor conv_bias = c.bias ? OptTensor(at::randn({c.in_channels}, opts)) : std::nullopt;
  compare(c.name + " conv",
          [&](const Tensor& x_, const Tensor& w_, const OptTensor& b_) { return api_conv(x_, w_, b_, c); },
          [&](const Tensor& x_, const Tensor& w_, const OptTensor& b_) { return ref_conv(x_, w_, b_, c); }, big, w,
          conv_bias, second_order);
}

const std::vector<Config>& configs() {
  // name, small, batch (-1 unbatched), Cin, Cout, kernel, stride, padding, output_padding, dilation, groups, bias
  static const std::vector<Config> all = {
      {"1d plain", {9}, 2, 3, 4, {3}, {1}, {0}, {0}, {1}, 1, false},
      {"1d s2 p1 op1 d2 g2 bias", {8}, 2, 4, 6, {3}, {2}, {1}, {1}, {2}, 2, true},
      {"1d unbatched s3 op2 bias", {5}, -1, 2, 3, {2}, {3}, {0}, {2}, {1}, 1, true},
      {"2d s2 p1 op1 bias", {5, 6}, 2, 4, 6, {3, 3}, {2, 2}, {1, 1}, {1, 1}, {1, 1}, 1, true},
      {"2d unbatched d2 g2", {6, 5}, -1, 4, 6, {3, 2}, {1, 1}, {0, 1}, {0, 0}, {2, 2}, 2, false},
      {"2d mixed s3,1 op2,0 k4,1 g3 bias", {4, 7}, 3, 6, 3, {4, 1}, {3, 1}, {2, 0}, {2, 0}, {1, 1}, 3, true},
      {"2d depthwise s2 op1", {5, 5}, 2, 4, 4, {3, 3}, {2, 2}, {1, 1}, {1, 1}, {1, 1}, 4, false},
      {"3d k2 s2 (up-sampler) bias", {3, 2, 3}, 2, 4, 3, {2, 2, 2}, {2, 2, 2}, {0, 0, 0}, {0, 0, 0}, {1, 1, 1}, 1,
       true},
      {"3d s2 p1 op1 d2 g2 bias", {3, 4, 3}, 2, 4, 4, {3, 2, 3}, {2, 2, 2}, {1, 1, 1}, {1, 1, 1}, {2, 1, 2}, 2, true},
      {"3d unbatched s1,2,3 p0,1,2 op0,1,2", {4, 3, 3}, -1, 3, 2, {2, 3, 4}, {1, 2, 3}, {0, 1, 2}, {0, 1, 2},
       {1, 1, 1}, 1, true},
      {"3d op >= stride (d3 s2 op2) g2", {3, 3, 2}, 1, 2, 4, {2, 2, 2}, {2, 2, 1}, {0, 1, 0}, {2, 0, 0}, {3, 1, 1},
       2, false},
      {"3d batch 0 bias", {3, 3, 3}, 0, 2, 3, {3, 3, 3}, {2, 2, 2}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, 1, true},
      {"2d complex128 s2 g2 bias", {4, 3}, 2, 4, 2, {3, 2}, {2, 1}, {1, 0}, {1, 0}, {1, 2}, 2, true,
       at::kComplexDouble},
  };
  return all;
}

// padding="same" / "valid" against at::conv{1,2,3}d's string-padding overloads, including even kernels with
// odd dilation (an asymmetric pad).
void check_padding_modes() {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  struct Case {
    std::string name;
    IntVec input_shape, weight_shape, dilation;
    std::string padding;
    int64_t groups;
  };
  const std::vector<Case> cases = {
      {"1d same k4 (asymmetric)", {2, 4, 9}, {6, 2, 4}, {1}, "same", 2},
      {"2d same k3,4 d2,1", {2, 3, 7, 6}, {2, 3, 3, 4}, {2, 1}, "same", 1},
      {"3d same unbatched k2,3,2", {2, 5, 4, 6}, {3, 2, 2, 3, 2}, {1, 1, 3}, "same", 1},
      {"3d valid", {1, 2, 5, 6, 6}, {3, 2, 2, 3, 2}, {1, 2, 1}, "valid", 1},
  };
  for (const Case& c : cases) {
    const int64_t dims = static_cast<int64_t>(c.weight_shape.size()) - 2;
    const Tensor x = at::randn(c.input_shape, f64);
    const Tensor w = at::randn(c.weight_shape, f64);
    const OptTensor b = at::randn({c.weight_shape[0]}, f64);
    const std::string_view padding = c.padding;
    compare(
        "padding=" + c.name,
        [&](const Tensor& x_, const Tensor& w_, const OptTensor& b_) {
          switch (dims) {
            case 1: return torch_convt::conv1d(x_, w_, b_, 1, padding, c.dilation, c.groups);
            case 2: return torch_convt::conv2d(x_, w_, b_, 1, padding, c.dilation, c.groups);
            default: return torch_convt::conv3d(x_, w_, b_, 1, padding, c.dilation, c.groups);
          }
        },
        [&](const Tensor& x_, const Tensor& w_, const OptTensor& b_) {
          switch (dims) {
            case 1: return at::conv1d(x_, w_, b_, 1, padding, c.dilation, c.groups);
            case 2: return at::conv2d(x_, w_, b_, 1, padding, c.dilation, c.groups);
            default: return at::conv3d(x_, w_, b_, 1, padding, c.dilation, c.groups);
          }
        },
        x, w, b);
  }
}

// The argument forms of torch's functions: defaults, single values for all dims, braced lists, std::vector,
// torch::ExpandingArray; non-contiguous tensors; float32.
void check_argument_forms() {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const Tensor x = at::randn({2, 4, 3, 4, 5}, f64);
  const Tensor w = at::randn({4, 2, 2, 3, 2}, f64);
  const Tensor b = at::randn({2}, f64);
  run_case("argument forms", [&] {
    expect_close("defaults conv_transpose3d(x, w)", torch_convt::conv_transpose3d(x, w), at::conv_transpose3d(x, w));
    expect_close("single values conv_transpose3d(x, w, b, 2, 1, 1)", torch_convt::conv_transpose3d(x, w, b, 2, 1, 1),
                 at::conv_transpose3d(x, w, b, 2, 1, 1));
    expect_close("braced lists conv_transpose3d", torch_convt::conv_transpose3d(x, w, b, {2, 1, 2}, {1, 0, 1}, {1, 0, 0}),
                 at::conv_transpose3d(x, w, b, {2, 1, 2}, {1, 0, 1}, {1, 0, 0}));
    const IntVec stride = {1, 2, 2}, dilation = {2, 1, 1};
    expect_close("std::vector conv_transpose3d", torch_convt::conv_transpose3d(x, w, {}, stride, 0, 0, 1, dilation),
                 at::conv_transpose3d(x, w, {}, stride, 0, 0, 1, dilation));
    const torch::ExpandingArray<3> expanding_stride(2), expanding_padding({1, 0, 1});
    const Tensor conv_w = at::randn({3, 4, 2, 2, 3}, f64);
    expect_close("torch::ExpandingArray conv3d", torch_convt::conv3d(x, conv_w, {}, expanding_stride, expanding_padding),
                 at::conv3d(x, conv_w, {}, expanding_stride, expanding_padding));
    expect_close("single values conv3d(x, w, {}, 2, 0, 1)", torch_convt::conv3d(x, conv_w, {}, 2, 0, 1),
                 at::conv3d(x, conv_w, {}, 2, IntVec{0}, 1));  // (a literal 0 is ambiguous for at::conv3d)
    expect_close("undefined bias conv3d", torch_convt::conv3d(x, conv_w, Tensor()), at::conv3d(x, conv_w));
    const Tensor strided_x = at::randn({2, 4, 5, 4, 3}, f64).transpose(2, 4);
    const Tensor strided_w = at::randn({4, 2, 2, 2, 3}, f64).transpose(2, 4);
    expect_close("non-contiguous conv_transpose3d", torch_convt::conv_transpose3d(strided_x, strided_w, b, 2),
                 at::conv_transpose3d(strided_x, strided_w, b, 2));
    const Tensor x32 = x.to(at::kFloat), w32 = w.to(at::kFloat), b32 = at::randn({4});  // groups 2: 4 outputs
    const Tensor ours32 = torch_convt::conv_transpose3d(x32, w32, b32, 2, 1, 1, 2);
    const Tensor ref32 = at::conv_transpose3d(x32, w32, b32, 2, 1, 1, 2);
    expect_close("float32 conv_transpose3d", ours32, ref32, 1e-5 * (1.0 + ref32.abs().max().item<double>()));
  });
}

// Under autocast, torch runs its convolutions in the autocast dtype (bfloat16 on CPU); so must the API, with the
// gradients flowing back to the float32 leaves.
void check_autocast() {
  run_case("autocast", [&] {
    const Tensor x = at::randn({2, 4, 3, 4, 3}).requires_grad_(true);
    const Tensor w = at::randn({4, 3, 2, 2, 2}).requires_grad_(true);
    Tensor ours, ref;
    {
      at::autocast::set_autocast_enabled(at::kCPU, true);
      struct Restore {
        ~Restore() {
          at::autocast::set_autocast_enabled(at::kCPU, false);
          at::autocast::clear_cache();
        }
      } restore;
      ours = torch_convt::conv_transpose3d(x, w, {}, 2);
      ref = at::conv_transpose3d(x, w, {}, 2);
    }
    record(ours.scalar_type() == ref.scalar_type(), "autocast output dtype",
           std::string(c10::toString(ours.scalar_type())) + " != torch's " + c10::toString(ref.scalar_type()));
    // the exact result of the rounded inputs, in float64
    const Tensor exact = at::conv_transpose3d(x.detach().to(ref.scalar_type()).to(at::kDouble),
                                              w.detach().to(ref.scalar_type()).to(at::kDouble), {}, 2);
    const double scale = exact.abs().max().item<double>();
    expect_close("autocast value (bfloat16 rounding)", ours.to(at::kDouble), exact, 1e-2 * scale);
    ours.to(at::kFloat).sum().backward();
    record(x.grad().defined() && x.grad().scalar_type() == at::kFloat && w.grad().defined(),
           "autocast gradients reach the float32 leaves");
  });
}

void check_errors() {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const Tensor x = at::randn({1, 4, 5, 5, 5}, f64);
  const Tensor w = at::randn({4, 2, 3, 3, 3}, f64);
  const Tensor x2d = at::randn({1, 4, 5, 5}, f64);
  expect_error("conv_transpose3d of a 3d input throws",
               "Expected 4D (unbatched) or 5D (batched) input to conv_transpose3d",
               [&] { torch_convt::conv_transpose3d(x.flatten(2), w); },
               [&] { at::conv_transpose3d(x.flatten(2), w); });
  expect_error("conv2d of a 5d input throws", "Expected 3D (unbatched) or 4D (batched) input to conv2d",
               [&] { torch_convt::conv2d(x, w.flatten(3)); }, [&] { at::conv2d(x, w.flatten(3)); });
  expect_error("stride 0 throws", "stride", [&] { torch_convt::conv_transpose3d(x, w, {}, 0); },
               [&] { at::conv_transpose3d(x, w, {}, 0); });
  expect_error("stride list of wrong length throws", "stride",
               [&] { torch_convt::conv_transpose3d(x, w, {}, {1, 1}); },
               [&] { at::conv_transpose3d(x, w, {}, {1, 1}); });
  expect_error("groups not dividing channels throws", "groups",
               [&] { torch_convt::conv_transpose3d(x, w, {}, 1, 0, 0, 3); },
               [&] { at::conv_transpose3d(x, w, {}, 1, 0, 0, 3); });
  expect_error("weight with no output channels throws", "at least 1 output channel",
               [&] { torch_convt::conv_transpose2d(x2d, at::randn({4, 0, 3, 3}, f64)); },
               [&] { at::conv_transpose2d(x2d, at::randn({4, 0, 3, 3}, f64)); });
  const Tensor conv_w = at::randn({2, 4, 3, 3, 3}, f64);
  expect_error("padding='same' with stride 2 throws", "padding='same' is not supported for strided convolutions",
               [&] { torch_convt::conv3d(x, conv_w, {}, 2, "same"); }, [&] { at::conv3d(x, conv_w, {}, 2, "same"); });
  expect_error("an unknown padding string throws", "Invalid padding string: 'full'",
               [&] { torch_convt::conv3d(x, conv_w, {}, 1, "full"); }, [&] { at::conv3d(x, conv_w, {}, 1, "full"); });
  expect_error("bias of the wrong size throws", "bias",
               [&] { torch_convt::conv3d(x, conv_w, at::randn({3}, f64)); },
               [&] { at::conv3d(x, conv_w, at::randn({3}, f64)); });
}

// ---- the API does not need (or call) an autograd kernel of the operators ----------------------------------
// `import torch_convt` registers an autograd kernel for every operator (torch.library.register_autograd); a
// libtorch program has none. This stand-in plays that kernel: it counts its calls and runs the operator below
// autograd (no graph). With it registered, the API must give the same values and gradients and never call it.
std::atomic<int> g_stand_in_calls{0};

void stand_in_autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  ++g_stand_in_calls;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

void check_with_foreign_autograd_kernel() {
  torch::Library stand_in(torch::Library::IMPL, "torch_convt", c10::DispatchKey::Autograd, __FILE__, __LINE__);
  for (const char* op : {"conv_transpose", "conv", "conv_weight_grad"}) {
    stand_in.impl(op, torch::CppFunction::makeFromBoxedFunction<&stand_in_autograd_kernel>());
  }
  // The stand-in is live: a plain dispatcher call of an operator goes through it.
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const auto conv_transpose_op = c10::Dispatcher::singleton().findSchemaOrThrow("torch_convt::conv_transpose", "");
  g_stand_in_calls = 0;
  conv_transpose_op
      .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
                    at::IntArrayRef, at::IntArrayRef, int64_t)>()
      .call(at::randn({1, 2, 3}, f64), at::randn({2, 2, 2}, f64), std::nullopt, {1}, {0}, {0}, {1}, 1);
  record(g_stand_in_calls == 1, "stand-in autograd kernel is registered and reached by a dispatcher call");

  g_stand_in_calls = 0;
  for (const Config& c : configs()) {
    Config again = c;
    again.name = "[with an autograd kernel registered] " + c.name;
    check_config(again);
  }
  record(g_stand_in_calls == 0, "the API never calls an operator's autograd kernel",
         std::to_string(g_stand_in_calls.load()) + " calls");
}

// The memory kept for reuse: a freed 32 MiB output's block serves the next, which is fully written; the limits and
// empty_cache() count what is kept.
void check_cache() {
  const at::Tensor x = at::randn({1, 16, 32, 32, 32}), w = at::randn({16, 32, 2, 2, 2}), b = at::randn({32});
  torch_convt::empty_cache();
  at::Tensor out = torch_convt::conv_transpose3d(x, w, b, 2);
  const int64_t bytes = out.numel() * 4;
  const void* ptr = out.data_ptr();
  out.fill_(std::numeric_limits<float>::quiet_NaN());
  out = at::Tensor();
  out = torch_convt::conv_transpose3d(x, w, b, 2);
  record(out.data_ptr() == ptr && out.allclose(at::conv_transpose3d(x, w, b, 2), 1e-5, 1e-5),
         "a freed large output's memory serves the next output, fully written");
  out = at::Tensor();
  record(torch_convt::empty_cache() == bytes && torch_convt::empty_cache() == 0, "empty_cache releases the kept block");
  const int64_t previous = torch_convt::set_cache_limit(0);
  out = torch_convt::conv_transpose3d(x, w, b, 2);
  out = at::Tensor();
  record(torch_convt::empty_cache() == 0 && torch_convt::set_cache_limit(previous) == 0,
         "nothing is kept with a cache limit of 0");
}

}  // namespace

int main() {
  at::manual_seed(0);
  for (const Config& c : configs()) check_config(c);
  check_padding_modes();
  check_argument_forms();
  check_autocast();
  check_errors();
  check_with_foreign_autograd_kernel();
  check_cache();
  if (at::hasCUDA()) {  // the same checks on the GPU, against torch's CUDA convolutions
    for (const Config& c : configs()) {
      Config on_cuda = c;
      on_cuda.name = "[cuda] " + c.name;
      check_config(on_cuda, at::kCUDA);
    }
  } else {
    std::printf("CUDA checks skipped (no GPU)\n");
  }
  return torch_convt_test::summary();
}
