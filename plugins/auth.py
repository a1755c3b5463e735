"""API-key authentication on the ``authenticate`` hook.

Keys come from ``[plugins.auth]``: ``keys`` (plain keys, usually ``"${ENV_VAR}"``; an entry may hold
several, comma-separated) and ``key_hashes`` (``"sha256:<hex>"``, for configs that must not hold
keys). Only SHA-256 digests are kept in memory and compared, in constant time. With no key
configured the gateway is open. A client sends ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from gateway.config import Settings, convert_table
from gateway.context import RequestContext
from gateway.hookspecs import hookimpl
from gateway.keys import check_bearer, hash_key, key_digests

class AuthOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    keys: list[str] = []
    key_hashes: list[str] = []


class _State:
    digests: tuple[bytes, ...] = ()


_state = _State()


@hookimpl
def plugin_configure(settings: Settings) -> None:
    options = convert_table(settings.plugins.get("auth", {}), AuthOptions, "plugins.auth")
    _state.digests = key_digests(options.keys, options.key_hashes, "plugins.auth")


@hookimpl
def authenticate(ctx: RequestContext, headers: dict[str, str]) -> None:
    digests = _state.digests
    if not digests:
        return
    digest = check_bearer(digests, headers)
    ctx.principal = "key-" + digest.hex()[:12]


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
