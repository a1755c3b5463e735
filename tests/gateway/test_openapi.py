"""``GET /openapi.json`` kept in step with the server: its examples decode as the server decodes,
every route the app serves is in it, and real responses of a real ``taxiway serve`` (over HTTP)
validate against it and round-trip through the Structs it was generated from."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
import msgspec
import pytest
from gateway_fakes import fake_plugins, settings
from litestar.testing import AsyncTestClient

from gateway import normalize
from gateway.app import create_app
from gateway.openapi import MOUNTS, OPERATIONS, Operation, openapi_document
from gateway.wire import ErrorResponse
from tests.gateway.tiny_engine import every_route_config, write_tiny_chat_model

DOCUMENT = openapi_document()


def _validator(schema: dict[str, Any], document: dict[str, Any] = DOCUMENT) -> jsonschema.Draft202012Validator:
    """``schema`` (with ``#/components/...`` references) checked in ``document``'s components."""
    return jsonschema.Draft202012Validator({**schema, "components": document["components"]})


def _operation(document: dict[str, Any], op: Operation) -> dict[str, Any]:
    return document["paths"][op.path][op.method]


def test_the_document_is_openapi_3_1() -> None:
    assert DOCUMENT["openapi"] == "3.1.0"
    # OpenAPI 3.1's schema dialect is JSON Schema 2020-12: every component is a valid schema
    for name, schema in DOCUMENT["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert name[0].isupper()
    ids = [op["operationId"] for path in DOCUMENT["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("op", [op for op in OPERATIONS if op.request_example is not None], ids=lambda op: op.path)
def test_request_examples_decode_as_the_server_decodes(op: Operation) -> None:
    body = _operation(DOCUMENT, op)["requestBody"]["content"]["application/json"]
    example = msgspec.json.encode(body["example"])
    decoded = normalize.decode(example, msgspec.json.Decoder(op.request))  # the server's own decode: 400s raise
    assert decoded == op.request_example
    _validator(body["schema"]).validate(body["example"])


@pytest.mark.parametrize("op", [op for op in OPERATIONS if op.response_example is not None], ids=lambda op: op.path)
def test_response_examples_are_what_the_server_encodes(op: Operation) -> None:
    ok = _operation(DOCUMENT, op)["responses"]["200"]["content"]["application/json"]
    _validator(ok["schema"]).validate(ok["example"])
    msgspec.convert(ok["example"], op.response)


async def test_every_route_of_the_app_is_documented() -> None:
    app = create_app(settings(), plugins=fake_plugins())
    async with AsyncTestClient(app) as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    served = {path for route in app.routes for path in [route.path]}
    for path in served:
        documented = MOUNTS.get(path, (path,))
        assert all(p in document["paths"] for p in documented), path
    described = {op.path for op in OPERATIONS}
    assert described <= set(document["paths"])
    # anything else is a plugin's route or a page, listed as undescribed
    for path, item in document["paths"].items():
        if path not in described and path != "/openapi.json":
            assert item["get"]["tags"] == ["other"], path
    assert "/metrics" in document["paths"] and "/admin/usage" in document["paths"]


async def test_embeddings_round_trip_with_a_fake_backend() -> None:
    """No tiny embedding model here: the fake backend answers, the app's code renders."""
    app = create_app(settings(), plugins=fake_plugins())
    op = next(op for op in OPERATIONS if op.path == "/v1/embeddings")
    async with AsyncTestClient(app) as client:
        for encoding in ("float", "base64"):
            body = {"model": "narrow", "input": ["a b", "c"], "encoding_format": encoding}  # the fake that embeds
            response = await client.post(op.path, json=body)
            assert response.status_code == 200, response.text
            _check_whole(DOCUMENT, op, response.status_code, response.headers["content-type"], response.content)


# -- a real server over HTTP -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(shared_taxiway_server, tmp_path_factory):  # type: ignore[no-untyped-def]
    model = write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")
    config = tmp_path_factory.mktemp("config") / "taxiway.toml"  # a file: /admin/reload reads it again
    config.write_text(every_route_config(model))
    server = shared_taxiway_server(config)
    server.wait_ready(timeout=120)
    return server


def _response_schema(document: dict[str, Any], op: Operation, status: int, media: str) -> dict[str, Any]:
    responses = _operation(document, op)["responses"]
    entry = responses.get(str(status)) or responses[f"{str(status)[0]}XX"]
    return entry["content"][media]


def _check_whole(document: dict[str, Any], op: Operation, status: int, content_type: str, body: bytes) -> None:
    """A whole JSON response: valid against its documented schema, and the Struct it was
    generated from decodes it and encodes the same bytes again."""
    assert content_type.startswith("application/json"), (op.path, status, body[:200])
    media = _response_schema(document, op, status, "application/json")
    instance = msgspec.json.decode(body)
    _validator(media["schema"]).validate(instance)
    struct = ErrorResponse if status >= 400 else op.status_response.get(status, op.response)
    if isinstance(struct, type) and issubclass(struct, msgspec.Struct):
        assert msgspec.json.encode(msgspec.json.decode(body, type=struct)) == body


def _check_stream(document: dict[str, Any], op: Operation, body: bytes) -> int:
    """An SSE response: each ``data:`` event valid against the event schema's ``contentSchema``,
    then ``[DONE]``."""
    media = _response_schema(document, op, 200, "text/event-stream")
    validator = _validator(media["schema"]["properties"]["data"]["else"]["contentSchema"], document)
    events = [block.removeprefix(b"data: ") for block in body.split(b"\n\n") if block]
    assert events[-1] == b"[DONE]"
    for event in events[:-1]:
        validator.validate(msgspec.json.decode(event))
        assert any(_round_trips(event, t) for t in op.stream), event
    return len(events) - 1


def _round_trips(body: bytes, struct: type) -> bool:
    try:
        return msgspec.json.encode(msgspec.json.decode(body, type=struct)) == body
    except msgspec.ValidationError:
        return False


def _call(server, op: Operation, path: str | None = None, body: Any = None) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.request(op.method.upper(), f"{server.url}{path or op.path}", json=body, timeout=60)


def test_real_responses_round_trip(server) -> None:  # type: ignore[no-untyped-def]
    document = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert set(DOCUMENT["paths"]) <= set(document["paths"])
    ops = {(op.method, op.path): op for op in OPERATIONS}
    chat, completions = ops["post", "/v1/chat/completions"], ops["post", "/v1/completions"]
    example = msgspec.to_builtins
    calls: list[tuple[Operation, str | None, Any, int]] = [
        # every example the document gives, as is
        *[(op, None, example(op.request_example) if op.request_example else None, 0) for op in OPERATIONS
          if op.request_example is not None and op.path != "/v1/embeddings"],  # fmt: skip
        (chat, None, {**example(chat.request_example), "n": 2, "logprobs": True, "top_logprobs": 2}, 200),
        (completions, None, {**example(completions.request_example), "logprobs": 2, "echo": False}, 200),
        (chat, None, {"model": "default", "messages": []}, 400),
        (completions, None, {"model": "nope", "prompt": "x"}, 404),
        (ops["post", "/v1/embeddings"], None, {"model": "default", "input": "x"}, 400),  # not an embedding model
        (ops["get", "/v1/models"], None, None, 200),
        (ops["get", "/v1/models/{model}"], "/v1/models/default", None, 200),
        (ops["get", "/v1/models/{model}"], "/v1/models/nope", None, 404),
        (ops["get", "/v1/models/{model}/stats"], "/v1/models/tiny/stats", None, 200),
        (ops["get", "/health"], None, None, 200),
        (ops["get", "/ready"], None, None, 200),
        (ops["get", "/admin/models"], None, None, 200),
        (ops["post", "/admin/models/{name}/unload"], "/admin/models/spare/unload", None, 200),
        (ops["post", "/admin/models/{name}/load"], "/admin/models/spare/load", None, 200),
        (ops["post", "/admin/models/{name}/load"], "/admin/models/nope/load", None, 404),
        (ops["post", "/admin/reload"], None, None, 200),
    ]
    for op, path, body, expected in calls:
        response = _call(server, op, path, body)
        if expected:
            assert response.status_code == expected, (op.path, body, response.text)
        _check_whole(document, op, response.status_code, response.headers["content-type"], response.content)

    for op in (chat, completions):
        for include_usage in (False, True):
            body = {**example(op.request_example), "stream": True, "stream_options": {"include_usage": include_usage}}
            response = _call(server, op, None, body)
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            assert _check_stream(document, op, response.content) >= 2
