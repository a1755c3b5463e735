"""An upstream's health as the ``openai`` backend sees it: connect retries with backoff, and the
cooldown after a failure.

Retries (``retry_delays``): only a failure to *connect* is retried, never one after the request
was sent — a POST that reached the upstream may have started generating, and a retry would
duplicate it.

Cooldown (``Cooldown``), a circuit breaker, off unless ``cooldown_s`` is set: the gateway's own
per-entry cooldown (``gateway/balance.py``) already tries a failed deployment after every other
candidate; this one makes the backend refuse at once, for a caller better served by a fast 503 than
by waiting on a dead upstream's timeouts. Three states:

- *healthy*: requests go to the upstream;
- *cooling down* for ``cooldown_s`` after a failure (connect error once retries are spent, a 5xx,
  a timeout, the connection lost mid-answer): requests are refused at once with a 503 whose
  Retry-After is the time left, so a caller (the gateway's balancer or fallbacks) goes elsewhere
  instead of waiting on a dead upstream; ``ready()`` says why;
- *probing* once the cooldown is over: the first request goes through; others are refused (503,
  Retry-After 1) until it settles. Its success (any answer below 500) makes the upstream healthy;
  its failure cools it down again. A probe that ends without a verdict (the client left) frees the
  slot for the next request.

State changes only on the event loop, so no lock is needed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import msgspec
import structlog

from gateway.errors import ServiceUnavailableError

log = structlog.get_logger(__name__)

RETRY_BASE_S = 0.1  # the first retry's delay; each next one doubles
RETRY_MAX_S = 2.0  # the longest delay between two connect attempts


def retry_delays(retries: int) -> Iterator[float]:
    """The waits before each of ``retries`` connect retries: 0.1, 0.2, 0.4 … s, at most 2 s."""
    for attempt in range(retries):
        yield min(RETRY_MAX_S, RETRY_BASE_S * 2**attempt)


class UpstreamStats(msgspec.Struct, frozen=True, kw_only=True):
    """The ``openai`` backend's statistics (``/v1/models/{model}/stats``)."""

    cooling_down_s: float  # time left in the cooldown; 0 when healthy or probing
    cooldown_reason: str
    num_failures: int  # failures that started a cooldown (or would have, with cooldown_s = 0)
    num_connect_retries: int


class Cooldown:
    """One upstream's breaker (see the module docstring). ``cooldown_s = 0`` turns it off."""

    def __init__(self, model_name: str, cooldown_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.model_name = model_name
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._until: float | None = None  # set: cooling down, then probing once it is past
        self._reason = ""
        self._probing = False
        self.num_failures = 0
        self.num_connect_retries = 0  # counted by the caller that retries

    def stats(self) -> UpstreamStats:
        until = self.until
        return UpstreamStats(
            cooling_down_s=0.0 if until is None else round(until - self._clock(), 3),
            cooldown_reason=self.reason,
            num_failures=self.num_failures,
            num_connect_retries=self.num_connect_retries,
        )

    @property
    def until(self) -> float | None:
        """The ``clock()`` instant the cooldown ends, while it lasts; None otherwise."""
        if self._until is not None and self._clock() < self._until:
            return self._until
        return None

    @property
    def reason(self) -> str:
        """Why it is cooling down (empty when healthy)."""
        return self._reason if self._until is not None else ""

    def admit(self) -> bool:
        """Before a request: True when it goes through as the probe (``settle`` it); False when the
        upstream is healthy. ``ServiceUnavailableError`` (503 with Retry-After) while cooling down
        or while another request probes."""
        if self._until is None:
            return False
        left = self._until - self._clock()
        if left > 0:
            raise ServiceUnavailableError(
                f"the model '{self.model_name}' is cooling down for {left:.1f} s after its upstream failed: {self._reason}",
                headers={"Retry-After": str(max(1, math.ceil(left)))},
            )
        if self._probing:
            raise ServiceUnavailableError(
                f"the model '{self.model_name}' is being probed after its upstream failed: {self._reason}",
                headers={"Retry-After": "1"},
            )
        self._probing = True
        return True

    def failed(self, reason: str) -> None:
        """The upstream failed: cool down for ``cooldown_s`` from now."""
        self._probing = False
        self.num_failures += 1
        if self.cooldown_s <= 0:
            return
        self._until = self._clock() + self.cooldown_s
        self._reason = reason
        log.warning("upstream.cooling_down", model=self.model_name, cooldown_s=self.cooldown_s, reason=reason)

    def succeeded(self) -> None:
        """The upstream answered: healthy."""
        self._probing = False
        if self._until is not None:
            log.info("upstream.recovered", model=self.model_name)
        self._until = None
        self._reason = ""

    def settle(self, probe: bool) -> None:
        """After a request with neither verdict (the client left): frees the probe slot."""
        if probe:
            self._probing = False
