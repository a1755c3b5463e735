"""API-key authentication on the ``authenticate`` hook.

Keys come from ``[plugins.auth]``: ``keys`` (plain keys, usually ``"${ENV_VAR}"``; an entry may hold
several, comma-separated) and ``key_hashes`` (``"sha256:<hex>"``, for configs that must not hold
keys). Only SHA-256 digests are kept in memory and compared, in constant time. With no key
configured the gateway is open. A client sends ``Authorization: Bearer KEY``.

Virtual keys (``taxiway keys create``, ``plugins.keys``) are read from the operations database
every ``refresh_s`` seconds; once one exists a key is required. A virtual key sets
``ctx.key`` (its limits, for ``plugins.limits``); ``before_request`` refuses a model it may not use
(403). Static keys keep working beside them, with no per-key limits.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from gateway.config import Settings, convert_table
from gateway.context import RequestContext
from gateway.errors import AuthenticationError, PermissionDeniedError
from gateway.hookspecs import hookimpl
from gateway.keys import bearer_digest, hash_key, is_known, key_digests
from plugins import keys as virtual_keys
from plugins.db import Database, database_url

log = structlog.get_logger("taxiway.auth")


class AuthOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    keys: list[str] = []
    key_hashes: list[str] = []
    virtual_keys: bool = True  # read virtual keys from the operations database
    refresh_s: float = 1.0  # how often; a created, disabled or rotated key takes effect within it


class _State:
    digests: tuple[bytes, ...] = ()
    table: virtual_keys.KeyTable = virtual_keys.KeyTable({})
    db: Database | None = None
    refresh_s: float = 1.0
    refresher: asyncio.Task[None] | None = None
    router: Callable[[], Any] | None = None
    allowed: dict[tuple[int, tuple[str, ...]], frozenset[str]] = {}


_state = _State()


@hookimpl
def plugin_configure(settings: Settings) -> None:
    options = convert_table(settings.plugins.get("auth", {}), AuthOptions, "plugins.auth")
    _state.digests = key_digests(options.keys, options.key_hashes, "plugins.auth")
    url = database_url(settings) if options.virtual_keys else None
    if url is None or _state.db is None or _state.db.url != url:  # a reload keeps a running refresher's table
        _state.db = Database(url) if url is not None else None
        _state.table = virtual_keys.KeyTable({})
    _state.refresh_s = options.refresh_s
    _state.allowed = {}


async def _refresh(db: Database) -> None:
    try:
        _state.table = await asyncio.to_thread(virtual_keys.read_table, db)
    except Exception as exc:  # the database down: the last table read stays in force
        log.warning("keys.refresh_failed", error=f"{type(exc).__name__}: {exc}"[:300])


async def _refresh_loop(db: Database) -> None:
    while True:
        await asyncio.sleep(_state.refresh_s)
        await _refresh(db)


@hookimpl
async def plugin_startup() -> None:
    if _state.db is not None:
        await _refresh(_state.db)
        _state.refresher = asyncio.get_running_loop().create_task(_refresh_loop(_state.db))


@hookimpl
async def plugin_shutdown() -> None:
    if _state.refresher is not None:
        _state.refresher.cancel()
        _state.refresher = None
    if _state.db is not None:
        await asyncio.to_thread(_state.db.close)


@hookimpl
def register_routes(register: Callable[..., None], router: Callable[[], Any]) -> None:
    _state.router = router


@hookimpl
def authenticate(ctx: RequestContext, headers: dict[str, str]) -> None:
    digests, table = _state.digests, _state.table
    if not digests and not table:
        return
    digest = bearer_digest(headers)
    if is_known(digests, digest):
        ctx.principal = "key-" + digest.hex()[:12]
        return
    info = table.check(digest, time.time())
    if info is None:
        raise AuthenticationError("Incorrect API key provided.")
    ctx.key = info
    ctx.principal = info.name


@hookimpl
def before_request(ctx: RequestContext) -> None:
    key = ctx.key
    if key is None or not key.models or ctx.model is None:
        return
    if ctx.model not in _allowed_models(key.models):
        raise PermissionDeniedError(
            f"This API key may not use the model '{ctx.model}'.", param="model", code="model_not_allowed"
        )


def _allowed_models(names: tuple[str, ...]) -> frozenset[str]:
    """The routed names ``names`` (names or aliases) stand for in the current routing table."""
    router = _state.router() if _state.router is not None else None
    cache_key = (id(router), names)
    allowed = _state.allowed.get(cache_key)
    if allowed is None:
        routes = [router.get(name) for name in names] if router is not None else []
        allowed = frozenset(names) | {route.name for route in routes if route is not None}
        if len(_state.allowed) > 1024:
            _state.allowed.clear()
        _state.allowed[cache_key] = allowed
    return allowed


def _configure_hash(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stdin", action="store_true", help="read the key from standard input")


def _hash(args: argparse.Namespace) -> int:
    """Print the key_hashes entry for an API key (asked for, or read from stdin)."""
    key = sys.stdin.readline().strip() if args.stdin else getpass.getpass("API key: ")
    print(hash_key(key))
    return 0


@hookimpl
def register_commands(register: Callable[..., Any]) -> None:
    register(("auth", "hash-key"), _configure_hash, _hash)
    for path, configure, run in virtual_keys.COMMANDS:
        register(path, configure, run)
