"""The app layer with a fake backend, through litestar's AsyncTestClient."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from gateway_fakes import FakeBackend, HookRecorder, fake_plugins, settings
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.errors import RateLimitError, UpstreamError

CHAT = "/v1/chat/completions"


def _chat(content: str = "hello world", **extra: object) -> dict[str, object]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
async def recorder() -> HookRecorder:
    return HookRecorder()


@pytest.fixture
async def client(recorder: HookRecorder) -> AsyncIterator[AsyncTestClient]:
    FakeBackend.instances.clear()
    app = create_app(settings(), plugins=fake_plugins(("recorder", recorder)))
    async with AsyncTestClient(app) as client:
        yield client


def _backend(name: str = "fake-model") -> FakeBackend:
    return next(b for b in FakeBackend.instances if b.model_name == name)


def _events(text: str) -> list[str]:
    return [block[len("data: ") :] for block in text.split("\n\n") if block.startswith("data: ")]


async def test_backends_are_started_and_stopped(recorder: HookRecorder) -> None:
    FakeBackend.instances.clear()
    app = create_app(settings(), plugins=fake_plugins(("recorder", recorder)))
    async with AsyncTestClient(app):
        assert all(b.started and not b.stopped for b in FakeBackend.instances)
    assert all(b.stopped for b in FakeBackend.instances)


async def test_chat_whole_response(client: AsyncTestClient, recorder: HookRecorder) -> None:
    response = await client.post(CHAT, json=_chat(n=2, model="default"), headers={"x-test": "1"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "fake-model"
    assert [c["message"] for c in body["choices"]] == [{"content": "echo: hello world", "role": "assistant"}] * 2
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    request_id = response.headers["x-request-id"]
    assert body["id"] == f"chatcmpl-{request_id}"
    assert float(response.headers["x-taxiway-overhead-ms"]) >= 0
    assert [c[0] for c in recorder.calls] == ["authenticate", "before_request", "after_request"]
    assert recorder.calls[0] == ("authenticate", request_id, "1")
    assert recorder.calls[1][2] == ("fake-model", "fake")
    assert recorder.calls[2][2].completion_tokens == 6
    (request,) = _backend().requests
    assert request.sampling.n == 2 and request.stream is False and request.request_id == request_id


async def test_request_id_is_honoured_or_made(client: AsyncTestClient) -> None:
    response = await client.post(CHAT, json=_chat(), headers={"x-request-id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    response = await client.post(CHAT, json=_chat(), headers={"x-request-id": "no spaces allowed"})
    assert response.headers["x-request-id"] != "no spaces allowed"
    assert len(response.headers["x-request-id"]) == 24
    response = await client.post(CHAT, json=_chat(model="nope"), headers={"x-request-id": "err-1"})
    assert response.headers["x-request-id"] == "err-1"


async def test_chat_stream_with_usage(client: AsyncTestClient, recorder: HookRecorder) -> None:
    response = await client.post(CHAT, json=_chat(stream=True, stream_options={"include_usage": True}, logprobs=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [msgspec.json.decode(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "echo:"}
    assert chunks[1]["choices"][0]["delta"] == {"content": " hello"}
    assert chunks[1]["choices"][0]["logprobs"] == {"content": [{"token": " hello", "logprob": -1.0, "bytes": None, "top_logprobs": []}]}
    assert chunks[3]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert recorder.calls[-1][0] == "after_request"


async def test_stream_without_usage_has_no_usage_field(client: AsyncTestClient) -> None:
    events = _events((await client.post(CHAT, json=_chat(stream=True))).text)
    assert all("usage" not in msgspec.json.decode(e) for e in events[:-1])


async def test_completions_whole_and_stream(client: AsyncTestClient) -> None:
    body = {"model": "fake-model", "prompt": "one two", "logprobs": 1}
    response = (await client.post("/v1/completions", json=body)).json()
    assert response["object"] == "text_completion"
    assert response["choices"][0]["text"] == "echo: one two"
    assert response["choices"][0]["logprobs"]["text_offset"] == [0, 5, 9]
    assert _backend().requests[-1].sampling.max_tokens == 16  # OpenAI's legacy default
    events = _events((await client.post("/v1/completions", json={**body, "stream": True})).text)
    texts = [msgspec.json.decode(e)["choices"][0]["text"] for e in events[:-1]]
    assert "".join(texts) == "echo: one two"


async def test_errors_before_the_stream_have_their_status(client: AsyncTestClient, recorder: HookRecorder) -> None:
    _backend().fail_with = RateLimitError("queue full", retry_after=3)
    for stream in (False, True):
        response = await client.post(CHAT, json=_chat(stream=stream))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "3"
        assert response.json() == {"error": {"message": "queue full", "type": "rate_limit_error", "param": None,
                                             "code": "rate_limit_exceeded"}}  # fmt: skip
    assert [c[0] for c in recorder.calls][-1] == "on_error"


async def test_error_mid_stream_ends_with_error_event_and_done(client: AsyncTestClient, recorder: HookRecorder) -> None:
    _backend().fail_after = (2, UpstreamError("upstream fell over"))
    response = await client.post(CHAT, json=_chat(stream=True))
    assert response.status_code == 200
    events = _events(response.text)
    assert events[-1] == "[DONE]"
    assert msgspec.json.decode(events[-2])["error"]["message"] == "upstream fell over"
    assert len(events) == 4
    assert recorder.calls[-1][0] == "on_error" and recorder.calls[-1][2] == 502
    # not streaming: the same failure is a plain 502
    response = await client.post(CHAT, json=_chat())
    assert response.status_code == 502 and response.json()["error"]["type"] == "upstream_error"


async def test_a_backend_bug_is_a_500_in_openai_shape(client: AsyncTestClient) -> None:
    _backend().fail_with = ZeroDivisionError()  # type: ignore[assignment]
    response = await client.post(CHAT, json=_chat())
    assert response.status_code == 500
    assert response.json()["error"]["message"] == "Internal server error"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"", 400, None),
        (b'{"messages": []}', 400, "model"),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "model"),
        (b'{"model": "fake-model", "messages": [{"role": "user", "content": 3}]}', 400, "messages[0].content"),
        (b'{"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "n": 9}', 400, "n"),
        (b'{"model": "narrow", "messages": [{"role": "user", "content": "x"}], "top_p": 0.5}', 400, "top_p"),
        (b'{"model": "narrow", "messages": [{"role": "user", "content": "x"}], "n": 2}', 400, "n"),
        (b'{"model": "narrow", "messages": [{"role": "user", "content": "x"}], "temperature": 0.5}', 200, None),
    ],
)
async def test_invalid_requests(client: AsyncTestClient, body: bytes, status: int, param: str | None) -> None:
    response = await client.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    if status != 200:
        assert response.json()["error"]["param"] == param


async def test_unknown_model_message_names_it(client: AsyncTestClient) -> None:
    response = await client.post(CHAT, json=_chat(model="gpt-17"))
    assert response.status_code == 404
    assert "gpt-17" in response.json()["error"]["message"]


async def test_body_limit_is_413(client: AsyncTestClient) -> None:
    response = await client.post(CHAT, json=_chat("x" * 3000))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_wrong_method_and_route(client: AsyncTestClient) -> None:
    response = await client.get(CHAT)
    assert response.status_code == 405 and "error" in response.json()
    response = await client.get("/v2/whatever")
    assert response.status_code == 404 and response.json()["error"]["type"] == "invalid_request_error"


async def test_models_stats_health_ready(client: AsyncTestClient) -> None:
    models = (await client.get("/v1/models")).json()
    # every name a client may send, an alias with the model it resolves to as its root
    assert [(m["id"], m["root"]) for m in models["data"]] == [
        ("fake-model", "fake-model"), ("default", "fake-model"), ("narrow", "narrow")
    ]  # fmt: skip
    assert models["data"][0]["aliases"] == ["default"]
    assert (await client.get("/v1/models/narrow")).json()["id"] == "narrow"
    assert (await client.get("/v1/models/default")).json()["root"] == "fake-model"
    assert (await client.get("/v1/models/fake-model/stats")).json() == {"num_running": 1, "num_waiting": 2}
    response = await client.get("/v1/models/nope/stats")
    assert response.status_code == 404 and "nope" in response.json()["error"]["message"]
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).status_code == 200


async def test_ready_lists_models_not_ready(recorder: HookRecorder) -> None:
    config = """
        [[models]]
        name = "up"
        backend = "fake"
        [[models]]
        name = "loading"
        backend = "fake"
        options = { ready = false }
    """
    from gateway.config import parse_settings

    app = create_app(parse_settings(config, env={}), plugins=fake_plugins())
    async with AsyncTestClient(app) as client:
        response = await client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {
        "status": "not ready",
        "not_ready": [{"model": "loading", "state": "not ready", "detail": "loading weights"}],
    }


async def test_failed_model_reported_in_ready_and_stats() -> None:
    config = """
        [[models]]
        name = "up"
        backend = "fake"
        [[models]]
        name = "broken"
        backend = "fake"
        options = { ready = false, failed = true }
    """
    from gateway.config import parse_settings

    app = create_app(parse_settings(config, env={}), plugins=fake_plugins())
    async with AsyncTestClient(app) as client:
        ready = await client.get("/ready")
        stats = await client.get("/v1/models/broken/stats")
        up_stats = await client.get("/v1/models/up/stats")
    failed = {"model": "broken", "state": "failed", "detail": "weights unreadable"}
    assert ready.status_code == 503 and ready.json() == {"status": "not ready", "not_ready": [failed]}
    assert stats.status_code == 200 and stats.json() == failed  # the state, not the backend's stale stats
    assert up_stats.json() == {"num_running": 1, "num_waiting": 2}


async def test_embeddings(client: AsyncTestClient) -> None:
    response = await client.post("/v1/embeddings", json={"model": "narrow", "input": ["ab", "cde"]})
    assert response.status_code == 200
    body = response.json()
    assert [d["embedding"] for d in body["data"]] == [[2.0, 1.0], [3.0, 1.0]]
    response = await client.post("/v1/embeddings", json={"model": "fake-model", "input": "x"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"


async def _call_and_disconnect(app: object, body: dict[str, object], *, after_messages: int) -> list[dict[str, object]]:
    """Drive the ASGI app directly: the client disconnects after ``after_messages`` sent messages.

    (litestar's test client reads whole responses, so it cannot hang up mid-stream.)
    """
    gone = asyncio.Event()
    sent: list[dict[str, object]] = []
    delivered = False

    async def receive() -> dict[str, object]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": msgspec.json.encode(body), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)
        if len(sent) >= after_messages:
            gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": CHAT, "raw_path": CHAT.encode(), "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1), "server": ("t", 80)}  # fmt: skip
    if after_messages == 0:
        asyncio.get_running_loop().call_later(0.2, gone.set)
    await asyncio.wait_for(app(scope, receive, send), 5)  # type: ignore[operator]
    return sent


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_closes_the_backend_stream(recorder: HookRecorder, stream: bool) -> None:
    FakeBackend.instances.clear()
    app = create_app(settings(), plugins=fake_plugins(("recorder", recorder)))
    backend = _backend()
    backend.delay_s = 0.05
    words = " ".join(f"w{i}" for i in range(200))
    # streaming: hang up after the response start and one chunk; whole: hang up while waiting
    sent = await _call_and_disconnect(app, _chat(words, stream=stream), after_messages=2 if stream else 0)
    assert backend.closed == [backend.requests[-1].request_id]
    assert len(sent) == (2 if stream else 0)
    assert recorder.calls[-1][0] == "on_error" and recorder.calls[-1][2] == 499
