"""The playground: a chat and embeddings page served at ``/``, for a first look at a server.

Plain HTML, CSS and JavaScript shipped in this package (``index.html``, ``playground.css``,
``playground.js``; package data in ``pyproject.toml``): nothing comes from a CDN and nothing is
fetched at run time except the server's own API, which the page calls like any client (the key
it is given goes in ``Authorization``). The files are read once, on first request; the page is
public, the API behind it is not.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from gateway.asgi import Scope, send_bytes, send_error
from gateway.errors import MethodNotAllowedError, NotFoundError

#: file name -> content type; anything else below /playground is a 404
FILES = {
    "index.html": b"text/html; charset=utf-8",
    "playground.css": b"text/css; charset=utf-8",
    "playground.js": b"text/javascript; charset=utf-8",
}
PAGE = "index.html"


class Playground:
    """``GET /`` (the page) and ``GET /playground/{file}`` (its stylesheet and script)."""

    def __init__(self) -> None:
        self._cache: dict[str, bytes] = {}

    def read(self, name: str) -> bytes:
        body = self._cache.get(name)
        if body is None:
            body = resources.files(__package__).joinpath(name).read_bytes()
            self._cache[name] = body
        return body

    async def page(self, scope: Scope, receive: Any, send: Any) -> None:
        await self._send(scope, send, PAGE)

    async def asset(self, scope: Scope, receive: Any, send: Any) -> None:
        # below the /playground mount (litestar adds a slash): "/playground.js/"; "/" is the page again
        name = scope["path"].strip("/") or PAGE
        await self._send(scope, send, name)

    async def _send(self, scope: Scope, send: Any, name: str) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await send_error(send, MethodNotAllowedError(f"Method {scope['method']} is not allowed; use GET", allow="GET, HEAD"), "")
            return
        if name not in FILES:
            await send_error(send, NotFoundError(f"No such playground file: {name!r}"), "")
            return
        # no-cache: an upgraded server's page is seen at once (the files are small)
        headers = [(b"content-type", FILES[name]), (b"cache-control", b"no-cache")]
        await send_bytes(send, 200, self.read(name), headers)
