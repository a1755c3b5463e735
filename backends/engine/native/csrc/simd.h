/* Helpers shared by the kernels in this directory: bfloat16 <-> float32 and a vector exp. */
#ifndef TAXIWAY_SIMD_H
#define TAXIWAY_SIMD_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

/* 1 where this build has AVX-512 F, BW and BF16: the int4 and int8 matmuls' fast path */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define TAXIWAY_AVX512_BF16 1
#else
#define TAXIWAY_AVX512_BF16 0
#endif

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* dst[0:n] = bf16 src[0:n] as float32 */
static inline void load_row(float *dst, const uint16_t *src, int n) {
    int d = 0;
#ifdef __AVX512F__
    for (; d + 16 <= n; d += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(src + d));
        _mm512_storeu_ps(dst + d, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
#endif
    for (; d < n; d++) dst[d] = bf16_to_f32(src[d]);
}

#ifdef __AVX512F__
/* the two bfloat16 at p (a pair along the dot product) in every 32-bit lane: the operand
 * VDPBF16PS multiplies a vector of pairs by */
static inline __m512i bf16_pair_bcast(const uint16_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_set1_epi32(v);
}

static inline __m512 bf16x16_to_f32(const uint16_t *src) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)src)), 16));
}

/* float32 -> bfloat16, round to nearest even (NaN stays NaN), as f32_to_bf16 lane by lane */
static inline __m256i f32x16_to_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i rounded = _mm512_add_epi32(
        u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    const __m512i out = _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(out, 16));
}

/* exp(v) lane by lane: exp(r) * 2^k with |r| <= ln2 / 2 and a degree-6 Taylor polynomial
 * (relative error < 2e-7, about one float32 ulp); 0 below -87.3 (where expf turns subnormal),
 * +inf above 88.7 (where it overflows), NaN stays NaN (max/min return their second operand when
 * it is NaN). Scalar libm expf costs ~10 ns. */
static inline __m512 exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693145751953125f), ln2_lo = _mm512_set1_ps(1.428606765330187e-06f);
    const __mmask16 under = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
    const __mmask16 over = _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72f), _CMP_GT_OQ);
    const __m512 v = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(k, ln2_lo, _mm512_fnmadd_ps(k, ln2_hi, v));
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_scalef_ps(p, k);
    p = _mm512_mask_mov_ps(p, under, _mm512_setzero_ps());
    return _mm512_mask_mov_ps(p, over, _mm512_set1_ps(INFINITY));
}
#endif

#endif
