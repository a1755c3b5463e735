"""Rate-limit state: the checks every store makes, and the in-process store.

A request is admitted against one or more ``Scope``s (its virtual key's, its model's) at once:
every limit of every scope is checked first, and only when all pass is anything taken, so a
request refused by its model's limit does not use up its key's. The limits:

- requests per minute: a sliding window of the admission times of the last 60 s (exact: never
  more than ``rpm`` admissions in any 60 s);
- tokens per minute: a token bucket of ``tpm`` tokens refilled continuously (``tpm`` per 60 s);
  admission takes the estimate (prompt + ``max_tokens``), the end gives back what was not used;
- requests in flight: a counter, taken at admission and given back at the end;
- tokens per UTC day (a key's budget): the real usage, added at the end; refused once used up.

``RedisStore`` (``plugins.limits.redis_store``) keeps the same state in Redis with Lua scripts
doing exactly these steps, so that every gateway replica shares it. Times here are ``time.time()``.
"""

from __future__ import annotations

import time
from collections import deque

import msgspec

WINDOW_S = 60.0
DAY_S = 86400.0


class Scope(msgspec.Struct, frozen=True):
    """One thing limited: ``name`` ("key:<id>", "model:<name>") and its limits (None: none)."""

    name: str
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_tokens_per_day: int | None = None


class Decision(msgspec.Struct):
    """An admission's outcome, and the first scope's standing for the ``x-ratelimit-*`` headers.

    Refused: ``scope`` is the index of the scope whose ``limit`` ("requests", "tokens",
    "parallel", "budget") refused it, ``retry_after_s`` when to try again (None: never, a
    request larger than the whole token limit).
    """

    admitted: bool
    scope: int = -1
    limit: str = ""
    retry_after_s: float | None = 0.0
    remaining_requests: int = 0
    reset_requests_s: float = 0.0
    remaining_tokens: int = 0
    reset_tokens_s: float = 0.0


class _State:
    __slots__ = ("budget_day", "budget_used", "level", "level_at", "parallel", "times")

    def __init__(self) -> None:
        self.times: deque[float] = deque()
        self.level: float | None = None
        self.level_at = 0.0
        self.parallel = 0
        self.budget_day = 0
        self.budget_used = 0

    def refill(self, tpm: int, now: float) -> float:
        level = tpm if self.level is None else min(tpm, self.level + (now - self.level_at) * tpm / WINDOW_S)
        self.level, self.level_at = level, now
        return level


class MemoryStore:
    """The limits of this process alone (``[limits] storage = "memory"``, the default)."""

    def __init__(self) -> None:
        self._states: dict[str, _State] = {}

    def _state(self, name: str) -> _State:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = _State()
        return state

    async def acquire(self, scopes: tuple[Scope, ...], tokens: int, member: str) -> Decision:
        now = time.time()
        day = int(now // DAY_S)
        states = [self._state(scope.name) for scope in scopes]
        # check every limit of every scope before taking anything
        for i, (scope, state) in enumerate(zip(scopes, states, strict=True)):
            if scope.rpm is not None:
                times = state.times
                while times and times[0] <= now - WINDOW_S:
                    times.popleft()
                if len(times) >= scope.rpm:
                    wait = times[0] + WINDOW_S - now if times else WINDOW_S
                    return Decision(admitted=False, scope=i, limit="requests", retry_after_s=wait)
            if scope.tpm is not None:
                level = state.refill(scope.tpm, now)
                if tokens > level:
                    wait = None if tokens > scope.tpm else (tokens - level) * WINDOW_S / max(scope.tpm, 1)
                    return Decision(admitted=False, scope=i, limit="tokens", retry_after_s=wait)
            if scope.max_parallel is not None and state.parallel >= scope.max_parallel:
                return Decision(admitted=False, scope=i, limit="parallel", retry_after_s=1.0)
            if scope.budget_tokens_per_day is not None:
                used = state.budget_used if state.budget_day == day else 0
                if used >= scope.budget_tokens_per_day:
                    return Decision(admitted=False, scope=i, limit="budget", retry_after_s=(day + 1) * DAY_S - now)
        # all pass: take
        decision = Decision(admitted=True)
        for i, (scope, state) in enumerate(zip(scopes, states, strict=True)):
            if scope.rpm is not None:
                state.times.append(now)
                if i == 0:
                    decision.remaining_requests = scope.rpm - len(state.times)
                    decision.reset_requests_s = state.times[0] + WINDOW_S - now
            if scope.tpm is not None:
                assert state.level is not None
                state.level -= tokens
                if i == 0:
                    decision.remaining_tokens = max(0, int(state.level))
                    decision.reset_tokens_s = (scope.tpm - state.level) * WINDOW_S / max(scope.tpm, 1)
            if scope.max_parallel is not None:
                state.parallel += 1
        return decision

    async def release(self, scopes: tuple[Scope, ...], reserved: int, used: int) -> None:
        now = time.time()
        day = int(now // DAY_S)
        for scope in scopes:
            state = self._state(scope.name)
            if scope.tpm is not None:
                state.refill(scope.tpm, now)
                assert state.level is not None
                state.level = min(scope.tpm, state.level + reserved - used)
            if scope.max_parallel is not None:
                state.parallel = max(0, state.parallel - 1)
            if scope.budget_tokens_per_day is not None:
                if state.budget_day != day:
                    state.budget_day, state.budget_used = day, 0
                state.budget_used += used

    async def close(self) -> None:
        pass
