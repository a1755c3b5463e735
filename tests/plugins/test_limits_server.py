"""Rate limits on real servers: two gateway processes sharing one real Redis hold a virtual key
to its RPM under a burst split between them; 429s carry Retry-After and OpenAI's headers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from bench.stub_upstream import StubUpstream
from tests.conftest import serve_process
from tests.plugins.ops_servers import redis_server, taxiway

CONFIG = """
[[models]]
name = "m"
aliases = ["default"]
backend = "openai"
options = {{ base_url = "http://127.0.0.1:{port}/v1", upstream_model = "stub" }}

[limits]
storage = "{redis}"

[plugins.auth]
refresh_s = 0.2
"""
CHAT = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def _burst(urls: list[str], key: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=40)) as client:
        semaphore = asyncio.Semaphore(40)

        async def one(i: int) -> httpx.Response:
            async with semaphore:
                return await client.post(f"{urls[i % len(urls)]}/chat/completions", json=CHAT,
                                         headers={"authorization": f"Bearer {key}"})  # fmt: skip

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_two_gateways_sharing_redis_hold_a_60_rpm_key(tmp_path: Path, stub_upstream: StubUpstream) -> None:
    home = tmp_path / "home"
    with redis_server(tmp_path) as redis_url:
        config = CONFIG.format(port=stub_upstream.port, redis=redis_url)
        (tmp_path / "c.toml").write_text(config)
        key = taxiway("keys", "create", "--config", str(tmp_path / "c.toml"), "--name", "team-a", "--rpm", "60",
                      home=home).strip()  # fmt: skip
        env = {"TAXIWAY_HOME": str(home)}
        with serve_process(config, tmp_path, env=env) as a, serve_process(config, tmp_path, env=env) as b:
            responses = asyncio.run(_burst([a.base_url, b.base_url], key, 200))
    statuses = [r.status_code for r in responses]
    admitted = statuses.count(200)
    assert 59 <= admitted <= 61, statuses
    assert statuses.count(429) == 200 - admitted
    # both replicas admitted some: the limit is shared, not per process
    assert {r.url.port for r in responses if r.status_code == 200} == {a.port, b.port}
    ok = next(r for r in responses if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit-requests"] == "60"
    assert 0 <= int(ok.headers["x-ratelimit-remaining-requests"]) < 60
    assert ok.headers["x-ratelimit-reset-requests"].endswith("s")
    refused = next(r for r in responses if r.status_code == 429)
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "requests per minute" in error["message"] and "this API key" in error["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
