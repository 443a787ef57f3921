// The Winograd kernels of winograd.h, included there once per instruction set inside its own namespace: with
// WINO_AVX512 1 on AVX-512 (a vector is one __m512), with WINO_AVX512 0 on AVX2 + FMA (a vector is a pair of __m256
// holding the same 16 lanes), WINO_TARGET the functions' target. The transforms compute every value by the same
// operations in the same order on both. No include guard: this file is meant to be included twice.

#define WINO_INLINE WINO_TARGET inline __attribute__((always_inline))

// The vectors of 16 float lanes, and the operations the kernels use. Masks: bit l for lane l (lane_mask).
#if WINO_AVX512
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // (GCC 12, inside its own intrinsics' placeholders)
using Vf = __m512;
WINO_INLINE Vf vzero() { return _mm512_setzero_ps(); }
WINO_INLINE Vf vset1(float x) { return _mm512_set1_ps(x); }
WINO_INLINE Vf vadd(Vf a, Vf b) { return _mm512_add_ps(a, b); }
WINO_INLINE Vf vsub(Vf a, Vf b) { return _mm512_sub_ps(a, b); }
WINO_INLINE Vf vmul(Vf a, Vf b) { return _mm512_mul_ps(a, b); }
WINO_INLINE Vf vfmadd(Vf a, Vf b, Vf c) { return _mm512_fmadd_ps(a, b, c); }
// Lanes in m from p (nothing outside m read), the others zero (vloadz) or old's (vload_merge).
WINO_INLINE Vf vloadz(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
WINO_INLINE Vf vload_merge(Vf old, __mmask16 m, const float* p) { return _mm512_mask_loadu_ps(old, m, p); }
WINO_INLINE void vstore_mask(float* p, __mmask16 m, Vf v) { _mm512_mask_storeu_ps(p, m, v); }
WINO_INLINE Vf vload_aligned(const float* p) { return _mm512_load_ps(p); }
WINO_INLINE void vstore_aligned(float* p, Vf v) { _mm512_store_ps(p, v); }
// Lane l: base[off[l]] for the lanes in m, zero elsewhere.
WINO_INLINE Vf vgather(const float* base, const int32_t* off, __mmask16 m) {
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, _mm512_loadu_si512(off), base, 4);
}
// dst[0 .. j1 - j) = lanes [j, j1) of v: the lanes moved down and stored from their first one (a store whose 64
// bytes reach back before it, masked or not, splits cache lines, which took a fifth of the weight transform).
WINO_INLINE void vstore_lanes(float* dst, Vf v, int64_t j, int64_t j1) {
  const Vf rows = _mm512_maskz_compress_ps(lane_mask(0, j, j1), v);
  if (j1 - j <= 8)
    _mm256_mask_storeu_ps(dst, static_cast<__mmask8>(lane_mask(0, 0, j1 - j)), _mm512_castps512_ps256(rows));
  else
    _mm512_mask_storeu_ps(dst, lane_mask(0, 0, j1 - j), rows);
}
// Whether every lane is finite, given v = the lanes' sum (x - x: 0 where finite, else NaN).
WINO_INLINE bool vfinite(Vf v) {
  v = _mm512_sub_ps(v, v);
  return _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q) == 0xFFFF;
}
// 16-bit floats (bfloat16 where BF16, else IEEE half) of the lanes in m from p, widened, the other lanes old's;
// and v's lanes in m rounded to nearest even (as c10's conversions; bfloat16 NaN -> 0x7fc0) and stored at p.
template <bool BF16>
WINO_INLINE Vf vload16_merge(Vf old, __mmask16 m, const uint16_t* p) {
  return _mm512_mask_mov_ps(old, m, load_step16_avx512(p, 0, 1, m, BF16));
}
template <bool BF16>
WINO_INLINE void vstore16_mask(uint16_t* p, __mmask16 m, Vf v) {
  _mm256_mask_storeu_epi16(p, m, narrow16_avx512(v, BF16));
}
// The (de-)interleaving of a tile's two points along x: a tile's point pairs (2l, 2l + 1) in a pair of vectors (a,
// b: 32 points) split into their first and second points, 16 tiles each; and back.
WINO_INLINE void wino_split(Vf a, Vf b, Vf& first, Vf& second) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  first = _mm512_permutex2var_ps(a, even, b), second = _mm512_permutex2var_ps(a, odd, b);
}
WINO_INLINE void wino_merge(Vf first, Vf second, Vf& a, Vf& b) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  a = _mm512_permutex2var_ps(first, lo, second), b = _mm512_permutex2var_ps(first, hi, second);
}
// wino_merge of 64-bit pairs: a = (first's pair 0, second's pair 0, .. pair 3s), b = pairs 4 .. 7 of both.
WINO_INLINE void wino_merge64(Vf first, Vf second, Vf& a, Vf& b) {
  const __m512i lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  const __m512d f = _mm512_castps_pd(first), s = _mm512_castps_pd(second);
  a = _mm512_castpd_ps(_mm512_permutex2var_pd(f, lo, s)), b = _mm512_castpd_ps(_mm512_permutex2var_pd(f, hi, s));
}
// Its inverse: first = the even 64-bit pairs of (a, b), second = the odd ones.
WINO_INLINE void wino_split64(Vf a, Vf b, Vf& first, Vf& second) {
  const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
  const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
  first = _mm512_castpd_ps(_mm512_permutex2var_pd(x, even, y));
  second = _mm512_castpd_ps(_mm512_permutex2var_pd(x, odd, y));
}
#pragma GCC diagnostic pop
#else
struct Vf {
  __m256 lo, hi;  // lanes 0 .. 7, 8 .. 15
};
WINO_INLINE Vf vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
WINO_INLINE Vf vset1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
WINO_INLINE Vf vadd(Vf a, Vf b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
WINO_INLINE Vf vsub(Vf a, Vf b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
WINO_INLINE Vf vmul(Vf a, Vf b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
WINO_INLINE Vf vfmadd(Vf a, Vf b, Vf c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
// The 8 lanes of mask bits m as a vector mask (all ones where set).
WINO_INLINE __m256i vmask8(unsigned m) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bits), bits);
}
// Half loads and stores: whole where every lane is in m (vmaskmov's stores are slow on some CPUs), none where none is.
WINO_INLINE __m256 vloadz8(unsigned m, const float* p) {
  return m == 0xFF ? _mm256_loadu_ps(p) : m == 0 ? _mm256_setzero_ps() : _mm256_maskload_ps(p, vmask8(m));
}
WINO_INLINE __m256 vload_merge8(__m256 old, unsigned m, const float* p) {
  if (m == 0xFF) return _mm256_loadu_ps(p);
  if (m == 0) return old;
  const __m256i k = vmask8(m);
  return _mm256_blendv_ps(old, _mm256_maskload_ps(p, k), _mm256_castsi256_ps(k));
}
WINO_INLINE void vstore8(float* p, unsigned m, __m256 v) {
  if (m == 0xFF) _mm256_storeu_ps(p, v);
  else if (m != 0) _mm256_maskstore_ps(p, vmask8(m), v);
}
WINO_INLINE Vf vloadz(__mmask16 m, const float* p) { return {vloadz8(m & 0xFFu, p), vloadz8(unsigned(m) >> 8, p + 8)}; }
WINO_INLINE Vf vload_merge(Vf old, __mmask16 m, const float* p) {
  return {vload_merge8(old.lo, m & 0xFFu, p), vload_merge8(old.hi, unsigned(m) >> 8, p + 8)};
}
WINO_INLINE void vstore_mask(float* p, __mmask16 m, Vf v) {
  vstore8(p, m & 0xFFu, v.lo), vstore8(p + 8, unsigned(m) >> 8, v.hi);
}
WINO_INLINE Vf vload_aligned(const float* p) { return {_mm256_load_ps(p), _mm256_load_ps(p + 8)}; }
WINO_INLINE void vstore_aligned(float* p, Vf v) { _mm256_store_ps(p, v.lo), _mm256_store_ps(p + 8, v.hi); }
WINO_INLINE Vf vgather(const float* base, const int32_t* off, __mmask16 m) {
  const __m256 z = _mm256_setzero_ps();
  const __m256i k0 = vmask8(m & 0xFFu), k1 = vmask8(unsigned(m) >> 8);
  return {_mm256_mask_i32gather_ps(z, base, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off)),
                                   _mm256_castsi256_ps(k0), 4),
          _mm256_mask_i32gather_ps(z, base, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + 8)),
                                   _mm256_castsi256_ps(k1), 4)};
}
WINO_INLINE void vstore_lanes(float* dst, Vf v, int64_t j, int64_t j1) {
  alignas(32) float lanes[16];
  vstore_aligned(lanes, v);
  for (int64_t l = j; l < j1; ++l) dst[l - j] = lanes[l];
}
WINO_INLINE bool vfinite(Vf v) {
  const __m256 a = _mm256_sub_ps(v.lo, v.lo), b = _mm256_sub_ps(v.hi, v.hi);
  return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q)) == 0;
}
// AddressSanitizer builds: no whole-vector loads past a partial load's lanes (safe within a page, but reported).
#if defined(__SANITIZE_ADDRESS__)
constexpr bool kWinoAsan = true;
#else
constexpr bool kWinoAsan = false;
#endif
// 8 16-bit floats widened (lanes outside m zero; nothing outside m read), and 8 values rounded and stored (lanes in
// m).
template <bool BF16>
WINO_INLINE __m256 vload16x8(unsigned m, const uint16_t* p) {
  __m128i h;
  if (m == 0xFF) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  } else if (!kWinoAsan && (reinterpret_cast<uintptr_t>(p) & 4095) <= 4096 - 16) {
    // (the 16 bytes lie in one page, which holds a lane in m, so the whole load cannot fault; the lanes outside m
    // are cleared. AVX2 has no 16-bit masked loads: lane by lane, DCGAN's bfloat16 input transform took x1.2 the
    // time.)
    const __m128i bits = _mm_setr_epi16(1, 2, 4, 8, 16, 32, 64, 128);
    const __m128i keep = _mm_cmpeq_epi16(_mm_and_si128(_mm_set1_epi16(static_cast<int16_t>(m)), bits), bits);
    h = _mm_and_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), keep);
  } else {
    alignas(16) uint16_t t[8] = {};
    for (int l = 0; l < 8; ++l)
      if (m >> l & 1) t[l] = p[l];
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(t));
  }
  return widen8_avx2(h, BF16);
}
template <bool BF16>
WINO_INLINE void vstore16x8(uint16_t* p, unsigned m, __m256 v) {
  if (m == 0) return;
  const __m128i h = narrow8_avx2(v, BF16);
  if (m == 0xFF) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    return;
  }
  alignas(16) uint16_t t[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(t), h);
  for (int l = 0; l < 8; ++l)
    if (m >> l & 1) p[l] = t[l];
}
template <bool BF16>
WINO_INLINE __m256 vload16x8_merge(__m256 old, unsigned m, const uint16_t* p) {
  if (m == 0) return old;
  const __m256 v = vload16x8<BF16>(m, p);
  return m == 0xFF ? v : _mm256_blendv_ps(old, v, _mm256_castsi256_ps(vmask8(m)));
}
template <bool BF16>
WINO_INLINE Vf vload16_merge(Vf old, __mmask16 m, const uint16_t* p) {
  return {vload16x8_merge<BF16>(old.lo, m & 0xFFu, p), vload16x8_merge<BF16>(old.hi, unsigned(m) >> 8, p + 8)};
}
template <bool BF16>
WINO_INLINE void vstore16_mask(uint16_t* p, __mmask16 m, Vf v) {
  vstore16x8<BF16>(p, m & 0xFFu, v.lo), vstore16x8<BF16>(p + 8, unsigned(m) >> 8, v.hi);
}
// Lanes of a 256-bit vector as 64-bit pairs in the order (0, 2, 1, 3).
WINO_INLINE __m256 vswap_mid(__m256 x) {
  return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(x), 0xD8));
}
WINO_INLINE void wino_split(Vf a, Vf b, Vf& first, Vf& second) {
  first = {vswap_mid(_mm256_shuffle_ps(a.lo, a.hi, 0x88)), vswap_mid(_mm256_shuffle_ps(b.lo, b.hi, 0x88))};
  second = {vswap_mid(_mm256_shuffle_ps(a.lo, a.hi, 0xDD)), vswap_mid(_mm256_shuffle_ps(b.lo, b.hi, 0xDD))};
}
// (x, y) -> (x0 y0 x1 y1 x2 y2 x3 y3, x4 y4 .. x7 y7) for 8 lanes of x and y.
WINO_INLINE void vzip8(__m256 x, __m256 y, __m256& lo, __m256& hi) {
  const __m256 l = _mm256_unpacklo_ps(x, y), h = _mm256_unpackhi_ps(x, y);
  lo = _mm256_permute2f128_ps(l, h, 0x20), hi = _mm256_permute2f128_ps(l, h, 0x31);
}
WINO_INLINE void wino_merge(Vf first, Vf second, Vf& a, Vf& b) {
  vzip8(first.lo, second.lo, a.lo, a.hi), vzip8(first.hi, second.hi, b.lo, b.hi);
}
WINO_INLINE void vzip4x64(__m256 x, __m256 y, __m256& lo, __m256& hi) {
  const __m256d xd = _mm256_castps_pd(x), yd = _mm256_castps_pd(y);
  const __m256d l = _mm256_unpacklo_pd(xd, yd), h = _mm256_unpackhi_pd(xd, yd);
  lo = _mm256_castpd_ps(_mm256_permute2f128_pd(l, h, 0x20)), hi = _mm256_castpd_ps(_mm256_permute2f128_pd(l, h, 0x31));
}
WINO_INLINE void wino_merge64(Vf first, Vf second, Vf& a, Vf& b) {
  vzip4x64(first.lo, second.lo, a.lo, a.hi), vzip4x64(first.hi, second.hi, b.lo, b.hi);
}
// (x, y) -> the even 64-bit pairs of x then y's (even), the odd ones (odd): vzip4x64's inverse.
WINO_INLINE void vunzip4x64(__m256 x, __m256 y, __m256& even, __m256& odd) {
  const __m256d xd = _mm256_castps_pd(x), yd = _mm256_castps_pd(y);
  even = vswap_mid(_mm256_castpd_ps(_mm256_unpacklo_pd(xd, yd)));
  odd = vswap_mid(_mm256_castpd_ps(_mm256_unpackhi_pd(xd, yd)));
}
WINO_INLINE void wino_split64(Vf a, Vf b, Vf& first, Vf& second) {
  vunzip4x64(a.lo, a.hi, first.lo, second.lo), vunzip4x64(b.lo, b.hi, first.hi, second.hi);
}
#endif

// Rows of T: float, or 16-bit floats (c10::BFloat16, c10::Half) widened as they load and rounded as they store.
template <typename T>
WINO_INLINE Vf vload_row(Vf old, __mmask16 m, const T* p) {
  if constexpr (std::is_same_v<T, float>) return vload_merge(old, m, p);
  else return vload16_merge<std::is_same_v<T, c10::BFloat16>>(old, m, reinterpret_cast<const uint16_t*>(p));
}
template <typename T>
WINO_INLINE void vstore_row(T* p, __mmask16 m, Vf v) {
  if constexpr (std::is_same_v<T, float>) vstore_mask(p, m, v);
  else vstore16_mask<std::is_same_v<T, c10::BFloat16>>(reinterpret_cast<uint16_t*>(p), m, v);
}

// The schemes' 1d transforms on 16 tiles at once: in, the window d -> the transformed inputs v (kWinoSchemes' nv);
// out, the products p -> the tile's outputs o; adj, out's adjoint (its transpose: the weight gradient's products'
// gradients p from the outputs' gradients o). Their sizes are the table's.
template <WinoKind K>
struct WinoSizes {
  static constexpr WinoKind KIND = K;
  static constexpr int W = kWinoSchemes[K].w, NV = kWinoSchemes[K].nv, NP = kWinoSchemes[K].np, M = kWinoSchemes[K].m;
};
struct WinoK1 : WinoSizes<kWinoK1> {
  WINO_TARGET static void in(const Vf* d, Vf* v) { v[0] = d[0]; }
  WINO_TARGET static void out(const Vf* p, Vf* o) { o[0] = p[0]; }
  WINO_TARGET static void adj(const Vf* o, Vf* p) { p[0] = o[0]; }
};
// K3: B^T d = (d0 - d2, d1 + d2, d2 - d1, d1 - d3); A^T m = (m0 + m1 + m2, m1 - m2 - m3).
struct WinoK3 : WinoSizes<kWinoK3> {
  WINO_TARGET static void in(const Vf* d, Vf* v) {
    v[0] = vsub(d[0], d[2]), v[1] = vadd(d[1], d[2]), v[2] = vsub(d[2], d[1]);
    v[3] = vsub(d[1], d[3]);
  }
  WINO_TARGET static void out(const Vf* p, Vf* o) {
    o[0] = vadd(vadd(p[0], p[1]), p[2]);
    o[1] = vsub(vsub(p[1], p[2]), p[3]);
  }
  WINO_TARGET static void adj(const Vf* o, Vf* p) {
    p[0] = o[0], p[1] = vadd(o[0], o[1]), p[2] = vsub(o[0], o[1]), p[3] = vsub(vzero(), o[1]);
  }
};
// T4: v = (d0 - d1, d1, d2 - d1, d2, d3 - d2); outputs (p0 + p1, p3 + p4, p1 + p2, p4 + p5).
struct WinoT4 : WinoSizes<kWinoT4> {
  WINO_TARGET static void in(const Vf* d, Vf* v) {
    v[0] = vsub(d[0], d[1]), v[1] = d[1], v[2] = vsub(d[2], d[1]), v[3] = d[2];
    v[4] = vsub(d[3], d[2]);
  }
  WINO_TARGET static void out(const Vf* p, Vf* o) {
    o[0] = vadd(p[0], p[1]), o[1] = vadd(p[3], p[4]), o[2] = vadd(p[1], p[2]);
    o[3] = vadd(p[4], p[5]);
  }
  WINO_TARGET static void adj(const Vf* o, Vf* p) {
    p[0] = o[0], p[1] = vadd(o[0], o[2]), p[2] = o[2], p[3] = o[1], p[4] = vadd(o[1], o[3]), p[5] = o[3];
  }
};
// K2 (F(2, 2)): v = (d0 - d1, d1, d2 - d1); outputs (p0 + p1, p1 + p2).
struct WinoK2 : WinoSizes<kWinoK2> {
  WINO_TARGET static void in(const Vf* d, Vf* v) {
    v[0] = vsub(d[0], d[1]), v[1] = d[1], v[2] = vsub(d[2], d[1]);
  }
  WINO_TARGET static void out(const Vf* p, Vf* o) {
    o[0] = vadd(p[0], p[1]), o[1] = vadd(p[1], p[2]);
  }
  WINO_TARGET static void adj(const Vf* o, Vf* p) { p[0] = o[0], p[1] = vadd(o[0], o[1]), p[2] = o[1]; }
};
// T3: v = (d0 - d1, d1, d2 - d1, d0 (ODD) or d2); F(2, 2)'s outputs p0 + p1, p1 + p2, tap 1's p3, p4: the odd outputs
// (ODD: padding 1) or the even ones.
template <bool ODD>
struct WinoT3 : WinoSizes<ODD ? kWinoT3Odd : kWinoT3Even> {
  WINO_TARGET static void in(const Vf* d, Vf* v) {
    v[0] = vsub(d[0], d[1]), v[1] = d[1], v[2] = vsub(d[2], d[1]), v[3] = ODD ? d[0] : d[2];
  }
  WINO_TARGET static void out(const Vf* p, Vf* o) {
    const Vf y0 = vadd(p[0], p[1]), y1 = vadd(p[1], p[2]);
    o[ODD ? 1 : 0] = y0, o[ODD ? 3 : 2] = y1, o[ODD ? 0 : 1] = p[3], o[ODD ? 2 : 3] = p[4];
  }
  WINO_TARGET static void adj(const Vf* o, Vf* p) {
    const Vf y0 = o[ODD ? 1 : 0], y1 = o[ODD ? 3 : 2];
    p[0] = y0, p[1] = vadd(y0, y1), p[2] = y1, p[3] = o[ODD ? 0 : 1], p[4] = o[ODD ? 2 : 3];
  }
};

// The input transform of a run, input channel c of the group: V[v][c][col + l] for the run's tiles l and the tile's
// transformed inputs v (V: nv blocks of `v_xi` elements, each gemm_packed's B: panels of nr columns ci deep).
// `in`: the image's group's first channel (T: wino_layer's).
template <class DZ, class DY, class DX, typename T>
WINO_TARGET void wino_input_run(const T* in, const Strides& si, const WinogradRun& run, int64_t c, int64_t nr,
                                int64_t ci, int64_t v_xi, float* V) {
  constexpr int NYX = DY::NV * DX::NV;
  const __mmask16 store = lane_mask(0, 0, run.lanes);
  float* v = V + run.col / nr * ci * nr + run.col % nr + c * nr;
  alignas(64) float tz[DZ::W][NYX][16];  // the windows transformed along x and y, plane by plane
  const T* src = in + c * si.c;
  for (int iz = 0; iz < DZ::W; ++iz) {
    Vf t[DY::W][DX::NV];
    for (int iy = 0; iy < DY::W; ++iy) {
      Vf a0 = vzero(), a1 = a0, b0 = a0, b1 = a0;
      for (int64_t s = 0; s < run.segments; ++s) {
        const WinogradSegment& sg = run.seg[s];
        if (!(sg.in_rows >> (iz * DY::W + iy) & 1)) continue;
        const T* r = src + sg.in_at[iz * DY::W + iy];
        a0 = vload_row(a0, sg.load[0], r), a1 = vload_row(a1, sg.load[1], r + 16);
        b0 = vload_row(b0, sg.load[2], r + 2), b1 = vload_row(b1, sg.load[3], r + 18);
      }
      Vf d[4];
      wino_split(a0, a1, d[0], d[1]);  // d0 = r[2l], d1 = r[2l + 1]
      wino_split(b0, b1, d[2], d[3]);  // d2 = r[2l + 2], d3 = r[2l + 3]
      DX::in(d, t[iy]);
    }
    for (int k = 0; k < DX::NV; ++k) {
      Vf col[DY::W], u[DY::NV];
      for (int iy = 0; iy < DY::W; ++iy) col[iy] = t[iy][k];
      DY::in(col, u);
      for (int j = 0; j < DY::NV; ++j) {
        if constexpr (DZ::W == 1) vstore_mask(v + (j * DX::NV + k) * v_xi, store, u[j]);
        else vstore_aligned(tz[iz][j * DX::NV + k], u[j]);
      }
    }
  }
  if constexpr (DZ::W > 1)
    for (int j = 0; j < NYX; ++j) {
      Vf col[DZ::W], u[DZ::NV];
      for (int iz = 0; iz < DZ::W; ++iz) col[iz] = vload_aligned(tz[iz][j]);
      DZ::in(col, u);
      for (int k = 0; k < DZ::NV; ++k) vstore_mask(v + (k * NYX + j) * v_xi, store, u[k]);
    }
}

// The output transform of a run, output channel c of the group, plus its bias: out's rows of the run's tiles. `M`:
// the products, product p's channel c at M + prod[p] + c * ld + col. Returns whether the sum of the tiles' values
// (those past the output, computed but not stored, too) is finite: false where any of them is not, and for finite
// ones only where they sum past 3e38; either way the caller's other path computes the layer. (Summed, not checked
// store by store: x0.94-0.97 the time of MONAI's and the k=4 3d forward.)
template <class DZ, class DY, class DX, typename T>
WINO_TARGET bool wino_output_run(const float* M, const int64_t* prod, int64_t ld, const float* bias,
                                 const WinogradRun& run, int64_t c, T* out, const Strides& so) {
  constexpr int PYX = DY::NP * DX::NP;
  const __mmask16 lanes = lane_mask(0, 0, run.lanes);
  Vf bad = vzero();
  const float* m = M + run.col + c * ld;
  Vf u[DZ::M][PYX];  // along z
  for (int j = 0; j < PYX; ++j) {
    Vf col[DZ::NP];
    for (int k = 0; k < DZ::NP; ++k) col[k] = vloadz(lanes, m + prod[k * PYX + j]);
    Vf o[DZ::M];
    DZ::out(col, o);
    for (int a = 0; a < DZ::M; ++a) u[a][j] = o[a];
  }
  Vf s[DZ::M][DY::M][DX::NP];  // along y
  for (int a = 0; a < DZ::M; ++a)
    for (int k = 0; k < DX::NP; ++k) {
      Vf col[DY::NP], o[DY::M];
      for (int j = 0; j < DY::NP; ++j) col[j] = u[a][j * DX::NP + k];
      DY::out(col, o);
      for (int b = 0; b < DY::M; ++b) s[a][b][k] = o[b];
    }
  const Vf bv = vset1(bias ? bias[c] : 0.0f);
  T* o = out + c * so.c;
  for (int a = 0; a < DZ::M; ++a)
    for (int b = 0; b < DY::M; ++b) {
      Vf e[DX::M], w[DX::M];  // along x: the tiles' points, then interleaved
      DX::out(s[a][b], e);
      for (int k = 0; k < DX::M; ++k) e[k] = vadd(e[k], bv), bad = vadd(bad, e[k]);
      if constexpr (DX::M == 2) {
        wino_merge(e[0], e[1], w[0], w[1]);
      } else {  // (pairs of points merged, then pairs of pairs)
        Vf p0, p1, q0, q1;
        wino_merge(e[0], e[1], p0, p1), wino_merge(e[2], e[3], q0, q1);
        wino_merge64(p0, q0, w[0], w[1]), wino_merge64(p1, q1, w[2], w[3]);
      }
      for (int64_t sgi = 0; sgi < run.segments; ++sgi) {
        const WinogradSegment& sg = run.seg[sgi];
        if (!(sg.out_rows >> (a * DY::M + b) & 1)) continue;
        T* row = o + sg.out_at[a * DY::M + b];
        for (int k = 0; k < DX::M; ++k) vstore_row(row + 16 * k, sg.store[k], w[k]);
      }
    }
  return vfinite(bad);
}

// The layer's GEMMs: the products of one transformed input stacked, one GEMM each ([mult x co rows] x ci . [ci x
// tiles]), U and M laid out block by block. Product p: its transformed input vi[p], its rows' block in U's and M's
// layout (slot[p]: its place among that input's products).
struct WinogradPlan {
  int64_t vi[216], slot[216], prod_m[216];  // prod_m: product p's channel 0 in M
  int64_t mult[125], u_off[126], m_off[126];
  GemmTile gt[125];
};

inline void wino_plan(const WinogradLayer& l, const WinogradGeometry& geo, int64_t nb, WinogradPlan& plan) {
  const WinoScheme &sz = kWinoSchemes[l.kind[0]], &sy = kWinoSchemes[l.kind[1]], &sx = kWinoSchemes[l.kind[2]];
  std::fill(plan.mult, plan.mult + geo.nv, 0);
  for (int64_t p = 0; p < geo.np; ++p) {
    const int64_t pz = p / (sy.np * sx.np), py = p / sx.np % sy.np, px = p % sx.np;
    plan.vi[p] = (sz.vof[pz] * sy.nv + sy.vof[py]) * sx.nv + sx.vof[px];
    plan.slot[p] = plan.mult[plan.vi[p]]++;
  }
  plan.u_off[0] = plan.m_off[0] = 0;
  for (int64_t v = 0; v < geo.nv; ++v) {
    const int64_t rows = plan.mult[v] * l.co;
    plan.gt[v] = gemm_tile<float>(rows);
    // (blocks a line apart from 4 KiB multiples: those fall into one L1 set; the weight transform's stores into U
    // took x1.5 the time of this)
    plan.u_off[v + 1] = plan.u_off[v] + packed_size(rows, l.ci, plan.gt[v].mr) + 16;
    plan.m_off[v + 1] = plan.m_off[v] + rows * nb + 16;
  }
  for (int64_t p = 0; p < geo.np; ++p) plan.prod_m[p] = plan.m_off[plan.vi[p]] + plan.slot[p] * l.co * nb;
}

// Transforms along one dim of a tap block [OUTER][k][INNER] -> [OUTER][np][INNER] by D's table g (np x k; its
// columns reversed where FLIP), on 16 output channels at once.
template <class D, bool FLIP, int OUTER, int INNER>
WINO_TARGET inline void wino_g(const Vf* in, Vf* out) {
  constexpr WinoScheme s = kWinoSchemes[D::KIND];
  for (int o = 0; o < OUTER; ++o)
    for (int i = 0; i < INNER; ++i)
#pragma GCC unroll 6
      for (int p = 0; p < s.np; ++p) {
        Vf acc = vzero();
#pragma GCC unroll 4
        for (int t = 0; t < s.k; ++t) {
          const float c = s.g[p][FLIP ? s.k - 1 - t : t];
          if (c != 0.0f) acc = vfmadd(vset1(c), in[(o * s.k + t) * INNER + i], acc);
        }
        out[(o * s.np + p) * INNER + i] = acc;
      }
}
template <class D, int OUTER, int INNER>
WINO_TARGET inline void wino_g(bool flip, const Vf* in, Vf* out) {
  if (flip) wino_g<D, true, OUTER, INNER>(in, out);
  else wino_g<D, false, OUTER, INNER>(in, out);
}

// The transformed weights of 16 output channels [co0, co0 + 16) and one input channel ci (`src`: wc(g, co0, ci, .);
// `U`: the group's), the channels a vector's lanes: gathered from the weights, transformed one dim at a time ([kz][ky]
// [kx] -> [pz][ky][kx] -> [pz][py][kx] -> [pz][py][px]), each product stored into the rows of its packed panels (16
// consecutive rows of a column: a masked store a panel; `place`: product p's first row r0 = slot * co + co0 as its
// panel and its row in it, place[2p], place[2p + 1]). Returns whether all are finite.
template <class DZ, class DY, class DX>
WINO_TARGET bool wino_weights_part(const WinogradLayer& l, const WinogradGeometry& geo,
                                                 const WinogradPlan& plan, const int64_t* place, const float* src,
                                                 int64_t co0, int64_t ci, float* U) {
  constexpr int KZ = kWinoSchemes[DZ::KIND].k, KY = kWinoSchemes[DY::KIND].k, KX = kWinoSchemes[DX::KIND].k;
  // (the taps of stride-1 dims reversed where flip; the stride-2 schemes' tables are in the weights' own order)
  const bool flip_z = l.flip && wino_stride1(l.kind[0]), flip_y = l.flip && wino_stride1(l.kind[1]),
             flip_x = l.flip && wino_stride1(l.kind[2]);
  const int64_t lanes = std::min<int64_t>(16, l.co - co0);
  const __mmask16 m = lane_mask(0, 0, lanes);
  alignas(64) int32_t from[16];
  for (int j = 0; j < 16; ++j) from[j] = static_cast<int32_t>(j * l.w_co);
  Vf g[KZ * KY * KX], s1[DZ::NP * KY * KX], s2[DZ::NP * DY::NP * KX], s3[DZ::NP * DY::NP * DX::NP];
  for (int t = 0; t < KZ * KY * KX; ++t) g[t] = vgather(src + t, from, m);
  wino_g<DZ, 1, KY * KX>(flip_z, g, s1);
  wino_g<DY, DZ::NP, KX>(flip_y, s1, s2);
  wino_g<DX, DZ::NP * DY::NP, 1>(flip_x, s2, s3);
  Vf bad = vzero();
  for (int64_t p = 0; p < geo.np; ++p) {
    bad = vadd(bad, vsub(s3[p], s3[p]));  // (lanes past `lanes` are zero)
    const int64_t v = plan.vi[p], mr = plan.gt[v].mr;
    // Lanes [j, j1): rows r0 + j .. of panel `panel`, from its row `at`.
    float* const u = U + plan.u_off[v] + ci * mr;
    for (int64_t j = 0, panel = place[2 * p], at = place[2 * p + 1]; j < lanes; ++panel, at = 0) {
      const int64_t j1 = std::min(lanes, j + mr - at);
      vstore_lanes(u + panel * l.ci * mr + at, s3[p], j, j1);
      j = j1;
    }
  }
  return vfinite(bad);
}

// The transformed weights: per group, U_p = (g of its dims' schemes) of wc(g, co, ci, .), packed as gemm_packed's A
// (the plan's blocks: mr-row panels of the stacked products' co rows, ci deep, zero past them). Returns whether every
// value is finite. (6.5% of MONAI's forward; with input channels in the lanes, each product scattered, 8-10%.)
template <class DZ, class DY, class DX>
bool wino_weights(const WinogradLayer& l, const WinogradGeometry& geo, const WinogradPlan& plan, const float* w,
                  float* U) {
  const int64_t u_size = plan.u_off[geo.nv], parts = ceil_div(l.co, int64_t(16));
  TORCH_INTERNAL_ASSERT(l.w_co < (int64_t(1) << 27) && l.kernel[0] * l.kernel[1] * l.kernel[2] <= 64);
  // Zero the rows that pad each block's last panel (the transform writes every other row; zeroing all of U in one
  // thread left its lines in that core's cache for the other's stores: x1.5 the transform's time on 2 threads).
  for (int64_t grp = 0; grp < l.groups; ++grp)
    for (int64_t v = 0; v < geo.nv; ++v) {
      const int64_t mr = plan.gt[v].mr, rows = plan.mult[v] * l.co;
      if (rows % mr == 0) continue;
      float* const last = U + grp * u_size + plan.u_off[v] + rows / mr * l.ci * mr;
      for (int64_t k = 0; k < l.ci; ++k) std::fill(last + k * mr + rows % mr, last + (k + 1) * mr, 0.0f);
    }
  std::vector<int64_t> place(2 * parts * geo.np);  // (divisions once a call, not per store: they were a third of it)
  for (int64_t part = 0; part < parts; ++part)
    for (int64_t p = 0; p < geo.np; ++p) {
      const int64_t mr = plan.gt[plan.vi[p]].mr, r0 = plan.slot[p] * l.co + 16 * part;
      place[2 * (part * geo.np + p)] = r0 / mr, place[2 * (part * geo.np + p) + 1] = r0 % mr;
    }
  std::atomic<bool> finite{true};
  at::parallel_for(0, l.groups * parts * l.ci, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t grp = item / (parts * l.ci), part = item / l.ci % parts, co0 = 16 * part, ci = item % l.ci;
      if (!wino_weights_part<DZ, DY, DX>(l, geo, plan, place.data() + 2 * part * geo.np,
                                         w + grp * l.w_g + co0 * l.w_co + ci * l.w_ci, co0, ci, U + grp * u_size))
        finite.store(false, std::memory_order_relaxed);
    }
  });
  return finite.load();
}

// T: the input's and output's elements (float, or 16-bit floats widened and rounded by the transforms); the weights
// and bias are float.
template <class DZ, class DY, class DX, typename T>
bool wino_layer(const WinogradLayer& l, const WinogradGeometry& geo, const T* in, const Strides& si, const float* w,
                const float* bias, T* out, const Strides& so) {
  // Blocks of one panel of the GEMM's B (nb tiles): a block's transformed inputs and products (for 32 channels and
  // F(2, 3) in 3d, 2 x 64 x 32 x 32 floats) stay in the core's L2 from the transform through the GEMMs to the back
  // transform (blocks of 2 panels: x1.02 time on a 32-channel 3d layer), but for wide layers (below).
  const int64_t nr = gemm_tile<float>(l.co).nr;
  TORCH_INTERNAL_ASSERT(nr == 32 || nr == 16);
  // Where the transformed weights of a group are 3 times a panel's transformed inputs and products or more, blocks of
  // 2 panels: every GEMM streams its block of U from memory, for twice the columns (DCGAN's kernel-4 2d layer
  // x0.93-0.98 time, its input gradient x0.90-0.97, 256 channels by F(2, 3) in 2d x0.84; kernel 3 or 4 in 3d, whose
  // blocks of V and M are larger than U or as large, x1.05-1.5).
  const int64_t u_bytes = wino_u_floats(l, geo) * int64_t(sizeof(float));
  const int64_t panels = u_bytes >= 3 * wino_block_bytes(l, geo, nr) && geo.count > nr ? 2 : 1, nb = panels * nr;
  auto plan = std::make_unique<WinogradPlan>();
  wino_plan(l, geo, nb, *plan);
  const int64_t u_size = plan->u_off[geo.nv];
  // (U's layout: the schemes, the channels and the taps; the weights as read)
  const Prepared<float> u = prepared_weights<float, kWeightSlot>(
      {1, l.kind[0], l.kind[1], l.kind[2], l.flip, l.groups, l.ci, l.co, l.kernel[0], l.kernel[1], l.kernel[2],
       l.w_g, l.w_co, l.w_ci, u_size},
      w, size_t(l.groups * l.w_g) * sizeof(float), l.groups * u_size,
      [&](float* U) { return wino_weights<DZ, DY, DX>(l, geo, *plan, w, U); });
  if (!u.ok) return false;
  const float* const U = u.data;
  const int64_t blocks = ceil_div(geo.count, nb), v_xi = l.ci * nb + 16;
  std::atomic<bool> finite{true};
  at::parallel_for(0, l.batch * l.groups * blocks, 1, [&](int64_t begin, int64_t end) {
    float* V = scratch<float, 0>(geo.nv * v_xi);
    float* M = scratch<float, 1>(plan->m_off[geo.nv]);
    bool ok = true;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (l.groups * blocks), g = item / blocks % l.groups, b = item % blocks;
      const int64_t c0 = b * nb, c1 = std::min(geo.count, c0 + nb);
      const T* in_g = in + n * si.n + g * l.ci * si.c;
      T* out_g = out + n * so.n + g * l.co * so.c;
      // The block's runs: 16 tiles each (nb is a multiple of 16), the last one what is left.
      WinogradRun runs[4];
      const int64_t count = ceil_div(c1 - c0, int64_t(16));
      for (int64_t r = 0; r < count; ++r)
        wino_make_run(l, geo, si, so, c0 + 16 * r, std::min(c1, c0 + 16 * r + 16), 16 * r, runs[r]);
      for (int64_t c = 0; c < l.ci; ++c)  // (channel by channel: a channel's rows stay in L1 from run to run)
        for (int64_t r = 0; r < count; ++r) wino_input_run<DZ, DY, DX>(in_g, si, runs[r], c, nr, l.ci, v_xi, V);
      for (int64_t v = 0; v < geo.nv; ++v)
        gemm_packed<float>(plan->gt[v], plan->mult[v] * l.co, c1 - c0, l.ci, U + g * u_size + plan->u_off[v],
                           V + v * v_xi, false, M + plan->m_off[v], nb);
      const float* bias_g = bias ? bias + g * l.co : nullptr;
      for (int64_t c = 0; c < l.co; ++c)  // (channel by channel: a channel's products stay in L1 from run to run)
        for (int64_t r = 0; r < count; ++r)
          ok &= wino_output_run<DZ, DY, DX>(M, plan->prod_m, nb, bias_g, runs[r], c, out_g, so);
    }
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

// The instance of a layer's dims' schemes (dilation 1; winograd_shape: the innermost dim's, each other dim's the same
// or kernel 1): f.template operator()<DZ, DY, DX>() (false for a layer of no instance).
template <class DX, class F>
bool wino_instance_as(const WinogradLayer& l, F&& f) {
  if (l.kind[0] != kWinoK1 && l.kind[1] != kWinoK1) return f.template operator()<DX, DX, DX>();
  if (l.kind[0] != kWinoK1) return f.template operator()<DX, WinoK1, DX>();
  return f.template operator()<WinoK1, DX, DX>();
}
template <class F>
bool wino_instance(const WinogradLayer& l, F&& f) {
  switch (l.kind[2]) {
    case kWinoK3: return wino_instance_as<WinoK3>(l, f);
    case kWinoK2: return wino_instance_as<WinoK2>(l, f);
    case kWinoT4: return wino_instance_as<WinoT4>(l, f);
    case kWinoT3Odd: return wino_instance_as<WinoT3<true>>(l, f);
    case kWinoT3Even: return wino_instance_as<WinoT3<false>>(l, f);
    default: return false;
  }
}

// The layer (dilation 1) on the tiles of its output.
template <typename T>
bool wino_dense(const WinogradLayer& l, const T* in, const Strides& si, const float* w, const float* bias, T* out,
                const Strides& so) {
  const WinogradGeometry geo = wino_geometry(l);
  return wino_instance(l, [&]<class DZ, class DY, class DX>() {
    return wino_layer<DZ, DY, DX>(l, geo, in, si, w, bias, out, so);
  });
}

// The weight gradient's adjoint of wino_output_run: the output gradients of the run's tiles, channel c of `gout`
// (zero past the output), de-interleaved along x and taken back through the schemes' adj: product p's gradients of
// the tiles at P + prod[p] + c * ld + run.col (all 16 lanes, zero past the run's).
template <class DZ, class DY, class DX>
WINO_TARGET void wino_grad_run(const float* gout, const Strides& so, const WinogradRun& run, int64_t c,
                               const int64_t* prod, int64_t ld, float* P) {
  constexpr int PYX = DY::NP * DX::NP;
  const float* g = gout + c * so.c;
  Vf s[DZ::M][DY::M][DX::NP];  // along x
  for (int a = 0; a < DZ::M; ++a)
    for (int b = 0; b < DY::M; ++b) {
      Vf w[DX::M], e[DX::M];
      for (int k = 0; k < DX::M; ++k) w[k] = vzero();
      for (int64_t sgi = 0; sgi < run.segments; ++sgi) {
        const WinogradSegment& sg = run.seg[sgi];
        if (!(sg.out_rows >> (a * DY::M + b) & 1)) continue;
        const float* row = g + sg.out_at[a * DY::M + b];
        for (int k = 0; k < DX::M; ++k) w[k] = vload_merge(w[k], sg.store[k], row + 16 * k);
      }
      if constexpr (DX::M == 2) {
        wino_split(w[0], w[1], e[0], e[1]);
      } else {  // (wino_output_run's merges undone: pairs of pairs, then pairs)
        Vf p0, p1, q0, q1;
        wino_split64(w[0], w[1], p0, q0), wino_split64(w[2], w[3], p1, q1);
        wino_split(p0, p1, e[0], e[1]), wino_split(q0, q1, e[2], e[3]);
      }
      DX::adj(e, s[a][b]);
    }
  Vf u[DZ::M][PYX];  // along y
  for (int a = 0; a < DZ::M; ++a)
    for (int k = 0; k < DX::NP; ++k) {
      Vf col[DY::M], q[DY::NP];
      for (int b = 0; b < DY::M; ++b) col[b] = s[a][b][k];
      DY::adj(col, q);
      for (int j = 0; j < DY::NP; ++j) u[a][j * DX::NP + k] = q[j];
    }
  float* const m = P + run.col + c * ld;
  for (int j = 0; j < PYX; ++j) {  // along z
    Vf col[DZ::M], q[DZ::NP];
    for (int a = 0; a < DZ::M; ++a) col[a] = u[a][j];
    DZ::adj(col, q);
    for (int k = 0; k < DZ::NP; ++k) vstore_mask(m + prod[k * PYX + j], 0xFFFF, q[k]);
  }
}

// The layer's weight gradient (wino_layer's layer; dilation 1): dw(g, co, ci, t) = the sum over the batch and the
// output of gout(co, o) in(ci, window point t of o), written where wino_layer reads wc(g, co, ci, t), by the transposes
// of its transforms: dU_p [co x ci] = sum over the tiles of P_p(co) V_vi[p](ci) (P: the products' gradients,
// wino_grad_run; V: the transformed inputs, wino_input_run), then dw(t) = sum_p g[p][t] dU_p (the schemes' g of its
// dims, transposed). The tiles are blocks (below), the depth of GEMMs dU_p += P_p . V_vi[p]^T, both operands
// transposed into panels (pack_panels) as the transforms leave them, a panel's channels at a time.
// The blocks are summed in fixed chunks (by count, not by thread; at least kWgradChunkItems blocks each), each into
// partial sums of its own (a chunk's first block of a group writes them, no zeroing pass), the chunks' sums added in
// order: the result does not depend on the thread count. Returns false (dw then written in part, or not at all) where
// any value of dw is not finite (the caller's path then computes it, as for wino_layer's outputs).
// Blocks of up to kWgradTiles tiles, as many (a multiple of 16) as keep the rows that the transforms write for one
// panel of channels (NR input channels' transformed inputs, MR output channels' products' gradients) within half of
// the L2 (wgrad_row_bytes), so they are still there when packed. Deeper blocks load and store each block of the GEMMs'
// C (the partial sums, which for DCGAN's layer are 4.7 MB) fewer times, and the GEMMs fetch the next A panel's C as
// each runs (GemmTile::kc). (Against direct summation, 20 alternated pairs, median time ratio, on a CPU of 512 KiB of
// L2: blocks of 32 tiles, DCGAN x0.91-0.93, stride-1 3d x0.72-0.79, a 2d kernel-3 conv x0.87; with half the L2 (96, 32
// and 128 tiles) x0.75-0.77, x0.68-0.82 and x0.70; with a 512 KiB bound x0.82-0.85, x0.65-0.78, x0.72. On Zen 4, 1 MiB
// of L2, 5 alternated pairs of builds: half of it instead of 256 KiB, with the C fetch, the first blocks writing and
// chunks of two blocks or more, DCGAN's weight gradient batch 8 x0.71 time, batch 32 x0.90; training steps: stride-1
// 3d x0.88, DCGAN x0.95. Step by step at batch 8 (3 runs each): the C fetch x0.83; with it and the first blocks
// writing, half the L2 x0.92; then chunks of two x0.91.)
constexpr int64_t kWgradTiles = 128;
constexpr int64_t kWgradChunkItems = 2;
inline int64_t wgrad_row_bytes() {
#if defined(__linux__) && defined(_SC_LEVEL2_CACHE_SIZE)
  static const int64_t l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#else
  constexpr int64_t l2 = 0;
#endif
  return (l2 > 0 ? l2 : int64_t(512) << 10) / 2;
}
template <class DZ, class DY, class DX>
bool wino_wgrad_layer(const WinogradLayer& l, const WinogradGeometry& geo, const float* in, const Strides& si,
                      const float* gout, const Strides& so, float* dw) {
  GemmTile gt = gemm_tile<float>(l.co);
  gt.kc = kWgradTiles;  // (one K block, C fetched ahead: GemmTile::kc)
  const int64_t MR = gt.mr, NR = gt.nr;
  const int64_t row_bytes = (geo.nv * NR + geo.np * MR) * int64_t(sizeof(float));  // a tile's, one panel of channels
  const int64_t nb = std::clamp<int64_t>(wgrad_row_bytes() / row_bytes / 16 * 16, 16, kWgradTiles);
  auto plan = std::make_unique<WinogradPlan>();
  wino_plan(l, geo, nb, *plan);  // (its vi: each product's transformed input)
  // dU: per product, co x ci row-major (du floats a group). The GEMMs' operands: per product its gradients P_p as A
  // (mr-row panels, K = the block's tiles deep), per transformed input V_v as B (NR-column panels), both transposed
  // into their panels a few channels at a time, from rows that the transforms just wrote (in L1 or L2).
  const int64_t a_size = packed_size(l.co, nb, MR), b_size = packed_size(l.ci, nb, NR);
  const int64_t du = geo.np * l.co * l.ci, all = l.groups * du;
  const int64_t blocks = ceil_div(geo.count, nb), items = l.batch * l.groups * blocks;  // (n, g, block)
  const int64_t target = std::clamp<int64_t>(kPartialBytes / (all * int64_t(sizeof(float))), 1, kMaxChunks);
  const int64_t chunks = std::min(ceil_div(items, kWgradChunkItems), target);
  std::unique_ptr<float[]> fresh;
  float* const partial = held_buffer<float, kPartialSlot>(chunks * all, fresh);
  // rows of the transforms: NR input channels' V (v_xi apart per v), MR output channels' P (p_xi apart per p)
  const int64_t v_xi = NR * nb + 16, p_xi = MR * nb + 16;
  std::vector<int64_t> prod(geo.np);
  for (int64_t p = 0; p < geo.np; ++p) prod[p] = p * p_xi;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    float* V = scratch<float, 0>(geo.nv * v_xi);
    float* P = scratch<float, 1>(geo.np * p_xi);
    float* A = scratch<float, 2>(geo.np * a_size);
    float* B = scratch<float, 3>(geo.nv * b_size);
    std::vector<char> written(l.groups);  // whether the chunk's sums of group g hold products
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      float* const sum = partial + chunk * all;
      std::fill(written.begin(), written.end(), 0);
      for (int64_t item = items * chunk / chunks; item < items * (chunk + 1) / chunks; ++item) {
        const int64_t n = item / (l.groups * blocks), g = item / blocks % l.groups, b = item % blocks;
        const int64_t t0 = b * nb, t1 = std::min(geo.count, t0 + nb), K = t1 - t0;
        const float* in_g = in + n * si.n + g * l.ci * si.c;
        const float* gout_g = gout + n * so.n + g * l.co * so.c;
        WinogradRun runs[kWgradTiles / 16];
        const int64_t count = ceil_div(K, int64_t(16));
        for (int64_t r = 0; r < count; ++r)
          wino_make_run(l, geo, si, so, t0 + 16 * r, std::min(t1, t0 + 16 * r + 16), 16 * r, runs[r]);
        for (int64_t c0 = 0; c0 < l.ci; c0 += NR) {
          const int64_t cn = std::min(NR, l.ci - c0);
          for (int64_t c = 0; c < cn; ++c)
            for (int64_t r = 0; r < count; ++r)
              wino_input_run<DZ, DY, DX>(in_g + c0 * si.c, si, runs[r], c, nb, NR, v_xi, V);
          for (int64_t v = 0; v < geo.nv; ++v) pack_panels(V + v * v_xi, nb, 1, cn, K, NR, B + v * b_size + c0 * K);
        }
        for (int64_t c0 = 0; c0 < l.co; c0 += MR) {
          const int64_t cn = std::min(MR, l.co - c0);
          for (int64_t c = 0; c < cn; ++c)
            for (int64_t r = 0; r < count; ++r)
              wino_grad_run<DZ, DY, DX>(gout_g + c0 * so.c, so, runs[r], c, prod.data(), nb, P);
          for (int64_t p = 0; p < geo.np; ++p) pack_panels(P + prod[p], nb, 1, cn, K, MR, A + p * a_size + c0 * K);
        }
        for (int64_t p = 0; p < geo.np; ++p)
          gemm_packed<float>(gt, l.co, l.ci, K, A + p * a_size, B + plan->vi[p] * b_size, written[g],
                             sum + g * du + p * l.co * l.ci, l.ci);
        written[g] = 1;
      }
      for (int64_t g = 0; g < l.groups; ++g)
        if (!written[g]) std::fill(sum + g * du, sum + (g + 1) * du, 0.0f);
    }
  });
  // The chunks' sums in order, and dw = g^T dU one dim at a time ([pz][py][px] -> [pz][py][kx] -> [pz][ky][kx] ->
  // [kz][ky][kx]), the taps of stride-1 dims reversed where flip (as wino_weights_part reads them).
  const WinoScheme &sz = kWinoSchemes[l.kind[0]], &sy = kWinoSchemes[l.kind[1]], &sx = kWinoSchemes[l.kind[2]];
  const bool fz = l.flip && wino_stride1(l.kind[0]), fy = l.flip && wino_stride1(l.kind[1]),
             fx = l.flip && wino_stride1(l.kind[2]);
  // (a row of ci values at a time: the sums of a product's row of dU, then each dim's taps of the rows)
  const auto along = [&](const float* src, float* dst, int64_t outer, const WinoScheme& s, bool flip, int64_t inner) {
    for (int64_t o = 0; o < outer; ++o)
      for (int t = 0; t < s.k; ++t) {
        float* const out = dst + (o * s.k + t) * inner;
        std::fill(out, out + inner, 0.0f);
        for (int p = 0; p < s.np; ++p) {
          const float c = s.g[p][flip ? s.k - 1 - t : t];
          const float* const x = src + (o * s.np + p) * inner;
          if (c != 0.0f)
            for (int64_t i = 0; i < inner; ++i) out[i] += c * x[i];
        }
      }
  };
  const int64_t taps = int64_t(sz.k) * sy.k * sx.k;
  std::atomic<bool> finite{true};
  at::parallel_for(0, l.groups * l.co, 1, [&](int64_t begin, int64_t end) {
    float* const d = scratch<float, 0>(2 * geo.np * l.ci);  // [pz][py][px][ci], then [pz][py][kx][ci], ...
    float* const e = d + geo.np * l.ci;
    bool ok = true;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t g = item / l.co, co = item % l.co;
      for (int64_t p = 0; p < geo.np; ++p) {
        const float* const src = partial + g * du + (p * l.co + co) * l.ci;
        float* const row = d + p * l.ci;
        std::copy(src, src + l.ci, row);
        for (int64_t chunk = 1; chunk < chunks; ++chunk)
          for (int64_t i = 0; i < l.ci; ++i) row[i] += src[chunk * all + i];
      }
      along(d, e, int64_t(sz.np) * sy.np, sx, fx, l.ci);       // -> [pz][py][kx][ci]
      along(e, d, sz.np, sy, fy, int64_t(sx.k) * l.ci);        // -> [pz][ky][kx][ci]
      along(d, e, 1, sz, fz, int64_t(sy.k) * sx.k * l.ci);     // -> [kz][ky][kx][ci]
      float* const dst = dw + g * l.w_g + co * l.w_co;
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t ci = 0; ci < l.ci; ++ci) {
          const float v = e[t * l.ci + ci];
          ok &= std::isfinite(v);
          dst[ci * l.w_ci + t] = v;
        }
    }
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

inline bool wino_wgrad(const WinogradLayer& l, const float* in, const Strides& si, const float* gout,
                       const Strides& so, float* dw) {
  const WinogradGeometry geo = wino_geometry(l);
  return wino_instance(l, [&]<class DZ, class DY, class DX>() {
    return wino_wgrad_layer<DZ, DY, DX>(l, geo, in, si, gout, so, dw);
  });
}

// even[i] = src[2i] (2i < n), odd[i] = src[2i + 1] (2i + 1 < n): a row split into its two sub-lattices.
WINO_TARGET inline void wino_split_row(const float* src, int64_t n, float* even, float* odd) {
  for (int64_t x = 0; x < n; x += 32) {
    Vf e, o;
    wino_split(vloadz(lane_mask(0, 0, n - x), src + x),
               vloadz(lane_mask(0, 0, n - x - 16), src + x + 16), e, o);
    vstore_mask(even + x / 2, lane_mask(0, 0, (n - x + 1) / 2), e);
    vstore_mask(odd + x / 2, lane_mask(0, 0, (n - x) / 2), o);
  }
}

// dst[2i] = even[i] (2i < n), dst[2i + 1] = odd[i] (2i + 1 < n): a row from its two sub-lattices.
WINO_TARGET inline void wino_merge_row(const float* even, const float* odd, int64_t n, float* dst) {
  for (int64_t x = 0; x < n; x += 32) {
    Vf a, b;
    wino_merge(vloadz(lane_mask(0, 0, (n - x + 1) / 2), even + x / 2),
               vloadz(lane_mask(0, 0, (n - x) / 2), odd + x / 2), a, b);
    vstore_mask(dst + x, lane_mask(0, 0, n - x), a);
    vstore_mask(dst + x + 16, lane_mask(0, 0, n - x - 16), b);
  }
}

// A dilated layer is d0 x d1 x d2 undilated ones, one per sub-lattice of the output (the points o = r + d j, residues
// r per dim), each reading one sub-lattice of the input (its points i with i = r - pad mod d): those are copied into
// a batch of dense images, the layer computed on them by wino_dense, and the results copied into the output's
// sub-lattices. The sub-lattices' pads differ by residue; each copy is shifted so that all of them take the least.
// Returns false, having written nothing, where the copies and the transformed weights would outgrow max(64 MiB, the
// output).
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
  const int64_t bytes =
      (v.batch * (cin * in_plane + cout * out_plane) + wino_weight_floats(v)) * int64_t(sizeof(float));
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

// A conv at stride 2 by kernel 4 (its split dims; the others stride 1) is, per split dim, two stride-1 correlations by
// kernel 2, one on each sub-lattice of its input (residue r: the points 2i + r): y[o] = sum_r sum_a w[t_r + 2a]
// x[2 (o + a - p_r) + r], t_r = (r + pad) mod 2, p_r = (pad + r - t_r) / 2. The sub-lattices are copied as channels of
// one input (per group residue-major: channel q ci + c, q the residues' index), each shifted so that all take one pad
// (the least p_r), and the weights laid out as the residues' taps: one stride-1 layer, F(2, 2) along the split dims,
// whose GEMMs sum over the residues in their depth (3d: 27 products for 8 outputs over 8 ci channels, 0.42 of the
// multiply-adds; 2d 0.56). Returns false, having written nothing, where the input's rows are not dense, the copies
// and the weights (laid out and transformed) would outgrow max(64 MiB, the output), or winograd_shape does not take
// the layer so laid out.
inline bool wino_strided(const WinogradLayer& l, const float* in, const Strides& si, const float* w, const float* bias,
                         float* out, const Strides& so) {
  TORCH_INTERNAL_ASSERT(!l.flip);
  if (si.s[2] != 1) return false;
  WinogradLayer v = l;
  int64_t lat = 1, res[kMaxDims], tap0[kMaxDims][2] = {}, shift[kMaxDims][2] = {}, count[kMaxDims][2] = {};
  for (int64_t d = 0; d < kMaxDims; ++d) {
    v.split[d] = false;
    res[d] = l.split[d] ? 2 : 1, lat *= res[d];
    if (!l.split[d]) {
      count[d][0] = l.in_ext[d];
      continue;
    }
    int64_t pr[2];
    for (int64_t r = 0; r < 2; ++r) {
      tap0[d][r] = (r + l.pad[d]) % 2, pr[r] = (l.pad[d] + r - tap0[d][r]) / 2;
      count[d][r] = (l.in_ext[d] - r + 1) / 2;  // (points 2i + r inside the input)
    }
    v.pad[d] = std::min(pr[0], pr[1]), v.kernel[d] = 2, v.in_ext[d] = 1;
    for (int64_t r = 0; r < 2; ++r) {
      shift[d][r] = pr[r] - v.pad[d];  // (leading zeros of residue r's copy)
      v.in_ext[d] = std::max(v.in_ext[d], count[d][r] + shift[d][r]);
    }
  }
  const int64_t T = v.kernel[0] * v.kernel[1] * v.kernel[2];
  v.ci = lat * l.ci, v.w_ci = T, v.w_co = v.ci * T, v.w_g = l.co * v.w_co;
  if (!winograd_shape(v, 1, so.s[2])) return false;
  const int64_t plane = v.in_ext[0] * v.in_ext[1] * v.in_ext[2], cin = l.groups * v.ci;
  const int64_t bytes = (l.batch * cin * plane + l.groups * v.w_g + wino_weight_floats(v)) * int64_t(sizeof(float));
  const int64_t output =
      l.batch * l.groups * l.co * l.out_ext[0] * l.out_ext[1] * l.out_ext[2] * int64_t(sizeof(float));
  if (bytes > std::max(int64_t(64) << 20, output)) return false;
  std::unique_ptr<float[]> in_fresh;
  float* const vin = held_buffer<float, kPlaneSlot>(l.batch * cin * plane, in_fresh);
  const Strides sv{cin * plane, plane, {v.in_ext[1] * v.in_ext[2], v.in_ext[2], 1}};
  // The copies: an item is a channel's sub-lattice planes of one z and y residue (both x residues: a row split once).
  const int64_t ryz = res[0] * res[1];
  at::parallel_for(0, l.batch * l.groups * l.ci * ryz, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (l.groups * l.ci * ryz), gc = item / ryz % (l.groups * l.ci), q0 = item % ryz;
      const int64_t g = gc / l.ci, c = gc % l.ci, rz = q0 / res[1], ry = q0 % res[1];
      float* dst[2];
      for (int64_t rx = 0; rx < res[2]; ++rx)
        dst[rx] = vin + n * sv.n + (g * v.ci + (q0 * res[2] + rx) * l.ci + c) * sv.c;
      const float* src = in + n * si.n + gc * si.c;
      const int64_t e0 = v.in_ext[0], e1 = v.in_ext[1], e2 = v.in_ext[2];
      for (int64_t j0 = 0; j0 < e0; ++j0)
        for (int64_t j1 = 0; j1 < e1; ++j1) {
          // (each point written once: a row of the copy, its leading and trailing zeros, or a row of zeros)
          const int64_t i0 = j0 - shift[0][rz], i1 = j1 - shift[1][ry], at = sv.at(j0, j1, 0);
          if (i0 < 0 || i0 >= count[0][rz] || i1 < 0 || i1 >= count[1][ry]) {
            for (int64_t rx = 0; rx < res[2]; ++rx) std::fill(dst[rx] + at, dst[rx] + at + e2, 0.0f);
            continue;
          }
          const float* row = src + si.at(res[0] * i0 + rz, res[1] * i1 + ry, 0);
          for (int64_t rx = 0; rx < res[2]; ++rx) {
            std::fill(dst[rx] + at, dst[rx] + at + shift[2][rx], 0.0f);
            std::fill(dst[rx] + at + shift[2][rx] + count[2][rx], dst[rx] + at + e2, 0.0f);
          }
          if (res[2] == 2) wino_split_row(row, l.in_ext[2], dst[0] + at + shift[2][0], dst[1] + at + shift[2][1]);
          else std::copy(row, row + l.in_ext[2], dst[0] + at);
        }
    }
  });
  // The weights of the residues' taps: wv(g, co, q ci + c, a) = wc(g, co, c, t), t_d = t_r + 2 a_d along split dims.
  std::vector<int64_t> tap(lat * T);  // residues q's tap a: its flat tap index t in the conv's kernel
  for (int64_t q = 0; q < lat; ++q)
    for (int64_t a = 0; a < T; ++a) {
      int64_t r[kMaxDims], a3[kMaxDims];
      unflatten3(q, res, r), unflatten3(a, v.kernel, a3);
      int64_t t = 0;
      for (int64_t d = 0; d < kMaxDims; ++d) t = t * l.kernel[d] + (l.split[d] ? tap0[d][r[d]] + 2 * a3[d] : a3[d]);
      tap[q * T + a] = t;
    }
  std::unique_ptr<float[]> vw(new float[l.groups * v.w_g]);
  at::parallel_for(0, l.groups * l.co, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gco = begin; gco < end; ++gco) {
      const int64_t g = gco / l.co, co = gco % l.co;
      float* dst = vw.get() + g * v.w_g + co * v.w_co;
      for (int64_t q = 0; q < lat; ++q)
        for (int64_t c = 0; c < l.ci; ++c, dst += T) {
          const float* wc = w + g * l.w_g + co * l.w_co + c * l.w_ci;
          for (int64_t a = 0; a < T; ++a) dst[a] = wc[tap[q * T + a]];
        }
    }
  });
  return wino_dense(v, vin, sv, vw.get(), bias, out, so);
}

// A conv_transpose along one dim (the others of extent 1, kernel 1) at stride s, 2 <= s <= 8, by kernel 2s,
// undilated: the up-samplers of audio vocoders (HiFi-GAN's and MelGAN's k = 16, s = 8 and k = 4, s = 2). With
// o + padding = s q + r (0 <= r < s), out[o] = sum_ci w[r] in[q] + w[r + s] in[q - 1]: s 2-tap correlations (phases)
// of the same input, each by F(3, 2) on triples of q (the K3 scheme's tables transposed: y_i = g0 d_i + g1 d_i+1,
// i < 3, from d0 .. d3 by 4 products). Tile T: q = q0 + 3T .. q0 + 3T + 2 (q0 = padding / s), its window d =
// in[q0 + 3T - 1 .. q0 + 3T + 2], transformed once for all phases into (d0 - d2, d1 + d2, d2 - d1, d3 - d1); phase
// r's weights (g0, g1) = (w[r + s], w[r]) into (g0, (g0 + g1) / 2, (g0 - g1) / 2, g1). Its outputs at q, q + 1, q + 2:
// p0 + p1 + p2, p1 - p2, p1 + p2 + p3: a tile's 3s outputs out[3sT - r0 .. 3sT - r0 + 3s) (r0 = padding mod s) by 4s
// products instead of 6s multiply-adds (0.67; F(2, 2), 0.75, took x1.04 the time of HiFi-GAN's forward). Each
// transformed input's products for all (co, r) rows are one GEMM: U_v [s co x ci] . V_v [ci x tiles], in blocks of
// rows whose U stays in the core's L2 while the tiles' V stream past it (all tiles' V transformed first).
struct WinoUpsample {
  int64_t s, r0, q0, tiles;  // tiles: of one image
  int64_t mr, nr, nb, rows;  // GEMM tiling; rows: of a block of U (a multiple of s and mr)
  int64_t u_size, v_size;    // one transformed input's U (a group's), V (a group's, all images)
};

// Blocks of 144 rows of U (1.2 MiB of its four transformed weights at 512 channels: in L2 while the tiles' V stream
// past; 192 rows took x1.07 the time, 96 within noise) and 2 panels of tiles; the 12-row register blocking where it
// pads s co by 5% or less (the 8-row one took x1.04-1.07 the time).
inline void wino_upsample_plan(const WinogradLayer& l, int64_t stride, int64_t padding, WinoUpsample& up) {
  const int64_t s = stride, Lo = l.out_ext[2];
  up.s = s, up.q0 = padding / s, up.r0 = padding % s;
  up.tiles = ceil_div((Lo - 1 + padding) / s - up.q0 + 1, int64_t(3));
  const GemmTile gt = gemm_tile<float>(s * l.co, 0.05);
  up.mr = gt.mr, up.nr = gt.nr, up.nb = 2 * gt.nr;
  const int64_t unit = std::lcm(s, up.mr);
  up.rows = std::max<int64_t>(1, 144 / unit) * unit;
  up.u_size = packed_size(s * l.co, l.ci, up.mr) + 16;
  up.v_size = packed_size(l.batch * up.tiles, l.ci, up.nr) + 16;
}

// The transformed weights of group g's panel p (mr rows co s + r of U_v, packed as gemm_packed's A, ci deep).
// Returns whether all are finite.
WINO_TARGET inline bool wino_upsample_panel(const WinogradLayer& l, const WinoUpsample& up,
                                                          const float* w, int64_t g, int64_t p, float* U) {
  const int64_t lanes = std::min(up.mr, up.s * l.co - p * up.mr);
  alignas(64) int32_t off[16] = {};
  for (int64_t j = 0; j < lanes; ++j) {
    const int64_t row = p * up.mr + j;
    off[j] = static_cast<int32_t>(row / up.s * l.w_co + row % up.s);
  }
  const __mmask16 m = lane_mask(0, 0, lanes), all = lane_mask(0, 0, up.mr);
  float* u = U + g * 4 * up.u_size + p * l.ci * up.mr;
  const Vf half = vset1(0.5f);
  const float* src = w + g * l.w_g;
  Vf bad = vzero();
  for (int64_t c = 0; c < l.ci; ++c, u += up.mr, src += l.w_ci) {
    const Vf a = vgather(src, off, m);         // w[r]
    const Vf b = vgather(src + up.s, off, m);  // w[r + s]
    const Vf sum = vmul(vadd(b, a), half), dif = vmul(vsub(b, a), half);
    bad = vadd(bad, vsub(vadd(sum, dif), vadd(sum, dif)));
    vstore_mask(u, all, b), vstore_mask(u + up.u_size, all, sum);
    vstore_mask(u + 2 * up.u_size, all, dif), vstore_mask(u + 3 * up.u_size, all, a);
  }
  return vfinite(bad);
}

// The products of a block (co0's rows of group g by the tiles from c0: the GEMMs into M) and its outputs. Returns
// whether the sum of its outputs (bias aside) is finite. E: the output's elements (float, or 16-bit floats rounded).
template <typename E>
WINO_TARGET inline bool wino_upsample_block(const WinogradLayer& l, const WinoUpsample& up, const float* U,
                                            const float* V, const float* bias, int64_t g, int64_t co0, int64_t c0,
                                            float* M, E* out, const Strides& so) {
  const int64_t s = up.s, Lo = l.out_ext[2], all_tiles = l.batch * up.tiles;
  const int64_t cos = std::min(up.rows / s, l.co - co0), rows = cos * s, cols = std::min(up.nb, all_tiles - c0);
  const int64_t m_size = up.rows * up.nb + 16, ld = s * up.nb;
  const GemmTile gt{up.mr, up.nr};
  for (int64_t v = 0; v < 4; ++v)
    gemm_packed<float>(gt, rows, cols, l.ci, U + (g * 4 + v) * up.u_size + co0 * s * l.ci,
                       V + (g * 4 + v) * up.v_size + c0 * l.ci, false, M + v * m_size, up.nb);
  // Phase r's outputs at q (into M_0's rows), q + 1 (into M_1's) and q + 2 (into M_3's).
  Vf bad = vzero();
  for (int64_t row = 0; row < rows; ++row) {
    float* m0 = M + row * up.nb;
    for (int64_t j = 0; j < cols; j += 16) {
      const __mmask16 lanes = lane_mask(j, 0, cols);
      const Vf p0 = vloadz(lanes, m0 + j), p1 = vloadz(lanes, m0 + m_size + j),
                   p2 = vloadz(lanes, m0 + 2 * m_size + j),
                   p3 = vloadz(lanes, m0 + 3 * m_size + j);
      const Vf mid = vadd(p1, p2), y0 = vadd(p0, mid), y1 = vsub(p1, p2),
                   y2 = vadd(mid, p3);
      bad = vadd(bad, vadd(vadd(y0, y1), y2));
      vstore_mask(m0 + j, lanes, y0), vstore_mask(m0 + m_size + j, lanes, y1);
      vstore_mask(m0 + 3 * m_size + j, lanes, y2);
    }
  }
  const float* rws[24];
  for (int64_t r = 0; r < s; ++r)
    rws[r] = M + r * up.nb, rws[s + r] = M + m_size + r * up.nb, rws[2 * s + r] = M + 3 * m_size + r * up.nb;
  const float* bias_b = bias ? bias + g * l.co + co0 : nullptr;
  E* out_b = out + (g * l.co + co0) * so.c;
  // Interior tiles (their 3s outputs all inside the output) by store_interleaved, a run per image (at most one per
  // tile of the block: nb <= 64); the others point by point.
  const int64_t t_lo = ceil_div(up.r0, 3 * s), t_hi = (Lo + up.r0) / (3 * s);
  StoreRun runs[2 * 32 + 2];
  int64_t count = 0;
  for (int64_t t = c0; t < c0 + cols;) {
    const int64_t n = t / up.tiles, T0 = t % up.tiles, T1 = std::min(up.tiles, T0 + c0 + cols - t);
    for (int64_t T = T0; T < T1; ++T) {
      if (T >= t_lo && T < t_hi) continue;
      for (int64_t k = 0; k < cos; ++k)
        for (int64_t r = 0; r < 3 * s; ++r) {
          const int64_t o = 3 * s * T - up.r0 + r;
          if (o >= 0 && o < Lo)
            out_b[n * so.n + k * so.c + o] =
                static_cast<E>(rws[r][k * ld + n * up.tiles + T - c0] + (bias_b ? bias_b[k] : 0.0f));
        }
    }
    const int64_t a = std::max(T0, t_lo), b = std::min(T1, t_hi);
    if (a < b) runs[count++] = StoreRun{n * so.n + 3 * s * a - up.r0, n * up.tiles + a - c0, 0, b - a};
    t += T1 - T0;
  }
  for (int64_t j = 0; j < 3; ++j) {  // (the outputs at q, q + 1, q + 2: s phases each)
    const StoreChannels ch{cos, ld, so.c, bias_b};
    if constexpr (std::is_same_v<E, float>)
      store_interleaved(rws + j * s, s, 3 * s, ch, runs, count, out_b + j * s, false);
    else
      store_interleaved16(rws + j * s, s, 3 * s, ch, runs, count, reinterpret_cast<uint16_t*>(out_b + j * s),
                          std::is_same_v<E, c10::BFloat16>, false);
  }
  return vfinite(bad);
}

template <typename E>
bool wino_upsample(const WinogradLayer& l, int64_t stride, int64_t padding, const E* in, const Strides& si,
                   const float* w, const float* bias, E* out, const Strides& so) {
  if (!wino_upsample_shape(l, stride, si.s[2], so.s[2])) return false;
  WinoUpsample up;
  wino_upsample_plan(l, stride, padding, up);
  const int64_t L = l.in_ext[2], all_tiles = l.batch * up.tiles;
  // (transformed inputs in the calling thread's kept buffer: no fresh pages; within the workspace bound with U)
  const int64_t v_bytes = 4 * l.groups * up.v_size * int64_t(sizeof(float));
  const int64_t output = l.batch * l.groups * l.co * l.out_ext[2] * int64_t(sizeof(float));
  if (v_bytes > kHeldBytes ||
      v_bytes + 4 * l.groups * up.u_size * int64_t(sizeof(float)) > std::max(int64_t(64) << 20, output))
    return false;
  const int64_t panels = ceil_div(up.s * l.co, up.mr);
  const Prepared<float> u = prepared_weights<float, kWeightSlot>(
      {2, up.s, l.groups, l.ci, l.co, l.w_g, l.w_co, l.w_ci, up.mr, up.u_size}, w,
      size_t(l.groups * l.w_g) * sizeof(float), 4 * l.groups * up.u_size, [&](float* U) {
        std::atomic<bool> finite{true};
        at::parallel_for(0, l.groups * panels, 1, [&](int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item)
            if (!wino_upsample_panel(l, up, w, item / panels, item % panels, U))
              finite.store(false, std::memory_order_relaxed);
        });
        return finite.load();
      });
  if (!u.ok) return false;
  std::unique_ptr<float[]> v_fresh;
  float* const V = held_buffer<float, kPlaneSlot>(4 * l.groups * up.v_size, v_fresh);
  // The transformed inputs of every tile t = n tiles + T (columns past the last tile zero).
  at::parallel_for(0, l.batch * l.groups * l.ci, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / (l.groups * l.ci), g = item / l.ci % l.groups, c = item % l.ci;
      const E* x = in + n * si.n + (g * l.ci + c) * si.c;
      float* v = V + g * 4 * up.v_size + c * up.nr;
      const int64_t vs = up.v_size;
      const auto at = [&](int64_t i) { return i >= 0 && i < L ? static_cast<float>(x[i]) : 0.0f; };
      for (int64_t T = 0; T < up.tiles; ++T) {
        const int64_t t = n * up.tiles + T, q = up.q0 + 3 * T, k = t / up.nr * l.ci * up.nr + t % up.nr;
        const float d0 = at(q - 1), d1 = at(q), d2 = at(q + 1), d3 = at(q + 2);
        v[k] = d0 - d2, v[k + vs] = d1 + d2, v[k + 2 * vs] = d2 - d1, v[k + 3 * vs] = d3 - d1;
      }
      if (n == l.batch - 1)
        for (int64_t t = all_tiles; t < ceil_div(all_tiles, up.nr) * up.nr; ++t) {
          const int64_t k = t / up.nr * l.ci * up.nr + t % up.nr;
          v[k] = v[k + vs] = v[k + 2 * vs] = v[k + 3 * vs] = 0.0f;
        }
    }
  });
  // Blocks (group, rows, tiles), rows outermost: a thread's blocks of one row block in a row, its U in L2. The
  // threads take consecutive blocks of equal work (the last row and tile blocks are smaller: split by count, one
  // thread waited for the other 8% of a HiFi-GAN layer's time).
  const int64_t cob = up.rows / up.s, rblocks = ceil_div(l.co, cob), tblocks = ceil_div(all_tiles, up.nb);
  const int64_t items = l.groups * rblocks * tblocks;
  std::vector<int64_t> work(items + 1, 0);  // the blocks' prefix sums of products
  for (int64_t item = 0; item < items; ++item) {
    const int64_t rb = item / tblocks % rblocks, tb = item % tblocks;
    work[item + 1] = work[item] + std::min(cob, l.co - rb * cob) * std::min(up.nb, all_tiles - tb * up.nb);
  }
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), items);
  std::atomic<bool> finite{true};
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    float* M = scratch<float, 1>(4 * (up.rows * up.nb + 16));
    bool ok = true;
    for (int64_t item = 0; item < items; ++item) {
      const int64_t part = (work[item] + work[item + 1]) * parts / (2 * work[items]);  // (its middle's part)
      if (part < begin || part >= end) continue;
      const int64_t g = item / (rblocks * tblocks), rb = item / tblocks % rblocks, tb = item % tblocks;
      ok &= wino_upsample_block(l, up, u.data, V, bias, g, rb * cob, tb * up.nb, M, out, so);
    }
    if (!ok) finite.store(false, std::memory_order_relaxed);
  });
  return finite.load();
}

#undef WINO_INLINE
