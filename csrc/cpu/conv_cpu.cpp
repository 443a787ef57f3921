// CPU kernels of the three torch_convt ops: conv_transpose, conv and conv_weight_grad.
//
// All three are "gather columns, then GEMM" (our own, gemm.h) over tiles of output positions:
//   conv:             Y[cy, i]       = W[cy, (cx,k)] . col[(cx,k), i],   col = X at i*stride - padding + k*dilation
//   conv_transpose:   X[cx, phase+s*m] = W_phase[cx, (cy,t)] . col[(cy,t), m],  col = Y at m + shift[t]
//   conv_weight_grad: dW[cy, (cx,k)] = sum_i Y[cy, i] * col[(cx,k), i]  (the conv columns)
// conv_transpose uses the phase (sub-pixel) decomposition of index_math.h: every output element is
// computed once, by one GEMM, from its own contributors (a gather, never a scatter), so no atomics are
// needed and results are deterministic. The weight gradient reduces over batch and space in fixed chunks
// whose partial sums are added in a fixed order, so results do not depend on the thread count.
// Columns come through a padded "frame" where that is cheaper (columns.h), else tap by tap. Work is tiled, so
// scratch is bounded (kColumnBytes + kWindowBytes per thread, kPartialBytes of weight-gradient partials).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <utility>
#include <vector>

#include "../common/index_math.h"
#include "../common/params.h"
#include "columns.h"
#include "direct.h"
#include "gemm.h"
#include "winograd.h"

namespace torch_convt {
namespace {

using namespace cpu;  // columns.h, direct.h

constexpr int64_t kPackAhead = 4;  // weight packing prefetches this many input channels ahead
constexpr int64_t kPackChunkBytes = int64_t(128) << 10;  // weight packing: the weights of a chunk of input channels
constexpr int64_t kTeamTile = 128;  // grid tiles: a team's results fit kColumnBytes for tiles this long
constexpr int64_t kJobsPerThread = 4;  // grid tiles: at least this many jobs per thread, where tiles allow
constexpr int64_t kMinGridJobs = 8;  // grid tiles: jobs of several tiles leave at least this many jobs per thread
constexpr int64_t kMinGridTile = 512;  // grid tiles: not shorter than this, to have more jobs
constexpr int64_t kGridWindowBytes = int64_t(512) << 10;  // conv grid tiles: a tile's windows, where A is small
constexpr int64_t kKeptOutputBytes = int64_t(1) << 20;  // outputs this large: OutputAllocator
// Outputs this large are aligned to 2 MiB and backed by huge pages where the OS offers them on request
// (advise_huge_pages, taken back when freed: the huge pages wholly inside the output, so it takes no more memory): the
// first touch of fresh memory then costs about a third of what 4 KiB page faults cost, and rows a page or more apart
// need fewer TLB entries (from 8 MiB, unaligned, down to these, alternated: MONAI forward x0.95-0.98 time, HiFi-GAN
// forward x0.96-0.98, its weight gradient x0.95-0.97, k=4 3d forward x0.98).
constexpr size_t kAdviseOutputBytes = size_t(1) << 20;
constexpr size_t kKeptOutputs = 4, kCacheLimit = size_t(1) << 30;  // what OutputAllocator keeps, by default
constexpr int64_t kStreamBytes = int64_t(8) << 20;  // conv_transpose outputs this large: streaming stores
constexpr int64_t kMinExtendedGrid = 64;  // conv_transpose: innermost grids this long are extended by a point
constexpr int64_t kMinExtendedLines = 16;  // conv_transpose: grids of this many lines are extended by a line
constexpr int64_t kMaxLineClasses = 16;  // conv_transpose: a set's classes of lines by the taps they read at most
constexpr int64_t kMinClassRun = 512;  // conv_transpose: line classes along dims whose runs are this many points

// Whether a GEMM of a scalar_t layer whose A operands are at least `depth` deep, over `channels` input channels a
// group, runs on AMX tiles or AVX512-BF16 dot products (bfloat16 layers where the CPU has either: the tile unit
// multiplies bfloat16 pairs at ~15 times the FMA units' float rate, the dot products at twice). Not for fewer than 16
// channels, whose tiles are mostly padding and whose panels' VNNI builds outweigh the products: 8-channel 2d layers
// (k=3, s=2) took x1.5-2.1 the time on tiles.
template <typename scalar_t>
bool use_amx(int64_t channels, int64_t depth) {
  return std::is_same_v<scalar_t, c10::BFloat16> && channels >= 16 && cpu::amx_depth_fits(depth) && cpu::bf16_dot();
}

// cpu::amx_pack_a for float operands (the accumulation type of bfloat16 layers); nothing for others.
template <typename T>
void amx_pack(T* a, int64_t M, int64_t K) {
  if constexpr (std::is_same_v<T, float>) cpu::amx_pack_a(a, M, K);
}

// ---------------------------------------------------------------------------------------------------------
// conv: Y = conv(X, W) + bias
// ---------------------------------------------------------------------------------------------------------
// The whole-frame copy of images [n0, n1) of X (conv's `split`): every channel's planes, one after another. Each
// task gathers the channels of an image it holds in one call (the frame's line segments are found once per plane
// for all of them, not once per channel).
template <typename scalar_t, typename acc_t>
void gather_split(const ConvParams& p, const Frame& frame, const scalar_t* x, const Strides& sx, int64_t n0, int64_t n1,
                  acc_t* planes) {
  const int64_t C = p.big_channels, plane_set = split_size(frame, 1);
  at::parallel_for(0, (n1 - n0) * C, grain(plane_set), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end;) {
      const int64_t n = item / C, c = item % C, count = std::min(end - item, C - c);
      gather_windows(frame, x + (n0 + n) * sx.n + c * sx.c, count, p.big, sx, 0, frame.total(),
                     planes + item * plane_set);
      item += count;
    }
  });
}

// The innermost extent of a grid-tiled layout: the grid's lines, or the frame's where few rows of A (so no aligned
// copy of B) would read panels that cross the grid's lines in their middle (k=4 3d, 24-point lines: x1.05 time
// with the grid's, x0.99 with the frame's) and where the frame's lines are at most an eighth longer. Not where the
// source is read in place: the frame's pad points read past a line, and so past the source's end.
template <typename acc_t>
int64_t grid_lines(const Frame& fr, const int64_t* grid, int64_t rows, cpu::GemmTile gt, bool in_place) {
  const bool frame_lines = !in_place && rows < cpu::gemm_copied_rows<acc_t>(gt) &&
                           grid[2] % cpu::gemm_run_width<acc_t>() != 0 && fr.ext[2] <= grid[2] + grid[2] / 8;
  return frame_lines ? fr.ext[2] : grid[2];
}

// The busiest thread's work, in panels of nr points, where tiles of `tile` points cover P and the jobs run as
// `outer` x (tiles x `inner`) items (a tile's `inner` jobs one after another), split into contiguous equal shares
// over the threads as at::parallel_for splits them.
inline int64_t busiest_share(int64_t P, int64_t tile, int64_t outer, int64_t inner, int64_t nr) {
  const int64_t tiles = ceil_div(P, tile), per_outer = tiles * inner, jobs = outer * per_outer;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads()), share = ceil_div(jobs, threads);
  int64_t most = 0;
  for (int64_t k = 0; k < threads; ++k) {
    int64_t load = 0;
    for (int64_t j = k * share; j < std::min(jobs, (k + 1) * share); ++j) {
      const int64_t t = j % per_outer / inner;
      load += ceil_div(std::min(P, (t + 1) * tile) - t * tile, nr);
    }
    most = std::max(most, load);
  }
  return most;
}

// A tile length for `P` points: tiles of at most `longest` points (a multiple of nr), but at least kJobsPerThread
// jobs per thread for the `outer` x `inner` jobs of a tile (busiest_share) where tiles of kMinGridTile points
// allow, the tiles about equal. Then, up to 3 times as many tiles (of 4 panels or more) where the busiest thread's
// share is 2% smaller: a few jobs per thread whose panels do not split evenly leave a thread idle (HiFi-GAN's
// forward, 25 panels in 2 tiles per team: 26 against 24 panels; 5 tiles: 25 each, x0.93 time; the dilated 3d
// layer's 250 panels: 8 tiles, 128 against 122; 10 tiles, 125 each: x0.97 time).
inline int64_t grid_tile(int64_t P, int64_t longest, int64_t outer, int64_t inner, int64_t nr) {
  int64_t tiles = ceil_div(P, std::max<int64_t>(1, longest));
  tiles = std::max<int64_t>(1, std::min(std::max(tiles, ceil_div(kJobsPerThread * at::get_num_threads(), outer * inner)),
                                        ceil_div(P, kMinGridTile)));
  const auto length = [&](int64_t t) { return std::max<int64_t>(1, std::min(P, ceil_div(ceil_div(P, t), nr) * nr)); };
  int64_t best = length(tiles), best_share = busiest_share(P, best, outer, inner, nr);
  for (int64_t t = tiles + 1; t <= 3 * tiles && length(t) >= 4 * nr; ++t) {
    const int64_t share = busiest_share(P, length(t), outer, inner, nr);
    if (share * 100 <= best_share * 98) best = length(t), best_share = share;
  }
  return best;
}

// conv_kernel with grid tiles (as conv_transpose's): tiles are runs of Y's grid points over the batch (or over a
// batch chunk of the whole-frame copy), read through a column map from the windows of the images they touch, so
// no frame point off the grid is computed and tiles are about equal whatever a frame's size. Y is written in
// place where its rows are dense (the GEMM of a tile runs image by image then), else stored. Returns false, having
// done nothing, where a tile's windows would outgrow kWindowBytes (frame tiles then).
template <typename scalar_t, typename acc_t>
bool conv_grid_tiles(const ConvParams& p, const scalar_t* x, const Strides& sx, const acc_t* ba, scalar_t* y,
                     const Strides& sy, const Frame& frame, bool split, cpu::GemmTile gt, int64_t block,
                     int64_t blocks, const acc_t* w_packed, int64_t a_size, acc_t* planes, int64_t nb) {
  const int64_t G = p.groups, Cxg = p.big_group(), Cyg = p.small_group(), P = int64_t(frame.planes.size());
  const bool own_frame = !split && std::is_same_v<scalar_t, acc_t> && source_is_frame(frame, p.big, sx);
  const int64_t layout[kMaxDims] = {p.small[0], p.small[1], grid_lines<acc_t>(frame, p.small, Cyg, gt, own_frame)};
  const int64_t Mi = layout[0] * layout[1] * layout[2], plane_set = split_size(frame, 1);
  const bool in_place = std::is_same_v<scalar_t, acc_t> && sy.dense_rows(p.small) && layout[2] == p.small[2];
  const int64_t zero[kMaxDims] = {0, 0, 0}, one[kMaxDims] = {1, 1, 1};
  // Tiles: the block of C within kColumnBytes; where A is small (Cyg x depth within kColumnBytes) also the windows
  // (all planes of a depth block) within kGridWindowBytes, so that the GEMM reads them from L2 (3d U-Net k=2: x0.88
  // time against windows of 2 MiB). Where A is large, each tile streams it once: long tiles instead.
  const int64_t elem = sizeof(acc_t);
  int64_t longest = kColumnBytes / (Cyg * elem);
  if (Cyg * block * p.kernel_numel() * elem <= kColumnBytes)
    longest = std::min(longest, (kGridWindowBytes / (block * P * elem) - frame.span) * Mi / frame.total());
  const auto tile_of = [&](int64_t images) { return grid_tile(images * Mi, longest, G, 1, gt.nr); };
  if (!split) {  // the windows of every tile fit kWindowBytes
    const int64_t tile = tile_of(p.batch);
    for (int64_t m0 = 0; m0 < p.batch * Mi; m0 += tile) {
      int64_t len = 0;
      for_each_image(layout, m0, std::min(p.batch * Mi, m0 + tile), [&](int64_t, int64_t a, int64_t b, int64_t) {
        len += grid_window(frame, layout, a, b, frame.min_off, frame.span).second;
      });
      if (block * P * len * int64_t(sizeof(acc_t)) > kWindowBytes) return false;
    }
  }
  for (int64_t n0 = 0; n0 < p.batch; n0 += nb) {
    const int64_t n1 = std::min(p.batch, n0 + nb), points = (n1 - n0) * Mi, tile = tile_of(n1 - n0);
    const int64_t tiles = ceil_div(points, tile);
    if (split) {
      gather_split(p, frame, x, sx, n0, n1, planes);
    }
    at::parallel_for(0, G * tiles, grain(2 * Cyg * Cxg * p.kernel_numel() * tile), [&](int64_t begin, int64_t end) {
      thread_local std::vector<int64_t> cols;
      acc_t* out = in_place ? nullptr : scratch<acc_t, 1>(Cyg * tile);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t g = item / tiles, m0 = item % tiles * tile, m1 = std::min(points, m0 + tile), cnt = m1 - m0;
        for (int64_t bi = 0; bi < blocks; ++bi) {
          const int64_t channels = std::min(block, Cxg - bi * block);
          const acc_t* a = w_packed + (g * blocks + bi) * a_size;
          const Windows<acc_t> win =
              split ? grid_windows_in_place<acc_t>(frame, layout, planes + (g * Cxg + bi * block) * plane_set,
                                                   G * Cxg * plane_set, plane_set, frame.total(), m0, m1, cols)
                    : grid_windows<scalar_t, acc_t>(frame, layout, x + n0 * sx.n + (g * Cxg + bi * block) * sx.c,
                                                    sx.n, channels, p.big, sx, m0, m1, frame.min_off, frame.span,
                                                    cols);
          if (in_place) {  // image by image, into Y's rows
            for_each_image(layout, m0, m1, [&](int64_t n, int64_t a0, int64_t a1, int64_t j) {
              acc_t* c = reinterpret_cast<acc_t*>(y + (n0 + n) * sy.n + g * Cyg * sy.c) + a0;
              frame_gemm_windows<acc_t>(frame, win, channels, a1 - a0, gt, Cyg, a, bi > 0, c, sy.c, nullptr, 0,
                                        cols.data() + j);
            });
          } else {
            frame_gemm_windows<acc_t>(frame, win, channels, cnt, gt, Cyg, a, bi > 0, out, cnt, nullptr, 0,
                                      cols.data());
          }
        }
        for_each_image(layout, m0, m1, [&](int64_t n, int64_t a0, int64_t a1, int64_t j) {
          scalar_t* y_g = y + (n0 + n) * sy.n + g * Cyg * sy.c;
          if (in_place) {
            if (ba) {
              acc_t* c = reinterpret_cast<acc_t*>(y_g);
              for (int64_t cy = 0; cy < Cyg; ++cy)
                for (int64_t i = a0; i < a1; ++i) c[cy * sy.c + i] += ba[g * Cyg + cy];
            }
          } else {
            store_rows(out + j, cnt, Cyg, ba ? ba + g * Cyg : nullptr, y_g, sy, one, zero, p.small, a0, a1, layout);
          }
        });
      }
    });
  }
  return true;
}

// ---------------------------------------------------------------------------------------------------------
// bfloat16 correlations on AMX, tap by tap: the conv at any stride, and each phase of a conv_transpose (stride 1: its
// one phase) are correlations whose every tap is one shift of the frame (columns.h; a strided conv: of a frame plane
// per phase of its input): `y` (extents `extent`, Cyg channels a group) is read and `x` (Cxg channels a group) written,
// phase ph's tap t reading y at m + taps[t].offset for x's position m * out_step + ph.r (m < ph.grid) with the weight
// w[g*wg + cx*wx + cy*wy + taps[t].k] (conv_transpose: y is its input, x its output; conv: the other way round, one
// phase). With each image's y laid out once over the frame (all phases' taps, their largest grid) as bfloat16 channel
// pairs (pair row: two channels' values a position, VNNI's B layout), the B tile of (tap, 32 channels of y, 16
// positions) is 16 pair rows at the tap's shift, loaded straight into the tile unit (cpu::gemm_amx_taps); the weights
// are A, packed once per call. The GEMM path narrows its float windows into VNNI panels once per tap instead (27 times
// the input on a k=3 3d layer: 29% of the stride-1 3d forward, whose tile products were another 28%). Frame points off
// a phase's grid are computed and dropped at the store; a tile stores its phases one after another. Returns false
// where it does not apply (the caller takes the GEMM path): fewer than 16 channels of y or more than 64 of x, weights
// that are not finite (the frame's zero padding would multiply them), or a frame copy of one image past half the
// workspace bound.
// ---------------------------------------------------------------------------------------------------------
struct AmxTapsLayer {
  int64_t batch, groups, Cyg, Cxg, K;
  const int64_t *extent, *step;  // step: y positions between x's neighbours (a conv's stride; else 1)
  const int64_t* out_step;       // x positions between a phase's neighbours (a transposed layer's stride; else 1)
  int64_t wg, wx, wy;            // weight strides: group, x channel, y channel
};

template <typename scalar_t>
bool amx_taps(const AmxTapsLayer& l, const std::vector<Phase>& phases, const scalar_t* y, const Strides& sy,
              const scalar_t* w, const float* bias, scalar_t* x, const Strides& sx) {
  static_assert(sizeof(scalar_t) == sizeof(uint16_t));
  const int64_t G = l.groups, Cxg = l.Cxg, Cyg = l.Cyg, K = l.K;
  // (fewer than 16 channels of y: tiles mostly padding, as for use_amx; more than 64 of x: each 32 of them read the
  // copy again and their A tiles outgrow L1, where the GEMM path's tall blocks win: the DCGAN and HiFi-GAN input
  // gradients, 256 and 512 channels, took x1.7 and x2.5 the time)
  if (Cyg < 16 || Cxg <= 0 || Cxg > 64 || phases.empty()) return false;
  // One frame for all phases (a strided transposed layer: each phase is a stride-1 correlation of y with its own
  // taps, written at x positions m * out_step + r): their taps' shifts over the largest of their grids.
  std::vector<Tap> taps;
  int64_t fgrid[kMaxDims] = {0, 0, 0};
  for (const Phase& ph : phases) {
    taps.insert(taps.end(), ph.taps.begin(), ph.taps.end());
    for (int d = 0; d < kMaxDims; ++d) fgrid[d] = std::max(fgrid[d], ph.grid[d]);
  }
  const Frame fr = make_frame(taps, l.step, fgrid);  // (a strided conv: one frame plane per phase of y)
  const int64_t T = static_cast<int64_t>(taps.size()), P = static_cast<int64_t>(fr.planes.size());
  const int64_t NP = static_cast<int64_t>(phases.size());
  std::vector<int64_t> first(NP + 1, 0);  // phase ph's taps: taps[first[ph], first[ph + 1])
  for (int64_t ph = 0; ph < NP; ++ph) first[ph + 1] = first[ph] + static_cast<int64_t>(phases[ph].taps.size());
  // K steps of kp channel pairs of y (at most 32 channels, the steps about equal: 33 channels are 2 steps of 9 pairs,
  // not 16, so the copy holds 18 pairs, not 32), blocks of 16 channels of x
  const int64_t KB = ceil_div(Cyg, 32), kp = ceil_div(ceil_div(Cyg, 2), KB), pairs = KB * kp;
  const int64_t MB = ceil_div(Cxg, 16);
  // pair rows: each frame plane (`lp` pairs: the frame and the 32 positions past it that the last column block
  // reads) in turn, in an odd number of 64-byte lines (rows 2^k lines apart would share L1 sets); tap t reads
  // plane tap_plane[t] at its shift
  const int64_t lp = ceil_div(fr.total() + 32, 16) * 16;
  int64_t ld = P * lp;
  if (ld / 16 % 2 == 0) ld += 16;
  const int64_t plane = fr.ext[1] * fr.ext[2], image = G * pairs * ld;  // (pairs of a frame plane, an image)
  std::vector<int64_t> shift(T);
  for (int64_t t = 0; t < T; ++t) shift[t] = fr.tap_plane[t] * lp + fr.tap_off[t];
  int64_t out_points = 0;
  for (const Phase& ph : phases) out_points += ph.grid[0] * ph.grid[1] * ph.grid[2];
  const int64_t out_bytes = l.batch * G * Cxg * out_points * int64_t(sizeof(scalar_t));
  if (image * int64_t(sizeof(uint32_t)) > std::max<int64_t>(int64_t(64) << 20, out_bytes) / 2) return false;

  // A: tile (g, phase, row block i, tap t of the phase, step s), row r = x channel 16i + r, column c = y channel
  // 2kp*s + c; a phase's tiles start at tile MB * first[ph] of the group's
  const int64_t tile = 32 * kp, a_size = MB * T * KB * tile;
  std::unique_ptr<uint16_t[]> a_fresh;
  uint16_t* const a_all = held_buffer<uint16_t, kWeightSlot>(G * a_size, a_fresh);
  const uint16_t* wb = reinterpret_cast<const uint16_t*>(w);
  // (weights that are inf or NaN: exponent bits all ones; every weight is some tap's)
  unsigned special = 0;
  for (int64_t i = 0; i < G * Cyg * Cxg * K; ++i) special |= (~wb[i] & 0x7F80u) == 0;
  if (special) return false;
  std::vector<int64_t> k(T);
  for (int64_t t = 0; t < T; ++t) k[t] = taps[t].k;
  at::parallel_for(0, G * NP * MB, grain(int64_t(8) * T / NP * KB * tile), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {  // (item = (g * NP + ph) * MB + i)
      const int64_t g = item / (NP * MB), ph = item / MB % NP, i = item % MB;
      const int64_t rows = std::min<int64_t>(16, Cxg - 16 * i);
      const int64_t t0 = first[ph], Tp = first[ph + 1] - t0, block = Tp * KB * tile;
      uint16_t* dst = a_all + g * a_size + (MB * t0 + i * Tp) * KB * tile;
      std::fill(dst, dst + block, uint16_t(0));
      for (int64_t ci = 0; ci < Cyg; ++ci)  // (the weights in order: each line read once)
        for (int64_t r = 0; r < rows; ++r) {
          const uint16_t* src = wb + g * l.wg + (16 * i + r) * l.wx + ci * l.wy;
          uint16_t* d = dst + ci / (2 * kp) * tile + 2 * kp * r + ci % (2 * kp);
          for (int64_t t = 0; t < Tp; ++t) d[t * KB * tile] = src[k[t0 + t]];
        }
    }
  });

  // Images a chunk: their copies within the held buffer (at least one image).
  const int64_t per_chunk = std::clamp<int64_t>(kHeldBytes / (image * int64_t(sizeof(uint32_t))), 1, l.batch);
  std::unique_ptr<uint32_t[]> copy_fresh;
  uint32_t* const copy = held_buffer<uint32_t, kPlaneSlot>(per_chunk * image, copy_fresh);
  // Tiles: runs of one frame plane's positions from its first grid point to its last (the plane's pad lines are
  // not computed), with results of up to 256 KiB, short enough for about 4 a thread.
  const int64_t run = (fgrid[1] - 1) * fr.ext[2] + fgrid[2];
  const int64_t threads = at::get_num_threads();
  int64_t L = std::clamp<int64_t>((int64_t(256) << 10) / (MB * 16 * int64_t(sizeof(float))) / 32 * 32, 32,
                                  ceil_div(run, 32) * 32);
  while (L > 128 && per_chunk * G * fgrid[0] * ceil_div(run, L) < 4 * threads) L = ceil_div(L / 2, 32) * 32;
  const int64_t cuts = ceil_div(run, L), tiles = fgrid[0] * cuts;
  const bool stream = out_bytes >= kStreamBytes && NP == 1;  // (phases interleave: whole lines only at the end)
  const uint16_t* yb = reinterpret_cast<const uint16_t*>(y);
  for (int64_t n0 = 0; n0 < l.batch; n0 += per_chunk) {
    const int64_t imgs = std::min(per_chunk, l.batch - n0);
    // the frame copy: pair row (image, g, cp) holds channels 2cp and 2cp + 1 at every position of each frame plane
    // (zero off the source), then zeros through ld
    at::parallel_for(0, imgs * G * pairs, grain(int64_t(64) * ld), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {  // (item = (ni * G + g) * pairs + cp)
        const int64_t ni = item / (G * pairs), g = item / pairs % G, c0 = 2 * (item % pairs);
        uint32_t* dst = copy + item * ld;
        if (c0 >= Cyg) {
          std::fill(dst, dst + ld, 0u);
          continue;
        }
        const uint16_t* s0 = yb + (n0 + ni) * sy.n + (g * Cyg + c0) * sy.c;
        const uint16_t* s1 = c0 + 1 < Cyg ? s0 + sy.c : nullptr;
        for (int64_t pi = 0; pi < P; ++pi) {
          // frame position u of this plane reads y at u*step + off (per dim), inside y for u in [lo, hi)
          int64_t off[kMaxDims], lo[kMaxDims], hi[kMaxDims];
          for (int d = 0; d < kMaxDims; ++d) {
            off[d] = fr.planes[pi][d] - fr.pad[d] * l.step[d];
            valid_range(off[d], l.step[d], l.extent[d], fr.ext[d], &lo[d], &hi[d]);
          }
          uint32_t* at = dst + pi * lp;
          for (int64_t u0 = 0; u0 < fr.ext[0]; ++u0, at += plane) {
            if (u0 < lo[0] || u0 >= hi[0] || lo[1] == hi[1] || lo[2] == hi[2]) {
              std::fill(at, at + plane, 0u);
              continue;
            }
            const int64_t o = sy.at(u0 * l.step[0] + off[0], lo[1] * l.step[1] + off[1], lo[2] * l.step[2] + off[2]);
            std::fill(at, at + lo[1] * fr.ext[2], 0u);
            cpu::amx_pair_rows(s0 + o, s1 ? s1 + o : nullptr, l.step[1] * sy.s[1], l.step[2] * sy.s[2], hi[1] - lo[1],
                               lo[2], hi[2], fr.ext[2], at + lo[1] * fr.ext[2]);
            std::fill(at + hi[1] * fr.ext[2], at + plane, 0u);
          }
          std::fill(at, dst + (pi + 1) * lp, 0u);
        }
        std::fill(dst + P * lp, dst + ld, 0u);
      }
    });
    at::parallel_for(0, imgs * G * tiles, 1, [&](int64_t begin, int64_t end) {
      float* out = scratch<float, 1>(MB * 16 * L);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t ni = item / (G * tiles), g = item / tiles % G, i0 = item % tiles / cuts;
        const int64_t f0 = i0 * plane + item % cuts * L, f1 = std::min(i0 * plane + run, f0 + L);
        for (int64_t ph = 0; ph < NP; ++ph) {  // (a tile's phases one after another: its output lines stay in cache)
          if (i0 >= phases[ph].grid[0]) continue;
          const int64_t t0 = first[ph];
          cpu::gemm_amx_taps(MB, ceil_div(f1 - f0, 32) * 32, first[ph + 1] - t0, KB, kp,
                             a_all + g * a_size + MB * t0 * KB * tile, copy + (ni * G + g) * pairs * ld + f0, ld,
                             shift.data() + t0, out, L);
          store_rows<scalar_t, float>(out, L, Cxg, bias ? bias + g * Cxg : nullptr,
                                      x + (n0 + ni) * sx.n + g * Cxg * sx.c, sx, l.out_step, phases[ph].r,
                                      phases[ph].grid, f0, f1, fr.ext, stream);
        }
      }
      if (stream) cpu::stream_fence();
    });
  }
  return true;
}

// The layer as winograd.h's correlation: conv (x -> y) as it is; conv_transpose (y -> x) with its two channel dims
// swapped and, at stride 1, its taps reversed (at stride 2 its phases). False where a dim takes none of the schemes.
inline bool winograd_layer(const ConvParams& p, bool transposed, cpu::WinogradLayer& wl) {
  const int64_t Cxg = p.big_group(), Cyg = p.small_group(), T = p.kernel_numel();
  wl = cpu::WinogradLayer{p.batch, p.groups, transposed ? Cyg : Cxg, transposed ? Cxg : Cyg, {}, {}, {}, {}, {},
                          Cyg * Cxg * T, transposed ? T : Cxg * T, transposed ? Cxg * T : T, transposed, {}};
  std::copy(transposed ? p.small : p.big, (transposed ? p.small : p.big) + kMaxDims, wl.in_ext);
  std::copy(transposed ? p.big : p.small, (transposed ? p.big : p.small) + kMaxDims, wl.out_ext);
  std::copy(p.kernel, p.kernel + kMaxDims, wl.kernel);
  std::copy(p.dilation, p.dilation + kMaxDims, wl.dilation);
  if (!transposed && cpu::wino_strided_kinds(p.kernel, p.stride, p.padding, p.dilation, wl.kind, wl.pad, wl.split))
    return true;
  return cpu::wino_kinds(transposed, p.kernel, p.stride, p.padding, p.dilation, wl.kind, wl.pad);
}

// The weight gradient by winograd.h's transposed transforms (winograd_weight_grad), the layer seen as the
// correlation that takes a scheme: conv's (x -> y) at stride 1, conv_transpose's (y -> x, its phases) at stride 2.
// False where neither takes one, or where the path does not take the layer (the caller's path then computes dw).
inline bool winograd_weight_grad(const ConvParams& p, const float* x, const Strides& sx, const float* y,
                                 const Strides& sy, float* dw) {
  cpu::WinogradLayer wl;
  if (winograd_layer(p, false, wl) && std::none_of(wl.split, wl.split + kMaxDims, [](bool b) { return b; }))
    return cpu::winograd_weight_grad(wl, x, sx, y, sy, dw);
  return winograd_layer(p, true, wl) && cpu::winograd_weight_grad(wl, y, sy, x, sx, dw);
}

// A 16-bit layer (bfloat16 or half) by the Winograd path (winograd_takes; not for bfloat16 where the CPU has AMX, whose
// tiles take its values as they are, nor by AVX512-BF16 dot products, at twice the FMA rate, unless the scheme saves
// more than that: the stride-1 3x3x3 and k=4, s=2 3d forwards (0.30 and 0.42 of the products) took x1.40 and x1.19 the
// time by dot products, DCGAN's k=4 2d (0.56) x0.85, MONAI's k=3 (0.58) x0.93): its input widened to float as the input
// transform loads it, the output rounded once as the output transform stores it (as the 16-bit GEMMs' float sums are),
// its weights and bias widened here. The result is the float32 layer's on the widened values, rounded. (DCGAN's
// kernel-4 layer in bfloat16 took x2.0 the time of float32 on an AVX2 CPU once float32 had Winograd; widening the input
// and rounding the output in passes of their own left it at x1.035-1.045, in the transforms x1.00-1.02.) `in`, `out`:
// the layer's input and output (conv_transpose: y and x). False where the path does not take the layer or any output is
// not finite (the caller's path then computes it).
template <typename scalar_t>
bool winograd16(const ConvParams& p, bool transposed, const scalar_t* in, const Strides& si, const scalar_t* w,
                const scalar_t* bias, scalar_t* out, const Strides& so) {
  cpu::WinogradLayer wl;
  winograd_layer(p, transposed, wl);
  if ((std::is_same_v<scalar_t, c10::BFloat16> && cpu::bf16_dot() &&
       (cpu::amx_bf16() || cpu::winograd_fraction(wl) > 0.45)) ||
      !cpu::winograd_takes(wl, transposed, p.stride[2], si.s[2], so.s[2]))
    return false;
  const int64_t cout = transposed ? p.big_channels : p.small_channels;
  const int64_t weights = p.small_channels * p.big_group() * p.kernel_numel();  // ([small][big group][taps])
  // (the weights in a kept buffer: the same address call after call, so their transform is kept like a float
  // layer's)
  std::unique_ptr<float[]> w_fresh;
  float* const fw = cpu::held_buffer<float, cpu::kWidenSlot>(weights, w_fresh);
  const int64_t chunk = 16384, chunks = ceil_div(weights, chunk);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t j0 = c * chunk, n = std::min(chunk, weights - j0);
      const cpu::Segment seg{0, 0, n, n, 0};
      cpu::copy_segments16(reinterpret_cast<const uint16_t*>(w + j0), 0, 1, &seg, 1, 1,
                           std::is_same_v<scalar_t, c10::BFloat16>, fw + j0, 0);
    }
  });
  std::vector<float> b_store;
  const float* fb = bias ? as_acc(bias, cout, b_store) : nullptr;
  return cpu::winograd_correlation(wl, in, si, fw, fb, out, so) ||
         (transposed && cpu::winograd_upsample(wl, p.stride[2], p.padding[2], in, si, fw, fb, out, so));
}

template <typename scalar_t>
void conv_kernel(const ConvParams& p, const scalar_t* x, const Strides& sx, const scalar_t* w, const scalar_t* bias,
                 scalar_t* y, const Strides& sy) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = p.groups, Cxg = p.big_group(), Cyg = p.small_group();
  if (Cxg == 1 && Cyg == 1) return conv_depthwise(p, x, sx, w, bias, y, sy);
  const int64_t T = p.kernel_numel(), KK = Cxg * T;
  if constexpr (std::is_same_v<scalar_t, float>) {
    cpu::WinogradLayer wl;
    if (winograd_layer(p, false, wl) && cpu::winograd_correlation(wl, x, sx, w, bias, y, sy)) return;
  } else if constexpr (sizeof(scalar_t) == 2) {
    if (winograd16(p, false, x, sx, w, bias, y, sy)) return;
  }
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (cpu::amx_bf16()) {  // (any stride: a frame plane per phase of x)
      std::vector<float> b_store;
      const float* ba = bias ? as_acc(bias, p.small_channels, b_store) : nullptr;
      const int64_t one[kMaxDims] = {1, 1, 1};
      const AmxTapsLayer layer{p.batch, G, Cxg, Cyg, T, p.big, p.stride, one, Cyg * Cxg * T, Cxg * T, T};
      std::vector<Phase> all(1);  // (one phase: every output point, all taps)
      std::fill(all[0].r, all[0].r + kMaxDims, 0);
      std::copy(p.small, p.small + kMaxDims, all[0].grid);
      all[0].taps = conv_taps(p);
      if (amx_taps(layer, all, x, sx, w, ba, y, sy)) return;
    }
  }
  // (The taller register blocking where it pads the rows by at most 5%: x0.92-0.95 time on the DCGAN and HiFi-GAN
  // backward convolutions, 256 and 512 rows. conv_transpose keeps the default: x1.07 on HiFi-GAN's forward.)
  cpu::GemmTile gt = cpu::gemm_tile<acc_t>(Cyg, 0.05);
  // The depth (input channels x taps) runs in blocks of whole input channels, so that even a narrowest column
  // tile (NR positions) stays within kColumnBytes when channels x taps is huge (long 1d kernels); the GEMM
  // accumulates over the blocks. Ordinary layers have one block.
  const int64_t block =
      std::max<int64_t>(1, std::min(Cxg, kColumnBytes / (gt.nr * std::max<int64_t>(1, T) * int64_t(sizeof(acc_t)))));
  const int64_t blocks = std::max<int64_t>(1, ceil_div(Cxg, block)), depth = block * T;  // (no channels: one empty block)
  if (use_amx<scalar_t>(Cxg, KK - (blocks - 1) * depth)) gt = cpu::gemm_tile_amx();
  // A operand per (group, block): the weight rows of the group's output channels over the block's depth.
  const int64_t a_size = cpu::packed_size(Cyg, depth, gt.mr);
  // (packed in parallel, panel by panel; not zeroed first: packing writes every element)
  std::unique_ptr<acc_t[]> w_fresh, planes_fresh;
  acc_t* const w_packed = held_buffer<acc_t, kWeightSlot>(G * blocks * a_size, w_fresh);
  std::vector<acc_t> b_store;
  const int64_t panels = ceil_div(Cyg, gt.mr);
  at::parallel_for(0, G * blocks * panels, grain(gt.mr * depth * 4), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / (blocks * panels), bi = item / panels % blocks, r0 = item % panels * gt.mr;
      const int64_t d = std::min(depth, KK - bi * depth);
      const scalar_t* src = w + (g * Cyg + r0) * KK + bi * depth;
      acc_t* dst = w_packed + (g * blocks + bi) * a_size + r0 * d;
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (gt.amx) {
          cpu::amx_pack_rows(reinterpret_cast<const uint16_t*>(src), KK, std::min(gt.mr, Cyg - r0), d, dst);
          continue;
        }
      }
      cpu::pack_panels(src, KK, 1, std::min(gt.mr, Cyg - r0), d, gt.mr, dst);
      if (gt.amx) amx_pack(dst, std::min(gt.mr, Cyg - r0), d);
    }
  });
  const acc_t* ba = bias ? as_acc(bias, p.small_channels, b_store) : nullptr;
  const std::vector<Tap> taps = conv_taps(p);
  // Positions: flat frame positions (columns.h) where the frame gather applies, else the output grid's.
  const Frame frame = make_frame(taps, p.stride, p.small);
  int64_t M = p.small_spatial(), tile = tile_size(depth, frame.positions, sizeof(acc_t), gt.nr);
  // Windows come from a whole-frame copy of a few batch items at a time (`planes`, built in parallel) where that
  // is cheaper than gathering them tile by tile.
  const bool split = use_split<scalar_t, acc_t>(frame, M, p.big, sx, G * Cxg, tile, gt.nr);
  // (conv takes the windows even where they are up to twice its columns: the MONAI k=3, s=2 layer's input gradient,
  // 8 planes whose windows were 1% more than the columns, gathered columns instead, x1.47 time; with that slack
  // conv_transpose loses, the forward of the seed k=3, s=2 layer x1.16, and the weight gradient gains nothing.)
  const bool framed = split || use_frame<scalar_t, acc_t>(frame, M, p.big, sx, block, tile, gt.nr, 2);
  if (framed) M = frame.positions;
  else tile = tile_size(depth, M, sizeof(acc_t), gt.nr);
  // `tile` bounds the packed columns (col). A framed GEMM reads its columns in place from the windows, save a few
  // panels at a frame's end, so where A (Cyg x depth) is too large to stay in L2 from one tile to the next, it
  // takes wider tiles, each of which streams A once: up to 8 column tiles while the block of C (Cyg x tile) stays
  // within kColumnBytes and gathered windows within kWindowBytes, and while there are 2 tasks per thread.
  // Measured: x0.95-0.96 time on the DCGAN and HiFi-GAN backward convolutions (A of 2 and 8 MiB); where A is
  // small (3d U-Net k=2: 64 KiB) wider tiles only push the windows out of L2 (x1.18).
  const int64_t col_tile = tile;
  if (framed && Cyg * depth * int64_t(sizeof(acc_t)) > kColumnBytes) {
    int64_t wide = std::min(8 * tile, tile_size(Cyg, M, sizeof(acc_t), gt.nr));
    while (wide > tile && p.batch * G * ceil_div(M, wide) < 2 * at::get_num_threads())
      wide = std::max(tile, wide / 2 / gt.nr * gt.nr);
    const int64_t window = static_cast<int64_t>(frame.planes.size()) * frame.window(wide, gt.nr);
    if (wide > tile && (split || block * window * int64_t(sizeof(acc_t)) <= kWindowBytes)) tile = wide;
  }
  const int64_t tiles = ceil_div(M, tile), zero[kMaxDims] = {0, 0, 0}, one[kMaxDims] = {1, 1, 1};
  const int64_t plane_set = split_size(frame, 1), per_item = G * Cxg * plane_set;  // (of the copy)
  const int64_t nb = split ? std::clamp<int64_t>(kSplitBytes / (per_item * int64_t(sizeof(acc_t))), 1, p.batch)
                           : p.batch;
  acc_t* const planes = split ? held_buffer<acc_t, kPlaneSlot>(nb * per_item, planes_fresh) : nullptr;
  // Grid tiles where the frame has points off the grid (padding, sub-sampled planes): measured against frame
  // tiles, DCGAN's input gradient x0.87 time, k=4 3d x0.92, the anisotropic seed layer x0.90, dilated 3d x0.86,
  // stride-1 3d x0.92, grouped 2d x0.92. Frames without such points (k == s, pointwise, 1d: x1.00-1.06 with grid
  // tiles) keep frame tiles.
  if (framed && frame.positions > p.small_spatial() &&
      conv_grid_tiles<scalar_t, acc_t>(p, x, sx, ba, y, sy, frame, split, gt, block, blocks, w_packed, a_size, planes,
                                       nb))
    return;
  // Output rows that are dense (and have no frame points off the grid) are written by the GEMM in place.
  const bool in_place = std::is_same_v<scalar_t, acc_t> && sy.dense_rows(p.small) &&
                        (!framed || std::equal(frame.ext, frame.ext + kMaxDims, p.small));

  for (int64_t n0 = 0; n0 < p.batch; n0 += nb) {
    const int64_t n1 = std::min(p.batch, n0 + nb);
    if (split) {
      gather_split(p, frame, x, sx, n0, n1, planes);
    }
    at::parallel_for(0, (n1 - n0) * G * tiles, grain(2 * Cyg * KK * tile), [&](int64_t begin, int64_t end) {
      acc_t* col = scratch<acc_t, 0>(cpu::packed_size(col_tile, depth, gt.nr));
      acc_t* out = scratch<acc_t, 1>(Cyg * tile);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = n0 + item / (G * tiles), g = item / tiles % G, m0 = item % tiles * tile;
        const int64_t m1 = std::min(M, m0 + tile), cnt = m1 - m0;
        scalar_t* y_g = y + n * sy.n + g * Cyg * sy.c;
        // The output rows are dense: the GEMM writes them in place, then the bias is added.
        acc_t* c = in_place ? reinterpret_cast<acc_t*>(y_g) + m0 : out;
        const int64_t ldc = in_place ? sy.c : cnt;
        for (int64_t bi = 0; bi < blocks; ++bi) {
          const int64_t channels = std::min(block, Cxg - bi * block);
          const scalar_t* x_b = x + n * sx.n + (g * Cxg + bi * block) * sx.c;
          const acc_t* a = w_packed + (g * blocks + bi) * a_size;
          if (framed) {
            frame_gemm(frame, x_b, channels, p.big, sx, m0, cnt, gt, Cyg, a, bi > 0, c, ldc, col, col_tile,
                       split ? planes + ((n - n0) * G * Cxg + g * Cxg + bi * block) * plane_set : nullptr);
          } else {
            gather_columns(x_b, channels, p.big, sx, taps, p.stride, p.small, m0, m1, col,
                           ColumnLayout{channels * T, gt.nr, 0});
            cpu::gemm_packed<acc_t>(gt, Cyg, cnt, channels * T, a, col, bi > 0, c, ldc);
          }
        }
        if (in_place) {
          if (ba)
            for (int64_t cy = 0; cy < Cyg; ++cy)
              for (int64_t j = 0; j < cnt; ++j) c[cy * ldc + j] += ba[g * Cyg + cy];
        } else {
          store_rows(out, cnt, Cyg, ba ? ba + g * Cyg : nullptr, y_g, sy, one, zero, p.small, m0, m1,
                     framed ? frame.ext : nullptr);
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------------
// conv_transpose: X = conv_transpose(Y, W) + bias, one dense correlation per phase
// ---------------------------------------------------------------------------------------------------------
std::vector<Phase> transpose_phases(const ConvParams& p, bool* all_covered) {
  // Only phases r < big exist (stride may exceed the output size); each tap belongs to exactly one phase per
  // dim, so there are at most kernel_numel phases with taps.
  std::vector<Phase> phases;
  int64_t total = 1;
  for (int d = 0; d < kMaxDims; ++d) total *= std::min(p.stride[d], p.big[d]);
  for (int64_t k0 = 0; k0 < p.kernel[0]; ++k0)
    for (int64_t k1 = 0; k1 < p.kernel[1]; ++k1)
      for (int64_t k2 = 0; k2 < p.kernel[2]; ++k2) {
        const int64_t k[kMaxDims] = {k0, k1, k2};
        Phase ph;
        Tap tap;
        bool inside = true;
        for (int d = 0; d < kMaxDims; ++d) {
          ph.r[d] = ((k[d] * p.dilation[d] - p.padding[d]) % p.stride[d] + p.stride[d]) % p.stride[d];
          inside = inside && ph.r[d] < p.big[d];
          phase_tap(ph.r[d], k[d], p.stride[d], p.padding[d], p.dilation[d], &tap.offset[d]);
          ph.grid[d] = phase_count(p.big[d], p.stride[d], ph.r[d]);
        }
        if (!inside) continue;
        tap.k = (k0 * p.kernel[1] + k1) * p.kernel[2] + k2;
        auto it = std::find_if(phases.begin(), phases.end(), [&](const Phase& q) {
          return q.r[0] == ph.r[0] && q.r[1] == ph.r[1] && q.r[2] == ph.r[2];
        });
        if (it == phases.end()) {
          phases.push_back(ph);
          it = phases.end() - 1;
        }
        it->taps.push_back(tap);
      }
  *all_covered = static_cast<int64_t>(phases.size()) == total;
  return phases;
}

// What conv_transpose_kernel derives from the geometry alone: the phases, their grouping into GEMMs (sets) and
// stores (teams), the work items, and the weight-packing tables.
//
// Phases with the same grid and the same tap shifts (k == s: every phase has the one shift 0) share one GEMM (a
// set): their weights are stacked as rows of A, so their columns are gathered once, and A is tall.
struct PhaseSet {
  std::vector<int64_t> members;  // phase indices
  int64_t taps = 0;              // per phase (>= 1)
  int64_t out_rows = 0;          // Cxg * members
  int64_t block = 1, blocks = 1;  // the depth (Cyg * taps) in blocks of `block` input channels (see conv)
  int64_t tile = 1;
  cpu::GemmTile gt{1, 1};
  // per group and depth block: A[(member, cx), cy*T + t] = W[g*Cyg + cy, cx, taps[t].k], packed, at element
  // a_offset of the call's packed-weight buffer (one for all sets; not zeroed: packing writes every element)
  int64_t a_offset = 0;
  int64_t a_size = 0;  // of one (group, block) operand
  Frame frame;         // positions are flat frame positions (columns.h) when `framed`, else grid positions
  bool framed = false;
  // unframed, one tap that reads Y at the grid point itself, the grid is Y's extents and Y's rows are dense: a
  // tile's column row of channel c is Y's channel c at the tile's positions (16-bit layers widen it in one pass)
  bool dense_source = false;
  // Tile positions are the points of `layout` (row-major, per image): the frame's extents, or the grid's where
  // unframed; with grid tiles the grid's, or (grid0, grid1, frame ext2): the frame's lines, but only those of grid
  // points (TransposePlan::grid_tiles).
  int64_t layout[kMaxDims] = {1, 1, 1};
  int64_t positions = 0;  // the extent its tiles cover (per image; with grid tiles, of the whole batch)
  // Grid tiles: the classes of the grid's lines (u0, u1) by the taps that read Y there. Where a tap reads past Y's
  // extent along dim 0 or 1 (the first and last planes and lines of phases whose taps reach past Y's edges, lines of
  // an extended grid past a phase's own), it multiplies the frame's zeros: a run of lines of one class is a GEMM over
  // that class's taps only. line_class[u0 * grid1 + u1]: -1 every tap, -2 none (the sums are zeros), else c, whose
  // taps are subsets[c] and whose packed A (rows (cy, subsets[c][i]) of the set's) starts at element sub_offset[c]
  // of the weight buffer, sub_size[c] a (group, depth block) operand. Empty where every line reads every tap.
  std::vector<int8_t> line_class;
  std::vector<std::vector<int64_t>> subsets;
  std::vector<int64_t> sub_offset, sub_size;
};

// Sets whose tiles cover the same output points (same grid and position layout, same tile) form a team: one job
// computes a tile of every member, then stores them together, so the phases that interleave along the innermost
// output dim (stride 2: r2 = 0 and 1, which differ in shifts, so are different sets) are written as runs, each
// output line once, instead of in strided passes. A team's results stay within kColumnBytes.
struct Team {
  std::vector<int64_t> sets;
  std::vector<int64_t> phases;  // of its sets' members in order: the result rows of `slot` s are s*Cxg ...
  // slots stored together: phases differing only in r2, consecutive ones interleaved, else one each; in stacks of
  // stacks[i] consecutive groups (stack_groups)
  std::vector<std::vector<int64_t>> store_groups;
  std::vector<int64_t> stacks;
  int64_t out_rows = 0;
  // Framed sets whose frames share one pad (share_windows): a tile's windows of Y are gathered once for all of
  // them, from frame position m0 + win_lo, span win_span past the tile's panels.
  bool shared = false;
  int64_t win_lo = 0, win_span = 0;
  // Grid tiles, shared windows of one depth block: a job's tiles (of its sets' `tile` points), whose windows are
  // gathered once (make_transpose_plan)
  int64_t tiles = 1;
};

// Whether a transposed layer's output rows of phases along dim 1 are stored stacked (stack_groups): a stride along
// dim 1, and rows contiguous (one after another, innermost stride 1) but not whole 64-byte lines of `elem`-byte
// values.
inline bool stacks_rows(const ConvParams& p, const Strides& sx, int64_t elem) {
  return p.stride[1] > 1 && sx.s[2] == 1 && sx.s[1] == p.big[2] && p.big[2] * elem % 64 != 0;
}

// Orders a team's store groups into stacks (Team::stacks): groups of one r0 and the same r2s whose r1 follow one
// another, each covering whole output rows (its r2s are all of the stride's), are stored together along dim 1
// (store_rows_interleaved's layers) where stacks_rows: each line's rows one after another, one stream, whose shared
// lines are written once. (Rows of whole lines gain nothing from it: DCGAN, MONAI, U-Net forwards within noise,
// bfloat16 DCGAN x1.02-1.05.) Slot s's results start s * Cxg rows into a job's results, so a layer's rows are at one
// shift from the first layer's for every way where their slots differ by one amount.
void stack_groups(const ConvParams& p, const std::vector<Phase>& phases, const Strides& sx, int64_t elem, Team& team) {
  std::vector<std::vector<int64_t>>& groups = team.store_groups;
  const auto phase = [&](int64_t slot) -> const Phase& { return phases[team.phases[slot]]; };
  const auto whole_rows = [&](const std::vector<int64_t>& g) {
    return int64_t(g.size()) == p.stride[2] && stacks_rows(p, sx, elem);
  };
  const auto follows = [&](const std::vector<int64_t>& g, const std::vector<int64_t>& h) {  // h on top of g
    if (h.size() != g.size() || !whole_rows(h)) return false;
    for (size_t w = 0; w < g.size(); ++w) {
      const Phase &u = phase(g[w]), &v = phase(h[w]);
      if (v.r[0] != u.r[0] || v.r[1] != u.r[1] + 1 || v.r[2] != u.r[2] || h[w] - g[w] != h[0] - g[0] ||
          !std::equal(u.grid, u.grid + kMaxDims, v.grid))
        return false;
    }
    return true;
  };
  std::vector<std::vector<int64_t>> order;
  std::vector<bool> taken(groups.size(), false);
  team.stacks.clear();
  for (size_t i = 0; i < groups.size(); ++i) {
    if (taken[i]) continue;
    taken[i] = true;
    order.push_back(groups[i]);
    int64_t layers = 1;
    for (bool more = whole_rows(groups[i]); more && layers < kMaxStack;) {
      more = false;
      for (size_t k = 0; k < groups.size() && !more; ++k)
        if (!taken[k] && follows(order.back(), groups[k])) {
          taken[k] = more = true;
          order.push_back(groups[k]);
          ++layers;
        }
    }
    team.stacks.push_back(layers);
  }
  groups = std::move(order);
}

// Lays the frames of a team's sets over one source plane, so that a tile gathers its windows of Y once for all
// of them instead of once per set (k=4, s=2 3d layers: 8 sets, whose gathers were a fifth of the time). The
// team's frames have the same extents `ext` but pads that differ by phase; each set's frame gets the largest
// pad, keeping `ext`, so a frame point maps to the same source point in every set. A tap may then read past
// the end of a frame row (by at most the pad it gained): the flat index carries into the next row's (or
// plane's) pad, or past the frame, which hold zeros; that is the right value as long as it stands for a point
// past the source, i.e. ext - pad >= the source extent in every dim where a read can pass the row end. Sets
// with other depth blocks, or more than one plane, keep their own windows. With grid tiles the frames may differ
// in extents too (teams form by grid): they take the largest, which computes no more points (grid tiles compute
// grid points only). Measured, forward: MONAI k=3 x0.81 time, grouped 2d x0.89, the 8-channel 8 x 8 layer's op
// call 12.2 -> 11.2 us.
void share_windows(Team& team, std::vector<PhaseSet>& sets, const std::vector<Phase>& phases, const ConvParams& p,
                   bool grid_tiles) {
  if (team.sets.size() < 2) return;
  const PhaseSet& lead = sets[team.sets[0]];
  int64_t pad[kMaxDims] = {0, 0, 0}, ext[kMaxDims] = {0, 0, 0};
  for (int64_t si : team.sets)
    for (int d = 0; d < kMaxDims; ++d) {
      pad[d] = std::max(pad[d], sets[si].frame.pad[d]);
      ext[d] = std::max(ext[d], sets[si].frame.ext[d]);
    }
  for (int64_t si : team.sets) {
    const PhaseSet& set = sets[si];
    if (!set.framed || set.block != lead.block || set.blocks != lead.blocks || set.frame.planes.size() != 1 ||
        (!grid_tiles && !std::equal(ext, ext + kMaxDims, set.frame.ext)))
      return;
    const Phase& ph = phases[set.members[0]];
    for (int d = 0; d < kMaxDims; ++d) {
      int64_t hi = 0;
      for (const Tap& tap : ph.taps) hi = std::max(hi, tap.offset[d]);
      if (ph.grid[d] - 1 + hi + pad[d] >= ext[d] && ext[d] - pad[d] < p.small[d]) return;
    }
  }
  const int64_t one[kMaxDims] = {1, 1, 1};
  int64_t lo = 0, hi = 0;
  for (size_t i = 0; i < team.sets.size(); ++i) {
    PhaseSet& set = sets[team.sets[i]];
    const Phase& ph = phases[set.members[0]];
    set.frame = make_frame(ph.taps, one, ph.grid, pad, ext);
    lo = i == 0 ? set.frame.min_off : std::min(lo, set.frame.min_off);
    hi = i == 0 ? set.frame.min_off + set.frame.span : std::max(hi, set.frame.min_off + set.frame.span);
  }
  team.shared = true;
  team.win_lo = lo;
  team.win_span = hi - lo;
}

struct TransposeJob {
  int64_t team, m0, m1;
};

// PhaseSet::line_class of a grid-tiled set of phase `ph`, and its classes' operands, placed from `a_total` on. Not
// for AMX operands (tiles, not rows), sets of more than 64 taps, or more than kMaxLineClasses classes. Measured
// (forward, alternated builds): the seed k=3, s=2 layer, whose 11-plane grids of r0 = 0 have their two end planes on
// half the taps (6% of its GEMMs' work), x0.95 time; the anisotropic seed layer x0.93; k=4, s=2 3d within noise.
void line_classes(const ConvParams& p, const Phase& ph, PhaseSet& set, int64_t& a_total) {
  const int64_t T = set.taps, lines = set.layout[0] * set.layout[1];
  // (along the dims whose planes, or lines, are kMinClassRun points or more: a GEMM per run ends in a part panel,
  // which costs a whole one; classes of the seed layer's lines of 102 points left it as fast as without them)
  const bool long_runs[2] = {set.layout[1] * set.layout[2] >= kMinClassRun, set.layout[2] >= kMinClassRun};
  if (set.gt.amx || T > 64 || !(long_runs[0] || long_runs[1])) return;
  const uint64_t all = T == 64 ? ~uint64_t(0) : (uint64_t(1) << T) - 1;
  std::vector<uint64_t> masks;
  std::vector<int8_t> cls(lines, -1);
  for (int64_t l = 0; l < lines; ++l) {
    const int64_t u[2] = {l / set.layout[1], l % set.layout[1]};
    uint64_t mask = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t* off = ph.taps[t].offset;
      bool reads = true;
      for (int d = 0; d < 2; ++d)
        reads = reads && (!long_runs[d] || (u[d] + off[d] >= 0 && u[d] + off[d] < p.small[d]));
      mask |= uint64_t(reads) << t;
    }
    if (mask == all) continue;
    if (mask == 0) {
      cls[l] = -2;
      continue;
    }
    auto it = std::find(masks.begin(), masks.end(), mask);
    if (it == masks.end()) {
      if (int64_t(masks.size()) == kMaxLineClasses) return;
      it = masks.insert(masks.end(), mask);
    }
    cls[l] = static_cast<int8_t>(it - masks.begin());
  }
  if (std::all_of(cls.begin(), cls.end(), [](int8_t c) { return c == -1; })) return;
  set.line_class = std::move(cls);
  for (uint64_t mask : masks) {
    std::vector<int64_t> taps;
    for (int64_t t = 0; t < T; ++t)
      if (mask >> t & 1) taps.push_back(t);
    set.sub_size.push_back(cpu::packed_size(set.out_rows, set.block * int64_t(taps.size()), set.gt.mr));
    set.sub_offset.push_back(a_total);
    a_total += p.groups * set.blocks * set.sub_size.back();
    set.subsets.push_back(std::move(taps));
  }
}

// The part of a (computed) grid that phase r has in the output: the grid may be longer (make_transpose_plan).
inline std::array<int64_t, kMaxDims> own_grid(const ConvParams& p, const int64_t* r, const int64_t* grid) {
  std::array<int64_t, kMaxDims> own;
  for (int d = 0; d < kMaxDims; ++d) own[d] = std::min(grid[d], phase_count(p.big[d], p.stride[d], r[d]));
  return own;
}

// Phases with their own grids (for the direct kernel, which computes them as they are).
inline std::vector<Phase> own_grids(const ConvParams& p, std::vector<Phase> phases) {
  for (Phase& ph : phases) std::copy_n(own_grid(p, ph.r, ph.grid).data(), kMaxDims, ph.grid);
  return phases;
}

struct TransposePlan {
  std::vector<Phase> phases;
  bool all_covered = false;  // every big position is reached by some tap
  bool direct = false;       // per-channel groups: conv_transpose_direct, no GEMM (nothing below is set)
  std::vector<PhaseSet> sets;
  std::vector<Team> teams;
  std::vector<TransposeJob> jobs;  // in run order
  std::vector<std::pair<int64_t, int64_t>> classes;  // (set, class) of every line class (PhaseSet::line_class)
  // Grid tiles: every set is framed, and tiles are runs of grid points over the whole batch (n-major), read through
  // a column map (gemm_rows) from the windows of the images they touch; no frame point off the grid is computed
  // and tiles cross image boundaries. Else tiles are runs of one image's frame (or grid) positions.
  bool grid_tiles = false;
  int64_t max_rows = 0, max_tile = 1, max_out = 0, flops = 0, a_total = 0;
  // Weight packing: per set, a table mapping (tap, row) to the element's offset in an input channel's weights
  // (Cxg x K, contiguous; -1: padding row), and the set's first work item (per group; one more at the end).
  std::vector<std::vector<int64_t>> source;
  std::vector<int64_t> first_item;
};

template <typename scalar_t>
TransposePlan make_transpose_plan(const ConvParams& p, const Strides& sy, const Strides& sx, bool grid_tiles = true) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cxg = p.big_group(), Cyg = p.small_group(), K = p.kernel_numel();
  const int64_t one[kMaxDims] = {1, 1, 1};
  TransposePlan plan;
  plan.phases = transpose_phases(p, &plan.all_covered);
  plan.direct = Cxg == 1 && Cyg == 1;
  if (plan.direct) return plan;
  // Phases of one (r0, r1) whose innermost grids differ (an odd output extent at stride 2: grids of n + 1 and n
  // points) are computed on the longest, so that they team and their runs are stored interleaved, each output line
  // once, instead of in strided passes; the points past a phase's own grid are not stored (store_rows_interleaved's
  // limit). Where lines are long (kMinExtendedGrid): the seed k=3, s=2 layer (grids of 101 and 100 points) x0.77-0.86
  // time; 16-point grids (k=3, s=2, p=1 on 16^3) gained nothing.
  const int64_t longest = std::accumulate(plan.phases.begin(), plan.phases.end(), int64_t(0),
                                          [](int64_t v, const Phase& ph) { return std::max(v, ph.grid[2]); });
  bool extended = false;
  if (p.stride[2] > 1 && sx.s[2] == 1 && longest >= kMinExtendedGrid)
    for (Phase& ph : plan.phases)
      for (const Phase& q : plan.phases)
        if (q.r[0] == ph.r[0] && q.r[1] == ph.r[1] && q.grid[2] > ph.grid[2]) ph.grid[2] = q.grid[2], extended = true;
  // Likewise the phases of one r0 whose grids differ in lines (an odd output height at stride 2), where the output's
  // rows are contiguous but not whole 64-byte lines (stacks_rows) and every phase has the same innermost grid:
  // computed on the most lines, they team, and each line's output rows are stored one after another (stacked,
  // stack_groups), so a line shared by two rows is written once, whole (cpu::store_interleaved), not by plain stores
  // in two passes.
  // The seed k=3, s=2 layer (101 x 201 planes), forward: x0.82 time (its stores from 17 to ~45 GB/s).
  const int64_t lines = std::accumulate(plan.phases.begin(), plan.phases.end(), int64_t(0),
                                        [](int64_t v, const Phase& ph) { return std::max(v, ph.grid[1]); });
  const bool one_width = std::all_of(plan.phases.begin(), plan.phases.end(),
                                     [&](const Phase& ph) { return ph.grid[2] == plan.phases[0].grid[2]; });
  if (stacks_rows(p, sx, sizeof(scalar_t)) && one_width && lines >= kMinExtendedLines)
    for (Phase& ph : plan.phases)
      for (const Phase& q : plan.phases)
        if (q.r[0] == ph.r[0] && q.grid[1] > ph.grid[1]) ph.grid[1] = q.grid[1], extended = true;
  const std::vector<Phase>& phases = plan.phases;

  const auto same_shifts = [](const Phase& u, const Phase& v) {
    if (u.taps.size() != v.taps.size() || !std::equal(u.grid, u.grid + kMaxDims, v.grid)) return false;
    for (size_t t = 0; t < u.taps.size(); ++t)
      if (!std::equal(u.taps[t].offset, u.taps[t].offset + kMaxDims, v.taps[t].offset)) return false;
    return true;
  };
  std::vector<PhaseSet>& sets = plan.sets;
  for (size_t q = 0; q < phases.size(); ++q) {
    auto it = std::find_if(sets.begin(), sets.end(),
                           [&](const PhaseSet& set) { return same_shifts(phases[set.members[0]], phases[q]); });
    if (it == sets.end()) it = sets.insert(sets.end(), PhaseSet{});
    it->members.push_back(static_cast<int64_t>(q));
  }
  for (PhaseSet& set : sets) {
    const Phase& ph = phases[set.members[0]];
    set.taps = static_cast<int64_t>(ph.taps.size());
    set.out_rows = Cxg * static_cast<int64_t>(set.members.size());
    set.gt = cpu::gemm_tile<acc_t>(set.out_rows);
    set.block = std::max<int64_t>(
        1, std::min(Cyg, kColumnBytes / (set.gt.nr * std::max<int64_t>(1, set.taps) * int64_t(sizeof(acc_t)))));
    set.blocks = std::max<int64_t>(1, ceil_div(Cyg, set.block));  // (no channels: one empty block)
    if (use_amx<scalar_t>(Cyg, std::min(set.block, Cyg - (set.blocks - 1) * set.block) * set.taps))
      set.gt = cpu::gemm_tile_amx();
    set.a_size = cpu::packed_size(set.out_rows, set.block * set.taps, set.gt.mr);
    set.a_offset = plan.a_total;
    plan.a_total += p.groups * set.blocks * set.a_size;
    const int64_t rows = set.block * set.taps;
    const int64_t M = ph.grid[0] * ph.grid[1] * ph.grid[2];  // (per image)
    set.frame = make_frame(ph.taps, one, ph.grid);
    set.tile = tile_size(std::max(rows, set.out_rows), set.frame.positions, sizeof(acc_t), set.gt.nr);
    // (extended grids: every set framed, so that the plan takes grid tiles, whose teams form by grid)
    set.framed = extended || use_frame<scalar_t, acc_t>(set.frame, M, p.small, sy, set.block, set.tile, set.gt.nr);
    set.positions = set.framed ? set.frame.positions : M;
    if (!set.framed) set.tile = tile_size(std::max(rows, set.out_rows), M, sizeof(acc_t), set.gt.nr);
    const int64_t* off = ph.taps[0].offset;
    set.dense_source = !set.framed && set.taps == 1 && off[0] == 0 && off[1] == 0 && off[2] == 0 &&
                       std::equal(ph.grid, ph.grid + kMaxDims, p.small) && sy.dense_rows(p.small);
  }
  // Grid tiles wherever every set is framed: a frame's points off the grid (a pad row and column per padded dim:
  // 12% of a 16 x 16 grid's frame) and each image's last tile rounded up to whole panels are then not computed;
  // and teams form by grid, not by frame, so the phases of sets with different frames are stored together.
  // Measured against frame tiles (forward, in one process): DCGAN x0.82 time, MONAI k=3 x0.84, dilated 3d x0.55,
  // stride-1 3d x0.68, the anisotropic seed layer x0.83, grouped 2d x0.93; k=4 3d, U-Net k=2, HiFi-GAN x0.98-1.0.
  // 16-bit layers: a 1-tap set whose source is its frame (which float layers read in place, so frame) is framed
  // where other sets are, so that the plan takes grid tiles and its phases are stored with theirs. (MONAI k=3,
  // bfloat16: its 1-tap phase alone unframed left every phase to its own strided stores, a fifth of the time.)
  if constexpr (is_float16<scalar_t, acc_t>) {
    if (std::any_of(sets.begin(), sets.end(), [](const PhaseSet& set) { return set.framed; }))
      for (PhaseSet& set : sets)
        if (!set.framed && source_is_frame(set.frame, p.small, sy)) {
          set.framed = true, set.dense_source = false;
          set.positions = set.frame.positions;
        }
  }
  plan.grid_tiles = grid_tiles && !sets.empty() &&
                    std::all_of(sets.begin(), sets.end(), [](const PhaseSet& set) { return set.framed; });
  std::vector<bool> in_place(sets.size(), false);  // (grid tiles: the set's windows are its source, not gathered)
  for (size_t si = 0; si < sets.size(); ++si) {
    PhaseSet& set = sets[si];
    const int64_t* grid = phases[set.members[0]].grid;
    std::copy(grid, grid + kMaxDims, set.layout);
    if (!plan.grid_tiles) {
      if (set.framed) std::copy(set.frame.ext, set.frame.ext + kMaxDims, set.layout);
    } else {
      in_place[si] = std::is_same_v<scalar_t, acc_t> && source_is_frame(set.frame, p.small, sy);
      set.layout[2] = grid_lines<acc_t>(set.frame, grid, set.out_rows, set.gt, in_place[si]);
    }
  }
  for (PhaseSet& set : sets) {
    if (plan.grid_tiles) {
      // Sets of one grid whose frames' lines differ would not form a team (stores of single phases, strided): they
      // take the longest of their lines where all of them gather their windows, else the grid's lines. (8-channel 8 x
      // 8 layer, stride 2: op call 13.4 -> 12.2 us.) A set's points past its own frame's lines read the next line's
      // window points, and are computed and dropped as pad points are; a source read in place has nothing past its
      // last line. Then every panel of the lines is one run of the windows (the seed k=3, s=2 forward, phases r2 = 0 of
      // 102-point frame lines, r2 = 1 of 101: x0.98 time against 101, whose panels across lines took two runs).
      const int64_t* grid = phases[set.members[0]].grid;
      int64_t longest = 0;
      bool gathered = true, differ = false;
      for (size_t u = 0; u < sets.size(); ++u)
        if (std::equal(grid, grid + kMaxDims, phases[sets[u].members[0]].grid)) {
          longest = std::max(longest, sets[u].layout[2]);
          gathered = gathered && !in_place[u];
          differ = differ || sets[u].layout[2] != set.layout[2];
        }
      if (differ) set.layout[2] = gathered ? longest : grid[2];
      set.positions = p.batch * set.layout[0] * set.layout[1] * set.layout[2];
    }
    plan.max_rows = std::max(plan.max_rows, set.block * set.taps);
    plan.flops += 2 * set.out_rows * Cyg * set.taps * set.positions;
  }
  std::vector<Team>& teams = plan.teams;
  for (size_t si = 0; si < sets.size(); ++si) {
    const PhaseSet& set = sets[si];
    const int64_t* grid = phases[set.members[0]].grid;
    auto it = std::find_if(teams.begin(), teams.end(), [&](const Team& team) {
      const PhaseSet& u = sets[team.sets[0]];
      const int64_t* u_grid = phases[u.members[0]].grid;
      // (grid tiles: a team takes sets while its results for tiles of kTeamTile points fit kColumnBytes)
      const int64_t tile = plan.grid_tiles ? kTeamTile : set.tile;
      return u.framed == set.framed && (plan.grid_tiles || u.tile == set.tile) && u.positions == set.positions &&
             std::equal(set.layout, set.layout + kMaxDims, u.layout) && std::equal(grid, grid + kMaxDims, u_grid) &&
             (team.out_rows + set.out_rows) * tile * int64_t(sizeof(acc_t)) <= kColumnBytes;
    });
    if (it == teams.end()) it = teams.insert(teams.end(), Team{});
    it->sets.push_back(static_cast<int64_t>(si));
    it->phases.insert(it->phases.end(), set.members.begin(), set.members.end());
    it->out_rows += set.out_rows;
  }
  // Grid tiles: a team's tile is as long as its results fit kColumnBytes, but short enough for every thread to have
  // about kJobsPerThread jobs (grid_tile; a layer of a few long tiles on 2 threads: one waited a third of the
  // time).
  for (Team& team : teams) {
    if (plan.grid_tiles) {
      const PhaseSet& lead = sets[team.sets[0]];
      const int64_t tile = grid_tile(lead.positions, kColumnBytes / (team.out_rows * int64_t(sizeof(acc_t))),
                                     p.groups, int64_t(teams.size()), lead.gt.nr);
      for (int64_t si : team.sets) sets[si].tile = tile;
    }
    share_windows(team, sets, phases, p, plan.grid_tiles);
    plan.max_out = std::max(plan.max_out, team.out_rows);
    plan.max_tile = std::max(plan.max_tile, sets[team.sets[0]].tile);
    team.store_groups = cpu::store_groups(phases, team.phases, sx);
    stack_groups(p, phases, sx, sizeof(scalar_t), team);
  }
  // Grid tiles: a tile's window of Y runs `win_span` points past it (a plane and a line, for taps that differ in
  // dims 0 and 1), so where that is longer than the tile a job takes several tiles, whose windows are gathered once:
  // about span / tile of them, but at least kMinGridJobs jobs per thread, and windows within half kWindowBytes. The
  // seed k=3, s=2 layer's windows of 992-point tiles were 6.4 times as long; 6 tiles a job: forward x0.97 time (5
  // pairs, alternated builds; its window gathers from 5.6% to 3.7% of it), the anisotropic seed layer x0.97.
  for (Team& team : teams) {
    const PhaseSet& lead = sets[team.sets[0]];
    if (!plan.grid_tiles || !team.shared || lead.blocks > 1 || team.win_span <= lead.tile) continue;
    const int64_t threads = at::get_num_threads(), tiles = p.groups * ceil_div(lead.positions, lead.tile);
    const int64_t bytes = lead.block * int64_t(lead.frame.planes.size() * sizeof(acc_t));
    team.tiles = std::max<int64_t>(1, std::min(ceil_div(team.win_span, lead.tile), tiles / (kMinGridJobs * threads)));
    while (team.tiles > 1 && bytes * (team.tiles * lead.tile + 2 * team.win_span) > kWindowBytes / 2) --team.tiles;
  }
  std::vector<TransposeJob>& jobs = plan.jobs;
  for (size_t ti = 0; ti < teams.size(); ++ti) {
    const PhaseSet& set = sets[teams[ti].sets[0]];
    const int64_t step = set.tile * teams[ti].tiles;
    for (int64_t m0 = 0; m0 < set.positions; m0 += step)
      jobs.push_back({static_cast<int64_t>(ti), m0, std::min(set.positions, m0 + step)});
  }
  if (plan.grid_tiles) {
    // the longest window of a tile's images (grid_windows); too long for the window budget: frame tiles after all
    for (const TransposeJob& job : jobs) {
      const Team& team = teams[job.team];
      for (int64_t si : team.sets) {
        const PhaseSet& set = sets[si];
        if (std::is_same_v<scalar_t, acc_t> && source_is_frame(set.frame, p.small, sy)) continue;  // (read in place)
        const int64_t lo = team.shared ? team.win_lo : set.frame.min_off;
        const int64_t span = team.shared ? team.win_span : set.frame.span;
        int64_t len = 0;
        for_each_image(set.layout, job.m0, job.m1, [&](int64_t, int64_t a, int64_t b, int64_t) {
          len += grid_window(set.frame, set.layout, a, b, lo, span).second;
        });
        if (set.block * int64_t(set.frame.planes.size()) * len * int64_t(sizeof(acc_t)) > kWindowBytes)
          return make_transpose_plan<scalar_t>(p, sy, sx, false);
      }
    }
  }
  // Tiles at the same relative place in every team run one after another: the phases interleave in the output,
  // so a region is finished while its lines are cached.
  const auto extent = [&](const TransposeJob& job) { return sets[teams[job.team].sets[0]].positions; };
  std::stable_sort(jobs.begin(), jobs.end(), [&](const TransposeJob& u, const TransposeJob& v) {
    return u.m0 * extent(v) < v.m0 * extent(u);
  });

  if (plan.grid_tiles)
    for (PhaseSet& set : sets) line_classes(p, phases[set.members[0]], set, plan.a_total);
  for (size_t si = 0; si < sets.size(); ++si)
    for (size_t c = 0; c < sets[si].subsets.size(); ++c) plan.classes.emplace_back(si, c);

  plan.source.resize(sets.size());
  plan.first_item.assign(sets.size() + 1, 0);
  for (size_t si = 0; si < sets.size(); ++si) {
    const PhaseSet& set = sets[si];
    const int64_t MR = set.gt.mr, rows = ceil_div(set.out_rows, MR) * MR;
    std::vector<int64_t>& source = plan.source[si];
    source.assign(set.taps * rows, -1);
    for (int64_t t = 0; t < set.taps; ++t)
      for (int64_t row = 0; row < set.out_rows; ++row)
        source[t * rows + row] = phases[set.members[row / Cxg]].taps[t].k + (row % Cxg) * K;
    plan.first_item[si + 1] = plan.first_item[si] + (Cxg % MR == 0 ? Cxg / MR : rows / MR);
  }
  return plan;
}

// The plan of a geometry, from the calling thread's plans of its recent geometries: a layer called again (every
// step of a training loop, every forward of a model) skips the planning, which costs more than a small layer's
// arithmetic (an 8-channel 8x8 layer: ~10 us of a 36 us call). The plan depends on the geometry, the input's
// strides and the output's, the thread count (tile sizes; the dtype picks the function) and AMX use; kPlanCache
// of them, least recently used dropped.
constexpr size_t kPlanCache = 32;

template <typename scalar_t>
std::shared_ptr<const TransposePlan> transpose_plan(const ConvParams& p, const Strides& sy, const Strides& sx) {
  using Key = std::array<int64_t, 10 + 8 * kMaxDims>;
  Key key{p.dims, 2 * at::get_num_threads() + cpu::bf16_dot(), p.batch, p.groups, p.big_channels,
          p.small_channels, sy.n, sy.c, sx.n, sx.c};
  int64_t* k = key.data() + 10;
  for (int d = 0; d < kMaxDims; ++d) {
    for (const int64_t v : {p.big[d], p.small[d], p.kernel[d], p.stride[d], p.padding[d], p.dilation[d]}) *k++ = v;
    *k++ = sy.s[d], *k++ = sx.s[d];
  }
  thread_local std::vector<std::pair<Key, std::shared_ptr<const TransposePlan>>> cache;  // most recent first
  auto it = std::find_if(cache.begin(), cache.end(), [&](const auto& entry) { return entry.first == key; });
  if (it == cache.end()) {
    if (cache.size() == kPlanCache) cache.pop_back();
    cache.emplace(cache.begin(), key, std::make_shared<const TransposePlan>(make_transpose_plan<scalar_t>(p, sy, sx)));
  } else {
    std::rotate(cache.begin(), it, it + 1);
  }
  return cache.front().second;
}

// A job of a grid-tiled plan: the results of the team's sets for the grid points [job.m0, job.m1) over the batch,
// one set after another in `out` (set.out_rows x count each), handed to store(tile) a tile at a time (a job of
// Team::tiles tiles gathers its windows once, then multiplies and stores tile after tile). The same sums, in the same
// order, as the frame tiles, less the products with the frame's zeros that line classes skip.
template <typename scalar_t, typename acc_t, typename Operand, typename Store>
void grid_tile_job(const ConvParams& p, const TransposePlan& plan, const Team& team, const TransposeJob& job,
                   int64_t g, const scalar_t* y_g, const Strides& sy, const Operand& operand, acc_t* out,
                   const Store& store) {
  const std::vector<PhaseSet>& sets = plan.sets;
  const int64_t Cyg = p.small_group();
  thread_local std::vector<int64_t> cols;
  // The GEMM of a set over the job's points [m0, m1) from windows `win`: by runs of lines of one class
  // (PhaseSet::line_class), each over the taps that read Y there.
  const auto gemm = [&](const PhaseSet& set, const Windows<acc_t>& win, int64_t channels, int64_t bi, int64_t m0,
                        int64_t m1, acc_t* result) {
    const int64_t cnt = m1 - m0;
    const int64_t* at = cols.data() + (m0 - job.m0);
    if (set.line_class.empty())
      return frame_gemm_windows<acc_t>(set.frame, win, channels, cnt, set.gt, set.out_rows, operand(set, g, bi), bi > 0,
                                       result, cnt, nullptr, 0, at);
    const int64_t width = set.layout[2], lines = set.layout[0] * set.layout[1];
    const auto line_class = [&](int64_t j) { return set.line_class[(m0 + j) / width % lines]; };
    for (int64_t j0 = 0, j1; j0 < cnt; j0 = j1) {
      const int64_t cls = line_class(j0);
      j1 = std::min(cnt, j0 + width - (m0 + j0) % width);
      while (j1 < cnt && line_class(j1) == cls) j1 = std::min(cnt, j1 + width);
      if (cls == -2) {
        for (int64_t r = 0; bi == 0 && r < set.out_rows; ++r)
          std::fill(result + r * cnt + j0, result + r * cnt + j1, acc_t(0));
        continue;
      }
      frame_gemm_windows<acc_t>(set.frame, win, channels, j1 - j0, set.gt, set.out_rows, operand(set, g, bi, cls),
                                bi > 0, result + j0, cnt, nullptr, 0, at + j0, cls < 0 ? nullptr : &set.subsets[cls]);
    }
  };
  const PhaseSet& lead = sets[team.sets[0]];
  if (team.shared) {  // one gather of windows for every set
    for (int64_t bi = 0; bi < lead.blocks; ++bi) {
      const int64_t channels = std::min(lead.block, Cyg - bi * lead.block);
      const Windows<acc_t> win =
          grid_windows<scalar_t, acc_t>(lead.frame, lead.layout, y_g + bi * lead.block * sy.c, sy.n, channels,
                                        p.small, sy, job.m0, job.m1, team.win_lo, team.win_span, cols);
      // (a job of several tiles has one depth block: make_transpose_plan)
      for (int64_t m0 = job.m0; m0 < job.m1; m0 += lead.tile) {
        const int64_t m1 = std::min(job.m1, m0 + lead.tile);
        acc_t* result = out;
        for (int64_t si : team.sets) {
          const PhaseSet& set = sets[si];
          const int64_t shift = set.frame.min_off - lead.frame.min_off;  // (win.data is at the lead's min_off)
          gemm(set, Windows<acc_t>{win.data + shift, win.channel_stride, win.plane_stride, 0}, channels, bi, m0, m1,
               result);
          result += set.out_rows * (m1 - m0);
        }
        if (bi == lead.blocks - 1) store(TransposeJob{job.team, m0, m1});
      }
    }
    return;
  }
  acc_t* result = out;
  for (int64_t si : team.sets) {
    const PhaseSet& set = sets[si];
    for (int64_t bi = 0; bi < set.blocks; ++bi) {
      const int64_t channels = std::min(set.block, Cyg - bi * set.block);
      const Windows<acc_t> win =
          grid_windows<scalar_t, acc_t>(set.frame, set.layout, y_g + bi * set.block * sy.c, sy.n, channels, p.small,
                                        sy, job.m0, job.m1, set.frame.min_off, set.frame.span, cols);
      gemm(set, win, channels, bi, job.m0, job.m1, result);
    }
    result += set.out_rows * (job.m1 - job.m0);
  }
  store(job);
}

// Stores a grid-tiled job's results (grid_tile_job) image by image, the team's interleaving phases together.
template <typename scalar_t, typename acc_t>
void grid_tile_store(const ConvParams& p, const TransposePlan& plan, const Team& team, const TransposeJob& job,
                     const acc_t* out, const acc_t* bias, scalar_t* x_g, const Strides& sx, bool stream) {
  const int64_t Cxg = p.big_group(), cnt = job.m1 - job.m0;
  const PhaseSet& lead = plan.sets[team.sets[0]];
  const int64_t* grid = plan.phases[lead.members[0]].grid;
  for_each_image(lead.layout, job.m0, job.m1, [&](int64_t n, int64_t a, int64_t b, int64_t j) {
    scalar_t* x_n = x_g + n * sx.n;
    const std::vector<std::vector<int64_t>>& groups = team.store_groups;
    for (size_t i = 0, k = 0; k < team.stacks.size(); i += team.stacks[k++]) {
      const std::vector<int64_t>& grp = groups[i];
      const int64_t* r = plan.phases[team.phases[grp[0]]].r;
      const acc_t* rows[cpu::kMaxStoreWays];
      for (size_t w = 0; w < grp.size(); ++w) rows[w] = out + grp[w] * Cxg * cnt + j;
      const int64_t layers = team.stacks[k];
      if (grp.size() == 1 && layers == 1) {
        store_rows(rows[0], cnt, Cxg, bias, x_n, sx, p.stride, r, own_grid(p, r, grid).data(), a, b, lead.layout,
                   stream);
      } else {
        int64_t shift[kMaxStack];
        for (int64_t l = 0; l < layers; ++l) shift[l] = (groups[i + l][0] - grp[0]) * Cxg * cnt;
        store_rows_interleaved(rows, grp.size(), cnt, Cxg, bias, x_n, sx, p.stride, r, grid, a, b, lead.layout,
                               stream, p.big, layers, shift);
      }
    }
  });
}

template <typename scalar_t>
void conv_transpose_kernel(const ConvParams& p, const scalar_t* y, const Strides& sy, const scalar_t* w,
                           const scalar_t* bias, scalar_t* x, const Strides& sx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = p.groups, Cxg = p.big_group(), Cyg = p.small_group(), K = p.kernel_numel();
  if constexpr (std::is_same_v<scalar_t, float>) {
    cpu::WinogradLayer wl;
    if (winograd_layer(p, true, wl) && cpu::winograd_correlation(wl, y, sy, w, bias, x, sx)) return;
    if (cpu::winograd_upsample(wl, p.stride[2], p.padding[2], y, sy, w, bias, x, sx)) return;
  } else if constexpr (sizeof(scalar_t) == 2) {
    if (winograd16(p, true, y, sy, w, bias, x, sx)) return;
  }
  std::vector<acc_t> b_store;
  const acc_t* ba = bias ? as_acc(bias, p.big_channels, b_store) : nullptr;
  const int64_t zero[kMaxDims] = {0, 0, 0}, one[kMaxDims] = {1, 1, 1};
  const std::shared_ptr<const TransposePlan> plan_ptr = transpose_plan<scalar_t>(p, sy, sx);
  const TransposePlan& plan = *plan_ptr;
  const std::vector<Phase>& phases = plan.phases;

  if (!plan.all_covered) {  // big positions that no tap reaches hold the bias alone
    const int64_t grid[kMaxDims] = {p.big[0], p.big[1], p.big[2]};
    const int64_t plane = p.big[1] * p.big[2];  // an item: one (n, c, i0) plane
    at::parallel_for(0, p.batch * p.big_channels * p.big[0], grain(plane), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t nc = item / p.big[0], i0 = item % p.big[0];
        const int64_t n = nc / p.big_channels, c = nc % p.big_channels;
        store_rows<scalar_t, acc_t>(nullptr, 0, 1, ba ? ba + c : nullptr, x + n * sx.n + c * sx.c, sx, one, zero, grid,
                                    i0 * plane, (i0 + 1) * plane);
      }
    });
  }

  if (plan.direct) return conv_transpose_direct(p, phases, y, sy, w, ba, x, sx);
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // (strided layers: where every phase has 4 taps or more. Against the GEMM path, forward: k=4, s=2 3d x0.82 time,
    // 2d x0.87, k=5, s=2 3d x0.80, the anisotropic seed layer x0.65; phases of 1 or 2 taps lose on their stores, one
    // pass per phase instead of the GEMM path's interleaved ones: k=3, s=2 (MONAI) x1.1, grouped 2d x1.9, k == s x2.4)
    const bool stride1 = p.stride[0] == 1 && p.stride[1] == 1 && p.stride[2] == 1 && phases.size() == 1;
    const bool deep = std::all_of(phases.begin(), phases.end(), [](const Phase& ph) { return ph.taps.size() >= 4; });
    if ((stride1 || deep) && cpu::amx_bf16()) {
      const AmxTapsLayer layer{p.batch, G, Cyg, Cxg, K, p.small, one, p.stride, Cyg * Cxg * K, K, Cxg * K};
      if (amx_taps(layer, phases, y, sy, w, ba, x, sx)) return;
    }
  }

  const std::vector<PhaseSet>& sets = plan.sets;
  const std::vector<Team>& teams = plan.teams;
  const std::vector<TransposeJob>& jobs = plan.jobs;
  std::unique_ptr<acc_t[]> a_fresh;
  acc_t* const a_all = held_buffer<acc_t, kWeightSlot>(plan.a_total, a_fresh);
  // the packed A of (group, depth block), or of a line class's taps (PhaseSet::line_class)
  const auto operand = [&](const PhaseSet& set, int64_t g, int64_t bi, int64_t cls = -1) {
    return cls < 0 ? a_all + set.a_offset + (g * set.blocks + bi) * set.a_size
                   : a_all + set.sub_offset[cls] + (g * set.blocks + bi) * set.sub_size[cls];
  };

  // Pack A for every set in parallel, megabytes of weights for wide layers. A work item is a panel, or, where MR
  // divides Cxg, the members' panels over the same MR output channels (which read the same weights); it walks the
  // input channels in order, so every panel is written front to back and each weight line is read once per set.
  // (Items of one input channel, writing 64 bytes to every panel 32 KiB apart, thrashed the caches.) The same
  // pass checks that the weights in use are finite (v - v is 0 for a finite v, else NaN).
  // Items cover `chunk` input channels at a time, every item of a chunk in turn:
  // a thread reads the chunk's weights (contiguous, within kPackChunkBytes) from memory once and from L2 for the
  // rest, and the panels take runs of chunk x taps x MR values. (Walking all input channels a panel, every read of
  // HiFi-GAN's 8 MiB of weights was 16 KiB past the last, a page a read: 13% of its AVX2 forward.) AMX panels are
  // rewritten as tiles once whole, so there an item walks all input channels.
  std::atomic<bool> finite{true};
  const int64_t items = plan.first_item.back();
  const bool any_amx = std::any_of(sets.begin(), sets.end(), [](const PhaseSet& set) { return set.gt.amx; });
  const int64_t chunk =
      any_amx ? Cyg : std::clamp<int64_t>(kPackChunkBytes / (Cxg * K * int64_t(sizeof(scalar_t))), 1, Cyg);
  const int64_t chunks = ceil_div(Cyg, chunk);
  // (a task packs at least kMinTaskFlops / 128 weights, ~16K, about as long as kMinTaskFlops of GEMM: the grain
  // was once the whole weight's size per item, which left MONAI's 55K weights to one thread)
  const int64_t per_item = ceil_div(Cyg * Cxg * K, std::max<int64_t>(1, items * chunks));
  at::parallel_for(0, G * chunks * items, grain(128 * per_item), [&](int64_t begin, int64_t end) {
    bool ok = true;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / (chunks * items), c0 = item / items % chunks * chunk, i = item % items;
      const int64_t c1 = std::min(Cyg, c0 + chunk);
      if (chunk < Cyg && (item == begin || i == 0)) {  // (the chunk's weights, in order: the items read them from L2)
        const char* from = reinterpret_cast<const char*>(w + (g * Cyg + c0) * Cxg * K);
        const int64_t bytes = (c1 - c0) * Cxg * K * int64_t(sizeof(scalar_t));
        for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(from + byte);
      }
      const int64_t si = std::upper_bound(plan.first_item.begin(), plan.first_item.end(), i) - plan.first_item.begin() - 1;
      const PhaseSet& set = sets[si];
      const int64_t MR = set.gt.mr, T = set.taps, rows = ceil_div(set.out_rows, MR) * MR, q = i - plan.first_item[si];
      const bool by_channels = Cxg % MR == 0;
      const int64_t panels = by_channels ? static_cast<int64_t>(set.members.size()) : 1;
      // The item's panels as segments of rows of one member, consecutive output channels (by channels: a whole panel
      // each; else a panel that crosses members, as AVX2's MR = 6 rows do on 256 channels, in up to MR pieces): a
      // segment's row l of tap t is the weight K after its row l - 1's, from first[segment*T + t] on, so one loop of
      // a fixed stride copies it (HiFi-GAN's AVX2 panels, 6 rows over 4 members of 256 channels, packed element by
      // element through the table below took 13% of its forward)
      constexpr int64_t kMaxFirst = 1024;
      struct Segment {
        int64_t r0, width;  // the segment's rows [r0, r0 + width) of the set's
        int64_t at;  // 16-bit weights: where the rows' weights (width x K) start in `wide`
      };
      Segment segments[kMaxFirst];
      int64_t first[kMaxFirst], n_segments = 0;
      // (half weights: the item's weights of each input channel are widened into `wide` first, from which first[]
      // counts: by channels one MR x K block for all panels, else each segment's rows; x0.3 time against value by
      // value through the table. bfloat16 weights are read as they are, a float being its bits shifted up: widening
      // all K taps for a set of T of them took 5-7% of the DCGAN bfloat16 forward on AVX512-BF16)
      constexpr bool kWide = is_float16<scalar_t, acc_t> && std::is_same_v<scalar_t, c10::Half>;
      constexpr bool kBf16 = is_float16<scalar_t, acc_t> && std::is_same_v<scalar_t, c10::BFloat16>;
      const bool gather = (std::is_same_v<scalar_t, float> || kWide || kBf16) && std::is_same_v<acc_t, float> &&
                          panels * T <= kMaxFirst && MR * T <= kMaxFirst;
      int64_t wide_size = kWide && by_channels ? ceil_div(MR * K, 16) * 16 : 0;
      for (int64_t j = 0; gather && j < panels; ++j) {
        const int64_t p0 = by_channels ? j * Cxg + q * MR : q * MR, p1 = std::min(p0 + MR, set.out_rows);
        for (int64_t r = p0, e; r < p1; r = e) {
          e = std::min(p1, (r / Cxg + 1) * Cxg);
          segments[n_segments++] = {r, e - r, by_channels ? 0 : wide_size};
          if (kWide && !by_channels) wide_size += ceil_div((e - r) * K, 16) * 16;
        }
      }
      acc_t* const wide = kWide && gather ? scratch<acc_t, 0>(wide_size) : nullptr;
      for (int64_t v = 0; v < n_segments; ++v) {
        const int64_t shift = kWide ? segments[v].r0 % Cxg * K - segments[v].at : 0;
        for (int64_t t = 0; t < T; ++t) first[v * T + t] = plan.source[si][t * rows + segments[v].r0] - shift;
      }
      for (int64_t cy = c0, bi = c0 / set.block; cy < c1; ++cy) {
        if (cy == (bi + 1) * set.block) ++bi;
        const int64_t depth = std::min(set.block, Cyg - bi * set.block) * T;
        const scalar_t* src = w + (g * Cyg + cy) * Cxg * K;
        acc_t* base = operand(set, g, bi) + (cy - bi * set.block) * T * MR;
        if (chunk == Cyg && by_channels && cy + kPackAhead < c1) {
          // The item's weights of input channel cy + kPackAhead (MR x K, contiguous): too far apart for the
          // hardware prefetcher, so each channel's lines would arrive one cache miss at a time.
          const char* next = reinterpret_cast<const char*>(src + kPackAhead * Cxg * K + q * MR * K);
          const int64_t bytes = MR * K * int64_t(sizeof(scalar_t));
          for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(next + byte);
        }
        if constexpr (kWide) {
          // (one panel of one row: the weights in order)
          const auto widen = [&](int64_t from, int64_t count, int64_t at) {
            cpu::widen16_panels(reinterpret_cast<const uint16_t*>(src) + from, 0, 1, count,
                                ceil_div(count, 16) * 16, wide + at, std::is_same_v<scalar_t, c10::BFloat16>);
          };
          if (gather && by_channels) widen(q * MR * K, MR * K, 0);
          for (int64_t v = 0; gather && !by_channels && v < n_segments; ++v)
            widen(segments[v].r0 % Cxg * K, segments[v].width * K, segments[v].at);
        }
        if constexpr (std::is_same_v<acc_t, float> && (std::is_same_v<scalar_t, float> || kWide || kBf16)) {
          if (gather) {
            const auto value = [&](int64_t at) {  // (bfloat16: its bits shifted up, c10's conversion)
              if constexpr (kWide) return wide[at];
              else return static_cast<float>(src[at]);
            };
            uint32_t bad = 0;  // exponent bits all ones (inf or NaN) in any value; (a float sum of v - v, a chain of
                               // dependent adds, took 3 times as long)
            for (int64_t v = 0; v < n_segments; ++v) {
              const int64_t r = segments[v].r0, width = segments[v].width;
              float* dst = base + (r - r % MR) * depth + r % MR;
              for (int64_t t = 0; t < T; ++t, dst += MR)
                for (int64_t l = 0, at = first[v * T + t]; l < width; ++l, at += K) {
                  const float e = value(at);
                  dst[l] = e;
                  uint32_t u;
                  std::memcpy(&u, &e, sizeof(u));
                  bad |= (u & 0x7f800000u) == 0x7f800000u;
                }
            }
            ok &= bad == 0;
            // (rows past the set's: zeros)
            for (int64_t r = std::max(q * MR, set.out_rows); !by_channels && r < (q + 1) * MR; ++r)
              for (int64_t t = 0; t < T; ++t) base[(q * MR) * depth + t * MR + r - q * MR] = acc_t(0);
            continue;
          }
        }
        for (int64_t j = 0; j < panels; ++j) {
          const int64_t r0 = by_channels ? j * Cxg + q * MR : q * MR;
          acc_t* dst = base + r0 * depth;
          for (int64_t t = 0; t < T; ++t, dst += MR) {
            const int64_t* at = plan.source[si].data() + t * rows + r0;
            for (int64_t l = 0; l < MR; ++l) {
              const acc_t v = at[l] < 0 ? acc_t(0) : static_cast<acc_t>(src[at[l]]);
              dst[l] = v;
              ok &= v - v == acc_t(0);
            }
          }
        }
      }
      if (set.gt.amx)  // (AMX: the item's panels, whole now, rewritten as tiles while they are in cache)
        for (int64_t j = 0; j < panels; ++j)
          for (int64_t bi = 0; bi < set.blocks; ++bi) {
            const int64_t r0 = by_channels ? j * Cxg + q * MR : q * MR;
            const int64_t depth = std::min(set.block, Cyg - bi * set.block) * T;
            amx_pack(operand(set, g, bi) + r0 * depth, MR, depth);
          }
    }
    if (!ok) finite = false;
  });
  // Non-finite weights: the GEMM's padding (frame points, zero rows) would turn 0 * inf into NaN in outputs
  // that the reference leaves finite, so the direct kernel, which multiplies only real contributions, takes over.
  if (!finite) return conv_transpose_direct(p, own_grids(p, phases), y, sy, w, ba, x, sx);
  // The line classes' operands: their taps' rows of each set's A, copied (an item: one class of one group).
  const std::vector<std::pair<int64_t, int64_t>>& classes = plan.classes;
  const int64_t class_items = G * static_cast<int64_t>(classes.size());
  at::parallel_for(0, class_items, grain(std::max<int64_t>(1, 16 * plan.a_total / std::max<int64_t>(1, class_items))),
                   [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [si, c] = classes[item / G];
      const int64_t g = item % G;
      const PhaseSet& set = sets[si];
      const std::vector<int64_t>& taps = set.subsets[c];
      const int64_t MR = set.gt.mr, T = set.taps, S = static_cast<int64_t>(taps.size());
      for (int64_t bi = 0; bi < set.blocks; ++bi) {
        const int64_t channels = std::min(set.block, Cyg - bi * set.block);
        const acc_t* a = operand(set, g, bi);
        acc_t* sub = operand(set, g, bi, c);
        for (int64_t q = 0; q < ceil_div(set.out_rows, MR); ++q)
          for (int64_t cy = 0; cy < channels; ++cy)
            for (int64_t i = 0; i < S; ++i)
              std::copy_n(a + (q * channels * T + cy * T + taps[i]) * MR, MR,
                          sub + (q * channels * S + cy * S + i) * MR);
      }
    }
  });
  const int64_t J = static_cast<int64_t>(jobs.size());

  // (grid tiles: a job covers all images, and its flops are the whole batch's share)
  const int64_t images = plan.grid_tiles ? 1 : p.batch;
  // Outputs of kStreamBytes or more are written with non-temporal stores where the kernel writes dense runs (of
  // interleaved phases, or float rows of one phase): no read of each output line before it is written (fresh
  // memory, or not in cache anyway), at the cost of the output not being left in cache. Measured: 3d U-Net k=2 (8
  // and 128 MiB outputs) x0.77 and x0.73 time, DCGAN (16 MiB) x0.97; rows of one phase (stride 1 innermost), the
  // anisotropic seed layer (27 MiB) x0.96.
  const bool stream = p.batch * p.big_channels * p.big_spatial() * int64_t(sizeof(scalar_t)) >= kStreamBytes;
  parallel_items(images * G * J, grain(plan.flops / std::max<int64_t>(1, J)), [&](int64_t begin, int64_t end) {
    acc_t* col =
        plan.grid_tiles ? nullptr : scratch<acc_t, 0>(cpu::packed_size(plan.max_tile, plan.max_rows, sets[0].gt.nr));
    acc_t* out = scratch<acc_t, 1>(plan.max_out * plan.max_tile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (G * J), g = item / J % G;
      const TransposeJob& job = jobs[item % J];
      const Team& team = teams[job.team];
      const int64_t cnt = job.m1 - job.m0;
      const scalar_t* y_g = y + n * sy.n + g * Cyg * sy.c;
      if (plan.grid_tiles) {
        grid_tile_job<scalar_t, acc_t>(p, plan, team, job, g, y + g * Cyg * sy.c, sy, operand, out,
                                       [&](const TransposeJob& tile) {
          grid_tile_store<scalar_t, acc_t>(p, plan, team, tile, out, ba ? ba + g * Cxg : nullptr, x + g * Cxg * sx.c,
                                           sx, stream);
        });
        continue;
      }
      if (team.shared) {  // (the same sums, in the same order, as below)
        const PhaseSet& lead = sets[team.sets[0]];
        for (int64_t bi = 0; bi < lead.blocks; ++bi) {
          const int64_t channels = std::min(lead.block, Cyg - bi * lead.block);
          const int64_t len = ceil_div(cnt, lead.gt.nr) * lead.gt.nr + team.win_span;
          const Windows<acc_t> win = frame_windows<scalar_t, acc_t>(lead.frame, y_g + bi * lead.block * sy.c, channels,
                                                                    p.small, sy, job.m0 + team.win_lo, len);
          acc_t* result = out;  // the team's sets' results, one after another
          for (int64_t si : team.sets) {
            const PhaseSet& set = sets[si];
            const int64_t shift = set.frame.min_off - team.win_lo;
            const Windows<acc_t> view{win.data + shift, win.channel_stride, win.plane_stride, win.limit - shift};
            frame_gemm_windows(set.frame, view, channels, cnt, set.gt, set.out_rows, operand(set, g, bi), bi > 0,
                               result, cnt, col, plan.max_tile);
            result += set.out_rows * cnt;
          }
        }
      } else {
        acc_t* result = out;  // the team's sets' results, one after another
        for (int64_t si : team.sets) {
          const PhaseSet& set = sets[si];
          const Phase& first = phases[set.members[0]];
          for (int64_t bi = 0; bi < set.blocks; ++bi) {
            const int64_t channels = std::min(set.block, Cyg - bi * set.block), depth = channels * set.taps;
            const acc_t* a = operand(set, g, bi);
            if (set.framed) {
              frame_gemm(set.frame, y_g + bi * set.block * sy.c, channels, p.small, sy, job.m0, cnt, set.gt,
                         set.out_rows, a, bi > 0, result, cnt, col, plan.max_tile);
            } else {
              const scalar_t* y_b = y_g + bi * set.block * sy.c;
              if constexpr (is_float16<scalar_t, acc_t>) {
                if (set.dense_source) {  // (one tap at the grid points of a dense Y: Y's own lines, widened)
                  cpu::widen16_panels(reinterpret_cast<const uint16_t*>(y_b) + job.m0, sy.c, channels, cnt,
                                      set.gt.nr, col, std::is_same_v<scalar_t, c10::BFloat16>);
                }
              }
              if (!is_float16<scalar_t, acc_t> || !set.dense_source)
                gather_columns(y_b, channels, p.small, sy, first.taps, one, first.grid, job.m0, job.m1, col,
                               ColumnLayout{depth, set.gt.nr, 0});
              cpu::gemm_packed<acc_t>(set.gt, set.out_rows, cnt, depth, a, col, bi > 0, result, cnt);
            }
          }
          result += set.out_rows * cnt;
        }
      }
      const PhaseSet& lead = sets[team.sets[0]];
      const int64_t* grid = phases[lead.members[0]].grid;
      const int64_t* frame = lead.framed ? lead.frame.ext : nullptr;
      const acc_t* b_g = ba ? ba + g * Cxg : nullptr;
      scalar_t* x_g = x + n * sx.n + g * Cxg * sx.c;
      for (const std::vector<int64_t>& grp : team.store_groups) {
        const int64_t* r = phases[team.phases[grp[0]]].r;
        if (grp.size() == 1) {
          store_rows(out + grp[0] * Cxg * cnt, cnt, Cxg, b_g, x_g, sx, p.stride, r, own_grid(p, r, grid).data(),
                     job.m0, job.m1, frame ? frame : grid, stream);
        } else {
          const acc_t* rows[cpu::kMaxStoreWays];
          for (size_t w = 0; w < grp.size(); ++w) rows[w] = out + grp[w] * Cxg * cnt;
          store_rows_interleaved(rows, grp.size(), cnt, Cxg, b_g, x_g, sx, p.stride, r, grid, job.m0, job.m1, frame,
                                 stream, p.big);
        }
      }
    }
    if (stream) cpu::stream_fence();  // (this thread's streamed output, before the caller reads it)
  });
}

// ---------------------------------------------------------------------------------------------------------
// conv_weight_grad: dW[cy, cx, k] = sum_{n, i} Y[n, cy, i] * X[n, cx, i*stride - padding + k*dilation]
// ---------------------------------------------------------------------------------------------------------
template <typename scalar_t>
void conv_weight_grad_kernel(const ConvParams& p, const scalar_t* x, const Strides& sx, const scalar_t* y,
                             const Strides& sy, scalar_t* dw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t G = p.groups, Cxg = p.big_group(), Cyg = p.small_group(), T = p.kernel_numel();
  const int64_t KK = Cxg * T, M = p.small_spatial();
  if (Cxg == 1 && Cyg == 1) return conv_weight_grad_depthwise(p, x, sx, y, sy, dw);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (winograd_weight_grad(p, x, sx, y, sy, dw)) return;
  }
  const int64_t dw_numel = p.small_channels * KK;
  const std::vector<Tap> taps = conv_taps(p);
  // The GEMM is dW_g[Cyg x KK] += Y_tile[Cyg x positions] . columns[KK x positions]^T (gemm_nt): positions are
  // its depth, so a tile takes many positions (long dot products; a tile may span batch items) and, when the
  // columns of all input channels would not fit the column budget, a block of input channels.
  const int64_t elem = sizeof(acc_t);
  // (bfloat16 by AVX512-BF16 dot products: the packed path (gemm_amx_nt) from 32 rows of Y, where the float path
  // would go tap by tap (AMX's tap-by-tap kernel has no dot-product twin). Training steps on Zen 4 against tap by tap
  // on the FMA units: the small U-Net k=2 x0.68, MONAI x0.77, grouped 2d x0.77, k=4 3d x0.89, stride-1 3d x0.86; the
  // seed layers' 16 rows x1.02-1.05: not taken.)
  const bool dot_packed = std::is_same_v<scalar_t, c10::BFloat16> && Cyg >= 32 && cpu::bf16_dot() && !cpu::amx_bf16();
  const bool packed = Cyg >= kPackedWeightGradRows || dot_packed, y_dense = sy.dense_rows(p.small);
  // Positions are flat frame positions (columns.h) where the frame gather applies (Y is zero at the frame points
  // off the grid, so they add nothing), else grid positions; over the whole batch, n-major.
  const Frame frame = make_frame(taps, p.stride, p.small);
  const int64_t planes = static_cast<int64_t>(frame.planes.size());
  // by_tap: the GEMM runs tap by tap on the tile's windows: dW_g[:, (cx, t)] += Y_tile . window(cx, plane_t)[off_t
  // ...]^T, since column row (cx, t) is a run of its window. The windows are gathered once per tile (read in place
  // where the source is its own frame) and no column row is copied: a many-tap layer's columns are taps times
  // the windows' size. Long tiles (Y's rows fill the column budget) amortise the per-tile work; input channels
  // come in blocks whose windows fit kWindowBytes. (Measured: weight gradient of the k=4, s=2 3d case x0.58 /
  // x0.61 time with 1 / 2 threads; with 2, stride-1 k=3 3d x0.60, MONAI k=3 x0.83. Tall Y, the packed path below,
  // gained 10% on DCGAN and lost 1.8x on HiFi-GAN, whose planes hold 2 taps each: not used there.)
  int64_t tile = std::max<int64_t>(256, std::min<int64_t>(8192, kColumnBytes / (Cyg * elem)) / 16 * 16);
  const bool own_frame = std::is_same_v<scalar_t, acc_t> && source_is_frame(frame, p.big, sx);  // read in place
  const int64_t window_bytes = planes * frame.window(std::min(tile, p.batch * frame.positions), 1) * elem;
  const int64_t tap_block = own_frame ? Cxg : kWindowBytes / std::max<int64_t>(1, window_bytes);  // channels
  const bool by_tap = !packed && T > 1 && tap_block >= 1 && frame.positions <= M + M / 2 &&
                      planes * frame.window(tile, 1) <= 2 * T * tile;
  int64_t block;
  if (by_tap) {
    tile = std::max<int64_t>(1, std::min(tile, p.batch * frame.positions));
    block = std::min(tap_block, Cxg);
  } else {
    tile = std::max<int64_t>(512, kColumnBytes / (KK * elem) / 16 * 16);
    tile = std::max<int64_t>(
        1, std::min(p.batch * M, std::max<int64_t>(16, std::min(tile, 4 * kColumnBytes / (T * elem) / 16 * 16))));
    block = std::clamp<int64_t>(kColumnBytes / (tile * T * elem), 1, Cxg);
  }
  const bool framed = by_tap || use_frame<scalar_t, acc_t>(frame, M, p.big, sx, block, tile, 1);
  // grid: the packed GEMM's positions are Y's grid points, its columns read through a column map
  // (frame_rows_grid), so the frame's points off the grid, where Y is zero, are not summed (DCGAN: 12% of the
  // frame's; its weight gradient x0.92 time).
  const bool grid = framed && !by_tap && frame.positions > M;
  const int64_t* positions = framed && !grid ? frame.ext : p.small;  // the layout of a batch item's positions
  const int64_t Mp = framed && !grid ? frame.positions : M, P = p.batch * Mp;
  const bool plain = std::equal(positions, positions + kMaxDims, p.small);
  const int64_t blocks = ceil_div(Cxg, block);
  // Fixed chunking of the reduction (independent of the thread count), each chunk with its own partial sum.
  // by_tap sums lay out as [g][t][cy][cx] or [g][t][cx][cy] (a tap's block of dW is then a plain matrix),
  // reordered at the end. The chunks hold equal work: tiles of equal length (P: positions, above), and the fewest
  // more tiles (of kMinWeightGradTile positions or more) that make the item count a multiple or a divisor of the
  // chunk count, so that threads taking equal runs of chunks get equal work. Measured: MONAI's 3 items (tiles of
  // 2048, 2048 and 510 positions) in 3 chunks left one of 2 threads idle most of the time: 4 tiles of 1152, x0.61
  // time; HiFi-GAN's tiles of 512 and 288 positions (chunks of 8 items): 2 of 400, x0.81.
  const int64_t target =
      std::max<int64_t>(1, std::min(kMaxChunks, kPartialBytes / std::max<int64_t>(1, dw_numel * elem)));
  int64_t tiles = ceil_div(P, tile);
  if (P > 0) {
    for (int64_t t = tiles; t <= tiles + target && P / t >= kMinWeightGradTile; ++t)
      if (const int64_t n = G * t * blocks; n >= 2 && (n % target == 0 || target % n == 0)) {
        tiles = t;
        break;
      }
    tile = std::min(tile, ceil_div(ceil_div(P, tiles), 16) * 16);
    tiles = ceil_div(P, tile);
  }
  const int64_t ld = tile / 16 * 16 + 16 + 8;  // padded row: rows do not share L1 sets
  const int64_t items = G * tiles * blocks;  // ordered (g, tile, channel block)
  const int64_t chunks = std::max<int64_t>(1, std::min(items, target));
  std::unique_ptr<acc_t[]> partial_fresh;
  acc_t* const partial = held_buffer<acc_t, kPartialSlot>(chunks * dw_numel, partial_fresh);
  // Outside by_tap a chunk's partial sums lie as dW, and an item adds to its (group, channel block) region only:
  // the first item of a chunk on a region writes it (the packed GEMM without accumulating, else zeroed first),
  // and the regions a chunk never reaches are neither zeroed nor summed (HiFi-GAN: each of the 4 chunks reaches
  // half of dW). by_tap zeroes each chunk's whole partial.
  const int64_t regions = G * blocks;
  std::vector<uint8_t> reached(by_tap ? 0 : chunks * regions, 0);  // [chunk][g * blocks + channel block]
  for (int64_t c = 0; c < static_cast<int64_t>(reached.size()) / std::max<int64_t>(1, regions); ++c)
    for (int64_t item = items * c / chunks; item < items * (c + 1) / chunks; ++item)
      reached[c * regions + item / (tiles * blocks) * blocks + item % blocks] = 1;
  // packed: C is this chunk's partial sums (Cyg x KK, far from cache for wide layers), so the tile's depth runs in
  // K blocks of kWeightGradKC: each C block is loaded and stored once per tile instead of once per default K block
  // (128 or 256 positions), with the tall register blocking (measured, weight gradient time with 1 / 2 threads: deep
  // blocks x0.94 / x0.92 on HiFi-GAN, x0.92 / x0.97 on DCGAN; the tall blocking then another x0.95 / x0.93 and x0.92
  // / x0.95).
  const cpu::GemmTile gt = cpu::gemm_tile_deep<acc_t>(kWeightGradKC);
  // (bfloat16 on AMX or AVX512-BF16: the packed path's GEMMs on tiles or dot products, gemm_amx_nt; the DCGAN
  // bfloat16 weight gradient on Zen 4: 6.0-6.8 ms against 11.0 on the FMA units)
  const bool amx = packed && std::is_same_v<scalar_t, c10::BFloat16> && cpu::bf16_dot();
  // outer: by_tap with Y wide enough to fill the micro-kernel's NR lanes runs the register-blocked GEMM instead
  // of dot products (which stream both operands from L2: two vector loads per five FMAs), with input channels as
  // rows.
  // (bfloat16 on AMX: the outer GEMMs on tiles, every tap's A loaded straight from the windows at its shift; from 16
  // rows of Y, as for use_amx, also where the float GEMM would take dot products: the seed layers' weight gradients,
  // 16 channels of Y, x0.30 time (anisotropic) and x0.62 (k=3, s=2))
  const bool amx_taps = by_tap && Cyg >= 16 && std::is_same_v<scalar_t, c10::BFloat16> && cpu::amx_bf16();
  const cpu::GemmTile gtx = cpu::gemm_tile<acc_t>(block);
  const bool outer = by_tap && (amx_taps || 10 * Cyg >= 7 * ceil_div(Cyg, gtx.nr) * gtx.nr);
  // taps plane by plane: a plane's packed windows stay in L2 while its taps run
  std::vector<int64_t> tap_order(T);
  std::iota(tap_order.begin(), tap_order.end(), 0);
  std::stable_sort(tap_order.begin(), tap_order.end(),
                   [&](int64_t u, int64_t v) { return frame.tap_plane[u] < frame.tap_plane[v]; });

  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    acc_t* col = by_tap ? nullptr : scratch<acc_t, 0>(block * T * ld);
    acc_t* y_rows = scratch<acc_t, 1>(Cyg * ld);
    // (float panels: not for the tap-by-tap AMX path, whose operands are bfloat16 scratch of its own)
    const bool float_outer = outer && !amx_taps;
    acc_t* a_packed = float_outer ? scratch<acc_t, 2>(planes * cpu::packed_size(block, frame.window(tile, 1), gtx.mr))
                      : packed    ? scratch<acc_t, 2>(cpu::packed_size(Cyg, tile, gt.mr))
                                  : nullptr;
    acc_t* b_packed = float_outer ? scratch<acc_t, 3>(cpu::packed_size(Cyg, tile, gtx.nr))
                      : packed    ? scratch<acc_t, 3>(cpu::packed_size(block * T, tile, gt.nr))
                                  : nullptr;
    int64_t y_tile = -1;  // (g, tile) whose Y rows are in y_rows and a_packed
    for (int64_t c = c_begin; c < c_end; ++c) {
      acc_t* acc = partial + c * dw_numel;
      const int64_t i0 = items * c / chunks;
      if (by_tap) std::fill_n(acc, dw_numel, acc_t(0));
      for (int64_t item = i0; item < items * (c + 1) / chunks; ++item) {
        const int64_t g = item / (tiles * blocks), t0 = item / blocks % tiles * tile, cx0 = item % blocks * block;
        const int64_t t1 = std::min(P, t0 + tile), cnt = t1 - t0, channels = std::min(block, Cxg - cx0);
        // (the chunk's first item on this region: none `blocks` items back in this group and chunk)
        const bool first = item - blocks < i0 || (item - blocks) / (tiles * blocks) != g;
        if (by_tap) {
          for (int64_t q0 = t0; q0 < t1;) {  // one piece per batch item in the tile
            const int64_t n = q0 / Mp, m0 = q0 % Mp, m1 = std::min(Mp, m0 + (t1 - q0)), len = m1 - m0;
            // Y's rows of the piece as elements E from sources of type S (acc_t from scalar_t, or bfloat16 bits for
            // AMX tiles): read in place where Y is dense in them, else loaded into rows_e; and their row stride.
            const auto y_piece = [&](auto* rows_e, const auto* ys) {
              using E = std::remove_pointer_t<decltype(rows_e)>;
              using S = std::remove_const_t<std::remove_pointer_t<decltype(ys)>>;
              const S* y_g = ys + n * sy.n + g * Cyg * sy.c;
              if (std::is_same_v<S, E> && y_dense && plain)
                return std::pair<const E*, int64_t>(reinterpret_cast<const E*>(y_g + m0), sy.c);
              load_rows(y_g, sy, Cyg, p.small, positions, m0, m1, rows_e, ld);
              return std::pair<const E*, int64_t>(rows_e, ld);
            };
            const int64_t W = frame.window(len, 1);
            const scalar_t* x_b = x + n * sx.n + (g * Cxg + cx0) * sx.c;
            if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
              if (amx_taps) {
                // (AMX: Y's bfloat16 rows as VNNI tiles once; the windows gathered as bfloat16 rows as they are
                // (channel c, plane pl at row c * planes + pl), zero from W through the 32-deep step past a tap's last
                // read and in the rows that pad the channels to 16, from which every tap's tiles load at its shift)
                const int64_t cpad = ceil_div(channels, 16) * 16, wld = ceil_div(W + 32, 32) * 32;
                uint16_t* vnni = scratch<uint16_t, 0>(cpu::amx_vnni_size(Cyg, len));
                uint16_t* win16 = scratch<uint16_t, 1>(cpad * planes * wld);
                const auto [a16, lda16] =
                    y_piece(reinterpret_cast<uint16_t*>(y_rows), reinterpret_cast<const uint16_t*>(y));
                cpu::amx_vnni_rows(a16, lda16, Cyg, len, vnni);
                gather_windows<scalar_t, uint16_t>(frame, x_b, channels, p.big, sx, m0 + frame.min_off, W, win16, wld);
                for (int64_t r = 0; r < channels * planes; ++r)
                  std::fill(win16 + r * wld + W, win16 + (r + 1) * wld, uint16_t(0));
                std::fill(win16 + channels * planes * wld, win16 + cpad * planes * wld, uint16_t(0));
                for (int64_t t : tap_order)
                  cpu::gemm_amx_rows(channels, Cyg, len,
                                     win16 + frame.tap_plane[t] * wld + frame.tap_off[t] - frame.min_off, planes * wld,
                                     vnni, acc + ((g * T + t) * Cxg + cx0) * Cyg, Cyg);
                q0 += len;
                continue;
              }
            }
            const auto [a, lda] = y_piece(y_rows, y);
            // (outer float windows that are gathered at all are gathered straight into their packed panels)
            const bool fused = outer && std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float> && !own_frame;
            Windows<acc_t> w{};  // (fused: none)
            if (!fused) w = frame_windows<scalar_t, acc_t>(frame, x_b, channels, p.big, sx, m0 + frame.min_off, W);
            const int64_t avail = std::min(W, w.limit);  // (window elements from w.limit on are not read: zeros)
            if (outer) {
              // C_t[cx, cy] += A_t . B: B is Y^T (panels over Cyg), packed once; A_t is the windows, packed once
              // per plane as [channel panel][window position][MR] and entered at the tap's shift.
              const int64_t MR = gtx.mr, plane_size = cpu::packed_size(channels, W, MR);
              cpu::pack_panels(a, lda, 1, Cyg, len, gtx.nr, b_packed);
              if (fused) {
                gather_windows<scalar_t, acc_t>(frame, x_b, channels, p.big, sx, m0 + frame.min_off, W, a_packed, -1,
                                                MR);
              } else {
                for (int64_t pl = 0; pl < planes; ++pl)
                  for (int64_t r0 = 0; r0 < channels; r0 += MR) {
                    acc_t* dst = a_packed + pl * plane_size + r0 * W;
                    cpu::pack_panels(w.data + pl * w.plane_stride + r0 * w.channel_stride, w.channel_stride, 1,
                                     std::min(MR, channels - r0), avail, MR, dst);
                    std::fill(dst + avail * MR, dst + W * MR, acc_t(0));
                  }
              }
              for (int64_t t : tap_order)
                cpu::gemm_packed<acc_t>(gtx, channels, Cyg, len,
                                        a_packed + frame.tap_plane[t] * plane_size +
                                            (frame.tap_off[t] - frame.min_off) * MR,
                                        b_packed, true, acc + ((g * T + t) * Cxg + cx0) * Cyg, Cyg, W * MR);
            } else {
              for (int64_t t = 0; t < T; ++t) {
                const int64_t i = frame.tap_off[t] - frame.min_off, depth = std::clamp<int64_t>(avail - i, 0, len);
                cpu::gemm_nt<acc_t>(Cyg, channels, depth, a, lda, w.data + frame.tap_plane[t] * w.plane_stride + i,
                                    w.channel_stride, acc + ((g * T + t) * Cyg) * Cxg + cx0, Cxg);
              }
            }
            q0 += len;
          }
          continue;
        }
        // One piece per batch item in the tile: columns side by side, and Y's rows copied alongside unless the
        // tile lies in one batch item and Y is already in the element type. The channel blocks of a tile
        // follow one another: the tile's Y rows (and packed A) are loaded for the first and kept for the rest.
        // Elements E from sources of type S: acc_t from scalar_t, or the bits of bfloat16 values (uint16_t from
        // uint16_t) for AMX tiles, which load them as they are. Returns A (Y's rows) and its row stride.
        const bool same_y = y_tile == g * tiles + t0 / tile;
        y_tile = g * tiles + t0 / tile;
        const auto gather = [&](auto* col_e, auto* y_rows_e, const auto* xs, const auto* ys) {
          using E = std::remove_pointer_t<decltype(col_e)>;
          using S = std::remove_const_t<std::remove_pointer_t<decltype(xs)>>;
          const E* a = y_rows_e;
          int64_t lda = ld;
          for (int64_t q0 = t0; q0 < t1;) {
            const int64_t n = q0 / Mp, m0 = q0 % Mp, m1 = std::min(Mp, m0 + (t1 - q0)), off = q0 - t0;
            const S* x_b = xs + n * sx.n + (g * Cxg + cx0) * sx.c;
            if (grid) {
              frame_rows_grid(frame, p.small, x_b, channels, p.big, sx, m0, m1, col_e + off, ld);
            } else if (framed) {
              frame_rows(frame, x_b, channels, p.big, sx, m0, m1 - m0, col_e + off, ld);
            } else {
              gather_columns(x_b, channels, p.big, sx, taps, p.stride, p.small, m0, m1, col_e + off,
                             ColumnLayout{0, 0, ld});
            }
            const S* y_g = ys + n * sy.n + g * Cyg * sy.c;
            if (std::is_same_v<S, E> && y_dense && plain && off == 0 && m1 - m0 == cnt) {
              a = reinterpret_cast<const E*>(y_g + m0), lda = sy.c;
            } else if (!same_y) {
              load_rows(y_g, sy, Cyg, p.small, positions, m0, m1, y_rows_e + off, ld);
            }
            q0 += m1 - m0;
          }
          return std::pair<const E*, int64_t>(a, lda);
        };
        acc_t* c_block = acc + g * Cyg * KK + cx0 * T;
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (amx) {  // (AMX: both operands' bfloat16 rows, gathered as they are and loaded straight into tiles)
            uint16_t* col16 = reinterpret_cast<uint16_t*>(col);
            const uint16_t *x16 = reinterpret_cast<const uint16_t*>(x), *y16 = reinterpret_cast<const uint16_t*>(y);
            const auto [a16, lda16] = gather(col16, reinterpret_cast<uint16_t*>(y_rows), x16, y16);
            cpu::gemm_amx_nt(Cyg, channels * T, cnt, a16, lda16, col16, ld, !first, c_block, KK);
            continue;
          }
        }
        const auto [a, lda] = gather(col, y_rows, x, y);
        if (packed) {
          // Tall Y: repack both operands into panels (a cheap pass next to 2*Cyg flops per column element) and
          // run the register-blocked micro-kernel, which beats dot products once A has many rows.
          cpu::pack_panels(col, ld, 1, channels * T, cnt, gt.nr, b_packed);
          if (!same_y) cpu::pack_panels(a, lda, 1, Cyg, cnt, gt.mr, a_packed);
          cpu::gemm_packed<acc_t>(gt, Cyg, channels * T, cnt, a_packed, b_packed, !first, c_block, KK);
        } else {
          if (first)
            for (int64_t cy = 0; cy < Cyg; ++cy) std::fill_n(c_block + cy * KK, channels * T, acc_t(0));
          cpu::gemm_nt<acc_t>(Cyg, channels * T, cnt, a, lda, col, ld, c_block, KK);
        }
      }
    }
  });

  if (!by_tap) {
    // dW's row (g, cy) is the chunks' sums over each channel block's run of it, added in chunk order (the chunks
    // that reached the region; none for an empty batch: zeros), a piece at a time in the accumulation type
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, KK));
    at::parallel_for(0, G * Cyg, grain, [&](int64_t begin, int64_t end) {
      constexpr int64_t kPiece = 1024;
      acc_t sum[kPiece];
      const acc_t* src[kMaxChunks];
      for (int64_t row = begin; row < end; ++row) {
        const int64_t g = row / Cyg;
        for (int64_t b = 0; b < blocks; ++b) {
          int64_t m = 0;
          for (int64_t c = 0; c < chunks; ++c)
            if (reached[c * regions + g * blocks + b]) src[m++] = partial + c * dw_numel;
          const int64_t run0 = row * KK + b * block * T, run1 = row * KK + std::min(Cxg, (b + 1) * block) * T;
          for (int64_t j0 = run0; j0 < run1; j0 += kPiece) {
            const int64_t n = std::min(kPiece, run1 - j0);
            scalar_t* d = dw + j0;
            if (m <= 1) {
              for (int64_t j = 0; j < n; ++j) d[j] = m ? narrow_to<scalar_t, acc_t>(src[0][j0 + j]) : scalar_t(0);
              continue;
            }
            for (int64_t j = 0; j < n; ++j) sum[j] = src[0][j0 + j] + src[1][j0 + j];
            for (int64_t k = 2; k < m; ++k)
              for (int64_t j = 0; j < n; ++j) sum[j] += src[k][j0 + j];
            for (int64_t j = 0; j < n; ++j) d[j] = narrow_to<scalar_t, acc_t>(sum[j]);
          }
        }
      }
    });
    return;
  }
  // dW row (g, cy, cx) holds its T taps; by_tap sums sit at [g][t][cy][cx] (dot products) or [g][t][cx][cy]
  at::parallel_for(0, dw_numel / std::max<int64_t>(1, T), std::max<int64_t>(1, 4096 / std::max<int64_t>(1, T)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t g = row / (Cyg * Cxg), cy = row / Cxg % Cyg, cx = row % Cxg;
      const int64_t first = !by_tap ? row * T : (g * T * Cxg * Cyg + (outer ? cx * Cyg + cy : cy * Cxg + cx));
      const int64_t step = !by_tap ? 1 : Cxg * Cyg;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t src = first + t * step;
        acc_t s = partial[src];
        for (int64_t c = 1; c < chunks; ++c) s += partial[c * dw_numel + src];
        dw[row * T + t] = static_cast<scalar_t>(s);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Op entry points
// ---------------------------------------------------------------------------------------------------------
// Inputs are read through their strides (channels_last included): only conjugate/negative views, which just
// flip bits, are materialised.
at::Tensor readable(const at::Tensor& t) {
  return t.resolve_conj().resolve_neg();
}

// Whether torch's oneDNN build handles a 16-bit type on this CPU (its mkldnn::_is_mkldnn_bf16_supported and
// _is_mkldnn_fp16_supported: AVX-512 (or AVX2-VNNI-2) for bfloat16, AVX-512-FP16 for half).
bool mkldnn_supports(const char* op) {
  try {
    return c10::Dispatcher::singleton().findSchemaOrThrow(op, "").typed<bool()>().call();
  } catch (const c10::Error&) {
    return false;
  }
}

// The output's memory format, as torch.nn's CPU convolutions choose it (its backend's memory format): channels_last
// when the input or the weight is, for 2d layers (oneDNN and the slow 2d kernels keep it); for 3d layers only where
// torch takes oneDNN (its use_mkldnn: float layers past some sizes, 16-bit ones where oneDNN supports the type on
// this CPU), as its slow 3d kernels write contiguous outputs (bfloat16 3d layers on an AVX2 CPU, an image of a few
// small planes).
at::MemoryFormat output_format(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                               at::IntArrayRef dilation, at::IntArrayRef output_padding, int64_t groups) {
  const auto cl = input.dim() == 4 ? at::MemoryFormat::ChannelsLast
                  : input.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
  if (cl == at::MemoryFormat::Contiguous ||
      (input.suggest_memory_format() != cl && weight.suggest_memory_format() != cl))
    return at::MemoryFormat::Contiguous;
  if (input.dim() == 4) return cl;
  const auto not_one = [](at::IntArrayRef v) {
    return std::any_of(v.begin(), v.end(), [](int64_t e) { return e != 1; });
  };
  if (!at::globalContext().userEnabledMkldnn()) return at::MemoryFormat::Contiguous;
  for (size_t j = 0; j < output_padding.size(); ++j)  // (transposed layers with output_padding >= stride: slow)
    if (output_padding[j] >= stride[j]) return at::MemoryFormat::Contiguous;
  static const bool bf16 = mkldnn_supports("mkldnn::_is_mkldnn_bf16_supported");
  static const bool fp16 = mkldnn_supports("mkldnn::_is_mkldnn_fp16_supported");
  const auto type = input.scalar_type();
  if ((type == at::kBFloat16 && bf16) || (type == at::kHalf && fp16)) return cl;
  if (type != at::kFloat) return at::MemoryFormat::Contiguous;
  const int64_t n = input.size(0), kw = weight.size(-1), kh = weight.size(-2);
  const bool mkldnn = (not_one(stride) || not_one(dilation) || n >= 16 || kw != 1 || kh != 1 ||
                       at::get_num_threads() > 1) &&
                      (groups > 1 || (kw > 3 && kh > 3) || n > 1 ||
                       n * input.size(1) * input.size(2) * input.size(3) > 20480);
  return mkldnn ? cl : at::MemoryFormat::Contiguous;
}

// Outputs of kKeptOutputBytes or more come from OutputAllocator, which keeps the memory of such an output when it is
// freed (up to kKeptOutputs blocks, at most the cache limit in bytes: kCacheLimit unless set_cache_limit says
// otherwise) and hands it to the next large output that fits it. glibc maps every allocation above 32 MiB afresh
// and unmaps it when freed, and the OS zeroes each fresh page at its first touch: for the 128 MiB output of a 3d
// U-Net up-sampler that zeroing was a third of the layer's time, every call (x0.52 time with the memory kept).
// Below that, glibc's heap often gives the memory back to the OS between calls when other large blocks come and go
// (torch's own convolutions' workspaces): the 16 MiB outputs of the grouped 2d and DCGAN layers, each call after a
// torch.nn convolution, took ~490 page faults a call, and the grouped layer's forward x2.8 the time (kept: x0.36
// time, its training step x0.76); a 4 MiB bfloat16 output called after each float32 one, 150 faults a call. From 1
// MiB on, then. empty_cache() releases the kept blocks.
class OutputAllocator final : public c10::Allocator {
 public:
  static OutputAllocator& get() {
    static OutputAllocator* allocator = new OutputAllocator();  // (never destroyed: outputs may outlive statics)
    return *allocator;
  }
  c10::DataPtr allocate(size_t n) override {
    Block* block = take(n);
    if (!block) {
      void* data = new_memory(n);
      advise_huge_pages(data, n, kAdviseOutputBytes);
      block = new Block{data, n};
    }
    return {block->data, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
  // Sets the most bytes kept (0: none), releasing what is over it; returns the previous limit.
  size_t set_limit(size_t bytes) {
    std::vector<Block*> freed;
    size_t previous;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      previous = std::exchange(limit_, bytes);
      trim(freed, limit_);
    }
    destroy_all(freed);
    return previous;
  }
  // Releases every kept block; returns their bytes.
  size_t release() {
    std::vector<Block*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      trim(freed, 0);
    }
    return destroy_all(freed);
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };
  OutputAllocator() {
#if defined(__linux__)
    // A fork while another thread holds the lock would leave it held in the child (DataLoader workers fork).
    pthread_atfork([] { get().mutex_.lock(); }, [] { get().mutex_.unlock(); }, [] { get().mutex_.unlock(); });
#endif
  }
  // n bytes, aligned to huge pages where posix_memalign exists (torch.OutOfMemoryError, a RuntimeError as at::empty's
  // c10::Error, when out of memory); freed by destroy.
  static void* new_memory(size_t n) {
#if defined(__linux__)
    void* data = nullptr;
    TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&data, size_t(2) << 20, n) == 0,
                     "torch_convt: out of memory while allocating an output of ", n, " bytes");
    return data;
#else
    return c10::alloc_cpu(n);
#endif
  }
  static void destroy(Block* b) {
    unadvise_huge_pages(b->data, b->bytes, kAdviseOutputBytes);
#if defined(__linux__)
    std::free(b->data);
#else
    c10::free_cpu(b->data);
#endif
    delete b;
  }
  static size_t destroy_all(const std::vector<Block*>& blocks) {  // (outside the lock); returns their bytes
    size_t bytes = 0;
    for (Block* b : blocks) bytes += b->bytes, destroy(b);
    return bytes;
  }
  // The smallest kept block that holds n bytes and is at most twice that (a small output does not pin a large
  // block), the most recently kept among equals.
  Block* take(size_t n) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = kept_.end();
    for (auto it = kept_.begin(); it != kept_.end(); ++it)
      if ((*it)->bytes >= n && (*it)->bytes / 2 <= n && (best == kept_.end() || (*it)->bytes <= (*best)->bytes))
        best = it;
    if (best == kept_.end()) return nullptr;
    Block* b = *best;
    kept_.erase(best);
    kept_bytes_ -= b->bytes;
    return b;
  }
  static void give_back(void* ctx) {
    Block* const block = static_cast<Block*>(ctx);
    if (block->bytes < static_cast<size_t>(kKeptOutputBytes)) return destroy(block);  // (a storage resized smaller)
    OutputAllocator& self = get();
    std::vector<Block*> freed;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      self.kept_.push_back(block);
      self.kept_bytes_ += block->bytes;
      self.trim(freed, self.limit_);
    }
    destroy_all(freed);
  }
  // (under the lock) moves the oldest kept blocks to `freed` until at most kKeptOutputs of at most `limit` bytes stay
  void trim(std::vector<Block*>& freed, size_t limit) {
    while (!kept_.empty() && (kept_.size() > kKeptOutputs || kept_bytes_ > limit)) {
      freed.push_back(kept_.front());
      kept_bytes_ -= kept_.front()->bytes;
      kept_.erase(kept_.begin());
    }
  }
  std::mutex mutex_;
  std::vector<Block*> kept_;  // oldest first
  size_t kept_bytes_ = 0, limit_ = kCacheLimit;
};

at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(shape) * int64_t(options.dtype().itemsize());
  if (bytes < kKeptOutputBytes) return at::empty(shape, options);
  return at::detail::empty_generic(shape, &OutputAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), options.memory_format_opt());
}

// A workspace allocation that fails inside a kernel surfaces like torch's own allocation failures
// (torch.OutOfMemoryError, a RuntimeError), not as std::bad_alloc, which Python would turn into MemoryError.
// Nothing outlives a failed call: the output is discarded and the workspace is freed or reused as is.
template <typename Kernel>
void run_kernel(const char* op, Kernel&& kernel) {
  try {
    kernel();
  } catch (const std::bad_alloc&) {
    TORCH_CHECK_WITH(OutOfMemoryError, false, op, ": out of memory while allocating the kernel's workspace");
  }
}

at::Tensor conv_transpose_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef output_padding,
                              at::IntArrayRef dilation, int64_t groups) {
  const ConvParams p = check_conv_args(ConvKind::ConvTranspose, input, weight, weight.sizes(), bias, stride,
                                       padding, output_padding, dilation, groups);
  at::Tensor out = new_output(
      p.big_shape(),
      input.options().memory_format(output_format(input, weight, stride, dilation, output_padding, groups)));
  if (out.numel() == 0) return out;
  const at::Tensor y = readable(input), w = dense(weight);
  const at::Tensor b = dense(bias);
  run_kernel("torch_convt.conv_transpose", [&] {
    AT_DISPATCH_FLOATING_AND_COMPLEX_TYPES_AND3(at::kBFloat16, at::kHalf, at::kLong, input.scalar_type(),
                                                "torch_convt.conv_transpose", [&] {
      conv_transpose_kernel<scalar_t>(p, y.const_data_ptr<scalar_t>(), strides_of(y), w.const_data_ptr<scalar_t>(),
                                      b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                      out.mutable_data_ptr<scalar_t>(), strides_of(out));
    });
  });
  return out;
}

at::Tensor conv_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvParams p =
      check_conv_args(ConvKind::Conv, input, weight, weight.sizes(), bias, stride, padding, {}, dilation, groups);
  at::Tensor out = new_output(
      p.small_shape(), input.options().memory_format(output_format(input, weight, stride, dilation, {}, groups)));
  if (out.numel() == 0) return out;
  const at::Tensor x = readable(input), w = dense(weight);
  const at::Tensor b = dense(bias);
  run_kernel("torch_convt.conv", [&] {
    AT_DISPATCH_ALL_TYPES_AND_COMPLEX_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "torch_convt.conv", [&] {
      conv_kernel<scalar_t>(p, x.const_data_ptr<scalar_t>(), strides_of(x), w.const_data_ptr<scalar_t>(),
                            b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
                            strides_of(out));
    });
  });
  return out;
}

at::Tensor conv_weight_grad_cpu(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef weight_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  const ConvParams p = check_conv_args(ConvKind::WeightGrad, input, grad_output, weight_size, std::nullopt, stride,
                                       padding, {}, dilation, groups);
  at::Tensor out = new_output(p.weight_shape(), input.options());
  if (out.numel() == 0) return out;
  if (p.batch == 0) return out.zero_();  // (any geometry: check_conv_args)
  const at::Tensor x = readable(input), y = readable(grad_output);
  run_kernel("torch_convt.conv_weight_grad", [&] {
    AT_DISPATCH_ALL_TYPES_AND_COMPLEX_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                           "torch_convt.conv_weight_grad", [&] {
      conv_weight_grad_kernel<scalar_t>(p, x.const_data_ptr<scalar_t>(), strides_of(x), y.const_data_ptr<scalar_t>(),
                                        strides_of(y), out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

}  // namespace

int64_t empty_cache() {
  return static_cast<int64_t>(OutputAllocator::get().release() + cpu::drop_prepared());
}

bool set_winograd(bool on) {
  return cpu::winograd_flag().exchange(on);
}

bool set_amx(bool on) {
  return cpu::set_amx(on);
}

int64_t set_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "torch_convt.set_cache_limit: expected a byte count >= 0, but got ", bytes);
  cpu::prepared_budget().store(std::min(cpu::kPreparedBytes, static_cast<size_t>(bytes)));
  if (bytes == 0) cpu::drop_prepared();
  return static_cast<int64_t>(OutputAllocator::get().set_limit(static_cast<size_t>(bytes)));
}

// ================================ CPU registrations ================================
TORCH_LIBRARY_IMPL(torch_convt, CPU, m) {
  m.impl("conv_transpose", &conv_transpose_cpu);
  m.impl("conv", &conv_cpu);
  m.impl("conv_weight_grad", &conv_weight_grad_cpu);
}

}  // namespace torch_convt
