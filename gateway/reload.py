"""What sets a reload off besides ``POST /admin/reload``: SIGHUP, and ``--watch`` noticing the file change.

Both run ``Fleet.reload`` in a task of their own (one at a time: the fleet's lock). A failure is
logged (``config.reload_failed`` with the error, which names the key) and the old config serves on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import structlog

from gateway.errors import ConfigError, TaxiwayError
from gateway.fleet import Fleet

log = structlog.get_logger("taxiway.reload")


class ReloadTriggers:
    """SIGHUP and, with ``watch_s``, a poll of ``config_path``'s contents every ``watch_s`` seconds.

    Polling the contents (not only the mtime) needs no dependency and sees an editor's
    write-and-rename as well as an in-place write; a file that is briefly missing is skipped.
    """

    def __init__(self, fleet: Fleet, config_path: str | os.PathLike[str] | None, watch_s: float | None) -> None:
        self.fleet = fleet
        self.path = None if config_path is None else Path(config_path)
        self.watch_s = watch_s
        self._tasks: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        if self.path is None:
            yield
            return
        loop = asyncio.get_running_loop()
        # signal handlers belong to the main thread (the server's); a test client's thread has none
        on_signal = threading.current_thread() is threading.main_thread()
        if on_signal:
            loop.add_signal_handler(signal.SIGHUP, self._spawn, "sighup")
        if self.watch_s:
            self._keep(loop.create_task(self._watch(self.path, self.watch_s)))
        try:
            yield
        finally:
            if on_signal:
                loop.remove_signal_handler(signal.SIGHUP)
            for task in list(self._tasks):
                task.cancel()

    def _spawn(self, trigger: str) -> None:
        self._keep(asyncio.get_running_loop().create_task(self._reload(trigger)))

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self, trigger: str) -> None:
        log.info("config.reload_requested", trigger=trigger)
        try:
            await self.fleet.reload()
        except (ConfigError, TaxiwayError) as exc:
            log.error("config.reload_failed", trigger=trigger, error=str(exc))
        except Exception:
            log.exception("config.reload_failed", trigger=trigger)

    async def _watch(self, path: Path, interval_s: float) -> None:
        seen = _contents(path)
        while True:
            await asyncio.sleep(interval_s)
            now = _contents(path)
            if now is not None and now != seen:
                seen = now
                await self._reload("watch")


def _contents(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
