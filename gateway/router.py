"""Model name or alias → the backend instances serving it.

A ``Router`` is an immutable table; a reload builds a new one and swaps it in whole
(``gateway.fleet``). A ``Route`` is one backend instance (one ``[[models]]`` entry, a
deployment) with its own lifetime: it outlives a reload that leaves its entry unchanged, and
counts the requests it is serving so that it can be drained before it stops. Entries sharing a
name form a ``Group``; a request for the name goes to one of its deployments, or on a failure
before its first byte to the next candidate (``gateway.balance``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import msgspec

from gateway.balance import Health
from gateway.config import ModelEntry, Settings, convert_table, join_path
from gateway.errors import ConfigError, ModelNotFoundError, ServiceUnavailableError
from gateway.interface import Backend
from gateway.plugins import Plugins

Phase = Literal["stopped", "starting", "serving", "draining"]
RouteState = Literal["loaded", "loading", "unloaded", "draining", "failed"]

_DRAIN_POLL_S = 0.05


def entry_key(entry: ModelEntry, occurrence: int = 0) -> bytes:
    """What makes two config entries the same deployment: name, backend and options (not aliases,
    fallbacks or cooldown), and for identical entries of one group which of them it is."""
    return msgspec.json.encode((entry.name, entry.backend, entry.options, occurrence), order="sorted")


class Route:
    """One configured model: its public name, aliases and backend instance.

    ``phase`` is the gateway's side of the lifetime (``Fleet`` moves it); ``num_in_flight`` counts
    the requests admitted to this instance and not yet finished (``acquire``/``release``, both
    called from the event loop, so a plain int is enough).
    """

    __slots__ = ("aliases", "backend", "backend_name", "cooldown_s", "fallbacks", "health", "key", "last_progress",
                 "last_used", "name", "num_in_flight", "phase")  # fmt: skip

    def __init__(
        self,
        name: str,
        aliases: tuple[str, ...],
        backend_name: str,
        backend: Backend,
        key: bytes = b"",
        *,
        fallbacks: tuple[str, ...] = (),
        cooldown_s: float = 30.0,
    ) -> None:
        self.name = name
        self.aliases = aliases
        self.backend_name = backend_name
        self.backend = backend
        self.key = key
        self.fallbacks = fallbacks
        self.cooldown_s = cooldown_s
        self.health = Health()
        self.phase: Phase = "starting"  # until the fleet has started it; "stopped" only once stopped
        self.num_in_flight = 0
        self.last_used: float | None = None
        #: perf_counter() of the last stream item any of its requests got, or of the admission
        #: that ended an idle spell: a request in flight and this long ago means it stalls
        self.last_progress = time.perf_counter()

    def stalled_for(self, now: float) -> float:
        """Seconds since this instance last made progress while requests are in flight; 0 when idle."""
        return max(0.0, now - self.last_progress) if self.num_in_flight > 0 else 0.0

    def take_routing(self, fresh: Route) -> None:
        """Adopt a reloaded entry's routing keys (aliases, fallbacks, cooldown): they change
        neither the backend instance nor its health."""
        self.aliases = fresh.aliases
        self.fallbacks = fresh.fallbacks
        self.cooldown_s = fresh.cooldown_s

    def acquire(self) -> None:
        """Count a request in; raises 503 when this instance was unloaded (``/admin/.../unload``)."""
        if self.phase == "stopped":
            raise ServiceUnavailableError(
                f"The model '{self.name}' is unloaded; load it with POST /admin/models/{self.name}/load",
                param="model",
            )
        if self.num_in_flight == 0:
            self.last_progress = time.perf_counter()  # idle time is no stall
        self.num_in_flight += 1
        self.last_used = time.time()

    def release(self) -> None:
        self.num_in_flight -= 1

    async def drain(self) -> None:
        """Wait until no request is in flight. New requests no longer reach this instance: the
        caller has taken it out of the routing table or marked it stopped."""
        while self.num_in_flight > 0:
            await asyncio.sleep(_DRAIN_POLL_S)

    @property
    def state(self) -> RouteState:
        """As ``GET /admin/models`` reports it."""
        if self.phase == "draining":
            return "draining"
        if self.phase == "stopped":
            return "unloaded"
        ready = self.backend.ready()
        return "loaded" if ready.ready else "failed" if ready.failed else "loading"


class Group:
    """The deployments sharing one public name, in config order, and the group's fallbacks (every
    deployment's, in config order, once each)."""

    __slots__ = ("fallbacks", "name", "num_turns", "routes")

    def __init__(self, name: str, routes: list[Route]) -> None:
        self.name = name
        self.routes = tuple(routes)
        self.fallbacks = tuple(dict.fromkeys(f for route in routes for f in route.fallbacks))
        self.num_turns = 0

    def next_turn(self) -> int:
        """Where round robin starts this time among deployments tied on requests in flight."""
        self.num_turns += 1
        return self.num_turns % len(self.routes)


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = tuple(routes)
        members: dict[str, list[Route]] = {}
        for route in routes:
            members.setdefault(route.name, []).append(route)
        self._by_name: dict[str, Group] = {}
        for name, group_routes in members.items():
            group = Group(name, group_routes)
            for alias in (name, *(a for route in group_routes for a in route.aliases)):
                assert self._by_name.get(alias, group) is group, "config validation guarantees unique names"
                self._by_name[alias] = group
        self._chains: dict[str, tuple[Group, ...]] = {}

    def resolve(self, model: str) -> Route:
        """The first deployment of a model name or alias; ``ModelNotFoundError`` (404) naming it otherwise."""
        return self.chain(model)[0].routes[0]

    def get(self, model: str) -> Route | None:
        group = self._by_name.get(model) or self._adapter_group(model)
        return None if group is None else group.routes[0]

    def names(self) -> list[tuple[str, Route]]:
        """Every name a client may send, once each, with its first deployment, in config order
        (name, then aliases), then the LoRA adapters the backends serve now."""
        names = [(name, group.routes[0]) for name, group in self._by_name.items()]
        seen = set(self._by_name)
        for route in self.routes:
            for adapter in route.backend.adapters():
                if adapter not in seen:
                    seen.add(adapter)
                    names.append((adapter, route))
        return names

    def _adapter_group(self, model: str) -> Group | None:
        """The group of the first deployment serving a LoRA adapter named ``model`` (adapters come
        and go at run time: looked up on every request, never cached)."""
        for route in self.routes:
            if model in route.backend.adapters():
                return self._by_name[route.name]
        return None

    def chain(self, model: str) -> tuple[Group, ...]:
        """The groups a request for ``model`` may go to: its own, then its fallbacks in order,
        then theirs (breadth first), each once. ``ModelNotFoundError`` (404) naming an unknown model."""
        chain = self._chains.get(model)
        if chain is not None:
            return chain
        group = self._by_name.get(model)
        if group is None:
            adapter_group = self._adapter_group(model)
            if adapter_group is None:
                raise ModelNotFoundError(f"The model '{model}' does not exist", param="model")
            return (adapter_group,)  # an adapter has no fallbacks of its own
        groups = [group]
        for current in groups:  # grows while walked: breadth first
            for name in current.fallbacks:
                fallback = self._by_name.get(name)
                if fallback is not None and fallback not in groups:
                    groups.append(fallback)
        chain = self._chains[model] = tuple(groups)
        return chain


def build_router(settings: Settings, plugins: Plugins) -> Router:
    """Instantiate one backend per model entry. Cheap: backends do heavy work in ``start``.

    Raises ``ConfigError`` naming ``models[i].backend`` for an unknown backend and
    ``models[i].options.…`` for options the backend rejects.
    """
    occurrences: dict[bytes, int] = {}
    routes = []
    for i, entry in enumerate(settings.models):
        key = entry_key(entry)
        occurrences[key] = occurrences.get(key, -1) + 1
        routes.append(_build_route(i, entry, plugins, entry_key(entry, occurrences[key])))
    taken = {name for entry in settings.models for name in (entry.name, *entry.aliases)}
    for i, route in enumerate(routes):
        for adapter in route.backend.adapters():
            if adapter in taken:
                raise ConfigError(f"the LoRA adapter name '{adapter}' is taken", path=f"models[{i}].options.lora.adapters.{adapter}")
            taken.add(adapter)
    return Router(routes)


def _build_route(i: int, entry: ModelEntry, plugins: Plugins, key: bytes) -> Route:
    backend_cls = plugins.backend_class(entry.backend, path=f"models[{i}].backend")
    options_path = f"models[{i}].options"
    options = convert_table(entry.options, backend_cls.Options, options_path)
    try:
        backend = backend_cls(entry.name, options)
    except ConfigError as exc:
        # A backend names the option relative to its own table ("base_url").
        path = exc.path or ""
        full = path if path.startswith("models[") else join_path(options_path, path)
        message = str(exc)[len(f"{exc.path}: ") :] if exc.path else str(exc)
        raise ConfigError(message, path=full) from exc
    return Route(entry.name, entry.aliases, entry.backend, backend, key,
                 fallbacks=entry.fallbacks, cooldown_s=entry.cooldown_s)  # fmt: skip
