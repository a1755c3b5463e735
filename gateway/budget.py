"""The memory budget: which models are loaded, which load on a request, which are evicted for room.

Accounting is by each model's declared need (``Backend.memory_required()``, known before
loading; None or 0 for what the budget does not count, a proxy). A model holds its need from
the moment its load is decided until it is stopped, draining included, so two loads decided at
once never both count the same free bytes.

Invariants:

- a model with requests in flight is never evicted: a victim is a serving, idle (0 in flight),
  unpinned model that is not itself loading; it is marked stopped in the same event-loop step as
  the decision, so no request can be admitted to it afterwards (``Route.acquire`` refuses);
- victims go least-recently-used first (``Route.last_used``, then config order);
- concurrent requests for one unloaded model share one load (``_loads``);
- a model unloaded through the admin API stays unloaded (a 503 naming the load route) until it is
  loaded through the admin API again; every other stopped model — ``load = "on_demand"``, evicted,
  expired after ``keep_alive`` — loads on its next request.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import msgspec
import structlog

from gateway.errors import ConfigError, ServiceUnavailableError

if TYPE_CHECKING:
    from gateway.config import ModelEntry, Settings
    from gateway.router import Group, Route, Router

log = structlog.get_logger("taxiway.budget")

_RETRY_AFTER_S = 5
_EXPIRY_POLL_S = 0.5
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")
_DURATION = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*$")
_SECONDS = {"ms": 0.001, "": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(value: int | str | None, path: str) -> int | None:
    """``"8GiB"``, ``"512MiB"``, ``"1.5GB"`` or a number of bytes; None is unlimited."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.match(str(value).lower())
        if match is None or match.group(2) not in _UNITS:
            raise ConfigError(f"not a size: {value!r} (e.g. \"8GiB\", \"512MiB\" or bytes)", path=path)
        size = int(float(match.group(1)) * _UNITS[match.group(2)])
    if size <= 0:
        raise ConfigError("must be greater than 0", path=path)
    return size


def parse_seconds(value: float | str, path: str) -> float:
    """Seconds, or ``"30s"``, ``"5m"``, ``"1h"``; ``-1`` is forever."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).lower())
        if match is None:
            raise ConfigError(f"not a duration: {value!r} (seconds, \"5m\", \"1h\", or -1 for never)", path=path)
        seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    if seconds < 0 and seconds != -1:
        raise ConfigError("must be -1 (never) or not negative", path=path)
    return seconds


def format_size(num_bytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.1f} {unit}"
    return f"{num_bytes} B"


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """One entry's ``load``, ``keep_alive`` (seconds, -1 never) and ``pin``."""

    is_eager: bool = True
    keep_alive_s: float = -1.0
    is_pinned: bool = False

    @classmethod
    def of(cls, entry: ModelEntry) -> Policy:
        return cls(is_eager=entry.load == "eager", keep_alive_s=parse_seconds(entry.keep_alive, "keep_alive"),
                   is_pinned=entry.pin)  # fmt: skip


def required(route: Route) -> int:
    """What ``route`` counts against the budget."""
    return route.backend.memory_required() or 0


def check_budget(settings: Settings, router: Router) -> None:
    """A ``ConfigError`` naming ``models[i]`` whose need exceeds the whole budget."""
    max_bytes = parse_size(settings.server.memory_budget, "server.memory_budget")
    if max_bytes is None:
        return
    for i, route in enumerate(router.routes):
        need = required(route)
        if need > max_bytes:
            raise ConfigError(f"the model '{route.name}' needs {format_size(need)}, more than the whole "
                              f"memory budget {format_size(max_bytes)}", path=f"models[{i}]")  # fmt: skip


class Budget:
    """The budget of one fleet. ``bind`` gives it the fleet's routes and actions."""

    def __init__(self, settings: Settings, router: Router) -> None:
        self.max_bytes: int | None = None
        self.load_timeout_s = 120.0
        self.policies: dict[bytes, Policy] = {}  # by Route.key: a kept route keeps its key
        self.held_down: set[Route] = set()  # unloaded through the admin API
        self._loads: dict[Route, asyncio.Task[None]] = {}
        self._idle_since: dict[Route, float] = {}  # Unix time
        self._needs: dict[bytes, int] = {}
        self._expiry: asyncio.Task[None] | None = None
        self.configure(settings, router)
        self._routes: Callable[[], Iterable[Route]] = lambda: router.routes
        self._start: Callable[[Route], Awaitable[None]] | None = None
        self._stop: Callable[[Route], Awaitable[None]] | None = None
        self._wait_ready: Callable[[Route, float], Awaitable[None]] | None = None

    def configure(self, settings: Settings, router: Router) -> None:
        """Take ``settings``' budget and ``router``'s policies (at start and on each reload: the
        new budget applies to the loads and evictions decided after it; nothing is evicted for it)."""
        check_budget(settings, router)
        self.max_bytes = parse_size(settings.server.memory_budget, "server.memory_budget")
        self.load_timeout_s = settings.server.load_timeout_s
        for route, entry in zip(router.routes, settings.models, strict=True):
            self.policies[route.key] = Policy.of(entry)

    def bind(
        self,
        routes: Callable[[], Iterable[Route]],
        start: Callable[[Route], Awaitable[None]],
        stop: Callable[[Route], Awaitable[None]],
        wait_ready: Callable[[Route, float], Awaitable[None]],
    ) -> None:
        self._routes, self._start, self._stop, self._wait_ready = routes, start, stop, wait_ready

    def policy(self, route: Route) -> Policy:
        return self.policies.get(route.key, Policy())

    def need(self, route: Route) -> int:
        """``required(route)``, asked once per deployment (it reads file headers), and only when
        there is a budget (a catalogue model's would be pulled to answer)."""
        if self.max_bytes is None:
            return 0
        need = self._needs.get(route.key)
        if need is None:
            need = self._needs[route.key] = required(route)
        return need

    # -----------------------------------------------------------------------------------------
    # decisions (synchronous: each in one event-loop step)

    def held(self) -> int:
        return sum(self.need(r) for r in self._routes() if r.phase != "stopped")

    def eager_fit(self, routes: Sequence[Route]) -> list[Route]:
        """Of ``routes`` (about to start, in config order), the eager ones that fit beside what is
        held, none evicted; the rest are marked stopped (they load on their first request)."""
        chosen: list[Route] = []
        for route in routes:
            route.phase = "stopped"
        # at start ``routes`` are in the table, on a reload not yet: count them here either way
        held = self.held()
        for route in routes:
            if not self.policy(route).is_eager:
                continue
            need = self.need(route)
            if self._fits(need, held):
                route.phase = "starting"
                chosen.append(route)
                held += need
            else:
                log.warning("budget.not_loaded", model=route.name, needs=need, held=held, budget=self.max_bytes)
        return chosen

    def _fits(self, need: int, held: int | None = None) -> bool:
        return self.max_bytes is None or (self.held() if held is None else held) + need <= self.max_bytes

    def make_room(self, route: Route) -> list[Route]:
        """The idle models to evict, least recently used first, so that ``route`` fits; marks them
        stopped. A 503 with Retry-After naming the budget when nothing can make room."""
        need = self.need(route)
        if self._fits(need):
            return []
        assert self.max_bytes is not None
        victims: list[Route] = []
        free = self.max_bytes - self.held()
        for victim in sorted(self._evictable(route), key=lambda r: r.last_used or 0.0):
            if free >= need:
                break
            victims.append(victim)
            free += self.need(victim)
        if free < need:
            raise ServiceUnavailableError(
                f"memory budget {format_size(self.max_bytes)}: {format_size(self.held())} held by models in use, "
                f"'{route.name}' needs {format_size(need)}",
                param="model", headers={"Retry-After": str(_RETRY_AFTER_S)},
            )  # fmt: skip
        for victim in victims:
            victim.phase = "stopped"
        return victims

    def _evictable(self, loading: Route) -> list[Route]:
        # list order is config order, kept by the stable sort among equal last_used
        return [r for r in self._routes()
                if r is not loading and r.phase == "serving" and r.num_in_flight == 0 and self.need(r) > 0
                and not self.policy(r).is_pinned and r not in self._loads]  # fmt: skip

    # -----------------------------------------------------------------------------------------
    # loading

    async def ensure_loaded(self, chain: Sequence[Group]) -> None:
        """Before a request is admitted: when no deployment of its model is started, load one
        (sharing a load under way) and wait, at most ``load_timeout_s``. Returns at once when one
        is started, when every deployment was unloaded through the admin API (admission says
        503), or when there is no room but a fallback is loaded (admission goes to it)."""
        group = chain[0]
        pending = next((self._loads[r] for r in group.routes if r in self._loads), None)
        if pending is None:
            if any(r.phase != "stopped" for r in group.routes):
                return
            route = next((r for r in group.routes if r not in self.held_down), None)
            if route is None:
                return
            try:
                pending = self._begin_load(route)
            except ServiceUnavailableError as exc:
                if not any(r.phase != "stopped" for fallback in chain[1:] for r in fallback.routes):
                    raise
                log.info("budget.no_room", model=route.name, error=exc.message)  # a fallback answers
                return
        try:
            await asyncio.wait_for(asyncio.shield(pending), self.load_timeout_s)
        except TimeoutError:
            raise ServiceUnavailableError(
                f"The model '{group.name}' is still loading after {self.load_timeout_s:g} s",
                param="model", headers={"Retry-After": str(_RETRY_AFTER_S)},
            ) from None  # fmt: skip

    async def load(self, route: Route) -> None:
        """Load ``route`` now (the admin API): evicting for room as a request would."""
        self.held_down.discard(route)
        if route in self._loads:
            await asyncio.shield(self._loads[route])
        elif route.phase == "stopped":
            await self._begin_load(route)

    def loads_on_request(self, route: Route) -> bool:
        """``route`` is unloaded but its next request loads it, or is loading for a request: not
        "not ready" (``/ready``)."""
        return route in self._loads or (route.phase == "stopped" and route not in self.held_down)

    def hold_down(self, route: Route) -> None:
        self.held_down.add(route)

    def _begin_load(self, route: Route) -> asyncio.Task[None]:
        victims = self.make_room(route)  # raises the 503 before anything changes
        route.phase = "starting"
        task = asyncio.get_running_loop().create_task(self._load(route, victims))
        self._loads[route] = task
        task.add_done_callback(lambda done: self._loaded(route, done))
        return task

    def _loaded(self, route: Route, task: asyncio.Task[None]) -> None:
        self._loads.pop(route, None)
        if not task.cancelled() and task.exception() is not None:  # retrieved: its waiters got it, or none waits
            log.warning("budget.load_failed", model=route.name, error=str(task.exception()))

    async def _load(self, route: Route, victims: list[Route]) -> None:
        assert self._start is not None and self._stop is not None and self._wait_ready is not None
        for victim in victims:
            log.info("budget.evicted", model=victim.name, frees=self.need(victim), for_model=route.name)
            await self._stop(victim)
        log.info("budget.loading", model=route.name, needs=self.need(route), held=self.held())
        try:
            await self._start(route)
            await self._wait_ready(route, time.monotonic() + self.load_timeout_s)
        except BaseException:
            await self._stop(route)
            raise
        self._idle_since[route] = time.time()

    # -----------------------------------------------------------------------------------------
    # keep_alive

    def open(self) -> None:
        """Start the keep_alive expiry (the fleet has started)."""
        self._expiry = asyncio.get_running_loop().create_task(self._expire_forever())

    def close(self) -> None:
        """Stop the expiry and the loads under way (the fleet stops every model next)."""
        for task in (*self._loads.values(), *([self._expiry] if self._expiry else [])):
            task.cancel()

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(_EXPIRY_POLL_S)
            await self.expire(time.time())

    async def expire(self, now: float) -> None:
        assert self._stop is not None
        expired = []
        for route in self._routes():
            keep_alive_s = self.policy(route).keep_alive_s
            is_idle = route.phase == "serving" and route.num_in_flight == 0 and route not in self._loads
            if not is_idle or not route.backend.ready().ready:
                self._idle_since.pop(route, None)  # busy or not loaded: idle from the next look on
                continue
            # a request that came and went between two looks still counts (last_used: its start)
            idle_since = max(self._idle_since.setdefault(route, now), route.last_used or 0.0)
            if keep_alive_s >= 0 and now - idle_since >= keep_alive_s:
                route.phase = "stopped"  # in this step: no request is admitted to it any more
                expired.append(route)
        for route in expired:
            self._idle_since.pop(route, None)
            log.info("budget.expired", model=route.name, keep_alive_s=self.policy(route).keep_alive_s)
            await self._stop(route)
