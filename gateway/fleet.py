"""The served models and their lifetimes: started before serving, reloaded as a diff, drained, stopped.

A reload (``Fleet.reload``) never leaves the gateway without an answer for a name it serves:

1. the new config is read and validated whole (``read_config``: the same checks as
   ``taxiway check-config``); invalid, nothing changes and the ``ConfigError`` names the key;
2. entries are matched by ``entry_key`` (name, backend, options): an unchanged entry keeps its
   ``Route`` and backend instance (no reload, its streams untouched, its health kept), whatever
   its aliases, fallbacks and cooldown;
3. the new instances (added entries, and the new version of a changed one) start beside the old
   ones and are awaited until ``ready()``; one that fails or times out stops them all and the old
   table keeps serving;
4. the routing table is swapped in one synchronous step, so a request resolves either wholly
   against the old table or wholly against the new one — names and aliases may move between
   entries in the same swap;
5. the instances no longer routed drain (their in-flight requests finish; no new one reaches
   them, they are out of the table) and stop, in the background.

Reloads are serialized by a lock. A request is counted in at route time (``Route.acquire``, in
the same event-loop step as ``Router.resolve``) and out when its response ends, which is what
makes the drain exact.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

import msgspec
import structlog

from gateway.budget import Budget, check_budget
from gateway.config import Settings, load_settings
from gateway.errors import ConfigError, ModelNotFoundError, ServiceUnavailableError
from gateway.plugins import Plugins
from gateway.router import Route, Router, build_router

log = structlog.get_logger("taxiway.fleet")

_READY_POLL_S = 0.05

ConfigReader = Callable[[], tuple[Settings, Router]]


class ReloadResult(msgspec.Struct):
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]
    status: str = "reloaded"


def read_config(path: str | os.PathLike[str] | None, plugins: Plugins) -> tuple[Settings, Router]:
    """A config validated as ``serve`` would: every plugin's and backend's options.

    Builds the backends but starts none. Plugins' tables are applied (``plugin_configure``) once
    the whole file is known to be valid up to them.
    """
    settings = load_settings(path)
    router = build_router(settings, plugins)
    check_budget(settings, router)
    plugins.pm.hook.plugin_configure(settings=settings)
    return settings, router


class Fleet:
    """The current routing table and every backend instance this process runs.

    ``router`` is read per request; only ``_swap`` replaces it. ``draining`` holds the instances
    taken out of the table and not yet stopped.
    """

    def __init__(
        self, router: Router, reader: ConfigReader | None, *, ready_timeout_s: float, budget: Budget | None = None
    ) -> None:
        self.router = router
        self.draining: set[Route] = set()
        self.ready_timeout_s = ready_timeout_s
        self.on_settings: Callable[[Settings], None] = lambda _settings: None
        self._reader = reader
        self._lock = asyncio.Lock()
        self._drains: set[asyncio.Task[None]] = set()
        # the memory budget (gateway.budget): what starts, what loads on a request, what is evicted
        self.budget = budget or Budget(Settings(models=()), Router([]))
        self.budget.bind(lambda: (*self.router.routes, *self.draining), self._start, _stop, _wait_ready)

    async def start(self) -> None:
        """Start every eager backend that fits the budget before serving (each loads in its own
        time: see ``ready``); the others load on their first request."""
        for route in self.budget.eager_fit(self.router.routes):
            await self._start(route)
        self.budget.open()
        log.info("gateway.ready", models=[r.name for r in self.router.routes])

    async def stop(self) -> None:
        """At shutdown: stop every instance, routed or draining (no drain: the server has
        already finished its requests or given up on them)."""
        self.budget.close()
        for task in self._drains:
            task.cancel()
        for route in (*reversed(self.router.routes), *self.draining):
            await _stop(route)

    # -----------------------------------------------------------------------------------------
    # reload

    async def reload(self) -> ReloadResult:
        """Read the config again and apply it as a diff (module docstring).

        Raises ``ConfigError`` (invalid file, old table kept) or ``ServiceUnavailableError`` (a
        new instance failed to become ready, old table kept).
        """
        if self._reader is None:
            raise ConfigError("the server was started without --config: there is no file to reload")
        async with self._lock:
            try:
                settings, candidate = self._reader()
            except ConfigError as exc:
                log.error("config.reload_invalid", path=exc.path, error=str(exc))
                raise
            # key tables apply with the file that validates them, as plugins' do in read_config
            self.on_settings(settings)
            self.budget.configure(settings, candidate)
            result = await self._apply(candidate)
            log.info("config.reloaded", **msgspec.structs.asdict(result))
            return result

    async def _apply(self, candidate: Router) -> ReloadResult:
        old = {route.key: route for route in self.router.routes}
        new_keys = {route.key for route in candidate.routes}
        routes: list[Route] = []
        starting: list[Route] = []
        for fresh in candidate.routes:
            kept = old.get(fresh.key)
            if kept is None:
                starting.append(fresh)
                routes.append(fresh)
            else:
                routes.append(kept)
        await self._start_all(self.budget.eager_fit(starting))

        # the swap: no await between these lines, so no request sees half of it
        for route, fresh in zip(routes, candidate.routes, strict=True):
            route.take_routing(fresh)  # aliases, fallbacks, cooldown
        self.router = Router(routes)
        retired = [route for key, route in old.items() if key not in new_keys]
        for route in retired:
            route.phase = "draining"
            self.draining.add(route)

        for route in retired:
            task = asyncio.get_running_loop().create_task(self._retire(route))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
        new_names = {r.name for r in starting}
        old_names = {r.name for r in retired}
        return ReloadResult(
            added=sorted(new_names - old_names),
            removed=sorted(old_names - new_names),
            changed=sorted(new_names & old_names),
            unchanged=[r.name for r in routes if r.key in old],
        )

    async def _start_all(self, routes: list[Route]) -> None:
        """Start ``routes`` and wait until all are ready; on any failure stop them all and raise."""
        try:
            for route in routes:
                await self._start(route)
            deadline = time.monotonic() + self.ready_timeout_s
            for route in routes:
                await _wait_ready(route, deadline)
        except BaseException:
            for route in routes:
                await _stop(route)
            raise

    async def _retire(self, route: Route) -> None:
        await route.drain()
        await _stop(route)
        self.draining.discard(route)
        log.info("backend.retired", model=route.name, backend=route.backend_name)

    # -----------------------------------------------------------------------------------------
    # load / unload one routed model (the admin API)

    def find(self, name: str) -> Route:
        route = self.router.get(name)
        if route is None:
            raise ModelNotFoundError(f"The model '{name}' does not exist", param="name")
        return route

    async def load(self, name: str) -> Route:
        """Start an unloaded model again; a no-op for one that is started."""
        async with self._lock:
            route = self.find(name)
            await self.budget.load(route)
            return route

    async def unload(self, name: str) -> Route:
        """Refuse new requests for ``name`` (503), let its in-flight ones finish, stop it."""
        async with self._lock:
            route = self.find(name)
            self.budget.hold_down(route)
            if route.phase == "serving":
                route.phase = "stopped"
                await route.drain()
                await _stop(route)
            return route

    async def _start(self, route: Route) -> None:
        log.info("backend.starting", model=route.name, backend=route.backend_name)
        route.phase = "starting"
        await route.backend.start()
        route.phase = "serving"


async def _wait_ready(route: Route, deadline: float) -> None:
    while True:
        state = route.backend.ready()
        if state.ready:
            return
        if state.failed:
            raise ServiceUnavailableError(f"The model '{route.name}' failed to start: {state.detail}")
        if time.monotonic() > deadline:
            raise ServiceUnavailableError(
                f"The model '{route.name}' was not ready in time ({state.detail or 'loading'})"
            )
        await asyncio.sleep(_READY_POLL_S)


async def _stop(route: Route) -> None:
    try:
        await route.backend.stop()
    except Exception:
        log.exception("backend.stop_failed", model=route.name)
    route.phase = "stopped"
