// Building blocks of the CPU kernels (conv_cpu.cpp): strided addressing of (N, C, spatial...) tensors, tile
// sizes and per-thread scratch, the column gathers that feed the GEMM (tap by tap, or through a frame's windows;
// packed panels or row-major rows), and the strided output stores and loads. Scratch bounds per thread: one
// column tile (kColumnBytes) and one tile's windows (kWindowBytes), whatever the problem size.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common/index_math.h"
#include "../common/params.h"
#include "gemm.h"

namespace torch_convt::cpu {

constexpr int64_t kColumnBytes = int64_t(512) << 10;  // column tile per thread: stays in L2 from gather to GEMM
constexpr int64_t kPartialBytes = int64_t(32) << 20;  // weight-gradient partial sums, all chunks together
constexpr int64_t kWindowBytes = int64_t(4) << 20;  // frame windows of a tile per thread (see Frame)
constexpr int64_t kSplitBytes = int64_t(32) << 20;   // a whole-frame copy of the source (see split_size)
constexpr int kWindowSlot = 4;                       // their scratch slot (0-3: the kernels' own buffers)
constexpr int64_t kHeldBytes = int64_t(32) << 20;    // call-wide buffers kept across calls up to this size
constexpr int kWeightSlot = 5, kPlaneSlot = 6, kPartialSlot = 7;  // theirs: packed weights, frame copy, partials
constexpr int kWidenSlot = 8;  // 16-bit Winograd layers' weights widened to float (conv_cpu.cpp)
constexpr int64_t kMaxChunks = 8;                     // weight-gradient reduction chunks (fixed: determinism)
constexpr int64_t kMinTaskFlops = int64_t(1) << 21;   // below this a task is not worth a thread
constexpr int64_t kPackedWeightGradRows = 128;        // weight gradient: packed GEMM from this many rows of Y
constexpr int64_t kWeightGradKC = 512;                // weight gradient: K block of its packed GEMM
constexpr int64_t kMinWeightGradTile = 256;           // weight gradient: tiles not shorter than this, to balance chunks

// One kernel tap as seen from a tile: the source position of grid point m is m*step + offset per dim.
struct Tap {
  int64_t offset[kMaxDims];
  int64_t k;  // flat kernel index
};

// Element strides of an (N, C, spatial...) tensor in ConvParams' 3-slot form (1d/2d: leading singleton slots).
// Inputs and outputs are addressed through these, so channels_last (or any strided) tensors are read and
// written in place, never copied.
struct Strides {
  int64_t n = 0, c = 0, s[kMaxDims] = {0, 0, 0};
  int64_t at(int64_t i0, int64_t i1, int64_t i2) const { return i0 * s[0] + i1 * s[1] + i2 * s[2]; }
  // Rows of `extent` are dense within each (n, c): the channel's elements are one contiguous block.
  bool dense_rows(const int64_t* extent) const {
    return s[2] == 1 && (extent[1] == 1 || s[1] == extent[2]) && (extent[0] == 1 || s[0] == extent[1] * extent[2]);
  }
};

inline Strides strides_of(const at::Tensor& t) {
  Strides st;
  st.n = t.stride(0), st.c = t.stride(1);
  const int64_t dims = t.dim() - 2;
  for (int64_t j = 0; j < dims; ++j) st.s[kMaxDims - dims + j] = t.stride(2 + j);
  return st;
}

// Positions per tile: enough to amortise the GEMM, few enough for the columns to stay in cache. A multiple of
// the GEMM panel width `nr`.
inline int64_t tile_size(int64_t rows, int64_t positions, int64_t elem_size, int64_t nr) {
  int64_t t = kColumnBytes / (std::max<int64_t>(rows, 1) * elem_size);
  t = std::max(nr, t / nr * nr);
  return std::max<int64_t>(1, std::min(t, positions));
}

#if defined(__linux__) && defined(MADV_HUGEPAGE) && defined(MADV_NOHUGEPAGE)
// madvise(advice) over the 2 MiB pages wholly inside [data, data + bytes), for ranges of `least` bytes or more.
inline void advise_huge_range(void* data, size_t bytes, size_t least, int advice) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (p + kHuge - 1) & ~(kHuge - 1), last = (p + bytes) & ~(kHuge - 1);
  if (bytes >= least && last > first) madvise(reinterpret_cast<void*>(first), last - first, advice);
}
#endif

// Asks the OS to back [data, data + bytes) with transparent huge pages where it offers them on request (Linux's
// THP "madvise" mode, common); the 2 MiB pages wholly inside the range, from `least` bytes on. Advisory only.
inline void advise_huge_pages(void* data, size_t bytes, size_t least) {
#if defined(__linux__) && defined(MADV_HUGEPAGE) && defined(MADV_NOHUGEPAGE)
  advise_huge_range(data, bytes, least, MADV_HUGEPAGE);
#endif
}

// Takes back advise_huge_pages' advice for the same arguments, before the memory is freed, where the OS backs memory
// with huge pages only on request (Linux's THP "madvise" mode; there MADV_NOHUGEPAGE acts as no advice): a freed
// range would otherwise keep it, and a later allocation that ends part-way into one of its 2 MiB pages would get the
// whole page, most of it unused (measured: 1.8 MiB more resident memory for a 6.25 MiB output).
inline void unadvise_huge_pages(void* data, size_t bytes, size_t least) {
#if defined(__linux__) && defined(MADV_HUGEPAGE) && defined(MADV_NOHUGEPAGE)
  static const bool on_request = [] {
    char mode[128] = {};
    if (FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r")) {
      const size_t got = std::fread(mode, 1, sizeof(mode) - 1, f);
      mode[got] = 0;
      std::fclose(f);
    }
    return std::strstr(mode, "[madvise]") != nullptr;
  }();
  if (on_request) advise_huge_range(data, bytes, least, MADV_NOHUGEPAGE);
#endif
}

// Per-thread scratch that persists across calls, so small calls pay no allocation or zeroing. Its size is
// bounded by one tile (kColumnBytes-ish), whatever the problem size. Slot tells buffers apart. Contents undefined
// (zeros when it grows). Buffers of 256 KiB or more lie on huge pages (aligned to them, then advised; so at most
// 1.75 MiB more than asked a buffer): GEMMs read their rows and write their partial sums a page or more apart, and
// with 4 KiB pages every such access needs its own TLB entry (measured, alternated builds, from 2 MiB: weight gradient
// DCGAN x0.92 time, HiFi-GAN x0.90, stride-1 and k=4 3d x0.95-0.96; then from 256 KiB, where the Winograd blocks'
// transformed inputs and products of 0.5 MiB each came onto them: MONAI forward x0.97, k=4 3d x0.98-0.99). Each slot
// starts Slot x (4 KiB + 320 B) into its block, so that buffers that are all huge-page aligned do not map their
// starts to the same cache sets (without: MONAI and k=4 3d forward x1.04-1.05 time).
struct FreeBlock {
  size_t advised = 0;  // the bytes advised onto huge pages (from the block's start), whose advice is taken back
  void operator()(void* block) const {
    if (advised) unadvise_huge_pages(block, advised, 0);
    std::free(block);
  }
};
using Block = std::unique_ptr<void, FreeBlock>;

// A block of at least `bytes` (contents undefined), 64-byte aligned; from 2 MiB on (or where `huge`) aligned to 2 MiB,
// rounded up to a multiple of it and advised onto huge pages (scratch).
inline Block new_block(size_t bytes, bool huge = false) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t align = bytes >= kHuge || huge ? kHuge : 64, total = (bytes + align - 1) / align * align;
  Block block(std::aligned_alloc(align, total));
  if (!block) throw std::bad_alloc();
  if (align == kHuge) advise_huge_pages(block.get(), total, kHuge), block.get_deleter().advised = total;
  return block;
}

template <typename T, int Slot>
T* scratch(int64_t n) {
  struct Buffer {
    Block block;
    T* data = nullptr;
    int64_t size = 0;
  };
  thread_local Buffer buffer;
  if (buffer.size < n) {
    const size_t offset = size_t(Slot) * (4096 + 320), bytes = size_t(n) * sizeof(T) + offset;
    buffer = Buffer{};  // (empty until the new block is in place: an allocation failure leaves no dangling block)
    Block block = new_block(bytes, bytes >= (size_t(256) << 10));
    std::memset(block.get(), 0, bytes);
    buffer.data = reinterpret_cast<T*>(static_cast<char*>(block.get()) + offset);
    buffer.block = std::move(block);
    buffer.size = n;
  }
  return buffer.data;
}

// A call-wide buffer of `n` elements (contents undefined): up to kHeldBytes, the calling thread's own, kept for its
// later calls (fresh memory costs a page fault per 4 KiB on first touch, as much as packing a large layer's
// weights); above that, a new one that `fresh` owns for this call. Slot tells buffers apart.
template <typename T, int Slot>
T* held_buffer(int64_t n, std::unique_ptr<T[]>& fresh) {
  if (n * int64_t(sizeof(T)) <= kHeldBytes) return scratch<T, Slot>(n);
  fresh.reset(new T[n]);
  return fresh.get();
}

// Weights prepared for a kernel's GEMMs (Winograd-transformed), kept across calls: inference calls a layer
// again and again with the same weights, and preparing them took 6% of MONAI's forward (with its parallel region,
// x0.86 the time without it). An entry: the preparation's key (what fixes its layout), the address of the weights it
// was last prepared from, a sample of them (`print`) and, once two calls in a row at that address gave the same
// sample, a bitwise copy of them. A call whose key matches an entry's and whose weights equal its copy byte for byte
// reuses the prepared values: the same bits as preparing them again. Any other call prepares them into the entry of
// its key and address (reusing its buffer: no fresh pages) or a new one. Training changes the weights every step:
// their samples differ and no copy is made. Per calling thread at most kPreparedBytes of entries, the least recently
// used dropped (at most the cache limit: set_cache_limit; 0 keeps none); a preparation above half of that takes
// held_buffer's buffer. empty_cache() drops the calling thread's entries.
struct PreparedEntry {
  std::vector<int64_t> key;
  const void* weights = nullptr;
  uint64_t print = 0;
  bool copied = false, ok = false;
  Block data, source;
  size_t data_bytes = 0, source_bytes = 0;
};
constexpr size_t kPreparedBytes = size_t(64) << 20;
constexpr size_t kPreparedEntries = 32;

// The calling thread's entries, most recently used first; their budget (bytes, all threads alike).
inline std::vector<std::shared_ptr<PreparedEntry>>& prepared_list() {
  thread_local std::vector<std::shared_ptr<PreparedEntry>> list;
  return list;
}
inline std::atomic<size_t>& prepared_budget() {
  static std::atomic<size_t> bytes{kPreparedBytes};
  return bytes;
}

// Drops the calling thread's entries; returns their bytes.
inline size_t drop_prepared() {
  size_t bytes = 0;
  for (const auto& e : prepared_list()) bytes += e->data_bytes + e->source_bytes;
  prepared_list().clear();
  return bytes;
}

// The prepared values of the call (n elements of T): `entry` keeps them alive; ok: what `prepare` returned.
template <typename T>
struct Prepared {
  std::shared_ptr<PreparedEntry> entry;
  std::unique_ptr<T[]> fresh;
  T* data = nullptr;
  bool ok = false;
};

// 64 words spread over the weights and their size, mixed (FNV-1a).
inline uint64_t weight_print(const void* w, size_t bytes) {
  const unsigned char* p = static_cast<const unsigned char*>(w);
  uint64_t h = 1469598103934665603ull ^ bytes;
  for (size_t i = 0, words = bytes / 4; i < 64 && words > 0; ++i) {
    uint32_t v;
    std::memcpy(&v, p + i * words / 64 * 4, 4);
    h = (h ^ v) * 1099511628211ull;
  }
  return h;
}

// Whether two byte ranges are equal: memcmp, on all threads for 1 MiB and more (a large layer's 8 MiB of weights
// compared on the calling thread alone while the other waited took 9% of its forward).
inline bool same_bytes(const void* a, const void* b, size_t bytes) {
  constexpr size_t kChunk = size_t(256) << 10;
  if (bytes < (size_t(1) << 20)) return std::memcmp(a, b, bytes) == 0;
  std::atomic<bool> same{true};
  at::parallel_for(0, int64_t((bytes + kChunk - 1) / kChunk), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end && same.load(std::memory_order_relaxed); ++i) {
      const size_t at = size_t(i) * kChunk, n = std::min(kChunk, bytes - at);
      if (std::memcmp(static_cast<const char*>(a) + at, static_cast<const char*>(b) + at, n) != 0)
        same.store(false, std::memory_order_relaxed);
    }
  });
  return same.load();
}

// The weights [w, w + w_bytes) prepared by `prepare(T* data) -> bool` into n elements of T (laid out as `key` says),
// or reused from an earlier call's.
template <typename T, int Slot, typename Prepare>
Prepared<T> prepared_weights(std::vector<int64_t> key, const void* w, size_t w_bytes, int64_t n, Prepare&& prepare) {
  Prepared<T> r;
  const size_t offset = size_t(Slot) * (4096 + 320), bytes = size_t(n) * sizeof(T) + offset;
  const size_t budget = prepared_budget().load(std::memory_order_relaxed);
  auto& list = prepared_list();
  if (bytes + w_bytes > budget / 2) {
    if (budget == 0) list.clear();
    r.data = held_buffer<T, Slot>(n, r.fresh);
    r.ok = prepare(r.data);
    return r;
  }
  const auto values = [&](PreparedEntry& e) {
    return reinterpret_cast<T*>(static_cast<char*>(e.data.get()) + offset);
  };
  for (auto it = list.begin(); it != list.end(); ++it) {
    PreparedEntry& e = **it;
    if (e.copied && e.key == key && e.source_bytes == w_bytes && same_bytes(e.source.get(), w, w_bytes)) {
      std::rotate(list.begin(), it, it + 1);
      r.entry = list.front(), r.data = values(e), r.ok = e.ok;
      return r;
    }
  }
  const uint64_t print = weight_print(w, w_bytes);
  // (an entry in use further up this thread's stack is not written)
  auto it = std::find_if(list.begin(), list.end(), [&](const std::shared_ptr<PreparedEntry>& e) {
    return e.use_count() == 1 && e->weights == w && e->key == key;
  });
  const bool again = it != list.end() && (*it)->print == print;
  if (it != list.end()) {
    r.entry = *it;
    list.erase(it);
  } else {
    r.entry = std::make_shared<PreparedEntry>();
    r.entry->key = std::move(key), r.entry->weights = w;
    // (2 MiB aligned, as scratch's large buffers, and counted as whole 2 MiB pages, which the OS may back them with)
    r.entry->data = new_block(bytes, true), r.entry->data_bytes = (bytes + (size_t(2) << 20) - 1) >> 21 << 21;
  }
  PreparedEntry& e = *r.entry;
  e.print = print, e.copied = false;
  if (again) {
    if (e.source_bytes != w_bytes) e.source = new_block(w_bytes), e.source_bytes = w_bytes;
    std::memcpy(e.source.get(), w, w_bytes);
  } else {
    e.source.reset(), e.source_bytes = 0;
  }
  list.insert(list.begin(), r.entry);
  size_t total = 0, kept = 0;
  for (; kept < list.size() && kept < kPreparedEntries; ++kept) {
    total += list[kept]->data_bytes + list[kept]->source_bytes;
    if (total > budget) break;
  }
  list.resize(std::max<size_t>(kept, 1));
  r.data = values(e);
  e.ok = r.ok = prepare(r.data);
  e.copied = again;  // (only once prepared: a preparation that throws leaves nothing to reuse)
  return r;
}

// Work items per thread task, so that small problems do not pay for threads they cannot use.
inline int64_t grain(int64_t flops_per_item) {
  return std::max<int64_t>(1, kMinTaskFlops / std::max<int64_t>(1, flops_per_item));
}

// at::parallel_for(0, n, grain_size, f) with the items dealt out one at a time, in order, as the threads come for them,
// instead of in equal contiguous shares: a thread slowed down (by the other's memory traffic, by the host) takes
// fewer. For items whose results do not depend on the thread that computes them (so the bits never depend on the
// schedule). conv_transpose's grid and frame tiles, measured (alternated, 6-12 runs): the seed k=3, s=2 forward x0.95
// time (11 of 12 pairs), the large 3d U-Net k=2 forward x0.96; other forwards within noise. Not for items whose
// neighbours share cache lines or halos: the Winograd forward's blocks dealt out so took x1.08 (MONAI) and x1.18
// (dilated 3d) the time, each block's neighbours then on the other thread.
template <typename F>
void parallel_items(int64_t n, int64_t grain_size, const F& f) {
  if (n <= 0) return;
  const int64_t per_task = std::max<int64_t>(1, grain_size);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + per_task - 1) / per_task);
  if (threads <= 1 || at::in_parallel_region()) return f(int64_t(0), n);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(i, i + 1);
  });
}

// Where element (row, position) of a tile's column block goes. Packed (nr > 0): the GEMM's packed B operand,
// panels of NR positions with the rows as depth (forward ops). Row-major (nr == 0): rows of `ld` elements, read
// along positions by gemm_nt (weight gradient). Either way the offset is a row part plus a position part.
struct ColumnLayout {
  int64_t depth;  // packed: K of the packed operand (the row count)
  int64_t nr;     // packed: panel width NR, a power of two (offsets use shifts, not divisions); 0: row-major
  int64_t ld;     // row-major: row length

  bool packed() const { return nr > 0; }
  int64_t row_part(int64_t row) const { return row * (packed() ? nr : ld); }
  int64_t pos_part(int64_t pos) const {
    if (!packed()) return pos;
    const int shift = __builtin_ctzll(static_cast<uint64_t>(nr));
    return (pos >> shift) * depth * nr + (pos & (nr - 1));
  }
  // End of the contiguous piece of [j0, last) at tile positions base + j: a panel edge, or the run's end.
  int64_t piece_end(int64_t base, int64_t j0, int64_t last) const {
    return packed() ? std::min(last, j0 + nr - ((base + j0) & (nr - 1))) : last;
  }
  // Zeroes the panel padding past `count` positions, which the GEMM reads but must not count.
  template <typename T>
  void zero_padding(T* col, int64_t rows, int64_t count) const {
    if (!packed()) return;
    for (int64_t i = count; i < (count + nr - 1) / nr * nr; ++i)
      for (int64_t k = 0; k < rows; ++k) col[(i / nr) * depth * nr + k * nr + i % nr] = T(0);
  }
};

// Calls fn(i0, i1, first, last, m) for each innermost-dim run of the flat range [m_begin, m_end) over the
// row-major extents `frame`: points (i0, i1, j) for j in [first, last), the first of them at flat position m.
template <typename Fn>
inline void for_each_run(const int64_t* frame, int64_t m_begin, int64_t m_end, Fn&& fn) {
  int64_t m = m_begin, idx[kMaxDims];
  unflatten3(m, frame, idx);
  while (m < m_end) {
    const int64_t first = idx[2], last = std::min(frame[2], first + (m_end - m));
    fn(idx[0], idx[1], first, last, m);
    m += last - first;
    idx[2] = 0;
    if (++idx[1] == frame[1]) idx[1] = 0, ++idx[0];
  }
}

// One innermost-dim run of a tile's grid: grid points (idx0, idx1, j) for j in [first, last), at tile
// positions base + j.
struct Run {
  int64_t idx0, idx1, first, last, base;
};

// Column block of a tile: element (row = c*T + t, position m - m_begin) = src at channel c and spatial
// position_d = m_d*step_d + taps[t].offset_d (strides `st`) over the row-major grid of m, and zero where that falls
// outside `extent`. Written straight into the GEMM's packed layout. The runs' contiguous pieces (their bounds and
// offsets) are found once for all channels; then channel by channel, every tap: a channel's taps read a few
// neighbouring source lines, which stay in L1 (taps outermost, every channel's lines were read again from beyond
// L2 for each tap: the seed k=3, s=2 layer's input gradient, 33 channels over 9 lines of 200 points a tile, spent
// half of its time in this gather).
template <typename scalar_t, typename acc_t>
void gather_columns(const scalar_t* src, int64_t channels, const int64_t* extent, const Strides& st,
                    const std::vector<Tap>& taps, const int64_t* step, const int64_t* grid, int64_t m_begin, int64_t m_end, acc_t* col,
                    const ColumnLayout& layout) {
  const int64_t T = static_cast<int64_t>(taps.size());
  thread_local std::vector<int64_t> pos, lines, tap_first;
  thread_local std::vector<Run> runs;
  // the pieces of all taps: tap t's are [tap_first[t], tap_first[t + 1]), piece i reading source line lines[i]
  thread_local std::vector<Segment> segments;
  pos.resize(m_end - m_begin);
  for (int64_t i = 0; i < m_end - m_begin; ++i) pos[i] = layout.pos_part(i);
  runs.clear();
  for_each_run(grid, m_begin, m_end, [&](int64_t i0, int64_t i1, int64_t first, int64_t last, int64_t m) {
    runs.push_back({i0, i1, first, last, m - m_begin - first});
  });
  const int64_t s2 = step[2], inner = step[2] * st.s[2];  // grid step along the innermost dim, in elements
  segments.clear(), lines.clear(), tap_first.assign(1, 0);
  for (int64_t t = 0; t < T; ++t) {
    const Tap& tap = taps[t];
    int64_t lo2, hi2;  // innermost-dim grid range that lands inside the source
    valid_range(tap.offset[2], s2, extent[2], grid[2], &lo2, &hi2);
    for (const Run& run : runs) {
      const int64_t p0 = run.idx0 * step[0] + tap.offset[0];
      const int64_t p1 = run.idx1 * step[1] + tap.offset[1];
      int64_t lo = run.last, hi = run.last, line = 0;
      if (p0 >= 0 && p0 < extent[0] && p1 >= 0 && p1 < extent[1]) {
        lo = std::clamp(lo2, run.first, run.last), hi = std::clamp(hi2, lo, run.last);
        line = st.at(p0, p1, tap.offset[2]);
      }
      for (int64_t j0 = run.first; j0 < run.last;) {
        const int64_t j1 = layout.piece_end(run.base, j0, run.last);
        const int64_t a = std::clamp(lo, j0, j1), b = std::clamp(hi, a, j1);
        segments.push_back({j0, a, b, j1, pos[run.base + j0] - j0});
        lines.push_back(line);
        j0 = j1;
      }
    }
    tap_first.push_back(static_cast<int64_t>(segments.size()));
  }
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    // Every channel's pieces in one gather_segments call: a piece's positions shifted to its place among the
    // channel's T rows, its source offset to match. (The element loop below was half of the seed k=3, s=2 layer's
    // input gradient on an AVX2 CPU.)
    thread_local std::vector<Segment> flat;
    flat.resize(segments.size());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = tap_first[t]; i < tap_first[t + 1]; ++i) {
        const Segment& sg = segments[i];
        const int64_t d = layout.row_part(t) + sg.offset;
        flat[i] = {sg.j0 + d, sg.a + d, sg.b + d, sg.j1 + d, lines[i] - inner * d};
      }
    const int64_t count = static_cast<int64_t>(flat.size());
    gather_segments(src, st.c, channels, flat.data(), count, inner, col, layout.row_part(T));
    layout.zero_padding(col, channels * T, m_end - m_begin);
    return;
  }
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* in_c = src + c * st.c;
    for (int64_t t = 0; t < T; ++t) {
      acc_t* out = col + layout.row_part(c * T + t);
      for (int64_t i = tap_first[t]; i < tap_first[t + 1]; ++i) {
        const Segment& sg = segments[i];
        const scalar_t* in = in_c + lines[i];
        acc_t* o = out + sg.offset;
        for (int64_t j = sg.j0; j < sg.a; ++j) o[j] = acc_t(0);
        if (inner == 1) {
          for (int64_t j = sg.a; j < sg.b; ++j) o[j] = static_cast<acc_t>(in[j]);
        } else if (inner == 2) {  // (a constant step: vectorised as de-interleaving)
          for (int64_t j = sg.a; j < sg.b; ++j) o[j] = static_cast<acc_t>(in[2 * j]);
        } else {
          for (int64_t j = sg.a; j < sg.b; ++j) o[j] = static_cast<acc_t>(in[j * inner]);
        }
        for (int64_t j = sg.b; j < sg.j1; ++j) o[j] = acc_t(0);
      }
    }
  }
  layout.zero_padding(col, channels * T, m_end - m_begin);
}

// Whether scalar_t is a 16-bit float accumulated in float (its rows are stored through store_interleaved16).
template <typename scalar_t, typename acc_t>
constexpr bool is_float16 = (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) &&
                            std::is_same_v<acc_t, float>;

// acc_t -> scalar_t as static_cast does (bfloat16: round to nearest even, NaN -> quiet NaN), but branch-free, so
// the output stores of bfloat16 layers are not dominated by the conversion.
template <typename scalar_t, typename acc_t>
inline scalar_t narrow_to(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// Phases stacked along dim 1 in one store (store_rows_interleaved): layer l is the phase at dim-1 offset offset[1] +
// l, its rows shift[l] elements after layer 0's, and it has lines[l] of the grid's lines (its own grid).
constexpr int64_t kMaxStack = 16;
struct StoreStack {
  int64_t layers = 1;
  const int64_t* shift = nullptr;
  const int64_t* lines = nullptr;
};

// The innermost-dim runs of [m_begin, m_end) over the row-major extents `fr` (>= grid) that lie inside `grid`, as
// stores see them: dst offset of the run's point j = 0, rows offset of it, and the run's [first, stop); those that
// end at the grid's end less `trim` values (StoreRun). With a stack, each line's runs of every layer in turn, which
// are consecutive output rows. Computed once per store, shared by all channels. (The calling thread's; valid until
// its next call.)
inline const std::vector<StoreRun>& store_runs(const Strides& st, const int64_t* step, const int64_t* offset,
                                               const int64_t* grid, const int64_t* fr, int64_t m_begin,
                                               int64_t m_end, int64_t trim = 0, const StoreStack& stack = {}) {
  thread_local std::vector<StoreRun> runs;
  runs.clear();
  for_each_run(fr, m_begin, m_end, [&](int64_t i0, int64_t i1, int64_t first, int64_t last, int64_t m) {
    const int64_t hi = std::min(last, grid[2]);
    if (i0 >= grid[0] || first >= hi) return;
    for (int64_t l = 0; l < stack.layers; ++l) {
      if (i1 >= (stack.lines ? stack.lines[l] : grid[1])) continue;
      runs.push_back({st.at(i0 * step[0] + offset[0], i1 * step[1] + offset[1] + l, offset[2]),
                      m - m_begin - first + (stack.shift ? stack.shift[l] : 0), first, hi, hi == grid[2] ? trim : 0});
    }
  });
  return runs;
}

// cpu::store_interleaved(16) where it takes the types and the row count (a power of two up to kMaxStoreWays; one
// row: dense rows only): all channels and runs in one call. False where it does not.
template <typename scalar_t, typename acc_t>
bool store_fast(const acc_t* const* rows, int64_t ways, int64_t step, int64_t channels, int64_t ld, const acc_t* bias,
                const std::vector<StoreRun>& runs, scalar_t* dst, int64_t dst_channel_stride, bool stream) {
  if (ways > kMaxStoreWays || (ways & (ways - 1)) != 0 || (ways == 1 && step != 1)) return false;
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    store_interleaved(rows, ways, step, StoreChannels{channels, ld, dst_channel_stride, bias}, runs.data(), runs.size(),
                      dst, stream);
    return true;
  } else if constexpr (is_float16<scalar_t, acc_t>) {
    store_interleaved16(rows, ways, step, StoreChannels{channels, ld, dst_channel_stride, bias}, runs.data(), runs.size(),
                        reinterpret_cast<uint16_t*>(dst), std::is_same_v<scalar_t, c10::BFloat16>, stream);
    return true;
  }
  return false;
}

// dst at channel c and spatial position_d = m_d*step_d + offset_d (strides `st`) = rows[c*ld + m - m_begin]
// (+ bias[c]) over the grid of m. rows == nullptr stores the bias alone (or zero). With a `frame` (>= grid in
// every dim), m is flat over the frame instead, and only the points inside the grid are stored. `stream`: float
// rows of a dense innermost dim are written with non-temporal stores (store_interleaved).
template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* rows, int64_t ld, int64_t channels, const acc_t* bias, scalar_t* dst,
                const Strides& st, const int64_t* step, const int64_t* offset, const int64_t* grid,
                int64_t m_begin, int64_t m_end, const int64_t* frame = nullptr, bool stream = false) {
  const int64_t inner = step[2] * st.s[2];
  const std::vector<StoreRun>& runs = store_runs(st, step, offset, grid, frame ? frame : grid, m_begin, m_end);
  if (rows && inner == 1 && store_fast(&rows, 1, 1, channels, ld, bias, runs, dst, st.c, stream)) return;
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t b = bias ? bias[c] : acc_t(0);
    scalar_t* d = dst + c * st.c;
    for (const StoreRun& run : runs) {
      scalar_t* row = d + run.dst;
      if (rows) {
        const acc_t* in = rows + c * ld + run.src;
        for (int64_t j = run.first; j < run.stop; ++j) row[j * inner] = narrow_to<scalar_t>(in[j] + b);
      } else {
        for (int64_t j = run.first; j < run.stop; ++j) row[j * inner] = narrow_to<scalar_t>(b);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Frame columns: the packed column operand of a correlation without per-tap bounds checks.
//
// Tap t reads source position m*step + offset_t at grid point m. Writing offset_t = q_t*step + r_t (0 <= r_t <
// step), that is point m + q_t of the sub-sampled source plane r_t: src_r[u] = src[u*step + r]. Padded by
// `pad` = max(0, -min q) at the low end, every plane is laid out on one frame of extents `ext` (>= grid), in
// which the flat index of m + q_t + pad is flat(m) + off_t: each tap is a constant shift. Computing the GEMM over
// flat frame positions f = flat(m) (points outside the grid are computed and dropped at the store), column row
// (c, t) over a panel of positions is one contiguous run of plane r_t: the gather becomes, per channel, one
// bounds-checked copy of a window of each plane (shared by all taps), then plain copies of NR-wide runs.
// ---------------------------------------------------------------------------------------------------------
struct Frame {
  int64_t ext[kMaxDims], pad[kMaxDims], step[kMaxDims];
  int64_t positions = 0;                     // flat(grid - 1) + 1: the frame positions that cover the grid
  std::vector<std::array<int64_t, kMaxDims>> planes;  // r of each plane in use
  std::vector<int64_t> tap_plane, tap_off;   // per tap: plane index, flat shift
  int64_t min_off = 0, span = 0;             // window of a tile [f0, f1): [f0 + min_off, f1 + min_off + span)

  int64_t flat(const int64_t* u) const { return (u[0] * ext[1] + u[1]) * ext[2] + u[2]; }
  int64_t total() const { return ext[0] * ext[1] * ext[2]; }
  // Elements of one (channel, plane) window for a tile of `count` positions read in panels of `nr`.
  int64_t window(int64_t count, int64_t nr) const { return (count + nr - 1) / nr * nr + span; }
};

// The frame of `taps` over `grid`. A given `pad` (>= the taps' own) and `ext` replace the ones computed: frames
// of several tap sets laid over the same source plane (transposed layers' phases: share_windows in conv_cpu.cpp).
inline Frame make_frame(const std::vector<Tap>& taps, const int64_t* step, const int64_t* grid,
                        const int64_t* pad = nullptr, const int64_t* ext = nullptr) {
  Frame fr;
  int64_t lo[kMaxDims], hi[kMaxDims];
  for (int d = 0; d < kMaxDims; ++d) {
    lo[d] = hi[d] = taps.empty() ? 0 : floor_div(taps[0].offset[d], step[d]);
    for (const Tap& t : taps) {
      const int64_t q = floor_div(t.offset[d], step[d]);
      lo[d] = std::min(lo[d], q), hi[d] = std::max(hi[d], q);
    }
    fr.pad[d] = pad ? pad[d] : std::max<int64_t>(0, -lo[d]);
    fr.ext[d] = ext ? ext[d] : grid[d] + std::max<int64_t>(0, hi[d] + fr.pad[d]);
    fr.step[d] = step[d];
  }
  const int64_t last[kMaxDims] = {grid[0] - 1, grid[1] - 1, grid[2] - 1};
  fr.positions = fr.flat(last) + 1;
  int64_t max_off = 0;
  for (size_t i = 0; i < taps.size(); ++i) {
    std::array<int64_t, kMaxDims> r;
    int64_t u[kMaxDims];
    for (int d = 0; d < kMaxDims; ++d) {
      const int64_t q = floor_div(taps[i].offset[d], step[d]);
      r[d] = taps[i].offset[d] - q * step[d];
      u[d] = q + fr.pad[d];
    }
    auto it = std::find(fr.planes.begin(), fr.planes.end(), r);
    if (it == fr.planes.end()) it = fr.planes.insert(fr.planes.end(), r);
    fr.tap_plane.push_back(it - fr.planes.begin());
    fr.tap_off.push_back(fr.flat(u));
    fr.min_off = i == 0 ? fr.tap_off.back() : std::min(fr.min_off, fr.tap_off.back());
    max_off = std::max(max_off, fr.tap_off.back());
  }
  fr.span = max_off - fr.min_off;
  return fr;
}

// Windows of a tile: win[(c*P + plane)*len + i] = plane `plane` of channel c at frame position w0 + i (zero
// outside the source and past the frame), P = planes in use, i < len. acc_t = uint16_t: a 16-bit source's values
// as they are (bits copied, not converted). With `mr` (float only), each plane's windows
// are laid out instead as the packed A operand of `channels` rows `len` deep (copy_segments_packed), plane after
// plane: the tap-by-tap weight gradient's operand, without a copy in between (weight gradient x0.84 time on the
// k=4, s=2 3d layer, x0.86 on MONAI's k=3, x0.93 on the stride-1 and dilated 3d ones).
template <typename scalar_t, typename acc_t>
void gather_windows(const Frame& fr, const scalar_t* src, int64_t channels, const int64_t* extent,
                    const Strides& st, int64_t w0, int64_t len, acc_t* win, int64_t ld = -1, int64_t mr = 0) {
  if (ld < 0) ld = len;  // windows (c, plane) lie ld elements apart
  const int64_t P = static_cast<int64_t>(fr.planes.size()), total = fr.total();
  thread_local std::vector<Segment> rows;  // a frame row: zero [j0, a), copy [a, b), zero [b, j1); source line
  for (int64_t pi = 0; pi < P; ++pi) {
    const int64_t* r = fr.planes[pi].data();
    const int64_t off2 = r[2] - fr.pad[2] * fr.step[2];  // source position along dim 2 = u2*step2 + off2
    int64_t lo2, hi2;
    valid_range(off2, fr.step[2], extent[2], fr.ext[2], &lo2, &hi2);
    rows.clear();
    int64_t f = w0, u[kMaxDims];
    unflatten3(std::min(f, total), fr.ext, u);
    while (f < w0 + len) {
      if (f >= total) {  // past the frame: zeros
        rows.push_back({f - w0, len, len, len, 0});
        break;
      }
      const int64_t j1 = std::min(fr.ext[2], u[2] + (w0 + len - f));
      const int64_t p0 = (u[0] - fr.pad[0]) * fr.step[0] + r[0], p1 = (u[1] - fr.pad[1]) * fr.step[1] + r[1];
      const int64_t base = f - w0 - u[2];  // window index of u2 = 0 on this row
      if (p0 >= 0 && p0 < extent[0] && p1 >= 0 && p1 < extent[1]) {
        const int64_t a = std::clamp(lo2, u[2], j1), b = std::clamp(hi2, a, j1);
        rows.push_back({base + u[2], base + a, base + b, base + j1, st.at(p0, p1, off2) - base * fr.step[2] * st.s[2]});
      } else {
        rows.push_back({base + u[2], base + j1, base + j1, base + j1, 0});
      }
      f += j1 - u[2];
      u[2] = 0;
      if (++u[1] == fr.ext[1]) u[1] = 0, ++u[0];
    }
    const int64_t inner = fr.step[2] * st.s[2];
    if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
      if (mr > 0) {
        copy_segments_packed(src, st.c, channels, rows.data(), rows.size(), inner, mr, len,
                             win + pi * packed_size(channels, len, mr));
        continue;
      }
      if (inner <= 2) {  // (every channel in one call: AVX-512 copies and stride-2 de-interleaving)
        copy_segments(src, st.c, channels, rows.data(), rows.size(), inner, win + pi * ld, P * ld);
        continue;
      }
    }
    if constexpr (std::is_same_v<acc_t, uint16_t>) {  // (16-bit values kept as they are: bfloat16 windows for AMX)
      static_assert(sizeof(scalar_t) == 2, "raw windows are of 16-bit sources");
      copy_segments16(reinterpret_cast<const uint16_t*>(src), st.c, channels, rows.data(), rows.size(), inner,
                      win + pi * ld, P * ld);
      continue;
    }
    if constexpr (is_float16<scalar_t, acc_t>) {
      if (mr == 0) {  // (16-bit layers: the same, widened)
        copy_segments16(reinterpret_cast<const uint16_t*>(src), st.c, channels, rows.data(), rows.size(), inner,
                        std::is_same_v<scalar_t, c10::BFloat16>, win + pi * ld, P * ld);
        continue;
      }
    }
    for (int64_t c = 0; c < channels; ++c) {
      acc_t* out = win + (c * P + pi) * ld;
      const scalar_t* in = src + c * st.c;
      for (const Segment& sg : rows) {
        for (int64_t j = sg.j0; j < sg.a; ++j) out[j] = acc_t(0);
        if (inner == 1) {
          for (int64_t j = sg.a; j < sg.b; ++j) out[j] = static_cast<acc_t>(in[sg.offset + j]);
        } else {
          for (int64_t j = sg.a; j < sg.b; ++j) out[j] = static_cast<acc_t>(in[sg.offset + j * inner]);
        }
        for (int64_t j = sg.b; j < sg.j1; ++j) out[j] = acc_t(0);
      }
    }
  }
}

// The packed B operand (gemm.h) of a tile of `count` positions: row c*T + t of panel p is the run
// [p*NR + off_t - min_off, +NR) of window (c, plane_t), found at win + c*channel_stride + plane*plane_stride.
// Window elements at or past `limit` are not read (zeros instead). Panel positions past `count` read window
// slack (zeros or frame points off the grid): those GEMM columns are computed but never stored.
template <typename acc_t>
void pack_frame_columns(const Frame& fr, const acc_t* win, int64_t channel_stride, int64_t plane_stride,
                        int64_t limit, int64_t channels, int64_t count, int64_t nr, acc_t* col) {
  const int64_t T = static_cast<int64_t>(fr.tap_off.size()), depth = channels * T;
  for (int64_t p0 = 0; p0 < count; p0 += nr) {
    acc_t* dst = col + p0 * depth;
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t t = 0; t < T; ++t, dst += nr) {
        const int64_t i = p0 + fr.tap_off[t] - fr.min_off;
        const acc_t* s = win + c * channel_stride + fr.tap_plane[t] * plane_stride + i;
        if (i + nr <= limit) {
          for (int64_t l = 0; l < nr; ++l) dst[l] = s[l];  // (a call to memcpy costs more than these few vectors)
        } else {
          for (int64_t l = 0; l < nr; ++l) dst[l] = i + l < limit ? s[l] : acc_t(0);
        }
      }
  }
}

// Whether the source's channel planes already are the frame's one plane: dense, no padding, no sub-sampling
// (kernel == stride transposed layers, unpadded stride-1 convs). Then the columns are packed from it directly.
inline bool source_is_frame(const Frame& fr, const int64_t* extent, const Strides& st) {
  const int64_t zero[kMaxDims] = {0, 0, 0};
  return fr.planes.size() == 1 && std::equal(zero, zero + kMaxDims, fr.planes[0].begin()) &&
         std::equal(zero, zero + kMaxDims, fr.pad) && std::equal(fr.ext, fr.ext + kMaxDims, extent) &&
         fr.step[0] == 1 && fr.step[1] == 1 && fr.step[2] == 1 && st.dense_rows(extent);
}

// The windows of a tile: window (c, plane) starts at data + c*channel_stride + plane*plane_stride, and its
// elements at or past `limit` must not be read.
template <typename acc_t>
struct Windows {
  const acc_t* data;
  int64_t channel_stride, plane_stride, limit;
};

// The windows of the `len` frame positions from w0, for channels [0, channels) of `src`: gathered into scratch
// (gather_windows), or `src` itself where source_is_frame and the types agree.
template <typename scalar_t, typename acc_t>
Windows<acc_t> frame_windows(const Frame& fr, const scalar_t* src, int64_t channels, const int64_t* extent,
                             const Strides& st, int64_t w0, int64_t len) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (source_is_frame(fr, extent, st)) return {src + w0, st.c, 0, fr.total() - w0};
  }
  const int64_t P = static_cast<int64_t>(fr.planes.size());
  acc_t* win = scratch<acc_t, kWindowSlot>(channels * P * len);
  gather_windows(fr, src, channels, extent, st, w0, len, win);
  return {win, P * len, len, len};
}

// A whole-frame copy of channels [0, channels) of `src` (gather_windows over every frame position): for frames
// whose windows are long next to a tile (strided 3d layers with deep columns), building the planes once and
// reading every tile's windows from it (`split` below) is cheaper than gathering windows tile by tile.
inline int64_t split_size(const Frame& fr, int64_t channels) {
  return channels * static_cast<int64_t>(fr.planes.size()) * fr.total();
}

// Windows of the tile from f0 in a whole-frame copy whose channel 0 starts at `split`.
template <typename acc_t>
Windows<acc_t> split_windows(const Frame& fr, const acc_t* split, int64_t f0) {
  const int64_t w0 = f0 + fr.min_off, total = fr.total();
  return {split + w0, static_cast<int64_t>(fr.planes.size()) * total, total, total - w0};
}

// Whether a GEMM over `M` grid points gathers its columns through a frame (above): when the frame adds few
// computed points off the grid, and either the source is the frame itself (no gather at all), or the windows of
// a tile are smaller than its columns (several taps share them; the span of the shifts is small next to the
// tile), or at most `slack` times as large, and fit the window budget.
template <typename scalar_t, typename acc_t>
bool use_frame(const Frame& fr, int64_t M, const int64_t* extent, const Strides& st, int64_t channels, int64_t tile,
               int64_t nr, int64_t slack = 1) {
  if (fr.positions > M + M / 2) return false;
  if (std::is_same_v<scalar_t, acc_t> && source_is_frame(fr, extent, st)) return true;
  const int64_t window = static_cast<int64_t>(fr.planes.size()) * fr.window(tile, nr);
  const int64_t taps = static_cast<int64_t>(fr.tap_off.size());
  return taps > 1 && window <= slack * taps * tile && channels * window * int64_t(sizeof(acc_t)) <= kWindowBytes;
}

// Whether a framed GEMM reads its windows from a whole-frame copy of `channels` source channels (split_size),
// built once: when gathering them tile by tile would copy the frame more than 4 times over (measured:
// at ~3 times the tile-by-tile windows, which stay in L2, are as fast), and the copy fits kSplitBytes.
template <typename scalar_t, typename acc_t>
bool use_split(const Frame& fr, int64_t M, const int64_t* extent, const Strides& st, int64_t channels, int64_t tile,
               int64_t nr) {
  if (fr.positions > M + M / 2 || (std::is_same_v<scalar_t, acc_t> && source_is_frame(fr, extent, st))) return false;
  return fr.window(tile, nr) * ceil_div(fr.positions, tile) > 4 * fr.total() &&
         split_size(fr, channels) * int64_t(sizeof(acc_t)) <= kSplitBytes;
}

// Calls fn(n, a, b, j) for each image n that the range [m0, m1) of points over the batch (n-major, images of
// prod(layout) points) touches: its own points [a, b), the first of them at range index j.
template <typename Fn>
inline void for_each_image(const int64_t* layout, int64_t m0, int64_t m1, Fn&& fn) {
  const int64_t M = layout[0] * layout[1] * layout[2];
  for (int64_t m = m0; m < m1;) {
    const int64_t n = m / M, a = m - n * M, b = std::min(M, a + (m1 - m));
    fn(n, a, b, m - m0);
    m += b - a;
  }
}

// The frame position of point m of `layout` (row-major extents within the frame's: the grid's, or the grid's lines
// of the frame; see grid_windows).
inline int64_t frame_point(const Frame& fr, const int64_t* layout, int64_t m) {
  int64_t u[kMaxDims];
  unflatten3(m, layout, u);
  return fr.flat(u);
}

// The window of an image's points [a, b) of `layout`: its first frame position (frame_point(a) + lo) and its
// length, through `span` past the last point's.
inline std::pair<int64_t, int64_t> grid_window(const Frame& fr, const int64_t* layout, int64_t a, int64_t b, int64_t lo,
                                               int64_t span) {
  const int64_t first = frame_point(fr, layout, a);
  return {first + lo, frame_point(fr, layout, b - 1) - first + 1 + span};
}

// cols[j] = base + the frame position of point a + (j - j0) of `layout`, for j in [j0, j0 + b - a).
inline void map_points(const Frame& fr, const int64_t* layout, int64_t a, int64_t b, int64_t j0, int64_t base,
                       std::vector<int64_t>& cols) {
  int64_t* out = cols.data() + j0 - a;
  for_each_run(layout, a, b, [&](int64_t i0, int64_t i1, int64_t first, int64_t last, int64_t m) {
    const int64_t u[kMaxDims] = {i0, i1, 0}, line = base + fr.flat(u);
    for (int64_t i = first; i < last; ++i) out[m - first + i] = line + i;
  });
}

// grid_windows for a source whose images already are the frame's (read in place): image n's plane `plane` of
// channel c starts at `src` + n*n_stride + c*channel_stride + plane*plane_stride (n counted from m0's image 0).
template <typename acc_t>
Windows<acc_t> grid_windows_in_place(const Frame& fr, const int64_t* layout, const acc_t* src, int64_t n_stride,
                                     int64_t channel_stride, int64_t plane_stride, int64_t m0, int64_t m1,
                                     std::vector<int64_t>& cols) {
  cols.resize(m1 - m0);
  const int64_t M = layout[0] * layout[1] * layout[2], n0 = m0 / M, start = frame_point(fr, layout, m0 - n0 * M);
  for_each_image(layout, m0, m1, [&](int64_t n, int64_t a, int64_t b, int64_t j) {
    map_points(fr, layout, a, b, j, (n - n0) * n_stride - start, cols);
  });
  return {src + n0 * n_stride + start + fr.min_off, channel_stride, plane_stride, 0};
}

// Grid tiles: a tile is a range [m0, m1) of the points of `layout` over the batch (n-major), where `layout` is the
// grid, or (grid0, grid1, frame ext2): the frame's lines that hold grid points (their pad points are computed and
// dropped). Unlike a frame tile, it skips the frame's points off those lines and may span images. Its columns are
// read through a column map (gemm_rows): tap t of channel c reads point m0 + j at data + c*channel_stride +
// plane_t*plane_stride + tap_off[t] - fr.min_off + cols[j], where data is frame position frame_point(a) +
// fr.min_off of the tile's first point a. Returns those windows, and the map in `cols`: the windows of the images
// follow one another (gathered, from frame position frame_point + lo through `span` past each image's last point;
// lo <= fr.min_off and lo + span >= the taps' largest offset), or are the source itself where it is the frame
// (images `n_stride` apart).
template <typename scalar_t, typename acc_t>
Windows<acc_t> grid_windows(const Frame& fr, const int64_t* layout, const scalar_t* src, int64_t n_stride,
                            int64_t channels, const int64_t* extent, const Strides& st, int64_t m0, int64_t m1,
                            int64_t lo, int64_t span, std::vector<int64_t>& cols) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (source_is_frame(fr, extent, st)) return grid_windows_in_place(fr, layout, src, n_stride, st.c, 0, m0, m1, cols);
  }
  cols.resize(m1 - m0);
  const int64_t P = static_cast<int64_t>(fr.planes.size());
  int64_t ld = 0;
  for_each_image(layout, m0, m1, [&](int64_t, int64_t a, int64_t b, int64_t) {
    ld += grid_window(fr, layout, a, b, lo, span).second;
  });
  acc_t* win = scratch<acc_t, kWindowSlot>(channels * P * ld);
  int64_t base = 0;
  for_each_image(layout, m0, m1, [&](int64_t n, int64_t a, int64_t b, int64_t j) {
    const auto [w0, len] = grid_window(fr, layout, a, b, lo, span);
    gather_windows(fr, src + n * n_stride, channels, extent, st, w0, len, win + base, ld);
    // window element base + i is this image's frame position w0 + i, and data is element fr.min_off - lo
    map_points(fr, layout, a, b, j, base - (w0 - lo), cols);
    base += len;
  });
  return {win + fr.min_off - lo, P * ld, ld, 0};
}

// C[rows x count] (+)= A . the columns of the tile [f0, f0 + count) of frame positions, from channels
// [0, channels) of `src`, or of the whole-frame copy `split` where one is given. Column row (c, t) is a run of a
// window, so the GEMM reads B straight from the windows (gemm_rows) for every panel whose runs lie inside them;
// the rest (a panel reading past the end of a source that is its own frame) is packed with zeros.
// frame_gemm_windows is the GEMM part, from windows `w` that start at frame position f0 + fr.min_off.
// `col` holds the packed columns of at most `col_cols` positions: panels that cannot be read in place are packed
// and multiplied that many at a time.
// With a column map `cols` (grid_windows), column j reads the windows at cols[j] instead of j, and every column
// through it (no window limit applies: the map reads only points of the grid). With a column map, `taps` (indices
// into the frame's) may name the only taps multiplied: then A is `channels` x taps->size() deep, rows (c, taps[i]).
template <typename acc_t>
void frame_gemm_windows(const Frame& fr, const Windows<acc_t>& w, int64_t channels, int64_t count, GemmTile gt,
                        int64_t rows, const acc_t* a_packed, bool accumulate, acc_t* c, int64_t ldc, acc_t* col,
                        int64_t col_cols, const int64_t* cols = nullptr, const std::vector<int64_t>* taps = nullptr) {
  TORCH_CHECK(!taps || cols, "torch_convt: internal error: a tap subset without a column map");
  const int64_t T = taps ? static_cast<int64_t>(taps->size()) : static_cast<int64_t>(fr.tap_off.size());
  const int64_t depth = channels * T;
  // panels [0, direct) are read in place: their runs end by window element direct + span <= limit
  const int64_t whole = (count + gt.nr - 1) / gt.nr * gt.nr;
  const int64_t direct = cols || whole + fr.span <= w.limit
                             ? count
                             : std::max<int64_t>(0, (w.limit - fr.span) / gt.nr * gt.nr);
  if (direct > 0) {
    thread_local std::vector<const acc_t*> b_rows;
    b_rows.resize(depth);
    for (int64_t ch = 0; ch < channels; ++ch)
      for (int64_t i = 0; i < T; ++i) {
        const int64_t t = taps ? (*taps)[i] : i;
        b_rows[ch * T + i] =
            w.data + ch * w.channel_stride + fr.tap_plane[t] * w.plane_stride + fr.tap_off[t] - fr.min_off;
      }
    gemm_rows<acc_t>(gt, rows, direct, depth, a_packed, b_rows.data(), accumulate, c, ldc, cols);
  }
  const int64_t chunk = std::max(gt.nr, col_cols / gt.nr * gt.nr);
  for (int64_t j0 = direct; j0 < count; j0 += chunk) {
    const int64_t n = std::min(chunk, count - j0);
    pack_frame_columns(fr, w.data + j0, w.channel_stride, w.plane_stride, w.limit - j0, channels, n, gt.nr, col);
    gemm_packed<acc_t>(gt, rows, n, depth, a_packed, col, accumulate, c + j0, ldc);
  }
}

template <typename scalar_t, typename acc_t>
void frame_gemm(const Frame& fr, const scalar_t* src, int64_t channels, const int64_t* extent, const Strides& st,
                int64_t f0, int64_t count, GemmTile gt, int64_t rows, const acc_t* a_packed, bool accumulate,
                acc_t* c, int64_t ldc, acc_t* col, int64_t col_cols, const acc_t* split = nullptr) {
  const Windows<acc_t> w =
      split ? split_windows(fr, split, f0)
            : frame_windows<scalar_t, acc_t>(fr, src, channels, extent, st, f0 + fr.min_off, fr.window(count, gt.nr));
  frame_gemm_windows(fr, w, channels, count, gt, rows, a_packed, accumulate, c, ldc, col, col_cols);
}

// store_rows for `ways` row blocks whose points interleave along the innermost dim: block w holds the points at
// innermost position m2*step[2] + offset[2] + w, i.e. consecutive phases r2 = offset[2] .. offset[2]+ways-1 of a
// transposed layer (ways <= step[2]), and dst's innermost stride is 1. Each run of `ways` output points is then
// written at once, instead of in `ways` strided passes. With `stream`, the runs that store_fast takes are written
// with non-temporal stores (the caller fences, cpu::stream_fence, before others read them).
// With `limit` (the output's extents), only the points inside it are stored: the blocks may hold a grid computed
// past some phases' own (conv_transpose's phases of one grid), whose points past the output are left out: the
// last point of a line for the ways that lack it (the runs' trim), the lines of the layers that lack them.
// `layers` > 1 stacks such groups of blocks along dim 1 (phases r1 = offset[1] .. offset[1]+layers-1, layer l's
// rows shift[l] elements after the first's): each line's output rows are then stored one after another, which in
// a dense output is one contiguous stream.
template <typename scalar_t, typename acc_t>
void store_rows_interleaved(const acc_t* const* rows, int64_t ways, int64_t ld, int64_t channels, const acc_t* bias,
                            scalar_t* dst, const Strides& st, const int64_t* step, const int64_t* offset,
                            const int64_t* grid, int64_t m_begin, int64_t m_end, const int64_t* frame = nullptr,
                            bool stream = false, const int64_t* limit = nullptr, int64_t layers = 1,
                            const int64_t* shift = nullptr) {
  const int64_t s = step[2];
  int64_t own[kMaxDims] = {grid[0], grid[1], grid[2]}, lines[kMaxStack], trim = 0;
  TORCH_CHECK(layers >= 1 && layers <= kMaxStack, "torch_convt: internal error: stack of ", layers);
  for (int64_t l = 0; l < layers; ++l) lines[l] = grid[1];
  if (limit) {
    // ways <= step: a way has the points of way 0 (the most) or one fewer
    own[0] = std::min(grid[0], phase_count(limit[0], step[0], offset[0]));
    own[2] = std::min(grid[2], phase_count(limit[2], s, offset[2]));
    for (int64_t w = 1; w < ways; ++w) trim += std::min(grid[2], phase_count(limit[2], s, offset[2] + w)) < own[2];
    for (int64_t l = 0; l < layers; ++l) lines[l] = std::min(grid[1], phase_count(limit[1], step[1], offset[1] + l));
  }
  const std::vector<StoreRun>& runs =
      store_runs(st, step, offset, own, frame ? frame : grid, m_begin, m_end, trim, StoreStack{layers, shift, lines});
  if (store_fast(rows, ways, s, channels, ld, bias, runs, dst, st.c, s == ways && stream)) return;
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t b = bias ? bias[c] : acc_t(0);
    scalar_t* d = dst + c * st.c;
    for (const StoreRun& run : runs) {
      const int64_t first = run.first, stop = run.stop - (run.trim > 0), at = c * ld + run.src;
      scalar_t* row = d + run.dst;
      if (run.trim)
        for (int64_t w = 0; w < ways - run.trim; ++w) row[stop * s + w] = narrow_to<scalar_t>(rows[w][at + stop] + b);
      if (ways == 2) {
        const acc_t *r0 = rows[0] + at, *r1 = rows[1] + at;
        if (s == 2) {  // the whole run is contiguous: a constant stride, so the loop vectorises
          for (int64_t j = first; j < stop; ++j) {
            row[2 * j] = narrow_to<scalar_t>(r0[j] + b);
            row[2 * j + 1] = narrow_to<scalar_t>(r1[j] + b);
          }
        } else {
          for (int64_t j = first; j < stop; ++j) {
            row[s * j] = narrow_to<scalar_t>(r0[j] + b);
            row[s * j + 1] = narrow_to<scalar_t>(r1[j] + b);
          }
        }
      } else if (ways == 4) {
        const acc_t *r0 = rows[0] + at, *r1 = rows[1] + at, *r2 = rows[2] + at, *r3 = rows[3] + at;
        const auto put = [&](int64_t stride) {
          for (int64_t j = first; j < stop; ++j) {
            row[stride * j] = narrow_to<scalar_t>(r0[j] + b);
            row[stride * j + 1] = narrow_to<scalar_t>(r1[j] + b);
            row[stride * j + 2] = narrow_to<scalar_t>(r2[j] + b);
            row[stride * j + 3] = narrow_to<scalar_t>(r3[j] + b);
          }
        };
        if (s == 4) {
          put(4);  // (a constant stride, as above)
        } else {
          put(s);
        }
      } else {
        for (int64_t j = first; j < stop; ++j)
          for (int64_t w = 0; w < ways; ++w) row[j * s + w] = narrow_to<scalar_t>(rows[w][at + j] + b);
      }
    }
  }
}

// The data of a tensor in the accumulation type: the pointer itself where the types agree, else a copy.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* data, int64_t n, std::vector<acc_t>& storage) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return data;
  } else {
    storage.assign(n, acc_t(0));
    for (int64_t i = 0; i < n; ++i) storage[i] = static_cast<acc_t>(data[i]);
    return storage.data();
  }
}

// Taps of a conv: every kernel position, reading big position i*stride - padding + k*dilation.
inline std::vector<Tap> conv_taps(const ConvParams& p) {
  std::vector<Tap> taps;
  for (int64_t k0 = 0; k0 < p.kernel[0]; ++k0)
    for (int64_t k1 = 0; k1 < p.kernel[1]; ++k1)
      for (int64_t k2 = 0; k2 < p.kernel[2]; ++k2) {
        const int64_t k[kMaxDims] = {k0, k1, k2};
        Tap tap;
        for (int d = 0; d < kMaxDims; ++d) tap.offset[d] = big_position(0, k[d], p.stride[d], p.padding[d], p.dilation[d]);
        tap.k = (k0 * p.kernel[1] + k1) * p.kernel[2] + k2;
        taps.push_back(tap);
      }
  return taps;
}

// Row-major columns of the tile [f0, f0 + count) of frame positions (for the weight gradient's dot products):
// col[(c*T + t)*ld + j] = column row (c, t) at frame position f0 + j.
template <typename scalar_t, typename acc_t>
void frame_rows(const Frame& fr, const scalar_t* src, int64_t channels, const int64_t* extent, const Strides& st,
                int64_t f0, int64_t count, acc_t* col, int64_t ld) {
  const int64_t T = static_cast<int64_t>(fr.tap_off.size());
  const Windows<acc_t> w =
      frame_windows<scalar_t, acc_t>(fr, src, channels, extent, st, f0 + fr.min_off, fr.window(count, 1));
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = fr.tap_off[t] - fr.min_off, n = std::clamp<int64_t>(w.limit - i, 0, count);
      const acc_t* s = w.data + c * w.channel_stride + fr.tap_plane[t] * w.plane_stride + i;
      acc_t* dst = col + (c * T + t) * ld;
      for (int64_t j = 0; j < n; ++j) dst[j] = s[j];
      for (int64_t j = n; j < count; ++j) dst[j] = acc_t(0);
    }
}

// frame_rows for the grid points [m0, m1) of one image (flat over `grid`), read through grid_windows' column map:
// col[(c*T + t)*ld + j] = column row (c, t) at grid point m0 + j, copied line by line (the frame's points off the
// grid are skipped).
template <typename scalar_t, typename acc_t>
void frame_rows_grid(const Frame& fr, const int64_t* grid, const scalar_t* src, int64_t channels,
                     const int64_t* extent, const Strides& st, int64_t m0, int64_t m1, acc_t* col, int64_t ld) {
  thread_local std::vector<int64_t> cols;
  thread_local std::vector<std::array<int64_t, 3>> runs;  // (first column, its window offset, length)
  const Windows<acc_t> w =
      grid_windows<scalar_t, acc_t>(fr, grid, src, 0, channels, extent, st, m0, m1, fr.min_off, fr.span, cols);
  runs.clear();
  for (int64_t j = 0, count = m1 - m0; j < count;) {
    int64_t e = j + 1;
    while (e < count && cols[e] == cols[j] + (e - j)) ++e;
    runs.push_back({j, cols[j], e - j});
    j = e;
  }
  const int64_t T = static_cast<int64_t>(fr.tap_off.size());
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t t = 0; t < T; ++t) {
      const acc_t* s = w.data + c * w.channel_stride + fr.tap_plane[t] * w.plane_stride + fr.tap_off[t] - fr.min_off;
      acc_t* dst = col + (c * T + t) * ld;
      // (whole blocks of 8, then the rest: std::copy was a memmove call per run; a fixed-size memcpy is one or two
      // moves, where a loop over 8 bfloat16 bits was compiled element by element: DCGAN's weight gradient x1.13 time)
      for (const auto& run : runs) {
        const acc_t* from = s + run[1];
        acc_t* to = dst + run[0];
        int64_t k = 0;
        for (; k + 8 <= run[2]; k += 8) std::memcpy(to + k, from + k, 8 * sizeof(acc_t));
        for (; k < run[2]; ++k) to[k] = from[k];
      }
    }
}

// rows[c*ld + m - m_begin] = src at channel c and grid point m (strides `st`), for m in [m_begin, m_end) flat over
// `frame` (>= grid in every dim): zero at the frame points off the grid. The reverse of store_rows.
template <typename scalar_t, typename acc_t>
void load_rows(const scalar_t* src, const Strides& st, int64_t channels, const int64_t* grid, const int64_t* frame,
               int64_t m_begin, int64_t m_end, acc_t* rows, int64_t ld) {
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* s = src + c * st.c;
    acc_t* r = rows + c * ld - m_begin;
    for_each_run(frame, m_begin, m_end, [&](int64_t i0, int64_t i1, int64_t first, int64_t last, int64_t m) {
      acc_t* out = r + m - first;
      int64_t stop = first;
      if (i0 < grid[0] && i1 < grid[1]) {
        stop = std::clamp(grid[2], first, last);
        const scalar_t* in = s + st.at(i0, i1, 0);
        if (std::is_same_v<scalar_t, acc_t> && st.s[2] == 1) {  // (a run: one copy, not element by element)
          std::memcpy(out + first, in + first, (stop - first) * sizeof(acc_t));
        } else {
          for (int64_t j = first; j < stop; ++j) out[j] = static_cast<acc_t>(in[j * st.s[2]]);
        }
      }
      for (int64_t j = stop; j < last; ++j) out[j] = acc_t(0);
    });
  }
}

}  // namespace torch_convt::cpu
