"""Where a request goes: a group's deployments by least in-flight requests, failed ones cooled
down and probed back, then the fallbacks.

A deployment's ``Health`` has three standings:

- *healthy*: balanced with the others of its group (fewest requests in flight first; ties in
  turn, round robin);
- *cooling down* for ``cooldown_s`` after a failure before its first byte (502/503/504: a
  connect error, a 5xx, a timeout), or while its backend says so (``cooling_down_until``, e.g.
  the ``openai`` backend's own breaker), or its start failed: tried only after every other
  candidate of the request, fallbacks included — a dead upstream costs no request while others
  answer, and a model with nothing else to try is still tried;
- *probing* once the cooldown is over: the next request picking the group goes to it first, and
  only that one; its success (any answer, even a 4xx) makes it healthy, its failure cools it
  down again, a request that ends without a verdict (the client left) frees the probe.

A deployment whose backend is not ready (loading) comes after the ready ones of its group,
before the fallbacks: a model loading on demand still gets its requests when it is alone.

Every decision is taken in one event-loop step with the request's ``Route.acquire``, so two
requests never take the same probe and in-flight counts are exact; no lock is needed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

import structlog

if TYPE_CHECKING:
    from gateway.router import Group, Route

log = structlog.get_logger("taxiway.balance")

Standing = Literal["healthy", "cooling", "probe"]


class Health:
    """One deployment's standing with the balancer (module docstring); times are ``now`` values
    of one monotonic clock, passed in so that tests drive it."""

    __slots__ = ("is_probing", "num_failures", "reason", "until")

    def __init__(self) -> None:
        self.until: float | None = None  # set: cooling down until then, probed back after
        self.is_probing = False
        self.reason = ""
        self.num_failures = 0

    def standing(self, now: float) -> Standing:
        if self.until is None:
            return "healthy"
        return "cooling" if now < self.until or self.is_probing else "probe"

    def begin(self, now: float) -> bool:
        """A request goes to this deployment: True when it is the probe (the caller then gives a
        verdict with ``failed``/``succeeded`` or frees it with ``settle``)."""
        if self.standing(now) != "probe":
            return False
        self.is_probing = True
        return True

    def failed(self, now: float, cooldown_s: float, reason: str) -> None:
        self.is_probing = False
        self.num_failures += 1
        if cooldown_s > 0:
            self.until = now + cooldown_s
            self.reason = reason

    def succeeded(self) -> None:
        self.is_probing = False
        self.until = None
        self.reason = ""

    def settle(self, is_probe: bool) -> None:
        if is_probe:
            self.is_probing = False


def candidates(chain: Sequence[Group], now: float) -> list[Route]:
    """Every deployment of ``chain`` (a group, then its fallbacks) in the order a request tries
    them: per group its probe, its healthy deployments by fewest in flight (ties round robin),
    its loading ones; then every cooling-down one. Unloaded deployments are left out."""
    ordered: list[Route] = []
    cooling: list[Route] = []
    for group in chain:
        probes: list[Route] = []
        ready: list[tuple[int, int, Route]] = []
        loading: list[Route] = []
        num = len(group.routes)
        turn = group.next_turn()
        for i, route in enumerate(group.routes):
            if route.phase == "stopped":
                continue
            standing = route.health.standing(now)
            state = route.backend.ready()
            if standing == "cooling" or route.backend.cooling_down_until() is not None or state.failed:
                cooling.append(route)
            elif standing == "probe":
                probes.append(route)
            elif state.ready:
                ready.append((route.num_in_flight, (i - turn) % num, route))
            else:
                loading.append(route)
        ready.sort(key=lambda entry: entry[:2])
        ordered += (*probes, *(route for _, _, route in ready), *loading)
    return ordered + cooling


def pick(chain: Sequence[Group], tried: Iterable[Route], now: float) -> Route | None:
    """The first candidate not ``tried`` yet, or None when none is left."""
    if len(chain) == 1 and len(chain[0].routes) == 1:  # one deployment, no fallback: nothing to weigh
        route = chain[0].routes[0]
        return None if route.phase == "stopped" or route in tried else route
    seen = set(tried)
    return next((route for route in candidates(chain, now) if route not in seen), None)
