"""The GPU decode path's fused kernels (Triton), each beside the torch ops that define it.

A decode step of a small model on a GPU is launch-bound: SmolLM2-135M's weights are read in tens of
microseconds, while torch's ops spend ~450 launches on it (issue 18's profile). These kernels
fold each layer's elementwise work into four launches, and run the one weight format torch has no
CUDA kernel for:

- ``add_rms_norm``: ``residual += x`` then ``RMSNorm(residual) * w``, one row per program;
- ``rope_write_kv``: rotary on q and k, q into its buffer, k and v into the paged cache at their
  slots, one (token, head) per program;
- ``decode_attention``: one query token per sequence against its paged K/V, the query heads of a
  KV head together, the context split over ``splits`` programs (flash-decoding) and merged by a
  second small kernel when ``splits > 1``;
- ``silu_mul``: ``silu(gate) * up`` of the fused gate|up projection;
- ``int8_matmul``: ``x @ (q * s).T`` for per-channel int8 weights (the int4 policy's vocabulary
  head), read as int8 and accumulated in float32: torch has no CUDA kernel for this format, and
  without one the head was dequantised to float32 in 8192-row chunks on every step;
- ``int4_matmul``: groupwise int4 ``x @ ((q - 8) * scale + zero).T`` from our own packing
  (``pack_int4``), the alternative to torch's int4 kernel (``_weight_int4pack_mm``) that
  ``GpuCausalLM(int4_kernel="triton")`` runs, so that a device run can choose between them by
  measurement (``taxiway bench gpu --int4-kernels``).

``GpuKernels(use_triton=False)`` runs the torch definitions (any device): the reference the
Triton kernels are tested against (tests/backends/engine/cuda/), and the path where Triton is
missing. Triton is the GPU image's, not a dependency of the product: the CPU path never imports
this module; the test extra installs it so that CI runs these kernels in Triton's interpreter and
compiles them for sm_90 (tests/backends/engine/cuda/).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # present wherever a CUDA build of torch is installed
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

HAVE_TRITON = triton is not None

#: Tokens of context one attention program reads per iteration.
ATTENTION_TILE = 32
#: Programs the attention grid aims for (two per multiprocessor of an H100/H200): the context is
#: split until ``sequences * kv_heads * splits`` reaches it, so one sequence still fills the GPU.
ATTENTION_PROGRAMS = 264
MAX_SPLITS = 16


def attention_splits(num_seqs: int, num_kv_heads: int) -> int:
    """Programs per (sequence, KV head) for a decode batch of ``num_seqs``."""
    return max(1, min(MAX_SPLITS, -(-ATTENTION_PROGRAMS // (num_seqs * num_kv_heads))))


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# -- torch definitions -------------------------------------------------------------------------


def add_rms_norm_ref(x: Tensor | None, residual: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:
    if x is not None:
        residual.add_(x)
    r = residual.float()
    return (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * weight).to(out_dtype)


def rope_write_kv_ref(
    qkv: Tensor, positions: Tensor, cos_sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
    num_heads: int, num_kv_heads: int, k_out: Tensor | None = None,
) -> Tensor:  # fmt: skip
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    half = head_dim // 2
    qk = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(tokens, -1, head_dim).float()
    cs = cos_sin[positions].unsqueeze(1)  # [T, 1, D]: cos | sin
    cos, sin = cs[..., :half], cs[..., half:]
    x1, x2 = qk[..., :half], qk[..., half:]
    rot = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(qkv.dtype)
    q, k = rot[:, :num_heads], rot[:, num_heads:]
    v = qkv[:, (num_heads + num_kv_heads) * head_dim :].reshape(tokens, num_kv_heads, head_dim)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)
    if k_out is not None:
        k_out.copy_(k)
    return q.contiguous()


def decode_attention_ref(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, tables: Tensor, seq_lens: Tensor, scale: float
) -> Tensor:
    """``[S, H * D]``: each sequence's one query against its first ``seq_lens[s]`` cached keys."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv, _ = k_cache.shape
    width = tables.shape[1] * block_size
    pos = torch.arange(width, device=q.device)
    mask = pos < seq_lens.long().unsqueeze(1)  # [S, W]; table entries past the context are not read
    slots = torch.where(mask, tables.long()[:, pos // block_size] * block_size + pos % block_size, 0)
    keys = k_cache.view(-1, num_kv, head_dim)[slots].transpose(1, 2).float()  # [S, KV, W, D]
    values = v_cache.view(-1, num_kv, head_dim)[slots].transpose(1, 2).float()
    mask = mask.view(num_seqs, 1, 1, width)
    o = F.scaled_dot_product_attention(
        q.float().view(num_seqs, num_kv, num_heads // num_kv, head_dim), keys, values, attn_mask=mask, scale=scale
    )
    return o.reshape(num_seqs, num_heads * head_dim).to(q.dtype)


def silu_mul_ref(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def int8_matmul_ref(x: Tensor, q: Tensor, scales: Tensor, out_dtype: torch.dtype) -> Tensor:
    return ((x.float() @ q.float().t()) * scales.float()).to(out_dtype)


#: K columns of one int4 tile: its byte ``j`` holds column ``j`` (low nibble) and ``j + 32`` (high)
INT4_TILE_K = 64


def pack_int4(q: Tensor) -> Tensor:
    """uint8 ``[N, K]`` codes (0..15, ``K`` a multiple of ``INT4_TILE_K``) as ``[N, K / 2]`` bytes:
    in each tile of 64 columns, byte ``j`` holds column ``j`` low and column ``j + 32`` high, so a
    kernel unpacks a tile into two contiguous halves (no interleave)."""
    n, k = q.shape
    tiles = q.view(n, k // INT4_TILE_K, 2, INT4_TILE_K // 2)
    return (tiles[:, :, 0] | (tiles[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    n, half = packed.shape
    tiles = packed.view(n, -1, INT4_TILE_K // 2)
    return torch.stack([tiles & 15, tiles >> 4], dim=2).reshape(n, 2 * half)


def int4_matmul_ref(x: Tensor, packed: Tensor, sz: Tensor, group_size: int, out_dtype: torch.dtype) -> Tensor:
    """``sz`` ``[G, N, 2]``: (scale, zero) per group and row, ``W = (q - 8) * scale + zero``."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    scales = sz[..., 0].float().t().repeat_interleave(group_size, dim=1)  # [N, K]
    zeros = sz[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (x.float() @ ((q - 8.0) * scales + zeros).t()).to(out_dtype)


# -- Triton ------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, x_stride, res_ptr, res_stride, w_ptr, out_ptr, out_stride, dim, eps,
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
    def _rope_write_kv_kernel(qkv_ptr, qkv_stride, pos_ptr, cos_sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
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
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, table_stride, lens_ptr, scale,
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
    def _merge_splits_kernel(part_ml_ptr, part_acc_ptr, out_ptr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
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
    def _silu_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, inter, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(x_ptr + t * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + t * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + t * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _int8_matmul_kernel(x_ptr, x_stride, q_ptr, s_ptr, y_ptr, y_stride, m, n, k, BLOCK_M: tl.constexpr,
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
    def _int4_matmul_kernel(x_ptr, x_stride, w_ptr, sz_ptr, y_ptr, y_stride, m, n, k, group_size,
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


class GpuKernels:
    """The fused operations, by Triton (``use_triton``) or by their torch definitions.

    All take and return tensors on one device; nothing here synchronizes with the host, so every
    call can be captured in a CUDA graph (``graphs.DecodeGraphs``)."""

    def __init__(self, use_triton: bool) -> None:
        if use_triton and not HAVE_TRITON:
            raise RuntimeError("Triton is not installed")
        self.use_triton = use_triton

    def add_rms_norm(
        self, x: Tensor | None, residual: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype
    ) -> Tensor:
        """``residual += x`` (float32, in place; ``x`` None: no add), then its RMS norm times
        ``weight`` in ``out_dtype``."""
        if not self.use_triton:
            return add_rms_norm_ref(x, residual, weight, eps, out_dtype)
        rows, dim = residual.shape
        out = torch.empty(rows, dim, dtype=out_dtype, device=residual.device)
        xs = x if x is not None else residual
        _add_rms_norm_kernel[(rows,)](
            xs, xs.stride(0), residual, residual.stride(0), weight, out, out.stride(0), dim, eps,
            HAS_X=x is not None, BLOCK=_pow2(dim), num_warps=4,
        )  # fmt: skip
        return out

    def rope_write_kv(
        self, qkv: Tensor, positions: Tensor, cos_sin: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor,
        num_heads: int, num_kv_heads: int, k_out: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Rotary on the q and k heads of ``qkv`` ``[T, (H + 2 KV) * D]`` (``cos_sin``: float32
        ``[positions, D]``, cos then sin of each frequency); k and v written into the caches at
        ``slots``, rotated k also into ``k_out`` ``[T, KV, D]`` when given; returns q ``[T, H, D]``."""
        if not self.use_triton:
            return rope_write_kv_ref(qkv, positions, cos_sin, k_cache, v_cache, slots, num_heads, num_kv_heads, k_out)
        tokens = qkv.shape[0]
        head_dim = k_cache.shape[-1]
        q = torch.empty(tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
        _rope_write_kv_kernel[(tokens, num_heads + 2 * num_kv_heads)](
            qkv, qkv.stride(0), positions, cos_sin, q, k_cache, v_cache, slots, k_out if k_out is not None else q,
            NUM_HEADS=num_heads, NUM_KV=num_kv_heads, HEAD_DIM=head_dim, HALF=head_dim // 2,
            BLOCK_HALF=_pow2(head_dim // 2),
            HAS_K_OUT=k_out is not None, num_warps=1,
        )  # fmt: skip
        return q

    def decode_attention(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, tables: Tensor, seq_lens: Tensor, scale: float,
        splits: int | None = None,
    ) -> Tensor:  # fmt: skip
        """``[S, H * D]``: query ``q[s]`` ``[H, D]`` against the first ``seq_lens[s]`` keys of its
        blocks ``tables[s]`` (any integer dtype; entries past the context are not read)."""
        if not self.use_triton:
            return decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, scale)
        num_seqs, num_heads, head_dim = q.shape
        _, block_size, num_kv, _ = k_cache.shape
        splits = _pow2(splits or attention_splits(num_seqs, num_kv))
        group = num_heads // num_kv
        block_d = _pow2(head_dim)
        out = torch.empty(num_seqs, num_heads * head_dim, dtype=q.dtype, device=q.device)
        part_ml = part_acc = out
        if splits > 1:
            part_ml = torch.empty(num_seqs * num_heads * splits * 2, dtype=torch.float32, device=q.device)
            part_acc = torch.empty(num_seqs * num_heads * splits * block_d, dtype=torch.float32, device=q.device)
        _decode_attention_kernel[(num_seqs, num_kv, splits)](
            q, k_cache, v_cache, tables, tables.stride(0), seq_lens, scale, part_ml, part_acc, out,
            NUM_HEADS=num_heads, NUM_KV=num_kv, GROUP=group, GROUP_PAD=max(2, _pow2(group)), HEAD_DIM=head_dim,
            BLOCK_D=block_d, BLOCK_SIZE=block_size, TILE=ATTENTION_TILE, SPLITS=splits, num_warps=4,
        )  # fmt: skip
        if splits > 1:
            _merge_splits_kernel[(num_seqs, num_heads)](
                part_ml, part_acc, out, NUM_HEADS=num_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, SPLITS=splits,
                num_warps=1,
            )  # fmt: skip
        return out

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        """``silu(gate) * up`` of ``gate_up`` ``[T, 2 I]``."""
        if not self.use_triton:
            return silu_mul_ref(gate_up)
        tokens, width = gate_up.shape
        inter = width // 2
        out = torch.empty(tokens, inter, dtype=gate_up.dtype, device=gate_up.device)
        block = 1024
        _silu_mul_kernel[(tokens, -(-inter // block))](
            gate_up, gate_up.stride(0), out, out.stride(0), inter, BLOCK=block, num_warps=4
        )  # fmt: skip
        return out

    def int4_matmul(self, x: Tensor, packed: Tensor, sz: Tensor, group_size: int, out_dtype: torch.dtype) -> Tensor:
        """``x [M, K] @ W.T`` for ``W`` ``[N, K]`` packed by ``pack_int4`` with (scale, zero)
        ``sz [G, N, 2]``; weights dequantised in float32, TF32 products (IEEE for float32 ``x``)."""
        if not self.use_triton:
            return int4_matmul_ref(x, packed, sz, group_size, out_dtype)
        m, k = x.shape
        n = packed.shape[0]
        y = torch.empty(m, n, dtype=out_dtype, device=x.device)
        block_m = min(64, max(16, _pow2(m)))
        block_n = 64
        _int4_matmul_kernel[(-(-n // block_n), -(-m // block_m))](
            x, x.stride(0), packed, sz, y, y.stride(0), m, n, k, group_size, BLOCK_M=block_m, BLOCK_N=block_n,
            TILE_K=INT4_TILE_K, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4,
        )  # fmt: skip
        return y

    def int8_matmul(self, x: Tensor, q: Tensor, scales: Tensor, out_dtype: torch.dtype) -> Tensor:
        """``x [M, K] @ (q * scales[:, None]).T`` in ``out_dtype``: ``q`` int8 ``[N, K]``, one
        scale per output row; exact products, accumulated in float32."""
        if not self.use_triton:
            return int8_matmul_ref(x, q, scales, out_dtype)
        m, k = x.shape
        n = q.shape[0]
        y = torch.empty(m, n, dtype=out_dtype, device=x.device)
        block_m = min(64, max(16, _pow2(m)))  # tl.dot's smallest tile is 16 rows
        block_n = 64
        _int8_matmul_kernel[(-(-n // block_n), -(-m // block_m))](
            x, x.stride(0), q, scales, y, y.stride(0), m, n, k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=4,
        )  # fmt: skip
        return y
