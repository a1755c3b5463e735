"""The ``openai`` backend's connect retries and cooldown: the breaker on a fake clock, then the
backend against a real stub upstream and a port nothing listens on."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid

import pytest

from backends.openai.backend import OpenAIBackend, Options
from backends.openai.health import RETRY_MAX_S, Cooldown, retry_delays
from bench.stub_upstream import StubUpstream
from gateway.errors import ConfigError, ServiceUnavailableError, UpstreamError, UpstreamStatusError, UpstreamTimeoutError
from gateway.interface import ChatMessage, GenerationRequest, SamplingParams


def test_backoff_doubles_and_is_capped() -> None:
    assert list(retry_delays(0)) == []
    assert list(retry_delays(4)) == [0.1, 0.2, 0.4, 0.8]
    assert max(retry_delays(50)) == RETRY_MAX_S


def test_cooldown_refuses_then_probes_once() -> None:
    now = [100.0]
    cooldown = Cooldown("m", 30.0, clock=lambda: now[0])
    assert cooldown.admit() is False and cooldown.until is None  # healthy: no probe
    cooldown.failed("status 502")
    assert cooldown.until == 130.0 and cooldown.reason == "status 502"
    with pytest.raises(ServiceUnavailableError, match="cooling down for 30.0 s .*status 502") as refused:
        cooldown.admit()
    assert refused.value.headers == {"Retry-After": "30"}
    now[0] = 129.5
    with pytest.raises(ServiceUnavailableError) as refused:
        cooldown.admit()
    assert refused.value.headers == {"Retry-After": "1"}
    now[0] = 130.0  # over: one probe goes, the others wait for its verdict
    assert cooldown.until is None
    assert cooldown.admit() is True
    with pytest.raises(ServiceUnavailableError, match="being probed"):
        cooldown.admit()
    cooldown.settle(True)  # the probe's client left: no verdict, the next request probes
    assert cooldown.admit() is True
    cooldown.failed("timeout")  # the probe failed: cooling down again
    assert cooldown.until == 160.0
    now[0] = 161.0
    assert cooldown.admit() is True
    cooldown.succeeded()
    assert cooldown.admit() is False and cooldown.reason == ""
    assert cooldown.stats().num_failures == 2


def test_cooldown_zero_never_cools() -> None:
    cooldown = Cooldown("m", 0.0)
    cooldown.failed("status 500")
    assert cooldown.until is None and cooldown.admit() is False


def test_negative_options_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="retries"):
        OpenAIBackend("m", Options(base_url="http://127.0.0.1:1/v1", retries=-1))
    with pytest.raises(ConfigError, match="cooldown_s"):
        OpenAIBackend("m", Options(base_url="http://127.0.0.1:1/v1", cooldown_s=-1.0))


# -- against real sockets ------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _request(content: str = "hello") -> GenerationRequest:
    return GenerationRequest(
        request_id=f"r-{uuid.uuid4().hex[:8]}", model="m", messages=(ChatMessage(role="user", content=content),),
        sampling=SamplingParams(max_tokens=4),
    )  # fmt: skip


async def _answer(backend: OpenAIBackend, content: str = "hello") -> str:
    return "".join([item.text async for item in backend.generate(_request(content)) if hasattr(item, "text")])


async def _started(base_url: str, **options: object) -> OpenAIBackend:
    backend = OpenAIBackend("m", Options(base_url=base_url, connect_timeout_s=1.0, **options))  # type: ignore[arg-type]
    await backend.start()
    return backend


async def test_connect_errors_are_retried_with_backoff_then_cool_down() -> None:
    backend = await _started(f"http://127.0.0.1:{_free_port()}/v1", retries=2, cooldown_s=30.0)
    try:
        started = time.monotonic()
        with pytest.raises(UpstreamError, match="cannot reach the upstream: ConnectError"):
            await _answer(backend)
        elapsed = time.monotonic() - started
        assert backend.stats().num_connect_retries == 2  # 3 attempts
        assert 0.3 <= elapsed < 1.5, elapsed  # waited 0.1 + 0.2 s, and no more
        # cooling down: not ready, says why and until when, and refuses at once without connecting
        state = backend.ready()
        assert not state.ready and not state.failed and "cooling down after: cannot reach the upstream" in state.detail
        until = backend.cooling_down_until()
        assert until is not None and 29.0 < until - time.monotonic() <= 30.0
        started = time.monotonic()
        with pytest.raises(ServiceUnavailableError, match="cooling down") as refused:
            await _answer(backend)
        assert time.monotonic() - started < 0.1 and refused.value.headers == {"Retry-After": "30"}
        assert backend.stats().num_connect_retries == 2
    finally:
        await backend.stop()


async def test_by_default_a_dead_upstream_is_tried_every_time() -> None:
    """``cooldown_s`` off (the default): the gateway's own cooldown decides; the backend keeps
    answering 502 and stays ready, counting the failures."""
    backend = await _started(f"http://127.0.0.1:{_free_port()}/v1", retries=1)
    try:
        for _ in range(2):
            with pytest.raises(UpstreamError, match="cannot reach"):
                await _answer(backend)
        assert backend.ready().ready and backend.cooling_down_until() is None
        assert backend.stats().num_failures == 2 and backend.stats().num_connect_retries == 2
    finally:
        await backend.stop()


async def test_a_probe_after_the_cooldown_clears_it() -> None:
    port = _free_port()
    backend = await _started(f"http://127.0.0.1:{port}/v1", retries=0, cooldown_s=0.5)
    stub = None
    try:
        with pytest.raises(UpstreamError):
            await _answer(backend)
        assert backend.stats().num_connect_retries == 0
        stub = StubUpstream().start_in_thread(port=port)  # the upstream comes back
        with pytest.raises(ServiceUnavailableError, match="cooling down"):
            await _answer(backend)
        assert stub.requests == []
        await asyncio.sleep(0.55)
        assert backend.ready().ready  # over: the next request probes
        assert await _answer(backend, "back again") == "echo: back again"
        assert backend.ready().ready and backend.cooling_down_until() is None
        assert backend.stats().cooling_down_s == 0.0 and backend.stats().num_failures == 1
    finally:
        await backend.stop()
        if stub is not None:
            stub.stop()


@pytest.mark.parametrize(
    ("directive", "error", "cools"),
    [
        ("[[status=500]]", UpstreamError, True),
        ("[[status=502]]", UpstreamError, True),
        ("[[hang]]", UpstreamTimeoutError, True),
        ("[[status=400]]", UpstreamStatusError, False),
        ("[[status=429]]", Exception, False),
    ],
)
async def test_answers_after_sending_are_never_retried(stub_upstream, directive, error, cools) -> None:
    backend = await _started(stub_upstream.base_url, retries=3, cooldown_s=30.0, timeout_s=0.3)
    marker = f"{directive} {uuid.uuid4().hex}"
    try:
        with pytest.raises(error):
            await _answer(backend, marker)
        sent = [r for r in stub_upstream.requests if marker in str(r.body)]
        assert len(sent) == 1  # reached the upstream once: never duplicated
        assert (backend.cooling_down_until() is not None) is cools
        assert backend.ready().ready is not cools
    finally:
        await backend.stop()
