"""ASGI plumbing for the hot path: read a bounded body, send pre-encoded bytes, notice disconnects.

The API endpoints are raw ASGI handlers mounted in the litestar app (``gateway.app``): this keeps
per-request work to what the gateway needs (no signature modelling, no response re-encoding).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

from gateway.errors import PayloadTooLargeError, TaxiwayError
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
    """The whole request body; ``PayloadTooLargeError`` (413) past ``limit`` bytes."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"The request body is larger than {limit} bytes")
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            break
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
    """Cancels ``target`` when the client disconnects; ``disconnected`` tells that it did.

    Started once the request body has been read. Must be stopped before the last response
    message is sent: servers answer ``receive()`` with a disconnect once the response is complete.
    """

    __slots__ = ("_task", "disconnected")

    def __init__(self, receive: Any, target: asyncio.Task[Any]) -> None:
        self.disconnected = False
        self._task = asyncio.get_running_loop().create_task(self._watch(receive, target))

    async def _watch(self, receive: Any, target: asyncio.Task[Any]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                target.cancel()
                return

    def stop(self) -> None:
        self._task.cancel()
