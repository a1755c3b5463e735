/* y = x @ W.T for per-group int8 W (GGUF Q8_0: w = d * q, q in -127..127) and bfloat16 x.
 *
 * Built by backends/engine/native/ckernels.py with the other kernels. Like int4_matmul.c, every weight is
 * exact: q -> float32 -> bfloat16 is exact for |q| <= 256, VDPBF16PS multiplies it with bfloat16
 * x (exact products, float32 sums per group), then d * sum in float32 (d kept in float32), rounded
 * once to bfloat16. Rows are summed in one order whatever the batch.
 *
 * Weight layout ("native", packed by model/quant/layouts.py): blocks of 16 output rows; within a block, 32
 * bytes per pair of columns (k, k + 1): row i's q[i][k], q[i][k + 1] at bytes 2i, 2i + 1. The
 * 32 bytes widen to two float32 vectors (rows 0-7, rows 8-15) and VCVTNE2PS2BF16 packs them so
 * that 32-bit lane i holds row i's pair.
 * Scales: d float32 [G, N], or (scales = 2) float16: GGUF's Q8_0 d, kept exactly in 2/32 bytes per
 * weight instead of 4/32.
 *
 * The AVX2 + FMA variant reads the same layout: x widened to float32 once per call; the 16 bytes
 * of 8 rows' pair, loaded into both halves of a vector, are shuffled (VPSHUFB) into the top byte
 * of each 32-bit lane, the even column's then the odd one's: the integer q * 2^24, converted to
 * float32 exactly and multiply-added with x[k] (exact products, float32 sums 2^24 times the
 * unscaled ones, rounding alike); d * 2^-24 (exact) scales each group. Two shuffles (port 5) and
 * two conversions per 16 weights, where sign-extending to words and shifting each word into a
 * lane cost five port 0/1 instructions: 2048x576, one row, one thread, weights in cache, ~80 us -> ~55.
 */
#include "abi.h"
#include "simd.h"
#define INT8_FAST (TAXIWAY_AVX512_BF16 || TAXIWAY_AVX2)
/* Blocks of 16 rows a one-row call multiplies together (and a work item's blocks): one block's
 * sums are one chain of multiply-adds, latency-bound, and the blocks' chains overlap. SmolLM2's
 * lm_head (49152x576), one row, one thread, AVX-512 BF16: ~1.9 ms one block at a time, ~1.75 four. */
#if TAXIWAY_AVX512_BF16
#define ROW_BLOCKS 4
#else
#define ROW_BLOCKS 2
#endif

int int8_matmul_supported(void) { return INT8_FAST; }

#if TAXIWAY_AVX512_BF16

typedef struct {
    const uint16_t *x;
    int64_t x_stride;
    const int8_t *w;
    const float *d;
    int64_t n, k, gs, groups;
    uint16_t *y;
    int64_t y_stride;
    int32_t scales; /* d: 0 float32, 2 float16 */
} Problem8;

/* 16 scales of d from index i on, as float32 */
static inline __m512 scales16(const Problem8 *p, int64_t i) {
    if (p->scales == 2) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p->d + i)));
    return _mm512_loadu_ps(p->d + i);
}

static inline __m512bh pair_weights(const int8_t *p) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo); /* words 0-15 from lo (rows 0-7), 16-31 from hi */
}

/* Rows m0..m0+MT of x against the NB blocks b.. (16 rows each); MT * NB accumulators, one per row
 * and block, so a row's sums run in one order whatever MT and NB */
static inline __attribute__((always_inline)) void tile8(const Problem8 *p, int64_t m0, int64_t b, const int MT, const int NB) {
    __m512 out[8][4], acc[8][4];
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NB; j++) out[i][j] = _mm512_setzero_ps();
    const int64_t block_bytes = p->k * 16;
    for (int64_t g = 0; g < p->groups; g++) {
        for (int i = 0; i < MT; i++)
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
        for (int64_t kp = g * p->gs / 2; kp < (g + 1) * p->gs / 2; kp++) {
            for (int j = 0; j < NB; j++) {
                const __m512bh wv = pair_weights(p->w + (b + j) * block_bytes + kp * 32);
                for (int i = 0; i < MT; i++)
                    acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, (__m512bh)bf16_pair_bcast(p->x + (m0 + i) * p->x_stride + 2 * kp));
            }
        }
        for (int j = 0; j < NB; j++) {
            const __m512 d = scales16(p, g * p->n + (b + j) * 16);
            for (int i = 0; i < MT; i++) out[i][j] = _mm512_fmadd_ps(d, acc[i][j], out[i][j]);
        }
    }
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NB; j++)
            _mm256_storeu_si256((__m256i *)(p->y + (m0 + i) * p->y_stride + (b + j) * 16), f32x16_to_bf16(out[i][j]));
}

/* All rows of x against the blocks b.. b + nb (nb <= ROW_BLOCKS); one row (a decode step) takes
 * them all at once */
static void block8(const Problem8 *p, int64_t m, int64_t b, int64_t nb) {
    if (m == 1 && nb == ROW_BLOCKS) {
        tile8(p, 0, b, 1, ROW_BLOCKS);
        return;
    }
    for (int64_t j = b; j < b + nb; j++) {
        int64_t m0 = 0;
        for (; m0 + 8 <= m; m0 += 8) tile8(p, m0, j, 8, 1);
        switch (m - m0) {
        case 1: tile8(p, m0, j, 1, 1); break;
        case 2: tile8(p, m0, j, 2, 1); break;
        case 3: tile8(p, m0, j, 3, 1); break;
        case 4: tile8(p, m0, j, 4, 1); break;
        case 5: tile8(p, m0, j, 5, 1); break;
        case 6: tile8(p, m0, j, 6, 1); break;
        case 7: tile8(p, m0, j, 7, 1); break;
        default: break;
        }
    }
}

#elif TAXIWAY_AVX2

typedef struct {
    const float *x; /* [m, k] float32: the bfloat16 input widened */
    const int8_t *w;
    const float *d;
    int64_t n, k, gs, groups;
    uint16_t *y;
    int64_t y_stride;
    int32_t scales;
} Problem8;

/* 8 scales of d from index i on, as float32 */
static inline __m256 scales8(const Problem8 *p, int64_t i) {
    if (p->scales == 2) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p->d + i)));
    return _mm256_loadu_ps(p->d + i);
}

/* rows m0..m0+MT against the NB blocks b.. (16 rows each: two vectors of eight); one
 * accumulator per row and vector, so a row's sums run in one order whatever MT and NB */
static inline __attribute__((always_inline)) void tile8(const Problem8 *p, int64_t m0, int64_t b, const int MT, const int NB) {
    __m256 out[4][4], acc[4][4];
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < 2 * NB; j++) out[i][j] = _mm256_setzero_ps();
    /* byte 2i (2i + 1) of the 16 to the top byte of 32-bit lane i, zeros below: q * 2^24 */
    const __m256i to_even = _mm256_setr_epi8(
        -1, -1, -1, 0, -1, -1, -1, 2, -1, -1, -1, 4, -1, -1, -1, 6, -1, -1, -1, 8, -1, -1, -1, 10, -1, -1, -1, 12, -1, -1, -1, 14);
    const __m256i to_odd = _mm256_add_epi32(to_even, _mm256_set1_epi32(1 << 24));
    for (int64_t g = 0; g < p->groups; g++) {
        for (int j = 0; j < NB; j++)
        for (int i = 0; i < MT; i++)
            for (int j = 0; j < 2 * NB; j++) acc[i][j] = _mm256_setzero_ps();
        for (int64_t kp = g * p->gs / 2; kp < (g + 1) * p->gs / 2; kp++) {
            for (int j = 0; j < 2 * NB; j++) {
                /* rows 8j..8j+7 of the blocks: q[row][2kp] in the low word of each lane, q[row][2kp + 1] in the high */
                const int8_t *wb = p->w + (b + j / 2) * p->k * 16 + kp * 32 + 16 * (j % 2);
                const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)wb));
                const __m256 even = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(bytes, to_even));
                const __m256 odd = _mm256_cvtepi32_ps(_mm256_shuffle_epi8(bytes, to_odd));
                for (int i = 0; i < MT; i++) {
                    const float *xr = p->x + (m0 + i) * p->k + 2 * kp;
                    acc[i][j] = _mm256_fmadd_ps(even, _mm256_broadcast_ss(xr), acc[i][j]);
                    acc[i][j] = _mm256_fmadd_ps(odd, _mm256_broadcast_ss(xr + 1), acc[i][j]);
                }
            }
        }
        for (int j = 0; j < 2 * NB; j++) {
            const __m256 d = _mm256_mul_ps(scales8(p, g * p->n + b * 16 + 8 * j), _mm256_set1_ps(0x1p-24f));
            for (int i = 0; i < MT; i++) out[i][j] = _mm256_fmadd_ps(d, acc[i][j], out[i][j]);
        }
    }
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < 2 * NB; j++)
            _mm_storeu_si128((__m128i *)(p->y + (m0 + i) * p->y_stride + b * 16 + 8 * j), f32x8_to_bf16(out[i][j]));
}

/* All rows of x against the blocks b.. b + nb (nb <= ROW_BLOCKS); one row takes them all at
 * once (independent multiply-add chains overlap), more rows one block at a time */
static void block8(const Problem8 *p, int64_t m, int64_t b, int64_t nb) {
    if (m == 1 && nb == ROW_BLOCKS) {
        tile8(p, 0, b, 1, ROW_BLOCKS);
        return;
    }
    for (int64_t j = b; j < b + nb; j++) {
        int64_t m0 = 0;
        for (; m0 + 4 <= m; m0 += 4) tile8(p, m0, j, 4, 1);
        switch (m - m0) {
        case 1: tile8(p, m0, j, 1, 1); break;
        case 2: tile8(p, m0, j, 2, 1); break;
        case 3: tile8(p, m0, j, 3, 1); break;
        default: break;
        }
    }
}

#endif

/* x: bfloat16 [m, k] (row stride x_stride); w: the native layout for [n, k]; d: float32 [k /
 * group_size, n]; y: bfloat16 [m, n] (row stride y_stride). Returns 0, -1 (nothing written) for a
 * shape outside the contract (n a multiple of 16, group_size even and dividing k), -2 when the
 * build lacks the fast path. */
static int int8_matmul(
    const uint16_t *x, int64_t x_stride, int64_t m, const int8_t *w, const float *d,
    int64_t n, int64_t k, int64_t group_size, uint16_t *y, int64_t y_stride, int32_t num_threads, int32_t scales)
{
#if TAXIWAY_AVX512_BF16
    if (m < 0 || n <= 0 || k <= 0 || group_size <= 0 || num_threads <= 0 || (scales != 0 && scales != 2)) return -1;
    if (n % 16 || group_size % 2 || k % group_size) return -1;
    if (m == 0) return 0;
    const Problem8 p = {x, x_stride, w, d, n, k, group_size, k / group_size, y, y_stride, scales};
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t b = 0; b < n / 16; b += ROW_BLOCKS) block8(&p, m, b, n / 16 - b < ROW_BLOCKS ? n / 16 - b : ROW_BLOCKS);
    return 0;
#elif TAXIWAY_AVX2
    if (m < 0 || n <= 0 || k <= 0 || group_size <= 0 || num_threads <= 0 || (scales != 0 && scales != 2)) return -1;
    if (n % 16 || group_size % 2 || k % group_size) return -1;
    if (m == 0) return 0;
    float *xf = malloc(sizeof(float) * (size_t)(m * k));
    if (xf == NULL) return -1;
    const Problem8 p = {xf, w, d, n, k, group_size, k / group_size, y, y_stride, scales};
    const int prepare_here = m * k <= 16384; /* a decode step's row: no barrier for it */
    if (prepare_here)
        for (int64_t r = 0; r < m; r++) load_row(xf + r * k, x + r * x_stride, (int)k);
#pragma omp parallel num_threads(num_threads)
    {
        if (!prepare_here) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < m; r++) load_row(xf + r * k, x + r * x_stride, (int)k);
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < n / 16; b += ROW_BLOCKS) block8(&p, m, b, n / 16 - b < ROW_BLOCKS ? n / 16 - b : ROW_BLOCKS);
    }
    free(xf);
    return 0;
#else
    (void)x; (void)x_stride; (void)m; (void)w; (void)d; (void)n; (void)k; (void)group_size;
    (void)y; (void)y_stride; (void)num_threads; (void)scales;
    return -2;
#endif
}

int int8_matmul_bf16(const Int8MatmulArgs *a) {
    if (a == NULL) return -1;
    return int8_matmul(a->x, a->x_stride, a->m, a->w, a->d, a->n, a->k, a->group_size, a->y, a->y_stride,
                       a->num_threads, a->scales);
}
