// The Python module torch_convt._C (the operator library itself, which torch.ops also loads): direct entries of
// the three ops for the Python entry points (torch_convt/ops.py), built by setup.py only (the CMake library has no
// Python).
//
// Why: a call through torch.ops parses its arguments against the schema in generic code, which costs about 5 us of
// a small layer's 11 us op call (an 8-channel 8 x 8 layer; the op itself, called from C++, takes 5.7 us). These
// entries take typed arguments (pybind11 converts them directly) and call the op through the dispatcher from below
// autograd, as the entry points do for calls that record no graph: everything else that sees the op (autocast,
// dispatch modes, the profiler's record of the op, functorch) still does. The entry points use them only where
// nothing above the dispatcher must see the call (no __torch_function__ override, no tracer, not under
// torch.compile or torch.func); the rest goes through torch.ops as before. The *_graph entries record the C++ API's
// autograd nodes (csrc/api/cpp_api.cpp) for calls that need a graph (ops.py says when).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>
#include <torch_convt/torch_convt.h>

#include <optional>
#include <vector>

namespace {

using Ints = std::vector<int64_t>;

c10::SymIntArrayRef sym(const Ints& v) {
  return c10::fromIntArrayRefSlow(v);
}

at::Tensor conv_transpose(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const Ints& stride, const Ints& padding, const Ints& output_padding, const Ints& dilation,
                          int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_convt::conv_transpose", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef,
                                               c10::SymIntArrayRef, int64_t)>();
  pybind11::gil_scoped_release no_gil;  // (as torch.ops calls do: other Python threads run meanwhile)
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(input, weight, bias, sym(stride), sym(padding), sym(output_padding), sym(dilation), groups);
}

at::Tensor conv(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const Ints& stride, const Ints& padding, const Ints& dilation, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_convt::conv", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef,
                                               int64_t)>();
  pybind11::gil_scoped_release no_gil;
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(input, weight, bias, sym(stride), sym(padding), sym(dilation), groups);
}

at::Tensor conv_weight_grad(const at::Tensor& input, const at::Tensor& grad_output, const Ints& weight_size,
                            const Ints& stride, const Ints& padding, const Ints& dilation, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("torch_convt::conv_weight_grad", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
                                               c10::SymIntArrayRef, c10::SymIntArrayRef, c10::SymIntArrayRef,
                                               int64_t)>();
  pybind11::gil_scoped_release no_gil;
  at::AutoDispatchBelowAutograd below_autograd;
  return op.call(input, grad_output, sym(weight_size), sym(stride), sym(padding), sym(dilation), groups);
}

at::Tensor conv_transpose_graph(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, const Ints& stride, const Ints& padding,
                                const Ints& output_padding, const Ints& dilation, int64_t groups) {
  pybind11::gil_scoped_release no_gil;
  return torch_convt::ops::conv_transpose(input, weight, bias, stride, padding, output_padding, dilation, groups);
}

at::Tensor conv_graph(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const Ints& stride, const Ints& padding, const Ints& dilation, int64_t groups) {
  pybind11::gil_scoped_release no_gil;
  return torch_convt::ops::conv(input, weight, bias, stride, padding, dilation, groups);
}

at::Tensor conv_weight_grad_graph(const at::Tensor& input, const at::Tensor& grad_output, const Ints& weight_size,
                                  const Ints& stride, const Ints& padding, const Ints& dilation, int64_t groups) {
  pybind11::gil_scoped_release no_gil;
  return torch_convt::ops::conv_weight_grad(input, grad_output, weight_size, stride, padding, dilation, groups);
}

}  // namespace

// ================================ Python entries ================================
PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_convt's operator library; the three ops below autograd (see torch_convt/ops.py)";
  m.def("conv_transpose", &conv_transpose);
  m.def("conv", &conv);
  m.def("conv_weight_grad", &conv_weight_grad);
  m.def("conv_transpose_graph", &conv_transpose_graph);
  m.def("conv_graph", &conv_graph);
  m.def("conv_weight_grad_graph", &conv_weight_grad_graph);
  m.def("empty_cache", &torch_convt::empty_cache);
  m.def("set_cache_limit", &torch_convt::set_cache_limit);
  m.def("set_amx", &torch_convt::set_amx);
  m.def("set_winograd", &torch_convt::set_winograd);
}
