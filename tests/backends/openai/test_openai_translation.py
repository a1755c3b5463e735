"""The openai backend's pieces: SSE framing, request translation, upstream error mapping, transport."""

from __future__ import annotations

import asyncio

import httpx
import msgspec
import pytest

from backends.openai import upstream
from backends.openai.sse import iter_sse_data
from backends.openai.transport import LeanTransport
from gateway.errors import RateLimitError, ServiceUnavailableError, UpstreamError, UpstreamStatusError, UpstreamTimeoutError
from gateway.interface import ChatMessage, Delta, GenerationRequest, SamplingParams
from bench.stub_upstream import StubUpstream


async def _collect(chunks: list[bytes]) -> list[bytes]:
    async def source():  # type: ignore[no-untyped-def]
        for chunk in chunks:
            yield chunk

    return [data async for data in iter_sse_data(source())]


async def test_sse_events_split_anywhere() -> None:
    stream = b'data: {"a":1}\n\n: comment\r\ndata: {"b":\ndata: 2}\r\n\r\nevent: x\ndata: [DONE]\n\n'
    expected = [b'{"a":1}', b'{"b":\n2}', b"[DONE]"]
    assert await _collect([stream]) == expected
    assert await _collect([stream[i : i + 1] for i in range(len(stream))]) == expected
    assert await _collect([b"data: tail-without-blank-line"]) == [b"tail-without-blank-line"]


def test_request_body_carries_only_what_was_asked() -> None:
    request = GenerationRequest(
        request_id="r", model="public", messages=(ChatMessage(role="user", content="hi"),),
        sampling=SamplingParams(max_tokens=5, temperature=0.0, stop=("x",), logit_bias={7: -1.0}, logprobs=True,
                                top_logprobs=3, n=2, seed=1),
    )  # fmt: skip
    body = msgspec.json.decode(upstream.request_body(request, "upstream-name", stream=True))
    assert body == {
        "model": "upstream-name", "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
        "top_logprobs": 3, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 5, "n": 2,
        "temperature": 0.0, "stop": ["x"], "seed": 1, "logit_bias": {"7": -1.0},
    }  # fmt: skip
    completion = GenerationRequest(request_id="r", model="m", prompt="p", sampling=SamplingParams(logprobs=True))
    assert msgspec.json.decode(upstream.request_body(completion, "u", stream=False)) == {
        "model": "u", "prompt": "p", "logprobs": 0
    }


def test_chunks_become_deltas() -> None:
    chunk = upstream.decode_response(
        b'{"id":"x","choices":[{"index":1,"delta":{"content":"Hi"},"finish_reason":"length",'
        b'"logprobs":{"content":[{"token":"Hi","logprob":-0.1,"top_logprobs":[{"token":"Ho","logprob":-2}]}]}}],'
        b'"usage":null}'
    )
    (delta,) = upstream.deltas(chunk)
    assert (delta.index, delta.text, delta.finish_reason) == (1, "Hi", "length")
    assert delta.logprobs is not None and delta.logprobs[0].top_logprobs[0].token == "Ho"
    legacy = upstream.decode_response(
        b'{"choices":[{"index":0,"text":"a b","finish_reason":"content_filter",'
        b'"logprobs":{"tokens":["a"," b"],"token_logprobs":[-1,-2],"top_logprobs":[{"a":-1},{" b":-2}]}}]}'
    )
    (delta,) = upstream.deltas(legacy)
    assert isinstance(delta, Delta) and delta.finish_reason == "stop"
    assert [(t.token, t.logprob) for t in delta.logprobs or ()] == [("a", -1.0), (" b", -2.0)]
    with pytest.raises(UpstreamError):
        list(upstream.deltas(upstream.decode_response(b'{"error":{"message":"boom"}}')))
    with pytest.raises(UpstreamError, match="malformed"):
        upstream.decode_response(b"<html>")


@pytest.mark.parametrize(
    ("status", "kind", "code"),
    [(400, UpstreamStatusError, 400), (404, UpstreamStatusError, 404), (429, RateLimitError, 429),
     (401, UpstreamError, 502), (500, UpstreamError, 502), (503, ServiceUnavailableError, 503),
     (504, UpstreamTimeoutError, 504)],
)  # fmt: skip
def test_status_mapping(status: int, kind: type, code: int) -> None:
    error = upstream.status_error(status, b'{"error":{"message":"nope","type":"t","param":"p"}}', "9")
    assert isinstance(error, kind) and error.status_code == code and "nope" in error.message
    if status == 429:
        assert error.headers["Retry-After"] == "9"
    if status == 400:
        assert (error.error_type, error.param) == ("t", "p")
    assert "plain text" in upstream.status_error(status, b"plain text", None).message


def test_transport_and_decoding_failures_map_to_the_exception_tree() -> None:
    request = httpx.Request("POST", "http://upstream/v1/chat/completions")
    for exc, kind, status in [
        (httpx.ReadTimeout("slow", request=request), UpstreamTimeoutError, 504),
        (httpx.PoolTimeout("busy", request=request), UpstreamTimeoutError, 504),
        (httpx.ConnectError("refused", request=request), UpstreamError, 502),
        (httpx.RemoteProtocolError("cut", request=request), UpstreamError, 502),
    ]:
        error = upstream.transport_error(exc)
        assert isinstance(error, kind) and error.status_code == status and type(exc).__name__ in error.message
    with pytest.raises(UpstreamError, match="malformed"):
        upstream.decode_embeddings(b'{"data": "not a list"}')


async def test_lean_transport_reuses_connections_and_times_out() -> None:
    stub = StubUpstream()
    await stub.serve()
    transport = LeanTransport(max_connections=2)
    async with httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(0.5)) as client:
        body = {"model": "m", "messages": [{"role": "user", "content": "a b"}]}
        for _ in range(3):
            response = await client.post(f"{stub.base_url}/chat/completions", json=body)
            assert response.json()["choices"][0]["message"]["content"] == "echo: a b"
        assert sum(len(c) for c in transport._idle.values()) == 1  # one connection, reused
        stream_body = {**body, "stream": True}
        async with client.stream("POST", f"{stub.base_url}/chat/completions", json=stream_body) as response:
            text = (await response.aread()).decode()
        assert text.endswith("data: [DONE]\n\n")
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"{stub.base_url}/chat/completions",
                              json={**body, "messages": [{"role": "user", "content": "[[hang]]"}]})  # fmt: skip
        with pytest.raises(httpx.ConnectError):
            await client.get("http://127.0.0.1:9/")
        # the slots of failed requests were given back
        response = await client.get(f"{stub.base_url}/models")
        assert response.status_code == 200
        # a pooled connection the server closed is replaced transparently
        for connections in transport._idle.values():
            for connection in connections:
                connection.writer.transport.abort()
        await asyncio.sleep(0.01)
        assert (await client.get(f"{stub.base_url}/models")).status_code == 200
