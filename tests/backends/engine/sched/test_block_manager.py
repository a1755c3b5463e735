from __future__ import annotations

import pytest

from backends.engine.sched.block_manager import BlockManager, NoFreeBlocksError, hash_block
from backends.engine.sched.sequence import Sequence
from gateway.interface import SamplingParams

BS = 4


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams())


def admit(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> int:
    """Admit ``seq`` as the scheduler does: prefix hits, then fresh blocks; returns hit tokens."""
    num_tokens = seq.num_tokens if num_tokens is None else num_tokens
    hits = bm.match_prefix(seq)
    assert bm.can_allocate(bm.num_blocks_to_admit(seq, hits, num_tokens))
    num_hit = bm.allocate_cached(seq, hits)
    seq.num_computed_tokens = num_hit
    bm.allocate(seq, num_tokens)
    return num_hit


def compute(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """Pretend a forward pass computed the first ``num_tokens`` tokens."""
    before = seq.num_computed_tokens
    seq.num_computed_tokens = num_tokens
    bm.cache_full_blocks(seq, before)


def check(bm: BlockManager, *seqs: Sequence) -> None:
    bm.check_invariants([s.block_table for s in seqs])


def test_allocate_and_free_plain() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    seq = make_seq(list(range(10)))
    assert bm.num_new_blocks(seq, 10) == 3
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.ref_count(b) == 1 for b in seq.block_table)
    check(bm, seq)

    bm.allocate(seq, 12)  # still fits the third block
    assert len(seq.block_table) == 3
    bm.allocate(seq, 13)
    assert len(seq.block_table) == 4
    check(bm, seq)

    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8
    check(bm)


def test_invalid_sizes_and_empty_stats() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    stats = BlockManager(num_blocks=3, block_size=BS).stats()
    assert stats.prefix_cache_hit_rate == 0.0
    assert (stats.num_free_blocks, stats.num_used_blocks, stats.num_cached_blocks) == (3, 0, 0)


def test_allocate_beyond_capacity_raises() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(list(range(9)))
    assert not bm.can_allocate(bm.num_new_blocks(seq, 9))
    with pytest.raises(NoFreeBlocksError):
        bm.allocate(seq, 9)
    assert seq.block_table == []
    check(bm)


def test_hash_chain_depends_on_the_whole_prefix() -> None:
    h0 = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == h0
    assert hash_block(h0, [5, 6, 7, 8]) != hash_block(None, [5, 6, 7, 8])
    assert hash_block(hash_block(None, [0, 2, 3, 4]), [5, 6, 7, 8]) != hash_block(h0, [5, 6, 7, 8])


def test_second_request_with_same_prefix_hits_the_cache() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    system = list(range(100, 108))  # two full blocks
    a = make_seq(system + [1, 2, 3])
    assert admit(bm, a) == 0
    assert bm.match_prefix(make_seq(system + [9])) == []  # not cached before it is computed
    compute(bm, a, a.num_tokens)

    b = make_seq(system + [7, 7])
    assert bm.match_prefix(b) == a.block_table[:2]
    assert admit(bm, b) == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(x) for x in a.block_table[:2]] == [2, 2]
    assert bm.ref_count(a.block_table[2]) == 1
    check(bm, a, b)

    stats = bm.stats()
    assert stats.prefix_cache_queried_tokens == a.num_tokens + b.num_tokens
    assert stats.prefix_cache_hit_tokens == 8
    assert stats.prefix_cache_hit_rate == pytest.approx(8 / 21)
    assert stats.num_cached_blocks == 2

    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table[:2]] == [1, 1]
    check(bm, b)
    bm.free(b)
    check(bm)


def test_a_cached_prefix_leaves_the_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(8)))
    admit(bm, a)
    compute(bm, a, 8)
    same = make_seq(list(range(8)))
    assert len(bm.match_prefix(same)) == 1  # block 2 would leave nothing to sample from
    longer = make_seq(list(range(9)))
    assert len(bm.match_prefix(longer)) == 2


def test_same_block_after_a_different_prefix_misses() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq([1, 1, 1, 1, 2, 2, 2, 2, 0])
    admit(bm, a)
    compute(bm, a, 9)
    b = make_seq([3, 3, 3, 3, 2, 2, 2, 2, 0])
    assert bm.match_prefix(b) == []


def test_only_computed_full_blocks_are_cached() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(11)))
    admit(bm, a)
    compute(bm, a, 6)  # a chunk: block 0 full, block 1 half done
    assert [bm.is_cached(b) for b in a.block_table] == [True, False, False]
    compute(bm, a, 11)
    assert [bm.is_cached(b) for b in a.block_table] == [True, True, False]
    check(bm, a)


def test_freed_cached_blocks_stay_reusable_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(9)))  # 3 blocks, 2 of them full
    admit(bm, a)
    compute(bm, a, 9)
    a_blocks = list(a.block_table)
    bm.free(a)
    check(bm)
    stats = bm.stats()
    assert stats.num_free_blocks == 4 and stats.num_evictable_blocks == 2 and stats.num_used_blocks == 0

    # still a hit after being freed
    again = make_seq(list(range(9)))
    assert bm.match_prefix(again) == a_blocks[:2]

    # plain free blocks go first: taking 2 blocks evicts nothing
    c = make_seq([50] * 8)
    bm.allocate(c, 8)
    check(bm, c)
    assert set(c.block_table).isdisjoint(a_blocks[:2])
    assert bm.match_prefix(again) == a_blocks[:2]

    # then the least recently freed: a's tail block (freed before its head)
    d = make_seq([60] * 4)
    bm.allocate(d, 4)
    assert d.block_table == [a_blocks[1]]
    assert not bm.is_cached(a_blocks[1])
    assert bm.match_prefix(again) == a_blocks[:1]
    check(bm, c, d)


def test_reviving_an_evictable_block_costs_a_free_block() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(list(range(5)))
    admit(bm, a)
    compute(bm, a, 5)
    bm.free(a)
    b = make_seq(list(range(4)) + [9, 9, 9, 9, 9])
    hits = bm.match_prefix(b)
    assert len(hits) == 1
    assert bm.num_blocks_to_admit(b, hits, 9) == 3  # revived hit + 2 fresh
    admit(bm, b)
    assert bm.num_free_blocks == 0
    check(bm, b)
    # a used hit costs nothing
    c = make_seq(list(range(4)) + [1])
    hits = bm.match_prefix(c)
    assert bm.num_blocks_to_admit(c, hits, 4) == 0
    assert bm.num_blocks_to_admit(c, hits, 5) == 1


def test_duplicate_content_stays_private() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    a, b = make_seq(list(range(5))), make_seq(list(range(5)))
    admit(bm, a)
    admit(bm, b)  # admitted in the same step: neither is cached yet
    compute(bm, a, 5)
    compute(bm, b, 5)
    assert bm.is_cached(a.block_table[0]) and not bm.is_cached(b.block_table[0])
    bm.free(b)
    assert bm.stats().num_evictable_blocks == 0
    check(bm, a)


def test_prefix_caching_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq(list(range(9)))
    admit(bm, a)
    compute(bm, a, 9)
    assert not any(bm.is_cached(b) for b in a.block_table)
    assert bm.match_prefix(make_seq(list(range(9)))) == []
    bm.free(a)
    stats = bm.stats()
    assert stats.num_evictable_blocks == 0 and stats.prefix_cache_queried_tokens == 0
    check(bm)


def test_fork_shares_full_blocks_by_reference() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    parent, child = make_seq(list(range(10))), make_seq(list(range(10)))
    admit(bm, parent)
    compute(bm, parent, 10)
    bm.fork(parent, child, 2)
    assert child.block_table == parent.block_table[:2]
    assert [bm.ref_count(b) for b in parent.block_table] == [2, 2, 1]
    child.num_computed_tokens = 8
    bm.allocate(child, 10)
    assert child.block_table[2] != parent.block_table[2]
    check(bm, parent, child)
    bm.free(parent)
    assert [bm.ref_count(b) for b in child.block_table] == [1, 1, 1]
    check(bm, child)


def test_check_invariants_catches_a_leak() -> None:
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq([1, 2])
    bm.allocate(seq, 2)
    with pytest.raises(AssertionError):
        bm.check_invariants([])  # the table holding the block was "lost"
