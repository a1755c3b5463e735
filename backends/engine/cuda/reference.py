"""The torch definitions of the GPU path's kernels (``kernels.GpuKernels``): what each Triton kernel
computes, the reference its tests compare against, and what runs where Triton is missing. Also the
int4 packing ``int4_matmul`` reads (``pack_int4``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
