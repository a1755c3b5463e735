"""A scripted in-process backend and a plugin recording the lifecycle hooks, for app-layer tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from gateway.config import parse_settings
from gateway.context import RequestContext
from gateway.errors import TaxiwayError
from gateway.hookspecs import hookimpl
from gateway.interface import (
    Backend,
    Capabilities,
    Delta,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    ReadyState,
    StreamItem,
    TokenLogprob,
    Usage,
)
from gateway.plugins import Plugins, load_plugins


class FakeStats(msgspec.Struct):
    num_running: int
    num_waiting: int


class FakeBackend(Backend):
    """Answers "echo: <prompt>" word by word. ``script`` on the class changes behaviour per test."""

    class Options(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
        max_n: int = 4
        embeddings: bool = False
        params: list[str] | None = None
        ready: bool = True
        failed: bool = False  # with ready = false: its start failed

    instances: list[FakeBackend] = []

    def __init__(self, model_name: str, options: Any) -> None:
        super().__init__(model_name, options)
        self.requests: list[GenerationRequest] = []
        self.closed: list[str] = []  # request ids whose stream was closed before its end
        self.fail_with: TaxiwayError | None = None  # raised before the first item
        self.fail_after: tuple[int, TaxiwayError] | None = None  # raised after N deltas
        self.delay_s = 0.0  # between deltas
        self.started = self.stopped = False
        FakeBackend.instances.append(self)

    @property
    def capabilities(self) -> Capabilities:
        caps = Capabilities(max_n=self.options.max_n, max_top_logprobs=5, embeddings=self.options.embeddings)
        if self.options.params is not None:
            caps = msgspec.structs.replace(caps, sampling_params=frozenset(self.options.params))
        return caps

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    def ready(self) -> ReadyState:
        detail = "" if self.options.ready else "weights unreadable" if self.options.failed else "loading weights"
        return ReadyState(ready=self.options.ready, failed=self.options.failed, detail=detail)

    def stats(self) -> msgspec.Struct | None:
        return FakeStats(num_running=1, num_waiting=2)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        text = request.messages[-1].content if request.messages is not None else request.prompt or ""
        words = ["echo:", *text.split()]
        sent = 0
        try:
            for index in range(request.sampling.n):
                for i, word in enumerate(words):
                    if self.fail_after is not None and sent == self.fail_after[0]:
                        raise self.fail_after[1]
                    if self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    piece = word if i == 0 else " " + word
                    logprobs = (TokenLogprob(token=piece, logprob=-1.0),) if request.sampling.logprobs else None
                    yield Delta(index=index, text=piece, logprobs=logprobs)
                    sent += 1
                yield Delta(index=index, finish_reason="stop")
            yield Usage(prompt_tokens=len(text.split()), completion_tokens=len(words) * request.sampling.n)
        except (GeneratorExit, asyncio.CancelledError):
            self.closed.append(request.request_id)
            raise

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        return EmbeddingResult(embeddings=tuple((float(len(t)), 1.0) for t in request.inputs), prompt_tokens=len(request.inputs))


class FakeBackendPlugin:
    @hookimpl
    def register_backends(self, register: Callable[..., None]) -> None:
        register("fake", FakeBackend)


class HookRecorder:
    """Records every lifecycle hook call as (hook name, request id, extra)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    @hookimpl
    async def authenticate(self, ctx: RequestContext, headers: dict[str, str]) -> None:
        self.calls.append(("authenticate", ctx.request_id, headers.get("x-test")))

    @hookimpl
    def before_request(self, ctx: RequestContext) -> None:
        self.calls.append(("before_request", ctx.request_id, (ctx.model, ctx.backend_name)))

    @hookimpl
    async def after_request(self, ctx: RequestContext, usage: Usage | None) -> None:
        self.calls.append(("after_request", ctx.request_id, usage))

    @hookimpl
    def on_error(self, ctx: RequestContext, error: TaxiwayError) -> None:
        self.calls.append(("on_error", ctx.request_id, error.status_code))


DEFAULT_CONFIG = """
[server]
max_body_bytes = 2048

[[models]]
name = "fake-model"
aliases = ["default"]
backend = "fake"

[[models]]
name = "narrow"
backend = "fake"
options = { max_n = 1, params = ["max_tokens", "temperature"], embeddings = true }
"""


def fake_plugins(*extra: tuple[str, object], entry_points: bool = True) -> Plugins:
    return load_plugins(entry_points=entry_points, extra=[("fake", FakeBackendPlugin()), *extra])


def settings(text: str = DEFAULT_CONFIG) -> Any:
    return parse_settings(text, env={})
