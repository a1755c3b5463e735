/* y = x @ W.T for groupwise int4 W and bfloat16 x, with every weight exact and float32 sums.
 *
 * Built by backends/engine/native/ckernels.py with the other kernels. W[n, k] = (q - 8) * s + z per
 * group of `group_size` along k (torch's int4 convention, q in 0..15). The weights are never
 * rounded: a nibble q becomes the bfloat16 q - 8 (a table lookup, exact), and VDPBF16PS
 * multiplies it by bfloat16 x into float32 (every product exact). Per row and group
 *     sum_k W x = s * sum_k (q - 8) x + z * sum_k x,
 * all in float32; the output is rounded once to bfloat16. (Offsetting q by a power of two through
 * the exponent bits would save the lookup, but the offset's sum cancels and leaves rounding error
 * far above float32's on small outputs.) Each output row is summed in the same
 * order whatever the batch (k ascending, one group at a time), so a row's result does not depend
 * on which other rows share the call: batched generation equals generation alone.
 *
 * Weight layout ("native", packed by model/quant/layouts.py): blocks of 16 output rows; within a block, one
 * 64-byte chunk per 8 consecutive k. In a chunk, 32-bit lane i holds row i: its 16-bit word
 * e (0, 1) carries, in nibble t (0..3, low first), q[row i][k0 + 2t + e]. Shifting the chunk by
 * 4t and masking gives 16 lanes of the pair (q[i][k0 + 2t], q[i][k0 + 2t + 1]), which VDPBF16PS
 * multiplies by the x pair (x[k0 + 2t], x[k0 + 2t + 1]) broadcast from memory.
 *
 * Scales: sz [G, N, 2] bfloat16, (s, z) per group and row, as torch's int4 kernels take them; or
 * (scales = 2) float16 s [G, N] without zeros, what GGUF's Q4_0 stores (d), kept exactly: half the
 * scale bytes (a decode step reads 9 bits per weight instead of 10); or (scales = 3) float16 d and m
 * with W = d q + m, what GGUF's Q4_1 stores, kept exactly (the sums are then of q, not q - 8), laid
 * out [G, N / 16, 2, 16]: each 16 rows' d, then their m, one 256-bit load and one conversion each
 * (as pairs split by VPMOVDW a single-row matmul ran 4 % slower than on bfloat16 pairs; so, 1-2 %,
 * and decode tok/s within noise). bfloat16 pairs round Q4_1's d and m: on SmolLM2 keeping them
 * exact lowers the native path's mean KL divergence from HF (float32) by 23-32 %, with or without
 * LoRA adapters.
 *
 * The AVX2 + FMA variant (simd.h's TAXIWAY_AVX2) reads the same layout, eight rows to a vector,
 * at three instructions per vector of weights (AVX2 has no bfloat16 dot product; unpacking each
 * nibble to its own lane is the cost): nibble j of every lane masked in place is the integer
 * q * 16^j, converted to float32 exactly, multiply-added with x[k] * 16^-j (x widened to float32
 * and scaled by that power of two once per call: exact) — the exact product q * x, float32 sums.
 * The top nibble is shifted down instead (masked, it would be the sign). The sums are of q, not
 * q - 8: per row and group s * sum q x + (z - 8 s) * sum x, with 8 s exact; q up to 15 instead
 * of 8 roughly doubles the float32 rounding of the sum, far below the bfloat16 output's.
 * (Centring cost a fourth instruction per vector: SmolLM2's gate_up, one row, one thread, weights
 * in cache, ~80 us centred, ~56-71 us now.)
 */
#include "abi.h"
#include "simd.h"
#include <omp.h>
#define INT4_FAST (TAXIWAY_AVX512_BF16 || TAXIWAY_AVX2)

/* 1 when this build has the AVX-512 BF16 or the AVX2 path; without either int4_matmul_bf16
 * refuses every call and the engine keeps torch's packed kernel. */
int int4_matmul_supported(void) { return INT4_FAST; }

#if TAXIWAY_AVX512_BF16

typedef struct {
    const uint16_t *x;
    int64_t x_stride;
    const uint8_t *w;
    const uint16_t *sz;
    const float *xsum; /* [m, G]: sum of each group of x, float32 */
    int64_t n, k, gs, groups;
    uint16_t *y;
    int64_t y_stride;
    const uint16_t *bias;  /* [n] bfloat16, or NULL */
    float *residual;       /* [m, n] float32 (row stride residual_stride), or NULL */
    int64_t residual_stride;
    int32_t scales;        /* sz: 0 bfloat16 (s, z) pairs [G, n, 2], 2 float16 s [G, n] (z = 0), 3 float16 [G, n / 16, 2, 16] (d, m) */
} Problem;

/* The output tile at (row m, column c): bfloat16 y, plus the bias (rounded again, as y + bias in
 * bfloat16), then either stored or added to the float32 residual stream. */
static inline void epilogue(const Problem *p, int64_t m, int64_t c, __m512 out) {
    /* f32x16_to_bf16, not VCVTNEPS2BF16: that one flushes subnormals to zero, torch does not */
    __m256i y = f32x16_to_bf16(out);
    if (p->bias != NULL) {
        const __m512 sum = _mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(y), 16)),
                                         bf16x16_to_f32(p->bias + c));
        y = f32x16_to_bf16(sum);
    }
    if (p->residual != NULL) {
        float *r = p->residual + m * p->residual_stride + c;
        const __m512 yf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(y), 16));
        _mm512_storeu_ps(r, _mm512_add_ps(_mm512_loadu_ps(r), yf));
    } else {
        _mm256_storeu_si256((__m256i *)(p->y + m * p->y_stride + c), y);
    }
}

/* bfloat16 q - 8 for q = 0..15 (in the low 16 of 32 table entries) */
static inline __m512i centred_table(void) {
    return _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,
        (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080, (short)0xC0A0, (short)0xC0C0, (short)0xC0E0,
        (short)0xC100);
}

/* bfloat16 q for q = 0..15 (in the low 16 of 32 table entries): float16 (d, m) scales take the
 * sums of q, W = d q + m */
static inline __m512i plain_table(void) {
    return _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
        0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
}

static inline __m512i nibble_pair(__m512i chunk, int t, __m512i table) {
    /* nibble t of every 16-bit lane, looked up as bfloat16 q - 8 */
    const __m512i v = t ? _mm512_srli_epi16(chunk, 4 * t) : chunk;
    return _mm512_permutexvar_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x000F)), table);
}

/* Rows m0..m0+MT of x against output blocks b0..b0+NB (16 rows each). MT and NB are constants at
 * every call site, so the loops unroll into registers: MT * NB accumulators and as many sums. */
static inline __attribute__((always_inline)) void tile(const Problem *p, int64_t m0, int64_t b0, const int MT, const int NB) {
    __m512 out[8][4], acc[8][4];
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NB; j++) out[i][j] = _mm512_setzero_ps();
    const int64_t chunks_per_group = p->gs / 8, block_bytes = p->k / 8 * 64;
    const __m512i table = p->scales == 3 ? plain_table() : centred_table();
    for (int64_t g = 0; g < p->groups; g++) {
        for (int i = 0; i < MT; i++)
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks_per_group; c++) {
            const int64_t kc = g * chunks_per_group + c;
            for (int j = 0; j < NB; j++) {
                const __m512i chunk = _mm512_loadu_si512(p->w + (b0 + j) * block_bytes + kc * 64);
                for (int t = 0; t < 4; t++) {
                    const __m512bh wv = (__m512bh)nibble_pair(chunk, t, table);
                    for (int i = 0; i < MT; i++) {
                        const __m512bh xv = (__m512bh)bf16_pair_bcast(p->x + (m0 + i) * p->x_stride + kc * 8 + 2 * t);
                        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, xv);
                    }
                }
            }
        }
        for (int j = 0; j < NB; j++) {
            if (p->scales == 2) { /* 16 float16 scales, no zeros */
                const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p->sz + g * p->n + (b0 + j) * 16)));
                for (int i = 0; i < MT; i++) out[i][j] = _mm512_fmadd_ps(s, acc[i][j], out[i][j]);
                continue;
            }
            const uint16_t *at = p->sz + (g * p->n + (b0 + j) * 16) * 2;
            __m512 s, z;
            if (p->scales == 3) { /* 16 float16 d then 16 m, W = d q + m: the sums are of q (plain_table) */
                s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)at));
                z = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(at + 16)));
            } else { /* 16 bfloat16 (s, z) pairs, s in the low half of each 32-bit lane */
                const __m512i pairs = _mm512_loadu_si512(at);
                s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
                z = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xFFFF0000u)));
            }
            for (int i = 0; i < MT; i++) {
                out[i][j] = _mm512_fmadd_ps(s, acc[i][j], out[i][j]);
                out[i][j] = _mm512_fmadd_ps(z, _mm512_set1_ps(p->xsum[(m0 + i) * p->groups + g]), out[i][j]);
            }
        }
    }
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NB; j++) epilogue(p, m0 + i, (b0 + j) * 16, out[i][j]);
}

/* All rows of x against the output blocks b0, b0 + 1: full tiles of 8 rows one block at a time
 * (the unpacked nibbles feed 8 rows), the rest with both blocks at once (independent
 * accumulator chains keep the multiply-add pipes busy when few rows are left). */
static void unit(const Problem *p, int64_t m, int64_t b0) {
    int64_t m0 = 0;
    for (; m0 + 8 <= m; m0 += 8) {
        tile(p, m0, b0, 8, 1);
        tile(p, m0, b0 + 1, 8, 1);
    }
    switch (m - m0) {
    case 1: tile(p, m0, b0, 1, 2); break;
    case 2: tile(p, m0, b0, 2, 2); break;
    case 3: tile(p, m0, b0, 3, 2); break;
    case 4: tile(p, m0, b0, 4, 2); break;
    case 5: tile(p, m0, b0, 5, 1); tile(p, m0, b0 + 1, 5, 1); break;
    case 6: tile(p, m0, b0, 6, 1); tile(p, m0, b0 + 1, 6, 1); break;
    case 7: tile(p, m0, b0, 7, 1); tile(p, m0, b0 + 1, 7, 1); break;
    default: break;
    }
}

/* out[0:k] = bfloat16(bfloat16(silu(gate)) * up) for gate = in[0:k], up = in[k:2k]: the two
 * roundings of F.silu(gate) * up in bfloat16. */
static void silu_mul_row(const uint16_t *in, int64_t k, uint16_t *out) {
    int64_t j = 0;
    for (; j + 16 <= k; j += 16) {
        const __m512 g = bf16x16_to_f32(in + j);
        const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        const __m512 sr = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(f32x16_to_bf16(s)), 16));
        _mm256_storeu_si256((__m256i *)(out + j), f32x16_to_bf16(_mm512_mul_ps(sr, bf16x16_to_f32(in + k + j))));
    }
    for (; j < k; j++) {
        const float g = bf16_to_f32(in[j]);
        out[j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g)))) * bf16_to_f32(in[k + j]));
    }
}

static float group_sum(const uint16_t *x, int64_t gs) {
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= gs; j += 16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)(x + j));
        acc = _mm512_add_ps(acc, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
    float sum = _mm512_reduce_add_ps(acc);
    for (; j < gs; j++) {
        const uint32_t u = (uint32_t)x[j] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        sum += f;
    }
    return sum;
}

#elif TAXIWAY_AVX2

typedef struct {
    const float *x;        /* [m, k] float32: the bfloat16 input (or silu(gate) * up), scaled (nibble_scales) */
    int64_t x_stride;
    const uint8_t *w;
    const uint16_t *sz;
    const float *xsum;
    int64_t n, k, gs, groups;
    uint16_t *y;
    int64_t y_stride;
    const uint16_t *bias;
    float *residual;
    int64_t residual_stride;
    int32_t scales;
} Problem;

/* eight output columns c.. of row m: as the AVX-512 epilogue, eight lanes at a time */
static inline void epilogue(const Problem *p, int64_t m, int64_t c, __m256 out) {
    __m128i y = f32x8_to_bf16(out);
    if (p->bias != NULL) {
        const __m256 sum = _mm256_add_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(y), 16)),
                                         bf16x8_to_f32(p->bias + c));
        y = f32x8_to_bf16(sum);
    }
    if (p->residual != NULL) {
        float *r = p->residual + m * p->residual_stride + c;
        const __m256 yf = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(y), 16));
        _mm256_storeu_ps(r, _mm256_add_ps(_mm256_loadu_ps(r), yf));
    } else {
        _mm_storeu_si128((__m128i *)(p->y + m * p->y_stride + c), y);
    }
}

/* Each block's weights are asked for this far ahead of their use: the hardware prefetcher alone
 * keeps too few lines in flight for this variant's slower pace (SmolLM2's gate_up, one row, one
 * thread, weights from memory: 190 us without, ~125 with, ~82 with two blocks per tile instead of
 * four, against ~57 for AVX-512 BF16; the machine was shared and these vary by ~20%). */
#define PREFETCH_BYTES 1024

/* nibble j (bits 4j..4j+3) of every lane as float32 q * 16^j (j < 7), q (j = 7) */
static inline __m256 nibble(__m256i v, const int j) {
    if (j == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(0xF << (4 * j))));
}

/* x[k] for k = 8c + o is stored times 16^-j, j the nibble holding offset o (16^-0 for j = 7) */
static inline __m256 nibble_scales(void) {
    return _mm256_setr_ps(1.0f, 0x1p-16f, 0x1p-4f, 0x1p-20f, 0x1p-8f, 0x1p-24f, 0x1p-12f, 1.0f);
}

/* Rows m0..m0+MT of x against output blocks b0..b0+NB (16 rows each: two vectors of eight).
 * Nibble j of a lane is q[row][k0 + 2 (j % 4) + j / 4] (word j / 4, nibble j % 4). */
static inline __attribute__((always_inline)) void tile(const Problem *p, int64_t m0, int64_t b0, const int MT, const int NB) {
    __m256 out[4][8], acc[4][8];
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < 2 * NB; j++) out[i][j] = _mm256_setzero_ps();
    const int64_t chunks_per_group = p->gs / 8, block_bytes = p->k / 8 * 64;
    for (int64_t g = 0; g < p->groups; g++) {
        for (int i = 0; i < MT; i++)
            for (int j = 0; j < 2 * NB; j++) acc[i][j] = _mm256_setzero_ps();
        for (int64_t c = 0; c < chunks_per_group; c++) {
            const int64_t kc = g * chunks_per_group + c;
            for (int b = 0; b < NB; b++) {
                const uint8_t *chunk = p->w + (b0 + b) * block_bytes + kc * 64;
                _mm_prefetch((const char *)(chunk + PREFETCH_BYTES), _MM_HINT_T0);
                const __m256i lo = _mm256_loadu_si256((const __m256i *)chunk);
                const __m256i hi = _mm256_loadu_si256((const __m256i *)(chunk + 32));
#define NIBBLE(J)                                                                                          \
    {                                                                                                      \
        const __m256 wl = nibble(lo, J), wh = nibble(hi, J);                                               \
        for (int i = 0; i < MT; i++) {                                                                     \
            const __m256 xv = _mm256_broadcast_ss(p->x + (m0 + i) * p->x_stride + kc * 8 + 2 * ((J) % 4) + (J) / 4); \
            acc[i][2 * b] = _mm256_fmadd_ps(wl, xv, acc[i][2 * b]);                                        \
            acc[i][2 * b + 1] = _mm256_fmadd_ps(wh, xv, acc[i][2 * b + 1]);                                \
        }                                                                                                  \
    }
                NIBBLE(0) NIBBLE(4) NIBBLE(1) NIBBLE(5) NIBBLE(2) NIBBLE(6) NIBBLE(3) NIBBLE(7)
#undef NIBBLE
            }
        }
        for (int b = 0; b < NB; b++) {
            for (int h = 0; h < 2; h++) {
                __m256 s, z;
                if (p->scales == 3) { /* 8 float16 d and their m (16 d then 16 m a block), W = d q + m: the sums of q are d's, m is z - 8 s */
                    const uint16_t *at = p->sz + (g * p->n + (b0 + b) * 16) * 2 + 8 * h;
                    const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)at));
                    const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(at + 16)));
                    for (int i = 0; i < MT; i++) {
                        const __m256 o = _mm256_fmadd_ps(d, acc[i][2 * b + h], out[i][2 * b + h]);
                        out[i][2 * b + h] = _mm256_fmadd_ps(m, _mm256_set1_ps(p->xsum[(m0 + i) * p->groups + g]), o);
                    }
                    continue;
                }
                if (p->scales == 2) { /* 8 float16 scales, no zeros */
                    s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p->sz + g * p->n + (b0 + b) * 16 + 8 * h)));
                    z = _mm256_setzero_ps();
                } else { /* 8 (s, z) pairs: s is the low half of each 32-bit lane, z the high half */
                    const __m256i pairs = _mm256_loadu_si256((const __m256i *)(p->sz + (g * p->n + (b0 + b) * 16 + 8 * h) * 2));
                    s = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
                    z = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xFFFF0000u)));
                }
                const __m256 s8 = _mm256_mul_ps(s, _mm256_set1_ps(8.0f));
                for (int i = 0; i < MT; i++) {
                    const __m256 xs = _mm256_set1_ps(p->xsum[(m0 + i) * p->groups + g]);
                    __m256 o = _mm256_fmadd_ps(s, acc[i][2 * b + h], out[i][2 * b + h]);
                    o = _mm256_fmadd_ps(z, xs, o);
                    out[i][2 * b + h] = _mm256_fnmadd_ps(s8, xs, o);
                }
            }
        }
    }
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < 2 * NB; j++) epilogue(p, m0 + i, (b0 * 2 + j) * 8, out[i][j]);
}

/* All rows of x against the output blocks b0, b0 + 1: tiles of 4 rows one block at a time
 * (8 accumulators of 16 registers), the rest with both blocks at once when few rows are left. */
static void unit(const Problem *p, int64_t m, int64_t b0) {
    int64_t m0 = 0;
    for (; m0 + 4 <= m; m0 += 4) {
        tile(p, m0, b0, 4, 1);
        tile(p, m0, b0 + 1, 4, 1);
    }
    switch (m - m0) {
    case 1: tile(p, m0, b0, 1, 2); break;
    case 2: tile(p, m0, b0, 2, 2); break;
    case 3: tile(p, m0, b0, 3, 1); tile(p, m0, b0 + 1, 3, 1); break;
    default: break;
    }
}

/* out[0:k] = float32 of bfloat16(bfloat16(silu(gate)) * up), as the AVX-512 silu_mul_row */
static void silu_mul_row(const uint16_t *in, int64_t k, float *out) {
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        const __m256 g = bf16x8_to_f32(in + j);
        const __m256 s = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        _mm256_storeu_ps(out + j, round_bf16x8(_mm256_mul_ps(round_bf16x8(s), bf16x8_to_f32(in + k + j))));
    }
    for (; j < k; j++) {
        const float g = bf16_to_f32(in[j]);
        out[j] = bf16_to_f32(f32_to_bf16(bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g)))) * bf16_to_f32(in[k + j])));
    }
}

static float group_sum(const float *x, int64_t gs) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= gs; j += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + j));
    return hsum256(acc); /* gs is a multiple of 8 */
}

/* One row of x as the tiles read it: widened (act: silu(gate) * up), each group's sum taken,
 * then scaled by nibble_scales */
static void prepare_row(const uint16_t *x, int64_t k, int64_t gs, int32_t act, float *xf, float *xsum) {
    if (act) silu_mul_row(x, k, xf);
    else load_row(xf, x, (int)k);
    for (int64_t g = 0; g < k / gs; g++) {
        float *xg = xf + g * gs;
        xsum[g] = group_sum(xg, gs);
        for (int64_t j = 0; j < gs; j += 8) _mm256_storeu_ps(xg + j, _mm256_mul_ps(_mm256_loadu_ps(xg + j), nibble_scales()));
    }
}

#endif

/* x: bfloat16 [m, k] (row stride x_stride, unit column stride), or with act = 1 [m, 2k] holding
 * gate | up, of which the kernel multiplies silu(gate) * up (rounded as torch rounds it);
 * w: the native layout for [n, k]; sz: bfloat16 [k / group_size, n, 2]; bias: bfloat16 [n] or
 * NULL, else [n] (n is the padded width: the caller pads the bias too). The result goes to y
 * (bfloat16 [m, n], row stride y_stride) or, when residual is not
 * NULL, is added (as its bfloat16 value) to residual (float32 [m, n], row stride
 * residual_stride) and y is unused.
 * Returns 0, or -1 (nothing written) for a shape outside the kernel's contract (n a multiple of
 * 32, group_size a multiple of 8 dividing k) or no memory, -2 when the build lacks the fast path. */
static int int4_matmul(
    const uint16_t *x, int64_t x_stride, int64_t m, const uint8_t *w, const uint16_t *sz,
    int64_t n, int64_t k, int64_t group_size, uint16_t *y, int64_t y_stride, int32_t num_threads,
    const uint16_t *bias, float *residual, int64_t residual_stride, int32_t act, int32_t scales)
{
#if TAXIWAY_AVX512_BF16
    if (m < 0 || n <= 0 || k <= 0 || group_size <= 0 || num_threads <= 0 || (act != 0 && act != 1)) return -1;
    if (scales != 0 && scales != 2 && scales != 3) return -1;
    if (n % 32 || group_size % 8 || k % group_size) return -1;
    if (m == 0) return 0;
    if (y == NULL && residual == NULL) return -1;
    const int64_t groups = k / group_size;
    float *xsum = malloc(sizeof(float) * (size_t)(m * groups));
    uint16_t *xa = act ? malloc(sizeof(uint16_t) * (size_t)(m * k)) : NULL;
    if (xsum == NULL || (act && xa == NULL)) {
        free(xsum);
        free(xa);
        return -1;
    }
    const uint16_t *xin = act ? xa : x;
    const int64_t xin_stride = act ? k : x_stride;
    const Problem p = {xin, xin_stride, w, sz, xsum, n, k, group_size, groups, y, y_stride, bias, residual, residual_stride, scales};
    const int64_t units = n / 32;
#pragma omp parallel num_threads(num_threads)
    {
        if (act) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < m; r++) silu_mul_row(x + r * x_stride, k, xa + r * k);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m * groups; r++)
            xsum[r] = group_sum(xin + (r / groups) * xin_stride + (r % groups) * group_size, group_size);
        if (m == 1) {
            /* one row (a decode step of one sequence): four blocks per tile, four independent
             * accumulator chains instead of two, so the multiply-adds' latency hides behind the
             * weight stream; each row's sums keep their order */
            const int parts = omp_get_num_threads();
#pragma omp for schedule(static)
            for (int part = 0; part < parts; part++) { /* pairs of blocks split evenly */
                const int64_t pairs = n / 32, hi = pairs * (part + 1) / parts * 2;
                int64_t b = pairs * part / parts * 2;
                for (; b + 4 <= hi; b += 4) tile(&p, 0, b, 1, 4);
                if (b < hi) tile(&p, 0, b, 1, 2);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t u = 0; u < units; u++) unit(&p, m, 2 * u);
        }
    }
    free(xsum);
    free(xa);
    return 0;
#elif TAXIWAY_AVX2
    if (m < 0 || n <= 0 || k <= 0 || group_size <= 0 || num_threads <= 0 || (act != 0 && act != 1)) return -1;
    if (scales != 0 && scales != 2 && scales != 3) return -1;
    if (n % 32 || group_size % 8 || k % group_size) return -1;
    if (m == 0) return 0;
    if (y == NULL && residual == NULL) return -1;
    const int64_t groups = k / group_size;
    float *xsum = malloc(sizeof(float) * (size_t)(m * groups));
    float *xf = malloc(sizeof(float) * (size_t)(m * k)); /* x (or silu(gate) * up) as float32, scaled */
    if (xsum == NULL || xf == NULL) {
        free(xsum);
        free(xf);
        return -1;
    }
    const Problem p = {xf, k, w, sz, xsum, n, k, group_size, groups, y, y_stride, bias, residual, residual_stride, scales};
    const int64_t units = n / 32;
    /* a few rows (a decode step) are prepared here: the threads would wait at a barrier longer */
    const int prepare_here = m * k <= 16384;
    if (prepare_here)
        for (int64_t r = 0; r < m; r++) prepare_row(x + r * x_stride, k, group_size, act, xf + r * k, xsum + r * groups);
#pragma omp parallel num_threads(num_threads)
    {
        if (!prepare_here) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < m; r++) prepare_row(x + r * x_stride, k, group_size, act, xf + r * k, xsum + r * groups);
        }
        if (m == 1) {
            /* one row: two blocks (four accumulators) per tile, pairs of blocks split evenly */
            const int parts = omp_get_num_threads();
#pragma omp for schedule(static)
            for (int part = 0; part < parts; part++) {
                const int64_t pairs = n / 32, hi = pairs * (part + 1) / parts * 2;
                int64_t b = pairs * part / parts * 2;
                for (; b + 2 <= hi; b += 2) tile(&p, 0, b, 1, 2);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t u = 0; u < units; u++) unit(&p, m, 2 * u);
        }
    }
    free(xsum);
    free(xf);
    return 0;
#else
    (void)x; (void)x_stride; (void)m; (void)w; (void)sz; (void)n; (void)k; (void)group_size;
    (void)y; (void)y_stride; (void)num_threads; (void)bias; (void)residual; (void)residual_stride; (void)act; (void)scales;
    return -2;
#endif
}

int int4_matmul_bf16(const Int4MatmulArgs *a) {
    if (a == NULL) return -1;
    return int4_matmul(a->x, a->x_stride, a->m, a->w, a->sz, a->n, a->k, a->group_size, a->y, a->y_stride,
                       a->num_threads, a->bias, a->residual, a->residual_stride, a->act, a->scales);
}
