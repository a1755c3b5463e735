"""Iteration-level scheduling over a paged KV cache.

Plain Python, no torch. The engine loop is::

    out = scheduler.schedule()            # which tokens of which sequences run this step
    sampled = model_runner.run(out)       # {seq_id: token_id} for each ``do_sample`` row
    finished = scheduler.update(out, sampled)

Requests join and leave the running batch at every step. Each step has a token budget
(``max_num_batched_tokens``) and a cap on running sequences (``max_num_seqs``):

1. *decode*: every running sequence with one token left to compute gets it, oldest first.
2. *running prefills*: what is left of the budget goes, oldest first, to running sequences with a
   prompt (or a recompute) still to finish, in chunks with chunked prefill, so a long prompt never
   stalls running decodes.
3. Blocks for those tokens are allocated oldest first. When the cache runs out the newest running
   sequence is *preempted by recompute*: its blocks are freed and it goes back to the front of
   the waiting queue keeping its output; its next prefill covers prompt and output so far.
4. If nothing was preempted, waiting sequences are admitted first come first served (stopping at
   the first that does not fit), reusing cached prefix blocks, until budget, slots or blocks run out.
   A request whose LoRA adapter would make more than ``max_loras`` distinct adapters run at once
   is passed over, keeping its place, until one of them has no running sequence (as vLLM does).

No deadlock: ``add`` rejects a request that could outgrow the whole cache, waiting sequences hold
no blocks, and the oldest running sequence is never a victim, so it always gets its blocks and
finishes.

Not thread-safe: the engine calls ``add``/``abort``/``finish`` between steps, from its step loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping

import structlog

from backends.engine.sched.admission import QueueFullError, check_request
from backends.engine.sched.block_manager import BlockManager
from backends.engine.sched.output import ScheduledSequence, SchedulerOutput, SchedulerStats
from backends.engine.sched.sequence import Sequence, SequenceGroup, SequenceStatus
from gateway.interface import FinishReason, SamplingParams

log = structlog.get_logger(__name__)


class Scheduler:
    """Decides, each step, which tokens run; owns the sequences' KV blocks through ``block_manager``."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        enable_chunked_prefill: bool = True,
        max_waiting: int = 1024,
        eos_token_ids: frozenset[int] = frozenset(),
        max_loras: int | None = None,
    ) -> None:
        if min(max_num_seqs, max_num_batched_tokens, max_model_len, max_waiting) < 1:
            raise ValueError("scheduler limits must be at least 1")
        if not enable_chunked_prefill and max_num_batched_tokens < max_model_len:
            # without chunking a whole prompt must fit one step, or it would wait forever
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least max_model_len "
                f"({max_model_len}) without chunked prefill"
            )
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.max_waiting = max_waiting
        self.eos_token_ids = eos_token_ids
        self.max_loras = max_loras  # distinct LoRA adapters among running sequences (None: no adapters)
        self.waiting: deque[Sequence] = deque()  # FIFO; preempted sequences re-enter at the front
        self.running: list[Sequence] = []  # oldest first; the last is the next preemption victim
        self._groups: dict[str, SequenceGroup] = {}  # unfinished requests
        self._seqs: dict[int, Sequence] = {}  # their unfinished sequences
        self._finished_ids: list[int] = []  # since the last schedule()
        self._in_flight: SchedulerOutput | None = None
        self._num_preemptions = 0

    # -- admission ------------------------------------------------------------------------------

    @property
    def max_seq_len(self) -> int:
        """Longest sequence (prompt + output) this engine can hold: the model's and the cache's limit."""
        bm = self.block_manager
        return min(self.max_model_len, bm.num_blocks * bm.block_size)

    def check_request(self, num_prompt_tokens: int, sampling: SamplingParams) -> None:
        """Raise ``RequestTooLargeError`` if such a request could never be served (``admission``)."""
        check_request(num_prompt_tokens, sampling, max_seq_len=self.max_seq_len, max_num_seqs=self.max_num_seqs)

    def add(self, group: SequenceGroup) -> None:
        """Queue a request. Raises ``RequestTooLargeError`` or ``QueueFullError``."""
        self.check_request(group.num_prompt_tokens, group.sampling)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFullError(self.max_waiting)
        if group.request_id in self._groups:
            raise ValueError(f"duplicate request id {group.request_id!r}")
        self._groups[group.request_id] = group
        self._seqs.update((s.seq_id, s) for s in group.seqs)
        self.waiting.append(group.leader)

    def get_group(self, request_id: str) -> SequenceGroup | None:
        return self._groups.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step -------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens. Call ``update`` with the result before the next ``schedule``."""
        if self._in_flight is not None:
            raise RuntimeError("schedule() called before update() of the previous step")
        bm = self.block_manager
        budget = self.max_num_batched_tokens

        # plan: decodes first, then running prefills in what is left
        planned: dict[int, int] = {}
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncomputed_tokens == 1:
                planned[seq.seq_id] = 1
                budget -= 1
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncomputed_tokens > 1:
                n = self._chunk(seq.num_uncomputed_tokens, budget)
                if n:
                    planned[seq.seq_id] = n
                    budget -= n

        # allocate, oldest first; preempt from the newest end when the cache runs out
        scheduled: list[ScheduledSequence] = []
        preempted: list[int] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            n = planned.get(seq.seq_id, 0)
            if n == 0:
                i += 1
                continue
            need = bm.num_new_blocks(seq, seq.num_computed_tokens + n)
            while not bm.can_allocate(need) and self.running[-1] is not seq:
                victim = self.running[-1]
                budget += planned.pop(victim.seq_id, 0)
                self._preempt(victim)
                preempted.append(victim.seq_id)
            if not bm.can_allocate(need):
                # seq is the newest left; it yields to the older ones
                budget += planned.pop(seq.seq_id)
                self._preempt(seq)
                preempted.append(seq.seq_id)
                break
            bm.allocate(seq, seq.num_computed_tokens + n)
            scheduled.append(self._scheduled(seq, n))
            i += 1

        # admit waiting sequences, first come first served, unless memory is already short
        if not preempted:
            budget -= self._admit(budget, scheduled)

        out = SchedulerOutput(
            scheduled=tuple(scheduled),
            num_batched_tokens=self.max_num_batched_tokens - budget,
            block_size=bm.block_size,
            preempted_seq_ids=tuple(preempted),
            finished_seq_ids=tuple(self._finished_ids),
        )
        self._finished_ids = []
        if scheduled:
            self._in_flight = out
        return out

    def update(self, out: SchedulerOutput, sampled: Mapping[int, int]) -> list[Sequence]:
        """Record that ``out`` ran: advance computed tokens, append ``sampled`` tokens
        (``{seq_id: token_id}`` for every ``do_sample`` row), finish sequences that hit EOS,
        ``max_tokens`` or the length limit, freeing their blocks. Returns the newly finished.

        Sequences aborted since ``schedule()`` are skipped.
        """
        if out.scheduled and out is not self._in_flight:
            raise RuntimeError("update() with an output that is not the step in flight")
        self._in_flight = None
        bm = self.block_manager
        finished: list[Sequence] = []
        for sched in out.scheduled:
            seq = sched.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted between schedule() and update()
            assert seq.num_computed_tokens == sched.num_computed_tokens
            seq.num_computed_tokens += sched.num_new_tokens
            bm.cache_full_blocks(seq, sched.num_computed_tokens)
            if not sched.do_sample:
                continue
            group = seq.group
            if group is not None and not group.is_forked and seq is group.leader:
                self._fork(group)
            seq.append_token(sampled[seq.seq_id])
            reason = self._stop_reason(seq)
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def discard(self, out: SchedulerOutput) -> None:
        """The step ``out`` failed: forget it without advancing any sequence. Nothing it wrote
        was published to the prefix cache (that happens in ``update``); the caller aborts the
        requests it carried."""
        if out.scheduled and out is not self._in_flight:
            raise RuntimeError("discard() with an output that is not the step in flight")
        self._in_flight = None

    def finish(self, seq_id: int, reason: FinishReason) -> Sequence | None:
        """Finish one choice now (e.g. a stop string matched) and free its blocks.

        Finishing a leader that has not forked yet finishes its whole request.
        """
        seq = self._seqs.get(seq_id)
        if seq is not None:
            self._finish(seq, reason)
        return seq

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished choice of a request with reason ``abort``; frees their blocks."""
        group = self._groups.get(request_id)
        if group is None:
            return []
        aborted = [s for s in group.seqs if not s.is_finished]
        for seq in aborted:
            if not seq.is_finished:  # an unforked leader's finish takes its children along
                self._finish(seq, "abort")
        return aborted

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_preemptions=self._num_preemptions,
            blocks=self.block_manager.stats(),
        )

    # -- internals ------------------------------------------------------------------------------

    def _chunk(self, num_uncomputed: int, budget: int) -> int:
        """Tokens of a prefill that fit ``budget``: a chunk, or all-or-nothing without chunking."""
        if self.enable_chunked_prefill:
            return min(num_uncomputed, budget)
        return num_uncomputed if num_uncomputed <= budget else 0

    def _admit(self, budget: int, scheduled: list[ScheduledSequence]) -> int:
        """Move waiting sequences into the batch; returns the tokens they use."""
        bm = self.block_manager
        # an unforked leader holds slots for the choices it will fork
        num_slots = sum(1 + self._num_pending(s) for s in self.running)
        used = 0
        # a request whose adapter would exceed max_loras waits (in its place) for one to finish
        loras = {s.group.lora_id for s in self.running if s.group is not None} - {0}
        skipped: list[Sequence] = []
        while self.waiting and used < budget:
            seq = self.waiting[0]
            lora_id = seq.group.lora_id if seq.group is not None else 0
            if lora_id and lora_id not in loras and len(loras) >= (self.max_loras or 0):
                skipped.append(self.waiting.popleft())
                continue
            slots = 1 + self._num_pending(seq)
            if num_slots + slots > self.max_num_seqs:
                break
            hits = bm.match_prefix(seq)
            num_hit_tokens = len(hits) * bm.block_size
            n = self._chunk(seq.num_tokens - num_hit_tokens, budget - used)
            if n == 0:
                break
            if not bm.can_allocate(bm.num_blocks_to_admit(seq, hits, num_hit_tokens + n)):
                break
            self.waiting.popleft()
            bm.allocate_cached(seq, hits)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_hit_tokens
            seq.num_computed_tokens = num_hit_tokens
            bm.allocate(seq, num_hit_tokens + n)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(self._scheduled(seq, n))
            num_slots += slots
            used += n
            if lora_id:
                loras.add(lora_id)
        self.waiting.extendleft(reversed(skipped))
        return used

    @staticmethod
    def _num_pending(seq: Sequence) -> int:
        return len(seq.group.pending_children) if seq.group is not None else 0

    def _scheduled(self, seq: Sequence, n: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        return ScheduledSequence(
            seq=seq,
            num_computed_tokens=start,
            num_new_tokens=n,
            token_ids=tuple(seq.token_ids[start : start + n]),
            block_table=tuple(seq.block_table),
            do_sample=start + n == seq.num_tokens,
        )

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first for a recompute; its tokens are kept."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.appendleft(seq)
        log.debug("scheduler.preempted", seq_id=seq.seq_id, num_tokens=seq.num_tokens)

    def _fork(self, group: SequenceGroup) -> None:
        """Start the other choices off the leader's computed prompt (see ``sequence`` module doc).

        They share the leader's full prompt blocks except that the last prompt token always stays
        for each to compute (its logits are the choice's first sample), and they take the slots
        reserved at the leader's admission, right after the leader in age order.
        """
        leader = group.leader
        bm = self.block_manager
        num_shared_blocks = (leader.num_prompt_tokens - 1) // bm.block_size
        children = group.pending_children
        group.is_forked = True
        at = self.running.index(leader) + 1
        for child in children:
            bm.fork(leader, child, num_shared_blocks)
            child.num_computed_tokens = num_shared_blocks * bm.block_size
            child.num_cached_tokens = child.num_computed_tokens
            child.status = SequenceStatus.RUNNING
        self.running[at:at] = children

    def _stop_reason(self, seq: Sequence) -> FinishReason | None:
        if seq.last_token_id in self.eos_token_ids and not seq.sampling.ignore_eos:
            return "stop"
        max_tokens = seq.sampling.max_tokens
        if (max_tokens is not None and seq.num_output_tokens >= max_tokens) or (
            seq.num_tokens >= self.max_seq_len
        ):
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        group = seq.group
        del self._seqs[seq.seq_id]
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED) and seq in self.waiting:
            self.waiting.remove(seq)
        seq.finish(reason)
        self._finished_ids.append(seq.seq_id)
        if group is not None:
            if seq is group.leader and not group.is_forked:
                for child in group.pending_children:
                    del self._seqs[child.seq_id]
                    child.finish(reason)
                    self._finished_ids.append(child.seq_id)
            if group.is_finished:
                del self._groups[group.request_id]
