"""Every pluggy hook Taxiway calls, in one place.

Plugins (in-repo and third-party alike) are modules or objects with ``@hookimpl`` functions,
found through the entry-point group ``taxiway``. No hook is called per token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.errors import TaxiwayError
    from gateway.interface import Backend, Usage

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
