/* Decode attention's work item on the AVX2 + FMA build (decode_attention.h's attend_avx2): what
 * the AVX-512 BF16 build's attend_fast does, eight float32 lanes at a time.
 *
 * Widening: a 32-byte load of 16 bfloat16 holds element 2j in the low half of 32-bit lane j and
 * 2j + 1 in the high half, so the load shifted left by 16 is the even elements as float32 and the
 * load masked is the odd ones: two ALU instructions per 16 values (VPMOVZXWD and a shift per 8
 * cost four). q is widened once into the same even/odd order, the value accumulators keep it, and
 * the output is interleaved back when it is written. Every product is exact (bfloat16 values in
 * float32) and every sum float32, in a fixed order whatever the batch: per key the head_dim
 * products in lanes, the lanes by reduce8's tree; the weighted values key by key.
 *
 * Keys (then values) are read a tile at a time for all the item's heads, front to back, with the
 * tiles a few ahead prefetched, as attend_fast reads them (the cache of all layers is far larger
 * than the CPU's caches). SmolLM2's shapes (9 heads, 3 KV heads, head_dim 64), one sequence of 576
 * keys, 30 layers' distinct caches, one thread: attend() 2.8 ms, attend_fast (AVX-512 BF16) 1.3 ms.
 */
#include "decode_attention.h"
#include "simd.h"

#if TAXIWAY_AVX2

#define KEY_TILE 8       /* keys scored together: one vector of scores per query head */
#define VALUE_TILE 16    /* keys weighted per pass over the accumulators */
#define PREFETCH_TILES 4 /* tiles of 16 rows asked for ahead of the one in use */
#define SCORE_HEADS 8    /* query heads scored per pass over a key */
#define VALUE_HEADS 4    /* query heads weighted per pass over a value chunk */

static inline __m256 even_f32(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline __m256 odd_f32(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}

/* lane j: the sum of v[j]'s eight lanes, by a fixed tree of pairwise sums */
static inline __m256 reduce8(const __m256 *v) {
    const __m256 ab = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const __m256 cd = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    /* ab: lanes 0-3 the low halves' sums of v[0..3], lanes 4-7 their high halves'; cd for v[4..7] */
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, cd, 0x20), _mm256_permute2f128_ps(ab, cd, 0x31));
}

/* Ask for rows t0 .. t0 + 15 of the item's heads (bytes from each row's start) */
static inline void prefetch_rows(const uint16_t *cache, const int64_t *at, int t0, int len, int64_t bytes) {
    for (int j = 0; j < 16 && t0 + j < len; j++)
        for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch((const char *)(cache + at[t0 + j]) + off, _MM_HINT_T1);
}

/* part[b][j]: the eight lane sums of q_b . k_j for the NB query heads qf[0..NB) (rows of
 * head_dim, even/odd order) and the KEY_TILE keys at key + at[j] */
static inline __attribute__((always_inline)) void score_keys(
    const float *qf, const uint16_t *key, const int64_t *at, int head_dim, __m256 part[][KEY_TILE], const int NB)
{
    for (int j = 0; j < KEY_TILE; j++) {
        const uint16_t *row = key + at[j];
        __m256 acc[SCORE_HEADS];
        for (int b = 0; b < NB; b++) acc[b] = _mm256_setzero_ps();
        for (int c = 0; c < head_dim; c += 16) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(row + c));
            const __m256 e = even_f32(raw), o = odd_f32(raw);
            for (int b = 0; b < NB; b++) {
                acc[b] = _mm256_fmadd_ps(e, _mm256_loadu_ps(qf + (size_t)b * head_dim + c), acc[b]);
                acc[b] = _mm256_fmadd_ps(o, _mm256_loadu_ps(qf + (size_t)b * head_dim + c + 8), acc[b]);
            }
        }
        for (int b = 0; b < NB; b++) part[b][j] = acc[b];
    }
}

static void score_keys_any(const float *qf, const uint16_t *key, const int64_t *at, int head_dim, __m256 part[][KEY_TILE], int nb) {
    switch (nb) {
    case 1: score_keys(qf, key, at, head_dim, part, 1); break;
    case 2: score_keys(qf, key, at, head_dim, part, 2); break;
    case 3: score_keys(qf, key, at, head_dim, part, 3); break;
    case 4: score_keys(qf, key, at, head_dim, part, 4); break;
    case 5: score_keys(qf, key, at, head_dim, part, 5); break;
    case 6: score_keys(qf, key, at, head_dim, part, 6); break;
    case 7: score_keys(qf, key, at, head_dim, part, 7); break;
    default: score_keys(qf, key, at, head_dim, part, 8); break;
    }
}

/* acc_b += sum_t p_b[t] * v_t for the NB query heads (acc rows of head_dim, even/odd order,
 * p rows p_ld apart) over the n values at value + at[t], 16 dimensions at a time */
static inline __attribute__((always_inline)) void weigh_values(
    const float *p, size_t p_ld, const uint16_t *value, const int64_t *at, int n, float *acc, int head_dim, const int NB)
{
    for (int c = 0; c < head_dim; c += 16) {
        __m256 even[VALUE_HEADS], odd[VALUE_HEADS];
        for (int b = 0; b < NB; b++) {
            even[b] = _mm256_loadu_ps(acc + (size_t)b * head_dim + c);
            odd[b] = _mm256_loadu_ps(acc + (size_t)b * head_dim + c + 8);
        }
        for (int t = 0; t < n; t++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(value + at[t] + c));
            const __m256 e = even_f32(raw), o = odd_f32(raw);
            for (int b = 0; b < NB; b++) {
                const __m256 pt = _mm256_broadcast_ss(p + (size_t)b * p_ld + t);
                even[b] = _mm256_fmadd_ps(pt, e, even[b]);
                odd[b] = _mm256_fmadd_ps(pt, o, odd[b]);
            }
        }
        for (int b = 0; b < NB; b++) {
            _mm256_storeu_ps(acc + (size_t)b * head_dim + c, even[b]);
            _mm256_storeu_ps(acc + (size_t)b * head_dim + c + 8, odd[b]);
        }
    }
}

static void weigh_values_any(const float *p, size_t p_ld, const uint16_t *value, const int64_t *at, int n, float *acc, int head_dim, int nb) {
    switch (nb) {
    case 1: weigh_values(p, p_ld, value, at, n, acc, head_dim, 1); break;
    case 2: weigh_values(p, p_ld, value, at, n, acc, head_dim, 2); break;
    case 3: weigh_values(p, p_ld, value, at, n, acc, head_dim, 3); break;
    default: weigh_values(p, p_ld, value, at, n, acc, head_dim, 4); break;
    }
}

int attend_avx2(
    const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table, int len,
    int32_t num_blocks, int h0, int h1, int group, int head_dim, int block_size, int64_t token_stride,
    float scale, uint16_t *out)
{
    if (!table_ok(table, len, block_size, num_blocks)) return -1;
    const int padded = (len + 15) & ~15, nq = (h1 - h0) * group, width = (h1 - h0) * head_dim;
    /* scores [nq][padded], acc and qf [nq][head_dim], at [padded], maxs and sums [nq] */
    float *scratch = malloc(sizeof(float) * ((size_t)nq * padded + 2 * (size_t)nq * head_dim + 2 * (size_t)nq)
                            + sizeof(int64_t) * (size_t)padded);
    if (scratch == NULL) return -1;
    float *scores = scratch, *acc = scores + (size_t)nq * padded, *qf = acc + (size_t)nq * head_dim;
    float *maxs = qf + (size_t)nq * head_dim, *sums = maxs + nq;
    int64_t *at = (int64_t *)(sums + nq);
    key_offsets(at, table, len, padded, block_size, token_stride, (int64_t)h0 * head_dim);
    const int64_t row_bytes = (int64_t)width * 2;

    /* q as float32 in even/odd order */
    for (int i = 0; i < nq; i++) {
        const uint16_t *qi = q + (int64_t)(h0 * group + i) * head_dim;
        for (int c = 0; c < head_dim; c += 16) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(qi + c));
            _mm256_storeu_ps(qf + (size_t)i * head_dim + c, even_f32(raw));
            _mm256_storeu_ps(qf + (size_t)i * head_dim + c + 8, odd_f32(raw));
        }
        maxs[i] = -INFINITY;
    }

    /* scores[i][t] = scale * q_i . k_t */
    const __m256 sc = _mm256_set1_ps(scale);
    for (int t = 0; t < PREFETCH_TILES; t++) prefetch_rows(k_cache, at, 16 * t, len, row_bytes);
    for (int t0 = 0; t0 < len; t0 += KEY_TILE) {
        if (t0 % 16 == 0) prefetch_rows(k_cache, at, t0 + 16 * PREFETCH_TILES, len, row_bytes);
        const int live = len - t0 < KEY_TILE ? len - t0 : KEY_TILE;
        for (int hk = 0; hk < h1 - h0; hk++) {
            for (int i0 = hk * group; i0 < (hk + 1) * group; i0 += SCORE_HEADS) {
                const int nb = (hk + 1) * group - i0 < SCORE_HEADS ? (hk + 1) * group - i0 : SCORE_HEADS;
                __m256 part[SCORE_HEADS][KEY_TILE];
                score_keys_any(qf + (size_t)i0 * head_dim, k_cache + (int64_t)hk * head_dim, at + t0, head_dim, part, nb);
                for (int b = 0; b < nb; b++) {
                    float *s = scores + (size_t)(i0 + b) * padded + t0;
                    _mm256_storeu_ps(s, _mm256_mul_ps(reduce8(part[b]), sc));
                    /* a NaN score never wins the max; exp_shifted carries it to the output */
                    for (int j = 0; j < live; j++)
                        if (s[j] > maxs[i0 + b]) maxs[i0 + b] = s[j];
                }
            }
        }
    }
    for (int i = 0; i < nq; i++) sums[i] = exp_shifted(scores + (size_t)i * padded, maxs[i], len);

    /* weighted values a tile at a time */
    memset(acc, 0, sizeof(float) * (size_t)nq * head_dim);
    for (int t = 0; t < PREFETCH_TILES; t++) prefetch_rows(v_cache, at, 16 * t, len, row_bytes);
    for (int t0 = 0; t0 < len; t0 += VALUE_TILE) {
        prefetch_rows(v_cache, at, t0 + 16 * PREFETCH_TILES, len, row_bytes);
        const int n = len - t0 < VALUE_TILE ? len - t0 : VALUE_TILE;
        for (int hk = 0; hk < h1 - h0; hk++)
            for (int i0 = hk * group; i0 < (hk + 1) * group; i0 += VALUE_HEADS) {
                const int nb = (hk + 1) * group - i0 < VALUE_HEADS ? (hk + 1) * group - i0 : VALUE_HEADS;
                weigh_values_any(scores + (size_t)i0 * padded + t0, (size_t)padded, v_cache + (int64_t)hk * head_dim,
                                 at + t0, n, acc + (size_t)i0 * head_dim, head_dim, nb);
            }
    }

    /* out = acc / sum, interleaved back from even/odd order, rounded once to bfloat16 */
    for (int i = 0; i < nq; i++) {
        const __m256 inv = _mm256_set1_ps(1.0f / sums[i]);
        uint16_t *oh = out + (int64_t)(h0 * group + i) * head_dim;
        for (int c = 0; c < head_dim; c += 16) {
            const __m256 e = _mm256_mul_ps(_mm256_loadu_ps(acc + (size_t)i * head_dim + c), inv);
            const __m256 o = _mm256_mul_ps(_mm256_loadu_ps(acc + (size_t)i * head_dim + c + 8), inv);
            const __m256 lo = _mm256_unpacklo_ps(e, o), hi = _mm256_unpackhi_ps(e, o); /* per 128-bit half */
            _mm_storeu_si128((__m128i *)(oh + c), f32x8_to_bf16(_mm256_permute2f128_ps(lo, hi, 0x20)));
            _mm_storeu_si128((__m128i *)(oh + c + 8), f32x8_to_bf16(_mm256_permute2f128_ps(lo, hi, 0x31)));
        }
    }
    free(scratch);
    return 0;
}

#else

int attend_avx2(
    const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table, int len,
    int32_t num_blocks, int h0, int h1, int group, int head_dim, int block_size, int64_t token_stride,
    float scale, uint16_t *out)
{
    (void)q; (void)k_cache; (void)v_cache; (void)table; (void)len; (void)num_blocks; (void)h0; (void)h1;
    (void)group; (void)head_dim; (void)block_size; (void)token_stride; (void)scale; (void)out;
    return -2;
}

#endif
