// C++ test of the torch_convt operator library, through the dispatcher only (no Python).
//
// Checks, in float64 against torch's own convolutions (used here only as the reference):
//   torch_convt::conv_transpose   vs at::conv_transpose{1,2,3}d
//   torch_convt::conv             vs at::conv{1,2,3}d
//   torch_convt::conv_weight_grad vs the weight gradient of at::convolution_backward (of conv, and of
//                                 conv_transpose with output_padding, where grad_output is the shorter one)
// and that bad arguments throw c10::Error. Prints one line per failure and "N passed, M failed"; the exit
// status is non-zero on any failure.
//
// The library registers its operators from static initialisers, so it must be loaded: CMake links it with
// --no-as-needed. Optionally, argv[1] names a library to dlopen first (e.g. the Python extension's _C.so).
#include "check.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>

#include <cstdio>
#include <functional>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace {

using IntVec = std::vector<int64_t>;

using ConvTransposeFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                   at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t);
using ConvFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                          at::IntArrayRef, at::IntArrayRef, int64_t);
using WeightGradFn = at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                                at::IntArrayRef, at::IntArrayRef, int64_t);

constexpr double kTol = 1e-10;

using torch_convt_test::record;
using torch_convt_test::run_case;

void expect_close(const std::string& name, const at::Tensor& ours, const at::Tensor& ref) {
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
  os << "max abs diff " << diff << " (tolerance " << kTol << ")";
  record(diff < kTol, name, os.str());
}

// Expects f to throw c10::Error whose message contains `needle`.
void expect_error(const std::string& name, const std::string& needle, const std::function<void()>& f) {
  try {
    f();
    record(false, name, "no exception thrown");
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    record(msg.find(needle) != std::string::npos, name, "message lacks \"" + needle + "\": " + msg);
  } catch (const std::exception& e) {
    record(false, name, std::string("threw a non-c10::Error: ") + e.what());
  }
}

struct Ops {
  c10::TypedOperatorHandle<ConvTransposeFn> conv_transpose;
  c10::TypedOperatorHandle<ConvFn> conv;
  c10::TypedOperatorHandle<WeightGradFn> weight_grad;
};

Ops find_ops() {
  auto& d = c10::Dispatcher::singleton();
  return Ops{d.findSchemaOrThrow("torch_convt::conv_transpose", "").typed<ConvTransposeFn>(),
             d.findSchemaOrThrow("torch_convt::conv", "").typed<ConvFn>(),
             d.findSchemaOrThrow("torch_convt::conv_weight_grad", "").typed<WeightGradFn>()};
}

// One convolution geometry. "Big" is the conv input / conv_transpose output; "small" the other side.
// in_channels/out_channels are those of the conv_transpose (as nn.ConvTranspose: weight [in, out/g, *k]).
struct Config {
  std::string name;
  IntVec small;  // spatial size of the conv_transpose input
  int64_t batch, in_channels, out_channels;
  IntVec kernel, stride, padding, output_padding, dilation;
  int64_t groups;
  bool bias;
};

at::Tensor ref_conv_transpose(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                              const Config& c) {
  switch (c.small.size()) {
    case 1: return at::conv_transpose1d(x, w, b, c.stride, c.padding, c.output_padding, c.groups, c.dilation);
    case 2: return at::conv_transpose2d(x, w, b, c.stride, c.padding, c.output_padding, c.groups, c.dilation);
    default: return at::conv_transpose3d(x, w, b, c.stride, c.padding, c.output_padding, c.groups, c.dilation);
  }
}

at::Tensor ref_conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b, const Config& c) {
  switch (c.small.size()) {
    case 1: return at::conv1d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
    case 2: return at::conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
    default: return at::conv3d(x, w, b, c.stride, c.padding, c.dilation, c.groups);
  }
}

IntVec zeros_like(const IntVec& v) { return IntVec(v.size(), 0); }

void check_config(const Ops& ops, const Config& c) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  IntVec x_shape = {c.batch, c.in_channels};
  x_shape.insert(x_shape.end(), c.small.begin(), c.small.end());
  IntVec w_shape = {c.in_channels, c.out_channels / c.groups};
  w_shape.insert(w_shape.end(), c.kernel.begin(), c.kernel.end());
  const at::Tensor x = at::randn(x_shape, f64);
  const at::Tensor w = at::randn(w_shape, f64);
  const std::optional<at::Tensor> b = c.bias ? std::optional<at::Tensor>(at::randn({c.out_channels}, f64))
                                             : std::nullopt;

  // conv_transpose: small (x) -> big.
  at::Tensor big;
  run_case(c.name + " conv_transpose", [&] {
    const at::Tensor ours =
        ops.conv_transpose.call(x, w, b, c.stride, c.padding, c.output_padding, c.dilation, c.groups);
    big = ref_conv_transpose(x, w, b, c);
    expect_close(c.name + " conv_transpose", ours, big);
  });
  if (!big.defined()) return;

  // conv with the same weight: big -> small. Bias, if any, has in_channels entries here.
  const std::optional<at::Tensor> cb =
      c.bias ? std::optional<at::Tensor>(at::randn({c.in_channels}, f64)) : std::nullopt;
  const at::Tensor z = at::randn(big.sizes(), f64);
  at::Tensor conv_out;
  run_case(c.name + " conv", [&] {
    const at::Tensor ours = ops.conv.call(z, w, cb, c.stride, c.padding, c.dilation, c.groups);
    conv_out = ref_conv(z, w, cb, c);
    expect_close(c.name + " conv", ours, conv_out);
  });

  // conv_weight_grad of conv: input = z (big), grad_output = g (conv output size).
  if (conv_out.defined()) {
    run_case(c.name + " conv_weight_grad (conv)", [&] {
      const at::Tensor g = at::randn(conv_out.sizes(), f64);
      const at::Tensor ours = ops.weight_grad.call(z, g, w.sizes(), c.stride, c.padding, c.dilation, c.groups);
      const at::Tensor ref = std::get<1>(at::convolution_backward(
          g, z, w, std::nullopt, c.stride, c.padding, c.dilation, /*transposed=*/false, zeros_like(c.stride),
          c.groups, {false, true, false}));
      expect_close(c.name + " conv_weight_grad (conv)", ours, ref);
    });
  }

  // conv_weight_grad of conv_transpose: the roles swap (input = grad of the big output, grad_output = x),
  // and x may be shorter than a conv of the big tensor gives (output_padding).
  run_case(c.name + " conv_weight_grad (conv_transpose)", [&] {
    const at::Tensor gbig = at::randn(big.sizes(), f64);
    const at::Tensor ours = ops.weight_grad.call(gbig, x, w.sizes(), c.stride, c.padding, c.dilation, c.groups);
    const at::Tensor ref = std::get<1>(at::convolution_backward(gbig, x, w, std::nullopt, c.stride, c.padding,
                                                                c.dilation, /*transposed=*/true, c.output_padding,
                                                                c.groups, {false, true, false}));
    expect_close(c.name + " conv_weight_grad (conv_transpose)", ours, ref);
  });
}

void check_non_contiguous(const Ops& ops) {
  run_case("non-contiguous input conv_transpose2d", [&] {
    const auto f64 = at::TensorOptions().dtype(at::kDouble);
    const at::Tensor x = at::randn({2, 4, 7, 5}, f64).transpose(2, 3);  // [2, 4, 5, 7], strided
    const at::Tensor w = at::randn({4, 3, 3, 2}, f64).transpose(2, 3);  // [4, 3, 2, 3], strided
    const std::optional<at::Tensor> b = at::randn({3}, f64);
    const IntVec s = {2, 1}, p = {1, 0}, op = {1, 0}, d = {1, 2};
    expect_close("non-contiguous input conv_transpose2d", ops.conv_transpose.call(x, w, b, s, p, op, d, 1),
                 at::conv_transpose2d(x, w, b, s, p, op, 1, d));
  });
}

void check_float32(const Ops& ops) {
  run_case("float32 conv_transpose3d", [&] {
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    const at::Tensor x = at::randn({1, 4, 3, 4, 5}, f32);
    const at::Tensor w = at::randn({4, 2, 2, 3, 3}, f32);
    const IntVec s = {2, 2, 1}, p = {0, 1, 1}, op = {1, 0, 0}, d = {1, 1, 1};
    const at::Tensor ours = ops.conv_transpose.call(x, w, std::nullopt, s, p, op, d, 2);
    const at::Tensor ref = at::conv_transpose3d(x, w, {}, s, p, op, 2, d);
    const bool ok = ours.sizes() == ref.sizes() && at::allclose(ours, ref, 1e-4, 1e-4);
    record(ok, "float32 conv_transpose3d", ok ? "" : "not allclose(rtol=atol=1e-4)");
  });
}

void check_errors(const Ops& ops) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor x = at::randn({1, 4, 5, 5}, f64);
  const at::Tensor w = at::randn({4, 2, 3, 3}, f64);
  const IntVec one = {1, 1}, zero = {0, 0}, bad_stride = {0, 1};
  expect_error("conv_transpose stride 0 throws", "stride",
               [&] { ops.conv_transpose.call(x, w, std::nullopt, bad_stride, zero, zero, one, 1); });
  expect_error("conv stride 0 throws", "stride",
               [&] { ops.conv.call(x, w, std::nullopt, bad_stride, zero, one, 1); });
  expect_error("conv_weight_grad stride 0 throws", "stride", [&] {
    ops.weight_grad.call(x, at::randn({1, 4, 3, 3}, f64), w.sizes(), bad_stride, zero, one, 1);
  });
  expect_error("conv_transpose stride list of wrong length throws", "stride",
               [&] { ops.conv_transpose.call(x, w, std::nullopt, IntVec{1, 1, 1}, zero, zero, one, 1); });
  expect_error("conv_transpose groups not dividing channels throws", "groups",
               [&] { ops.conv_transpose.call(x, w, std::nullopt, one, zero, zero, one, 3); });
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (!dlopen(argv[i], RTLD_NOW | RTLD_GLOBAL)) {
      std::printf("FAIL cannot dlopen %s: %s\n", argv[i], dlerror());
      return 2;
    }
  }

  std::optional<Ops> found;
  try {
    found.emplace(find_ops());
  } catch (const c10::Error& e) {
    std::printf("FAIL torch_convt operators not registered (is libtorch_convt loaded?): %s\n",
                e.what_without_backtrace());
    return 2;
  }
  const Ops& ops = *found;

  at::manual_seed(0);
  const std::vector<Config> configs = {
      // name, small, N, Cin, Cout, kernel, stride, padding, output_padding, dilation, groups, bias
      {"1d plain", {9}, 2, 3, 4, {3}, {1}, {0}, {0}, {1}, 1, false},
      {"1d s2 p1 op1 d2 g2 bias", {8}, 2, 4, 6, {3}, {2}, {1}, {1}, {2}, 2, true},
      {"2d s2 p1 op1 bias", {5, 6}, 2, 4, 6, {3, 3}, {2, 2}, {1, 1}, {1, 1}, {1, 1}, 1, true},
      {"2d d2 g2", {6, 5}, 1, 4, 6, {3, 2}, {1, 1}, {0, 1}, {0, 0}, {2, 2}, 2, false},
      {"2d s2 p1 op1 d2 g2 bias", {5, 4}, 2, 6, 4, {3, 3}, {2, 2}, {1, 1}, {1, 1}, {2, 2}, 2, true},
      {"2d mixed s3,1 op2,0 k4,1 g3", {4, 7}, 3, 6, 3, {4, 1}, {3, 1}, {2, 0}, {2, 0}, {1, 1}, 3, false},
      {"3d s2 p1 op1 d2 g2 bias", {3, 4, 3}, 2, 4, 4, {3, 2, 3}, {2, 2, 2}, {1, 1, 1}, {1, 1, 1}, {2, 1, 2}, 2, true},
      {"3d s1,2,3 p0,1,2 op0,1,2 g1", {4, 3, 3}, 1, 3, 2, {2, 3, 4}, {1, 2, 3}, {0, 1, 2}, {0, 1, 2}, {1, 1, 1}, 1,
       true},
  };
  for (const Config& c : configs) check_config(ops, c);
  check_non_contiguous(ops);
  check_float32(ops);
  check_errors(ops);

  return torch_convt_test::summary();
}
