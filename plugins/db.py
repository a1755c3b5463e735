"""The operations database: virtual keys and the usage ledger, in SQLite or PostgreSQL.

``[usage] url``: ``postgresql://…`` (psycopg), ``sqlite:///path``, or none for a SQLite file under
the Taxiway home (``usage.sqlite3``, WAL). A ``Database`` is used from one thread at a time (the
ledger's writer thread, the key refresher's, a CLI command): it holds one connection, opened on
first use and dropped after a failure so that the next call reconnects (a database restart).
SQL is written with ``?`` placeholders; PostgreSQL's ``%s`` is substituted here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gateway.config import Settings
from gateway.errors import ConfigError

SQLITE_FILE = "usage.sqlite3"

USAGE_COLUMNS = (
    "row_id", "time", "request_id", "key_id", "key_name", "model", "backend", "endpoint",
    "prompt_tokens", "completion_tokens", "cached_tokens", "latency_ms", "status",
)  # fmt: skip
KEY_COLUMNS = (
    "id", "name", "key_hash", "models", "rpm", "tpm", "max_parallel", "budget_tokens_per_day",
    "created_at", "expires_at", "disabled",
)  # fmt: skip

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS usage (
        row_id TEXT PRIMARY KEY, time DOUBLE PRECISION NOT NULL, request_id TEXT NOT NULL,
        key_id TEXT, key_name TEXT, model TEXT, backend TEXT, endpoint TEXT NOT NULL,
        prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL,
        latency_ms DOUBLE PRECISION, status INTEGER NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS usage_time ON usage (time)",
    """CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, key_hash TEXT NOT NULL UNIQUE, models TEXT NOT NULL,
        rpm INTEGER, tpm INTEGER, max_parallel INTEGER, budget_tokens_per_day INTEGER,
        created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION, disabled INTEGER NOT NULL)""",
)


def database_url(settings: Settings) -> str:
    """``[usage] url``, or the SQLite file under the Taxiway home."""
    url = settings.usage.get("url")
    if url is None:
        return "sqlite:///" + str(Path(settings.server.home) / SQLITE_FILE)
    if not isinstance(url, str) or not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError("expected 'postgresql://…' or 'sqlite:///path'", path="usage.url")
    return url


class Database:
    """One connection to the operations database (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_postgres = url.startswith(("postgresql://", "postgres://"))
        self._conn: Any = None

    def __repr__(self) -> str:
        return f"Database({'postgresql' if self.is_postgres else self.url})"  # no password in logs

    def _connect(self) -> Any:
        if self._conn is None:
            if self.is_postgres:
                import psycopg

                conn = psycopg.connect(self.url, connect_timeout=3)
            else:
                path = Path(self.url.removeprefix("sqlite:///"))
                path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, timeout=2.0, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            try:
                with self._transaction(conn):
                    for statement in _SCHEMA:
                        conn.execute(statement)
            except Exception:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _transaction(self, conn: Any) -> Any:
        # sqlite3's connection is its own transaction context; psycopg's would close itself
        return conn.transaction() if self.is_postgres else conn

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.is_postgres else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement in its own transaction; rows for a query. A failure drops the
        connection and raises (``sqlite3.Error``, ``psycopg.Error``)."""
        conn = self._connect()
        try:
            with self._transaction(conn):
                cursor = conn.execute(self._sql(sql), tuple(params))
                rows = cursor.fetchall() if cursor.description is not None else []
            return [tuple(row) for row in rows]
        except Exception:
            self.close()
            raise

    def insert_usage(self, rows: Iterable[Sequence[Any]]) -> None:
        """Insert ledger rows in one transaction; a row already there (same ``row_id``, a spool
        replayed after a commit whose answer was lost) is skipped, never doubled."""
        rows = list(rows)
        if not rows:
            return
        placeholders = ", ".join("?" * len(USAGE_COLUMNS))
        verb = "INSERT" if self.is_postgres else "INSERT OR IGNORE"
        tail = " ON CONFLICT (row_id) DO NOTHING" if self.is_postgres else ""
        sql = self._sql(f"{verb} INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES ({placeholders}){tail}")
        conn = self._connect()
        try:
            with self._transaction(conn):
                if self.is_postgres:
                    with conn.cursor() as cursor:
                        cursor.executemany(sql, rows)
                else:
                    conn.executemany(sql, rows)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # a connection to a database that went away
                pass
