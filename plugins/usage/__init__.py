"""The usage ledger: one row per request, written off the hot path (``plugins.usage.ledger``).

``[usage]``: ``url`` (``postgresql://…`` or ``sqlite:///path``; default a SQLite file under the
Taxiway home, WAL), ``enabled`` (default true), ``flush_interval_s`` (0.5), ``batch_size`` (500),
``spool_dir`` (default ``<home>/usage-spool``). A row: time, request id, key (id and name, or the
static key's principal), model, backend, endpoint, prompt / completion / cached tokens, latency,
status. Reported by ``taxiway usage --since 7d --by key,model`` and ``GET /admin/usage``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from gateway.config import Settings, convert_table
from gateway.context import RequestContext
from gateway.errors import TaxiwayError
from gateway.hookspecs import RouteResponse, hookimpl
from gateway.interface import Usage
from plugins.db import Database, database_url
from plugins.usage.ledger import Ledger
from plugins.usage.report import configure_command, parse_query, report, run_command


class UsageOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: str | None = None
    enabled: bool = True
    flush_interval_s: float = 0.5
    batch_size: int = 500
    spool_dir: str | None = None


class _State:
    ledger: Ledger | None = None
    url: str = ""


_state = _State()


@hookimpl
def plugin_configure(settings: Settings) -> None:
    options = convert_table(settings.usage, UsageOptions, "usage")
    url = database_url(settings)
    if _state.ledger is not None and _state.ledger.is_running:
        return  # a reload (SIGHUP): the running ledger stays; [usage] changes take a restart
    _state.url = url
    _state.ledger = None
    if options.enabled:
        spool = Path(options.spool_dir) if options.spool_dir else Path(settings.server.home) / "usage-spool"
        _state.ledger = Ledger(
            Database(_state.url), spool, flush_interval_s=options.flush_interval_s, batch_size=options.batch_size
        )


@hookimpl
async def plugin_startup() -> None:
    if _state.ledger is not None:
        await _state.ledger.start()


@hookimpl
async def plugin_shutdown() -> None:
    if _state.ledger is not None:
        await _state.ledger.close()


def _record(ctx: RequestContext, usage: Usage | None) -> None:
    ledger = _state.ledger
    if ledger is None:
        return
    key = ctx.key
    total_s = ctx.timings.total_s
    ledger.record((
        os.urandom(8).hex(), time.time(), ctx.request_id,
        key.id if key is not None else ctx.principal, key.name if key is not None else None,
        ctx.model, ctx.backend_name, ctx.endpoint,
        usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0, usage.cached_tokens if usage else 0,
        None if total_s is None else round(total_s * 1000.0, 3), ctx.status_code,
    ))  # fmt: skip


@hookimpl
def after_request(ctx: RequestContext, usage: Usage | None) -> None:
    _record(ctx, usage)


@hookimpl
def on_error(ctx: RequestContext, error: TaxiwayError) -> None:
    _record(ctx, None)


async def _admin_usage(scope: dict[str, Any], receive: Any) -> RouteResponse:
    """``GET /admin/usage?since=7d&by=key,model``."""
    since_s, by = parse_query(scope.get("query_string", b"").decode("latin-1"))
    if _state.ledger is not None:
        await _state.ledger.flush()  # what was served until now, reported now
    rows = await asyncio.to_thread(report, _state.url, since_s, by)
    return RouteResponse(msgspec.json.encode({"object": "list", "since_s": since_s, "by": by, "data": rows}))


@hookimpl
def register_routes(register: Callable[..., None]) -> None:
    register("usage", _admin_usage, admin=True)


@hookimpl
def register_commands(register: Callable[..., Any]) -> None:
    register(("usage",), configure_command, run_command)
