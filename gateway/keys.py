"""API keys as SHA-256 digests: read from config, compared in constant time.

Shared by the client keys (``plugins/auth.py``) and the admin keys (``gateway/admin.py``): a key
is never kept in memory, only its digest.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import msgspec

from gateway.errors import AuthenticationError, ConfigError

HASH_PREFIX = "sha256:"


class KeyInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A virtual key as the request hooks see it: who it is and what it may do (never the key).

    ``models`` empty: every model. A ``None`` limit: none.
    """

    id: str
    name: str
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    budget_tokens_per_day: int | None = None


def hash_key(key: str) -> str:
    """The ``key_hashes`` entry for ``key``."""
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def key_digests(keys: Sequence[str], key_hashes: Sequence[str], path: str) -> tuple[bytes, ...]:
    """The digests of ``keys`` (an entry may hold several, comma-separated; empty ones are
    skipped) and of ``key_hashes`` (``"sha256:<hex>"``); errors name ``{path}.key_hashes[i]``."""
    digests = [
        hashlib.sha256(key.encode()).digest()
        for entry in keys
        for key in (part.strip() for part in entry.split(","))
        if key
    ]
    for i, entry in enumerate(key_hashes):
        hexdigest = entry.removeprefix(HASH_PREFIX)
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            digest = b""
        if not entry.startswith(HASH_PREFIX) or len(digest) != 32:
            raise ConfigError("expected 'sha256:' and 64 hex digits", path=f"{path}.key_hashes[{i}]")
        digests.append(digest)
    return tuple(digests)


def bearer_digest(headers: dict[str, str]) -> bytes:
    """The digest of the ``Authorization: Bearer`` key; ``AuthenticationError`` (401) without one."""
    authorization = headers.get("authorization", "")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationError(
            "You didn't provide an API key. Send it in the header 'Authorization: Bearer YOUR_KEY'."
        )
    return hashlib.sha256(key.encode()).digest()


def is_known(digests: tuple[bytes, ...], digest: bytes) -> bool:
    matched = False
    for known in digests:  # no early exit: the time taken does not tell which key matched
        matched |= hmac.compare_digest(known, digest)
    return matched


def check_bearer(digests: tuple[bytes, ...], headers: dict[str, str]) -> bytes:
    """The digest of the ``Authorization: Bearer`` key when it is one of ``digests``;
    ``AuthenticationError`` (401) otherwise."""
    digest = bearer_digest(headers)
    if not is_known(digests, digest):
        raise AuthenticationError("Incorrect API key provided.")
    return digest
