// torch_convt's own single-threaded GEMM on pre-packed operands, for the CPU convolution kernels:
//     C[M x N] (row-major, ldc)  =  A[M x K] . B[K x N]  (+ C if accumulate)
// A is packed in MR-high panels, B in NR-wide panels (layout below). The convolution kernels write their
// gathered columns straight into the B layout and pack the (small) weights once per call, so no operand is
// ever copied twice.
//
// Why our own: the convolution kernels call it from inside their own parallel loops, and need (1) no nested
// threading, (2) a summation order fixed by the shapes alone, so results are bitwise identical for any thread
// count, and (3) speed on CPUs where vendor BLAS is weak. The register-blocked micro-kernel is chosen at run
// time (AVX-512, AVX2+FMA, or portable C++); the build never assumes the build machine's CPU.
#pragma once

#include <cstdint>
#include <type_traits>

namespace torch_convt::cpu {

// Panel sizes of the micro-kernel for T: MR rows of A, NR columns of B (NR is a power of two, the same for
// every M). MR is chosen for the row count M of A (the register blocking that pads M least); A must be packed
// with that MR and the same tile passed to gemm_packed.
struct GemmTile {
  int64_t mr, nr;
  // Depth of gemm_packed's K blocks; 0: the default, which keeps a block of B (KC x NR) in L1. Every K block
  // loads and stores each MR x NR block of C once, so where C is far (a large accumulated matrix that is not
  // in cache) deeper blocks pay: B's block is then read from L2, which the micro-kernel's two loads per
  // 2*MR FMAs can afford. (gemm_rows always uses the default.)
  int64_t kc = 0;
  // AMX tiles for a bfloat16 layer (gemm_tile_amx): A is in amx_pack_a's layout, B float panels or rows whose
  // values are bfloat16 values widened (they are narrowed back exactly, not rounded).
  bool amx = false;
};

// The blocking for an M-row operand: the register blocking (of the two) that pads M to fewer rows. With
// `tall_slack` > 0 the taller one is taken while it pads to at most that fraction more rows than the shorter.
template <typename T>
GemmTile gemm_tile(int64_t M, double tall_slack = 0.0);

// The blocking for K blocks `kc` deep (GemmTile::kc > 0): the taller register blocking whatever M, since B's block
// then comes from L2 and the taller kernel loads each B vector for more FMAs.
template <typename T>
GemmTile gemm_tile_deep(int64_t kc);

// Intel AMX for bfloat16 layers: whether the GEMMs of a GemmTile with `amx` may run on the tile unit (this CPU has
// AMX-BF16 and the OS gave this process its tile state, and set_amx has not turned it off). Products of bfloat16
// values are exact in float and the sums run in float, as on the FMA units, in another order; inputs and outputs
// that are float subnormals are flushed to zero by the tile unit (as torch.nn's bfloat16 convolutions on it).
bool amx_bf16();
// bfloat16 pairs multiplied on a dot-product unit for the GEMMs of a GemmTile with `amx`: AMX tiles (amx_bf16()), or
// else AVX512-BF16 dot products (vdpbf16ps: AMD Zen 4, Intel Cooper Lake) on the same operand layouts, at twice the
// float FMA rate, with the same exact products, float sums and flushed subnormals; also gemm_amx_nt. The AMX-only paths
// (gemm_amx_rows, gemm_amx_taps) need amx_bf16().
bool bf16_dot();
// Turns AMX and AVX512-BF16 use on (where the CPU has them) or off for later calls; returns whether either was in use
// before (bf16_dot()). (Tests compare the two.)
bool set_amx(bool on);
// The tile of an AMX GEMM: A packed by pack_panels in 16-row panels (then amx_pack_a), B in 32-wide panels.
inline GemmTile gemm_tile_amx() { return {16, 32, 0, true}; }
// Whether an A operand `depth` deep fits amx_pack_a's in-place layout (a panel's tiles within its float panel).
inline bool amx_depth_fits(int64_t depth) { return depth >= 16; }
// Rewrites an A operand packed in float panels of 16 rows ([M / 16][K][16], values that are bfloat16 values) in
// place as AMX tiles: panel p's K is cut into 32-deep steps, step s a 16 x 32 bfloat16 tile (row m: k = 32s ..
// 32s + 31, zero past K) at byte 1024 * s of the panel, which keeps its place (p * K * 16 floats). K >= 16.
void amx_pack_a(float* a, int64_t M, int64_t K);
// The same panel (rows <= 16 rows, K >= 16 deep) straight from bfloat16 rows (their bits; row m at src + m * ld, K
// values along k): no float panel first. The weights of bfloat16 convolutions (DCGAN's input gradient: packing them
// through float panels took 7% of it on AVX512-BF16).
void amx_pack_rows(const uint16_t* src, int64_t ld, int64_t rows, int64_t K, float* panel);

// C[M x N] (+)= A[M x K] . B[N x K]^T on AMX tiles, or else by AVX512-BF16 dot products on the same layouts (only
// where bf16_dot()), A and B rows (lda, ldb) of bfloat16 values (their bits) along K: the weight gradient's dot
// products, A's rows loaded into tiles as they are, B's transposed into VNNI tiles.
void gemm_amx_nt(int64_t M, int64_t N, int64_t K, const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb,
                 bool accumulate, float* C, int64_t ldc);

// The tap-by-tap weight gradient on AMX (only where amx_bf16()): B's VNNI tiles built once (amx_vnni_rows: B[k][n] =
// rows[n * ld + k], rows of bfloat16 values; amx_vnni_size elements), then C[M x N] += A . B for A as bfloat16
// rows (gemm_amx_rows: A[m][k] = a[m * lda + k], read for m < M rounded up to 16 and k < K rounded up to 32; those
// past K must be finite), so that every tap's A is its bfloat16 windows (copy_segments16 into uint16_t) at its shift,
// loaded straight into tiles.
int64_t amx_vnni_size(int64_t N, int64_t K);
void amx_vnni_rows(const uint16_t* rows, int64_t ld, int64_t N, int64_t K, uint16_t* vnni);
void gemm_amx_rows(int64_t M, int64_t N, int64_t K, const uint16_t* a, int64_t lda, const uint16_t* vnni, float* C,
                   int64_t ldc);

// A bfloat16 correlation on AMX, tap by tap (conv_cpu.cpp's amx_taps; only where amx_bf16()): C[16 MB x N] = sum over
// taps t and K steps s of A(t, s) . B(t, s), N a multiple of 32, C's rows ldc floats apart. A: 16-row blocks, each T x
// KB tiles of 16 rows x kp bfloat16 pairs (row r of tile (block i, t, s) at a + ((i*T + t)*KB + s)*32*kp + 2*kp*r). B:
// rows of bfloat16 pairs (two channels' values at one position) `ldb` apart; B(t, s) for column j is pair row s*kp + i
// at position j + shift[t], so a tile loads straight from the rows at each tap's shift (rows hold N + max(shift)
// positions). kp <= 16. Each C element sums its products tap by tap, K step by K step, in order.
void gemm_amx_taps(int64_t MB, int64_t N, int64_t T, int64_t KB, int64_t kp, const uint16_t* a, const uint32_t* b,
                   int64_t ldb, const int64_t* shift, float* C, int64_t ldc);
// `rows` rows of `width` pairs as gemm_amx_taps' B (dst rows `width` apart): row r's pairs [a, b) are two
// channels' bfloat16 values, c0[r*ld_src + (j - a)*inner] in the low half and the same of c1 in the high half
// (c1 == nullptr: zero), and its other pairs zero. 0 <= a <= b <= width.
void amx_pair_rows(const uint16_t* c0, const uint16_t* c1, int64_t ld_src, int64_t inner, int64_t rows, int64_t a,
                   int64_t b, int64_t width, uint32_t* dst);

// Elements of a panel-packed operand: `rows` rounded up to whole panels of `width`, times `depth`.
inline int64_t packed_size(int64_t rows, int64_t depth, int64_t width) {
  return (rows + width - 1) / width * width * depth;
}

// Index of element (row, k) in the packed layout [row / width][k][row % width] of a `depth`-deep operand.
// For A: row = m, width = MR. For B: row = n (a column of B), width = NR.
inline int64_t packed_index(int64_t row, int64_t k, int64_t depth, int64_t width) {
  return (row / width) * depth * width + k * width + row % width;
}

// pack_panels for float rows contiguous along k (depth_stride 1), by 16 x 16 in-register transposes where the
// CPU has AVX-512 (width <= 32), else by 8 x 8 ones where it has AVX2; false (nothing done) elsewhere.
bool pack_rows_simd(const float* src, int64_t row_stride, int64_t rows, int64_t depth, int64_t width, float* dst);

// Packs src(row, k) = src[row*row_stride + k*depth_stride] into that layout (converting to T), zero-padding
// the last panel.
template <typename Src, typename T>
void pack_panels(const Src* src, int64_t row_stride, int64_t depth_stride, int64_t rows, int64_t depth,
                 int64_t width, T* dst) {
  if constexpr (std::is_same_v<Src, float> && std::is_same_v<T, float>) {
    if (depth_stride == 1 && pack_rows_simd(src, row_stride, rows, depth, width, dst)) return;
  }
  for (int64_t r0 = 0; r0 < rows; r0 += width) {
    const int64_t w = rows - r0 < width ? rows - r0 : width;
    for (int64_t k = 0; k < depth; ++k, dst += width) {
      const Src* s = src + r0 * row_stride + k * depth_stride;
      for (int64_t l = 0; l < w; ++l) dst[l] = static_cast<T>(s[l * row_stride]);
      for (int64_t l = w; l < width; ++l) dst[l] = T(0);
    }
  }
}

// A run of one output channel's points: dst[dst + step*j + w] = rows[w][src + j] for j in [first, stop), w < ways
// (store_interleaved), except the last `trim` values of the last point (w >= ways - trim at j = stop - 1: the
// phases whose own grid ends a point earlier, see store_rows_interleaved).
struct StoreRun {
  int64_t dst, src, first, stop, trim = 0;
};

// The channels of a store: channel k's rows start k * ld elements after the first channel's, its output
// k * dst_stride elements after, and it adds bias[k] (bias == nullptr: nothing).
struct StoreChannels {
  int64_t channels, ld, dst_stride;
  const float* bias;
};

// The most rows store_interleaved takes.
constexpr int64_t kMaxStoreWays = 16;

// `ways` rows interleaved (consecutive phases of a transposed layer along the innermost dim, its stride `step` >=
// ways), channel by channel (ch) and run by run: dst[run.dst + step*j + w] = rows[w][run.src + j] + bias for j in
// [run.first, run.stop) (less the run's trim). With `stream` and step == ways, whole 64-byte lines of dst are
// written with non-temporal stores (no read of the line first, and it bypasses the caches: for outputs far larger
// than the caches); on AVX-512, a line that one run ends in and the next (contiguous in dst) starts in is put
// together in a register and streamed too. AVX-512 in-register transposes for 1, 2, 4, 8 and 16 rows where the CPU
// has it (one call for all channels and runs: a call per run cost as much as the stores where runs are short).
void store_interleaved(const float* const* rows, int64_t ways, int64_t step, const StoreChannels& ch,
                       const StoreRun* runs, int64_t count, float* dst, bool stream);

// The same into 16-bit floats, each value rounded to nearest even as c10's conversions do: bfloat16 (`bf16`;
// NaN -> 0x7fc0) or IEEE half.
void store_interleaved16(const float* const* rows, int64_t ways, int64_t step, const StoreChannels& ch,
                         const StoreRun* runs, int64_t count, uint16_t* dst, bool bf16, bool stream);

// B panels (gemm_packed's layout, `nr` wide) of 16-bit floats widened to float: B[c][j] = src[c * channel_stride +
// j] for c < channels, j < count (the panels' columns past count are zero); bfloat16 (`bf16`) or IEEE half. For a
// 16-bit layer's 1-tap sets (kernel == stride) over a dense input, which float layers read in place. AVX-512
// where the CPU has it.
void widen16_panels(const uint16_t* src, int64_t channel_stride, int64_t channels, int64_t count, int64_t nr,
                    float* dst, bool bf16);

// A contiguous piece of a run (a window's row, or one inside a packed panel): zero [j0, a), copy [a, b), zero
// [b, j1); source element offset + j (times the source step).
struct Segment {
  int64_t j0, a, b, j1, offset;
};

// For each channel c < channels and segment: dst[c * dst_channel_stride + j] = src[c * src_channel_stride +
// offset + j * step] on the segment's copy part, zero on the rest (the windows of frame gathers, every channel in
// one call). AVX-512 where the CPU has it, for step 1 (copies) and 2 (de-interleaving a stride-2 conv's input).
void copy_segments(const float* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                   int64_t count, int64_t step, float* dst, int64_t dst_channel_stride);

// The same for the pieces of column gathers (gather_columns), whose channels lie far apart in a large source: each
// piece's source in the next channel is fetched while this channel's is copied (the seed k=3, s=2 layer's input
// gradient x0.86 time on an AVX2 CPU, x0.80 on AVX-512, where copy_segments does it too).
void gather_segments(const float* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                     int64_t count, int64_t step, float* dst, int64_t dst_channel_stride);

// The same from 16-bit floats (bfloat16: `bf16`, else IEEE half), widened to float: the windows of 16-bit layers.
void copy_segments16(const uint16_t* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                     int64_t count, int64_t step, bool bf16, float* dst, int64_t dst_channel_stride);
// The same from 16-bit values into 16-bit values, as they are: the bfloat16 windows that AMX tiles load directly.
void copy_segments16(const uint16_t* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                     int64_t count, int64_t step, uint16_t* dst, int64_t dst_channel_stride);

// The same into the packed layout of an operand of `channels` rows `len` deep (packed_index: dst[(c / mr) * len *
// mr + j * mr + c % mr], lanes past `channels` zero), for a GEMM that reads the windows as A panels.
void copy_segments_packed(const float* src, int64_t src_channel_stride, int64_t channels, const Segment* segments,
                          int64_t count, int64_t step, int64_t mr, int64_t len, float* dst);

// Orders the calling thread's non-temporal stores before its later stores (sfence): where a thread's streamed
// output is done, before other threads may read it.
void stream_fence();

// C = A . B (+ C) with A packed as [M / MR][K][MR] and B as [N / NR][K][NR] (packed_index with depth K). A's
// panels may lie `a_stride` elements apart instead of K*MR (a_stride > 0): A is then a K-deep part of a deeper
// packed operand (the weight gradient's tap-shifted windows).
template <typename T>
void gemm_packed(GemmTile tile, int64_t M, int64_t N, int64_t K, const T* a_packed, const T* b_packed,
                 bool accumulate, T* C, int64_t ldc, int64_t a_stride = 0);

// The same with B unpacked, given by rows: B[k][j] = b_rows[k][j]. Every row must be readable for whole
// NR-wide panels (j < N rounded up to NR; the columns past N are computed and dropped). For columns that are
// runs of a source (frame windows), this skips the packing pass: where three or more MR-row panels of A read a
// block of B more than 64 rows deep (or eight or more panels, or rows a multiple of 4 KiB apart, any depth), the first
// one's kernel stores it aligned for the others as it multiplies it (AVX-512), else every panel reads the rows in
// place.
// With a column map `cols` (N offsets), B[k][j] = b_rows[k][cols[j]] instead, and only those elements are read:
// a panel whose columns are one run is read like an unmapped one, one of two runs (half a panel each) likewise
// where the ISA has a kernel for it, any other (more runs, or the ragged last panel) from an assembled aligned
// copy. For columns that are the grid points of a frame, not all its points (conv_transpose's grid tiles).
template <typename T>
void gemm_rows(GemmTile tile, int64_t M, int64_t N, int64_t K, const T* a_packed, const T* const* b_rows,
               bool accumulate, T* C, int64_t ldc, const int64_t* cols = nullptr);

// From this many rows of A on, gemm_rows copies every block of B rows into an aligned panel anyway (so a column
// map costs it nothing extra).
template <typename T>
int64_t gemm_copied_rows(GemmTile tile);

// The shortest runs that gemm_rows reads a mapped panel from in place, at full speed, when they tile it (runs of
// this many columns starting at multiples of it): half a panel where the micro-kernel loads its halves apart,
// else the whole panel. Other panels are read from more runs, more slowly, or assembled.
template <typename T>
int64_t gemm_run_width();

// C[M x N] += A[M x K] . B[N x K]^T with A and B row-major (lda, ldb): dot products along K, vectorised along K.
// The summation order depends on the shapes only.
template <typename T>
void gemm_nt(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc);

// The float micro-kernel in use: "avx512", "avx2" or "portable".
const char* gemm_isa();

// The machine's fp32 peak in GFLOP/s for that ISA: chains of register-only FMAs on every thread of torch's pool
// (at::get_num_threads), for about `seconds`. The benchmark's reference for "% of peak".
double fma_peak_gflops(double seconds);

// The same for bfloat16 products on AMX tiles (2 x 2 tile products in registers, as the AMX GEMMs block them), where
// they are in use (amx_bf16()); 0 elsewhere. The benchmark's "% of peak" for bfloat16 layers there.
double amx_peak_gflops(double seconds);

}  // namespace torch_convt::cpu
