"""Virtual keys: named API keys with their own models, limits, budget and expiry.

Stored in the operations database (``plugins.db``: the usage ledger's), only as SHA-256 digests;
``taxiway keys create`` prints a key once. The gateway reads the table every ``refresh_s`` seconds
(``[plugins.auth] refresh_s``, default 1) into a ``KeyTable``, so that a key created, disabled or
rotated by the CLI takes effect without a restart, on every replica sharing the database.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import time

import msgspec

from gateway.config import load_settings
from gateway.errors import AuthenticationError
from gateway.keys import KeyInfo
from plugins.db import KEY_COLUMNS, Database, database_url
from plugins.usage.report import parse_since

KEY_PREFIX = "sk-tw-"


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    info: KeyInfo
    expires_at: float | None
    disabled: bool


class KeyTable:
    """Digest → record, as read from the database at one moment."""

    def __init__(self, records: dict[bytes, KeyRecord]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def check(self, digest: bytes, now: float) -> KeyInfo | None:
        """The key's info when ``digest`` is a usable virtual key; None when it is none of them;
        ``AuthenticationError`` (401) naming why when it is one that may not be used. The message
        speaks of this key only."""
        record = self.records.get(digest)
        if record is None:
            return None
        if record.disabled:
            raise AuthenticationError("This API key has been disabled.", code="key_disabled")
        if record.expires_at is not None and now >= record.expires_at:
            raise AuthenticationError("This API key has expired.", code="key_expired")
        return record.info


def read_table(db: Database) -> KeyTable:
    rows = db.execute(f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys")
    records = {}
    for key_id, name, key_hash, models, rpm, tpm, max_parallel, budget, _created, expires_at, disabled in rows:
        info = KeyInfo(
            id=key_id, name=name, models=tuple(m for m in models.split(",") if m), rpm=rpm, tpm=tpm,
            max_parallel=max_parallel, budget_tokens_per_day=budget,
        )  # fmt: skip
        records[bytes.fromhex(key_hash.removeprefix("sha256:"))] = KeyRecord(
            info=info, expires_at=expires_at, disabled=bool(disabled)
        )
    return KeyTable(records)


def _digest_text(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# ---------------------------------------------------------------------------------------------
# taxiway keys create | list | disable | enable | rotate


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config ([usage] url; default the home's SQLite file)")


def configure_create(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)
    parser.add_argument("--name", required=True, help="a unique name (reports and logs show it)")
    parser.add_argument("--models", default="", help="comma-separated model names or aliases (default: all)")
    parser.add_argument("--rpm", type=int, help="requests per minute")
    parser.add_argument("--tpm", type=int, help="tokens per minute (prompt + max_tokens reserved, then corrected)")
    parser.add_argument("--max-parallel", type=int, help="requests in flight at once")
    parser.add_argument("--budget-tokens-per-day", type=int, help="tokens per UTC day")
    parser.add_argument("--expires", help="lifetime: 30d, 12h… (default: never)")


def _db(args: argparse.Namespace) -> Database:
    return Database(database_url(load_settings(args.config)))


def create(args: argparse.Namespace) -> int:
    """Create a virtual key; prints the key once (only its digest is stored)."""
    for flag in ("rpm", "tpm", "max_parallel", "budget_tokens_per_day"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            print(f"taxiway keys create: --{flag.replace('_', '-')} must not be negative")
            return 2
    try:
        expires_at = None if args.expires is None else time.time() + parse_since(args.expires)
    except ValueError as exc:
        print(f"taxiway keys create: --expires: {exc}")
        return 2
    db = _db(args)
    try:
        if db.execute("SELECT id FROM api_keys WHERE name = ?", (args.name,)):
            print(f"taxiway keys create: a key named {args.name!r} exists (rotate or disable it)")
            return 2
        key, key_id = _new_key(), "key_" + secrets.token_hex(6)
        models = ",".join(m.strip() for m in args.models.split(",") if m.strip())
        db.execute(
            f"INSERT INTO api_keys ({', '.join(KEY_COLUMNS)}) VALUES ({', '.join('?' * len(KEY_COLUMNS))})",
            (key_id, args.name, _digest_text(key), models, args.rpm, args.tpm, args.max_parallel,
             args.budget_tokens_per_day, time.time(), expires_at, 0),
        )  # fmt: skip
    finally:
        db.close()
    print(key)
    return 0


def configure_list(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)


def list_keys(args: argparse.Namespace) -> int:
    """List the virtual keys: name, models, limits, state (never the keys)."""
    db = _db(args)
    try:
        rows = db.execute(
            "SELECT id, name, models, rpm, tpm, max_parallel, budget_tokens_per_day, expires_at, disabled"
            " FROM api_keys ORDER BY name"
        )
    finally:
        db.close()
    now = time.time()
    table = [("ID", "NAME", "MODELS", "RPM", "TPM", "PARALLEL", "BUDGET/DAY", "STATE")]
    for key_id, name, models, rpm, tpm, parallel, budget, expires_at, disabled in rows:
        state = "disabled" if disabled else "expired" if expires_at is not None and now >= expires_at else "active"
        if state == "active" and expires_at is not None:
            state = f"active, expires in {(expires_at - now) / 86400:.1f}d"
        table.append((key_id, name, models or "*", *("-" if v is None else str(v) for v in (rpm, tpm, parallel, budget)),
                      state))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def configure_named(parser: argparse.ArgumentParser) -> None:
    _add_config(parser)
    parser.add_argument("name", help="the key's name or id")


def _update(args: argparse.Namespace, assignment: str, params: tuple[object, ...]) -> bool:
    db = _db(args)
    try:
        found = db.execute("SELECT id FROM api_keys WHERE name = ? OR id = ?", (args.name, args.name))
        if not found:
            print(f"taxiway keys: no key named {args.name!r}")
            return False
        db.execute(f"UPDATE api_keys SET {assignment} WHERE id = ?", (*params, found[0][0]))
        return True
    finally:
        db.close()


def disable(args: argparse.Namespace) -> int:
    """Disable a virtual key (its requests get a 401 within refresh_s)."""
    return 0 if _update(args, "disabled = ?", (1,)) else 1


def enable(args: argparse.Namespace) -> int:
    """Enable a disabled virtual key again."""
    return 0 if _update(args, "disabled = ?", (0,)) else 1


def rotate(args: argparse.Namespace) -> int:
    """Give a virtual key a new secret (printed once); the old one stops working."""
    key = _new_key()
    if not _update(args, "key_hash = ?", (_digest_text(key),)):
        return 1
    print(key)
    return 0


COMMANDS = (
    (("keys", "create"), configure_create, create),
    (("keys", "list"), configure_list, list_keys),
    (("keys", "disable"), configure_named, disable),
    (("keys", "enable"), configure_named, enable),
    (("keys", "rotate"), configure_named, rotate),
)
