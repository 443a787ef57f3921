// CUDA kernels of the three torch_convt ops: conv_transpose, conv and conv_weight_grad.
//
// Gather formulation: every output element is computed by one thread (one block for the weight gradient)
// that sums its own contributors in a fixed order, so there are no atomics and results are bitwise
// reproducible. Accumulation is in at::opmath_type (float for half/bfloat16). Index arithmetic is 32-bit when
// every tensor and every geometric offset provably fits (faster division), 64-bit otherwise (tensors past
// 2^31 elements). Geometry and checks are shared with the CPU backend: common/params.h, common/index_math.h.
//
// Only c10/cuda headers and ATen/ATen.h are included, so this file compiles on machines without the CUDA
// math libraries' headers (tools/check_cuda_compile.sh).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common/index_math.h"
#include "../common/params.h"

namespace torch_convt {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride loops cover the rest

// The geometry of ConvParams in the kernel's index type.
template <typename index_t>
struct Geometry {
  index_t groups, big_group, small_group;
  index_t big[kMaxDims], small[kMaxDims], kernel[kMaxDims], stride[kMaxDims], padding[kMaxDims],
      dilation[kMaxDims];
  index_t big_spatial, small_spatial, kernel_numel;
};

template <typename index_t>
Geometry<index_t> geometry(const ConvParams& p) {
  Geometry<index_t> g;
  g.groups = p.groups;
  g.big_group = p.big_group();
  g.small_group = p.small_group();
  for (int d = 0; d < kMaxDims; ++d) {
    g.big[d] = p.big[d];
    g.small[d] = p.small[d];
    g.kernel[d] = p.kernel[d];
    g.stride[d] = p.stride[d];
    g.padding[d] = p.padding[d];
    g.dilation[d] = p.dilation[d];
  }
  g.big_spatial = p.big_spatial();
  g.small_spatial = p.small_spatial();
  g.kernel_numel = p.kernel_numel();
  return g;
}

// 32-bit indexing is safe when every element offset and every intermediate position of index_math.h
// (i*stride, k*dilation, padding, their sums) stays below 2^31.
bool fits_int32(const ConvParams& p) {
  constexpr int64_t limit = std::numeric_limits<int32_t>::max() / 4;
  const int64_t numel_big = p.batch * p.big_channels * p.big_spatial();
  const int64_t numel_small = p.batch * p.small_channels * p.small_spatial();
  const int64_t numel_weight = p.small_channels * p.big_group() * p.kernel_numel();
  if (std::max({numel_big, numel_small, numel_weight}) >= limit) return false;
  for (int d = 0; d < kMaxDims; ++d) {
    // Each factor below 2^29 first, so that the products and sums below cannot overflow int64 either.
    if (std::max({p.small[d], p.big[d], p.kernel[d], p.stride[d], p.padding[d], p.dilation[d]}) >= limit) return false;
    const int64_t reach = p.small[d] * p.stride[d] + p.kernel[d] * p.dilation[d] + p.padding[d] + p.big[d];
    if (reach >= limit) return false;
  }
  return true;
}

int blocks_for(int64_t work) {
  return static_cast<int>(std::max<int64_t>(1, std::min(ceil_div(work, kThreads), kMaxBlocks)));
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t load(const scalar_t* p, int64_t i) {
  return static_cast<acc_t>(p[i]);
}

// ---------------------------------------------------------------------------------------------------------
// conv_transpose: one thread per big element X[n, cx, o]; taps whose (o + padding - k*dilation) is a multiple
// of stride reach it from small position i = (o + padding - k*dilation) / stride.
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    conv_transpose_kernel(const scalar_t* __restrict__ y, const scalar_t* __restrict__ w,
                          const scalar_t* __restrict__ bias, scalar_t* __restrict__ x, Geometry<index_t> g,
                          int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t big_channels = g.groups * g.big_group, small_channels = g.groups * g.small_group;
  for (int64_t flat = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; flat < total;
       flat += int64_t(blockDim.x) * gridDim.x) {
    index_t f = static_cast<index_t>(flat), o[kMaxDims];
    o[2] = f % g.big[2], f /= g.big[2];
    o[1] = f % g.big[1], f /= g.big[1];
    o[0] = f % g.big[0], f /= g.big[0];
    const index_t cx = f % big_channels, n = f / big_channels;
    const index_t grp = cx / g.big_group, cxl = cx % g.big_group;
    acc_t acc = bias ? load<acc_t>(bias, cx) : acc_t(0);
    const scalar_t* y_n = y + (n * small_channels + grp * g.small_group) * g.small_spatial;
    const scalar_t* w_g = w + (grp * g.small_group * g.big_group + cxl) * g.kernel_numel;
    for (index_t k0 = 0; k0 < g.kernel[0]; ++k0) {
      const index_t a0 = o[0] + g.padding[0] - k0 * g.dilation[0];
      if (a0 < 0 || a0 % g.stride[0] != 0 || a0 / g.stride[0] >= g.small[0]) continue;
      for (index_t k1 = 0; k1 < g.kernel[1]; ++k1) {
        const index_t a1 = o[1] + g.padding[1] - k1 * g.dilation[1];
        if (a1 < 0 || a1 % g.stride[1] != 0 || a1 / g.stride[1] >= g.small[1]) continue;
        for (index_t k2 = 0; k2 < g.kernel[2]; ++k2) {
          const index_t a2 = o[2] + g.padding[2] - k2 * g.dilation[2];
          if (a2 < 0 || a2 % g.stride[2] != 0 || a2 / g.stride[2] >= g.small[2]) continue;
          const index_t i = ((a0 / g.stride[0]) * g.small[1] + a1 / g.stride[1]) * g.small[2] + a2 / g.stride[2];
          const index_t k = (k0 * g.kernel[1] + k1) * g.kernel[2] + k2;
          for (index_t cy = 0; cy < g.small_group; ++cy) {
            acc += load<acc_t>(w_g, (cy * g.big_group) * g.kernel_numel + k) *
                   load<acc_t>(y_n, cy * g.small_spatial + i);
          }
        }
      }
    }
    x[flat] = static_cast<scalar_t>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------------
// conv: one thread per small element Y[n, cy, i], reading big positions i*stride - padding + k*dilation.
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    conv_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w, const scalar_t* __restrict__ bias,
                scalar_t* __restrict__ y, Geometry<index_t> g, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t big_channels = g.groups * g.big_group, small_channels = g.groups * g.small_group;
  for (int64_t flat = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; flat < total;
       flat += int64_t(blockDim.x) * gridDim.x) {
    index_t f = static_cast<index_t>(flat), i[kMaxDims];
    i[2] = f % g.small[2], f /= g.small[2];
    i[1] = f % g.small[1], f /= g.small[1];
    i[0] = f % g.small[0], f /= g.small[0];
    const index_t cy = f % small_channels, n = f / small_channels, grp = cy / g.small_group;
    acc_t acc = bias ? load<acc_t>(bias, cy) : acc_t(0);
    const scalar_t* x_n = x + (n * big_channels + grp * g.big_group) * g.big_spatial;
    const scalar_t* w_c = w + cy * g.big_group * g.kernel_numel;
    for (index_t k0 = 0; k0 < g.kernel[0]; ++k0) {
      const index_t p0 = big_position(i[0], k0, g.stride[0], g.padding[0], g.dilation[0]);
      if (p0 < 0 || p0 >= g.big[0]) continue;
      for (index_t k1 = 0; k1 < g.kernel[1]; ++k1) {
        const index_t p1 = big_position(i[1], k1, g.stride[1], g.padding[1], g.dilation[1]);
        if (p1 < 0 || p1 >= g.big[1]) continue;
        for (index_t k2 = 0; k2 < g.kernel[2]; ++k2) {
          const index_t p2 = big_position(i[2], k2, g.stride[2], g.padding[2], g.dilation[2]);
          if (p2 < 0 || p2 >= g.big[2]) continue;
          const index_t pos = (p0 * g.big[1] + p1) * g.big[2] + p2;
          const index_t k = (k0 * g.kernel[1] + k1) * g.kernel[2] + k2;
          for (index_t cx = 0; cx < g.big_group; ++cx) {
            acc += load<acc_t>(w_c, cx * g.kernel_numel + k) * load<acc_t>(x_n, cx * g.big_spatial + pos);
          }
        }
      }
    }
    y[flat] = static_cast<scalar_t>(acc);
  }
}

// ---------------------------------------------------------------------------------------------------------
// conv_weight_grad: one block per weight element dW[cy, cx, k]; its threads stride over (n, i) in a fixed
// pattern and combine in a fixed tree, so the sum is reproducible.
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t, typename index_t>
__global__ void __launch_bounds__(kThreads)
    conv_weight_grad_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                            scalar_t* __restrict__ dw, Geometry<index_t> g, int64_t batch, int64_t total) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ __align__(16) unsigned char smem[kThreads * sizeof(acc_t)];
  acc_t* partial = reinterpret_cast<acc_t*>(smem);
  const index_t big_channels = g.groups * g.big_group, small_channels = g.groups * g.small_group;
  const int64_t reduce = batch * int64_t(g.small_spatial);
  for (int64_t elem = blockIdx.x; elem < total; elem += gridDim.x) {
    index_t e = static_cast<index_t>(elem);
    const index_t k = e % g.kernel_numel;
    e /= g.kernel_numel;
    const index_t cxl = e % g.big_group, cy = e / g.big_group, grp = cy / g.small_group;
    index_t kk[kMaxDims];
    kk[2] = k % g.kernel[2];
    kk[1] = k / g.kernel[2] % g.kernel[1];
    kk[0] = k / (g.kernel[2] * g.kernel[1]);
    acc_t acc(0);
    for (int64_t j = threadIdx.x; j < reduce; j += blockDim.x) {
      index_t r = static_cast<index_t>(j % g.small_spatial);
      const index_t n = static_cast<index_t>(j / g.small_spatial);
      index_t i[kMaxDims];
      i[2] = r % g.small[2], r /= g.small[2];
      i[1] = r % g.small[1], i[0] = r / g.small[1];
      index_t pos = 0;
      bool inside = true;
      for (int d = 0; d < kMaxDims; ++d) {
        const index_t p = big_position(i[d], kk[d], g.stride[d], g.padding[d], g.dilation[d]);
        inside = inside && p >= 0 && p < g.big[d];
        pos = pos * g.big[d] + p;
      }
      if (!inside) continue;
      const index_t xi = (n * big_channels + grp * g.big_group + cxl) * g.big_spatial + pos;
      const index_t yi = (n * small_channels + cy) * g.small_spatial + static_cast<index_t>(j % g.small_spatial);
      acc += load<acc_t>(x, xi) * load<acc_t>(y, yi);
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s >>= 1) {
      if (threadIdx.x < s) partial[threadIdx.x] = partial[threadIdx.x] + partial[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) dw[elem] = static_cast<scalar_t>(partial[0]);
    __syncthreads();  // partial[] is reused by the next element
  }
}

// ---------------------------------------------------------------------------------------------------------
// Op entry points
// ---------------------------------------------------------------------------------------------------------
// Runs `launch.template operator()<index_t>()` with the narrowest safe index type.
template <typename F>
void with_index_type(const ConvParams& p, F&& launch) {
  if (fits_int32(p)) {
    launch(int32_t(0));
  } else {
    launch(int64_t(0));
  }
}

at::Tensor conv_transpose_cuda(const at::Tensor& input, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                               at::IntArrayRef padding, at::IntArrayRef output_padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const ConvParams p = check_conv_args(ConvKind::ConvTranspose, input, weight, weight.sizes(), bias, stride,
                                       padding, output_padding, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(p.big_shape(), input.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const at::Tensor y = dense(input), w = dense(weight);
  const at::Tensor b = dense(bias);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                              "torch_convt.conv_transpose", [&] {
    with_index_type(p, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      conv_transpose_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          y.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
          geometry<index_t>(p), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor conv_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvParams p =
      check_conv_args(ConvKind::Conv, input, weight, weight.sizes(), bias, stride, padding, {}, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(p.small_shape(), input.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const at::Tensor x = dense(input), w = dense(weight);
  const at::Tensor b = dense(bias);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "torch_convt.conv",
                                              [&] {
    with_index_type(p, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      conv_kernel<scalar_t, index_t><<<blocks_for(total), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
          b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
          geometry<index_t>(p), total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor conv_weight_grad_cuda(const at::Tensor& input, const at::Tensor& grad_output,
                                 at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups) {
  const ConvParams p = check_conv_args(ConvKind::WeightGrad, input, grad_output, weight_size, std::nullopt, stride,
                                       padding, {}, dilation, groups);
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty(p.weight_shape(), input.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  if (p.batch == 0) return out.zero_();  // (any geometry: check_conv_args)
  const at::Tensor x = dense(input), y = dense(grad_output);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                              "torch_convt.conv_weight_grad", [&] {
    with_index_type(p, [&](auto index_zero) {
      using index_t = decltype(index_zero);
      const int blocks = static_cast<int>(std::min<int64_t>(total, kMaxBlocks));
      conv_weight_grad_kernel<scalar_t, index_t><<<blocks, kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          geometry<index_t>(p), p.batch, total);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

// ================================ CUDA registrations ================================
TORCH_LIBRARY_IMPL(torch_convt, CUDA, m) {
  m.impl("conv_transpose", &conv_transpose_cuda);
  m.impl("conv", &conv_cuda);
  m.impl("conv_weight_grad", &conv_weight_grad_cuda);
}

}  // namespace torch_convt
