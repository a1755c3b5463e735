"""Sequences: one choice of one request, as the scheduler and block manager see it.

Plain Python, no torch. A ``SequenceGroup`` is one request; it holds ``n`` ``Sequence`` objects
(choice ``i`` is ``seqs[i]``) that share the prompt.

Sharing the prompt for ``n > 1``: only the first sequence (the *leader*) is queued and prefilled.
When the leader's prompt is complete the scheduler *forks* the group: every other choice takes a
reference on the leader's full prompt blocks (no copy) and gets its own block for the rest of the
prompt, whose few tokens (at most one block's worth, at least one) it computes itself. So no block
is ever copied and no block is written by two sequences; the price is recomputing less than one
block of prompt per extra choice.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Sequence as SequenceABC
from typing import Any

from gateway.interface import FinishReason, SamplingParams

_seq_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or an ``n > 1`` choice waiting for its leader to fork it
    RUNNING = "running"  # in the running batch; holds blocks
    PREEMPTED = "preempted"  # lost its blocks to preemption; queued to be recomputed
    FINISHED = "finished"  # done (see ``finish_reason``); holds nothing


class Sequence:
    """Token ids and KV-cache bookkeeping of one choice.

    ``token_ids`` is the prompt followed by the output so far; it only ever grows. The first
    ``num_computed_tokens`` of it have their keys/values in the cache, in the blocks listed by
    ``block_table`` (token ``p`` lives in block ``block_table[p // block_size]`` at offset
    ``p % block_size``). The remaining tokens are what the next steps must run; a sequence whose
    only uncomputed token is its newest output is decoding.
    """

    __slots__ = (
        "seq_id",
        "index",
        "group",
        "sampling",
        "arrival_time",
        "token_ids",
        "num_prompt_tokens",
        "status",
        "finish_reason",
        "num_computed_tokens",
        "num_cached_tokens",
        "num_preemptions",
        "block_table",
        "block_hashes",
    )

    def __init__(
        self,
        prompt_token_ids: SequenceABC[int],
        sampling: SamplingParams,
        *,
        arrival_time: float | None = None,
        index: int = 0,
        group: SequenceGroup | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id: int = next(_seq_ids)
        self.index = index  # choice index within the request (``Delta.index``)
        self.group = group
        self.sampling = sampling
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed_tokens = 0
        # Prompt tokens served without computing them at first admission: prefix-cache hits, or
        # for a forked choice the prompt blocks shared with its leader. Reported as cached tokens.
        self.num_cached_tokens = 0
        self.num_preemptions = 0
        self.block_table: list[int] = []
        # Memo of the prefix-cache hash chain of this sequence's full blocks (entry ``i`` is the
        # hash of block ``i``). Owned by the BlockManager. Tokens never change once appended, so
        # it stays valid across preemption.
        self.block_hashes: list[bytes] = []

    # -- sizes --------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_prefill(self) -> bool:
        """More than one token to compute: the prompt, or the recompute after a preemption."""
        return self.num_uncomputed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # -- changes ------------------------------------------------------------------------------

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def finish(self, reason: FinishReason) -> None:
        """Mark finished. Freeing its blocks is the caller's job (the scheduler's)."""
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, status={self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )


class SequenceGroup:
    """One request: ``sampling.n`` choices over one prompt.

    ``seqs[0]`` is the leader. Until ``is_forked`` the other choices hold no blocks and are not
    queued; the scheduler forks them off the leader when its prompt is computed (see module doc).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: SequenceABC[int],
        sampling: SamplingParams,
        *,
        arrival_time: float | None = None,
        lora: Any = None,
    ) -> None:
        if sampling.n < 1:
            raise ValueError(f"n must be at least 1, got {sampling.n}")
        self.request_id = request_id
        self.sampling = sampling
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        # the LoRA adapter every choice runs with (``lora.adapter.LoRAAdapter``; opaque here but for
        # its ``lora_id``), None for the base model
        self.lora = lora
        self.seqs: list[Sequence] = [
            Sequence(
                prompt_token_ids, sampling, arrival_time=self.arrival_time, index=i, group=self
            )
            for i in range(sampling.n)
        ]
        self.is_forked = sampling.n == 1

    @property
    def lora_id(self) -> int:
        """The adapter's id, unique per load (0: the base model): what the scheduler counts
        against ``max_loras`` and the prefix cache keys blocks by."""
        return 0 if self.lora is None else self.lora.lora_id

    @property
    def leader(self) -> Sequence:
        return self.seqs[0]

    @property
    def num_prompt_tokens(self) -> int:
        return self.leader.num_prompt_tokens

    @property
    def pending_children(self) -> list[Sequence]:
        """Choices still waiting to be forked off the leader."""
        if self.is_forked:
            return []
        return [s for s in self.seqs[1:] if not s.is_finished]

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def __repr__(self) -> str:
        return f"SequenceGroup({self.request_id!r}, n={len(self.seqs)}, forked={self.is_forked})"
