"""Attention over a paged KV cache for a flattened batch that mixes prefill and decode.

The contract (docs/architecture.md): a step runs the new tokens of ``S`` sequences concatenated
(``T`` tokens). ``AttentionMetadata`` says where each sequence's tokens start
(``query_start_loc``), how long its context is after this step (``seq_lens``, cached + new),
which cache blocks hold that context (``block_tables``, padded with 0) and where each new token's
K/V goes (``slot_mapping``, ``block * block_size + offset``). A sequence's new tokens are the last
``q_len`` positions of its context, so chunked prefill and prefix caching (new tokens starting at
a position > 0) need nothing special.

Per layer, ``paged_attention`` writes the new K/V into the cache, then attends:
- decode (one new token): every such sequence at once, natively in place
  (``native/csrc/decode_attention.c``) or gathering its cached K/V blocks into a padded
  ``[S, L]`` batch with a length mask for one SDPA call;
- prefill (several new tokens): causal, offset by its cached prefix; bfloat16 on CPU runs every
  prefill of the step in one native call reading K/V in place (``native/csrc/prefill_attention.c``,
  ~3.7x torch's SDPA on SmolLM2's heads), else one SDPA call per sequence.
The native kernels run only when passed in (``PagedAttention(kernels)``, placed by
``native.fuse``); without them every step is torch's.
What depends only on the metadata (block indices, masks) is computed once per step in
``AttentionPlan`` and shared by all layers.

Two options serve gemma (``model/gemma.py``), on torch's path only (the native kernels know
neither, so a plan or call using them declines the kernels):
- a sliding window, exact on the paged cache: ``plan.windowed(w)`` is the plan whose masks also
  hide every key more than ``w - 1`` positions before its query (a query at ``p`` sees ``(p - w, p]``,
  transformers' and llama.cpp's rule). The cache still holds every position; only the masks change.
- ``softcap``: scores become ``softcap * tanh(scores / softcap)`` before the mask and softmax
  (gemma2), computed as transformers' eager attention does (SDPA has no such step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec
import torch
import torch.nn.functional as F
from torch import Tensor

from backends.engine.model.config import ModelConfig
from backends.engine.native import abi, hugepages

if TYPE_CHECKING:
    from backends.engine.native.ckernels import Kernels

KVCache = list[tuple[Tensor, Tensor]]


class AttentionMetadata(msgspec.Struct, kw_only=True):
    """Where the new tokens of each sequence sit, and where their context lives in the cache."""

    query_start_loc: Tensor  # int32 [S + 1]
    seq_lens: Tensor  # int32 [S]: context length after this step (cached + new)
    block_tables: Tensor  # int32 [S, max_blocks], padded with 0
    slot_mapping: Tensor  # int64 [T]

    @classmethod
    def from_lists(
        cls,
        *,
        query_lens: Sequence[int],
        seq_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Build from per-sequence Python lists (tests, simple runners)."""
        starts = [0]
        slots: list[int] = []
        for q_len, seq_len, table in zip(query_lens, seq_lens, block_tables, strict=True):
            starts.append(starts[-1] + q_len)
            for pos in range(seq_len - q_len, seq_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
        return cls(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        )


class PrefillSeq(msgspec.Struct):
    start: int  # first row of this sequence's tokens in the flattened batch
    end: int
    seq_len: int  # context after this step
    table: Tensor | None  # its block table, cut to its context; None when it has no cached prefix
    # for torch's SDPA, made on its first use in a step (``context``): the native kernel needs neither
    blocks: Tensor | slice | None = None  # the context's blocks (see ``_blocks``)
    mask: Tensor | None = None  # bool [q_len, nblocks * block_size] (True = attend)
    window: int | None = None  # a sliding window (``AttentionPlan.windowed``)

    def context(self, block_size: int) -> tuple[Tensor | slice, Tensor]:
        """The blocks holding a cached prefix and this chunk, and the causal mask over them."""
        assert self.table is not None
        if self.blocks is None or self.mask is None:
            self.blocks = _blocks(self.table)
            self.mask = self._mask(self.table.shape[0] * block_size, self.table.device)
        return self.blocks, self.mask

    def own_mask(self, device: torch.device) -> Tensor | None:
        """The mask over this step's own K/V when there is no cached prefix: None (plain causal)
        unless a window hides some of them."""
        if self.window is None or self.seq_len <= self.window:
            return None
        if self.mask is None:
            self.mask = self._mask(self.seq_len, device)
        return self.mask

    def _mask(self, num_keys: int, device: torch.device) -> Tensor:
        rows = torch.arange(self.seq_len - (self.end - self.start), self.seq_len, device=device).unsqueeze(1)
        keys = torch.arange(num_keys, device=device).unsqueeze(0)
        mask = keys <= rows
        return mask if self.window is None else mask & (keys > rows - self.window)


class PrefillTables(msgspec.Struct):
    """The prefill sequences as the native prefill kernel reads them (int32, contiguous)."""

    q_starts: Tensor  # [Sp]: first row of each sequence's new tokens
    q_lens: Tensor  # [Sp]
    seq_lens: Tensor  # [Sp]: context after this step
    block_tables: Tensor  # [Sp, max_blocks]


class AttentionPlan(msgspec.Struct):
    """Per-step indices and masks derived once from ``AttentionMetadata``.

    K/V are gathered a whole block at a time (``index_select`` on the block axis copies
    contiguous ``block_size * KV * D`` runs, several times faster than per-slot indexing); the
    unused tail of the last block is masked, or sliced off when there is one decode sequence.
    """

    num_tokens: int
    slot_mapping: Tensor
    decode_rows: Tensor | None  # token rows of decode sequences; None when all rows are decode
    decode_blocks: Tensor | slice | None  # each decode sequence's blocks, flattened (see ``_blocks``)
    decode_len: int  # keys per decode sequence after gathering (nblocks * block_size, or the one length)
    decode_mask: Tensor | None  # bool [Sd, 1, 1, decode_len]; None when no key is padding
    decode_tables: Tensor | None  # int32 [Sd, nblocks]: the decode sequences' block tables
    decode_seq_lens: Tensor | None  # int32 [Sd]
    prefills: list[PrefillSeq]
    prefill_tables: PrefillTables | None = None  # when there are prefills
    max_seq_len: int = 0
    windows: dict[int, AttentionPlan] = msgspec.field(default_factory=dict)  # ``windowed``'s, made once a step

    @classmethod
    def build(cls, attn: AttentionMetadata, block_size: int) -> AttentionPlan:
        starts = attn.query_start_loc.tolist()
        seq_lens = attn.seq_lens.tolist()
        num_tokens = starts[-1]
        device = attn.slot_mapping.device
        decode: list[int] = []
        prefills: list[PrefillSeq] = []
        prefill_ids: list[int] = []
        for i, seq_len in enumerate(seq_lens):
            start, end = starts[i], starts[i + 1]
            q_len = end - start
            if q_len == 1:
                decode.append(i)
                continue
            prefill_ids.append(i)
            # no cached prefix: SDPA attends to this step's own K/V, causally
            table = None if q_len == seq_len else attn.block_tables[i, : _num_blocks(attn, seq_len, block_size)]
            prefills.append(PrefillSeq(start, end, seq_len, table))
        decode_rows = decode_blocks = decode_mask = tables = lens_t = None
        decode_len = 0
        if decode:
            lens = [seq_lens[i] for i in decode]
            nblocks = _num_blocks(attn, max(lens), block_size)
            if len(decode) == len(seq_lens):
                tables = attn.block_tables[:, :nblocks]
                lens_t = attn.seq_lens
            else:
                index = torch.tensor(decode, device=device)
                tables = attn.block_tables.index_select(0, index)[:, :nblocks]
                lens_t = attn.seq_lens.index_select(0, index)
                decode_rows = torch.tensor([starts[i] for i in decode], device=device)
            decode_blocks = _blocks(tables.reshape(-1)) if len(decode) == 1 else tables.reshape(-1).to(torch.int64)
            decode_len = nblocks * block_size
            if len(decode) == 1:
                decode_len = lens[0]
            elif min(lens) != decode_len:
                keys = torch.arange(decode_len, device=device)
                decode_mask = (keys < lens_t.unsqueeze(1)).view(len(decode), 1, 1, decode_len)
        if tables is not None:  # as the native decode kernel reads them
            tables = tables.to(torch.int32).contiguous()
            lens_t = lens_t.to(torch.int32).contiguous()
        prefill_tables = None
        if prefill_ids and device.type == "cpu":
            nblocks = _num_blocks(attn, max(seq_lens[i] for i in prefill_ids), block_size)
            rows = attn.block_tables[prefill_ids] if len(prefill_ids) < len(seq_lens) else attn.block_tables
            prefill_tables = PrefillTables(
                q_starts=torch.tensor([starts[i] for i in prefill_ids], dtype=torch.int32),
                q_lens=torch.tensor([starts[i + 1] - starts[i] for i in prefill_ids], dtype=torch.int32),
                seq_lens=torch.tensor([seq_lens[i] for i in prefill_ids], dtype=torch.int32),
                block_tables=rows[:, :nblocks].to(torch.int32).contiguous(),
            )
        return cls(
            num_tokens, attn.slot_mapping, decode_rows, decode_blocks, decode_len, decode_mask, tables, lens_t, prefills,
            prefill_tables, max(seq_lens, default=0),
        )  # fmt: skip

    def windowed(self, window: int) -> AttentionPlan:
        """This plan for layers that see only the last ``window`` positions (module docstring);
        itself while no context is longer than the window. The windowed plan holds no tables for
        the native kernels, so its attention runs on torch's path."""
        if self.max_seq_len <= window:
            return self
        plan = self.windows.get(window)
        if plan is not None:
            return plan
        decode_mask = self.decode_mask
        if self.decode_seq_lens is not None:
            keys = torch.arange(self.decode_len, device=self.decode_seq_lens.device)
            lens = self.decode_seq_lens.to(torch.int64).view(-1, 1, 1, 1)
            decode_mask = (keys >= lens - window) & (keys < lens)  # [Sd, 1, 1, L]
        prefills = [msgspec.structs.replace(seq, mask=None, window=window) for seq in self.prefills]
        plan = self.windows[window] = msgspec.structs.replace(
            self, decode_mask=decode_mask, decode_tables=None, decode_seq_lens=None, prefills=prefills,
            prefill_tables=None, windows={},
        )  # fmt: skip
        return plan


def _num_blocks(attn: AttentionMetadata, seq_len: int, block_size: int) -> int:
    """Blocks holding ``seq_len`` tokens; the block tables must be that wide (the native kernels
    read that far without seeing the tables' width)."""
    nblocks = -(-seq_len // block_size)
    assert nblocks <= attn.block_tables.shape[1], "block tables narrower than the context"
    return nblocks


def _blocks(table: Tensor) -> Tensor | slice:
    """One sequence's block ids: a ``slice`` when they are consecutive (the common case for a
    sequence allocated from a fresh free list), so attention reads the cache in place."""
    ids = table.tolist()
    if ids and ids == list(range(ids[0], ids[0] + len(ids))):
        return slice(ids[0], ids[0] + len(ids))
    return table.to(torch.int64)


def _gather(cache: Tensor, blocks: Tensor | slice, num_seqs: int, length: int) -> Tensor:
    """``[num_seqs, length, KV, D]`` keys or values of ``blocks`` (``num_seqs`` equal runs)."""
    _, block_size, num_kv, head_dim = cache.shape
    picked = cache[blocks] if isinstance(blocks, slice) else cache.index_select(0, blocks)
    out = picked.view(num_seqs, -1, num_kv, head_dim)
    return out if out.shape[1] == length else out[:, :length]


def _native_reads(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether the native attention kernels can read these: bfloat16 on the CPU, caches contiguous."""
    return (
        q.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16 and q.device.type == "cpu"
        and k_cache.is_contiguous() and v_cache.is_contiguous()
    )  # fmt: skip


def _unit_head_stride(q: Tensor) -> Tensor:
    """``q`` ``[T, H, D]`` with heads and dims packed in each row (any row stride), as the kernels read it."""
    return q if q.stride(2) == 1 and q.stride(1) == q.shape[2] else q.contiguous()


def _native_decode(
    kernels: Kernels | None, q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: AttentionPlan, scale: float
) -> Tensor | None:
    """Decode attention by the native kernel, reading K/V in place through the block tables;
    ``None`` where it does not apply (no kernels, not bfloat16 on CPU, a shape or block id the
    kernel refuses), and torch's path runs instead."""
    tables, lens = plan.decode_tables, plan.decode_seq_lens
    if kernels is None or tables is None or lens is None or not _native_reads(q, k_cache, v_cache):
        return None
    q = _unit_head_stride(q)
    num_seqs, num_heads, head_dim = q.shape
    out = torch.empty(num_seqs, num_heads * head_dim, dtype=q.dtype)
    status = kernels.decode_attention_bf16(
        abi.PagedAttentionArgs(
            q=q.data_ptr(), q_stride=q.stride(0), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
            tables=tables.data_ptr(), table_stride=tables.stride(0), seq_lens=lens.data_ptr(),
            num_blocks=k_cache.shape[0], num_seqs=num_seqs, num_heads=num_heads, num_kv_heads=k_cache.shape[2],
            head_dim=head_dim, block_size=k_cache.shape[1], scale=scale, out=out.data_ptr(),
            out_stride=out.stride(0), num_threads=torch.get_num_threads(),
        )
    )  # fmt: skip
    return out if status == 0 else None


class PagedAttention:
    """A layer's attention: ``paged_attention`` with the native kernels it was given (``None``:
    torch's ops alone). ``native.fuse`` swaps this for one holding the loaded kernels."""

    def __init__(self, kernels: Kernels | None = None) -> None:
        self.kernels = kernels

    def __call__(
        self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, plan: AttentionPlan, scale: float,
        softcap: float | None = None,
    ) -> Tensor:  # fmt: skip
        return paged_attention(q, k, v, k_cache, v_cache, plan, scale, kernels=self.kernels, softcap=softcap)


def paged_attention(
    q: Tensor,  # [T, H, D]
    k: Tensor,  # [T, KV, D]
    v: Tensor,  # [T, KV, D]
    k_cache: Tensor,  # [num_blocks, block_size, KV, D]
    v_cache: Tensor,
    plan: AttentionPlan,
    scale: float,
    *,
    write_kv: bool = True,
    kernels: Kernels | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Write this step's K/V into the cache (unless the caller has: ``write_kv=False``) and
    attend; returns ``[T, H * D]``. ``kernels``: the native kernels to try first, or None.
    ``softcap``: soft-capped scores (module docstring), on torch's path."""
    if softcap is not None:
        kernels = None
    num_tokens, num_heads, head_dim = q.shape
    num_kv = k.shape[1]
    group = num_heads // num_kv
    if write_kv:
        k_cache.view(-1, num_kv, head_dim).index_copy_(0, plan.slot_mapping, k)
        v_cache.view(-1, num_kv, head_dim).index_copy_(0, plan.slot_mapping, v)

    # decode: [Sd] sequences, one query each; query heads grouped by their KV head
    decode_out = None
    if plan.decode_blocks is not None:
        qd = q if plan.decode_rows is None else q.index_select(0, plan.decode_rows)
        sd = qd.shape[0]
        decode_out = _native_decode(kernels, qd, k_cache, v_cache, plan, scale)
        if decode_out is None:
            kd = _gather(k_cache, plan.decode_blocks, sd, plan.decode_len).transpose(1, 2)  # [Sd, KV, L, D]
            vd = _gather(v_cache, plan.decode_blocks, sd, plan.decode_len).transpose(1, 2)
            decode_out = _attention(
                qd.view(sd, num_kv, group, head_dim), kd, vd, plan.decode_mask, scale, softcap, causal=False
            ).reshape(sd, num_heads * head_dim)
        if not plan.prefills:
            return decode_out

    # prefill: causal over each sequence's context, all at once natively, else one SDPA each
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=q.dtype, device=q.device)
    if not _native_prefill(kernels, q, k_cache, v_cache, plan, scale, out):
        _sdpa_prefill(q, k, v, k_cache, v_cache, plan, scale, out, softcap)
    if decode_out is not None:
        out.index_copy_(0, plan.decode_rows, decode_out)
    return out


def _native_prefill(
    kernels: Kernels | None, q: Tensor, k_cache: Tensor, v_cache: Tensor, plan: AttentionPlan, scale: float, out: Tensor
) -> bool:
    """Prefill attention by the native kernel into ``out``, reading every key and value (this
    step's included: the cache is written first) through the block tables; False where it does
    not apply, as ``_native_decode``."""
    tables = plan.prefill_tables
    if kernels is None or not kernels.has_prefill_attention or tables is None or not _native_reads(q, k_cache, v_cache):
        return False
    q = _unit_head_stride(q)
    _, num_heads, head_dim = q.shape
    status = kernels.prefill_attention_bf16(
        abi.PagedAttentionArgs(
            q=q.data_ptr(), q_stride=q.stride(0), k_cache=k_cache.data_ptr(), v_cache=v_cache.data_ptr(),
            tables=tables.block_tables.data_ptr(), table_stride=tables.block_tables.stride(0),
            q_starts=tables.q_starts.data_ptr(), q_lens=tables.q_lens.data_ptr(), seq_lens=tables.seq_lens.data_ptr(),
            num_blocks=k_cache.shape[0], num_seqs=tables.q_lens.shape[0], num_heads=num_heads,
            num_kv_heads=k_cache.shape[2], head_dim=head_dim, block_size=k_cache.shape[1], scale=scale,
            out=out.data_ptr(), out_stride=out.stride(0), num_threads=torch.get_num_threads(),
        )
    )  # fmt: skip
    return status == 0


def _sdpa_prefill(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, plan: AttentionPlan, scale: float, out: Tensor,
    softcap: float | None = None,
) -> None:  # fmt: skip
    num_heads, head_dim = q.shape[1:]
    for seq in plan.prefills:
        n = seq.end - seq.start
        if seq.table is None:
            ks = k[seq.start : seq.end]
            vs = v[seq.start : seq.end]
            mask = seq.own_mask(q.device)
        else:
            blocks, mask = seq.context(k_cache.shape[1])
            ks = _gather(k_cache, blocks, 1, mask.shape[1])[0]
            vs = _gather(v_cache, blocks, 1, mask.shape[1])[0]
        o = _attention(
            q[seq.start : seq.end].transpose(0, 1).unsqueeze(0),  # [1, H, n, D]
            ks.transpose(0, 1).unsqueeze(0),
            vs.transpose(0, 1).unsqueeze(0),
            mask,
            scale,
            softcap,
            causal=mask is None,
        )
        out[seq.start : seq.end] = o[0].transpose(0, 1).reshape(n, num_heads * head_dim)


def _attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, softcap: float | None, *, causal: bool
) -> Tensor:
    """Attention of ``q`` ``[B, H, n, D]`` over ``k``, ``v`` ``[B, KV, L, D]`` (query head ``h``
    reads KV head ``h // (H / KV)``); ``mask`` bool, broadcast to ``[B, H, n, L]`` (True = attend),
    or ``causal`` (``L == n``), or neither. SDPA, or with ``softcap`` as transformers' eager
    attention: scaled scores capped, masked, softmax in float32, rounded to the activation dtype, times V."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=q.shape[1] > k.shape[1]
        )
    b, num_heads, n, head_dim = q.shape
    num_kv, length = k.shape[1], k.shape[2]
    if causal:
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril()
    elif mask is not None and mask.dim() == 4:
        mask = mask.unsqueeze(2)  # [B, 1, 1, n, L]: broadcast over the KV and group axes
    q5 = q.reshape(b, num_kv, num_heads // num_kv, n, head_dim)
    scores = torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)) * scale  # [B, KV, G, n, L]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v.unsqueeze(2)).view(b, num_heads, n, head_dim)


def allocate_kv_cache(
    config: ModelConfig,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> KVCache:
    """One ``(k_cache, v_cache)`` pair per layer, each ``[num_blocks, block_size, KV, head_dim]``.

    Zero-filled: padded decode slots are masked, but a masked NaN would still poison the
    ``softmax @ V`` product, so the cache never holds garbage.
    """
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    if torch.device(device).type == "cpu":  # read at every step: on huge pages where allowed
        return [(hugepages.empty(shape, dtype).zero_(), hugepages.empty(shape, dtype).zero_()) for _ in range(config.num_layers)]
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_layers)
    ]
