"""Paged attention over block tables vs plain causal SDPA on contiguous tensors, for random mixed
batches: decode rows, fresh prefills, and prefills with a cached prefix (chunked prefill, prefix
caching), sequences in random order over shuffled cache blocks; with a sliding window and with
soft-capped scores (gemma) against an explicit reference."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from backends.engine.model.attention import AttentionMetadata, AttentionPlan, paged_attention

HEADS, KV_HEADS, HEAD_DIM = 6, 2, 16


def reference(
    q_all: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, q_len: int,
    window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """Causal attention of the last ``q_len`` queries of one sequence over its whole context; with
    ``window`` a query at position ``p`` sees keys ``(p - window, p]``; with ``softcap`` the scaled
    scores are ``softcap * tanh(s / softcap)``."""
    n = k_all.shape[0]
    rep = HEADS // KV_HEADS
    k = k_all.repeat_interleave(rep, dim=1).transpose(0, 1).float()  # [H, n, D]
    v = v_all.repeat_interleave(rep, dim=1).transpose(0, 1).float()
    q = q_all[n - q_len :].transpose(0, 1).float()
    mask = torch.ones(q_len, n, dtype=torch.bool).tril(diagonal=n - q_len)
    if window is not None:
        pos = torch.arange(n - q_len, n).unsqueeze(1)
        mask &= torch.arange(n).unsqueeze(0) > pos - window
    scores = q @ k.transpose(1, 2) * HEAD_DIM**-0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    o = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return o.transpose(0, 1).reshape(q_len, HEADS * HEAD_DIM)


def run_case(
    seed: int, dtype: torch.dtype, block_size: int, shuffle: bool = True,
    window: int | None = None, softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_seqs = rng.randint(1, 6)
    kind = rng.choice(["decode", "prefill", "mixed"])
    seqs = []
    for _ in range(num_seqs):
        mode = kind if kind != "mixed" else rng.choice(["decode", "prefill", "prefix"])
        if mode == "decode":
            cached, new = rng.randint(0, 40), 1
        elif mode == "prefill":
            cached, new = 0, rng.randint(2, 30)
        else:
            cached, new = rng.randint(1, 40), rng.randint(2, 20)
        seqs.append((cached, new))
    rng.shuffle(seqs)

    num_blocks = sum(-(-(c + n) // block_size) for c, n in seqs) + 3
    k_cache = torch.zeros(num_blocks, block_size, KV_HEADS, HEAD_DIM, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(num_blocks))[::-1]  # popped from the end: consecutive ids per sequence
    if shuffle:
        rng.shuffle(free)

    qs, ks, vs, refs = [], [], [], []
    q_lens, seq_lens, tables = [], [], []
    for cached, new in seqs:
        total = cached + new
        q_all = torch.randn(total, HEADS, HEAD_DIM, generator=gen).to(dtype)
        k_all = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        v_all = torch.randn(total, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
        table = [free.pop() for _ in range(-(-total // block_size))]
        for pos in range(cached):  # the prefix is already in the cache
            k_cache[table[pos // block_size], pos % block_size] = k_all[pos]
            v_cache[table[pos // block_size], pos % block_size] = v_all[pos]
        qs.append(q_all[cached:])
        ks.append(k_all[cached:])
        vs.append(v_all[cached:])
        refs.append(reference(q_all, k_all, v_all, new, window, softcap))
        q_lens.append(new)
        seq_lens.append(total)
        tables.append(table)

    attn = AttentionMetadata.from_lists(query_lens=q_lens, seq_lens=seq_lens, block_tables=tables, block_size=block_size)
    plan = AttentionPlan.build(attn, block_size)
    if window is not None:
        plan = plan.windowed(window)
    out = paged_attention(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, plan, HEAD_DIM**-0.5, softcap=softcap
    )
    # the new K/V landed in their slots
    flat_k = k_cache.view(-1, KV_HEADS, HEAD_DIM)
    assert torch.equal(flat_k[attn.slot_mapping], torch.cat(ks))
    return out.float(), torch.cat(refs)


@pytest.mark.parametrize("seed", range(40))
def test_paged_attention_matches_contiguous_sdpa_float32(seed: int) -> None:
    out, ref = run_case(seed, torch.float32, block_size=[1, 4, 16][seed % 3])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_paged_attention_consecutive_blocks_read_in_place(seed: int) -> None:
    out, ref = run_case(seed, torch.float32, block_size=[1, 4, 16][seed % 3], shuffle=False)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_paged_attention_matches_contiguous_sdpa_bfloat16(seed: int) -> None:
    out, ref = run_case(seed, torch.bfloat16, block_size=[4, 16][seed % 2])
    # bfloat16 inputs (same values in the reference); output rounding only
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("seed", range(24))
def test_sliding_window_and_softcap_match_the_explicit_reference(seed: int) -> None:
    """Windows shorter than most contexts (the decode, fresh-prefill and cached-prefix masks all
    cut), with and without soft-capping; the capping alone too."""
    window = [3, 7, 16, None][seed % 4]
    softcap = [None, 2.0, 50.0][seed % 3]
    out, ref = run_case(seed, torch.float32, block_size=[1, 4, 16][seed % 3], window=window, softcap=softcap)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_a_plan_is_its_own_window_while_every_context_fits() -> None:
    attn = AttentionMetadata.from_lists(query_lens=[3, 1], seq_lens=[3, 6], block_tables=[[5], [2, 7]], block_size=4)
    plan = AttentionPlan.build(attn, 4)
    assert plan.windowed(6) is plan
    windowed = plan.windowed(4)
    assert windowed is plan.windowed(4) and windowed.decode_tables is None and windowed.prefill_tables is None


def test_metadata_from_lists_slots() -> None:
    attn = AttentionMetadata.from_lists(query_lens=[3, 1], seq_lens=[3, 6], block_tables=[[5], [2, 7]], block_size=4)
    assert attn.query_start_loc.tolist() == [0, 3, 4]
    assert attn.slot_mapping.tolist() == [20, 21, 22, 7 * 4 + 1]
    assert attn.block_tables.tolist() == [[5, 0], [2, 7]]
