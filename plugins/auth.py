"""API-key authentication on the ``authenticate`` hook.

Keys come from ``[plugins.auth]``: ``keys`` (plain keys, usually ``"${ENV_VAR}"``; an entry may hold
several, comma-separated) and ``key_hashes`` (``"sha256:<hex>"``, for configs that must not hold
keys). Only SHA-256 digests are kept in memory and compared, in constant time. With no key
configured the gateway is open. A client sends ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import hmac
import sys
from collections.abc import Callable
from typing import Any

import msgspec

from gateway.config import Settings, convert_table
from gateway.context import RequestContext
from gateway.errors import AuthenticationError, ConfigError
from gateway.hookspecs import hookimpl

_HASH_PREFIX = "sha256:"


class AuthOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    keys: list[str] = []
    key_hashes: list[str] = []


class _State:
    digests: tuple[bytes, ...] = ()


_state = _State()


def hash_key(key: str) -> str:
    """The ``key_hashes`` entry for ``key``."""
    return _HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


@hookimpl
def plugin_configure(settings: Settings) -> None:
    options = convert_table(settings.plugins.get("auth", {}), AuthOptions, "plugins.auth")
    digests = [
        hashlib.sha256(key.encode()).digest()
        for entry in options.keys
        for key in (part.strip() for part in entry.split(","))
        if key
    ]
    for i, entry in enumerate(options.key_hashes):
        hexdigest = entry.removeprefix(_HASH_PREFIX)
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            digest = b""
        if not entry.startswith(_HASH_PREFIX) or len(digest) != 32:
            raise ConfigError("expected 'sha256:' and 64 hex digits", path=f"plugins.auth.key_hashes[{i}]")
        digests.append(digest)
    _state.digests = tuple(digests)


@hookimpl
def authenticate(ctx: RequestContext, headers: dict[str, str]) -> None:
    digests = _state.digests
    if not digests:
        return
    authorization = headers.get("authorization", "")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationError(
            "You didn't provide an API key. Send it in the header 'Authorization: Bearer YOUR_KEY'."
        )
    digest = hashlib.sha256(key.encode()).digest()
    matched = False
    for known in digests:  # no early exit: the time taken does not tell which key matched
        matched |= hmac.compare_digest(known, digest)
    if not matched:
        raise AuthenticationError("Incorrect API key provided.")
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
