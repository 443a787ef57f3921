// Winograd transforms for float32 layers of the CPU kernels (conv_cpu.cpp), computed tile by tile: per dim, a tile
// of the output is a few consecutive points, computed from the window of input points they read by a few products
// of transformed inputs V and transformed weights U, fewer than direct summation's multiply-adds. The layer is the
// correlation of an input with the weights' taps, along each dim one of these schemes (kinds):
//  - stride 1, kernel 3: F(2, 3). Tiles of 2 outputs out[o] = sum_t wc[t] in[o + t - pad] from 4 inputs: 4 products
//    (B^T d, G g, A^T m of Lavin and Gray) instead of 6 multiply-adds. Conv and conv_transpose (in = Y, channel dims
//    swapped, taps reversed, pad = kernel - 1 - padding) at stride 1; dilated layers sub-lattice by sub-lattice
//    (wino_dilated).
//  - stride 1, kernel 1: tiles of 1 point (the dims of 3x1x3 and 1x3x3 kernels, and of 2d layers).
//  - stride 1, kernel 2: F(2, 2) (below), 3 products for 2 outputs instead of 4 multiply-adds. A conv at stride 2
//    with kernel 4 (GAN discriminators; the input gradient of a kernel-4 stride-2 transposed layer) is two of them
//    per dim, one on each sub-lattice of its input (wino_strided).
//  - conv_transpose at stride 2 with kernel 4 and padding 1 (GAN generators): out[2i - 1 + t] += in[i] w[t]. The
//    output's even points take taps 1 and 3, its odd points 0 and 2: two 2-tap correlations (phases) of the same
//    input, each by F(2, 2) (y0 = d0 g0 + d1 g1, y1 = d1 g0 + d2 g1 as (d0 - d1) g0 + d1 (g0 + g1) and the same
//    product plus (d2 - d1) g1). A tile is 4 outputs out[4T .. 4T + 3] from in[2T - 1 .. 2T + 2]: 6 products
//    instead of 8 multiply-adds, and the odd phase's first transformed input is the even phase's last one negated
//    (its weight takes the sign), so the input transform gives 5 values.
//  - conv_transpose at stride 2 with kernel 3 and padding 1 (MONAI's up-sampling) or 0: one phase takes taps 0 and 2
//    (F(2, 2)), the other tap 1 alone: 5 products a tile of 4 outputs instead of 6, from 4 transformed values.
//  - 1d conv_transpose at stride s (2 to 8) by kernel 2s (vocoders' up-samplers): F(3, 2) on triples of each of its
//    s phases, the input transform shared by all phases (wino_upsample, below).
// In 3d a tile's products are those of its dims' schemes (F(2, 3): 64 products for 8 outputs instead of 216, 0.30
// of the multiply-adds; the kernel-4 transposed layer: 216 for 64 outputs instead of 512, 0.42; kernel 3: 125 for
// 64 instead of 216, 0.58). The products of all tiles are GEMMs [products x co x ci] . [ci x tiles] on the GEMM of
// gemm.h, those of one transformed input stacked into one GEMM; the transforms are additions and subtractions
// vectorised over 16 consecutive tiles (one AVX-512 vector, or two AVX2 ones), the weights' also halvings. The errors
// stay at those of direct summation (a 32-channel 3x3x3 layer: 3.0e-7 of the largest output in float32, direct
// 4.6e-7, both against float64). Every output is one fixed sequence of operations: results do not depend on the
// thread count. The weight gradient of a layer takes the transposes of the same transforms (winograd_weight_grad).
// Non-finite values: a tile mixes its inputs, so an inf or NaN input would reach outputs that it does
// not contribute to; where any output comes out non-finite the caller computes the layer again on its own path, which
// gives each non-finite input exactly its own outputs (and weights that are not finite never take this path).
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <numeric>
#include <type_traits>

#include "columns.h"
#include "direct.h"
#include "gemm.h"

namespace torch_convt::cpu {

// Winograd in use for the layers it applies to (set_winograd turns it off for later calls, e.g. to compare).
inline std::atomic<bool>& winograd_flag() {
  static std::atomic<bool> on{true};
  return on;
}

// Winograd in use and the CPU's kernels there: AVX-512 or AVX2 + FMA + F16C (winograd_kernels.h).
#if TORCH_CONVT_DIRECT_AVX512
#define TORCH_CONVT_WINO_AVX2_TARGET __attribute__((target("avx2,fma,f16c")))
inline bool wino_avx2_cpu() {
  static const bool yes = direct_avx2() && __builtin_cpu_supports("f16c");
  return yes;
}
#endif
inline bool winograd_isa() {
#if TORCH_CONVT_DIRECT_AVX512
  return winograd_flag().load(std::memory_order_relaxed) && (direct_avx512() || wino_avx2_cpu());
#else
  return false;
#endif
}

// The schemes of a dim (above); kWinoNone: the dim takes none (the layer is not one for this path).
enum WinoKind : int { kWinoNone = -1, kWinoK1 = 0, kWinoK3, kWinoT4, kWinoT3Odd, kWinoT3Even, kWinoK2 };
// The stride-1 schemes (correlations of the input as it is; a conv_transpose's taps are then reversed).
constexpr bool wino_stride1(WinoKind k) { return k == kWinoK1 || k == kWinoK3 || k == kWinoK2; }

// A scheme's tiles: m outputs from a window of w inputs, the window advancing `adv` inputs a tile; nv transformed
// inputs, np products (product p multiplies transformed input vof[p] by transformed weight p, whose taps are row p
// of g: U_p = sum_t g[p][t] w[t], k taps); macs: direct summation's multiply-adds for a tile's outputs.
struct WinoScheme {
  int m, w, adv, nv, np, k, macs;
  int vof[6];
  float g[6][4];
};
inline constexpr WinoScheme kWinoSchemes[] = {
    {1, 1, 1, 1, 1, 1, 1, {0}, {{1}}},                                                        // K1
    {2, 4, 2, 4, 4, 3, 6, {0, 1, 2, 3}, {{1, 0, 0}, {.5f, .5f, .5f}, {.5f, -.5f, .5f}, {0, 0, 1}}},  // K3
    // T4: even phase d = in[2T - 1 .. 2T + 1], g = (w3, w1); odd phase d = in[2T .. 2T + 2], g = (w2, w0).
    {4, 4, 2, 5, 6, 4, 8, {0, 1, 2, 2, 3, 4}, {{0, 0, 0, 1}, {0, 1, 0, 1}, {0, 1, 0, 0}, {0, 0, -1, 0}, {1, 0, 1, 0},
                                               {1, 0, 0, 0}}},
    // T3 (padding 1: window in[2T .. 2T + 2], the odd outputs by F(2, 2) with g = (w2, w0), the even by tap 1 on
    // d0, d1; padding 0: window in[2T - 1 .. 2T + 1], the even outputs by F(2, 2), the odd by tap 1 on d1, d2).
    {4, 3, 2, 4, 5, 3, 6, {0, 1, 2, 3, 1}, {{0, 0, 1}, {1, 0, 1}, {1, 0, 0}, {0, 1, 0}, {0, 1, 0}}},
    {4, 3, 2, 4, 5, 3, 6, {0, 1, 2, 1, 3}, {{0, 0, 1}, {1, 0, 1}, {1, 0, 0}, {0, 1, 0}, {0, 1, 0}}},
    {2, 3, 2, 3, 3, 2, 4, {0, 1, 2}, {{1, 0}, {1, 1}, {0, 1}}},  // K2: F(2, 2), window in[2T - pad .. 2T - pad + 2]
};

// The scheme of a dim of a layer, and its window's offset (the input point of window element 0 is adv * T - pad):
// conv (transposed false) and conv_transpose at stride 1 by kernel 1 or 3, or 2 undilated (pad: conv's padding,
// conv_transpose's (kernel - 1) dilation - padding); conv_transpose at stride 2, dilation 1, by kernel 4 padding 1 or
// kernel 3 padding 0 or 1. kWinoNone for any other (a conv at stride 2: wino_strided_kinds).
inline WinoKind wino_kind(bool transposed, int64_t kernel, int64_t stride, int64_t padding, int64_t dilation,
                          int64_t& pad) {
  if (stride == 1) {
    pad = transposed ? (kernel - 1) * dilation - padding : padding;
    return kernel == 1 ? kWinoK1 : kernel == 3 ? kWinoK3 : kernel == 2 && dilation == 1 ? kWinoK2 : kWinoNone;
  }
  if (!transposed || stride != 2 || dilation != 1) return kWinoNone;
  if (kernel == 4 && padding == 1) return pad = 1, kWinoT4;
  if (kernel == 3 && padding == 1) return pad = 0, kWinoT3Odd;
  if (kernel == 3 && padding == 0) return pad = 1, kWinoT3Even;
  return kWinoNone;
}

// The schemes and windows' offsets of a layer's dims (wino_kind); false where a dim takes none.
inline bool wino_kinds(bool transposed, const int64_t* kernel, const int64_t* stride, const int64_t* padding,
                       const int64_t* dilation, WinoKind* kind, int64_t* pad) {
  for (int64_t d = 0; d < kMaxDims; ++d)
    if ((kind[d] = wino_kind(transposed, kernel[d], stride[d], padding[d], dilation[d], pad[d])) == kWinoNone)
      return false;
  return true;
}

// The layer as a correlation (above). Channels are per group; wc(g, co, ci, t) = w[g*w_g + co*w_co + ci*w_ci + t'],
// t the flat tap index of `kernel`, t' = t but with the taps of stride-1 dims reversed where `flip`. A conv at stride
// 2 (wino_strided): its stride-2 dims `split`, their kind K2, pad the conv's padding.
struct WinogradLayer {
  int64_t batch, groups, ci, co;
  int64_t in_ext[kMaxDims], out_ext[kMaxDims], pad[kMaxDims], kernel[kMaxDims], dilation[kMaxDims];
  int64_t w_g, w_co, w_ci;
  bool flip;
  WinoKind kind[kMaxDims];
  bool split[kMaxDims];
};

// The layer's products by its dims' schemes over direct summation's multiply-adds (1 where a dim has none: the
// up-samplers' path, wino_upsample, 4 products for 6).
inline double winograd_fraction(const WinogradLayer& l) {
  double f = 1;
  for (int64_t d = 0; d < kMaxDims; ++d)
    if (l.kind[d] != kWinoNone) f *= double(kWinoSchemes[l.kind[d]].np) / kWinoSchemes[l.kind[d]].macs;
  return f;
}

// A conv (not transposed) whose dims are each a stride-1 scheme's (wino_kind) or stride 2 by kernel 4, undilated, at
// least one of them the latter: kinds and pads as WinogradLayer has them (split dims: K2, the conv's padding).
inline bool wino_strided_kinds(const int64_t* kernel, const int64_t* stride, const int64_t* padding,
                               const int64_t* dilation, WinoKind* kind, int64_t* pad, bool* split) {
  bool any = false;
  for (int64_t d = 0; d < kMaxDims; ++d) {
    split[d] = stride[d] == 2 && kernel[d] == 4 && dilation[d] == 1;
    if (split[d]) {
      kind[d] = kWinoK2, pad[d] = padding[d], any = true;
    } else if ((kind[d] = wino_kind(false, kernel[d], stride[d], padding[d], dilation[d], pad[d])) == kWinoNone) {
      return false;
    }
  }
  return any && std::all_of(dilation, dilation + kMaxDims, [](int64_t v) { return v == 1; });
}

// The tiling of the output: per dim, tiles of its scheme's m points; tiles numbered (tz, ty, tx) row-major, and
// computed in runs of 16 consecutive tiles (a vector's lanes). Per tile np products of nv transformed inputs.
struct WinogradGeometry {
  int64_t tiles[kMaxDims], count;  // count: tiles of one image
  int64_t np, nv, macs;            // a tile's products, transformed inputs, direct multiply-adds
};

inline WinogradGeometry wino_geometry(const WinogradLayer& l) {
  WinogradGeometry geo{};
  geo.count = geo.np = geo.nv = geo.macs = 1;
  for (int64_t d = 0; d < kMaxDims; ++d) {
    const WinoScheme& s = kWinoSchemes[l.kind[d]];
    geo.tiles[d] = ceil_div(l.out_ext[d], int64_t(s.m));
    geo.count *= geo.tiles[d], geo.np *= s.np, geo.nv *= s.nv, geo.macs *= s.macs;
  }
  return geo;
}

// One group's transformed weights (floats; wino_layer's U, its padding rows aside), and a block's transformed inputs
// and products for one panel of nr tiles (bytes).
inline int64_t wino_u_floats(const WinogradLayer& l, const WinogradGeometry& geo) { return geo.np * l.ci * l.co; }
inline int64_t wino_block_bytes(const WinogradLayer& l, const WinogradGeometry& geo, int64_t nr) {
  return (geo.nv * l.ci + geo.np * l.co) * nr * int64_t(sizeof(float));
}

// The transformed weights' floats, all groups.
inline int64_t wino_weight_floats(const WinogradLayer& l) { return l.groups * wino_u_floats(l, wino_geometry(l)); }

// Whether the layer's shape is one the Winograd path takes (values aside: see winograd_correlation). Its dims'
// schemes one kind but for kernel-1 dims, at least two of them, the innermost not kernel 1. Rows of the input and the
// output dense along the innermost dim (channels_last layers take the caller's path, save dilated ones, whose
// sub-lattice copies are dense). At least 16 channels in and out a group (fewer and the transforms cost more than the
// products they save); transformed weights of at most 32 MiB (a buffer of the call; they stream through the cache
// block by block: F(2, 3) in 3d with 256 channels, 16 MiB of them, took x0.67 the time of direct summation); and
// enough tiles to pay for transforming the weights: the multiply-adds saved, per pair of channels, at least 256 per
// transformed weight (at that bound a 3d kernel-4 transposed layer of 32 x 16 channels on 12^3 points took x1.01 the
// time, one of 16 channels by F(2, 3) on 12^3 x0.96; a 2d F(2, 3) layer of 32 channels on 2 x 24 x 24 points, above
// it, x0.92).
inline bool winograd_shape(const WinogradLayer& l, int64_t in_inner_stride, int64_t out_inner_stride) {
#if TORCH_CONVT_DIRECT_AVX512
  if (!winograd_isa()) return false;
  const WinoKind x = l.kind[2];
  if (x == kWinoNone || x == kWinoK1 || in_inner_stride != 1 || out_inner_stride != 1 || l.ci < 16 || l.co < 16)
    return false;
  if (l.w_co >= (int64_t(1) << 27)) return false;  // (the weight transform gathers 16 channels by 32-bit offsets)
  if (x != kWinoK3 && std::any_of(l.dilation, l.dilation + kMaxDims, [](int64_t d) { return d != 1; })) return false;
  if (std::any_of(l.split, l.split + kMaxDims, [](bool b) { return b; })) return false;  // (wino_strided's to lay out)
  for (int64_t d = 0; d < 2; ++d)
    if (l.kind[d] != kWinoK1 && l.kind[d] != x) return false;
  if (l.kind[0] == kWinoK1 && l.kind[1] == kWinoK1) return false;
  const WinogradGeometry geo = wino_geometry(l);
  if (!wino_stride1(x)) {
    // The stride-2 schemes: their output transform writes the output's rows through the caches, where direct
    // summation streams outputs of 8 MiB or more past them. Such outputs only for layers of at least 96
    // multiply-adds an output point (grouped 2d kernel 3 with 32 channels a group, 72, took x1.27-1.39 the time on
    // 16 MiB; kernel 3 3d with 32 channels, 108, x0.69 on 28 MiB; kernel 4 3d, 256, x0.82 on 16 MiB), and under
    // 64 MiB (112 MiB: x1.22 with 54, x1.07 with 108).
    int64_t out_bytes = l.batch * l.groups * l.co * int64_t(sizeof(float)), outs = 1;
    for (int64_t d = 0; d < kMaxDims; ++d) out_bytes *= l.out_ext[d], outs *= kWinoSchemes[l.kind[d]].m;
    if (out_bytes >= (int64_t(64) << 20)) return false;
    if (out_bytes >= (int64_t(8) << 20) && l.ci * geo.macs < 96 * outs) return false;
  }
  // A block's transformed inputs and products where the scheme saves less than half of the multiply-adds: the
  // stride-2 kernel-3 3d layer of 128 x 64 channels (2 MiB a block) took x1.13 the time, of 64 x 32 channels (1
  // MiB) x0.92, DCGAN's kernel-4 2d layer of 256 x 128 channels (1.4 MiB) x0.75.
  const int64_t block = wino_block_bytes(l, geo, gemm_tile<float>(l.co).nr);
  if (2 * geo.np > geo.macs && block > (int64_t(3) << 19)) return false;
  return wino_u_floats(l, geo) * int64_t(sizeof(float)) <= (int64_t(32) << 20) &&
         l.batch * geo.count * (geo.macs - geo.np) >= 256 * geo.np;
#else
  (void)l, (void)in_inner_stride, (void)out_inner_stride;
  return false;
#endif
}

// Whether a layer (WinogradLayer's fields, the dims before the last of extent 1 and kernel 1) takes this path: dense
// rows; at least 384 input channels a group and 512 rows (s co) a GEMM, so that the products' work pays for the
// transforms and the transformed inputs' trips through memory (against the phases' GEMMs of gemm.h, alternated:
// 512 x 256 channels at s = 8 on 4 x 200 points x0.81 the time, on 4 x 400 with 128 out x0.77, 384 x 256 x0.84,
// 512 x 256 at s = 2 x0.73-0.81, 512 x 512 at s = 4 x0.87-0.89; by F(2, 2), 256 x 128 at s = 8 on 4 x 1600 points
// took x1.04-1.29 and 128 x 64 at s = 2 on 4 x 12800 x2.5); transformed weights of at most 32 MiB; enough tiles.
inline bool wino_upsample_shape(const WinogradLayer& l, int64_t stride, int64_t in_inner_stride,
                                int64_t out_inner_stride) {
  if (!winograd_isa()) return false;
  for (int64_t d = 0; d < 2; ++d)
    if (l.in_ext[d] != 1 || l.out_ext[d] != 1 || l.kernel[d] != 1) return false;
  if (stride < 2 || stride > 8 || l.kernel[2] != 2 * stride || l.dilation[2] != 1) return false;
  if (in_inner_stride != 1 || out_inner_stride != 1 || l.ci < 384 || stride * l.co < 512) return false;
  const int64_t tiles = l.batch * ceil_div(l.out_ext[2], 3 * stride);
  return tiles >= 32 && 4 * stride * l.ci * l.co * int64_t(sizeof(float)) <= (int64_t(32) << 20);
}

// Whether the layer takes winograd_correlation's dense path (no dilation; conv: no stride-2 dims) or
// winograd_upsample (conv_transpose at `stride`, the other dims of extent 1), given its rows' innermost strides: a
// 16-bit layer (conv_cpu.cpp) asks before widening its weights.
inline bool winograd_takes(const WinogradLayer& l, bool transposed, int64_t stride, int64_t in_inner_stride,
                           int64_t out_inner_stride) {
  if (std::any_of(l.split, l.split + kMaxDims, [](bool b) { return b; })) return false;
  if (std::any_of(l.dilation, l.dilation + kMaxDims, [](int64_t d) { return d != 1; })) return false;
  return winograd_shape(l, in_inner_stride, out_inner_stride) ||
         (transposed && wino_upsample_shape(l, stride, in_inner_stride, out_inner_stride));
}

#if TORCH_CONVT_DIRECT_AVX512

// A run: 16 consecutive tiles (fewer at a block's end), one a vector lane, in columns [col, col + lanes) of its block
// (a 64-byte line of each row of V and M). Its tiles may lie on several tile rows: a segment per row piece, whose
// lanes are loaded from (and stored to) that row's points, each segment's lanes merged into the same vectors. Per
// segment: the input rows of its tiles' windows (`in_at`, along z and y; bit r of in_rows: row r inside the input)
// and the masks of its four loads of a row; the output rows (`out_at`, out_rows) and the masks of the (2 or 4)
// stores of a row.
struct WinogradSegment {
  int64_t in_at[16], out_at[16];
  uint32_t in_rows, out_rows;
  __mmask16 load[4], store[4];
};
struct WinogradRun {
  int64_t col, lanes, segments;
  WinogradSegment seg[16];
};

// The run of tiles [t0, t1) (t1 - t0 <= 16) in column `col` of its block: its segments' rows and masks.
inline void wino_make_run(const WinogradLayer& l, const WinogradGeometry& geo, const Strides& si, const Strides& so,
                          int64_t t0, int64_t t1, int64_t col, WinogradRun& run) {
  const WinoScheme &sz = kWinoSchemes[l.kind[0]], &sy = kWinoSchemes[l.kind[1]], &sx = kWinoSchemes[l.kind[2]];
  run.col = col, run.lanes = t1 - t0, run.segments = 0;
  for (int64_t t = t0; t < t1;) {
    const int64_t tx = t % geo.tiles[2], row = t / geo.tiles[2], tz = row / geo.tiles[1], ty = row % geo.tiles[1];
    const int64_t lane = t - t0, len = std::min(geo.tiles[2] - tx, t1 - t);
    WinogradSegment& sg = run.seg[run.segments++];
    // Element f of the pair vectors (a: points 2l, 2l + 1 of lane l's window; b: 2l + 2, 2l + 3) is lane f / 2's
    // (every innermost scheme advances 2 a tile): the segment's are f in [2 lane, 2 (lane + len)); their input
    // points x0 + f (+ 2 for b), x0 = 2 (tx - lane) - pad.
    const int64_t f0 = 2 * lane, f1 = 2 * (lane + len), x0 = 2 * (tx - lane) - l.pad[2];
    const auto load_mask = [&](int64_t member, int64_t at) {
      return lane_mask(0, std::max(f0 - member, -x0 - at), std::min(f1 - member, l.in_ext[2] - x0 - at));
    };
    sg.load[0] = load_mask(0, 0), sg.load[1] = load_mask(16, 16), sg.load[2] = load_mask(0, 2),
    sg.load[3] = load_mask(16, 18);
    sg.in_rows = 0;
    const int64_t z0 = sz.adv * tz - l.pad[0], y0 = sy.adv * ty - l.pad[1];
    for (int64_t iz = 0; iz < sz.w; ++iz)
      for (int64_t iy = 0; iy < sy.w; ++iy) {
        const int64_t z = z0 + iz, y = y0 + iy, r = iz * sy.w + iy;
        const bool inside = z >= 0 && z < l.in_ext[0] && y >= 0 && y < l.in_ext[1];
        sg.in_rows |= inside ? uint32_t(1) << r : 0;
        sg.in_at[r] = inside ? si.at(z, y, 0) + x0 : 0;
      }
    // Outputs: element f of the interleaved stores is point f % m of lane f / m's tile, at x = m (tx - lane) + f.
    const int64_t xo = sx.m * (tx - lane), g0 = sx.m * lane, g1 = std::min(sx.m * (lane + len), l.out_ext[2] - xo);
    for (int64_t j = 0; j < sx.m; ++j) sg.store[j] = lane_mask(0, g0 - 16 * j, g1 - 16 * j);
    sg.out_rows = 0;
    for (int64_t a = 0; a < sz.m; ++a)
      for (int64_t b = 0; b < sy.m; ++b) {
        const int64_t z = sz.m * tz + a, y = sy.m * ty + b, r = a * sy.m + b;
        const bool inside = z < l.out_ext[0] && y < l.out_ext[1];
        sg.out_rows |= inside ? uint32_t(1) << r : 0;
        sg.out_at[r] = inside ? so.at(z, y, 0) + xo : 0;
      }
    t += len;
  }
}

// The kernels, once per instruction set (winograd_kernels.h); winograd_correlation and winograd_upsample take the
// CPU's.
namespace wino_avx512 {
#define WINO_AVX512 1
#define WINO_TARGET TORCH_CONVT_AVX512_TARGET
#include "winograd_kernels.h"
#undef WINO_TARGET
#undef WINO_AVX512
}  // namespace wino_avx512
namespace wino_avx2 {
#define WINO_AVX512 0
#define WINO_TARGET TORCH_CONVT_WINO_AVX2_TARGET
#include "winograd_kernels.h"
#undef WINO_TARGET
#undef WINO_AVX512
}  // namespace wino_avx2
#endif

// Computes the layer by its Winograd schemes where winograd_shape holds (dilated layers: for their sub-lattices); false
// where it does not apply, or where the weights or any output are not finite (the output is then to be computed
// again by the caller, whole). T: the input's and output's elements; 16-bit floats (c10::BFloat16, c10::Half) only for
// the dense path (no dilation, no stride-2 conv dims), widened and rounded by the transforms, weights and bias float.
template <typename T>
bool winograd_correlation(const WinogradLayer& l, const T* in, const Strides& si, const float* w, const float* bias,
                          T* out, const Strides& so) {
#if TORCH_CONVT_DIRECT_AVX512
  if (!winograd_isa()) return false;
  const bool avx512 = direct_avx512();
  const bool split = std::any_of(l.split, l.split + kMaxDims, [](bool b) { return b; });
  const bool dilated = std::any_of(l.dilation, l.dilation + kMaxDims, [](int64_t d) { return d != 1; });
  if constexpr (std::is_same_v<T, float>) {
    if (split)
      return avx512 ? wino_avx512::wino_strided(l, in, si, w, bias, out, so)
                    : wino_avx2::wino_strided(l, in, si, w, bias, out, so);
    if (dilated)
      return avx512 ? wino_avx512::wino_dilated(l, in, si, w, bias, out, so)
                    : wino_avx2::wino_dilated(l, in, si, w, bias, out, so);
  } else if (split || dilated) {
    return false;
  }
  return winograd_shape(l, si.s[2], so.s[2]) && (avx512 ? wino_avx512::wino_dense(l, in, si, w, bias, out, so)
                                                        : wino_avx2::wino_dense(l, in, si, w, bias, out, so));
#else
  (void)l, (void)in, (void)si, (void)w, (void)bias, (void)out, (void)so;
  return false;
#endif
}

// The weight gradient of the layer by the transposes of its transforms (wino_wgrad_layer): dw(g, co, ci, t) (laid out
// as winograd_correlation reads w) = the sum over the batch and the output of gout(co, o) in(ci, window point t of o),
// float layers of winograd_correlation's dense path whose gradients' sums fit kPartialBytes and whose products save
// at least 32 multiply-adds per value the transforms write (the transformed inputs' and the products' gradients,
// which then go through a transposing pack besides, where the forward's GEMMs take them as they are). Measured
// against direct summation's weight gradient (20 alternated pairs, median time ratio, two series): DCGAN's kernel-4
// 2d layer (83 saved per value) x0.75-0.77, the stride-1 kernel-3 3d layer of 32 channels (38) x0.68-0.82, a 2d
// kernel-3 conv of 64 x 48 channels (34) x0.70; below the bound the kernel-4 3d layer of 32 x 16 channels (20)
// x1.10-1.18, MONAI's kernel 3 (23) x1.14-1.16, kernel 2 in 3d (19) x1.35-1.47, a conv at stride 2 by kernel 4 of 32
// channels (15) x1.19-1.34. False where it does not apply or any value of dw is not finite (dw is then to be
// computed by the caller, whole).
inline bool winograd_weight_grad(const WinogradLayer& l, const float* in, const Strides& si, const float* gout,
                                 const Strides& so, float* dw) {
#if TORCH_CONVT_DIRECT_AVX512
  if (std::any_of(l.split, l.split + kMaxDims, [](bool b) { return b; }) ||
      std::any_of(l.dilation, l.dilation + kMaxDims, [](int64_t d) { return d != 1; }) ||
      !winograd_shape(l, si.s[2], so.s[2]))
    return false;
  const WinogradGeometry geo = wino_geometry(l);
  if (l.groups * wino_u_floats(l, geo) * int64_t(sizeof(float)) > kPartialBytes ||
      (geo.macs - geo.np) * l.ci * l.co < 32 * (geo.nv * l.ci + geo.np * l.co))
    return false;
  return direct_avx512() ? wino_avx512::wino_wgrad(l, in, si, gout, so, dw)
                         : wino_avx2::wino_wgrad(l, in, si, gout, so, dw);
#else
  (void)l, (void)in, (void)si, (void)gout, (void)so, (void)dw;
  return false;
#endif
}

// A conv_transpose along its last dim at stride s by kernel 2s (wino_upsample); false where that path does not apply,
// or where the weights or any output are not finite (the output is then to be computed again by the caller, whole).
// T as winograd_correlation's.
template <typename T>
bool winograd_upsample(const WinogradLayer& l, int64_t stride, int64_t padding, const T* in, const Strides& si,
                       const float* w, const float* bias, T* out, const Strides& so) {
#if TORCH_CONVT_DIRECT_AVX512
  if (!winograd_isa()) return false;
  return direct_avx512() ? wino_avx512::wino_upsample(l, stride, padding, in, si, w, bias, out, so)
                         : wino_avx2::wino_upsample(l, stride, padding, in, si, w, bias, out, so);
#else
  (void)l, (void)stride, (void)padding, (void)in, (void)si, (void)w, (void)bias, (void)out, (void)so;
  return false;
#endif
}

}  // namespace torch_convt::cpu
