"""Running the app: uvicorn with the edge's limits (``gateway.edge``) and a graceful drain.

On the first SIGTERM or SIGINT the server does not stop listening: load balancers polling
``/ready`` must see it turn 503, and a request that still reaches it gets a 503 with Retry-After
rather than a refused connection. The gateway drains (``Gateway.drain``): running requests may
finish for ``server.drain_timeout_s``, then the generations left are cut — a stream ends with an
error event and ``[DONE]``, never silently. Only then does uvicorn's own shutdown run: the
listener closes, idle connections close, the lifespan ends (the plugins' shutdown flushes the usage
ledger) and the process exits 0. A second signal during the drain exits at once.
"""

from __future__ import annotations

import asyncio
import functools
import signal
from types import FrameType
from typing import Any

import structlog
import uvicorn

from gateway.config import ServerSettings
from gateway.edge import EdgeLimits, EdgeProtocol
from gateway.pipeline import Gateway

log = structlog.get_logger("taxiway.server")


class Server(uvicorn.Server):
    """uvicorn's server, draining ``gateway`` on the first exit signal."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A Python signal handler, run between two bytecodes of the loop's thread: it only
        # schedules. uvicorn's own re-raises the signal after shutdown, which would make the exit
        # status -15; a drained server exits 0, so the signal is not recorded.
        if self._loop is None or self.should_exit or self._drain is not None or self.drain_timeout_s == 0:
            self.force_exit = self.should_exit and sig == signal.SIGINT
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain, sig)

    def _start_drain(self, sig: int) -> None:
        if self._drain is None and not self.should_exit:
            log.info("server.signal", signal=signal.Signals(sig).name)
            self._drain = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.gateway.drain(self.drain_timeout_s)
        finally:
            self.should_exit = True


def serve(app: Any, settings: ServerSettings) -> None:
    """Serve ``app`` (``gateway.app.create_app``) on ``settings.host:port`` until drained."""
    limits = EdgeLimits(
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        max_url_bytes=settings.max_url_bytes,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=functools.partial(EdgeProtocol, limits=limits),  # type: ignore[arg-type]
        log_config=None,
        access_log=False,  # the access_log plugin writes one line per request
        server_header=False,
        timeout_keep_alive=settings.idle_timeout_s,  # type: ignore[arg-type]
        # after the drain only idle connections and finished requests are left: a backstop
        timeout_graceful_shutdown=5,
    )
    Server(config, app.state.gateway, settings.drain_timeout_s).run()
