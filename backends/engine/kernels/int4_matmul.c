/* y = x @ W.T for groupwise int4 W and bfloat16 x, with every weight exact and float32 sums.
 *
 * Built by backends/engine/ckernels.py with the other kernels. W[n, k] = (q - 8) * s + z per
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
 * Weight layout ("native", packed by quant.py): blocks of 16 output rows; within a block, one
 * 64-byte chunk per 8 consecutive k. In a chunk, 32-bit lane i holds row i: its 16-bit word
 * e (0, 1) carries, in nibble t (0..3, low first), q[row i][k0 + 2t + e]. Shifting the chunk by
 * 4t and masking gives 16 lanes of the pair (q[i][k0 + 2t], q[i][k0 + 2t + 1]), which VDPBF16PS
 * multiplies by the x pair (x[k0 + 2t], x[k0 + 2t + 1]) broadcast from memory.
 *
 * Scales: sz [G, N, 2] bfloat16, (s, z) per group and row, as torch's int4 kernels take them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define INT4_FAST 1
#else
#define INT4_FAST 0
#endif

/* 1 when this build has the AVX-512 BF16 path; without it int4_matmul_bf16 refuses every call
 * and the engine keeps torch's packed kernel. */
int int4_matmul_supported(void) { return INT4_FAST; }

#if INT4_FAST

typedef struct {
    const uint16_t *x;
    int64_t x_stride;
    const uint8_t *w;
    const uint16_t *sz;
    const float *xsum; /* [m, G]: sum of each group of x, float32 */
    int64_t n, k, gs, groups;
    uint16_t *y;
    int64_t y_stride;
} Problem;

/* bfloat16 q - 8 for q = 0..15 (in the low 16 of 32 table entries) */
static inline __m512i centred_table(void) {
    return _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000,
        (short)0xBF80, (short)0xC000, (short)0xC040, (short)0xC080, (short)0xC0A0, (short)0xC0C0, (short)0xC0E0,
        (short)0xC100);
}

static inline __m512i nibble_pair(__m512i chunk, int t, __m512i table) {
    /* nibble t of every 16-bit lane, looked up as bfloat16 q - 8 */
    const __m512i v = t ? _mm512_srli_epi16(chunk, 4 * t) : chunk;
    return _mm512_permutexvar_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x000F)), table);
}

static inline __m512 bcast_pair(const uint16_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm512_castsi512_ps(_mm512_set1_epi32(v));
}

/* Rows m0..m0+MT of x against output blocks b0..b0+NB (16 rows each). MT and NB are constants at
 * every call site, so the loops unroll into registers: MT * NB accumulators and as many sums. */
static inline __attribute__((always_inline)) void tile(const Problem *p, int64_t m0, int64_t b0, const int MT, const int NB) {
    __m512 out[8][2], acc[8][2];
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NB; j++) out[i][j] = _mm512_setzero_ps();
    const int64_t chunks_per_group = p->gs / 8, block_bytes = p->k / 8 * 64;
    const __m512i table = centred_table();
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
                        const __m512bh xv = (__m512bh)bcast_pair(p->x + (m0 + i) * p->x_stride + kc * 8 + 2 * t);
                        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, xv);
                    }
                }
            }
        }
        for (int j = 0; j < NB; j++) {
            /* 16 (s, z) pairs: s is the low half of each 32-bit lane, z the high half */
            const __m512i pairs = _mm512_loadu_si512(p->sz + (g * p->n + (b0 + j) * 16) * 2);
            const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
            const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32((int)0xFFFF0000u)));
            for (int i = 0; i < MT; i++) {
                out[i][j] = _mm512_fmadd_ps(s, acc[i][j], out[i][j]);
                out[i][j] = _mm512_fmadd_ps(z, _mm512_set1_ps(p->xsum[(m0 + i) * p->groups + g]), out[i][j]);
            }
        }
    }
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NB; j++)
            _mm256_storeu_si256((__m256i *)(p->y + (m0 + i) * p->y_stride + (b0 + j) * 16),
                                (__m256i)_mm512_cvtneps_pbh(out[i][j]));
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

#endif

/* x: bfloat16 [m, k] (row stride x_stride, unit column stride); w: the native layout for
 * [n, k]; sz: bfloat16 [k / group_size, n, 2]; y: bfloat16 [m, n] (row stride y_stride).
 * Returns 0, or -1 (nothing written) for a shape outside the kernel's contract (n a multiple of
 * 32, group_size a multiple of 8 dividing k) or no memory, -2 when the build lacks the fast path. */
int int4_matmul_bf16(
    const uint16_t *x, int64_t x_stride, int64_t m, const uint8_t *w, const uint16_t *sz,
    int64_t n, int64_t k, int64_t group_size, uint16_t *y, int64_t y_stride, int32_t num_threads)
{
#if INT4_FAST
    if (m < 0 || n <= 0 || k <= 0 || group_size <= 0 || num_threads <= 0) return -1;
    if (n % 32 || group_size % 8 || k % group_size) return -1;
    if (m == 0) return 0;
    const int64_t groups = k / group_size;
    float *xsum = malloc(sizeof(float) * (size_t)(m * groups));
    if (xsum == NULL) return -1;
    const Problem p = {x, x_stride, w, sz, xsum, n, k, group_size, groups, y, y_stride};
    const int64_t units = n / 32;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m * groups; r++)
            xsum[r] = group_sum(x + (r / groups) * x_stride + (r % groups) * group_size, group_size);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; u++) unit(&p, m, 2 * u);
    }
    free(xsum);
    return 0;
#else
    (void)x; (void)x_stride; (void)m; (void)w; (void)sz; (void)n; (void)k; (void)group_size;
    (void)y; (void)y_stride; (void)num_threads;
    return -2;
#endif
}
