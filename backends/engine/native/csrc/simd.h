/* Helpers shared by the kernels in this directory: bfloat16 <-> float32, a vector exp and the
 * exponentials of a softmax (exp_shifted).
 *
 * The variant of the kernels is chosen when they are compiled, from the target's instruction set
 * (ckernels.py builds with -march=native, or -march=x86-64-v3 for the AVX2 build):
 *   TAXIWAY_AVX512_BF16  AVX-512 F, BW and BF16: the matmuls and attention multiply bfloat16
 *                        pairs with VDPBF16PS;
 *   TAXIWAY_AVX2         otherwise AVX2 and FMA: bfloat16 widened to float32 by a shift,
 *                        float32 multiply-adds (the same exact products, float32 sums);
 *   neither              the matmuls and the prefill kernel refuse, the rest runs scalar code.
 * TAXIWAY_VARIANT names it (variant.c reports it to the loader, which logs it). */
#ifndef TAXIWAY_SIMD_H
#define TAXIWAY_SIMD_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define TAXIWAY_AVX512_BF16 1
#define TAXIWAY_AVX2 0
#define TAXIWAY_VARIANT "avx512-bf16"
#elif defined(__AVX2__) && defined(__FMA__)
#define TAXIWAY_AVX512_BF16 0
#define TAXIWAY_AVX2 1
#define TAXIWAY_VARIANT "avx2-fma"
#else
#define TAXIWAY_AVX512_BF16 0
#define TAXIWAY_AVX2 0
#define TAXIWAY_VARIANT "generic"
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
#elif TAXIWAY_AVX2
    for (; d + 8 <= n; d += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(src + d));
        _mm256_storeu_ps(dst + d, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
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

#if TAXIWAY_AVX2
static inline __m256 bf16x8_to_f32(const uint16_t *src) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)src)), 16));
}

/* float32 -> bfloat16, round to nearest even (NaN stays NaN), as f32_to_bf16 lane by lane */
static inline __m128i f32x8_to_bf16(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i rounded = _mm256_add_epi32(
        u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    const __m256i out = _mm256_srli_epi32(
        _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(rounded),
                                             _mm256_castsi256_ps(_mm256_or_si256(u, _mm256_set1_epi32(0x400000))), nan)),
        16);
    return _mm_packus_epi32(_mm256_castsi256_si128(out), _mm256_extracti128_si256(out, 1));
}

/* the bfloat16 rounding of v, as float32 (f32x8_to_bf16 widened back) */
static inline __m256 round_bf16x8(__m256 v) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(f32x8_to_bf16(v)), 16));
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* exp(v) lane by lane, as exp512 (same reduction and polynomial, same limits); 2^k is built in
 * the exponent bits (k in [-126, 127] after the clamp: a normal float) */
static inline __m256 exp256(__m256 x) {
    const __m256 log2e = _mm256_set1_ps(1.44269504f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693145751953125f), ln2_lo = _mm256_set1_ps(1.428606765330187e-06f);
    const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);
    const __m256 over = _mm256_cmp_ps(x, _mm256_set1_ps(88.72f), _CMP_GT_OQ);
    const __m256 v = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(k, ln2_lo, _mm256_fnmadd_ps(k, ln2_hi, v));
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    p = _mm256_blendv_ps(p, _mm256_setzero_ps(), under);
    return _mm256_blendv_ps(p, _mm256_set1_ps(INFINITY), over);
}
#endif

/* x[0:n] = exp(x[0:n] - shift), returns their sum (exp512 for whole vectors, libm for the tail). */
static inline float exp_shifted(float *x, float shift, int n) {
    int t = 0;
    float sum = 0.0f;
#ifdef __AVX512F__
    const __m512 sh = _mm512_set1_ps(shift);
    __m512 total = _mm512_setzero_ps();
    for (; t + 16 <= n; t += 16) {
        const __m512 p = exp512(_mm512_sub_ps(_mm512_loadu_ps(x + t), sh));
        _mm512_storeu_ps(x + t, p);
        total = _mm512_add_ps(total, p);
    }
    sum = _mm512_reduce_add_ps(total);
#elif TAXIWAY_AVX2
    const __m256 sh = _mm256_set1_ps(shift);
    __m256 total = _mm256_setzero_ps();
    for (; t + 8 <= n; t += 8) {
        const __m256 p = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + t), sh));
        _mm256_storeu_ps(x + t, p);
        total = _mm256_add_ps(total, p);
    }
    sum = hsum256(total);
#endif
    for (; t < n; t++) {
        x[t] = expf(x[t] - shift);
        sum += x[t];
    }
    return sum;
}

#endif
