"""The GPU path's Triton kernels; ``kernels.GpuKernels`` launches them and ``reference`` holds the
torch definition of each. Imported only where Triton is installed (``kernels.HAVE_TRITON``)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def add_rms_norm_kernel(x_ptr, x_stride, res_ptr, res_stride, w_ptr, out_ptr, out_stride, dim, eps,
                         HAS_X: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_X:
        r += tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(res_ptr + row * res_stride + cols, r, mask=mask)
    inv = tl.rsqrt(tl.sum(r * r, axis=0) / dim + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (r * inv * w).to(out_ptr.dtype.element_ty), mask=mask)

@triton.jit
def rope_write_kv_kernel(qkv_ptr, qkv_stride, pos_ptr, cos_sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                          slot_ptr, k_out_ptr, NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr,
                          HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                          HAS_K_OUT: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    half = HALF
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < half
    src = qkv_ptr + t * qkv_stride + h * HEAD_DIM
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + offs, mask=mask, other=0.0).to(tl.float32)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if h < NUM_HEADS + NUM_KV:
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * HEAD_DIM + offs, mask=mask, other=0.0)
        sin = tl.load(cos_sin_ptr + pos * HEAD_DIM + half + offs, mask=mask, other=0.0)
        o1 = (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty)
        o2 = (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty)
        if h < NUM_HEADS:
            dst = q_ptr + (t * NUM_HEADS + h) * HEAD_DIM
            tl.store(dst + offs, o1, mask=mask)
            tl.store(dst + half + offs, o2, mask=mask)
        else:
            dst = k_cache_ptr + (slot * NUM_KV + (h - NUM_HEADS)) * HEAD_DIM
            tl.store(dst + offs, o1, mask=mask)
            tl.store(dst + half + offs, o2, mask=mask)
            if HAS_K_OUT:
                kdst = k_out_ptr + (t * NUM_KV + (h - NUM_HEADS)) * HEAD_DIM
                tl.store(kdst + offs, o1, mask=mask)
                tl.store(kdst + half + offs, o2, mask=mask)
    else:
        dst = v_cache_ptr + (slot * NUM_KV + (h - NUM_HEADS - NUM_KV)) * HEAD_DIM
        tl.store(dst + offs, x1.to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half + offs, x2.to(v_cache_ptr.dtype.element_ty), mask=mask)

@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, table_stride, lens_ptr, scale,
                             part_ml_ptr, part_acc_ptr, out_ptr,
                             NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, GROUP: tl.constexpr,
                             GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SPLITS: tl.constexpr):  # fmt: skip
    s = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    heads = kvh * GROUP + g  # the query heads of this KV head
    q = tl.load(q_ptr + (s * NUM_HEADS + heads)[:, None] * HEAD_DIM + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale  # fmt: skip
    seq_len = tl.load(lens_ptr + s).to(tl.int32)
    m = tl.zeros([GROUP_PAD], dtype=tl.float32) - float("inf")
    denom = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    num_tiles = tl.cdiv(seq_len, TILE)
    for tile in range(split, num_tiles, SPLITS):
        toks = tile * TILE + tl.arange(0, TILE)
        tmask = toks < seq_len
        blocks = tl.load(tables_ptr + s * table_stride + toks // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
        rows = (blocks * BLOCK_SIZE + toks % BLOCK_SIZE) * NUM_KV + kvh
        kv_off = rows[:, None] * HEAD_DIM + d[None, :]
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)  # [TILE, D]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, TILE]
        scores = tl.where(tmask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        denom = denom * alpha + tl.sum(p, axis=1)
        m = m_new
    if SPLITS == 1:
        o = acc / denom[:, None]
        tl.store(out_ptr + (s * NUM_HEADS + heads)[:, None] * HEAD_DIM + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])  # fmt: skip
    else:
        part = (s * NUM_HEADS + heads) * SPLITS + split  # [G]
        tl.store(part_ml_ptr + part * 2, m, mask=gmask)
        tl.store(part_ml_ptr + part * 2 + 1, denom, mask=gmask)
        tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc, mask=gmask[:, None] & dmask[None, :])

@triton.jit
def merge_splits_kernel(part_ml_ptr, part_acc_ptr, out_ptr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):  # fmt: skip
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    part = (s * NUM_HEADS + h) * SPLITS + sp
    m = tl.load(part_ml_ptr + part * 2)
    denom = tl.load(part_ml_ptr + part * 2 + 1)
    top = tl.max(m, axis=0)
    w = tl.where(denom > 0, tl.exp(m - top), 0.0)  # a split with no tokens has m = -inf, denom = 0
    acc = tl.load(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], mask=dmask[None, :], other=0.0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.sum(denom * w, axis=0)
    tl.store(out_ptr + (s * NUM_HEADS + h) * HEAD_DIM + d, o.to(out_ptr.dtype.element_ty), mask=dmask)

@triton.jit
def silu_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, inter, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + t * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + t * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def int8_matmul_kernel(x_ptr, x_stride, q_ptr, s_ptr, y_ptr, y_stride, m, n, k, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask, mmask = rn < n, rm < m
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < k
        # TF32 holds bfloat16 and float16 activations and int8 codes exactly: its tensor-core
        # products are exact for them (float32 activations take IEEE products instead)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * x_stride + rk[None, :],
                    mask=mmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        w = tl.load(q_ptr + rn[None, :].to(tl.int64) * k + rk[:, None], mask=nmask[None, :] & kmask[:, None],
                    other=0).to(tl.float32)  # fmt: skip
        acc += tl.dot(x, w, input_precision=PRECISION)
    s = tl.load(s_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * y_stride + rn[None, :],
             (acc * s[None, :]).to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])  # fmt: skip


@triton.jit
def int4_matmul_kernel(x_ptr, x_stride, w_ptr, sz_ptr, y_ptr, y_stride, m, n, k, group_size,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILE_K: tl.constexpr,
                        PRECISION: tl.constexpr):  # fmt: skip
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask, mmask = rn < n, rm < m
    half = tl.arange(0, TILE_K // 2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * x_stride
    for k0 in range(0, k, TILE_K):
        lo_cols = k0 + half  # this tile's first half; the high nibbles hold the second
        b = tl.load(w_ptr + rn[None, :].to(tl.int64) * (k // 2) + (k0 // 2 + half)[:, None],
                    mask=nmask[None, :], other=0)  # [TILE_K / 2, BLOCK_N] bytes  # fmt: skip
        for part in tl.static_range(2):
            cols = lo_cols + part * (TILE_K // 2)
            q = ((b >> (4 * part)) & 15).to(tl.float32)
            group = (cols // group_size)[:, None].to(tl.int64) * n + rn[None, :]  # [TILE_K / 2, BLOCK_N]
            scale = tl.load(sz_ptr + group * 2, mask=nmask[None, :], other=0.0).to(tl.float32)
            zero = tl.load(sz_ptr + group * 2 + 1, mask=nmask[None, :], other=0.0).to(tl.float32)
            x = tl.load(x_rows + cols[None, :], mask=mmask[:, None], other=0.0).to(tl.float32)
            acc += tl.dot(x, (q - 8.0) * scale + zero, input_precision=PRECISION)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * y_stride + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])  # fmt: skip
