"""Shared test helpers: a real ``taxiway serve`` process on a free port, and a stub upstream.

Start a server from any config (a path or TOML text)::

    def test_something(taxiway_server):
        server = taxiway_server('''
            [[models]]
            name = "m"
            backend = "engine"
            options = { model = "smollm2-135m-instruct" }
        ''')
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")

``shared_taxiway_server`` is the same factory with session lifetime: one server per distinct
(config, env), reused by every test that asks for it. ``serve_process(config, tmp_path)`` is the
context manager underneath. ``server.logs()`` returns what the server printed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from bench.stub_upstream import StubUpstream

REPO_ROOT = Path(__file__).resolve().parent.parent


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the test process dies (Linux), so a killed
    pytest leaves no server behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A running ``taxiway serve``: ``url`` (http://127.0.0.1:PORT), ``base_url`` (…/v1)."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.url}/v1"
        self.log_path = log_path

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, *needles: str, timeout: float = 10.0) -> str:
        """Waits until every needle is in the log and returns it: the access line is written after the
        response is sent, and engine lines come from its step thread, so both may lag the response."""
        deadline = time.monotonic() + timeout
        while not all(needle in (logs := self.logs()) for needle in needles):
            assert time.monotonic() < deadline, f"{needles} not logged in {timeout}s:\n{logs}"
            time.sleep(0.05)
        return logs

    def wait_ready(self, timeout: float) -> None:
        """Polls ``GET /ready`` until 200 (every model loaded); fails after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        response = None
        while time.monotonic() < deadline:
            try:
                response = httpx.get(f"{self.url}/ready", timeout=5)
            except httpx.TimeoutException:  # a loaded machine: the deadline decides, not one slow answer
                continue
            if response.status_code == 200:
                return
            time.sleep(0.05)
        raise AssertionError(f"not ready after {timeout}s: {response.text if response else ''}\n{self.logs()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def serve_process(
    config: str | Path | None,
    tmp_dir: Path,
    *,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 60.0,
    extra_args: tuple[str, ...] = (),
) -> Iterator[ServerProcess]:
    """Run ``python -m gateway serve --config CONFIG`` on a free port until the block ends.

    ``config`` is a path or TOML text, written to ``tmp_dir`` (a pytest ``tmp_path``) with the
    server's log; None for none (``extra_args`` may name a MODEL then). ``env`` is added to the
    environment (e.g. secrets for ``${ENV}`` interpolation, ``PYTHONPATH`` for out-of-tree
    plugins). Waits for ``GET /health``; fails with the server's output if it exits or does not come up in ``startup_timeout`` seconds.
    """
    with contextlib.ExitStack() as stack:
        if config is None:
            config_args: tuple[str, ...] = ()
        elif isinstance(config, Path) or "\n" not in config:
            config_args = ("--config", str(config))
        else:
            config_path = tmp_dir / f"config-{time.monotonic_ns()}.toml"
            config_path.write_text(textwrap.dedent(config), encoding="utf-8")
            config_args = ("--config", str(config_path))
        port = free_port()
        log_path = tmp_dir / f"server-{port}.log"
        full_env = {**os.environ, **(env or {})}
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        command = [sys.executable, "-m", "gateway", "serve", *config_args, "--port", str(port),
                   "--log-format", "json", *extra_args]  # fmt: skip
        log_file = stack.enter_context(open(log_path, "wb"))
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)  # fmt: skip
        server = ServerProcess(proc, port, log_path)
        stack.callback(server.stop)
        _wait_healthy(server, startup_timeout)
        yield server


def _wait_healthy(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"taxiway serve exited with {server.proc.returncode}:\n{server.logs()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"taxiway serve did not become healthy in {timeout:.0f}s:\n{server.logs()}")


@pytest.fixture
def taxiway_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """A factory: ``taxiway_server(config, env=None, …)`` starts a server stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(config: str | Path, **kwargs: object) -> ServerProcess:
            return stack.enter_context(serve_process(config, tmp_path, **kwargs))  # type: ignore[arg-type]

        yield start


@pytest.fixture(scope="session")
def shared_taxiway_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """Like ``taxiway_server``, but servers live for the session and are shared per (config, env)."""
    servers: dict[tuple[str, tuple[tuple[str, str], ...]], ServerProcess] = {}
    with contextlib.ExitStack() as stack:

        def start(config: str | Path, env: Mapping[str, str] | None = None, **kwargs: object) -> ServerProcess:
            key = (str(config), tuple(sorted((env or {}).items())))
            server = servers.get(key)
            if server is None or server.proc.poll() is not None:
                tmp = tmp_path_factory.mktemp("taxiway-server")
                server = stack.enter_context(serve_process(config, tmp, env=env, **kwargs))  # type: ignore[arg-type]
                servers[key] = server
            return server

        yield start


@pytest.fixture(scope="session")
def stub_upstream() -> Iterator[StubUpstream]:
    """One stub OpenAI-compatible upstream (in a thread) for the whole session."""
    stub = StubUpstream().start_in_thread()
    yield stub
    stub.stop()
