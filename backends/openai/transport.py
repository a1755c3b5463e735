"""A lean HTTP/1.1 keep-alive transport for ``httpx.AsyncClient``, on asyncio streams.

Why: on the gateway's hot path httpcore's connection pool costs more CPU than everything else the
gateway does (it re-scans every pooled connection, polling each socket, on every request). This
transport keeps idle connections in a LIFO list per origin and speaks just the HTTP/1.1 an
OpenAI-compatible upstream needs: a request with a known-length body; a response framed by
Content-Length, chunked encoding or connection close. Timeouts and errors are httpx's own, so the
backend code above it is the same whichever transport is used (``transport = "httpcore"`` in the
model's options switches back to httpx's default).
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import httpx

_MAX_HEAD_BYTES = 64 * 1024
_READ_SIZE = 64 * 1024

_Origin = tuple[bytes, bytes, int]


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @property
    def is_usable(self) -> bool:
        return not (self.reader.at_eof() or self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


T = TypeVar("T")

# Each phase of an exchange, with httpx's errors for it running out of time and for it failing.
_PHASE_ERRORS: dict[str, tuple[type[httpx.TimeoutException], type[httpx.TransportError]]] = {
    "pool": (httpx.PoolTimeout, httpx.ConnectError),
    "connect": (httpx.ConnectTimeout, httpx.ConnectError),
    "write": (httpx.WriteTimeout, httpx.WriteError),
    "read": (httpx.ReadTimeout, httpx.ReadError),
}


async def _within(phase: str, request: httpx.Request, operation: Awaitable[T]) -> T:
    """``operation`` under the request's timeout for ``phase``; asyncio's and the socket's failures
    raised as httpx's for that phase, so the code above sees the same errors as with httpcore.

    A connection cut short or a line past the stream's limit is the upstream breaking HTTP
    (``RemoteProtocolError``); any other ``OSError`` is the phase failing.
    """
    timeout_error, error = _PHASE_ERRORS[phase]
    try:
        async with asyncio.timeout(request.extensions.get("timeout", {}).get(phase)):
            return await operation
    except TimeoutError:
        raise timeout_error(f"the upstream took too long ({phase})", request=request) from None
    except asyncio.IncompleteReadError as exc:
        raise httpx.RemoteProtocolError("the upstream closed the connection", request=request) from exc
    except asyncio.LimitOverrunError as exc:
        raise httpx.RemoteProtocolError("a response line is too long", request=request) from exc
    except OSError as exc:
        raise error(str(exc) or type(exc).__name__, request=request) from exc


class LeanTransport(httpx.AsyncBaseTransport):
    """At most ``max_connections`` requests in flight; idle connections are reused newest first."""

    def __init__(self, *, max_connections: int = 100, ssl_context: ssl.SSLContext | None = None) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._ssl_context = ssl_context  # built on the first https connection, then shared
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()

    # -----------------------------------------------------------------------------------------

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the transport is closed", request=request)
        await _within("pool", request, self._slots.acquire())
        try:
            return await self._send(request)
        except BaseException:
            self._slots.release()
            raise

    async def _send(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin = (url.raw_scheme, url.raw_host, url.port or (443 if url.raw_scheme == b"https" else 80))
        head = self._request_head(request)
        body = await request.aread()
        # A pooled connection the upstream closed while idle fails at once; retry such a failure
        # on a fresh connection (the body is in memory, so the request is replayable).
        while True:
            connection, reused = await self._checkout(origin, request)
            try:
                status, headers = await self._exchange(connection, head, body, request)
                framing = _framing(status, headers, request)
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                connection.close()
                if reused:
                    continue
                raise
            except BaseException:
                connection.close()
                raise
            break
        stream = _ResponseBody(self, origin, connection, request, framing)
        return httpx.Response(status, headers=headers, stream=stream, extensions={"http_version": b"HTTP/1.1"})

    @staticmethod
    def _request_head(request: httpx.Request) -> bytes:
        lines = [b"%s %s HTTP/1.1" % (request.method.encode(), request.url.raw_path)]
        lines.extend(b"%s: %s" % (name, value) for name, value in request.headers.raw)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _checkout(self, origin: _Origin, request: httpx.Request) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.is_usable:
                return connection, True
            connection.close()
        scheme, host, port = origin
        context = None
        if scheme == b"https":
            # once per transport (one per upstream): loading the CA store costs milliseconds of CPU
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            context = self._ssl_context
        connecting = asyncio.open_connection(host.decode("ascii"), port, ssl=context, limit=_MAX_HEAD_BYTES)
        reader, writer = await _within("connect", request, connecting)
        return _Connection(reader, writer), False

    async def _exchange(
        self, connection: _Connection, head: bytes, body: bytes, request: httpx.Request
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        writer = connection.writer
        try:
            writer.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                writer.write(body)
        except OSError as exc:
            raise httpx.WriteError(str(exc) or type(exc).__name__, request=request) from exc
        await _within("write", request, writer.drain())
        raw = await _within("read", request, connection.reader.readuntil(b"\r\n\r\n"))
        lines = raw[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise httpx.RemoteProtocolError(f"malformed status line {lines[0][:100]!r}", request=request)
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise httpx.RemoteProtocolError("malformed response header", request=request)
            headers.append((name.strip(), value.strip()))
        return int(parts[1]), headers

    def _release(self, origin: _Origin, connection: _Connection, reusable: bool) -> None:
        if reusable and not self._closed and connection.is_usable:
            self._idle.setdefault(origin, []).append(connection)
        else:
            connection.close()
        self._slots.release()


def _framing(
    status: int, headers: list[tuple[bytes, bytes]], request: httpx.Request
) -> tuple[int | None, bool, bool]:
    """How a response body ends: ``(content length or None, chunked, connection kept alive)``;
    ``RemoteProtocolError`` for a Content-Length that is not a length."""
    length: int | None = None
    chunked = False
    keep_alive = True
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            if not value.isdigit():
                raise httpx.RemoteProtocolError(f"malformed Content-Length {value[:40]!r}", request=request)
            length = int(value)
        elif lname == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
        elif lname == b"connection" and value.lower() == b"close":
            keep_alive = False
    if status in (204, 304) or 100 <= status < 200 or request.method == "HEAD":
        length = 0
    if length is None and not chunked:
        keep_alive = False  # delimited by the upstream closing the connection
    return length, chunked, keep_alive


def _chunk_size(line: bytes, request: httpx.Request) -> int:
    """The size on a chunk's first line (extensions after ';' ignored); ``RemoteProtocolError``
    for anything but hex digits (an upstream breaking the framing is a 502, not a crash)."""
    digits = line.split(b";", 1)[0].strip()
    if not digits or len(digits) > 16 or digits.strip(b"0123456789abcdefABCDEF"):
        raise httpx.RemoteProtocolError(f"malformed chunk size {line[:40]!r}", request=request)
    return int(digits, 16)


class _ResponseBody(httpx.AsyncByteStream):
    """The response body, framed by Content-Length, chunked encoding or connection close."""

    def __init__(
        self,
        transport: LeanTransport,
        origin: _Origin,
        connection: _Connection,
        request: httpx.Request,
        framing: tuple[int | None, bool, bool],
    ) -> None:
        self._give_back = functools.partial(transport._release, origin, connection)
        self._connection = connection
        self._request = request
        self._complete = self._released = False
        self._length, self._chunked, self._keep_alive = framing

    async def __aiter__(self) -> AsyncIterator[bytes]:
        reader = self._connection.reader
        try:
            if self._chunked:
                async for chunk in self._chunks(reader):
                    yield chunk
            elif self._length is not None:
                remaining = self._length
                while remaining:
                    data = await _within("read", self._request, reader.read(min(remaining, _READ_SIZE)))
                    if not data:
                        raise httpx.RemoteProtocolError("the upstream closed mid-body", request=self._request)
                    remaining -= len(data)
                    yield data
            else:
                while data := await _within("read", self._request, reader.read(_READ_SIZE)):
                    yield data
            self._complete = True
        finally:
            if self._complete:
                self._finish()

    async def _chunks(self, reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while True:
            line = await _within("read", self._request, reader.readuntil(b"\r\n"))
            size = _chunk_size(line, self._request)
            if size == 0:
                while (await _within("read", self._request, reader.readuntil(b"\r\n"))) != b"\r\n":
                    pass  # trailers
                return
            data = await _within("read", self._request, reader.readexactly(size + 2))
            if data[-2:] != b"\r\n":
                raise httpx.RemoteProtocolError("a chunk longer than its size", request=self._request)
            yield data[:-2]

    def _finish(self) -> None:
        if not self._released:
            self._released = True
            self._give_back(self._complete and self._keep_alive)

    async def aclose(self) -> None:
        # Closed before the end (the client went away): the connection cannot be reused, and
        # closing it is what tells the upstream to stop.
        self._finish()
