from __future__ import annotations

import pytest

from backends.engine.sched.sequence import Sequence, SequenceGroup, SequenceStatus
from gateway.interface import SamplingParams


def test_sequence_tracks_prompt_output_and_uncomputed_tokens() -> None:
    seq = Sequence([1, 2, 3], SamplingParams(), arrival_time=5.0)
    assert seq.status is SequenceStatus.WAITING
    assert (seq.num_tokens, seq.num_prompt_tokens, seq.num_output_tokens) == (3, 3, 0)
    assert seq.num_uncomputed_tokens == 3 and seq.is_prefill
    assert seq.arrival_time == 5.0

    seq.num_computed_tokens = 3
    seq.append_token(9)
    assert seq.token_ids == [1, 2, 3, 9]
    assert seq.prompt_token_ids == [1, 2, 3] and seq.output_token_ids == [9]
    assert seq.last_token_id == 9
    assert seq.num_uncomputed_tokens == 1 and not seq.is_prefill


def test_sequence_copies_its_prompt() -> None:
    prompt = [1, 2]
    seq = Sequence(prompt, SamplingParams())
    seq.append_token(3)
    assert prompt == [1, 2]


def test_sequence_ids_are_unique() -> None:
    ids = {Sequence([1], SamplingParams()).seq_id for _ in range(100)}
    assert len(ids) == 100


def test_empty_prompt_is_rejected() -> None:
    with pytest.raises(ValueError):
        Sequence([], SamplingParams())


def test_finish_records_reason() -> None:
    seq = Sequence([1], SamplingParams())
    seq.finish("length")
    assert seq.is_finished and seq.finish_reason == "length"


def test_group_of_one_needs_no_fork() -> None:
    group = SequenceGroup("r", [1, 2], SamplingParams())
    assert len(group.seqs) == 1 and group.is_forked
    assert group.leader.group is group and group.pending_children == []


def test_group_of_n_shares_prompt_and_arrival() -> None:
    group = SequenceGroup("r", [1, 2, 3], SamplingParams(n=3), arrival_time=1.0)
    assert [s.index for s in group.seqs] == [0, 1, 2]
    assert all(s.prompt_token_ids == [1, 2, 3] and s.arrival_time == 1.0 for s in group.seqs)
    assert not group.is_forked
    assert group.pending_children == group.seqs[1:]
    assert group.num_prompt_tokens == 3

    group.seqs[0].append_token(7)  # choices own their token lists
    assert group.seqs[1].token_ids == [1, 2, 3]

    group.seqs[2].finish("abort")
    assert group.pending_children == [group.seqs[1]]
    assert not group.is_finished
    for s in group.seqs:
        s.finish("abort")
    assert group.is_finished


def test_group_rejects_n_below_one() -> None:
    with pytest.raises(ValueError):
        SequenceGroup("r", [1], SamplingParams(n=0))
