"""``SequenceMatchers``: one llguidance matcher per constrained sequence, like ``ModelRunner``'s
per-sequence generators — made at the sequence's first sample, advanced with each token it
samples, dropped when it finishes.

Per step: ``start(seqs)`` computes the token masks of the constrained rows on a helper thread
(llguidance releases the GIL) while the forward pass runs; ``Masks.wait()`` gives the rows and
their bitmask for the sampler; ``advance`` feeds the sampled tokens back. A preempted sequence
keeps its matcher: recomputation re-reads its tokens, it does not sample them again.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from concurrent.futures import Future, ThreadPoolExecutor

import structlog
import torch

from backends.engine.sched.sequence import Sequence
from backends.engine.structured.grammar import GrammarCompiler

log = structlog.get_logger(__name__)


class Masks:
    """The constrained rows of one step's sampling batch and their ``int32[R, ceil(V/32)]`` bitmask
    (bit ``t % 32`` of word ``t // 32`` set: token ``t`` allowed), maybe still being computed."""

    def __init__(self, rows: list[int], bitmask: torch.Tensor, done: Future[None] | None) -> None:
        self.rows = rows
        self.bitmask = bitmask
        self._done = done

    def wait(self) -> tuple[list[int], torch.Tensor]:
        if self._done is not None:
            self._done.result()
            self._done = None
        return self.rows, self.bitmask


class SequenceMatchers:
    def __init__(self, compiler: GrammarCompiler) -> None:
        self.compiler = compiler
        self._matchers: dict[int, object] = {}  # seq_id -> llguidance.LLMatcher
        self._pool: ThreadPoolExecutor | None = None
        self._words = (compiler.vocab_size + 31) // 32

    def start(self, seqs: SequenceABC[Sequence]) -> Masks | None:
        """Begin the masks of this step's sampling rows ``seqs``; None when none is constrained."""
        rows = [row for row, seq in enumerate(seqs) if seq.sampling.structured is not None]
        if not rows:
            return None
        matchers = [self._matcher(seqs[row]) for row in rows]
        bitmask = torch.empty(len(rows), self._words, dtype=torch.int32)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="taxiway-grammar")
        return Masks(rows, bitmask, self._pool.submit(self._fill, matchers, bitmask))

    def advance(self, seqs: SequenceABC[Sequence], token_ids: SequenceABC[int]) -> None:
        """Feed each constrained sequence the token it sampled."""
        for seq, token in zip(seqs, token_ids, strict=True):
            matcher = self._matchers.get(seq.seq_id)
            if matcher is not None and not matcher.consume_token(token):  # type: ignore[attr-defined]
                log.error("structured.rejected_token", seq_id=seq.seq_id, token=token, error=matcher.get_error())  # type: ignore[attr-defined]

    def forget(self, seq_ids: SequenceABC[int]) -> None:
        for seq_id in seq_ids:
            self._matchers.pop(seq_id, None)

    def _matcher(self, seq: Sequence) -> object:
        matcher = self._matchers.get(seq.seq_id)
        if matcher is None:
            spec = seq.sampling.structured
            assert spec is not None
            matcher = self._matchers[seq.seq_id] = self.compiler.matcher(spec)
        return matcher

    def _fill(self, matchers: list[object], bitmask: torch.Tensor) -> None:
        eos = sorted(self.compiler.tokenizer.eos_token_ids)
        for k, matcher in enumerate(matchers):
            row = bitmask[k]
            if matcher.is_error():  # type: ignore[attr-defined]
                # never expected (every sampled token was allowed); end the sequence, do not free it
                row.zero_()
                for token in eos:
                    bit = 1 << (token % 32)
                    row[token // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32 words
                continue
            matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())  # type: ignore[attr-defined]

