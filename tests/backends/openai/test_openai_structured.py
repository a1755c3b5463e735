"""The proxy and structured output / tools: passed on to upstreams configured to take them
(``structured_output``, ``tools``), a 400 naming the field where not; upstream tool calls
(whole and streamed) become ``Delta.tool_calls``."""

from __future__ import annotations

import msgspec
import pytest

from backends.openai import upstream
from backends.openai.backend import Options, OpenAIBackend
from gateway import wire
from gateway.errors import UnsupportedParameterError
from gateway.normalize import chat_request

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def _request(backend: OpenAIBackend, **fields):  # type: ignore[no-untyped-def]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    req = msgspec.json.decode(msgspec.json.encode(body), type=wire.ChatCompletionRequest)
    return chat_request(req, request_id="r", model="m", caps=backend.capabilities)


def _backend(**options) -> OpenAIBackend:  # type: ignore[no-untyped-def]
    return OpenAIBackend("m", Options(base_url="http://127.0.0.1:1/v1", **options))


def test_passed_through_when_the_upstream_supports_them() -> None:
    backend = _backend(structured_output=True, tools=True)
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}
    request = _request(backend, response_format=fmt)
    body = msgspec.json.decode(upstream.request_body(request, "u", stream=False))
    assert body["response_format"] == fmt
    request = _request(
        backend, tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    )  # fmt: skip
    body = msgspec.json.decode(upstream.request_body(request, "u", stream=True))
    assert body["tools"] == [TOOL]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": "{}"}
    assert body["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}, "response_format"),
        ({"tools": [TOOL]}, "tools"),
    ],
)
def test_refused_where_the_upstream_does_not(fields, param) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnsupportedParameterError) as info:
        _request(_backend(), **fields)
    assert info.value.param == param and info.value.status_code == 400


def test_upstream_tool_calls_become_deltas() -> None:
    whole = upstream.decode_response(
        b'{"choices":[{"index":0,"message":{"content":null,"tool_calls":[{"id":"call_9","type":"function",'
        b'"function":{"name":"get_weather","arguments":"{\\"city\\": \\"Oslo\\"}"}}]},"finish_reason":"tool_calls"}]}'
    )
    (delta,) = upstream.deltas(whole)
    assert delta.finish_reason == "tool_calls"
    (call,) = delta.tool_calls
    assert (call.index, call.id, call.name, call.arguments) == (0, "call_9", "get_weather", '{"city": "Oslo"}')
    chunk = upstream.decode_response(b'{"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"function":{"arguments":"{\\"a"}}]}}]}')
    (delta,) = upstream.deltas(chunk)
    assert delta.tool_calls[0].index == 1 and delta.tool_calls[0].id is None and delta.tool_calls[0].arguments == '{"a'
