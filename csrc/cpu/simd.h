// SIMD helpers shared by the CPU translation units (gemm.cpp, and conv_cpu.cpp through direct.h). Each is always
// inlined into its caller, which must carry at least its target features (avx512f, bmi2; for 16-bit rows also
// avx512bw, avx512vl; the AVX2 ones avx2, and f16c for half) and be called only after a run-time check of the CPU.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdint>

namespace torch_convt::cpu {

// v[l] = p[2 * l] for the lanes l in m, zero elsewhere; no element is read for a lane outside m (so nothing past
// the last one needed, which may be the end of a mapping).
__attribute__((target("avx512f,bmi2"), always_inline)) inline __m512 load_even_avx512(const float* p, __mmask16 m) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __mmask16 m0 = static_cast<__mmask16>(_pdep_u32(m & 0xFFu, 0x5555u));
  const __mmask16 m1 = static_cast<__mmask16>(_pdep_u32(static_cast<uint32_t>(m) >> 8, 0x5555u));
  return _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(m0, p), even, _mm512_maskz_loadu_ps(m1, p + 16));
}

// v[l] = row[(j0 + l) * step] for the lanes l in m (step 1 or 2), zero elsewhere; nothing outside m is read.
__attribute__((target("avx512f,bmi2"), always_inline)) inline __m512 load_step_avx512(const float* row, int64_t j0,
                                                                                      int64_t step, __mmask16 m) {
  return step == 1 ? _mm512_maskz_loadu_ps(m, row + j0) : load_even_avx512(row + 2 * j0, m);
}

// Lane l: the 16-bit element p[l] (step 1) or p[2l] (step 2), zero-extended to 32 bits, for the lanes in m; other lanes
// zero, and nothing outside m read (at step 2 only the even elements: word masks).
__attribute__((target("avx512f,avx512bw,avx512vl,bmi2"), always_inline)) inline __m512i load_step16_raw_avx512(
    const uint16_t* p, int64_t step, __mmask16 m) {
  if (step == 1) return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_and_si512(_mm512_maskz_loadu_epi16(static_cast<__mmask32>(_pdep_u32(m, 0x55555555u)), p),
                          _mm512_set1_epi32(0xFFFF));
}

// load_step_avx512 for 16-bit floats (bfloat16 where `bf16`, else IEEE half), widened to float: the same lanes read.
__attribute__((target("avx512f,avx512bw,avx512vl,bmi2"), always_inline)) inline __m512 load_step16_avx512(
    const uint16_t* row, int64_t j0, int64_t step, __mmask16 m, bool bf16) {
  if (bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(load_step16_raw_avx512(row + step * j0, step, m), 16));
  const __m256i h = step == 1 ? _mm256_maskz_loadu_epi16(m, row + j0)
                              : _mm512_cvtepi32_epi16(load_step16_raw_avx512(row + 2 * j0, 2, m));
  return _mm512_cvtph_ps(h);
}

// 16-bit floats to and from float, rounded to nearest even as c10's conversions (bfloat16: NaN -> 0x7fc0): the
// stores of 16-bit outputs (gemm.cpp) and the Winograd transforms (winograd_kernels.h).
// (GCC 12 warns inside its own AVX-512 intrinsics, whose "undefined" pass-through operands it takes for uninitialised)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
// bfloat16 of v in the high 16 bits of each 32-bit lane; the low bits are garbage.
__attribute__((target("avx512f"), always_inline)) inline __m512i bf16_high_avx512(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), odd);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}

// The 16 values of v as 16-bit floats: bfloat16 (`bf16`) or IEEE half.
__attribute__((target("avx512f"), always_inline)) inline __m256i narrow16_avx512(__m512 v, bool bf16) {
  if (!bf16) return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high_avx512(v), 16));
}
#pragma GCC diagnostic pop

// bfloat16 of 8 values in the low 16 bits of each 32-bit lane.
__attribute__((target("avx2"), always_inline)) inline __m256i bf16_low_avx2(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), odd);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_srli_epi32(_mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan), 16);
}

// The 8 values of v as 16-bit floats: bfloat16 (`bf16`) or IEEE half.
__attribute__((target("avx2,f16c"), always_inline)) inline __m128i narrow8_avx2(__m256 v, bool bf16) {
  if (!bf16) return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i lo = bf16_low_avx2(v);  // (32-bit lanes under 0x10000: packus keeps them)
  return _mm_packus_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
}

// 8 16-bit floats (bfloat16 where `bf16`, else IEEE half) widened to float.
__attribute__((target("avx2,f16c"), always_inline)) inline __m256 widen8_avx2(__m128i h, bool bf16) {
  return bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

// Lanes [lo, hi) of 8 (0 <= lo, hi <= 8) of index vector `idx` as an AVX2 mask: lane l is set where lo <= idx[l] < hi
// (an index of -1 is never set).
__attribute__((target("avx2"), always_inline)) inline __m256i lane_mask_avx2(__m256i idx, int64_t lo, int64_t hi) {
  return _mm256_and_si256(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(static_cast<int>(lo) - 1)),
                          _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(hi)), idx));
}

// v[l] = p[2l] for l < 8, reading p[0, 15) (not the odd element after the last).
__attribute__((target("avx2"), always_inline)) inline __m256 load_even_avx2(const float* p) {
  return _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 7), 0xAA),
                                  _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
}

// v[l] = row[(j0 + l) * step] for the lanes l in [lo, hi) (step 1 or 2; 0 <= lo, hi <= 8), zero elsewhere; no other
// element is read (at step 2 not even the odd one after the last: p[0, 8) and p[7, 15) load its evens). Masked loads
// whatever the lanes, without a branch on them.
__attribute__((target("avx2"), always_inline)) inline __m256 load_step_avx2(const float* row, int64_t j0, int64_t step,
                                                                            int64_t lo, int64_t hi) {
  if (step == 1) return _mm256_maskload_ps(row + j0, lane_mask_avx2(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), lo, hi));
  const float* p = row + 2 * j0;
  const __m256 a = _mm256_maskload_ps(p, lane_mask_avx2(_mm256_setr_epi32(0, -1, 1, -1, 2, -1, 3, -1), lo, hi));
  const __m256 b = _mm256_maskload_ps(p + 7, lane_mask_avx2(_mm256_setr_epi32(-1, 4, -1, 5, -1, 6, -1, 7), lo, hi));
  return _mm256_permutevar8x32_ps(_mm256_blend_ps(a, b, 0xAA), _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7));
}

}  // namespace torch_convt::cpu
#endif
