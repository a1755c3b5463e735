/* decode_attention.c's work items, shared with the variant that lives in its own file. */
#ifndef TAXIWAY_DECODE_ATTENTION_H
#define TAXIWAY_DECODE_ATTENTION_H

#include <stdint.h>

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
