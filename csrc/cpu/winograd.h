// Winograd F(2, 3) for the stride-1 float32 layers of the CPU kernels (conv_cpu.cpp): conv and conv_transpose at
// stride 1 whose kernel is 3 along the innermost dim and along at least one other, 1 along the rest (3d 3x3x3, 2d
// 3x3, and 3x1x3 / 1x3x3 kernels). Both are the correlation
//     out[n, co, o] = sum_{ci, t} wc[co, ci, t] * in[n, ci, o + dilation t - pad] + bias[co]
// (conv: in = X, wc = W, pad = padding; conv_transpose: in = Y, wc = W with its two channel dims swapped and its taps
// reversed, pad = (kernel - 1) dilation - padding); dilated layers are computed sub-lattice by sub-lattice
// (wino_dilated). Per dim of 3 taps, the output is cut into tiles of 2 points, each computed
// from the 4 input points it reads: in 3d a tile is 2x2x2 outputs from 4x4x4 inputs, whose 64 transformed values V
// (B^T d B along each dim) multiply the 64 transformed weights U (G g G^T) and are transformed back (A^T m A):
// 64 products per 8 outputs instead of 27 x 8 = 216, so the layer does 0.30 of the multiply-adds (2d 3x3: 0.44).
// The 64 products of all tiles are 64 GEMMs [co x ci] . [ci x tiles] on the GEMM of gemm.h; the transforms are
// additions only, vectorised over 16 consecutive tiles (AVX-512). The transforms' coefficients are 0, +-1 and +-1/2,
// and the errors stay at those of direct summation (a 32-channel 3x3x3 layer: 3.0e-7 of the largest output in float32,
// direct 4.6e-7, both against float64). Every output is one fixed sequence of operations: results do not depend on the
// thread count. Non-finite values: a tile mixes its 4 x 4 x 4 inputs, so an inf or NaN input would reach outputs that
// it does not contribute to; where any output comes out non-finite the caller computes the layer again on its own path,
// which gives each non-finite input exactly its own outputs (and weights that are not finite never take this path).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>

#include "columns.h"
#include "direct.h"
#include "gemm.h"

namespace torch_convt::cpu {

// Winograd in use for the layers it applies to (set_winograd turns it off for later calls, e.g. to compare).
inline std::atomic<bool>& winograd_flag() {
  static std::atomic<bool> on{true};
  return on;
}

// The layer as a correlation (above). Channels are per group; wc(g, co, ci, t) = w[g*w_g + co*w_co + ci*w_ci +
// (flip ? T - 1 - t : t)], t the flat tap index of `kernel`.
struct WinogradLayer {
  int64_t batch, groups, ci, co;
  int64_t in_ext[kMaxDims], out_ext[kMaxDims], pad[kMaxDims], kernel[kMaxDims], dilation[kMaxDims];
  int64_t w_g, w_co, w_ci;
  bool flip;
};

// The tiling of the output: per dim, tiles of m points (2 where the kernel is 3, else 1) from a = m + k - 1 input
// points; tiles numbered (tz, ty, tx) row-major, and computed in runs of 16 consecutive tiles (a vector's lanes).
struct WinogradGeometry {
  int64_t m[kMaxDims], a[kMaxDims], tiles[kMaxDims], count;  // count: tiles of one image
  int64_t xi;                                                // transformed points a tile: a[0] * a[1] * a[2]
};

inline WinogradGeometry wino_geometry(const WinogradLayer& l) {
  WinogradGeometry geo{};
  geo.count = 1, geo.xi = 1;
  for (int64_t d = 0; d < kMaxDims; ++d) {
    geo.m[d] = l.kernel[d] == 3 ? 2 : 1;
    geo.a[d] = l.kernel[d] == 3 ? 4 : 1;
    geo.tiles[d] = ceil_div(l.out_ext[d], geo.m[d]);
    geo.count *= geo.tiles[d];
    geo.xi *= geo.a[d];
  }
  return geo;
}

// Whether the layer's shape is one the Winograd path takes (values aside: see winograd_correlation). Rows of the input
// and the output dense along the innermost dim (channels_last layers take the caller's path, save dilated ones, whose
// sub-lattice copies are dense). At least 16 channels
// in and out a group (fewer and the transforms cost more than the products they save); transformed weights of at
// most 1 MiB, which every block of tiles reads whole (3d: 64 x 64 channels; 96 x 96 took x1.12 the time of direct
// summation, 256 x 256 x1.9); and enough tiles to pay for transforming the weights: the multiply-adds saved, per pair
// of channels, at least 512 per transformed weight (a 2d layer of 64 channels on 2 x 24 x 24 points, below that,
// took x1.2 the time).
inline bool winograd_shape(const WinogradLayer& l, int64_t in_inner_stride, int64_t out_inner_stride) {
#if TORCH_CONVT_DIRECT_AVX512
  if (!winograd_flag().load(std::memory_order_relaxed) || !direct_avx512()) return false;
  if (l.kernel[2] != 3 || in_inner_stride != 1 || out_inner_stride != 1 || l.ci < 16 || l.co < 16) return false;
  int64_t threes = 0;
  for (int64_t d = 0; d < kMaxDims; ++d) {
    if (l.kernel[d] != 1 && l.kernel[d] != 3) return false;
    threes += l.kernel[d] == 3;
  }
  const WinogradGeometry geo = wino_geometry(l);
  const int64_t taps = l.kernel[0] * l.kernel[1] * l.kernel[2], outs = geo.m[0] * geo.m[1] * geo.m[2];
  return threes >= 2 && geo.xi * l.ci * l.co * int64_t(sizeof(float)) <= (int64_t(1) << 20) &&
         l.batch * geo.count * (taps * outs - geo.xi) >= 512 * geo.xi;
#else
  (void)l, (void)in_inner_stride, (void)out_inner_stride;
  return false;
#endif
}

#if TORCH_CONVT_DIRECT_AVX512

// A run: 16 consecutive tiles (fewer at a block's end), one a vector lane, in columns [col, col + lanes) of its block
// (a 64-byte line of each row of V and M). Its tiles may lie on several tile rows: a segment per row piece, whose
// lanes are loaded from (and stored to) that row's points, each segment's lanes merged into the same vectors. Per
// segment: the input rows of its tiles' points (`in_at`, along z and y; bit r of in_rows: row r inside the input) and
// the masks of its four loads of a row; the output rows (`out_at`, out_rows) and the masks of the two stores of a row.
struct WinogradSegment {
  int64_t in_at[16], out_at[4];
  uint32_t in_rows, out_rows;
  __mmask16 load[4], store[2];
};
struct WinogradRun {
  int64_t col, lanes, segments;
  WinogradSegment seg[16];
};

// The (de-)interleaving of a tile's two points along x: a tile's point pairs (2l, 2l + 1) in a pair of vectors (a,
// b: 32 points) split into their first and second points, 16 tiles each; and back.
TORCH_CONVT_AVX512_TARGET inline void wino_split(__m512 a, __m512 b, __m512& first, __m512& second) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  first = _mm512_permutex2var_ps(a, even, b), second = _mm512_permutex2var_ps(a, odd, b);
}
TORCH_CONVT_AVX512_TARGET inline void wino_merge(__m512 first, __m512 second, __m512& a, __m512& b) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  a = _mm512_permutex2var_ps(first, lo, second), b = _mm512_permutex2var_ps(first, hi, second);
}

// The run of tiles [t0, t1) (t1 - t0 <= 16) in column `col` of its block: its segments' rows and masks.
TORCH_CONVT_AVX512_TARGET inline void wino_make_run(const WinogradLayer& l, const WinogradGeometry& geo,
                                                    const Strides& si, const Strides& so, int64_t t0, int64_t t1,
                                                    int64_t col, WinogradRun& run) {
  run.col = col, run.lanes = t1 - t0, run.segments = 0;
  for (int64_t t = t0; t < t1;) {
    const int64_t tx = t % geo.tiles[2], row = t / geo.tiles[2], tz = row / geo.tiles[1], ty = row % geo.tiles[1];
    const int64_t lane = t - t0, len = std::min(geo.tiles[2] - tx, t1 - t);
    WinogradSegment& sg = run.seg[run.segments++];
    // Element f of the pair vectors (a: points 2l, 2l + 1 of lane l's tile; b: 2l + 2, 2l + 3) is lane f / 2's: the
    // segment's are f in [2 lane, 2 (lane + len)); their input points x0 + f (+ 2 for b), x0 = 2 (tx - lane) - pad.
    const int64_t f0 = 2 * lane, f1 = 2 * (lane + len), x0 = 2 * (tx - lane) - l.pad[2];
    const auto load_mask = [&](int64_t member, int64_t at) {
      return lane_mask(0, std::max(f0 - member, -x0 - at), std::min(f1 - member, l.in_ext[2] - x0 - at));
    };
    sg.load[0] = load_mask(0, 0), sg.load[1] = load_mask(16, 16), sg.load[2] = load_mask(0, 2),
    sg.load[3] = load_mask(16, 18);
    sg.in_rows = 0;
    const int64_t z0 = geo.m[0] * tz - l.pad[0], y0 = geo.m[1] * ty - l.pad[1];
    for (int64_t iz = 0; iz < geo.a[0]; ++iz)
      for (int64_t iy = 0; iy < geo.a[1]; ++iy) {
        const int64_t z = z0 + iz, y = y0 + iy, r = iz * geo.a[1] + iy;
        const bool inside = z >= 0 && z < l.in_ext[0] && y >= 0 && y < l.in_ext[1];
        sg.in_rows |= inside ? uint32_t(1) << r : 0;
        sg.in_at[r] = inside ? si.at(z, y, 0) + x0 : 0;
      }
    // Outputs: element f of the interleaved stores is point f % 2 of lane f / 2's tile, at x = 2 (tx - lane) + f.
    const int64_t xo = 2 * (tx - lane);
    sg.store[0] = lane_mask(0, f0, std::min(f1, l.out_ext[2] - xo));
    sg.store[1] = lane_mask(0, f0 - 16, std::min(f1, l.out_ext[2] - xo) - 16);
    sg.out_rows = 0;
    for (int64_t a = 0; a < geo.m[0]; ++a)
      for (int64_t b = 0; b < geo.m[1]; ++b) {
        const int64_t z = geo.m[0] * tz + a, y = geo.m[1] * ty + b, r = a * geo.m[1] + b;
        const bool inside = z < l.out_ext[0] && y < l.out_ext[1];
        sg.out_rows |= inside ? uint32_t(1) << r : 0;
        sg.out_at[r] = inside ? so.at(z, y, 0) + xo : 0;
      }
    t += len;
  }
}

// The 1d transforms, on 16 tiles at once. In: B^T d for d = (d0, d1, d2, d3) (a tile's 4 input points).
TORCH_CONVT_AVX512_TARGET inline void wino_in4(__m512& v0, __m512& v1, __m512& v2, __m512& v3) {
  const __m512 t0 = _mm512_sub_ps(v0, v2), t1 = _mm512_add_ps(v1, v2), t2 = _mm512_sub_ps(v2, v1),
               t3 = _mm512_sub_ps(v1, v3);
  v0 = t0, v1 = t1, v2 = t2, v3 = t3;
}

// The input transform of a run, input channel c of the group: V[xi][c][col + l] for the run's tiles l (V: `xi` blocks
// of `v_xi` elements, channel c's row at c * nr, as gemm_packed's B of one panel). `in`: the image's group's first
// channel.
template <int AZ, int AY>
TORCH_CONVT_AVX512_TARGET void wino_input_run(const float* in, const Strides& si, const WinogradRun& run, int64_t c,
                                              int64_t nr, int64_t v_xi, float* V) {
  const __mmask16 store = lane_mask(0, 0, run.lanes);
  float* v = V + run.col + c * nr;
  alignas(64) float tz[AZ][AY * 4][16];  // the tiles transformed along x and y, plane by plane
  const float* src = in + c * si.c;
  for (int iz = 0; iz < AZ; ++iz) {
    __m512 t[AY][4];
    for (int iy = 0; iy < AY; ++iy) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
      for (int64_t s = 0; s < run.segments; ++s) {
        const WinogradSegment& sg = run.seg[s];
        if (!(sg.in_rows >> (iz * AY + iy) & 1)) continue;
        const float* r = src + sg.in_at[iz * AY + iy];
        a0 = _mm512_mask_loadu_ps(a0, sg.load[0], r), a1 = _mm512_mask_loadu_ps(a1, sg.load[1], r + 16);
        b0 = _mm512_mask_loadu_ps(b0, sg.load[2], r + 2), b1 = _mm512_mask_loadu_ps(b1, sg.load[3], r + 18);
      }
      wino_split(a0, a1, t[iy][0], t[iy][1]);  // d0 = r[2l], d1 = r[2l + 1]
      wino_split(b0, b1, t[iy][2], t[iy][3]);  // d2 = r[2l + 2], d3 = r[2l + 3]
      wino_in4(t[iy][0], t[iy][1], t[iy][2], t[iy][3]);
    }
    if constexpr (AY == 4)
      for (int k = 0; k < 4; ++k) wino_in4(t[0][k], t[1][k], t[2][k], t[3][k]);
    if constexpr (AZ == 4) {
      for (int iy = 0; iy < AY; ++iy)
        for (int k = 0; k < 4; ++k) _mm512_store_ps(tz[iz][iy * 4 + k], t[iy][k]);
    } else {
      for (int iy = 0; iy < AY; ++iy)
        for (int k = 0; k < 4; ++k) _mm512_mask_storeu_ps(v + (iy * 4 + k) * v_xi, store, t[iy][k]);
    }
  }
  if constexpr (AZ == 4)
    for (int j = 0; j < AY * 4; ++j) {
      __m512 d0 = _mm512_load_ps(tz[0][j]), d1 = _mm512_load_ps(tz[1][j]), d2 = _mm512_load_ps(tz[2][j]),
             d3 = _mm512_load_ps(tz[3][j]);
      wino_in4(d0, d1, d2, d3);
      _mm512_mask_storeu_ps(v + j * v_xi, store, d0);
      _mm512_mask_storeu_ps(v + (AY * 4 + j) * v_xi, store, d1);
      _mm512_mask_storeu_ps(v + (2 * AY * 4 + j) * v_xi, store, d2);
      _mm512_mask_storeu_ps(v + (3 * AY * 4 + j) * v_xi, store, d3);
    }
}

// Out: A^T m for m = (m0, m1, m2, m3): (m0 + m1 + m2, m1 - m2 - m3).
TORCH_CONVT_AVX512_TARGET inline void wino_out4(__m512 m0, __m512 m1, __m512 m2, __m512 m3, __m512& o0, __m512& o1) {
  const __m512 d = _mm512_sub_ps(m1, m2);
  o0 = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
  o1 = _mm512_sub_ps(d, m3);
}

// The output transform of a run, output channel c of the group, plus its bias: out's rows of the run's tiles. `M`:
// the products, `xi` blocks of `m_xi` elements, channel c's at c * ld + col. Returns whether every value stored is
// finite.
template <int AZ, int AY>
TORCH_CONVT_AVX512_TARGET bool wino_output_run(const float* M, int64_t ld, int64_t m_xi, const float* bias,
                                               const WinogradRun& run, int64_t c, float* out, const Strides& so) {
  constexpr int MZ = AZ == 4 ? 2 : 1, MY = AY == 4 ? 2 : 1;
  const __mmask16 lanes = lane_mask(0, 0, run.lanes);
  __m512 bad = _mm512_setzero_ps();
  const float* m = M + run.col + c * ld;
  __m512 t[AZ][AY][4];
  for (int iz = 0; iz < AZ; ++iz)
    for (int iy = 0; iy < AY; ++iy)
      for (int k = 0; k < 4; ++k) t[iz][iy][k] = _mm512_maskz_loadu_ps(lanes, m + ((iz * AY + iy) * 4 + k) * m_xi);
  __m512 u[MZ][AY][4];  // along z
  for (int iy = 0; iy < AY; ++iy)
    for (int k = 0; k < 4; ++k) {
      if constexpr (AZ == 4) wino_out4(t[0][iy][k], t[1][iy][k], t[2][iy][k], t[3][iy][k], u[0][iy][k], u[1][iy][k]);
      else u[0][iy][k] = t[0][iy][k];
    }
  __m512 s[MZ][MY][4];  // along y
  for (int a = 0; a < MZ; ++a)
    for (int k = 0; k < 4; ++k) {
      if constexpr (AY == 4) wino_out4(u[a][0][k], u[a][1][k], u[a][2][k], u[a][3][k], s[a][0][k], s[a][1][k]);
      else s[a][0][k] = u[a][0][k];
    }
  const __m512 bv = _mm512_set1_ps(bias ? bias[c] : 0.0f);
  float* o = out + c * so.c;
  for (int a = 0; a < MZ; ++a)
    for (int b = 0; b < MY; ++b) {
      __m512 e0, e1;  // along x: the tiles' first and second points
      wino_out4(s[a][b][0], s[a][b][1], s[a][b][2], s[a][b][3], e0, e1);
      e0 = _mm512_add_ps(e0, bv), e1 = _mm512_add_ps(e1, bv);
      __m512 w0, w1;
      wino_merge(e0, e1, w0, w1);
      for (int64_t sgi = 0; sgi < run.segments; ++sgi) {
        const WinogradSegment& sg = run.seg[sgi];
        if (!(sg.out_rows >> (a * MY + b) & 1)) continue;
        float* row = o + sg.out_at[a * MY + b];
        _mm512_mask_storeu_ps(row, sg.store[0], w0);
        _mm512_mask_storeu_ps(row + 16, sg.store[1], w1);
        bad = _mm512_add_ps(bad, _mm512_add_ps(_mm512_maskz_sub_ps(sg.store[0], w0, w0),
                                               _mm512_maskz_sub_ps(sg.store[1], w1, w1)));
      }
    }
  return _mm512_cmp_ps_mask(bad, bad, _CMP_ORD_Q) == 0xFFFF;
}

// G along one dim of a tap block [outer][k][inner] -> [outer][a][inner] (k = 3: (g0, (g0 + g1 + g2) / 2, (g0 - g1 +
// g2) / 2, g2); k = 1: as it is), on 16 input channels at once.
TORCH_CONVT_AVX512_TARGET inline void wino_g(const __m512* in, int64_t outer, int64_t k, int64_t inner, __m512* out) {
  const __m512 half = _mm512_set1_ps(0.5f);
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t i = 0; i < inner; ++i) {
      const __m512* p = in + o * k * inner + i;
      __m512* q = out + o * (k == 3 ? 4 : 1) * inner + i;
      if (k == 1) {
        q[0] = p[0];
        continue;
      }
      const __m512 a = p[0], b = p[inner], c = p[2 * inner], ac = _mm512_add_ps(a, c);
      q[0] = a;
      q[inner] = _mm512_mul_ps(half, _mm512_add_ps(ac, b));
      q[2 * inner] = _mm512_mul_ps(half, _mm512_sub_ps(ac, b));
      q[3 * inner] = c;
    }
}

// One output channel's transformed weights (`src`: its weights wc(g, co, 0, .); `u`: its first element in the packed
// U of xi 0), 16 input channels at a time: gathered from the weights, transformed one dim at a time ([kz][ky][kx] ->
// [az][ky][kx] -> [az][ay][kx] -> [az][ay][ax]), scattered into the packed panels. Returns whether all are finite.
TORCH_CONVT_AVX512_TARGET inline bool wino_weights_row(const WinogradLayer& l, const WinogradGeometry& geo,
                                                       const float* src, int64_t mr, int64_t a_size, float* u) {
  const int64_t T = l.kernel[0] * l.kernel[1] * l.kernel[2];
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i from = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(l.w_ci)));
  const __m512i to = _mm512_mullo_epi32(lane, _mm512_set1_epi32(static_cast<int>(mr)));
  __m512 bad = _mm512_setzero_ps();
  for (int64_t c0 = 0; c0 < l.ci; c0 += 16) {
    const __mmask16 m = lane_mask(0, 0, l.ci - c0);
    __m512 g[27], s1[4 * 3 * 3], s2[4 * 4 * 3], s3[64];
    for (int64_t t = 0; t < T; ++t)
      g[t] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, from, src + c0 * l.w_ci + (l.flip ? T - 1 - t : t), 4);
    wino_g(g, 1, l.kernel[0], l.kernel[1] * l.kernel[2], s1);
    wino_g(s1, geo.a[0], l.kernel[1], l.kernel[2], s2);
    wino_g(s2, geo.a[0] * geo.a[1], l.kernel[2], 1, s3);
    for (int64_t x = 0; x < geo.xi; ++x) {
      bad = _mm512_add_ps(bad, _mm512_maskz_sub_ps(m, s3[x], s3[x]));
      _mm512_mask_i32scatter_ps(u + x * a_size + c0 * mr, m, to, s3[x], 4);
    }
  }
  return _mm512_cmp_ps_mask(bad, bad, _CMP_ORD_Q) == 0xFFFF;
}

// The transformed weights: U[g][xi] = (G g G^T along each dim of 3 taps) of wc(g, co, ci, .), packed as gemm_packed's
// A (mr-row panels, co rows, ci deep; `a_size` elements each, zero past co). Returns whether every value is finite.
// (Element by element, this took 4-6% of a 32-channel 3d layer's forward.)
inline bool wino_weights(const WinogradLayer& l, const WinogradGeometry& geo, const float* w, GemmTile gt,
                         int64_t a_size, float* U) {
  TORCH_INTERNAL_ASSERT(l.w_ci * 16 < (int64_t(1) << 31) && gt.mr * 16 < (int64_t(1) << 31));
  std::fill(U, U + l.groups * geo.xi * a_size, 0.0f);
  std::atomic<bool> finite{true};
  at::parallel_for(0, l.groups * l.co, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / l.co, co = item % l.co;
      if (!wino_weights_row(l, geo, w + grp * l.w_g + co * l.w_co, gt.mr, a_size,
                            U + grp * geo.xi * a_size + packed_index(co, 0, l.ci, gt.mr)))
        finite.store(false, std::memory_order_relaxed);
    }
  });
  return finite.load();
}

template <int AZ, int AY>
bool wino_layer(const WinogradLayer& l, const WinogradGeometry& geo, const float* in, const Strides& si,
                const float* w, const float* bias, float* out, const Strides& so) {
  const GemmTile gt = gemm_tile<float>(l.co);
  const int64_t a_size = packed_size(l.co, l.ci, gt.mr);
  std::unique_ptr<float[]> u_fresh;
  float* const U = held_buffer<float, kWeightSlot>(l.groups * geo.xi * a_size, u_fresh);
  if (!wino_weights(l, geo, w, gt, a_size, U)) return false;
  // Blocks of one panel of the GEMM's B (nr tiles): a block's transformed inputs and products, 2 x 64 x 32 x 32 floats
  // for 32 channels, stay in the core's L2 from the transform through the GEMMs to the back transform (blocks of 2
  // panels: x1.02 time on a 32-channel 3d layer).
  const int64_t nb = gt.nr;
  TORCH_INTERNAL_ASSERT(nb == 32 || nb == 16);
  const int64_t blocks = ceil_div(geo.count, nb), v_xi = l.ci * nb + 16, m_xi = l.co * nb + 16;
  std::atomic<bool> finite{true};
  at::parallel_for(0, l.batch * l.groups * blocks, 1, [&](int64_t begin, int64_t end) {
    float* V = scratch<float, 0>(geo.xi * v_xi);
    float* M = scratch<float, 1>(geo.xi * m_xi);
    bool ok = true;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (l.groups * blocks), g = item / blocks % l.groups, b = item % blocks;
      const int64_t c0 = b * nb, c1 = std::min(geo.count, c0 + nb);
      const float* in_g = in + n * si.n + g * l.ci * si.c;
      float* out_g = out + n * so.n + g * l.co * so.c;
      // The block's runs: 16 tiles each (nb is a multiple of 16), the last one what is left.
      WinogradRun runs[2];
      const int64_t count = ceil_div(c1 - c0, int64_t(16));
      for (int64_t r = 0; r < count; ++r)
        wino_make_run(l, geo, si, so, c0 + 16 * r, std::min(c1, c0 + 16 * r + 16), 16 * r, runs[r]);
      for (int64_t c = 0; c < l.ci; ++c)  // (channel by channel: a channel's rows stay in L1 from run to run)
        for (int64_t r = 0; r < count; ++r) wino_input_run<AZ, AY>(in_g, si, runs[r], c, nb, v_xi, V);
      for (int64_t x = 0; x < geo.xi; ++x)
        gemm_packed<float>(gt, l.co, c1 - c0, l.ci, U + (g * geo.xi + x) * a_size, V + x * v_xi, false, M + x * m_xi,
                           nb);
      const float* bias_g = bias ? bias + g * l.co : nullptr;
      for (int64_t c = 0; c < l.co; ++c)  // (channel by channel: a channel's products stay in L1 from run to run)
        for (int64_t r = 0; r < count; ++r) ok &= wino_output_run<AZ, AY>(M, nb, m_xi, bias_g, runs[r], c, out_g, so);
    }
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

// The layer (dilation 1) on the tiles of its output: the instance of its dims' transforms.
inline bool wino_dense(const WinogradLayer& l, const float* in, const Strides& si, const float* w, const float* bias,
                       float* out, const Strides& so) {
  const WinogradGeometry geo = wino_geometry(l);
  if (l.kernel[0] == 3 && l.kernel[1] == 3) return wino_layer<4, 4>(l, geo, in, si, w, bias, out, so);
  if (l.kernel[0] == 3) return wino_layer<4, 1>(l, geo, in, si, w, bias, out, so);
  return wino_layer<1, 4>(l, geo, in, si, w, bias, out, so);
}

// even[i] = src[2i] (2i < n), odd[i] = src[2i + 1] (2i + 1 < n): a row split into its two sub-lattices.
TORCH_CONVT_AVX512_TARGET inline void wino_split_row(const float* src, int64_t n, float* even, float* odd) {
  for (int64_t x = 0; x < n; x += 32) {
    __m512 e, o;
    wino_split(_mm512_maskz_loadu_ps(lane_mask(0, 0, n - x), src + x),
               _mm512_maskz_loadu_ps(lane_mask(0, 0, n - x - 16), src + x + 16), e, o);
    _mm512_mask_storeu_ps(even + x / 2, lane_mask(0, 0, (n - x + 1) / 2), e);
    _mm512_mask_storeu_ps(odd + x / 2, lane_mask(0, 0, (n - x) / 2), o);
  }
}

// dst[2i] = even[i] (2i < n), dst[2i + 1] = odd[i] (2i + 1 < n): a row from its two sub-lattices.
TORCH_CONVT_AVX512_TARGET inline void wino_merge_row(const float* even, const float* odd, int64_t n, float* dst) {
  for (int64_t x = 0; x < n; x += 32) {
    __m512 a, b;
    wino_merge(_mm512_maskz_loadu_ps(lane_mask(0, 0, (n - x + 1) / 2), even + x / 2),
               _mm512_maskz_loadu_ps(lane_mask(0, 0, (n - x) / 2), odd + x / 2), a, b);
    _mm512_mask_storeu_ps(dst + x, lane_mask(0, 0, n - x), a);
    _mm512_mask_storeu_ps(dst + x + 16, lane_mask(0, 0, n - x - 16), b);
  }
}

// A dilated layer is d0 x d1 x d2 undilated ones, one per sub-lattice of the output (the points o = r + d j, residues
// r per dim), each reading one sub-lattice of the input (its points i with i = r - pad mod d): those are copied into
// a batch of dense images, the layer computed on them by wino_dense, and the results copied into the output's
// sub-lattices. The sub-lattices' pads differ by residue; each copy is shifted so that all of them take the least.
// Returns false, having written nothing, where the copies would outgrow max(64 MiB, the output).
inline bool wino_dilated(const WinogradLayer& l, const float* in, const Strides& si, const float* w, const float* bias,
                         float* out, const Strides& so) {
  WinogradLayer v = l;
  int64_t lat = 1, shift[kMaxDims][4], first[kMaxDims][4], in_count[kMaxDims][4], out_count[kMaxDims][4];
  for (int64_t d = 0; d < kMaxDims; ++d) {
    const int64_t dil = l.dilation[d];
    if (dil > 4) return false;
    int64_t low = 0, in_ext = 0, out_ext = 0;
    for (int64_t r = 0; r < dil; ++r) {
      const int64_t rho = ((r - l.pad[d]) % dil + dil) % dil, pad = (l.pad[d] - r + rho) / dil;
      first[d][r] = rho, shift[d][r] = pad;
      in_count[d][r] = std::max<int64_t>(0, ceil_div(l.in_ext[d] - rho, dil));
      out_count[d][r] = std::max<int64_t>(0, ceil_div(l.out_ext[d] - r, dil));
      low = r == 0 ? pad : std::min(low, pad);
    }
    for (int64_t r = 0; r < dil; ++r) {
      shift[d][r] -= low;  // (>= 0: leading zeros of residue r's copy)
      in_ext = std::max(in_ext, in_count[d][r] + shift[d][r]), out_ext = std::max(out_ext, out_count[d][r]);
    }
    v.in_ext[d] = std::max<int64_t>(1, in_ext), v.out_ext[d] = out_ext, v.pad[d] = low, v.dilation[d] = 1;
    lat *= dil;
  }
  v.batch = l.batch * lat;
  if (!winograd_shape(v, 1, 1)) return false;
  const int64_t cin = l.groups * l.ci, cout = l.groups * l.co;
  const int64_t in_plane = v.in_ext[0] * v.in_ext[1] * v.in_ext[2];
  const int64_t out_plane = v.out_ext[0] * v.out_ext[1] * v.out_ext[2];
  const int64_t bytes = v.batch * (cin * in_plane + cout * out_plane) * int64_t(sizeof(float));
  const int64_t output = l.batch * cout * l.out_ext[0] * l.out_ext[1] * l.out_ext[2] * int64_t(sizeof(float));
  if (bytes > std::max(int64_t(64) << 20, output)) return false;
  std::unique_ptr<float[]> in_fresh, out_fresh;
  float* const vin = held_buffer<float, kPlaneSlot>(v.batch * cin * in_plane, in_fresh);
  float* const vout = held_buffer<float, kPartialSlot>(v.batch * cout * out_plane, out_fresh);
  const Strides svin{cin * in_plane, in_plane, {v.in_ext[1] * v.in_ext[2], v.in_ext[2], 1}};
  const Strides svout{cout * out_plane, out_plane, {v.out_ext[1] * v.out_ext[2], v.out_ext[2], 1}};
  const auto residues = [&](int64_t lattice, int64_t* r) {
    r[2] = lattice % l.dilation[2], r[1] = lattice / l.dilation[2] % l.dilation[1];
    r[0] = lattice / (l.dilation[1] * l.dilation[2]);
  };
  // (Along x, a dilation of 2 with dense rows splits each row once into both of its sub-lattices, vectorised; the
  // copies then took 3% of a dilated 3d layer's forward, element by element 10%.)
  const int64_t dx = l.dilation[2];
  const bool pairs = dx == 2 && si.s[2] == 1 && so.s[2] == 1;
  at::parallel_for(0, v.batch * cin, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t vn = item / cin, c = item % cin, n = vn / lat;
      int64_t r[kMaxDims];
      residues(vn % lat, r);
      if (pairs && r[2] == 1) continue;  // (filled with residue 0's, whose image it follows)
      float* dst = vin + vn * svin.n + c * svin.c;
      std::fill(dst, dst + in_plane, 0.0f);
      if (pairs) std::fill(dst + svin.n, dst + svin.n + in_plane, 0.0f);
      const float* src = in + n * si.n + c * si.c;
      for (int64_t i0 = 0; i0 < in_count[0][r[0]]; ++i0)
        for (int64_t i1 = 0; i1 < in_count[1][r[1]]; ++i1) {
          const int64_t z = first[0][r[0]] + l.dilation[0] * i0, y = first[1][r[1]] + l.dilation[1] * i1;
          float* o = dst + svin.at(i0 + shift[0][r[0]], i1 + shift[1][r[1]], shift[2][r[2]]);
          if (pairs) {  // (residue 1's image follows residue 0's: its sub-lattice of x is the other one)
            float* o1 = dst + svin.n + svin.at(i0 + shift[0][r[0]], i1 + shift[1][r[1]], shift[2][1]);
            if (first[2][0] == 0) wino_split_row(src + si.at(z, y, 0), l.in_ext[2], o, o1);
            else wino_split_row(src + si.at(z, y, 0), l.in_ext[2], o1, o);
            continue;
          }
          const float* s = src + si.at(z, y, first[2][r[2]]);
          const int64_t step = dx * si.s[2];
          for (int64_t i2 = 0; i2 < in_count[2][r[2]]; ++i2) o[i2] = s[i2 * step];
        }
    }
  });
  if (!wino_dense(v, vin, svin, w, bias, vout, svout)) return false;
  at::parallel_for(0, v.batch * cout, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t vn = item / cout, c = item % cout, n = vn / lat;
      int64_t r[kMaxDims];
      residues(vn % lat, r);
      if (pairs && r[2] == 1) continue;  // (with residue 0's)
      const float* src = vout + vn * svout.n + c * svout.c;
      float* dst = out + n * so.n + c * so.c;
      for (int64_t j0 = 0; j0 < out_count[0][r[0]]; ++j0)
        for (int64_t j1 = 0; j1 < out_count[1][r[1]]; ++j1) {
          const float* s = src + svout.at(j0, j1, 0);
          float* o = dst + so.at(r[0] + l.dilation[0] * j0, r[1] + l.dilation[1] * j1, r[2]);
          if (pairs) {
            wino_merge_row(s, s + svout.n, l.out_ext[2], o);
            continue;
          }
          const int64_t step = dx * so.s[2];
          for (int64_t j2 = 0; j2 < out_count[2][r[2]]; ++j2) o[j2 * step] = s[j2];
        }
    }
  });
  return true;
}
#endif

// Computes the layer by Winograd F(2, 3) where winograd_shape holds (dilated layers: for their sub-lattices); false
// where it does not apply, or where the weights or any output are not finite (the output is then to be computed
// again by the caller, whole).
inline bool winograd_correlation(const WinogradLayer& l, const float* in, const Strides& si, const float* w,
                                 const float* bias, float* out, const Strides& so) {
#if TORCH_CONVT_DIRECT_AVX512
  if (std::any_of(l.dilation, l.dilation + kMaxDims, [](int64_t d) { return d != 1; }))
    return wino_dilated(l, in, si, w, bias, out, so);
  return winograd_shape(l, si.s[2], so.s[2]) && wino_dense(l, in, si, w, bias, out, so);
#else
  (void)l, (void)in, (void)si, (void)w, (void)bias, (void)out, (void)so;
  return false;
#endif
}

}  // namespace torch_convt::cpu
