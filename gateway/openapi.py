"""The OpenAPI 3.1 document served at ``GET /openapi.json``, generated from the Structs the server
really decodes and encodes (``gateway.wire``, the admin's, the catalog's), never written by hand.

``OPERATIONS`` says which Struct each route decodes and answers with; msgspec's
``schema_components`` turns those Structs into JSON Schema (2020-12, OpenAPI 3.1's dialect). Every
error of every route is the one ``ErrorResponse`` shape (``gateway.render.error_body``), so each
operation answers ``4XX`` and ``5XX`` with it. The schema of a ``text/event-stream`` response
describes one event (OpenAPI 3.1 has no item schema): its ``data`` is JSON of one of the stream's
Structs (``contentMediaType`` and ``contentSchema``), or the last, ``[DONE]``.

Examples are Struct instances encoded here, so they decode as the server decodes them (a test
checks that, and round-trips real responses through the schemas). Any other route the app serves
(a plugin's ``register_routes``, the playground) is listed as answering any content, undescribed.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import msgspec

from gateway import wire
from gateway.admin import AdminModel, AdminModels, LoRAAdapterRequest, LoRAAdapterStatus
from gateway.asgi import JSON, Scope, request_headers, request_id, send_bytes, send_error
from gateway.catalog import ModelState, Readiness
from gateway.errors import MethodNotAllowedError
from gateway.fleet import ReloadResult
from gateway.interface import TokenLogprob


class Health(msgspec.Struct):
    """``GET /health``: the process answers (``gateway.pipeline.Gateway.health``)."""

    status: str


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    """One route and method: the Struct its body decodes into, what a 200 encodes, and for a
    stream the Structs of its events."""

    method: str
    path: str
    summary: str
    tag: str
    request: Any = None  # a Struct type, or None without a body
    response: Any = None  # the 200's Struct type
    stream: tuple[Any, ...] = ()  # the events of a "stream": true response
    status_response: dict[int, Any] = {}  # statuses other than 200 answering a Struct of their own
    request_example: Any = None  # Struct instances
    response_example: Any = None
    path_params: tuple[str, ...] = ()  # the path's parameters


_USAGE = wire.WireUsage(prompt_tokens=5, completion_tokens=2, total_tokens=7)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        method="post", path="/v1/chat/completions", tag="generation",
        summary="A chat completion, whole or streamed (OpenAI's API)",
        request=wire.ChatCompletionRequest, response=wire.ChatCompletion,
        stream=(wire.ChatCompletionChunk, wire.ChatCompletionChunkWithUsage, wire.ErrorResponse),
        request_example=wire.ChatCompletionRequest(
            model="default", messages=[wire.Message(role="user", content="Say hello.")], max_tokens=8, temperature=0
        ),
        response_example=wire.ChatCompletion(
            id="chatcmpl-3f2a", created=1764900000, model="default", usage=_USAGE,
            choices=[wire.ChatChoice(index=0, message=wire.AssistantMessage(content="Hello!"), finish_reason="stop")],
        ),
    ),
    Operation(
        method="post", path="/v1/completions", tag="generation",
        summary="A text completion of a prompt, whole or streamed (OpenAI's legacy API)",
        request=wire.CompletionRequest, response=wire.Completion, stream=(wire.Completion, wire.ErrorResponse),
        request_example=wire.CompletionRequest(model="default", prompt="Once upon a time", max_tokens=8),
        response_example=wire.Completion(
            id="cmpl-3f2a", created=1764900000, model="default", usage=_USAGE,
            choices=[wire.CompletionChoice(index=0, text=" there was a", finish_reason="length")],
        ),
    ),
    Operation(
        method="post", path="/v1/embeddings", tag="embeddings",
        summary="Embeddings of texts or token ids",
        request=wire.EmbeddingsRequest, response=wire.EmbeddingsResponse,
        request_example=wire.EmbeddingsRequest(model="embed", input=["hello world"]),
        response_example=wire.EmbeddingsResponse(
            model="embed", usage=wire.EmbeddingsUsage(prompt_tokens=2, total_tokens=2),
            data=[wire.Embedding(index=0, embedding=[0.12, -0.5, 0.33])],
        ),
    ),
    Operation(
        method="post", path="/v1/score", tag="embeddings",
        summary="Scores of text pairs: a cross-encoder's relevance, or an embedding model's cosine (vLLM's API)",
        request=wire.ScoreRequest, response=wire.ScoreResponse,
        request_example=wire.ScoreRequest(model="embed", text_1="What is the capital of France?",
                                          text_2=["Paris is the capital of France.", "Beethoven wrote nine symphonies."]),
        response_example=wire.ScoreResponse(
            id="score-3f2a", created=1764900000, model="embed",
            data=[wire.ScoreData(index=0, score=0.82), wire.ScoreData(index=1, score=0.04)],
            usage=wire.EmbeddingsUsage(prompt_tokens=28, total_tokens=28),
        ),
    ),
    Operation(
        method="post", path="/v1/rerank", tag="embeddings",
        summary="Documents ordered by relevance to a query (Cohere's and Jina's rerank API; also at /rerank)",
        request=wire.RerankRequest, response=wire.RerankResponse,
        request_example=wire.RerankRequest(model="reranker", query="What is the capital of France?",
                                           documents=["Beethoven wrote nine symphonies.", "Paris is the capital of France."],
                                           top_n=1),
        response_example=wire.RerankResponse(
            id="rerank-3f2a", model="reranker", usage=wire.RerankUsage(total_tokens=30),
            results=[wire.RerankResult(index=1, relevance_score=0.97,
                                       document=wire.RerankDocument(text="Paris is the capital of France."))],
        ),
    ),
    Operation(
        method="post", path="/v1/classify", tag="embeddings",
        summary="Label probabilities of texts from a sequence-classification model (vLLM's API)",
        request=wire.ClassifyRequest, response=wire.ClassifyResponse,
        request_example=wire.ClassifyRequest(model="sentiment", input=["I love this!"]),
        response_example=wire.ClassifyResponse(
            id="classify-3f2a", created=1764900000, model="sentiment",
            data=[wire.ClassifyData(index=0, label="positive", probs=[0.02, 0.08, 0.9], num_classes=3)],
            usage=wire.EmbeddingsUsage(prompt_tokens=6, total_tokens=6),
        ),
    ),
    Operation(
        method="get", path="/v1/models", tag="models", summary="Every model name a client may send",
        response=wire.ModelList,
        response_example=wire.ModelList(data=[wire.ModelCard(id="default", created=1764900000, root="smollm2")]),
    ),
    Operation(
        method="get", path="/v1/models/{model}", tag="models", summary="One model (a name, alias or adapter)",
        response=wire.ModelCard, path_params=("model",),
        response_example=wire.ModelCard(id="smollm2", created=1764900000, root="smollm2", aliases=("default",)),
    ),
    Operation(
        method="get", path="/v1/models/{model}/stats", tag="models",
        summary="The backend's statistics (the engine's: requests, KV blocks, tokens/s), or why it has none",
        response=dict[str, Any], path_params=("model",),
        response_example=ModelState(model="smollm2", state="not ready", detail="loading"),
    ),
    Operation(
        method="get", path="/health", tag="probes", summary="Liveness: the process answers",
        response=Health, response_example=Health(status="ok"),
    ),
    Operation(
        method="get", path="/ready", tag="probes",
        summary="Readiness: every model that must be loaded is (503 naming those that are not)",
        response=Readiness, status_response={503: Readiness},
        response_example=Readiness(status="ready", not_ready=[]),
    ),
    Operation(
        method="get", path="/admin/models", tag="admin", summary="Every model instance and its state",
        response=AdminModels,
        response_example=AdminModels(
            data=[AdminModel(name="smollm2", aliases=("default",), backend="engine", state="loaded",
                             memory_bytes=120_000_000, in_flight=0, last_used=None)]  # fmt: skip
        ),
    ),
    Operation(
        method="post", path="/admin/models/{name}/load", tag="admin", summary="Start an unloaded model",
        response=AdminModel, path_params=("name",),
    ),
    Operation(
        method="post", path="/admin/models/{name}/unload", tag="admin",
        summary="Refuse a model's new requests (503), let those in flight finish, stop it",
        response=AdminModel, path_params=("name",),
    ),
    Operation(
        method="post", path="/admin/reload", tag="admin", summary="Read the config file again and apply it",
        response=ReloadResult,
    ),
    Operation(
        method="post", path="/v1/load_lora_adapter", tag="admin",
        summary="Serve a LoRA adapter as a model of its own (vLLM's route)",
        request=LoRAAdapterRequest, response=LoRAAdapterStatus,
        request_example=LoRAAdapterRequest(lora_name="french", lora_path="/models/adapters/french"),
        response_example=LoRAAdapterStatus(lora_name="french", root="smollm2", status="loaded"),
    ),
    Operation(
        method="post", path="/v1/unload_lora_adapter", tag="admin", summary="Stop serving a LoRA adapter",
        request=LoRAAdapterRequest, response=LoRAAdapterStatus,
        request_example=LoRAAdapterRequest(lora_name="french"),
    ),
)

# /rerank: the same handler as /v1/rerank, where Jina's and llama.cpp's clients call it
OPERATIONS += tuple(
    msgspec.structs.replace(op, path="/rerank", summary="As POST /v1/rerank")
    for op in OPERATIONS
    if op.path == "/v1/rerank"
)

#: Routes mounted with sub-paths, as the app mounts them, and the operations below each.
MOUNTS = {"/v1/models": ("/v1/models", "/v1/models/{model}", "/v1/models/{model}/stats"),
          "/admin": ("/admin/models", "/admin/models/{name}/load", "/admin/models/{name}/unload", "/admin/reload")}  # fmt: skip

_REF = "#/components/schemas/{name}"
_JSON = "application/json"
_SSE = "text/event-stream"


def openapi_document(
    *, plugin_paths: tuple[str, ...] = (), page_paths: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The whole document: ``OPERATIONS``, ``GET /openapi.json``, each of ``plugin_paths``
    (``GET`` and ``POST``, any content) and of ``page_paths`` (``GET``, any content)."""
    types: list[Any] = [wire.ErrorResponse, TokenLogprob]
    for op in OPERATIONS:
        types.extend(t for t in (op.request, op.response, *op.stream, *op.status_response.values()) if t is not None)
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    schema_of = dict(zip(map(_key, types), schemas))

    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, schema_of)
    paths["/openapi.json"] = {"get": {
        "operationId": "get_openapi", "tags": ["meta"], "summary": "This document",
        "responses": {"200": {"description": "OpenAPI 3.1", "content": {_JSON: {"schema": {"type": "object"}}}}},
    }}  # fmt: skip
    for path in plugin_paths:
        paths[path] = {method: _other_operation(path, method) for method in ("get", "post")}
    for path in page_paths:
        paths[path] = {"get": _other_operation(path, "get")}

    document = {
        "openapi": "3.1.0",
        "info": {
            "title": "Taxiway",
            "version": _version(),
            "description": "A self-hosted OpenAI-compatible LLM gateway. Errors are always "
            '`{"error": {"message", "type", "param", "code"}}`; `param` names the offending field.',
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "API or admin key"}},
        },
        # keys are optional: a server without [auth] or [admin] keys answers without one
        "security": [{}, {"bearer": []}],
    }
    return msgspec.json.decode(msgspec.json.encode(document))  # JSON values only (tuples as arrays)


def _version() -> str:
    try:
        return importlib.metadata.version("taxiway")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _key(t: Any) -> str:
    return repr(t)


def _operation(op: Operation, schema_of: dict[str, Any]) -> dict[str, Any]:
    error = {"description": "An error", "content": {_JSON: {"schema": schema_of[_key(wire.ErrorResponse)]}}}
    ok: dict[str, Any] = {"schema": schema_of[_key(op.response)]}
    if op.response_example is not None:
        ok["example"] = msgspec.to_builtins(op.response_example)
    content: dict[str, Any] = {_JSON: ok}
    if op.stream:
        content[_SSE] = {"schema": _sse_event([schema_of[_key(t)] for t in op.stream])}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    for status, struct in op.status_response.items():
        responses[str(status)] = {"description": "See the body", "content": {_JSON: {"schema": schema_of[_key(struct)]}}}
    responses.setdefault("4XX", error)
    responses.setdefault("5XX", error)
    out: dict[str, Any] = {
        "operationId": _operation_id(op),
        "tags": [op.tag],
        "summary": op.summary,
        "responses": responses,
    }
    if op.path_params:
        out["parameters"] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
            for name in op.path_params
        ]
    if op.request is not None:
        body: dict[str, Any] = {"schema": schema_of[_key(op.request)]}
        if op.request_example is not None:
            body["example"] = msgspec.to_builtins(op.request_example)
        out["requestBody"] = {"required": True, "content": {_JSON: body}}
    return out


def _sse_event(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """One server-sent event whose ``data`` is JSON of one of ``payloads``, or ``[DONE]``."""
    data = {
        "type": "string",
        "if": {"const": "[DONE]"},
        "else": {"contentMediaType": _JSON, "contentSchema": {"anyOf": payloads}},
    }
    return {"type": "object", "required": ["data"], "properties": {"data": data}}


def _operation_id(op: Operation) -> str:
    words = [w.strip("{}") for w in op.path.strip("/").replace(".", "_").split("/")]
    return "_".join([op.method, *words])


def _other_operation(path: str, method: str) -> dict[str, Any]:
    return {
        "operationId": "_".join([method, "other", *path.strip("/").split("/")]) if path != "/" else f"{method}_root",
        "tags": ["other"],
        "summary": "Undescribed: a plugin's route (register_routes) or a page (the playground)",
        "responses": {
            "200": {"description": "Whatever the route serves", "content": {"*/*": {"schema": {}}}},
            "4XX": {"description": "An error", "content": {_JSON: {"schema": {"$ref": _REF.format(name="ErrorResponse")}}}},
            "5XX": {"description": "An error", "content": {_JSON: {"schema": {"$ref": _REF.format(name="ErrorResponse")}}}},
        },
    }


def openapi_route(route_handlers: list[Any], admin_plugin_paths: list[str]) -> Any:
    """The ``GET /openapi.json`` ASGI handler for an app serving ``route_handlers`` (litestar's;
    a plugin's has ``opt["plugin_route"]``) and plugin routes below ``/admin``
    (``admin_plugin_paths``, relative to it): encoded once."""
    described = {op.path for op in OPERATIONS} | set(MOUNTS)
    others = [handler for handler in route_handlers if not handler.paths <= described]
    plugins = [path for h in others if h.opt.get("plugin_route") for path in h.paths]
    plugins += [f"/admin/{path}" for path in admin_plugin_paths]
    pages = [path for h in others if not h.opt.get("plugin_route") for path in h.paths]
    body = msgspec.json.encode(openapi_document(plugin_paths=tuple(sorted(plugins)), page_paths=tuple(sorted(pages))))

    async def serve(scope: Scope, receive: Any, send: Any) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            error = MethodNotAllowedError(f"Method {scope['method']} is not allowed; use GET", allow="GET, HEAD")
            await send_error(send, error, request_id(request_headers(scope)))
            return
        await send_bytes(send, 200, body, [JSON])

    return serve
