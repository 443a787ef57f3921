// The torch_convt operator library: every schema, in one block. Kernels register per backend in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) kernels and autograd are registered in torch_convt/ops.py.
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
#include <torch/library.h>

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
}
