"""Structured output and tools on a real server with the real default model, through the
official ``openai`` client and httpx: ``parse`` with a Pydantic model, a named tool forced with
valid arguments, a two-turn tool conversation whole and streamed, and the 400s."""

from __future__ import annotations

import json
import os

import httpx
import jsonschema
import openai
import pydantic
import pytest

from backends.engine.catalogue import default_home, pull

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}},
}


class Person(pydantic.BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def server(shared_taxiway_server):  # type: ignore[no-untyped-def]
    path = pull("smollm2-135m-instruct", home=default_home(os.environ), progress=False)
    config = f"""
        [[models]]
        name = "smollm2-135m-instruct"
        aliases = ["default"]
        backend = "engine"
        options = {{ model = "{path}", threads = 2, max_num_seqs = 8, max_num_batched_tokens = 256, kv_cache_tokens = 4096 }}
    """
    server = shared_taxiway_server(config, startup_timeout=120)
    server.wait_ready(timeout=300)
    return server


@pytest.fixture
def client(server):  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_parse_pydantic(client) -> None:  # type: ignore[no-untyped-def]
    completion = client.chat.completions.parse(
        model="default", messages=[{"role": "user", "content": "Describe a person."}],
        response_format=Person, temperature=0, max_tokens=60,
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_and_completions(server) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "default", "messages": [{"role": "user", "content": "Give me a JSON object."}],
            "response_format": {"type": "json_object"}, "temperature": 0, "max_tokens": 60}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:  # cut by max_tokens: says so, and the text is what was produced
        assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("{")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    body = {"model": "default", "prompt": "A number:", "temperature": 0, "max_tokens": 20,
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}  # fmt: skip
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), schema)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
         "response_format.json_schema.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}], "tool_choice": "required"},
         "tools[0].function.parameters"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)  # fmt: skip
def test_bad_requests_are_400s(server, change, param) -> None:  # type: ignore[no-untyped-def]
    body = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], **change}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_named_tool_is_forced(client) -> None:  # type: ignore[no-untyped-def]
    completion = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Tell me a joke."}], tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0, max_tokens=60,
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_time" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


def _conversation(client, *, stream: bool):  # type: ignore[no-untyped-def]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    kwargs = dict(model="default", tools=[WEATHER], temperature=0, max_tokens=60)
    first = _complete(client, messages, stream=stream, tool_choice="required", parallel_tool_calls=False, **kwargs)
    assert first["finish_reason"] == "tool_calls"
    (call,) = first["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    messages += [
        {"role": "assistant", "content": None, "tool_calls": first["tool_calls"]},
        {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    second = _complete(client, messages, stream=stream, **kwargs)
    assert second["finish_reason"] in ("stop", "length") and second["content"]
    return first, second


def _complete(client, messages, *, stream: bool, **kwargs):  # type: ignore[no-untyped-def]
    """The choice as a dict; streamed, put together from the chunks as OpenAI's docs do."""
    if not stream:
        choice = client.chat.completions.create(messages=messages, **kwargs).choices[0]
        calls = [c.model_dump() for c in choice.message.tool_calls or []]
        return {"content": choice.message.content, "tool_calls": calls, "finish_reason": choice.finish_reason}
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(messages=messages, stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for piece in delta.tool_calls or []:
            if piece.id is not None:  # the first piece of a call: id, type, name
                assert piece.type == "function" and piece.function.name
                calls[piece.index] = {"id": piece.id, "type": "function",
                                      "function": {"name": piece.function.name, "arguments": ""}}  # fmt: skip
            calls[piece.index]["function"]["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return {"content": content, "tool_calls": [calls[i] for i in sorted(calls)], "finish_reason": finish}


def test_two_turn_tool_conversation(client) -> None:  # type: ignore[no-untyped-def]
    whole = _conversation(client, stream=False)
    streamed = _conversation(client, stream=True)
    # greedy: the stream carries exactly what the whole response does (ids aside)
    for a, b in zip(whole, streamed, strict=True):
        assert a["content"] == b["content"] or (not a["content"] and not b["content"])
        assert [c["function"] for c in a["tool_calls"]] == [c["function"] for c in b["tool_calls"]]
