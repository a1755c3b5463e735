"""The POST endpoints' differences (how a body decodes and normalises, how a response renders) and
the headers every API response carries."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec

from gateway import normalize, wire
from gateway.asgi import OVERHEAD_HEADER, Headers
from gateway.context import RequestContext
from gateway.render import ChatRenderer, CompletionRenderer


class Endpoint:
    """What differs between the POST endpoints: how a body decodes and normalises, and for the
    generation endpoints how the response renders."""

    __slots__ = ("decoder", "id_prefix", "name", "normalize", "renderer")

    def __init__(
        self,
        name: str,
        request_type: type[Any],
        normalize_fn: Callable[..., Any],
        renderer: type[ChatRenderer] | type[CompletionRenderer] | None = None,
        id_prefix: str = "",
    ) -> None:
        self.name = name
        self.decoder = msgspec.json.Decoder(request_type)
        self.normalize = normalize_fn
        self.renderer = renderer
        self.id_prefix = id_prefix

    def render(self, request_id: str, model: str, include_usage: bool) -> ChatRenderer | CompletionRenderer:
        """A generation endpoint's renderer for one response, naming ``model``."""
        assert self.renderer is not None
        return self.renderer(self.id_prefix + request_id, model, int(time.time()), include_usage=include_usage)


CHAT = Endpoint("chat.completions", wire.ChatCompletionRequest, normalize.chat_request, ChatRenderer, "chatcmpl-")
COMPLETIONS = Endpoint("completions", wire.CompletionRequest, normalize.completion_request, CompletionRenderer, "cmpl-")
EMBEDDINGS = Endpoint("embeddings", wire.EmbeddingsRequest, normalize.embedding_request)

MODEL_HEADER = b"x-taxiway-model"


def response_headers(ctx: RequestContext, base: Headers | tuple[tuple[bytes, bytes], ...]) -> Headers:
    headers = list(base)
    headers.append((b"x-request-id", ctx.request_id.encode()))
    if ctx.model is not None:  # who answered: a group's name, or the fallback that took over
        headers.append((MODEL_HEADER, ctx.model.encode()))
    if ctx.response_headers:  # set by hooks (the limits' x-ratelimit-*)
        headers.extend(ctx.response_headers)
    return headers


def overhead_header(ctx: RequestContext, now: float) -> tuple[bytes, bytes]:
    overhead_ms = max(0.0, (now - ctx.started_at - ctx.timings.backend_s) * 1000.0)
    return (OVERHEAD_HEADER, f"{overhead_ms:.3f}".encode())
