"""ASGI plumbing for the hot path: read a bounded body, send pre-encoded bytes, notice disconnects.

The API endpoints are raw ASGI handlers mounted in the litestar app (``gateway.app``): this keeps
per-request work to what the gateway needs (no signature modelling, no response re-encoding).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

from gateway.errors import ClientDisconnectedError, PayloadTooLargeError, TaxiwayError
from gateway.render import error_body, error_headers

Scope = dict[str, Any]
Headers = list[tuple[bytes, bytes]]

JSON = (b"content-type", b"application/json")
SSE_HEADERS: Headers = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell nginx-like proxies not to buffer the stream
]
REQUEST_ID_HEADER = "x-request-id"
OVERHEAD_HEADER = b"x-taxiway-overhead-ms"

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def request_headers(scope: Scope) -> dict[str, str]:
    """Header names lower-cased (ASGI servers already do); a repeated header keeps its last value."""
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}


def request_id(headers: dict[str, str]) -> str:
    """The client's X-Request-ID when it is a sane token, else a fresh one."""
    given = headers.get(REQUEST_ID_HEADER)
    if given and _VALID_REQUEST_ID.fullmatch(given):
        return given
    return secrets.token_hex(12)


async def read_body(receive: Any, headers: dict[str, str], limit: int) -> bytes:
    """The whole request body; ``PayloadTooLargeError`` (413) past ``limit`` bytes,
    ``ClientDisconnectedError`` when the connection ends before the body does (the client left,
    or the edge answered a body that stopped short: ``gateway.edge``)."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"The request body is larger than {limit} bytes")
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnectedError("the client disconnected before sending the whole body")
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnectedError("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"The request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def send_bytes(send: Any, status: int, body: bytes, headers: Headers) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_error(send: Any, error: TaxiwayError, request_id: str) -> None:
    """``error`` as the whole response: its status, OpenAI's error JSON, its headers."""
    headers = [JSON, *((k.encode(), v.encode()) for k, v in error_headers(error, request_id).items())]
    await send_bytes(send, error.status_code, error_body(error), headers)


class DisconnectWatcher:
    """Cancels ``target`` when the client disconnects, or when the server cuts the request
    (``cut``: the drain's end, ``max_request_time_s``); ``disconnected`` and ``cut_error`` tell
    which. At most one of them is ever set.

    Started once the request body has been read. Must be stopped before the last response
    message is sent: servers answer ``receive()`` with a disconnect once the response is complete.
    """

    __slots__ = ("_deadline", "_is_stopped", "_target", "_task", "cut_error", "disconnected")

    def __init__(self, receive: Any, target: asyncio.Task[Any]) -> None:
        self.disconnected = False
        self.cut_error: TaxiwayError | None = None
        self._is_stopped = False
        self._target = target
        self._deadline: asyncio.TimerHandle | None = None
        self._task = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if self.cut_error is None and not self._is_stopped:
                    self.disconnected = True
                    self._target.cancel()
                return

    def cut(self, error: TaxiwayError) -> None:
        """End the request with ``error``: a whole error response if none has started, else the
        stream's error event. Does nothing once stopped or after a disconnect."""
        if self._is_stopped or self.disconnected or self.cut_error is not None:
            return
        self.cut_error = error
        self._target.cancel()

    def cut_at(self, when: float, error: TaxiwayError) -> None:
        """``cut(error)`` at the event loop's time ``when``, unless stopped first."""
        self._deadline = asyncio.get_running_loop().call_at(when, self.cut, error)

    def stop(self) -> None:
        self._is_stopped = True
        self._task.cancel()
        if self._deadline is not None:
            self._deadline.cancel()
