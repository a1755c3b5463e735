"""The usage ledger's writer: rows buffered on the event loop, written in batches on one thread.

Contract:
- ``record(row)`` is all the request path does: append a tuple to a list (no I/O, no await).
- A writer task wakes every ``flush_interval_s`` (or when ``batch_size`` rows wait) and hands the
  buffer to the writer thread, which inserts it in one transaction.
- A failed write (the database down, locked, restarting) appends the batch to this process's spool
  file (JSON lines under ``spool_dir``) instead; every later write first replays spooled rows,
  so they reach the database once it answers again. Rows carry their own ``row_id`` and inserts
  skip ids already present, so a replay after a commit whose answer was lost never doubles a row.
- A spool file is held under an exclusive ``flock`` by its process; one left by a process that
  died (no lock held) is replayed by the next writer that finds it.
- ``close()`` (the plugin's shutdown, SIGTERM included) stops the task and writes what is left
  (to the database, or the spool when it is down): nothing recorded is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import structlog

from plugins.db import Database

log = structlog.get_logger("taxiway.usage")

Row = tuple[Any, ...]


class Ledger:
    """Batches ledger rows into ``db`` (module docstring)."""

    def __init__(self, db: Database, spool_dir: Path, *, flush_interval_s: float = 0.5, batch_size: int = 500) -> None:
        self.db = db
        self.spool_dir = spool_dir
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.num_written = 0
        self.num_spooled = 0
        self.num_write_failures = 0
        self._rows: list[Row] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taxiway-usage")
        self._spool_path = spool_dir / f"{os.getpid()}.jsonl"
        self._spool: Any = None  # this process's spool file, opened (and locked) on first use

    # -- the event loop's side -------------------------------------------------------------------

    def record(self, row: Row) -> None:
        self._rows.append(row)
        if len(self._rows) >= self.batch_size and self._wake is not None:
            self._wake.set()

    @property
    def is_running(self) -> bool:
        return self._task is not None

    async def start(self) -> None:
        self._wake = asyncio.Event()
        await self._run(self._replay_only)  # rows a previous run left in the spool
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
        await self._run(self._close_thread)
        self._executor.shutdown(wait=True)

    async def flush(self) -> None:
        """Write every row recorded so far (or spool them)."""
        rows, self._rows = self._rows, []
        await self._run(self._write, rows)

    async def _loop(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval_s)
            self._wake.clear()
            await self.flush()

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    # -- the writer thread's side ----------------------------------------------------------------

    def _write(self, rows: list[Row]) -> None:
        try:
            self._replay()
            if rows:
                self.db.insert_usage(rows)
                self.num_written += len(rows)
        except Exception as exc:
            self.num_write_failures += 1
            self._spool_rows(rows)
            log.warning("usage.write_failed", error=f"{type(exc).__name__}: {exc}"[:300], spooled=len(rows),
                        spool=str(self._spool_path))  # fmt: skip

    def _replay_only(self) -> None:
        with contextlib.suppress(Exception):  # the database may be down at start: replayed later
            self._replay()

    def _replay(self) -> None:
        """Spooled rows into the database: this process's spool, then any a dead process left."""
        if self._spool is not None and self._spool.tell() > 0:
            self._spool.flush()
            rows = _read_spool(self._spool_path)
            self.db.insert_usage(rows)
            self._spool.seek(0)
            self._spool.truncate()
            log.info("usage.replayed", rows=len(rows), spool=str(self._spool_path))
        if not self.spool_dir.is_dir():
            return
        for path in self.spool_dir.glob("*.jsonl"):
            if path == self._spool_path:
                continue
            with open(path, "a+b") as orphan:
                try:
                    fcntl.flock(orphan, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its process is alive and replays it itself
                rows = _read_spool(path)
                self.db.insert_usage(rows)
                path.unlink()
                log.info("usage.replayed", rows=len(rows), spool=str(path))

    def _spool_rows(self, rows: list[Row]) -> None:
        if not rows:
            return
        if self._spool is None:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            self._spool = open(self._spool_path, "a+b")  # noqa: SIM115 - held for the process's life
            fcntl.flock(self._spool, fcntl.LOCK_EX)
        self._spool.write(b"".join(msgspec.json.encode(row) + b"\n" for row in rows))
        self._spool.flush()
        os.fsync(self._spool.fileno())
        self.num_spooled += len(rows)

    def _close_thread(self) -> None:
        self.db.close()
        if self._spool is not None:
            empty = self._spool.tell() == 0
            self._spool.close()
            self._spool = None
            if empty:
                self._spool_path.unlink(missing_ok=True)


def _read_spool(path: Path) -> list[Row]:
    rows = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(msgspec.DecodeError):  # a line cut by a crash mid-write
            rows.append(tuple(msgspec.json.decode(line)))
    return rows
