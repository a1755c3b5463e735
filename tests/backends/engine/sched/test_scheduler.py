from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends.engine.sched.block_manager import BlockManager
from backends.engine.sched.admission import QueueFullError, RequestTooLargeError
from backends.engine.sched.output import SchedulerOutput
from backends.engine.sched.scheduler import Scheduler
from backends.engine.sched.sequence import Sequence, SequenceGroup, SequenceStatus
from gateway.interface import SamplingParams

VOCAB = 50
EOS = 0


def next_token(seq: Sequence, vocab: int = VOCAB) -> int:
    """The fake model's choice: a function of the choice index and the whole context only."""
    return random.Random(hash((seq.index, tuple(seq.token_ids)))).randrange(vocab)


class FakeModel:
    """Stands in for the model runner over a paged KV cache.

    Writes, for each new token, a *content key* (a key identifying the whole prefix up to that
    position) into its slot, then "attends": checks every context position of every scheduled
    sequence reads the right key through its block table. A wrong block table, a block shared
    while written, or a cached block evicted while in use all show up as a wrong key.
    """

    def __init__(self, scheduler: Scheduler, vocab: int = VOCAB) -> None:
        bm = scheduler.block_manager
        self.scheduler = scheduler
        self.block_size = bm.block_size
        self.kv: list[int | None] = [None] * (bm.num_blocks * bm.block_size)
        self.vocab = vocab

    @staticmethod
    def prefix_keys(tokens: list[int]) -> Iterator[int]:
        key = 0
        for t in tokens:
            key = hash((key, t))
            yield key

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        bm = self.scheduler.block_manager
        bs = self.block_size
        written: set[int] = set()
        # store (every layer writes the step's new keys/values before attending)
        for s in out.scheduled:
            assert list(s.token_ids) == s.seq.token_ids[s.num_computed_tokens : s.seq_len]
            assert len(s.block_table) * bs >= s.seq_len
            keys = list(self.prefix_keys(s.seq.token_ids[: s.seq_len]))
            for p, slot in zip(s.positions, s.slot_mapping(bs), strict=True):
                block = slot // bs
                assert bm.ref_count(block) == 1, "writing into a shared block"
                assert not bm.is_cached(block), "writing into a cached block"
                assert slot not in written, "two tokens written to one slot"
                written.add(slot)
                self.kv[slot] = keys[p]
        # attend
        for s in out.scheduled:
            keys = list(self.prefix_keys(s.seq.token_ids[: s.seq_len]))
            for p in range(s.seq_len):
                slot = s.block_table[p // bs] * bs + p % bs
                assert self.kv[slot] == keys[p], f"seq {s.seq_id} reads stale KV at position {p}"
        return {s.seq_id: next_token(s.seq, self.vocab) for s in out.scheduled if s.do_sample}

    def step(self) -> tuple[SchedulerOutput, list[Sequence]]:
        out = self.scheduler.schedule()
        return out, self.scheduler.update(out, self.run(out))


def make(
    num_blocks: int = 64,
    block_size: int = 4,
    *,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 128,
    prefix_caching: bool = True,
    **kwargs: object,
) -> tuple[Scheduler, FakeModel]:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    sched = Scheduler(
        bm,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        **kwargs,  # type: ignore[arg-type]
    )
    return sched, FakeModel(sched)


_ids = iter(range(10**9))


def request(prompt: list[int], max_tokens: int | None = 4, n: int = 1, **kw: object) -> SequenceGroup:
    sampling = SamplingParams(max_tokens=max_tokens, n=n, **kw)  # type: ignore[arg-type]
    return SequenceGroup(f"req-{next(_ids)}", prompt, sampling)


def expected_output(group: SequenceGroup, index: int, num_tokens: int) -> list[int]:
    """What a choice generates when run alone with nothing in its way."""
    seq = Sequence(group.leader.prompt_token_ids, group.sampling, index=index)
    for _ in range(num_tokens):
        seq.append_token(next_token(seq))
    return seq.output_token_ids


def check_invariants(sched: Scheduler) -> None:
    bm = sched.block_manager
    bs = bm.block_size
    running = sched.running
    assert len(running) <= sched.max_num_seqs
    assert len({s.seq_id for s in running}) == len(running)
    bm.check_invariants([s.block_table for s in running])
    for seq in running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_table) * bs >= seq.num_computed_tokens
        for i, block in enumerate(seq.block_table):
            if bm.ref_count(block) > 1:  # shared only where full and computed
                assert (i + 1) * bs <= seq.num_computed_tokens
    for seq in sched.waiting:
        assert seq.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    queued = {s.seq_id for s in sched.waiting} | {s.seq_id for s in running}
    assert len(queued) == len(sched.waiting) + len(running)
    for group in sched._groups.values():
        for child in group.pending_children:
            assert child.block_table == [] and child.seq_id not in queued


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled)
    assert out.num_batched_tokens <= sched.max_num_batched_tokens
    assert len(out.scheduled) <= sched.max_num_seqs
    assert len({s.seq_id for s in out.scheduled}) == len(out.scheduled)
    assert all(s.num_new_tokens >= 1 for s in out.scheduled)


def run_to_completion(sched: Scheduler, model: FakeModel, max_steps: int = 10_000) -> list[Sequence]:
    finished: list[Sequence] = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return finished
        out, done = model.step()
        check_step(sched, out)
        check_invariants(sched)
        finished += done
    raise AssertionError("scheduler did not drain: deadlock or livelock")


# -- admission --------------------------------------------------------------------------------


def test_prompt_then_decode() -> None:
    sched, model = make()
    group = request(list(range(1, 11)), max_tokens=3)
    sched.add(group)
    seq = group.leader

    out, done = model.step()
    (s,) = out.scheduled
    assert (s.num_computed_tokens, s.num_new_tokens, s.do_sample) == (0, 10, True)
    assert s.token_ids == tuple(range(1, 11))
    assert list(s.positions) == list(range(10))
    assert s.slot_mapping(4)[4] == s.block_table[1] * 4
    assert seq.status is SequenceStatus.RUNNING and seq.num_output_tokens == 1

    out, _ = model.step()
    (s,) = out.scheduled
    assert (s.num_computed_tokens, s.num_new_tokens, s.do_sample, s.seq_len) == (10, 1, True, 11)
    assert s.token_ids == (seq.token_ids[10],)

    out, done = model.step()
    assert done == [seq] and seq.finish_reason == "length"
    assert seq.output_token_ids == expected_output(group, 0, 3)
    assert seq.block_table == [] and not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 64
    assert sched.schedule().finished_seq_ids == (seq.seq_id,)


def test_waiting_queue_is_bounded() -> None:
    sched, _ = make(max_waiting=2)
    sched.add(request([1, 2]))
    sched.add(request([1, 2]))
    with pytest.raises(QueueFullError) as info:
        sched.add(request([1, 2]))
    assert info.value.max_waiting == 2
    sched.schedule()  # both admitted: room again
    sched.add(request([1, 2]))


def test_duplicate_request_id_is_rejected() -> None:
    sched, _ = make()
    sched.add(SequenceGroup("same", [1], SamplingParams()))
    with pytest.raises(ValueError):
        sched.add(SequenceGroup("same", [1], SamplingParams()))


def test_requests_that_can_never_fit_are_rejected_up_front() -> None:
    sched, _ = make(num_blocks=8, block_size=4, max_model_len=100, max_num_seqs=4)
    assert sched.max_seq_len == 32  # the cache, not the model, is the limit here
    sched.check_request(30, SamplingParams(max_tokens=2))
    with pytest.raises(RequestTooLargeError) as info:
        sched.add(request([1] * 30, max_tokens=3))
    assert info.value.param == "max_tokens"
    with pytest.raises(RequestTooLargeError):
        sched.check_request(32, SamplingParams())  # no room for even one output token
    with pytest.raises(RequestTooLargeError) as info:
        sched.check_request(3, SamplingParams(n=5))
    assert info.value.param == "n"
    with pytest.raises(RequestTooLargeError):
        sched.check_request(3, SamplingParams(max_tokens=0))
    assert not sched.has_unfinished()

    sched, _ = make(num_blocks=1000, max_model_len=16)
    with pytest.raises(RequestTooLargeError):
        sched.check_request(10, SamplingParams(max_tokens=7))


def test_without_max_tokens_a_sequence_stops_at_the_length_limit() -> None:
    sched, model = make(max_model_len=12)
    group = request([1] * 10, max_tokens=None, ignore_eos=True)
    sched.add(group)
    (seq,) = run_to_completion(sched, model)
    assert seq.num_tokens == 12 and seq.finish_reason == "length"


def test_eos_stops_unless_ignored() -> None:
    group = request([5, 6, 7], max_tokens=50)
    first = expected_output(group, 0, 50)
    eos = first[2]
    sched, model = make(eos_token_ids=frozenset({eos}))
    sched.add(group)
    (seq,) = run_to_completion(sched, model)
    assert seq.finish_reason == "stop"
    assert seq.output_token_ids == first[: first.index(eos) + 1]

    sched, model = make(eos_token_ids=frozenset({eos}))
    ignoring = request([5, 6, 7], max_tokens=50, ignore_eos=True)
    sched.add(ignoring)
    (seq,) = run_to_completion(sched, model)
    assert seq.finish_reason == "length" and seq.num_output_tokens == 50


def test_invalid_limits_are_rejected() -> None:
    with pytest.raises(ValueError):
        make(max_num_seqs=0)


def test_schedule_and_update_must_alternate() -> None:
    sched, _ = make()
    assert sched.schedule().is_empty
    sched.add(request([1, 2, 3]))
    out = sched.schedule()
    assert not out.is_empty
    with pytest.raises(RuntimeError):
        sched.schedule()
    stale = SchedulerOutput(scheduled=out.scheduled, num_batched_tokens=3, block_size=4)
    with pytest.raises(RuntimeError):
        sched.update(stale, {})
    sched.update(out, {out.scheduled[0].seq_id: 1})
    assert sched.schedule().num_batched_tokens == 1


# -- budgets and chunked prefill --------------------------------------------------------------


def test_budgets_hold_every_step() -> None:
    sched, model = make(num_blocks=256, max_num_seqs=3, max_num_batched_tokens=16)
    groups = [request(list(range(i, i + 5 + 3 * i)), max_tokens=5) for i in range(10)]
    for g in groups:
        sched.add(g)
    running_seen = 0
    for _ in range(500):
        if not sched.has_unfinished():
            break
        out, _ = model.step()
        check_step(sched, out)
        running_seen = max(running_seen, len(sched.running))
    assert not sched.has_unfinished()
    assert running_seen == 3
    for g in groups:
        assert g.leader.output_token_ids == expected_output(g, 0, 5)


def test_more_decodes_than_budget() -> None:
    sched, model = make(max_num_seqs=4, max_num_batched_tokens=4)
    groups = [request([i, i, i, i], max_tokens=4 + i) for i in range(1, 5)]
    for g in groups:
        sched.add(g)
    model.step()  # the four prompts
    model.step()  # the first decode of each
    sched.max_num_batched_tokens = 2
    out, _ = model.step()
    assert [s.seq_id for s in out.scheduled] == [g.leader.seq_id for g in groups[:2]]  # oldest first
    run_to_completion(sched, model)
    for i, g in enumerate(groups, 1):
        assert g.leader.output_token_ids == expected_output(g, 0, 4 + i)


def test_long_prompt_is_chunked_and_does_not_stall_decodes() -> None:
    sched, model = make(num_blocks=256, max_num_batched_tokens=32, max_model_len=256)
    short = request([1, 2, 3], max_tokens=20)
    sched.add(short)
    model.step()
    long = request(list(range(100)), max_tokens=2)
    sched.add(long)

    chunks = []
    while long.leader.num_output_tokens == 0:
        out, _ = model.step()
        by_id = {s.seq_id: s for s in out.scheduled}
        assert by_id[short.leader.seq_id].num_new_tokens == 1  # the decode runs every step
        s = by_id[long.leader.seq_id]
        chunks.append((s.num_new_tokens, s.do_sample))
        assert out.num_batched_tokens <= 32
    assert chunks == [(31, False), (31, False), (31, False), (7, True)]
    run_to_completion(sched, model)
    assert long.leader.output_token_ids == expected_output(long, 0, 2)


def test_without_chunking_a_prompt_waits_until_it_fits_whole() -> None:
    sched, model = make(
        num_blocks=256, max_num_batched_tokens=20, max_model_len=20, enable_chunked_prefill=False
    )
    decoding = [request([i, i], max_tokens=3) for i in range(1, 4)]
    for g in decoding:
        sched.add(g)
    model.step()  # three 2-token prompts
    big = request(list(range(18)), max_tokens=1)
    sched.add(big)
    out, _ = model.step()  # 3 decode tokens leave 17 < 18
    assert big.leader.seq_id not in {s.seq_id for s in out.scheduled}
    run_to_completion(sched, model)
    assert big.leader.output_token_ids == expected_output(big, 0, 1)


def test_without_chunking_budget_must_cover_the_model_length() -> None:
    with pytest.raises(ValueError):
        make(max_num_batched_tokens=16, max_model_len=32, enable_chunked_prefill=False)


# -- preemption -------------------------------------------------------------------------------


def test_preemption_by_recompute_keeps_outputs_and_finishes() -> None:
    # 6 blocks of 4: two sequences of 4-token prompts each growing to 20 tokens cannot coexist
    sched, model = make(num_blocks=6, block_size=4, max_model_len=24, prefix_caching=False)
    a, b = request([1, 2, 3, 4], max_tokens=16), request([5, 6, 7, 8], max_tokens=16)
    sched.add(a)
    sched.add(b)
    preempted_at = None
    for step in range(200):
        out, _ = model.step()
        check_invariants(sched)
        if out.preempted_seq_ids:
            assert out.preempted_seq_ids == (b.leader.seq_id,)  # the newest goes
            assert sched.waiting[0] is b.leader
            assert b.leader.status is SequenceStatus.PREEMPTED
            assert b.leader.block_table == [] and b.leader.num_output_tokens > 0
            preempted_at = (step, b.leader.num_tokens)
            break
    assert preempted_at is not None
    run_to_completion(sched, model)
    assert a.leader.output_token_ids == expected_output(a, 0, 16)
    assert b.leader.output_token_ids == expected_output(b, 0, 16)
    assert b.leader.num_preemptions >= 1
    stats = sched.stats()
    assert stats.num_preemptions >= 1 and stats.num_running == stats.num_waiting == 0
    assert sched.block_manager.num_free_blocks == 6


def test_recompute_prefill_covers_prompt_and_output() -> None:
    sched, model = make(num_blocks=6, block_size=4, max_model_len=24, prefix_caching=False)
    a, b = request([1, 2, 3, 4], max_tokens=16), request([5, 6, 7, 8], max_tokens=16)
    sched.add(a)
    sched.add(b)
    while not b.leader.num_preemptions:
        model.step()
    num_tokens = b.leader.num_tokens
    while True:
        out, _ = model.step()
        mine = [s for s in out.scheduled if s.seq_id == b.leader.seq_id]
        if mine:
            break
    (s,) = mine
    assert s.num_computed_tokens == 0 and s.num_new_tokens == num_tokens and s.do_sample


def test_the_only_running_sequence_preempts_itself_rather_than_crash() -> None:
    # a long-running sequence, then newer ones that fill the cache: only victims are newer
    sched, model = make(num_blocks=8, block_size=2, max_model_len=16, max_num_batched_tokens=8)
    groups = [request([i] * 3, max_tokens=13, ignore_eos=True) for i in range(1, 5)]
    for g in groups:
        sched.add(g)
    run_to_completion(sched, model)
    for g in groups:
        assert g.leader.output_token_ids == expected_output(g, 0, 13)


# -- prefix caching ---------------------------------------------------------------------------


def test_second_request_with_same_system_prompt_hits_the_cache() -> None:
    sched, model = make(num_blocks=32, block_size=4)
    system = list(range(20, 32))  # 3 blocks
    a = request(system + [1, 2], max_tokens=8)
    sched.add(a)
    model.step()
    model.step()
    b = request(system + [3], max_tokens=2)
    sched.add(b)
    out, _ = model.step()
    s = next(s for s in out.scheduled if s.seq_id == b.leader.seq_id)
    assert (s.num_computed_tokens, s.num_new_tokens) == (12, 1)
    assert b.leader.num_cached_tokens == 12
    bm = sched.block_manager
    assert b.leader.block_table[:3] == a.leader.block_table[:3]
    assert all(bm.ref_count(x) == 2 for x in a.leader.block_table[:3])
    assert bm.stats().prefix_cache_hit_tokens == 12
    run_to_completion(sched, model)
    assert b.leader.output_token_ids == expected_output(b, 0, 2)
    assert bm.stats().num_evictable_blocks > 0  # kept for the next request


def test_recompute_after_preemption_reuses_its_own_cached_blocks() -> None:
    sched, model = make(num_blocks=6, block_size=4, max_model_len=24)
    a, b = request([1, 2, 3, 4], max_tokens=16), request([5, 6, 7, 8], max_tokens=16)
    sched.add(a)
    sched.add(b)
    while not b.leader.num_preemptions:
        model.step()
    num_before = sched.block_manager.stats().prefix_cache_hit_tokens
    run_to_completion(sched, model)
    assert sched.block_manager.stats().prefix_cache_hit_tokens > num_before
    assert b.leader.num_cached_tokens == 0  # usage counts the first admission's prompt hits only
    assert b.leader.output_token_ids == expected_output(b, 0, 16)


def test_cache_hit_after_the_first_request_finished() -> None:
    sched, model = make(num_blocks=32, block_size=4)
    a = request(list(range(9)), max_tokens=1)
    sched.add(a)
    run_to_completion(sched, model)
    b = request(list(range(9)), max_tokens=1)
    sched.add(b)
    out, _ = model.step()
    assert out.scheduled[0].num_computed_tokens == 8
    assert b.leader.output_token_ids == a.leader.output_token_ids


# -- abort and finish -------------------------------------------------------------------------


def test_abort_frees_blocks_immediately() -> None:
    sched, model = make(num_blocks=16, prefix_caching=False)
    g = request(list(range(10)), max_tokens=10)
    sched.add(g)
    model.step()
    assert sched.block_manager.num_free_blocks < 16
    assert sched.abort(g.request_id) == [g.leader]
    assert g.leader.finish_reason == "abort" and g.leader.block_table == []
    assert sched.block_manager.num_free_blocks == 16 and not sched.has_unfinished()
    assert sched.schedule().finished_seq_ids == (g.leader.seq_id,)
    assert sched.abort(g.request_id) == []  # idempotent


def test_abort_between_schedule_and_update() -> None:
    sched, model = make(num_blocks=16)
    g, other = request([1, 2, 3]), request([4, 5, 6])
    sched.add(g)
    sched.add(other)
    out = sched.schedule()
    sampled = model.run(out)
    sched.abort(g.request_id)
    finished = sched.update(out, sampled)
    assert finished == [] and g.leader.num_output_tokens == 0
    assert other.leader.num_output_tokens == 1
    check_invariants(sched)


def test_abort_waiting_request() -> None:
    sched, _ = make(max_num_seqs=1)
    a, b = request([1]), request([2])
    sched.add(a)
    sched.add(b)
    sched.update(sched.schedule(), {a.leader.seq_id: 3})
    assert list(sched.waiting) == [b.leader]
    sched.abort(b.request_id)
    assert not sched.waiting and b.leader.finish_reason == "abort"


def test_finish_one_choice_with_stop() -> None:
    sched, model = make()
    g = request([1, 2, 3], max_tokens=10)
    sched.add(g)
    model.step()
    assert sched.finish(g.leader.seq_id, "stop") is g.leader
    assert g.leader.finish_reason == "stop" and not sched.has_unfinished()
    assert sched.finish(g.leader.seq_id, "stop") is None
    assert sched.get_group(g.request_id) is None


# -- n > 1 ------------------------------------------------------------------------------------


def test_n_choices_share_prompt_blocks() -> None:
    sched, model = make(num_blocks=32, block_size=4, prefix_caching=False)
    g = request(list(range(10)), max_tokens=5, n=3)
    sched.add(g)
    out, _ = model.step()
    assert [s.seq_id for s in out.scheduled] == [g.leader.seq_id]  # only the leader prefills
    leader, c1, c2 = g.seqs
    assert g.is_forked
    bm = sched.block_manager
    shared = leader.block_table[:2]  # (10 - 1) // 4 full blocks
    assert c1.block_table == shared and c2.block_table == shared
    assert [bm.ref_count(b) for b in shared] == [3, 3]
    assert sched.running == [leader, c1, c2]
    assert c1.num_cached_tokens == 8

    out, _ = model.step()
    by_id = {s.seq_id: s for s in out.scheduled}
    assert by_id[leader.seq_id].num_new_tokens == 1
    for child in (c1, c2):  # each computes the rest of the prompt into a block of its own
        s = by_id[child.seq_id]
        assert (s.num_computed_tokens, s.num_new_tokens, s.do_sample) == (8, 2, True)
        assert s.block_table[2] not in leader.block_table
    check_invariants(sched)
    run_to_completion(sched, model)
    for i, seq in enumerate(g.seqs):
        assert seq.output_token_ids == expected_output(g, i, 5)
    assert len({tuple(s.output_token_ids) for s in g.seqs}) == 3
    assert bm.num_free_blocks == 32


def test_n_choices_reserve_their_slots() -> None:
    sched, model = make(max_num_seqs=3)
    g = request([1, 2, 3], n=3)
    other = request([4, 5])
    sched.add(g)
    sched.add(other)
    out, _ = model.step()
    assert [s.seq_id for s in out.scheduled] == [g.leader.seq_id]  # other must wait for slots
    run_to_completion(sched, model)
    assert other.leader.output_token_ids == expected_output(other, 0, 4)


def test_abort_before_fork_finishes_every_choice() -> None:
    sched, _ = make()
    g = request(list(range(10)), n=3)
    sched.add(g)
    assert sched.abort(g.request_id) == g.seqs
    assert all(s.finish_reason == "abort" for s in g.seqs)
    assert not sched.has_unfinished()
    assert set(sched.schedule().finished_seq_ids) == {s.seq_id for s in g.seqs}


# -- random operations ------------------------------------------------------------------------


def simulate(
    rng: random.Random,
    *,
    num_blocks: int,
    block_size: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    chunked: bool,
    prefix_caching: bool,
    num_steps: int,
) -> int:
    """Random adds, aborts and stops around steps; checks invariants every step, then drains.

    Returns the number of preemptions seen (so callers can check the cache was under pressure).
    """
    max_model_len = 48
    if not chunked:
        max_num_batched_tokens = max(max_num_batched_tokens, max_model_len)
    sched, model = make(
        num_blocks,
        block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        prefix_caching=prefix_caching,
        enable_chunked_prefill=chunked,
        max_waiting=12,
        eos_token_ids=frozenset({EOS}),
    )
    prefixes = [[rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 20))] for _ in range(3)]
    groups: list[SequenceGroup] = []
    stopped: set[int] = set()  # seq ids finished by a fake stop string

    for step in range(num_steps + 10_000):
        ops = step < num_steps
        if ops:
            for _ in range(rng.choice((0, 0, 1, 1, 2))):
                prompt = rng.choice(prefixes)[: rng.randrange(0, 20)]
                prompt = prompt + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 16))]
                max_tokens = rng.choice((None, 1, 3, 8, 20))
                g = request(prompt, max_tokens=max_tokens, n=rng.choice((1, 1, 1, 2, 3)))
                try:
                    sched.add(g)
                    groups.append(g)
                except RequestTooLargeError:
                    assert len(prompt) + (max_tokens or 1) > sched.max_seq_len or g.sampling.n > max_num_seqs
                except QueueFullError:
                    assert len(sched.waiting) >= 12
            if groups and rng.random() < 0.05:
                sched.abort(rng.choice(groups).request_id)
        elif not sched.has_unfinished():
            break

        out = sched.schedule()
        check_step(sched, out)
        check_invariants(sched)
        sampled = model.run(out)
        if ops and out.scheduled and rng.random() < 0.05:  # abort mid-step
            sched.abort(rng.choice(out.scheduled).seq.group.request_id)  # type: ignore[union-attr]
        sched.update(out, sampled)
        check_invariants(sched)
        if ops and sched.running and rng.random() < 0.05:  # a stop string matched
            seq = rng.choice(sched.running)
            if seq.num_output_tokens:
                sched.finish(seq.seq_id, "stop")
                stopped.add(seq.seq_id)
    else:
        raise AssertionError("scheduler did not drain: deadlock or livelock")

    assert not sched.running and not sched.waiting and not sched._groups
    stats = sched.block_manager.stats()
    assert stats.num_free_blocks == num_blocks and stats.num_used_blocks == 0
    sched.block_manager.check_invariants([])
    for g in groups:
        for seq in g.seqs:
            assert seq.is_finished and seq.block_table == []
            assert seq.num_cached_tokens < seq.num_prompt_tokens  # prompt tokens, first admission
            if seq.finish_reason == "abort":
                continue
            # preemption, chunking and sharing never change what a choice generates
            assert seq.output_token_ids == expected_output(g, seq.index, seq.num_output_tokens)
            if seq.seq_id in stopped:
                continue
            out_ids = seq.output_token_ids
            if seq.finish_reason == "stop":
                assert out_ids[-1] == EOS and EOS not in out_ids[:-1]
            else:
                assert seq.finish_reason == "length" and EOS not in out_ids
                limit = g.sampling.max_tokens
                assert seq.num_output_tokens == limit or seq.num_tokens == sched.max_seq_len
    return sched.stats().num_preemptions


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_seeded(seed: int) -> None:
    rng = random.Random(seed)
    num_preemptions = simulate(
        rng,
        num_blocks=14,
        block_size=4,
        max_num_seqs=6,
        max_num_batched_tokens=24,
        chunked=seed % 3 != 2,
        prefix_caching=seed % 2 == 0,
        num_steps=700,
    )
    assert num_preemptions > 0  # the cache is small enough to force preemption


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    num_blocks=st.integers(12, 40),
    block_size=st.sampled_from([1, 2, 4, 8]),
    max_num_seqs=st.integers(3, 8),
    max_num_batched_tokens=st.integers(1, 64),
    chunked=st.booleans(),
    prefix_caching=st.booleans(),
)
def test_random_operations_property(
    seed: int,
    num_blocks: int,
    block_size: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    chunked: bool,
    prefix_caching: bool,
) -> None:
    simulate(
        random.Random(seed),
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        chunked=chunked,
        prefix_caching=prefix_caching,
        num_steps=120,
    )


def test_discard_forgets_a_failed_step_and_the_next_one_runs() -> None:
    from backends.engine.sched.block_manager import BlockManager
    from backends.engine.sched.scheduler import Scheduler
    from backends.engine.sched.sequence import SequenceGroup
    from gateway.interface import SamplingParams

    scheduler = Scheduler(BlockManager(8, 4), max_num_seqs=2, max_num_batched_tokens=16, max_model_len=32)
    scheduler.add(SequenceGroup("a", [1, 2, 3], SamplingParams(max_tokens=2)))
    failed = scheduler.schedule()
    scheduler.discard(failed)
    scheduler.abort("a")
    assert scheduler.block_manager.stats().num_used_blocks == 0
    scheduler.add(SequenceGroup("b", [4, 5], SamplingParams(max_tokens=1)))
    out = scheduler.schedule()
    (sched,) = out.scheduled
    finished = scheduler.update(out, {sched.seq_id: 9})
    assert [s.output_token_ids for s in finished] == [[9]]
