"""Which waiting inputs the encoder runs together in its next step. Plain Python, no torch.

Every input of every request waits as one ``EncodeItem``. A step is one padded forward over a
group of inputs, so its cost is ``len(group) * max(length)`` token slots; the scheduler keeps that
under ``max_batch_tokens`` and within ``max_batch_size`` inputs, and keeps the padding small by
taking inputs of similar length: the group grows around the **oldest** waiting input, one
neighbour in length order at a time, always the one that adds the fewest padding slots.

Contract:
- the oldest waiting input is in every step, so nothing waits forever, however many short or long
  inputs keep arriving (an input longer than the budget runs alone);
- a request with more inputs than one step holds is split across steps, its inputs interleaved
  with other requests' by length;
- ``cancel(job)`` drops a job's inputs that have not run.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Sequence
from typing import Any


class EncodeItem:
    """One input: ``job`` (opaque to the scheduler) and the input's ``index`` in it."""

    __slots__ = ("arrival", "index", "job", "length", "second", "token_ids")

    def __init__(self, job: Any, index: int, token_ids: list[int], arrival: int, second: int | None = None) -> None:
        self.job = job
        self.index = index
        self.token_ids = token_ids
        self.second = second  # a text pair's: where the second text starts
        self.length = len(token_ids)
        self.arrival = arrival

    def sort_key(self) -> tuple[int, int]:
        return (self.length, self.arrival)


class EncoderScheduler:
    def __init__(self, *, max_batch_tokens: int, max_batch_size: int) -> None:
        assert max_batch_tokens > 0 and max_batch_size > 0
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self._by_length: list[tuple[tuple[int, int], EncodeItem]] = []  # sorted by (length, arrival)
        self._arrivals = itertools.count()

    @property
    def num_waiting(self) -> int:
        return len(self._by_length)

    def add(self, job: Any, inputs: Iterable[list[int]], seconds: Sequence[int] | None = None) -> None:
        for index, token_ids in enumerate(inputs):
            second = None if seconds is None else seconds[index]
            item = EncodeItem(job, index, token_ids, next(self._arrivals), second)
            bisect.insort(self._by_length, (item.sort_key(), item))

    def cancel(self, job: Any) -> None:
        self._by_length = [entry for entry in self._by_length if entry[1].job is not job]

    def schedule_all(self) -> list[EncodeItem]:
        """Every waiting input, removed (at shutdown)."""
        items = [entry[1] for entry in self._by_length]
        self._by_length = []
        return items

    def schedule(self) -> list[EncodeItem]:
        """The next step's inputs, shortest first (removed from the waiting set); [] when none wait."""
        if not self._by_length:
            return []
        entries = self._by_length
        oldest = min(range(len(entries)), key=lambda i: entries[i][1].arrival)
        lo, hi = oldest, oldest + 1  # the group is entries[lo:hi]
        max_len = entries[oldest][1].length
        while hi - lo < self.max_batch_size:
            count = hi - lo
            # padding slots each neighbour would add: a shorter one pads itself up to max_len, a
            # longer one pads every member up to its own length
            left = max_len - entries[lo - 1][1].length if lo > 0 else None
            right = count * (entries[hi][1].length - max_len) if hi < len(entries) else None
            if left is not None and (right is None or left <= right):
                if (count + 1) * max_len > self.max_batch_tokens:
                    break
                lo -= 1
            elif right is not None:
                new_max = entries[hi][1].length
                if (count + 1) * new_max > self.max_batch_tokens:
                    break
                max_len = new_max
                hi += 1
            else:
                break
        group = [entry[1] for entry in entries[lo:hi]]
        del entries[lo:hi]
        return group
