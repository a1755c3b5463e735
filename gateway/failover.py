"""One request's way through its candidates, until one of them answers.

A request is counted in on one deployment at a time (``Route.acquire``). When the backend fails
before its answer starts — the first item of a stream, an embedding result — with a 429 or a
5xx, the request moves to the next candidate (``gateway.balance``: the group's other
deployments, then the fallbacks) and is tried there, each candidate once. Once the answer has
started nothing is retried: the client would see output twice.

Each outcome is the deployment's verdict for the balancer: 502/503/504 (connect error, upstream
5xx, timeout, not serving) cools it down; any answer, a 4xx included, shows it alive.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import structlog

from gateway.balance import pick
from gateway.errors import TaxiwayError
from gateway.router import Group, Route

log = structlog.get_logger("taxiway.failover")

T = TypeVar("T")

_COOLING_STATUSES = (502, 503, 504)


def is_retryable(error: TaxiwayError) -> bool:
    """Another deployment may answer: rate-limited, failing, unreachable, timed out."""
    return error.status_code == 429 or error.status_code >= 500


class Attempts:
    """Where one request is counted in, and where it goes next.

    ``prepare(route)`` is the request as that route takes it (normalised for its public name and
    capabilities). ``admit`` must run in the event-loop step of the routing-table lookup (so a
    reload's drain sees the request); ``release`` once the response has ended.
    """

    def __init__(
        self,
        chain: Sequence[Group],
        prepare: Callable[[Route], Any],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chain = chain
        self._prepare = prepare
        self._clock = clock
        self.tried: list[Route] = []
        self.route: Route | None = None
        self.request: Any = None
        self._is_probe = False  # this request took the current route's probe, no verdict yet
        self._refusals: list[tuple[bool, TaxiwayError]] = []  # (not the requested model's, error)

    def admit(self) -> Route:
        """Count the request in on its first candidate that takes it. A client error from the
        requested model raises (a parameter it lacks: its answer, not a failure); when no
        candidate takes the request, the first refusal raises, or an unloaded model's 503."""
        taken = self._next_taker(is_admission=True)
        if taken is None:
            if self._refusals:
                raise min(self._refusals, key=lambda refusal: refusal[0])[1]
            self.chain[0].routes[0].acquire()  # every deployment is unloaded: this raises the 503
            raise AssertionError("a route was left out though not unloaded")
        self.request = taken[1]
        self._enter(taken[0])
        return taken[0]

    async def answer(self, call: Callable[[Route, Any], Awaitable[T]]) -> T:
        """``call(route, request)`` on the current candidate, then on the next ones while it fails
        with a retryable error; the last failure raises when no candidate is left."""
        while True:
            route = self.route
            assert route is not None, "admit first"
            try:
                result = await call(route, self.request)
            except TaxiwayError as error:
                self._judge(route, error)
                if not is_retryable(error) or not self._move_on():
                    raise
                log.warning("request.failover", model=route.name, to=self.route.name,  # type: ignore[union-attr]
                            status=error.status_code, error=error.message)  # fmt: skip
                continue
            self._is_probe = False
            route.health.succeeded()
            return result

    def release(self) -> None:
        """The response has ended: count the request out (and free a probe left without verdict)."""
        route, self.route = self.route, None
        if route is not None:
            route.release()
            route.health.settle(self._is_probe)
            self._is_probe = False

    # -----------------------------------------------------------------------------------------

    def _enter(self, route: Route) -> None:
        route.acquire()
        self.tried.append(route)
        self.route = route
        self._is_probe = route.health.begin(self._clock())

    def _judge(self, route: Route, error: TaxiwayError) -> None:
        was_probe, self._is_probe = self._is_probe, False
        if error.status_code in _COOLING_STATUSES:
            route.health.failed(self._clock(), route.cooldown_s, error.message)
            log.warning("route.cooling_down", model=route.name, backend=route.backend_name,
                        cooldown_s=route.cooldown_s, error=error.message)  # fmt: skip
        elif error.status_code < 500:
            route.health.succeeded()
        else:  # a bug (500) says nothing of the deployment
            route.health.settle(was_probe)

    def _move_on(self) -> bool:
        """Count the request over to the next candidate that takes it; False when none is left
        (the request stays counted on the last one)."""
        taken = self._next_taker()
        if taken is None:
            return False
        self.release()
        self.request = taken[1]
        self._enter(taken[0])
        return True

    def _next_taker(self, *, is_admission: bool = False) -> tuple[Route, Any] | None:
        """The next candidate and the request prepared for it, skipping those that refuse it (a
        fallback lacking a parameter, capabilities unknown while loading)."""
        while (route := pick(self.chain, self.tried, self._clock())) is not None:
            try:
                return route, self._prepare(route)
            except TaxiwayError as exc:
                is_requested = route in self.chain[0].routes
                if is_admission and is_requested and not is_retryable(exc):
                    raise
                log.info("request.candidate_skipped", model=route.name, error=exc.message)
                self.tried.append(route)
                self._refusals.append((not is_requested, exc))
        return None
