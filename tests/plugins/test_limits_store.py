"""The rate-limit stores, in process and on a real Redis, checked against the same contract;
the Redis store unreachable fails open or closed as configured, counted."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from plugins.limits.redis_store import RedisStore
from plugins.limits.store import MemoryStore, Scope
from tests.plugins.ops_servers import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[object]:
    if request.param == "memory":
        yield MemoryStore()
        return
    store = RedisStore(redis_url)
    await store._client.flushdb()
    yield store
    await store.close()


async def test_requests_per_minute_is_a_sliding_window(store: MemoryStore) -> None:
    scope = (Scope("key:a", rpm=3),)
    decisions = [await store.acquire(scope, 0, f"r{i}") for i in range(5)]
    assert [d.admitted for d in decisions] == [True, True, True, False, False]
    assert [d.remaining_requests for d in decisions[:3]] == [2, 1, 0]
    assert decisions[3].limit == "requests" and 55 < decisions[3].retry_after_s <= 60


async def test_a_refusal_by_one_scope_takes_nothing_from_another(store: MemoryStore) -> None:
    key, model = Scope("key:b", rpm=10), Scope("model:m", max_parallel=1)
    assert (await store.acquire((key, model), 0, "r1")).admitted
    refused = await store.acquire((key, model), 0, "r2")
    assert not refused.admitted and refused.scope == 1 and refused.limit == "parallel"
    await store.release((key, model), 0, 0)
    admitted = await store.acquire((key, model), 0, "r3")
    assert admitted.admitted and admitted.remaining_requests == 8  # r2 took no request from the key


async def test_tokens_are_reserved_then_corrected_to_the_real_usage(store: MemoryStore) -> None:
    scope = (Scope("key:c", tpm=1000),)
    first = await store.acquire(scope, 600, "r1")
    assert first.admitted and 390 <= first.remaining_tokens <= 400
    refused = await store.acquire(scope, 600, "r2")
    assert not refused.admitted and refused.limit == "tokens" and 0 < refused.retry_after_s <= 13
    await store.release(scope, 600, 100)  # used 100 of the 600 reserved: 500 come back
    assert (await store.acquire(scope, 600, "r3")).admitted
    too_large = await store.acquire(scope, 1001, "r4")
    assert not too_large.admitted and too_large.retry_after_s is None


async def test_a_daily_budget_counts_the_real_usage(store: MemoryStore) -> None:
    scope = (Scope("key:d", budget_tokens_per_day=100),)
    assert (await store.acquire(scope, 0, "r1")).admitted
    await store.release(scope, 0, 100)
    refused = await store.acquire(scope, 0, "r2")
    assert not refused.admitted and refused.limit == "budget" and 0 < refused.retry_after_s <= 86400


async def test_redis_down_fails_open_or_closed_and_is_counted(tmp_path: Path) -> None:
    import sys

    from litestar.testing import AsyncTestClient
    from prometheus_client import REGISTRY

    from gateway.app import create_app
    from gateway.config import parse_settings
    from tests.conftest import free_port

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "gateway"))
    from gateway_fakes import fake_plugins

    def errors(outcome: str) -> float:
        return REGISTRY.get_sample_value("taxiway_limits_storage_errors_total", {"outcome": outcome}) or 0.0

    chat = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    for mode, status in (("open", 200), ("closed", 503)):
        settings = parse_settings(
            f'[[models]]\nname = "fake-model"\nbackend = "fake"\n[server]\nhome = "{tmp_path}"\n'
            f'[limits]\nstorage = "redis://127.0.0.1:{free_port()}/0"\non_storage_error = "{mode}"\n'
            '[limits.models.fake-model]\nrpm = 5\n'
        )
        before = errors(mode)
        async with AsyncTestClient(create_app(settings, plugins=fake_plugins())) as client:
            response = await client.post("/v1/chat/completions", json=chat)
        assert response.status_code == status, response.text
        assert errors(mode) == before + 1
        if status == 503:
            assert "rate-limit store is unavailable" in response.json()["error"]["message"]
