/* The small per-layer operations of the bfloat16 forward, fused so that a decoder layer is a few
 * calls instead of ~30 torch ops (each ~3-7 us of dispatch at one token, more than the work).
 * Each computes what the torch path (model/llama.py) computes, rounding where it rounds.
 *
 * rms_norm_bf16: out = bfloat16(x * rsqrt(mean(x^2) + eps) * w), x float32 (the residual stream).
 * rope_kv_bf16:  rotary embedding of q and k in place in the fused qkv rows,
 *                x * cos + rotate_half(x) * sin (sin's first half negated by the caller), each
 *                product rounded as the torch path rounds it; then k and v written to the paged
 *                cache at each token's slot.
 * lora_add_bf16: one projection's LoRA terms, each row's summed in one fixed order (lora_add,
 *                which decode_layers_bf16 calls inside the one-call decode step too).
 */
#include <math.h>
#include <stdlib.h>

#include "abi.h"
#include "simd.h"

#ifdef __AVX512F__
#define FUSED_VECTOR 1
#else
#define FUSED_VECTOR 0
#endif

static void norm_row(const float *x, int64_t d, const float *w, float eps, uint16_t *out) {
    int64_t j = 0;
    float ss = 0.0f;
#if FUSED_VECTOR
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= d; j += 16) {
        const __m512 v = _mm512_loadu_ps(x + j);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    ss = _mm512_reduce_add_ps(acc);
#endif
    for (; j < d; j++) ss += x[j] * x[j];
    const float rstd = 1.0f / sqrtf(ss / (float)d + eps);
    j = 0;
#if FUSED_VECTOR
    const __m512 r = _mm512_set1_ps(rstd);
    for (; j + 16 <= d; j += 16)
        _mm256_storeu_si256((__m256i *)(out + j),
                            f32x16_to_bf16(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), r), _mm512_loadu_ps(w + j))));
#endif
    for (; j < d; j++) out[j] = f32_to_bf16(x[j] * rstd * w[j]);
}

static int rms_norm(
    const float *x, int64_t x_stride, int64_t m, int64_t d, const float *w, float eps,
    uint16_t *out, int64_t out_stride, int32_t num_threads)
{
    if (m < 0 || d <= 0 || num_threads <= 0) return -1;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (m >= 8)
    for (int64_t r = 0; r < m; r++) norm_row(x + r * x_stride, d, w, eps, out + r * out_stride);
    return 0;
}

/* one head of head_dim values in place: x = bf16(bf16(x * cos) + roll(x, D/2) * sin) */
static void rope_head(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int d) {
    float v[512];
    load_row(v, x, d);
    const int half = d / 2;
    int j = 0;
#if FUSED_VECTOR
    if (half % 16 == 0)
        for (; j < d; j += 16) {
            const int partner = j < half ? j + half : j - half;
            const __m512 a = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(f32x16_to_bf16(_mm512_mul_ps(_mm512_loadu_ps(v + j), bf16x16_to_f32(cos + j)))), 16));
            const __m512 b = _mm512_mul_ps(_mm512_loadu_ps(v + partner), bf16x16_to_f32(sin + j));
            _mm256_storeu_si256((__m256i *)(x + j), f32x16_to_bf16(_mm512_add_ps(a, b)));
        }
#endif
    for (; j < d; j++) {
        const float a = bf16_to_f32(f32_to_bf16(v[j] * bf16_to_f32(cos[j])));
        x[j] = f32_to_bf16(a + v[j < half ? j + half : j - half] * bf16_to_f32(sin[j]));
    }
}

/* qkv: bfloat16 [t, (H + 2 KV) * D] (row stride qkv_stride): q heads, k heads, v heads.
 * cos/sin: bfloat16 [t, D] (row stride cs_stride). slots: int64 [t] cache slots, or NULL to
 * skip the cache write; k_cache/v_cache: bfloat16 [num_slots, KV, D].
 * Returns 0, or -1 (nothing written) for a bad shape or a slot outside [0, num_slots). */
static int rope_kv(
    uint16_t *qkv, int64_t qkv_stride, int64_t t, int32_t num_heads, int32_t num_kv_heads, int32_t head_dim,
    const uint16_t *cos, const uint16_t *sin, int64_t cs_stride,
    const int64_t *slots, uint16_t *k_cache, uint16_t *v_cache, int64_t num_slots, int32_t num_threads)
{
    if (t < 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || head_dim > 512 || head_dim % 2 || num_threads <= 0)
        return -1;
    if (slots != NULL)
        for (int64_t r = 0; r < t; r++)
            if (slots[r] < 0 || slots[r] >= num_slots) return -1;
    const int rotated = num_heads + num_kv_heads;
    const int64_t kv_width = (int64_t)num_kv_heads * head_dim;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (t >= 8)
    for (int64_t r = 0; r < t; r++) {
        uint16_t *row = qkv + r * qkv_stride;
        for (int h = 0; h < rotated; h++) rope_head(row + (int64_t)h * head_dim, cos + r * cs_stride, sin + r * cs_stride, head_dim);
        if (slots != NULL) {
            memcpy(k_cache + slots[r] * kv_width, row + (int64_t)num_heads * head_dim, sizeof(uint16_t) * (size_t)kv_width);
            memcpy(v_cache + slots[r] * kv_width, row + (int64_t)rotated * head_dim, sizeof(uint16_t) * (size_t)kv_width);
        }
    }
    return 0;
}

int rms_norm_bf16(const RmsNormArgs *a) {
    if (a == NULL) return -1;
    return rms_norm(a->x, a->x_stride, a->m, a->d, a->w, a->eps, a->out, a->out_stride, a->num_threads);
}

int rope_kv_bf16(const RopeKvArgs *a) {
    if (a == NULL) return -1;
    return rope_kv(a->qkv, a->qkv_stride, a->t, a->num_heads, a->num_kv_heads, a->head_dim, a->cos, a->sin,
                   a->cs_stride, a->slots, a->k_cache, a->v_cache, a->num_slots, a->num_threads);
}

/* ---- a whole decode step's layers in one call ------------------------------------------------ */

/* y (or, with residual, residual +=) = x[t, k] @ p^T, for any kind of p (projection_matmul.c) */
static int project(const Projection *p, const uint16_t *x, int64_t x_stride, int64_t t, int64_t k, uint16_t *y,
                   float *residual, int32_t act, int32_t num_threads) {
    const ProjectionMatmulArgs a = {
        .p = p, .x = x, .x_stride = x_stride, .m = t, .k = k, .y = y, .y_stride = p->n, .residual = residual,
        .residual_stride = p->n, .act = act, .num_threads = num_threads,
    };
    return projection_matmul_bf16(&a);
}

/* A LoRA term for each row with an adapter (LoraTerm): d = x[i] . a[c] over its columns c, then
 * out[i] += d @ bt[c], in float32. The output is either bfloat16 rows y (rounded once, after the
 * sum) or the float32 residual res. For the down projection (gated) the input is silu(gate) * up
 * of the bfloat16 gate_up rows, each rounded to bfloat16 as torch rounds them; x is then gate_up
 * and in the intermediate size.
 *
 * Every float a row gets is summed in one fixed order, whatever the other rows of the step: the
 * dot products as 2 x 16 lanes over k then the lanes in order, the terms over c in order. So a
 * prompt's rows get the same term in a long prefill, in a short one after a prefix-cache hit,
 * beside other adapters' rows and in the one-call decode step; torch's matmuls, whose order
 * follows the shape, moved a greedy answer of the trained adapter after a prefix-cache hit. */
typedef float f32x16 __attribute__((vector_size(64)));

static inline f32x16 load16(const float *p) {
    f32x16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* d[j] = x . a[j] for four columns (the same arithmetic for each: one column is a repeated one) */
static inline void dot4(const float *x, const float *const a[4], int64_t n, float d[4]) {
    f32x16 s[4][2] = {{{0}}};
    int64_t k = 0;
    for (; k + 32 <= n; k += 32) {
        const f32x16 x0 = load16(x + k), x1 = load16(x + k + 16);
        for (int j = 0; j < 4; j++) {
            s[j][0] += x0 * load16(a[j] + k);
            s[j][1] += x1 * load16(a[j] + k + 16);
        }
    }
    if (k + 16 <= n) {
        const f32x16 x0 = load16(x + k);
        for (int j = 0; j < 4; j++) s[j][0] += x0 * load16(a[j] + k);
        k += 16;
    }
    for (int j = 0; j < 4; j++) {
        const f32x16 v = s[j][0] + s[j][1];
        float sum = 0.0f;
        for (int l = 0; l < 16; l++) sum += v[l];
        for (int64_t r = k; r < n; r++) sum += x[r] * a[j][r];
        d[j] = sum;
    }
}

static int lora_add(const LoraTerm *l, const uint16_t *x, int64_t x_stride, int64_t t, int64_t in, int gated,
                    uint16_t *y, int64_t y_stride, float *res, int64_t res_stride, int64_t out, int32_t num_threads) {
    if (l->a == NULL) return 0;
    int32_t most = 0; /* the most columns of a row */
    for (int64_t i = 0; i < t; i++) most = l->count[i] > most ? l->count[i] : most;
    if (most == 0) return 0;
    int failed = 0;
#pragma omp parallel num_threads(num_threads) if (t >= 2)
    {
        float *xf = malloc(sizeof(float) * (size_t)in);
        float *acc = malloc(sizeof(float) * (size_t)out);
        float *d = malloc(sizeof(float) * ((size_t)most + 3));
        if (xf == NULL || acc == NULL || d == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < t; i++) {
                const int32_t c0 = l->start[i], nc = l->count[i];
                if (nc <= 0) continue;
                const uint16_t *xi = x + i * x_stride;
                if (gated) {
                    for (int64_t k = 0; k < in; k++) {
                        const float g = bf16_to_f32(xi[k]);
                        const float silu = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g))));
                        xf[k] = bf16_to_f32(f32_to_bf16(silu * bf16_to_f32(xi[in + k])));
                    }
                } else {
                    load_row(xf, xi, (int)in);
                }
                for (int32_t r = 0; r < nc; r += 4) {
                    const float *cols[4];
                    for (int j = 0; j < 4; j++) cols[j] = l->a + (int64_t)(c0 + (r + j < nc ? r + j : r)) * in;
                    dot4(xf, cols, in, d + r);
                }
                int64_t j = 0;
                for (; j + 64 <= out; j += 64) { /* 4 vectors of the row's sum at a time, over c in order */
                    f32x16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
                    for (int32_t r = 0; r < nc; r++) {
                        const float *br = l->bt + (int64_t)(c0 + r) * out + j;
                        const float dr = d[r];
                        s0 += dr * load16(br);
                        s1 += dr * load16(br + 16);
                        s2 += dr * load16(br + 32);
                        s3 += dr * load16(br + 48);
                    }
                    memcpy(acc + j, &s0, 64);
                    memcpy(acc + j + 16, &s1, 64);
                    memcpy(acc + j + 32, &s2, 64);
                    memcpy(acc + j + 48, &s3, 64);
                }
                for (; j + 16 <= out; j += 16) {
                    f32x16 s0 = {0};
                    for (int32_t r = 0; r < nc; r++) s0 += d[r] * load16(l->bt + (int64_t)(c0 + r) * out + j);
                    memcpy(acc + j, &s0, 64);
                }
                for (; j < out; j++) {
                    float s0 = 0.0f;
                    for (int32_t r = 0; r < nc; r++) s0 += d[r] * l->bt[(int64_t)(c0 + r) * out + j];
                    acc[j] = s0;
                }
                if (res != NULL) {
                    float *ri = res + i * res_stride;
                    for (int64_t k = 0; k < out; k++) ri[k] += acc[k];
                } else {
                    uint16_t *yi = y + i * y_stride;
                    for (int64_t k = 0; k < out; k++) yi[k] = f32_to_bf16(bf16_to_f32(yi[k]) + acc[k]);
                }
            }
        }
        free(xf);
        free(acc);
        free(d);
    }
    return failed ? -1 : 0;
}

int lora_add_bf16(const LoraAddArgs *a) {
    if (a->t < 0 || a->k <= 0 || a->n <= 0 || a->num_threads <= 0 || a->x == NULL) return -1;
    if ((a->y == NULL) == (a->residual == NULL) || a->term.a == NULL || a->term.bt == NULL) return -1;
    if (a->term.start == NULL || a->term.count == NULL) return -1;
    return lora_add(&a->term, a->x, a->x_stride, a->t, a->k, a->gated != 0, a->y, a->y_stride, a->residual,
                    a->residual_stride, a->n, a->num_threads);
}

/* The decoder layers of a step whose t rows are all decodes (one new token per sequence), in
 * order, exactly as native/fused.py's FusedLayer runs them one call at a time: the residual stream h
 * (float32 [t, hidden], contiguous) is updated in place. Scratch: x [t, hidden], qkv [t, qkv.n],
 * attn [t, heads * head_dim], gate_up [t, gate_up.n], all bfloat16. o and down are unpadded
 * (n = hidden, the residual's row stride). Returns 0; -1 before touching anything for a shape
 * the attention kernel refuses; or 1 + the index of the layer where a kernel refused, right
 * after that kernel (the step is then lost: earlier layers have updated h and the caches). */
static int decode_layers(
    const LayerWeights *layers, int32_t num_layers, float *h, int64_t t, int64_t hidden,
    int32_t heads, int32_t kv_heads, int32_t head_dim, int64_t intermediate, float eps, float scale,
    const uint16_t *cos, const uint16_t *sin, const int64_t *slots, int64_t num_slots,
    const int32_t *tables, int64_t table_stride, const int32_t *seq_lens, int32_t num_blocks, int32_t block_size,
    uint16_t *x, uint16_t *qkv, uint16_t *attn, uint16_t *gate_up, int32_t num_threads)
{
    const int64_t q_width = (int64_t)heads * head_dim;
    if (heads <= 0 || kv_heads <= 0 || heads % kv_heads || heads / kv_heads > 16 || head_dim <= 0 || head_dim > 256 ||
        head_dim % 2 || t <= 0)
        return -1; /* decode_attention_bf16's limits, checked before anything is written */
    for (int32_t l = 0; l < num_layers; l++) {
        const LayerWeights *w = layers + l;
        const PagedAttentionArgs attend = {
            .q = qkv, .q_stride = w->qkv.n, .k_cache = w->k_cache, .v_cache = w->v_cache, .tables = tables,
            .table_stride = table_stride, .seq_lens = seq_lens, .num_blocks = num_blocks, .num_seqs = (int32_t)t,
            .num_heads = heads, .num_kv_heads = kv_heads, .head_dim = head_dim, .block_size = block_size,
            .scale = scale, .out = attn, .out_stride = q_width, .num_threads = num_threads,
        };
#define STEP(call) \
    if ((call) != 0) return 1 + l
        STEP(rms_norm(h, hidden, t, hidden, w->attn_norm, eps, x, hidden, num_threads));
        STEP(project(&w->qkv, x, hidden, t, hidden, qkv, NULL, 0, num_threads));
        STEP(lora_add(&w->lora_qkv, x, hidden, t, hidden, 0, qkv, w->qkv.n, NULL, 0, q_width + 2 * (int64_t)kv_heads * head_dim,
                      num_threads));
        STEP(rope_kv(qkv, w->qkv.n, t, heads, kv_heads, head_dim, cos, sin, head_dim, slots, w->k_cache, w->v_cache,
                     num_slots, num_threads));
        STEP(decode_attention_bf16(&attend));
        STEP(project(&w->o, attn, q_width, t, q_width, NULL, h, 0, num_threads));
        STEP(lora_add(&w->lora_o, attn, q_width, t, q_width, 0, NULL, 0, h, hidden, hidden, num_threads));
        STEP(rms_norm(h, hidden, t, hidden, w->ffn_norm, eps, x, hidden, num_threads));
        STEP(project(&w->gate_up, x, hidden, t, hidden, gate_up, NULL, 0, num_threads));
        STEP(lora_add(&w->lora_gate_up, x, hidden, t, hidden, 0, gate_up, w->gate_up.n, NULL, 0, 2 * intermediate,
                      num_threads));
        STEP(project(&w->down, gate_up, w->gate_up.n, t, intermediate, NULL, h, 1, num_threads));
        /* the down term reads silu(gate) * up from the gate_up rows (the matmul left them as they were) */
        STEP(lora_add(&w->lora_down, gate_up, w->gate_up.n, t, intermediate, 1, NULL, 0, h, hidden, hidden,
                      num_threads));
#undef STEP
    }
    return 0;
}

int decode_layers_bf16(const DecodeLayersArgs *a) {
    if (a == NULL) return -1;
    return decode_layers(a->layers, a->num_layers, a->h, a->t, a->hidden, a->heads, a->kv_heads, a->head_dim,
                         a->intermediate, a->eps, a->scale, a->cos, a->sin, a->slots, a->num_slots, a->tables,
                         a->table_stride, a->seq_lens, a->num_blocks, a->block_size, a->x, a->qkv, a->attn,
                         a->gate_up, a->num_threads);
}
