/* One entry point for every native-layout projection the fused decoder layer multiplies
 * (Projection.kind): int4 (int4_matmul.c), int5 (here) and per-group int8 (int8_matmul.c),
 * each with int4_matmul_bf16's epilogues: bias, the result added into the float32 residual,
 * act = 1 for x = gate | up multiplied as silu(gate) * up.
 *
 * int5: W[n, k] = (q - 16) * s + z per group, q in 0..31 (GGUF Q5_0 is s = d, z = 0; Q5_1 and
 * Q5_K have a minimum, z = m + 16 d). The low four bits of q are int4_matmul.c's native nibble
 * layout, read the same way; the fifth bits are masks beside them, hb: per 16-row block and 8
 * columns four 32-bit masks, one per nibble t, bit 2i + e for word e of row i's lane. VPERMW reads
 * five index bits, so the chunk shifted by 4t indexes a 32-entry table of bfloat16 q - 16 with
 * its nibble in bits 0-3 and, in bit 4, the low bit of the next nibble (0 for t = 3); the mask
 * holds the fifth bit XOR that bit (model/quant/layouts.py, high_bits_pack), so adding 16 under
 * the mask sets bit 4 to the fifth bit: a shift, a masked add and the lookup per pair of
 * columns, as many as int4's (shift, and, lookup) plus a mask load, where a plane of one byte per
 * row cost three more (3072x576, one row, one thread, AMD EPYC: 39.0 us against int4's 28.5 with
 * that plane). The weights stay exact, the sums float32, as int4_matmul.c argues; 5/8 of int8's
 * bytes per weight.
 *
 * int6 (Projection.kind 3, GGUF Q6_K): W = (q - 32) * s, q in 0..63, the same kernel with two
 * masks per nibble position (adds of 16 and 32: bits 4-5 of the index) into VPERMT2W's 64-entry
 * table; scales without zeros only.
 *
 * Scales (Projection.scales): d float32 [G, 2, N], the scales then the zeros of each group (kept in
 * float32, unlike int4's bfloat16 pairs: Q5_0 sums d * (q - 16) x exactly as int8_matmul.c does);
 * without zeros (Q5_0) float32 [G, N], or float16 [G, N] where every scale is a float16 (Q5_0's
 * d is): the weights' bytes then are 5.5 bits per weight, not 7, what decode reads. int8: the
 * Int8MatmulArgs layout with d float32 [G, N]; its epilogues run after int8_matmul_bf16, on the
 * bfloat16 result.
 */
#include "abi.h"
#include "simd.h"
#include <omp.h>
#define INT5_FAST TAXIWAY_AVX512_BF16

int projection_matmul_supported(void) { return INT5_FAST; }

#if INT5_FAST

typedef struct {
    const uint16_t *x;
    int64_t x_stride;
    const uint8_t *w, *hb;
    const float *sz;   /* [G, 2, n]: scales, then zeros; [G, n] scales (float32 or float16) */
    int32_t scales;    /* Projection.scales */
    int32_t bits;      /* 5 (kind 1) or 6 (kind 3) */
    const float *xsum; /* [m, G] */
    int64_t n, k, gs, groups;
    uint16_t *y;
    int64_t y_stride;
    const uint16_t *bias;
    float *residual;
    int64_t residual_stride;
} Problem5;

/* bfloat16 y of float32 out, plus the bias rounded again (y + bias in bfloat16), stored or added
 * to the residual: int4_matmul.c's epilogue */
static inline void epilogue5(const Problem5 *p, int64_t m, int64_t c, __m512 out) {
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

/* bfloat16 q - 16 for q = 0..31: words 0-15 -16..-1, words 16-31 0..15 */
static inline __m512i centred_table5(void) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_setr_epi32(-16, -15, -14, -13, -12, -11, -10, -9, -8, -7, -6, -5, -4, -3, -2, -1));
    const __m512 hi = _mm512_add_ps(lo, _mm512_set1_ps(16.0f));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* bfloat16 q - 32 for q = 0..63: the low table -32..-1, the high one 0..31 (VPERMT2W's two sources) */
static inline void centred_tables6(__m512i *lo, __m512i *hi) {
    const __m512 a = _mm512_cvtepi32_ps(_mm512_setr_epi32(-32, -31, -30, -29, -28, -27, -26, -25, -24, -23, -22, -21, -20, -19, -18, -17));
    const __m512 b = _mm512_add_ps(a, _mm512_set1_ps(16.0f)), c = _mm512_add_ps(a, _mm512_set1_ps(32.0f));
    const __m512 d = _mm512_add_ps(a, _mm512_set1_ps(48.0f));
    *lo = (__m512i)_mm512_cvtne2ps_pbh(b, a);
    *hi = (__m512i)_mm512_cvtne2ps_pbh(d, c);
}

/* the pair t of 16 rows as bfloat16 q - 32: nibble t of each word, bits 4-5 completed by adding
 * 16 and 32 under the two masks (VPERMT2W reads six index bits) */
static inline __m512bh hex_pair(__m512i chunk, __mmask32 add16, __mmask32 add32, int t, __m512i lo, __m512i hi) {
    const __m512i nib = t ? _mm512_srli_epi16(chunk, 4 * t) : chunk;
    __m512i idx = _mm512_mask_add_epi16(nib, add16, nib, _mm512_set1_epi16(16));
    idx = _mm512_mask_add_epi16(idx, add32, idx, _mm512_set1_epi16(32));
    return (__m512bh)_mm512_permutex2var_epi16(lo, idx, hi);
}

/* the pair t of 16 rows as bfloat16 q - 16: nibble t of each word, bit 4 corrected by the mask */
static inline __m512bh quint_pair(__m512i chunk, __mmask32 fifth, int t, __m512i table) {
    const __m512i nib = t ? _mm512_srli_epi16(chunk, 4 * t) : chunk;
    const __m512i idx = _mm512_mask_add_epi16(nib, fifth, nib, _mm512_set1_epi16(16));
    return (__m512bh)_mm512_permutexvar_epi16(idx, table);
}

static inline __attribute__((always_inline)) void tile5s(const Problem5 *p, int64_t m0, int64_t b0, const int MT, const int NB,
                                                         const int SCALES, const int BITS) {
    __m512 out[8][4], acc[8][4];
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NB; j++) out[i][j] = _mm512_setzero_ps();
    const int64_t chunks_per_group = p->gs / 8, block_bytes = p->k / 8 * 64, plane_bytes = p->k / 8 * 16 * (BITS - 4);
    const __m512i table = centred_table5();
    __m512i lo6 = table, hi6 = table;
    if (BITS == 6) centred_tables6(&lo6, &hi6);
    for (int64_t g = 0; g < p->groups; g++) {
        for (int i = 0; i < MT; i++)
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks_per_group; c++) {
            const int64_t kc = g * chunks_per_group + c;
            for (int j = 0; j < NB; j++) {
                const __m512i chunk = _mm512_loadu_si512(p->w + (b0 + j) * block_bytes + kc * 64);
                const uint32_t *masks = (const uint32_t *)(p->hb + (b0 + j) * plane_bytes + kc * 16 * (BITS - 4));
                for (int t = 0; t < 4; t++) {
                    const __m512bh wv = BITS == 5 ? quint_pair(chunk, _cvtu32_mask32(masks[t]), t, table)
                                                  : hex_pair(chunk, _cvtu32_mask32(masks[2 * t]), _cvtu32_mask32(masks[2 * t + 1]), t, lo6, hi6);
                    for (int i = 0; i < MT; i++) {
                        const __m512bh xv = (__m512bh)bf16_pair_bcast(p->x + (m0 + i) * p->x_stride + kc * 8 + 2 * t);
                        acc[i][j] = _mm512_dpbf16_ps(acc[i][j], wv, xv);
                    }
                }
            }
        }
        for (int j = 0; j < NB; j++) {
            const int64_t at = g * p->n + (b0 + j) * 16;
            if (SCALES == 0) {
                const float *sg = p->sz + g * 2 * p->n + (b0 + j) * 16;
                const __m512 s = _mm512_loadu_ps(sg), z = _mm512_loadu_ps(sg + p->n);
                for (int i = 0; i < MT; i++) {
                    out[i][j] = _mm512_fmadd_ps(s, acc[i][j], out[i][j]);
                    out[i][j] = _mm512_fmadd_ps(z, _mm512_set1_ps(p->xsum[(m0 + i) * p->groups + g]), out[i][j]);
                }
            } else {
                const __m512 s = SCALES == 1 ? _mm512_loadu_ps(p->sz + at)
                                             : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p->sz + at)));
                for (int i = 0; i < MT; i++) out[i][j] = _mm512_fmadd_ps(s, acc[i][j], out[i][j]);
            }
        }
    }
    for (int i = 0; i < MT; i++)
        for (int j = 0; j < NB; j++) epilogue5(p, m0 + i, (b0 + j) * 16, out[i][j]);
}

/* tile5s with its width and scales' format constants (the zero term and its sums only where there
 * are zeros; six bits only without) */
static inline __attribute__((always_inline)) void tile5(const Problem5 *p, int64_t m0, int64_t b0, const int MT, const int NB) {
    switch (p->scales + 3 * (p->bits == 6)) {
    case 0: tile5s(p, m0, b0, MT, NB, 0, 5); break;
    case 1: tile5s(p, m0, b0, MT, NB, 1, 5); break;
    case 2: tile5s(p, m0, b0, MT, NB, 2, 5); break;
    case 4: tile5s(p, m0, b0, MT, NB, 1, 6); break;
    default: tile5s(p, m0, b0, MT, NB, 2, 6); break;
    }
}

static void unit5(const Problem5 *p, int64_t m, int64_t b0) {
    int64_t m0 = 0;
    for (; m0 + 8 <= m; m0 += 8) {
        tile5(p, m0, b0, 8, 1);
        tile5(p, m0, b0 + 1, 8, 1);
    }
    switch (m - m0) {
    case 1: tile5(p, m0, b0, 1, 2); break;
    case 2: tile5(p, m0, b0, 2, 2); break;
    case 3: tile5(p, m0, b0, 3, 2); break;
    case 4: tile5(p, m0, b0, 4, 2); break;
    case 5: tile5(p, m0, b0, 5, 1); tile5(p, m0, b0 + 1, 5, 1); break;
    case 6: tile5(p, m0, b0, 6, 1); tile5(p, m0, b0 + 1, 6, 1); break;
    case 7: tile5(p, m0, b0, 7, 1); tile5(p, m0, b0 + 1, 7, 1); break;
    default: break;
    }
}

/* out[0:k] = bfloat16(bfloat16(silu(gate)) * up), as int4_matmul.c rounds it */
static void silu_mul_row5(const uint16_t *in, int64_t k, uint16_t *out) {
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

static float group_sum5(const uint16_t *x, int64_t gs) {
    __m512 acc = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= gs; j += 16) acc = _mm512_add_ps(acc, bf16x16_to_f32(x + j));
    float sum = _mm512_reduce_add_ps(acc);
    for (; j < gs; j++) sum += bf16_to_f32(x[j]);
    return sum;
}

/* int5 W: contract and returns as int4_matmul_bf16's (n a multiple of 32, gs of 8 dividing k) */
static int int5_matmul(const Projection *w, const uint16_t *x, int64_t x_stride, int64_t m, int64_t k, uint16_t *y,
                       int64_t y_stride, float *residual, int64_t residual_stride, int32_t act, int32_t num_threads) {
    const int64_t n = w->n, gs = w->gs;
    if (w->w == NULL || w->hb == NULL || w->d == NULL) return -1;
    const int32_t bits = w->kind == 3 ? 6 : 5;
    if (n % 32 || gs <= 0 || gs % 8 || k % gs || w->scales < 0 || w->scales > 2 || (bits == 6 && w->scales == 0)) return -1;
    if (m == 0) return 0;
    const int64_t groups = k / gs;
    float *xsum = malloc(sizeof(float) * (size_t)(m * groups));
    uint16_t *xa = act ? malloc(sizeof(uint16_t) * (size_t)(m * k)) : NULL;
    if (xsum == NULL || (act && xa == NULL)) {
        free(xsum);
        free(xa);
        return -1;
    }
    const int64_t sums = w->scales == 0 ? m * groups : 0; /* the zero term's sums of x per group */
    const uint16_t *xin = act ? xa : x;
    const int64_t xin_stride = act ? k : x_stride;
    const Problem5 p = {xin, xin_stride, w->w, w->hb, w->d, w->scales, bits, xsum, n, k, gs, groups, y, y_stride, w->bias,
                        residual, residual_stride};
#pragma omp parallel num_threads(num_threads)
    {
        if (act) {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < m; r++) silu_mul_row5(x + r * x_stride, k, xa + r * k);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < sums; r++)
            xsum[r] = group_sum5(xin + (r / groups) * xin_stride + (r % groups) * gs, gs);
        if (m == 1) { /* a decode row: four blocks per tile, as int4_matmul.c */
            const int parts = omp_get_num_threads();
#pragma omp for schedule(static)
            for (int part = 0; part < parts; part++) {
                const int64_t pairs = n / 32, hi = pairs * (part + 1) / parts * 2;
                int64_t b = pairs * part / parts * 2;
                for (; b + 4 <= hi; b += 4) tile5(&p, 0, b, 1, 4);
                if (b < hi) tile5(&p, 0, b, 1, 2);
            }
        } else {
#pragma omp for schedule(static)
            for (int64_t u = 0; u < n / 32; u++) unit5(&p, m, 2 * u);
        }
    }
    free(xsum);
    free(xa);
    return 0;
}

/* per-group int8 W through int8_matmul_bf16, then the epilogues on its bfloat16 result */
static int int8_project(const Projection *w, const uint16_t *x, int64_t x_stride, int64_t m, int64_t k, uint16_t *y,
                        int64_t y_stride, float *residual, int64_t residual_stride, int32_t act, int32_t num_threads) {
    const int64_t n = w->n;
    if (m == 0) return 0;
    uint16_t *xa = act ? malloc(sizeof(uint16_t) * (size_t)(m * k)) : NULL;
    uint16_t *tmp = residual != NULL ? malloc(sizeof(uint16_t) * (size_t)(m * n)) : NULL;
    if ((act && xa == NULL) || (residual != NULL && tmp == NULL)) {
        free(xa);
        free(tmp);
        return -1;
    }
    if (act) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t r = 0; r < m; r++) silu_mul_row5(x + r * x_stride, k, xa + r * k);
    }
    uint16_t *out = residual != NULL ? tmp : y;
    const int64_t out_stride = residual != NULL ? n : y_stride;
    const Int8MatmulArgs a = {
        .x = act ? xa : x, .x_stride = act ? k : x_stride, .m = m, .w = (const int8_t *)w->w, .d = w->d, .n = n, .k = k,
        .group_size = w->gs, .y = out, .y_stride = out_stride, .num_threads = num_threads, .scales = w->scales,
    };
    int status = int8_matmul_bf16(&a);
    if (status == 0 && (w->bias != NULL || residual != NULL)) {
        for (int64_t r = 0; r < m; r++) {
            uint16_t *row = out + r * out_stride;
            for (int64_t c = 0; c < n; c++) {
                if (w->bias != NULL) row[c] = f32_to_bf16(bf16_to_f32(row[c]) + bf16_to_f32(w->bias[c]));
                if (residual != NULL) residual[r * residual_stride + c] += bf16_to_f32(row[c]);
            }
        }
    }
    free(xa);
    free(tmp);
    return status;
}

#endif

static int projection_matmul(const ProjectionMatmulArgs *a) {
    const Projection *w = a->p;
    if (w == NULL || a->m < 0 || a->k <= 0 || w->n <= 0 || a->num_threads <= 0 || (a->act != 0 && a->act != 1)) return -1;
    if (a->y == NULL && a->residual == NULL) return -1;
    if (w->kind == 0) {
        const Int4MatmulArgs i4 = {
            .x = a->x, .x_stride = a->x_stride, .m = a->m, .w = w->w, .sz = w->sz, .n = w->n, .k = a->k,
            .group_size = w->gs, .y = a->y, .y_stride = a->y_stride, .num_threads = a->num_threads, .bias = w->bias,
            .residual = a->residual, .residual_stride = a->residual_stride, .act = a->act, .scales = w->scales,
        };
        return int4_matmul_bf16(&i4);
    }
#if INT5_FAST
    if (w->kind == 1 || w->kind == 3)
        return int5_matmul(w, a->x, a->x_stride, a->m, a->k, a->y, a->y_stride, a->residual, a->residual_stride, a->act,
                           a->num_threads);
    if (w->kind == 2)
        return int8_project(w, a->x, a->x_stride, a->m, a->k, a->y, a->y_stride, a->residual, a->residual_stride, a->act,
                            a->num_threads);
    return -1;
#else
    return -2;
#endif
}

int projection_matmul_bf16(const ProjectionMatmulArgs *a) {
    if (a == NULL) return -1;
    return projection_matmul(a);
}
