"""Admission: which requests the scheduler refuses, and why.

A request is refused before it is queued when it could never be served (``RequestTooLargeError``,
HTTP 400) or when the waiting queue is full (``QueueFullError``, HTTP 429). The first check is
what the scheduler's no-deadlock argument rests on (``scheduler`` module doc): every choice can
reach its longest length alone in the whole cache.
"""

from __future__ import annotations

from gateway.interface import SamplingParams


class SchedulerError(Exception):
    """Base of the scheduler's refusals; the engine backend maps them to gateway errors."""


class QueueFullError(SchedulerError):
    """The waiting queue is at ``max_waiting``: shed load (HTTP 429 with Retry-After)."""

    def __init__(self, max_waiting: int) -> None:
        super().__init__(f"too many requests waiting (max_waiting={max_waiting})")
        self.max_waiting = max_waiting


class RequestTooLargeError(SchedulerError):
    """The request could never be served by this engine (HTTP 400); ``param`` names the cause."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_request(num_prompt_tokens: int, sampling: SamplingParams, *, max_seq_len: int, max_num_seqs: int) -> None:
    """Raise ``RequestTooLargeError`` if such a request could never be served by an engine that
    holds ``max_seq_len`` tokens per sequence and runs ``max_num_seqs`` sequences at once."""
    if sampling.max_tokens is not None and sampling.max_tokens < 1:
        raise RequestTooLargeError("max_tokens must be at least 1", param="max_tokens")
    if num_prompt_tokens + (sampling.max_tokens or 1) > max_seq_len:
        raise RequestTooLargeError(
            f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({sampling.max_tokens or 1}) "
            f"exceeds the {max_seq_len}-token limit",
            param="max_tokens" if sampling.max_tokens else "messages",
        )
    if sampling.n > max_num_seqs:
        raise RequestTooLargeError(f"n={sampling.n} exceeds max_num_seqs={max_num_seqs}", param="n")
