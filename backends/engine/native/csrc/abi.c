/* The layout table of abi.h's structs, compiled from the same declarations the kernels use, so
 * native/abi.py can check its ctypes mirrors against this build field by field. */
#include <stddef.h>

#include "abi.h"

#define KIND(e) _Generic((e), float: 'f', int32_t: 'i', int64_t: 'i', Projection: 's', LoraTerm: 's', default: 'p')
#define ROW(T, f) {#T, #f, (int64_t)offsetof(T, f), (int64_t)sizeof(((T *)0)->f), KIND(((T *)0)->f)}
#define SIZE_ROW(T) {#T, NULL, 0, (int64_t)sizeof(T), 's'}
/* one level of indirection: the short names below expand before ROW stringifies them */
#define F(T, f) ROW(T, f)
#define SIZE(T) SIZE_ROW(T)

#define A PagedAttentionArgs
#define I4 Int4MatmulArgs
#define I8 Int8MatmulArgs
#define N RmsNormArgs
#define R RopeKvArgs
#define W LayerWeights
#define D DecodeLayersArgs
#define P ProjectionMatmulArgs
#define L LoraAddArgs

static const AbiField FIELDS[] = {
    SIZE(A), F(A, q), F(A, q_stride), F(A, k_cache), F(A, v_cache), F(A, tables), F(A, table_stride),
    F(A, q_starts), F(A, q_lens), F(A, seq_lens), F(A, num_blocks), F(A, num_seqs), F(A, num_heads),
    F(A, num_kv_heads), F(A, head_dim), F(A, block_size), F(A, scale), F(A, out), F(A, out_stride),
    F(A, num_threads),

    SIZE(I4), F(I4, x), F(I4, x_stride), F(I4, m), F(I4, w), F(I4, sz), F(I4, n), F(I4, k), F(I4, group_size),
    F(I4, y), F(I4, y_stride), F(I4, num_threads), F(I4, bias), F(I4, residual), F(I4, residual_stride),
    F(I4, act), F(I4, scales),

    SIZE(I8), F(I8, x), F(I8, x_stride), F(I8, m), F(I8, w), F(I8, d), F(I8, n), F(I8, k), F(I8, group_size),
    F(I8, y), F(I8, y_stride), F(I8, num_threads), F(I8, scales),

    SIZE(N), F(N, x), F(N, x_stride), F(N, m), F(N, d), F(N, w), F(N, eps), F(N, out), F(N, out_stride),
    F(N, num_threads),

    SIZE(R), F(R, qkv), F(R, qkv_stride), F(R, t), F(R, num_heads), F(R, num_kv_heads), F(R, head_dim),
    F(R, cos), F(R, sin), F(R, cs_stride), F(R, slots), F(R, k_cache), F(R, v_cache), F(R, num_slots),
    F(R, num_threads),

    SIZE(Projection), F(Projection, w), F(Projection, sz), F(Projection, bias), F(Projection, n),
    F(Projection, gs), F(Projection, hb), F(Projection, d), F(Projection, kind), F(Projection, scales),

    SIZE(P), F(P, p), F(P, x), F(P, x_stride), F(P, m), F(P, k), F(P, y), F(P, y_stride), F(P, residual),
    F(P, residual_stride), F(P, act), F(P, num_threads),

    SIZE(LoraTerm), F(LoraTerm, a), F(LoraTerm, bt), F(LoraTerm, start), F(LoraTerm, count),

    SIZE(L), F(L, term), F(L, x), F(L, x_stride), F(L, t), F(L, k), F(L, gated), F(L, y), F(L, y_stride),
    F(L, residual), F(L, residual_stride), F(L, n), F(L, num_threads),

    SIZE(W), F(W, attn_norm), F(W, ffn_norm), F(W, qkv), F(W, o), F(W, gate_up), F(W, down), F(W, k_cache),
    F(W, v_cache), F(W, lora_qkv), F(W, lora_o), F(W, lora_gate_up), F(W, lora_down),

    SIZE(D), F(D, layers), F(D, num_layers), F(D, h), F(D, t), F(D, hidden), F(D, heads), F(D, kv_heads),
    F(D, head_dim), F(D, intermediate), F(D, eps), F(D, scale), F(D, cos), F(D, sin), F(D, slots),
    F(D, num_slots), F(D, tables), F(D, table_stride), F(D, seq_lens), F(D, num_blocks), F(D, block_size),
    F(D, x), F(D, qkv), F(D, attn), F(D, gate_up), F(D, num_threads),

    {NULL, NULL, 0, 0, 0},
};

const AbiField *taxiway_abi_fields(void) { return FIELDS; }
