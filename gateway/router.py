"""Model name or alias → the backend instance serving it.

A ``Router`` is an immutable table; a reload builds a new one and swaps it in whole
(``gateway.fleet``). A ``Route`` is one backend instance with its own lifetime: it outlives a
reload that leaves its entry unchanged, and counts the requests it is serving so that it can be
drained before it stops.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import msgspec

from gateway.config import ModelEntry, Settings, convert_table, join_path
from gateway.errors import ConfigError, ModelNotFoundError, ServiceUnavailableError
from gateway.interface import Backend
from gateway.plugins import Plugins

Phase = Literal["stopped", "starting", "serving", "draining"]
RouteState = Literal["loaded", "loading", "unloaded", "draining", "failed"]

_DRAIN_POLL_S = 0.05


def entry_key(entry: ModelEntry) -> bytes:
    """What makes two config entries the same deployment: name, backend and options (not aliases)."""
    return msgspec.json.encode((entry.name, entry.backend, entry.options), order="sorted")


class Route:
    """One configured model: its public name, aliases and backend instance.

    ``phase`` is the gateway's side of the lifetime (``Fleet`` moves it); ``num_in_flight`` counts
    the requests admitted to this instance and not yet finished (``acquire``/``release``, both
    called from the event loop, so a plain int is enough).
    """

    __slots__ = ("aliases", "backend", "backend_name", "key", "last_used", "name", "num_in_flight", "phase")

    def __init__(
        self, name: str, aliases: tuple[str, ...], backend_name: str, backend: Backend, key: bytes = b""
    ) -> None:
        self.name = name
        self.aliases = aliases
        self.backend_name = backend_name
        self.backend = backend
        self.key = key
        self.phase: Phase = "starting"  # until the fleet has started it; "stopped" only once stopped
        self.num_in_flight = 0
        self.last_used: float | None = None

    def acquire(self) -> None:
        """Count a request in; raises 503 when this instance was unloaded (``/admin/.../unload``)."""
        if self.phase == "stopped":
            raise ServiceUnavailableError(
                f"The model '{self.name}' is unloaded; load it with POST /admin/models/{self.name}/load",
                param="model",
            )
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


class Router:
    def __init__(self, routes: list[Route]) -> None:
        self.routes = tuple(routes)
        self._by_name: dict[str, Route] = {}
        for route in routes:
            for name in (route.name, *route.aliases):
                assert name not in self._by_name, "config validation guarantees unique names"
                self._by_name[name] = route

    def resolve(self, model: str) -> Route:
        """The route for a model name or alias; ``ModelNotFoundError`` (404) naming it otherwise."""
        route = self._by_name.get(model)
        if route is None:
            raise ModelNotFoundError(f"The model '{model}' does not exist", param="model")
        return route

    def get(self, model: str) -> Route | None:
        return self._by_name.get(model)

    def names(self) -> list[tuple[str, Route]]:
        """Every name a client may send, each with its route, in config order (name, then aliases)."""
        return list(self._by_name.items())


def build_router(settings: Settings, plugins: Plugins) -> Router:
    """Instantiate one backend per model entry. Cheap: backends do heavy work in ``start``.

    Raises ``ConfigError`` naming ``models[i].backend`` for an unknown backend and
    ``models[i].options.…`` for options the backend rejects.
    """
    return Router([_build_route(i, entry, plugins) for i, entry in enumerate(settings.models)])


def _build_route(i: int, entry: ModelEntry, plugins: Plugins) -> Route:
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
    return Route(entry.name, entry.aliases, entry.backend, backend, entry_key(entry))
