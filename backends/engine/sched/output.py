"""What one scheduler step hands the model runner (``SchedulerOutput``, one ``ScheduledSequence``
per sequence) and the scheduler's counters (``SchedulerStats``). Plain records, no torch."""

from __future__ import annotations

import msgspec

from backends.engine.sched.block_manager import BlockManagerStats
from backends.engine.sched.sequence import Sequence


class ScheduledSequence(msgspec.Struct, frozen=True, kw_only=True):
    """One sequence's share of a step: compute ``token_ids`` at positions
    ``num_computed_tokens .. num_computed_tokens + num_new_tokens - 1``.

    ``block_table`` covers every position up to ``seq_len``; the new tokens' keys/values go to
    ``slot_mapping()``. ``do_sample``: the chunk reaches the last known token, so its last row's
    logits are sampled; otherwise it is a non-final prefill chunk and produces no token.
    """

    seq: Sequence
    num_computed_tokens: int  # context already in the cache before this step
    num_new_tokens: int
    token_ids: tuple[int, ...]  # the new tokens (len == num_new_tokens)
    block_table: tuple[int, ...]
    do_sample: bool

    @property
    def seq_id(self) -> int:
        return self.seq.seq_id

    @property
    def seq_len(self) -> int:
        """Context length after this step (``AttentionMetadata.seq_lens``)."""
        return self.num_computed_tokens + self.num_new_tokens

    @property
    def positions(self) -> range:
        return range(self.num_computed_tokens, self.seq_len)

    def slot_mapping(self, block_size: int) -> list[int]:
        """Flat KV slot ``block * block_size + offset`` of each new token."""
        table = self.block_table
        return [table[p // block_size] * block_size + p % block_size for p in self.positions]


class SchedulerOutput(msgspec.Struct, frozen=True, kw_only=True):
    """One step. ``scheduled``: running sequences oldest first, then the newly admitted ones.

    ``preempted_seq_ids`` lost their blocks this step; ``finished_seq_ids`` finished or were
    aborted since the previous ``schedule()``: the runner can drop per-sequence state (sampler
    generators, penalties) for both.
    """

    scheduled: tuple[ScheduledSequence, ...]
    num_batched_tokens: int
    block_size: int
    preempted_seq_ids: tuple[int, ...] = ()
    finished_seq_ids: tuple[int, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class SchedulerStats(msgspec.Struct, frozen=True, kw_only=True):
    num_running: int
    num_waiting: int
    num_preemptions: int  # since start
    blocks: BlockManagerStats
