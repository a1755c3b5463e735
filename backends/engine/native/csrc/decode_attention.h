/* decode_attention.c's work items, shared with the variant that lives in its own file. */
#ifndef TAXIWAY_DECODE_ATTENTION_H
#define TAXIWAY_DECODE_ATTENTION_H

#include <stdint.h>

/* 1 when every block of a sequence of len (>= 1) keys lies in [0, num_blocks), else 0 */
static inline int table_ok(const int32_t *table, int len, int block_size, int32_t num_blocks) {
    if (len <= 0) return 0;
    for (int b = 0; b < (len + block_size - 1) / block_size; b++)
        if (table[b] < 0 || table[b] >= num_blocks) return 0;
    return 1;
}

/* at[t] = where key t's row of the item's heads starts (offset `first` into its token), walked
 * block by block (a division per key cost as much as its arithmetic); t from len to padded
 * repeats the last key, for lanes the kernels discard */
static inline void key_offsets(int64_t *at, const int32_t *table, int len, int padded, int block_size,
                               int64_t token_stride, int64_t first) {
    for (int b = 0, t = 0; t < len; b++)
        for (int o = 0; o < block_size && t < len; o++, t++) at[t] = ((int64_t)table[b] * block_size + o) * token_stride + first;
    for (int t = len; t < padded; t++) at[t] = at[len - 1];
}

/* One work item of decode attention on the AVX2 + FMA build (decode_attention_avx2.c): sequence
 * s's query heads of KV heads [h0, h1), head_dim a multiple of 16 up to 256. The contract and the
 * results (to float32 rounding) are decode_attention.c's attend(). Returns 0, or -1 (nothing
 * written) for an empty sequence, a block id outside the cache, or no memory; -2 when the build
 * is not AVX2. */
int attend_avx2(
    const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table, int len,
    int32_t num_blocks, int h0, int h1, int group, int head_dim, int block_size, int64_t token_stride,
    float scale, uint16_t *out);

#endif
