"""Every pluggy hook Taxiway calls, in one place.

Plugins (in-repo and third-party alike) are modules or objects with ``@hookimpl`` functions,
found through the entry-point group ``taxiway``. No hook is called per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import pluggy

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.errors import TaxiwayError
    from gateway.interface import Backend, Usage
    from gateway.router import Router

PROJECT = "taxiway"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backends(register: Callable[[str, type[Backend]], None]) -> None:
    """Called once at start-up. Call ``register(name, BackendClass)`` for each backend type.

    ``name`` is what config's ``backend = "…"`` refers to. Registering a name twice is an error
    at start-up. Return value ignored.
    """


@hookspec
def register_commands(
    register: Callable[[tuple[str, ...], Callable[[Any], None], Callable[[Any], int]], None],
) -> None:
    """Called when the CLI is built. ``register(path, configure, run)`` adds a subcommand.

    ``path`` is e.g. ``("pull",)`` or ``("bench", "engine")``; ``configure(parser)`` adds
    arguments to an ``argparse.ArgumentParser``; ``run(args)`` returns the exit code.
    """


@hookspec(firstresult=True)
def model_entry(model: str, home: str, progress: bool) -> dict[str, Any] | None:
    """Called once by ``taxiway serve MODEL`` (no config), before the server starts.

    ``model`` is what the user typed: a catalogue name, a file or a directory. Return the
    ``[[models]]`` table that serves it (``name``, ``backend``, ``options``), or None when this
    plugin does not know it; the first table returned wins. May download the model into ``home``
    (the Taxiway home), with progress on stderr when ``progress``. Raising
    ``gateway.errors.ConfigError`` stops the command with that message.
    """


@hookspec
def plugin_configure(settings: Any) -> None:
    """Called once at start-up with the validated ``gateway.config.Settings``.

    A plugin reads its own table from ``settings.plugins`` here. Raising
    ``gateway.errors.ConfigError`` aborts start-up with that message.
    """


@hookspec
async def authenticate(ctx: RequestContext, headers: dict[str, str]) -> None:
    """Called for each API request before the body is parsed (not for /health, /ready).

    ``headers`` are lower-cased. May set ``ctx.principal``. Raise
    ``AuthenticationError``/``PermissionDeniedError`` to reject (401/403). May be async.
    """


@hookspec
async def before_request(ctx: RequestContext) -> None:
    """Called once the request is parsed and routed (``ctx.model``, ``ctx.backend_name`` set),
    before the backend runs. Raise a ``TaxiwayError`` (e.g. ``RateLimitError``) to reject it.
    """


@hookspec
async def after_request(ctx: RequestContext, usage: Usage | None) -> None:
    """Called once per request after the response (or stream) has completed successfully,
    with token usage when the backend reported it. Exceptions are logged, never sent to the client.
    """


@hookspec
async def on_error(ctx: RequestContext, error: TaxiwayError) -> None:
    """Called once per request that failed, with the error the client received (or the stream
    ended with). A client that disconnected before the end arrives here as
    ``ClientDisconnectedError`` (status 499). Exceptions are logged, never sent to the client.
    """


class RouteResponse(msgspec.Struct, frozen=True):
    """What a plugin's HTTP route answers (``register_routes``): a 200 with ``body``."""

    body: bytes
    content_type: str = "application/json"


@hookspec
def register_routes(register: Callable[..., None], router: Callable[[], Router]) -> None:
    """Called once when the app is built. ``register(path, handler, admin=False)`` serves
    ``GET``/``POST path`` with ``async handler(scope, receive) -> RouteResponse``; ``admin=True``
    puts it below ``/admin`` (``path`` then relative to it, e.g. ``"usage"``) behind the admin keys.
    A handler raises ``TaxiwayError`` to answer an error. ``router()`` is the current routing
    table (``gateway.router.Router``), e.g. for per-model gauges at scrape time.
    """


@hookspec
async def plugin_startup() -> None:
    """Called once in the app's lifespan before serving (after ``plugin_configure``): start
    background work (writers, refreshers). Raising aborts the start. May be async."""


@hookspec
async def plugin_shutdown() -> None:
    """Called once at shutdown (SIGTERM included), after the backends have stopped and every
    request has ended: flush what is buffered. Exceptions are logged. May be async."""
