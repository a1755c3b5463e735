"""Per-request state handed to the request-lifecycle hooks."""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.keys import KeyInfo


class Timings(msgspec.Struct, kw_only=True):
    """Durations in seconds, measured with ``time.perf_counter``.

    ``backend_s`` is the time spent awaiting the backend's stream; everything else the gateway
    spent on the request is its own overhead.
    """

    backend_s: float = 0.0
    first_token_s: float | None = None  # from arrival to the first item of the backend's stream
    total_s: float | None = None  # from arrival to the last byte handed to the server

    @property
    def overhead_s(self) -> float | None:
        return None if self.total_s is None else max(0.0, self.total_s - self.backend_s)


class RequestContext(msgspec.Struct, kw_only=True):
    """One API request as the gateway and its plugins see it. Mutable: hooks may set ``principal``.

    ``model`` is the public model name after alias resolution and ``backend_name`` the registered
    backend serving it; both are ``None`` until the request is routed.
    """

    request_id: str
    endpoint: str  # "chat.completions", "completions", "embeddings", "models"
    started_at: float  # time.perf_counter() at arrival
    model: str | None = None
    backend_name: str | None = None
    principal: str | None = None
    key: KeyInfo | None = None  # a virtual key's identity and limits (set by ``authenticate``)
    #: sent on the response, whatever its status (e.g. the ``x-ratelimit-*`` headers)
    response_headers: list[tuple[bytes, bytes]] | None = None
    route: Any = None  # the gateway.router.Route tried now (its progress clock, for /ready)
    request: Any = None  # the decoded wire request (gateway.wire), once the body is read
    is_stream: bool = False
    status_code: int = 200
    timings: Timings = msgspec.field(default_factory=Timings)
