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
 * Scales: d float32 [G, N].
 *
 * The AVX2 + FMA variant reads the same layout: x widened to float32 once per call, the 16 bytes
 * of 8 rows' pair sign-extended to 16-bit words (32-bit lane i: row i's pair), each word to a
 * float32 lane by shifts, multiply-added with x[k] (exact products, float32 sums).
 */
#include "abi.h"
#include "simd.h"
#define INT8_FAST (TAXIWAY_AVX512_BF16 || TAXIWAY_AVX2)

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
} Problem8;

static inline __m512bh pair_weights(const int8_t *p) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo); /* words 0-15 from lo (rows 0-7), 16-31 from hi */
}

static inline __attribute__((always_inline)) void tile8(const Problem8 *p, int64_t m0, int64_t b, const int MT) {
    __m512 out[8], acc[8];
    for (int i = 0; i < MT; i++) out[i] = _mm512_setzero_ps();
    const int64_t block_bytes = p->k * 16;
    const int8_t *wb = p->w + b * block_bytes;
    for (int64_t g = 0; g < p->groups; g++) {
        for (int i = 0; i < MT; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t kp = g * p->gs / 2; kp < (g + 1) * p->gs / 2; kp++) {
            const __m512bh wv = pair_weights(wb + kp * 32);
            for (int i = 0; i < MT; i++)
                acc[i] = _mm512_dpbf16_ps(acc[i], wv, (__m512bh)bf16_pair_bcast(p->x + (m0 + i) * p->x_stride + 2 * kp));
        }
        const __m512 d = _mm512_loadu_ps(p->d + g * p->n + b * 16);
        for (int i = 0; i < MT; i++) out[i] = _mm512_fmadd_ps(d, acc[i], out[i]);
    }
    for (int i = 0; i < MT; i++)
        _mm256_storeu_si256((__m256i *)(p->y + (m0 + i) * p->y_stride + b * 16), f32x16_to_bf16(out[i]));
}

static void block8(const Problem8 *p, int64_t m, int64_t b) {
    int64_t m0 = 0;
    for (; m0 + 8 <= m; m0 += 8) tile8(p, m0, b, 8);
    switch (m - m0) {
    case 1: tile8(p, m0, b, 1); break;
    case 2: tile8(p, m0, b, 2); break;
    case 3: tile8(p, m0, b, 3); break;
    case 4: tile8(p, m0, b, 4); break;
    case 5: tile8(p, m0, b, 5); break;
    case 6: tile8(p, m0, b, 6); break;
    case 7: tile8(p, m0, b, 7); break;
    default: break;
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
} Problem8;

/* rows m0..m0+MT against block b (16 rows: two vectors of eight) */
static inline __attribute__((always_inline)) void tile8(const Problem8 *p, int64_t m0, int64_t b, const int MT) {
    __m256 out[4][2], acc[4][2];
    for (int i = 0; i < MT; i++) out[i][0] = out[i][1] = _mm256_setzero_ps();
    const int8_t *wb = p->w + b * p->k * 16;
    for (int64_t g = 0; g < p->groups; g++) {
        for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
        for (int64_t kp = g * p->gs / 2; kp < (g + 1) * p->gs / 2; kp++) {
            for (int h = 0; h < 2; h++) {
                /* rows 8h..8h+7: q[row][2kp] in the low word of each lane, q[row][2kp + 1] in the high */
                const __m256i words = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + kp * 32 + 16 * h)));
                const __m256 even = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(words, 16), 16));
                const __m256 odd = _mm256_cvtepi32_ps(_mm256_srai_epi32(words, 16));
                for (int i = 0; i < MT; i++) {
                    const float *xr = p->x + (m0 + i) * p->k + 2 * kp;
                    acc[i][h] = _mm256_fmadd_ps(even, _mm256_broadcast_ss(xr), acc[i][h]);
                    acc[i][h] = _mm256_fmadd_ps(odd, _mm256_broadcast_ss(xr + 1), acc[i][h]);
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 d = _mm256_loadu_ps(p->d + g * p->n + b * 16 + 8 * h);
            for (int i = 0; i < MT; i++) out[i][h] = _mm256_fmadd_ps(d, acc[i][h], out[i][h]);
        }
    }
    for (int i = 0; i < MT; i++)
        for (int h = 0; h < 2; h++)
            _mm_storeu_si128((__m128i *)(p->y + (m0 + i) * p->y_stride + b * 16 + 8 * h), f32x8_to_bf16(out[i][h]));
}

static void block8(const Problem8 *p, int64_t m, int64_t b) {
    int64_t m0 = 0;
    for (; m0 + 4 <= m; m0 += 4) tile8(p, m0, b, 4);
    switch (m - m0) {
    case 1: tile8(p, m0, b, 1); break;
    case 2: tile8(p, m0, b, 2); break;
    case 3: tile8(p, m0, b, 3); break;
    default: break;
    }
}

#endif

/* x: bfloat16 [m, k] (row stride x_stride); w: the native layout for [n, k]; d: float32 [k /
 * group_size, n]; y: bfloat16 [m, n] (row stride y_stride). Returns 0, -1 (nothing written) for a
 * shape outside the contract (n a multiple of 16, group_size even and dividing k), -2 when the
 * build lacks the fast path. */
static int int8_matmul(
    const uint16_t *x, int64_t x_stride, int64_t m, const int8_t *w, const float *d,
    int64_t n, int64_t k, int64_t group_size, uint16_t *y, int64_t y_stride, int32_t num_threads)
{
#if TAXIWAY_AVX512_BF16
    if (m < 0 || n <= 0 || k <= 0 || group_size <= 0 || num_threads <= 0) return -1;
    if (n % 16 || group_size % 2 || k % group_size) return -1;
    if (m == 0) return 0;
    const Problem8 p = {x, x_stride, w, d, n, k, group_size, k / group_size, y, y_stride};
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t b = 0; b < n / 16; b++) block8(&p, m, b);
    return 0;
#elif TAXIWAY_AVX2
    if (m < 0 || n <= 0 || k <= 0 || group_size <= 0 || num_threads <= 0) return -1;
    if (n % 16 || group_size % 2 || k % group_size) return -1;
    if (m == 0) return 0;
    float *xf = malloc(sizeof(float) * (size_t)(m * k));
    if (xf == NULL) return -1;
    const Problem8 p = {xf, w, d, n, k, group_size, k / group_size, y, y_stride};
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
        for (int64_t b = 0; b < n / 16; b++) block8(&p, m, b);
    }
    free(xf);
    return 0;
#else
    (void)x; (void)x_stride; (void)m; (void)w; (void)d; (void)n; (void)k; (void)group_size;
    (void)y; (void)y_stride; (void)num_threads;
    return -2;
#endif
}

int int8_matmul_bf16(const Int8MatmulArgs *a) {
    if (a == NULL) return -1;
    return int8_matmul(a->x, a->x_stride, a->m, a->w, a->d, a->n, a->k, a->group_size, a->y, a->y_stride,
                       a->num_threads);
}
