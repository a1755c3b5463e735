"""A ``taxiway serve`` process for the benches that measure a whole server (soak, swap)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


@contextlib.contextmanager
def served(config: Path, log: Path, ready_timeout: float) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Serve ``config`` on a free loopback port, logging JSON to ``log``; yields ``(url, process)``
    once ``/ready`` answers 200. Stopped with SIGTERM (a drain), killed after 60 s."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port),
             "--log-format", "json"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"taxiway serve exited ({proc.returncode}):\n{log.read_text(errors='replace')}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}/ready not 200 after {ready_timeout:.0f}s:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()  # a drain: exits at once when nothing runs
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
