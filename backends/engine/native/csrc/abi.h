/* The kernels' one ABI: every entry point takes a pointer to one of the structs below and returns
 * an int status (0: done; negative: refused, see each kernel). native/abi.py mirrors each struct
 * field by field as a ctypes.Structure; taxiway_abi_fields() describes every field (offset, size,
 * kind) so that the Python side compares the two when the library loads and refuses a mismatch
 * by name (struct and field) instead of passing arguments that land in the wrong place.
 *
 * Tensors are raw data pointers (bfloat16 stored as uint16); strides are in elements.
 */
#ifndef TAXIWAY_ABI_H
#define TAXIWAY_ABI_H

#include <stdint.h>

/* decode_attention_bf16 (decode_attention.c): one query row per sequence, row s of q for
 * sequence s (q_starts and q_lens unused); prefill_attention_bf16 (prefill_attention.c): causal
 * attention of q_lens[s] rows from row q_starts[s], the last positions of sequence s. */
typedef struct {
    const uint16_t *q;               /* [T, H, D], row stride q_stride */
    int64_t q_stride;
    const uint16_t *k_cache;         /* [num_blocks, block_size, KV, D] */
    const uint16_t *v_cache;
    const int32_t *tables;           /* [S, table_stride] block ids */
    int64_t table_stride;
    const int32_t *q_starts, *q_lens; /* [S] each (prefill) */
    const int32_t *seq_lens;         /* [S] keys per sequence after this step */
    int32_t num_blocks, num_seqs, num_heads, num_kv_heads, head_dim, block_size;
    float scale;
    uint16_t *out;                   /* [T, H * D], row stride out_stride */
    int64_t out_stride;
    int32_t num_threads;
} PagedAttentionArgs;

/* int4_matmul_bf16: y (or residual +=) = x @ W.T for native-layout int4 W (int4_matmul.c) */
typedef struct {
    const uint16_t *x;               /* [m, k] (act = 1: [m, 2k], gate | up), row stride x_stride */
    int64_t x_stride, m;
    const uint8_t *w;                /* the native layout for [n, k] */
    const uint16_t *sz;              /* scales: 0 bfloat16 [k / group_size, n, 2] (scale, zero); */
    int64_t n, k, group_size;        /*   2 float16 [k / group_size, n] scales, no zeros; 3 float16 */
                                     /*   [k / group_size, n / 16, 2, 16]: 16 rows' d then their m, */
                                     /*   W = d q + m (q in 0..15) */
    uint16_t *y;                     /* [m, n], row stride y_stride; unused with residual */
    int64_t y_stride;
    int32_t num_threads;
    const uint16_t *bias;            /* [n] or NULL */
    float *residual;                 /* float32 [m, n], row stride residual_stride, or NULL */
    int64_t residual_stride;
    int32_t act;                     /* 1: x is gate | up, multiplied as silu(gate) * up first */
    int32_t scales;                  /* the format of sz: 0, 2 or 3 */
} Int4MatmulArgs;

/* int8_matmul_bf16: y = x @ W.T for native-layout per-group int8 W (int8_matmul.c) */
typedef struct {
    const uint16_t *x;               /* [m, k], row stride x_stride */
    int64_t x_stride, m;
    const int8_t *w;                 /* the native layout for [n, k] */
    const float *d;                  /* [k / group_size, n]: float32, or float16 (scales = 2) */
    int64_t n, k, group_size;
    uint16_t *y;                     /* [m, n], row stride y_stride */
    int64_t y_stride;
    int32_t num_threads;
    int32_t scales;                  /* the format of d: 0 float32, 2 float16 */
} Int8MatmulArgs;

/* rms_norm_bf16: out = bfloat16(x * rsqrt(mean(x^2) + eps) * w), x float32 (fused_ops.c) */
typedef struct {
    const float *x;                  /* [m, d], row stride x_stride */
    int64_t x_stride, m, d;
    const float *w;                  /* [d] */
    float eps;
    uint16_t *out;                   /* [m, d], row stride out_stride */
    int64_t out_stride;
    int32_t num_threads;
} RmsNormArgs;

/* rope_kv_bf16: rotary on q and k in place in the qkv rows, then k and v to the cache (fused_ops.c) */
typedef struct {
    uint16_t *qkv;                   /* [t, (H + 2 KV) * D], row stride qkv_stride */
    int64_t qkv_stride, t;
    int32_t num_heads, num_kv_heads, head_dim;
    const uint16_t *cos, *sin;       /* [t, D], row stride cs_stride */
    int64_t cs_stride;
    const int64_t *slots;            /* [t] cache slots, or NULL: no cache write */
    uint16_t *k_cache, *v_cache;     /* [num_slots, KV, D] */
    int64_t num_slots;
    int32_t num_threads;
} RopeKvArgs;

/* One native-layout projection: packed weight w, bias padded to n or NULL, padded output width n,
 * group size gs, and by kind: 0 int4 (sz as `scales` says: 0 bfloat16 (scale, zero) pairs,
 * 2 float16 scales without zeros, 3 float16 d and m by blocks of 16 rows; int4_matmul.c), 1 int5
 * (hb the fifth bits, d its scales as `scales` says, projection_matmul.c), 2 per-group int8 (d
 * [G, n], int8_matmul.c's layout: float32, or float16 where `scales` is 2). int5's scales: 0 float32 [G, 2, n] scales then zeros,
 * 1 float32 [G, n] scales (no zeros), 2 float16 [G, n] scales (no zeros; d points at them).
 * 3 int6: as int5 with two masks per nibble position in hb (projection_matmul.c), scales 1 or 2. */
typedef struct {
    const uint8_t *w;
    const uint16_t *sz, *bias;
    int64_t n, gs;
    const uint8_t *hb;
    const float *d;
    int32_t kind;
    int32_t scales;
} Projection;

/* projection_matmul_bf16: y (or residual +=) = x @ W.T for a Projection of any kind, with
 * int4_matmul_bf16's epilogues (projection_matmul.c) */
typedef struct {
    const Projection *p;
    const uint16_t *x;               /* [m, k] (act = 1: [m, 2k], gate | up), row stride x_stride */
    int64_t x_stride, m, k;
    uint16_t *y;                     /* [m, p->n], row stride y_stride; unused with residual */
    int64_t y_stride;
    float *residual;                 /* float32 [m, p->n], row stride residual_stride, or NULL */
    int64_t residual_stride;
    int32_t act, num_threads;
} ProjectionMatmulArgs;

/* The LoRA term of one fused projection in one layer: the resident adapters' weights stacked
 * along the rank, a [K, in] and bt [K, out] float32 (bt: B transposed and scaled), and per row
 * of the step the columns of its adapter, [start, start + count) (count 0: a base row).
 * a NULL: no adapter of the step adapts this projection. */
typedef struct {
    const float *a, *bt;
    const int32_t *start, *count;
} LoraTerm;

/* lora_add_bf16: one projection's LoRA terms for t rows (fused_ops.c): y[i] (bfloat16, rounded
 * once) or residual[i] (float32) += (x[i] . a[c]) @ bt[c] over row i's columns c; x [t, k]
 * bfloat16 (row stride x_stride), y [t, n]; gated: x is gate | up rows, [t, 2k], and the input
 * silu(gate) * up. Each row's result is the same whatever the other rows (the decode step
 * calls it too). */
typedef struct {
    LoraTerm term;
    const uint16_t *x;
    int64_t x_stride, t, k;
    int32_t gated;
    uint16_t *y;                     /* [t, n], row stride y_stride; unused with residual */
    int64_t y_stride;
    float *residual;                 /* float32 [t, n], row stride residual_stride, or NULL */
    int64_t residual_stride, n;
    int32_t num_threads;
} LoraAddArgs;

/* One decoder layer's weights and cache, as decode_layers_bf16 reads them. */
typedef struct {
    const float *attn_norm, *ffn_norm;
    Projection qkv, o, gate_up, down;
    uint16_t *k_cache, *v_cache;
    LoraTerm lora_qkv, lora_o, lora_gate_up, lora_down;
} LayerWeights;

/* decode_layers_bf16: every decoder layer of a decode-only step in one call (fused_ops.c) */
typedef struct {
    const LayerWeights *layers;
    int32_t num_layers;
    float *h;                        /* float32 [t, hidden] residual stream, contiguous */
    int64_t t, hidden;
    int32_t heads, kv_heads, head_dim;
    int64_t intermediate;
    float eps, scale;
    const uint16_t *cos, *sin;       /* [t, head_dim] */
    const int64_t *slots;            /* [t] */
    int64_t num_slots;
    const int32_t *tables;           /* [t, table_stride] */
    int64_t table_stride;
    const int32_t *seq_lens;         /* [t] */
    int32_t num_blocks, block_size;
    uint16_t *x, *qkv, *attn, *gate_up; /* bfloat16 scratch: [t, hidden], [t, qkv.n], [t, H * D], [t, gate_up.n] */
    int32_t num_threads;
} DecodeLayersArgs;

/* One row of the layout table: a field of a struct, or (field NULL) the struct's own size. */
typedef struct {
    const char *type, *field;
    int64_t offset, size;
    char kind; /* 'p' pointer, 'i' integer, 'f' float, 's' struct */
} AbiField;

/* The layout of every struct above, ending with a row whose type is NULL (abi.c). */
const AbiField *taxiway_abi_fields(void);

int decode_attention_bf16(const PagedAttentionArgs *a);
int prefill_attention_bf16(const PagedAttentionArgs *a);
int int4_matmul_bf16(const Int4MatmulArgs *a);
int int8_matmul_bf16(const Int8MatmulArgs *a);
int rms_norm_bf16(const RmsNormArgs *a);
int rope_kv_bf16(const RopeKvArgs *a);
int decode_layers_bf16(const DecodeLayersArgs *a);
int projection_matmul_bf16(const ProjectionMatmulArgs *a);
int lora_add_bf16(const LoraAddArgs *a);

#endif
