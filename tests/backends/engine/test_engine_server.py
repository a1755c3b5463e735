"""`taxiway serve` with the engine backend on the real default model, through real HTTP."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import openai
import pytest

from backends.engine.catalogue import default_home, pull

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine_server(shared_taxiway_server):  # type: ignore[no-untyped-def]
    path = pull("smollm2-135m-instruct", home=default_home(os.environ), progress=False)
    config = f"""
        [[models]]
        name = "smollm2-135m-instruct"
        aliases = ["default"]
        backend = "engine"
        options = {{ model = "{path}", threads = 2, max_num_seqs = 16, max_num_batched_tokens = 256, kv_cache_tokens = 8192, max_waiting = 64 }}

        [[models]]
        name = "tiny-queue"
        backend = "engine"
        options = {{ model = "{path}", threads = 1, max_num_seqs = 1, max_waiting = 1, kv_cache_tokens = 1024, max_model_len = 512 }}
    """
    server = shared_taxiway_server(config, startup_timeout=120)
    server.wait_ready(timeout=300)
    return server


def _stats(url: str, model: str) -> dict:
    response = httpx.get(f"{url}/v1/models/{model}/stats", timeout=5)
    assert response.status_code == 200, response.text
    return response.json()


def _wait_idle(url: str, model: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = _stats(url, model)
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_blocks_used"] == 0:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle: {stats}")
        time.sleep(0.1)


def test_ready_and_stats(engine_server) -> None:  # type: ignore[no-untyped-def]
    ready = httpx.get(f"{engine_server.url}/ready").json()
    assert ready  # 200 with a body
    stats = _stats(engine_server.url, "default")
    assert stats["ready"] is True
    assert stats["kv_blocks_total"] == 8192 // 16
    assert stats["num_steps"] >= 1  # the warm-up step ran before ready


def test_openai_client_32_concurrent_streams(engine_server) -> None:  # type: ignore[no-untyped-def]
    client = openai.AsyncOpenAI(base_url=engine_server.base_url, api_key="unused", max_retries=0)

    async def one(i: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, finish, completion_tokens = "", None, 0
        async for chunk in stream:
            if chunk.usage is not None:
                completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return text, finish, completion_tokens

    async def all_of_them():  # type: ignore[no-untyped-def]
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(all_of_them())
    assert len(results) == 32
    for text, finish, completion_tokens in results:
        assert text.strip()
        assert finish in ("stop", "length")
        assert 1 <= completion_tokens <= 12
    _wait_idle(engine_server.url, "default")


def test_disconnect_frees_blocks(engine_server) -> None:  # type: ignore[no-untyped-def]
    url = engine_server.url
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(5):
                next(lines)
            during = _stats(url, "default")
            assert during["num_running"] == 1 and during["kv_blocks_used"] > 0
        # leaving the block closed the connection mid-stream
    stats = _wait_idle(url, "default", timeout=10)
    assert stats["num_requests"] == 0


def test_prompt_too_long_is_400_with_numbers(engine_server) -> None:  # type: ignore[no-untyped-def]
    response = httpx.post(
        f"{engine_server.url}/v1/completions",
        json={"model": "tiny-queue", "prompt": "word " * 600, "max_tokens": 10},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "512" in error["message"] and error["param"] in ("prompt", "max_tokens")


def test_full_queue_is_429_with_retry_after(engine_server) -> None:  # type: ignore[no-untyped-def]
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=engine_server.base_url, timeout=60) as http:
            body = {"model": "tiny-queue", "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
            return await asyncio.gather(*(http.post("/completions", json=body) for _ in range(6)))

    responses = asyncio.run(run())
    statuses = sorted(r.status_code for r in responses)
    # all six arrive within one step: the first waits (max_waiting = 1), the rest are shed;
    # later steps may admit one more once the first runs
    assert 1 <= statuses.count(200) <= 2, statuses
    assert all(r.json()["choices"][0]["text"] for r in responses if r.status_code == 200)
    limited = [r for r in responses if r.status_code == 429]
    assert limited, statuses
    assert int(limited[0].headers["retry-after"]) >= 1
    assert limited[0].json()["error"]["type"] == "rate_limit_error"
    assert set(statuses) <= {200, 429}


def test_completions_and_chat_without_stream(engine_server) -> None:  # type: ignore[no-untyped-def]
    client = openai.OpenAI(base_url=engine_server.base_url, api_key="unused", max_retries=0)
    completion = client.completions.create(
        model="smollm2-135m-instruct", prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2
    )
    assert completion.choices[0].text
    assert len(completion.choices[0].logprobs.tokens) == completion.usage.completion_tokens
    chat = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16, temperature=0, n=2, seed=1,
    )
    assert [c.index for c in chat.choices] == [0, 1]
    assert "Paris" in chat.choices[0].message.content
