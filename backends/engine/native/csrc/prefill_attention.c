/* Prefill attention straight over the paged KV cache: sequences whose step computes several new
 * tokens (a prompt, or a chunk of one after a cached prefix) attend causally to their context.
 *
 * Built and called like decode_attention.c. The new tokens' K/V are already in the cache, so a
 * chunk after a cached prefix and a whole prompt are the same case: query i of a sequence sits at
 * position seq_len - q_len + i and attends to keys 0..that position.
 *
 * Numerics follow torch's CPU flash attention for bfloat16: q.k in float32 from the bfloat16
 * inputs (VDPBF16PS: exact products, float32 sums), scaled, softmax in float32, the
 * probabilities rounded to bfloat16 for the weighted sum of values (float32 sums), divided by
 * the float32 sum of the unrounded exponentials, rounded once to bfloat16. Every sum runs over
 * key positions in a fixed order (tiles of 16 keys, pairs of keys) whatever the batch, the chunk
 * or the work split, so a row's result does not depend on what else the step computes — for
 * finite keys and values: the rows of a register block sum values up to the block's last row's
 * limit with probability 0 past their own, and 0 x inf is NaN, so a non-finite value poisons the
 * few rows before it in its block (torch's SDPA poisons every row of the prompt).
 *
 * Layouts (bfloat16 stored as uint16):
 *   q         [T, H, D] rows of the step, row stride q_stride (elements), heads contiguous
 *   k_cache   [num_blocks, block_size, KV, D]  (v_cache alike)
 *   q_starts, q_lens, seq_lens  int32 [S]: sequence s's queries are rows q_starts[s] ..
 *             q_starts[s] + q_lens[s] - 1, its context after the step seq_lens[s] keys
 *   tables    int32 [S, table_stride]; every block id read must lie in [0, num_blocks)
 *   out       [T, H, D] rows, row stride out_stride; only the sequences' rows are written
 *
 * Work: first each (sequence, KV head)'s keys and values are packed once into the tile layouts
 * the dot-product instruction wants (below), then work items of (sequence, KV head, 16 query
 * positions) each compute their scores, softmax and weighted values. Returns 0, or -1 for a
 * shape the kernel does not support or a bad block id (nothing written) or no memory (rows may
 * be partly written: the caller's fallback writes them all).
 */
#include "abi.h"
#include "simd.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define PREFILL_FAST 1

#define QTILE 16      /* query positions per work item */
#define MAX_GROUP 16  /* query heads per KV head */
#define SCORE_ROWS 8  /* rows of scores per register block */

/* Packed keys, per tile of 16 keys: [D / 2][16] uint32, lane j of vector p holding dims 2p and
 * 2p + 1 of key j. Packed values, per tile of 16 keys: [8 pairs][D / 16][16] uint32, lane l of
 * vector c of pair i holding dim 16c + l of keys 2i and 2i + 1. Keys past the context are zero.
 * Either way a tile is 8 * D words. */
static void pack_tile(
    const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table, int len, int tile, int block_size,
    int64_t token_stride, int64_t head_offset, int head_dim, uint32_t *kp, uint32_t *vp)
{
    const int half = head_dim / 2, nd = head_dim / 16;
    const uint16_t *krows[16], *vrows[16];
    for (int j = 0; j < 16; j++) {
        const int t = tile * 16 + j;
        if (t < len) {
            const int64_t at = ((int64_t)table[t / block_size] * block_size + t % block_size) * token_stride + head_offset;
            krows[j] = k_cache + at;
            vrows[j] = v_cache + at;
        } else {
            krows[j] = vrows[j] = NULL;
        }
    }
    for (int j = 0; j < 16; j++) {
        uint32_t pairs[256];
        if (krows[j] != NULL) memcpy(pairs, krows[j], sizeof(uint16_t) * (size_t)head_dim);
        else memset(pairs, 0, sizeof(uint16_t) * (size_t)head_dim);
        for (int p = 0; p < half; p++) kp[p * 16 + j] = pairs[p];
    }
    /* element 2m of the pair vector: dim m of the first key, 2m + 1: of the second */
    __m512i lo, hi;
    {
        uint16_t l[32], h[32];
        for (int m = 0; m < 16; m++) {
            l[2 * m] = (uint16_t)m, l[2 * m + 1] = (uint16_t)(32 + m);
            h[2 * m] = (uint16_t)(16 + m), h[2 * m + 1] = (uint16_t)(48 + m);
        }
        lo = _mm512_loadu_si512(l);
        hi = _mm512_loadu_si512(h);
    }
    for (int i = 0; i < 8; i++) {
        const uint16_t *a = vrows[2 * i], *b = vrows[2 * i + 1];
        for (int c2 = 0; c2 < head_dim / 32; c2++) {
            const __m512i va = a != NULL ? _mm512_loadu_si512(a + 32 * c2) : _mm512_setzero_si512();
            const __m512i vb = b != NULL ? _mm512_loadu_si512(b + 32 * c2) : _mm512_setzero_si512();
            _mm512_storeu_si512(vp + ((size_t)i * nd + 2 * c2) * 16, _mm512_permutex2var_epi16(va, lo, vb));
            _mm512_storeu_si512(vp + ((size_t)i * nd + 2 * c2 + 1) * 16, _mm512_permutex2var_epi16(va, hi, vb));
        }
    }
}

/* scores[b][0:16 * NT] = scale * q_b . k over NT (1 or 2) packed key tiles, for SCORE_ROWS rows */
static inline __attribute__((always_inline)) void score_tiles(
    const uint16_t *const *qrows, const uint32_t *kp, int half, float scale, float *scores, size_t ld, const int NT)
{
    __m512 acc[2][SCORE_ROWS];
    for (int u = 0; u < NT; u++)
        for (int b = 0; b < SCORE_ROWS; b++) acc[u][b] = _mm512_setzero_ps();
    for (int p = 0; p < half; p++) {
        __m512bh kv[2];
        for (int u = 0; u < NT; u++) kv[u] = (__m512bh)_mm512_loadu_si512(kp + ((size_t)u * half + p) * 16);
        for (int b = 0; b < SCORE_ROWS; b++) {
            const __m512bh qb = (__m512bh)bf16_pair_bcast(qrows[b] + 2 * p);
            for (int u = 0; u < NT; u++) acc[u][b] = _mm512_dpbf16_ps(acc[u][b], kv[u], qb);
        }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int u = 0; u < NT; u++)
        for (int b = 0; b < SCORE_ROWS; b++) _mm512_storeu_ps(scores + b * ld + 16 * u, _mm512_mul_ps(acc[u][b], sc));
}

/* out_b = sum over the first npairs key pairs of probs_b . values, / sums[b], for RB rows */
static inline __attribute__((always_inline)) void weigh_values(
    const uint16_t *const *prows, const uint32_t *vp, int npairs, const float *sums, uint16_t *const *outs,
    const int RB, const int ND)
{
    __m512 acc[8][8];
    for (int b = 0; b < RB; b++)
        for (int c = 0; c < ND; c++) acc[b][c] = _mm512_setzero_ps();
    for (int i = 0; i < npairs; i++) {
        __m512bh vv[8];
        for (int c = 0; c < ND; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vp + ((size_t)i * ND + c) * 16);
        for (int b = 0; b < RB; b++) {
            const __m512bh pb = (__m512bh)bf16_pair_bcast(prows[b] + 2 * i);
            for (int c = 0; c < ND; c++) acc[b][c] = _mm512_dpbf16_ps(acc[b][c], vv[c], pb);
        }
    }
    for (int b = 0; b < RB; b++) {
        if (outs[b] == NULL) continue;
        const __m512 inv = _mm512_set1_ps(1.0f / sums[b]);
        for (int c = 0; c < ND; c++)
            _mm256_storeu_si256((__m256i *)(outs[b] + 16 * c), f32x16_to_bf16(_mm512_mul_ps(acc[b][c], inv)));
    }
}

/* One work item: query positions pos0 .. pos0 + qn - 1 (rows q_row0 ..) of KV head kvh, all its
 * query heads. kp / vp: this (sequence, KV head)'s packed tiles. Scratch from the caller. */
static void attend_item(
    const uint16_t *q, int64_t q_stride, int q_row0, int qn, int pos0, int kvh, int group, int head_dim,
    const uint32_t *kp, const uint32_t *vp, float scale, uint16_t *out, int64_t out_stride,
    float *scores, uint16_t *probs, float *sums, const uint16_t *zeros)
{
    const int rows = qn * group, half = head_dim / 2, nd = head_dim / 16;
    const int ntiles = (pos0 + qn + 15) / 16;
    const size_t ld = (size_t)ntiles * 16;
    /* row r: query position pos0 + r / group, head kvh * group + r % group */
#define QROW(r) (q + (int64_t)(q_row0 + (r) / group) * q_stride + (int64_t)(kvh * group + (r) % group) * head_dim)

    /* scores, a block of rows at a time, up to the block's last row's causal limit */
    for (int r0 = 0; r0 < rows; r0 += SCORE_ROWS) {
        const uint16_t *qrows[SCORE_ROWS];
        for (int b = 0; b < SCORE_ROWS; b++) qrows[b] = r0 + b < rows ? QROW(r0 + b) : zeros;
        const int last = (r0 + SCORE_ROWS < rows ? r0 + SCORE_ROWS : rows) - 1;
        const int nt = (pos0 + last / group + 1 + 15) / 16;
        float *s = scores + (size_t)r0 * ld;
        int t = 0;
        for (; t + 2 <= nt; t += 2) score_tiles(qrows, kp + (size_t)t * 8 * head_dim, half, scale, s + 16 * t, ld, 2);
        if (t < nt) score_tiles(qrows, kp + (size_t)t * 8 * head_dim, half, scale, s + 16 * t, ld, 1);
    }

    /* softmax over each row's keys 0 .. its position; probabilities past it are zero */
    for (int r = 0; r < rows; r++) {
        const int n = pos0 + r / group + 1;
        float *s = scores + (size_t)r * ld;
        uint16_t *p = probs + (size_t)r * ld;
        __m512 mv = _mm512_set1_ps(-INFINITY);
        int t = 0;
        for (; t + 16 <= n; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + t));
        float m = _mm512_reduce_max_ps(mv);
        for (; t < n; t++) m = s[t] > m ? s[t] : m;
        const __m512 sh = _mm512_set1_ps(m);
        __m512 total = _mm512_setzero_ps();
        for (t = 0; t < (int)ld; t += 16) {
            const int live = n - t >= 16 ? 16 : (n - t > 0 ? n - t : 0);
            const __mmask16 mask = (__mmask16)((1u << live) - 1u);
            const __m512 e = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), sh)));
            total = _mm512_add_ps(total, e);
            _mm256_storeu_si256((__m256i *)(p + t), f32x16_to_bf16(e));
        }
        sums[r] = _mm512_reduce_add_ps(total);
    }

    /* weighted values, RB rows at a time (RB * ND = 16 accumulators) */
    const int rb = 16 / nd;
    for (int r0 = 0; r0 < rows; r0 += rb) {
        const uint16_t *prows[8];
        uint16_t *outs[8];
        float bsums[8];
        for (int b = 0; b < rb; b++) {
            const int r = r0 + b;
            prows[b] = probs + (size_t)(r < rows ? r : 0) * ld; /* a padding row's result is dropped */
            outs[b] = r < rows ? out + (int64_t)(q_row0 + r / group) * out_stride + (int64_t)(kvh * group + r % group) * head_dim : NULL;
            bsums[b] = r < rows ? sums[r] : 1.0f;
        }
        const int last = (r0 + rb < rows ? r0 + rb : rows) - 1;
        const int npairs = (pos0 + last / group + 1 + 1) / 2;
        switch (nd) {
        case 2: weigh_values(prows, vp, npairs, bsums, outs, 8, 2); break;
        case 4: weigh_values(prows, vp, npairs, bsums, outs, 4, 4); break;
        default: weigh_values(prows, vp, npairs, bsums, outs, 2, 8); break;
        }
    }
#undef QROW
}
#else
#define PREFILL_FAST 0
#endif

int prefill_attention_supported(void) { return PREFILL_FAST; }

static int prefill_attention(
    const uint16_t *q, int64_t q_stride, const uint16_t *k_cache, const uint16_t *v_cache,
    const int32_t *tables, int64_t table_stride, const int32_t *q_starts, const int32_t *q_lens, const int32_t *seq_lens,
    int32_t num_blocks, int32_t num_seqs, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim, int32_t block_size,
    float scale, uint16_t *out, int64_t out_stride, int32_t num_threads)
{
#if PREFILL_FAST
    if (num_seqs <= 0 || num_heads <= 0 || num_kv_heads <= 0 || block_size <= 0 || num_threads <= 0) return -1;
    if (head_dim != 32 && head_dim != 64 && head_dim != 128) return -1;
    const int group = num_heads / num_kv_heads;
    if (group > MAX_GROUP || group * num_kv_heads != num_heads) return -1;
    int64_t *tile_off = malloc(sizeof(int64_t) * 2 * ((size_t)num_seqs + 1));
    if (tile_off == NULL) return -1;
    int64_t *item_off = tile_off + num_seqs + 1;
    tile_off[0] = item_off[0] = 0;
    int max_tiles = 0;
    for (int s = 0; s < num_seqs; s++) {
        const int len = seq_lens[s], qn = q_lens[s];
        if (qn <= 0 || len < qn) goto refuse;
        for (int b = 0; b < (len + block_size - 1) / block_size; b++) {
            const int32_t id = tables[(int64_t)s * table_stride + b];
            if (id < 0 || id >= num_blocks) goto refuse;
        }
        const int ntiles = (len + 15) / 16;
        max_tiles = ntiles > max_tiles ? ntiles : max_tiles;
        tile_off[s + 1] = tile_off[s] + (int64_t)ntiles * num_kv_heads;
        item_off[s + 1] = item_off[s] + (int64_t)((qn + QTILE - 1) / QTILE) * num_kv_heads;
    }
    const size_t tile_words = (size_t)8 * head_dim;
    uint32_t *packed = malloc(sizeof(uint32_t) * 2 * tile_words * (size_t)tile_off[num_seqs]);
    if (packed == NULL) goto refuse;
    uint32_t *kpacked = packed, *vpacked = packed + tile_words * (size_t)tile_off[num_seqs];
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const size_t rows_cap = (size_t)QTILE * group + SCORE_ROWS, ld_cap = (size_t)max_tiles * 16;
    int failed = 0;

#pragma omp parallel num_threads(num_threads) reduction(| : failed)
    {
        /* pack: (sequence, KV head, tile) in one flat range */
#pragma omp for schedule(static)
        for (int64_t g = 0; g < tile_off[num_seqs]; g++) {
            int s = 0;
            while (tile_off[s + 1] <= g) s++;
            const int ntiles = (seq_lens[s] + 15) / 16;
            const int64_t local = g - tile_off[s];
            const int kvh = (int)(local / ntiles), tile = (int)(local % ntiles);
            pack_tile(k_cache, v_cache, tables + (int64_t)s * table_stride, seq_lens[s], tile, block_size, token_stride,
                      (int64_t)kvh * head_dim, head_dim, kpacked + (size_t)g * tile_words, vpacked + (size_t)g * tile_words);
        }
        float *scores = malloc(sizeof(float) * (rows_cap * ld_cap + rows_cap) + sizeof(uint16_t) * (rows_cap * ld_cap + 256));
        float *sums = NULL;
        uint16_t *probs = NULL, *zeros = NULL;
        if (scores == NULL) {
            failed = 1;
        } else {
            sums = scores + rows_cap * ld_cap;
            probs = (uint16_t *)(sums + rows_cap), zeros = probs + rows_cap * ld_cap;
            memset(zeros, 0, sizeof(uint16_t) * 256);
        }
        /* attend: (sequence, KV head, 16 query positions), heaviest (latest positions) first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = item_off[num_seqs] - 1; w >= 0; w--) {
            if (scores == NULL) continue;
            int s = 0;
            while (item_off[s + 1] <= w) s++;
            const int nq = (q_lens[s] + QTILE - 1) / QTILE;
            const int64_t local = w - item_off[s];
            const int kvh = (int)(local / nq), qt = (int)(local % nq);
            const int ntiles = (seq_lens[s] + 15) / 16;
            const size_t at = (size_t)(tile_off[s] + (int64_t)kvh * ntiles) * tile_words;
            const int q0 = qt * QTILE, qn = q_lens[s] - q0 < QTILE ? q_lens[s] - q0 : QTILE;
            attend_item(q, q_stride, q_starts[s] + q0, qn, seq_lens[s] - q_lens[s] + q0, kvh, group, head_dim,
                        kpacked + at, vpacked + at, scale, out, out_stride, scores, probs, sums, zeros);
        }
        free(scores);
    }
    free(packed);
    free(tile_off);
    return failed ? -1 : 0;
refuse:
    free(tile_off);
    return -1;
#else
    (void)q, (void)q_stride, (void)k_cache, (void)v_cache, (void)tables, (void)table_stride, (void)q_starts;
    (void)q_lens, (void)seq_lens, (void)num_blocks, (void)num_seqs, (void)num_heads, (void)num_kv_heads;
    (void)head_dim, (void)block_size, (void)scale, (void)out, (void)out_stride, (void)num_threads;
    return -1;
#endif
}

int prefill_attention_bf16(const PagedAttentionArgs *a) {
    if (a == NULL) return -1;
    return prefill_attention(a->q, a->q_stride, a->k_cache, a->v_cache, a->tables, a->table_stride, a->q_starts,
                             a->q_lens, a->seq_lens, a->num_blocks, a->num_seqs, a->num_heads, a->num_kv_heads,
                             a->head_dim, a->block_size, a->scale, a->out, a->out_stride, a->num_threads);
}
