"""The HTTP edge: the limits a reverse proxy would otherwise enforce, answered in the API's JSON.

``EdgeProtocol`` is uvicorn's httptools protocol with these added, each configured in ``[server]``:

- the request line and headers together at most ``max_header_bytes``, at most ``max_headers``
  fields (431), the request target at most ``max_url_bytes`` (414);
- slowloris: a request's head must arrive within ``header_timeout_s`` of its first byte and its body
  within ``body_timeout_s`` of the head (408, then the connection is closed); a connection with no
  request in progress, new or kept alive, is closed after ``idle_timeout_s``;
- at most ``max_connections`` open connections: a request on one more is answered 503;
- a request the parser rejects (bad framing, an absurd Content-Length, bytes that are not HTTP) is a
  400 — all of them OpenAI's error JSON, never uvicorn's plain text.

Every rejection is written straight to the transport with ``Connection: close``: the request never
reaches the app, or, for a body that stops short, the app's ``receive()`` sees a disconnect.

Timers cost one ``call_later`` only where a request is slow: the head timer is armed when a segment
ends inside a head, the body timer when one ends inside a body; a request that arrives in one
segment arms neither.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
import msgspec
import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.asgi import request_id
from gateway.errors import (
    HeadersTooLargeError,
    InvalidRequestError,
    RequestTimeoutError,
    ServiceUnavailableError,
    TaxiwayError,
    URLTooLongError,
)
from gateway.render import error_body, error_headers

log = structlog.get_logger("taxiway.edge")


class EdgeLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The edge's share of ``ServerSettings`` (``gateway.config``)."""

    max_header_bytes: int = 32768
    max_headers: int = 100
    max_url_bytes: int = 8192
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1024


class _Rejected(Exception):
    """Raised in a parser callback to stop parsing; the protocol answers ``error``."""

    def __init__(self, error: TaxiwayError) -> None:
        super().__init__(error.message)
        self.error = error


class EdgeProtocol(HttpToolsProtocol):
    """One connection. Built by uvicorn as ``functools.partial(EdgeProtocol, limits=…)``."""

    def __init__(self, *args: Any, limits: EdgeLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.limit_concurrency = None  # uvicorn's own check answers in plain text; ours is below
        self._is_reading_head = True  # between requests counts as head: the next byte starts one
        self._num_head_bytes = 0
        self._num_headers = 0
        self._is_reading_body = False
        self._is_over_capacity = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    # -----------------------------------------------------------------------------------------
    # connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # counted with this one; answered when its head is read (a response before the request
        # would race the client's write and reach it as a reset)
        self._is_over_capacity = len(self.connections) > self.limits.max_connections
        # a connection that never sends a byte is idle from the start
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self._is_reading_head:
            self._num_head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            rejected = exc.__context__
            if isinstance(rejected, _Rejected):
                self._reject(rejected.error)
            else:
                self._reject(InvalidRequestError(f"Malformed HTTP request: {exc}"))
            return
        # what is still unparsed after this segment is the head or body of a request in progress
        if self._is_reading_head:
            if self._num_head_bytes > self.limits.max_header_bytes:
                self._reject(self._head_too_large())
            elif self._head_timer is None and self._num_head_bytes:
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        elif self._is_reading_body and self._body_timer is None:
            self._body_timer = self.loop.call_later(self.limits.body_timeout_s, self._body_timed_out)

    # -----------------------------------------------------------------------------------------
    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._num_headers = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            raise _Rejected(URLTooLongError(f"The request target is longer than {self.limits.max_url_bytes} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._num_headers += 1
        if self._num_headers > self.limits.max_headers:
            raise _Rejected(HeadersTooLargeError(f"The request has more than {self.limits.max_headers} header fields"))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        # the bytes counted may include the start of the body: the head is over the limit only if
        # the request line and the fields themselves are
        if self._num_head_bytes > self.limits.max_header_bytes:
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > self.limits.max_header_bytes:
                raise _Rejected(self._head_too_large())
        if self._is_over_capacity:
            raise _Rejected(
                ServiceUnavailableError(
                    f"The server has {self.limits.max_connections} connections open; try again",
                    code="too_many_connections", headers={"Retry-After": "1"},
                )  # fmt: skip
            )
        try:
            super().on_headers_complete()
        except UnicodeDecodeError as exc:  # a path that is not ASCII
            raise _Rejected(InvalidRequestError("The request target is not ASCII")) from exc
        self._is_reading_head = False
        self._is_reading_body = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def on_message_complete(self) -> None:
        self._is_reading_body = False
        self._is_reading_head = True
        self._num_head_bytes = 0
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # -----------------------------------------------------------------------------------------
    # rejections

    def _head_too_large(self) -> HeadersTooLargeError:
        return HeadersTooLargeError(f"The request line and headers are larger than {self.limits.max_header_bytes} bytes")

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._reject(RequestTimeoutError(f"The request headers did not arrive within {self.limits.header_timeout_s} s"))

    def _body_timed_out(self) -> None:
        self._body_timer = None
        self._reject(RequestTimeoutError(f"The request body did not arrive within {self.limits.body_timeout_s} s"))

    def _reject(self, error: TaxiwayError) -> None:
        """Answer ``error`` (unless a response has started) and close the connection."""
        self._cancel_timers()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        # while a head is read, ``cycle`` is the previous request's: answer once its response is
        # complete; while a body is read, answer unless the app has started its response
        if self._is_reading_head:
            may_answer = cycle is None or cycle.response_complete
        else:
            may_answer = not cycle.response_started
        if may_answer:
            headers = error_headers(error, request_id(_headers_dict(self.headers)))
            body = error_body(error)
            lines = [b"HTTP/1.1 %d %s\r\n" % (error.status_code, _REASONS.get(error.status_code, b""))]
            lines += [b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
            lines.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body))
            self.transport.write(b"".join(lines) + body)
        log.info("edge.rejected", status=error.status_code, code=error.code, client=_client(self.client))
        if cycle is not None and not cycle.response_complete and not self._is_reading_head:
            # the app, if it is waiting for the body, sees a disconnect; what it sends is dropped
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None


_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 414: b"URI Too Long",
            431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}  # fmt: skip


def _headers_dict(headers: list[tuple[bytes, bytes]] | None) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in headers or ()}


def _client(client: tuple[str, int] | None) -> str | None:
    return None if client is None else f"{client[0]}:{client[1]}"
