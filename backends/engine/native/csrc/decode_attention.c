/* Decode attention straight over the paged KV cache: one new query token per sequence.
 *
 * Built on first use by backends/engine/native/ckernels.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes with raw tensor pointers. Every dot product, the softmax and the weighted sum
 * of values run in float32 on bfloat16 inputs; the output is rounded once to bfloat16, as
 * torch's SDPA does. Keys are read in place through the block table: no gathered copy.
 *
 * Layouts (bfloat16 stored as uint16):
 *   q        [S, H, D], row stride q_stride (elements) between sequences
 *   k_cache  [num_blocks, block_size, KV, D]  (v_cache alike)
 *   tables   int32 [S, table_stride], seq_lens int32 [S] (keys per sequence, >= 1); every block
 *            id a sequence reads must lie in [0, num_blocks), or the call fails (-1) unread
 *   out      [S, H, D], row stride out_stride
 * Query head h attends with KV head h / (H / KV). Work items are (sequence, KV head) pairs.
 * The AVX-512 BF16 build runs attend_fast for head_dim 32, 64 and 128, the AVX2 + FMA build
 * attend_avx2 (decode_attention_avx2.c) for head_dim a multiple of 16; other shapes and builds run
 * attend() with 16-lane (AVX-512 F) or 8-lane (AVX2 + FMA) float32 helpers, or scalar code.
 */
#include "abi.h"
#include "decode_attention.h"
#include "simd.h"

#define MAX_HEAD_DIM 256
#define MAX_GROUP 16

static inline float dot(const float *a, const float *b, int n) {
    int d = 0;
    float sum = 0.0f;
#ifdef __AVX512F__
    __m512 acc = _mm512_setzero_ps();
    for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    sum = _mm512_reduce_add_ps(acc);
#elif TAXIWAY_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; d + 16 <= n; d += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), acc1);
    }
    for (; d + 8 <= n; d += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc0);
    sum = hsum256(_mm256_add_ps(acc0, acc1));
#endif
    for (; d < n; d++) sum += a[d] * b[d];
    return sum;
}

/* acc[0:n] += p * x[0:n] */
static inline void axpy(float *acc, float p, const float *x, int n) {
    int d = 0;
#ifdef __AVX512F__
    __m512 pv = _mm512_set1_ps(p);
    for (; d + 16 <= n; d += 16)
        _mm512_storeu_ps(acc + d, _mm512_fmadd_ps(pv, _mm512_loadu_ps(x + d), _mm512_loadu_ps(acc + d)));
#elif TAXIWAY_AVX2
    __m256 pv = _mm256_set1_ps(p);
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + d), _mm256_loadu_ps(acc + d)));
#endif
    for (; d < n; d++) acc[d] += p * x[d];
}

/* One work item: sequence s, KV heads [h0, h1). Returns 0, or -1 (nothing written) for an empty
 * sequence, a block id outside the cache, or no memory. */
static int attend(
    const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table, int len,
    int32_t num_blocks, int h0, int h1, int group, int head_dim, int block_size, int64_t token_stride,
    float scale, uint16_t *out)
{
    const int nq = (h1 - h0) * group, width = (h1 - h0) * head_dim;
    if (!table_ok(table, len, block_size, num_blocks)) return -1;
    const int nblocks = (len + block_size - 1) / block_size;
    /* qf, acc: [nq][head_dim]; row: one key's (or value's) heads h0..h1; scores: [nq][len] */
    float *scratch = malloc(sizeof(float) * ((size_t)nq * (2 * (size_t)head_dim + (size_t)len + 2) + (size_t)width));
    if (scratch == NULL) return -1;
    float *qf = scratch, *acc = qf + (size_t)nq * head_dim, *row = acc + (size_t)nq * head_dim;
    float *scores = row + width, *maxs = scores + (size_t)nq * len, *sums = maxs + nq;
    for (int i = 0; i < nq; i++) {
        load_row(qf + (size_t)i * head_dim, q + (int64_t)(h0 * group + i) * head_dim, head_dim);
        for (int d = 0; d < head_dim; d++) qf[(size_t)i * head_dim + d] *= scale;
        maxs[i] = -INFINITY;
    }
    memset(acc, 0, sizeof(float) * (size_t)nq * head_dim);
    /* scores: each key row (all the item's heads, contiguous in the cache) is read once */
    for (int b = 0, t = 0; b < nblocks; b++) {
        const uint16_t *kb = k_cache + (int64_t)table[b] * block_size * token_stride + (int64_t)h0 * head_dim;
        for (int o = 0; o < block_size && t < len; o++, t++) {
            load_row(row, kb + o * token_stride, width);
            for (int i = 0; i < nq; i++) {
                const float x = dot(qf + (size_t)i * head_dim, row + (size_t)(i / group) * head_dim, head_dim);
                scores[(size_t)i * len + t] = x;
                if (x > maxs[i]) maxs[i] = x;
            }
        }
    }
    for (int i = 0; i < nq; i++) sums[i] = exp_shifted(scores + (size_t)i * len, maxs[i], len);
    /* weighted values, each value row read once */
    for (int b = 0, t = 0; b < nblocks; b++) {
        const uint16_t *vb = v_cache + (int64_t)table[b] * block_size * token_stride + (int64_t)h0 * head_dim;
        for (int o = 0; o < block_size && t < len; o++, t++) {
            load_row(row, vb + o * token_stride, width);
            for (int i = 0; i < nq; i++)
                axpy(acc + (size_t)i * head_dim, scores[(size_t)i * len + t], row + (size_t)(i / group) * head_dim, head_dim);
        }
    }
    for (int i = 0; i < nq; i++) {
        uint16_t *oh = out + (int64_t)(h0 * group + i) * head_dim;
        const float inv = 1.0f / sums[i];
        for (int d = 0; d < head_dim; d++) oh[d] = f32_to_bf16(acc[(size_t)i * head_dim + d] * inv);
    }
    free(scratch);
    return 0;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define ATTEND_FAST 1
/* Sums of the 16 lanes of each of v[0..15], as the 16 lanes of one vector (lane j: v[j]), by a
 * fixed tree of pairwise sums: every score is summed in the same order. */
static inline __m512 reduce16(__m512 *v) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int n = 16; n > 1; n /= 2)
        for (int j = 0; j < n / 2; j++)
            v[j] = _mm512_add_ps(_mm512_permutex2var_ps(v[2 * j], even, v[2 * j + 1]),
                                 _mm512_permutex2var_ps(v[2 * j], odd, v[2 * j + 1]));
    return v[0];
}

#define VALUE_TILE 16
#define PREFETCH_TILES 4 /* tiles of 16 keys read ahead of the one in use */

/* For NQ query heads sharing a KV head: acc_i[0:16 * ND] += sum_t p_i[t] * v[t] over one tile
 * of n values, each value row converted from bfloat16 once in registers for the NQ heads and the
 * NQ * ND accumulators held in registers across the tile. */
static inline __attribute__((always_inline)) void weighted_sum(
    const float *p, size_t p_ld, const uint16_t *v_cache, const int64_t *at, int n, float *acc_mem, int head_dim,
    const int ND, const int NQ)
{
    __m512 acc[16];
    for (int b = 0; b < NQ; b++)
        for (int c = 0; c < ND; c++) acc[b * ND + c] = _mm512_loadu_ps(acc_mem + (size_t)b * head_dim + 16 * c);
    for (int t = 0; t < n; t++) {
        __m512 v[8];
        for (int c = 0; c < ND; c++) v[c] = bf16x16_to_f32(v_cache + at[t] + 16 * c);
        for (int b = 0; b < NQ; b++) {
            const __m512 pt = _mm512_set1_ps(p[(size_t)b * p_ld + t]);
            for (int c = 0; c < ND; c++) acc[b * ND + c] = _mm512_fmadd_ps(pt, v[c], acc[b * ND + c]);
        }
    }
    for (int b = 0; b < NQ; b++)
        for (int c = 0; c < ND; c++) _mm512_storeu_ps(acc_mem + (size_t)b * head_dim + 16 * c, acc[b * ND + c]);
}

/* weighted_sum for nq (<= 16 / ND) heads, ND = head_dim / 16 in {2, 4, 8}, as constants */
static void weighted_sum_any(
    const float *p, size_t p_ld, const uint16_t *v_cache, const int64_t *at, int n, float *acc_mem, int head_dim, int nq)
{
#define WS(ND, NQ) weighted_sum(p, p_ld, v_cache, at, n, acc_mem, head_dim, ND, NQ)
    switch (head_dim / 16 * 100 + nq) {
    case 201: WS(2, 1); break; case 202: WS(2, 2); break; case 203: WS(2, 3); break; case 204: WS(2, 4); break;
    case 205: WS(2, 5); break; case 206: WS(2, 6); break; case 207: WS(2, 7); break; case 208: WS(2, 8); break;
    case 401: WS(4, 1); break; case 402: WS(4, 2); break; case 403: WS(4, 3); break; case 404: WS(4, 4); break;
    case 801: WS(8, 1); break; default: WS(8, 2); break;
    }
#undef WS
}

/* Ask for the rows of keys t0 .. t0 + 15 (the item's heads: bytes from each row start) */
static inline void prefetch_tile(const uint16_t *cache, const int64_t *at, int t0, int len, int64_t bytes) {
    for (int j = 0; j < 16 && t0 + j < len; j++)
        for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch((const char *)(cache + at[t0 + j]) + off, _MM_HINT_T1);
}

/* The fast work item for head_dim 32, 64 or 128 (AVX-512 BF16): scores 16 keys at a time with
 * VDPBF16PS on the bfloat16 q and K as stored (exact products, float32 sums), each key's lanes
 * summed by reduce16; each value row converted to float32 in registers once for the query heads
 * of its KV head and summed into accumulators held across a tile. Keys (then values) are read a
 * tile of 16 rows at a time for all the item's heads, front to back, with the tiles a few ahead
 * prefetched into L2: the cache of all layers is far larger than the CPU's caches, so every key
 * comes from memory, and a steady stream of requests keeps the memory busy. SmolLM2 shapes, 16
 * sequences of 400 keys, 2 threads, us per layer over 30 layers' distinct caches (one cache, hot):
 * 592 (381) reading per head; 507 (~240) with all the item's rows prefetched up front; 300-340
 * (~183) now. Same contract and results (to float32 rounding) as attend(). */
static int attend_fast(
    const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table, int len,
    int32_t num_blocks, int h0, int h1, int group, int head_dim, int block_size, int64_t token_stride,
    float scale, uint16_t *out)
{
    if (!table_ok(table, len, block_size, num_blocks)) return -1;
    const int padded = (len + 15) & ~15, npairs = head_dim / 32, nq = (h1 - h0) * group, width = (h1 - h0) * head_dim;
    float *scratch = malloc(sizeof(float) * ((size_t)nq * padded + (size_t)nq * head_dim)
                            + sizeof(int64_t) * (size_t)padded + sizeof(float) * 2 * (size_t)nq);
    if (scratch == NULL) return -1;
    float *scores = scratch, *acc = scores + (size_t)nq * padded;
    int64_t *at = (int64_t *)(acc + (size_t)nq * head_dim);
    key_offsets(at, table, len, padded, block_size, token_stride, (int64_t)h0 * head_dim);
    float *maxs = (float *)(at + padded), *sums = maxs + nq;
    const int64_t row_bytes = (int64_t)width * 2;

    /* scores[i][t] = scale * q_i . k_t, i over the item's query heads */
    for (int i = 0; i < nq; i++) maxs[i] = -INFINITY;
    const __m512 sc = _mm512_set1_ps(scale);
    for (int t = 0; t < PREFETCH_TILES; t++) prefetch_tile(k_cache, at, 16 * t, len, row_bytes);
    for (int t0 = 0; t0 < len; t0 += 16) {
        prefetch_tile(k_cache, at, t0 + 16 * PREFETCH_TILES, len, row_bytes);
        const int live = len - t0 < 16 ? len - t0 : 16;
        const __mmask16 mask = (__mmask16)((1u << live) - 1u);
        for (int i = 0; i < nq; i++) {
            const int hk = i / group; /* relative to h0 */
            __m512bh qv[4];
            for (int c = 0; c < npairs; c++)
                qv[c] = (__m512bh)_mm512_loadu_si512(q + (int64_t)(h0 * group + i) * head_dim + 32 * c);
            __m512 v[16];
            for (int j = 0; j < 16; j++) {
                const uint16_t *key = k_cache + at[t0 + j] + (int64_t)hk * head_dim;
                v[j] = _mm512_setzero_ps();
                for (int c = 0; c < npairs; c++) v[j] = _mm512_dpbf16_ps(v[j], qv[c], (__m512bh)_mm512_loadu_si512(key + 32 * c));
            }
            const __m512 s = _mm512_mul_ps(reduce16(v), sc);
            _mm512_mask_storeu_ps(scores + (size_t)i * padded + t0, mask, s);
            const float m = _mm512_mask_reduce_max_ps(mask, s);
            /* a NaN score never wins the max; exp_shifted carries it to the output */
            if (m > maxs[i]) maxs[i] = m;
        }
    }
    for (int i = 0; i < nq; i++) sums[i] = exp_shifted(scores + (size_t)i * padded, maxs[i], len);

    /* weighted values a tile at a time, each head's query heads in register blocks */
    memset(acc, 0, sizeof(float) * (size_t)nq * head_dim);
    const int block = 16 / (head_dim / 16); /* query heads per register block */
    for (int t = 0; t < PREFETCH_TILES; t++) prefetch_tile(v_cache, at, 16 * t, len, row_bytes);
    for (int t0 = 0; t0 < len; t0 += VALUE_TILE) {
        prefetch_tile(v_cache, at, t0 + 16 * PREFETCH_TILES, len, row_bytes);
        const int n = len - t0 < VALUE_TILE ? len - t0 : VALUE_TILE;
        for (int hk = 0; hk < h1 - h0; hk++) {
            const uint16_t *vh = v_cache + (int64_t)hk * head_dim;
            for (int i0 = hk * group; i0 < (hk + 1) * group; i0 += block) {
                const int nb = (hk + 1) * group - i0 < block ? (hk + 1) * group - i0 : block;
                weighted_sum_any(scores + (size_t)i0 * padded + t0, (size_t)padded, vh, at + t0, n,
                                 acc + (size_t)i0 * head_dim, head_dim, nb);
            }
        }
    }
    for (int i = 0; i < nq; i++) {
        const __m512 iv = _mm512_set1_ps(1.0f / sums[i]);
        uint16_t *oh = out + (int64_t)(h0 * group + i) * head_dim;
        for (int c = 0; c < head_dim; c += 16)
            _mm256_storeu_si256((__m256i *)(oh + c), f32x16_to_bf16(_mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)i * head_dim + c), iv)));
    }
    free(scratch);
    return 0;
}
#else
#define ATTEND_FAST 0
#endif

/* Returns 0, or -1 when a shape is outside what the kernel supports (the caller falls back).
 * Work items: whole sequences when there are enough to keep every thread busy (each key row of
 * the cache is then read once, all heads together); otherwise (sequence, KV head) pairs. */
static int decode_attention(
    const uint16_t *q, int64_t q_stride,
    const uint16_t *k_cache, const uint16_t *v_cache,
    const int32_t *tables, int64_t table_stride, const int32_t *seq_lens, int32_t num_blocks,
    int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
    float scale, uint16_t *out, int64_t out_stride, int32_t num_threads)
{
    if (num_seqs <= 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || block_size <= 0 || num_threads <= 0)
        return -1;
    const int group = num_heads / num_kv_heads;
    if (head_dim > MAX_HEAD_DIM || group > MAX_GROUP || group * num_kv_heads != num_heads) return -1;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim; /* between keys in a block */
    const int span = num_seqs >= 2 * num_threads ? num_kv_heads : 1; /* KV heads per item */
    const int per_seq = num_kv_heads / span;
    const int items = num_seqs * per_seq;
    int failed = 0;

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) reduction(| : failed)
    for (int item = 0; item < items; item++) {
        const int s = item / per_seq, h0 = (item % per_seq) * span;
#if ATTEND_FAST
        if (head_dim == 32 || head_dim == 64 || head_dim == 128) {
            failed |= attend_fast(q + s * q_stride, k_cache, v_cache, tables + (int64_t)s * table_stride, seq_lens[s],
                                  num_blocks, h0, h0 + span, group, head_dim, block_size, token_stride, scale,
                                  out + s * out_stride) != 0;
            continue;
        }
#elif TAXIWAY_AVX2
        if (head_dim % 16 == 0) {
            failed |= attend_avx2(q + s * q_stride, k_cache, v_cache, tables + (int64_t)s * table_stride, seq_lens[s],
                                  num_blocks, h0, h0 + span, group, head_dim, block_size, token_stride, scale,
                                  out + s * out_stride) != 0;
            continue;
        }
#endif
        failed |= attend(q + s * q_stride, k_cache, v_cache, tables + (int64_t)s * table_stride, seq_lens[s],
                         num_blocks, h0, h0 + span, group, head_dim, block_size, token_stride, scale,
                         out + s * out_stride) != 0;
    }
    return failed ? -1 : 0;
}

int decode_attention_bf16(const PagedAttentionArgs *a) {
    if (a == NULL) return -1;
    return decode_attention(a->q, a->q_stride, a->k_cache, a->v_cache, a->tables, a->table_stride, a->seq_lens,
                            a->num_blocks, a->num_seqs, a->num_heads, a->num_kv_heads, a->head_dim, a->block_size,
                            a->scale, a->out, a->out_stride, a->num_threads);
}
