"""What ``/v1/models`` and ``/ready`` say about the routing table, as response bodies.

Every name a client may send is listed, an alias as a model of its own whose ``root`` names the
entry it resolves to, so that a client picking from the list finds ``default``; a LoRA adapter
likewise, its ``root`` the base model it runs on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgspec

from gateway import wire
from gateway.errors import ModelNotFoundError, NotFoundError, TaxiwayError
from gateway.render import encode
from gateway.router import Route, Router


class ModelState(msgspec.Struct):
    model: str
    state: str  # ReadyState.state: "not ready" or "failed"
    detail: str


class Readiness(msgspec.Struct):
    status: str
    not_ready: list[ModelState]


class Catalog:
    """Bodies for one server start time; the list is encoded once per routing table."""

    def __init__(self, started: int) -> None:
        self.started = started
        self._list: tuple[object, bytes] = (None, b"")

    def get(self, router: Router, path: str) -> bytes:
        """GET /v1/models, /v1/models/{model} and /v1/models/{model}/stats (``path`` below the mount)."""
        rest = path.strip("/")
        if not rest:
            cached, body = self._list
            names = router.names()
            # LoRA adapters come and go; a loading model's endpoints become known
            key = (router, tuple((name, _endpoints(route)) for name, route in names))
            if cached != key:
                body = encode(wire.ModelList(data=[self._card(name, route) for name, route in names]))
                self._list = (key, body)
            return body
        route = router.get(rest)
        if route is not None:
            return encode(self._card(rest, route))
        name, _, tail = rest.rpartition("/")
        if tail == "stats" and name:
            route = router.resolve(name)
            state = route.backend.ready()
            stats = None if state.failed else route.backend.stats()
            if stats is not None:
                return encode(stats)
            if not state.ready:  # no stats (yet): what the model waits for, or why it failed
                return encode(ModelState(model=route.name, state=state.state, detail=state.detail))
            raise NotFoundError(f"The model '{name}' has no stats", param="model")
        raise ModelNotFoundError(f"The model '{rest}' does not exist", param="model")

    def _card(self, name: str, route: Route) -> wire.ModelCard:
        aliases = route.aliases if name == route.name else ()
        return wire.ModelCard(id=name, created=self.started, root=route.name, aliases=aliases,
                              endpoints=_endpoints(route))  # fmt: skip

    @staticmethod
    def readiness(
        router: Router, loads_on_request: Callable[[Route], bool] = lambda _r: False, *, stall_timeout_s: float = 0.0
    ) -> tuple[int, bytes]:
        """/ready: 200 when every routed model is ready or ``loads_on_request`` (the memory
        budget's: unloaded or loading for a request), else 503 listing those that are not. A model
        with requests in flight but no stream item for ``stall_timeout_s`` (> 0) is ``stalled``."""
        states = [(route.name, route.backend.ready()) for route in router.routes if not loads_on_request(route)]
        not_ready = [ModelState(model=name, state=s.state, detail=s.detail) for name, s in states if not s.ready]
        if stall_timeout_s > 0:
            now = time.perf_counter()
            for route in router.routes:
                stalled_s = route.stalled_for(now)
                if stalled_s > stall_timeout_s:
                    detail = f"{route.num_in_flight} requests in flight, no token for {stalled_s:.0f}s"
                    not_ready.append(ModelState(model=route.name, state="stalled", detail=detail))
        body = encode(Readiness(status="not ready" if not_ready else "ready", not_ready=not_ready))
        return (503 if not_ready else 200), body


def _endpoints(route: Route) -> tuple[str, ...]:
    """The API paths ``route``'s backend serves; empty while its capabilities are unknown (an
    engine model still loading, or failed, raises for them)."""
    try:
        caps = route.backend.capabilities
    except TaxiwayError:
        return ()
    paths = (("/v1/chat/completions", caps.chat), ("/v1/completions", caps.completions), ("/v1/embeddings", caps.embeddings))
    return tuple(path for path, served in paths if served)
