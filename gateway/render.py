"""Backend results → OpenAI response bodies and SSE events; errors → OpenAI's error body.

For generation a renderer is made per request. ``add`` folds a stream item (``Delta``, ``Usage``)
into a whole response (non-streaming); ``chunk`` turns one item into SSE bytes (streaming). Either
way the client sees the gateway's response id and the public model name, never a backend's.
"""

from __future__ import annotations

import base64
import struct

import msgspec

from gateway import wire
from gateway.errors import TaxiwayError, UpstreamError
from gateway.interface import Delta, EmbeddingResult, TokenLogprob, Usage

_encoder = msgspec.json.Encoder()
encode = _encoder.encode

SSE_DONE = b"data: [DONE]\n\n"
_FINISH_REASONS = ("stop", "length", "tool_calls")


def sse_event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def error_body(error: TaxiwayError) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}``: the one rendering of an error's body."""
    return encode(
        wire.ErrorResponse(
            error=wire.ErrorBody(message=error.message, type=error.error_type, param=error.param, code=error.code)
        )
    )


def error_headers(error: TaxiwayError, request_id: str) -> dict[str, str]:
    """The headers of a whole error response besides its content type: the error's own
    (``Retry-After``) and ``X-Request-ID``. Names are lower-case."""
    headers = {name.lower(): value for name, value in error.headers.items()}
    headers["x-request-id"] = request_id
    return headers


def sse_error(error: TaxiwayError) -> bytes:
    """The end of a stream that fails after it started: the error as an event, then ``[DONE]``."""
    return sse_event(error_body(error)) + SSE_DONE


def wire_usage(usage: Usage) -> wire.WireUsage:
    return wire.WireUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=wire.PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def _finish_reason(delta: Delta) -> str | None:
    reason = delta.finish_reason
    if reason is None or reason in _FINISH_REASONS:
        return reason
    raise UpstreamError(f"the backend ended choice {delta.index} with '{reason}'")


class _Choice:
    __slots__ = ("finish_reason", "logprobs", "started", "text_offset", "texts", "tool_calls")

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.finish_reason: str | None = None
        self.started = False  # streaming: the role has been sent
        self.text_offset = 0  # streaming completions: characters sent so far
        self.tool_calls: dict[int, list[str]] = {}  # call index -> [id, name, arguments...]


class Renderer:
    """State shared by both endpoints: id, creation time, public model name, per-choice state."""

    def __init__(self, response_id: str, model: str, created: int, *, include_usage: bool = False) -> None:
        self.id = response_id
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.usage: Usage | None = None
        self._choices: dict[int, _Choice] = {}

    def _choice(self, index: int) -> _Choice:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = _Choice()
        return choice

    def add(self, item: Delta | Usage) -> None:
        """Fold one stream item into the whole response."""
        if type(item) is Usage:
            self.usage = item
            return
        assert isinstance(item, Delta)
        choice = self._choice(item.index)
        if item.text:
            choice.texts.append(item.text)
        for call in item.tool_calls:
            parts = choice.tool_calls.setdefault(call.index, ["", ""])
            if call.id is not None:
                parts[0] = call.id
            if call.name is not None:
                parts[1] = call.name
            parts.append(call.arguments)
        if item.logprobs is not None:
            if choice.logprobs is None:
                choice.logprobs = []
            choice.logprobs.extend(item.logprobs)
        reason = _finish_reason(item)
        if reason is not None:
            choice.finish_reason = reason

    def _sorted_choices(self) -> list[tuple[int, _Choice]]:
        return sorted(self._choices.items())


def _message(choice: _Choice) -> wire.AssistantMessage:
    content: str | None = "".join(choice.texts)
    if not choice.tool_calls:
        return wire.AssistantMessage(content=content)
    calls = [
        wire.WireToolCall(id=parts[0], function=wire.FunctionCall(name=parts[1], arguments="".join(parts[2:])))
        for _, parts in sorted(choice.tool_calls.items())
    ]
    # OpenAI: content is null beside tool calls unless the model also wrote text
    return wire.AssistantMessage(content=content if content and content.strip() else None, tool_calls=calls)


def _chunk_tool_calls(delta: Delta) -> list[wire.ChunkToolCall] | None:
    if not delta.tool_calls:
        return None
    return [
        wire.ChunkToolCall(
            index=call.index,
            id=msgspec.UNSET if call.id is None else call.id,
            type=msgspec.UNSET if call.id is None else "function",
            function=wire.ChunkFunction(
                arguments=call.arguments, name=msgspec.UNSET if call.name is None else call.name
            ),
        )
        for call in delta.tool_calls
    ]


class ChatRenderer(Renderer):
    def body(self) -> bytes:
        choices = [
            wire.ChatChoice(
                index=index,
                message=_message(c),
                finish_reason=c.finish_reason,
                logprobs=None if c.logprobs is None else wire.ChatLogprobs(content=tuple(c.logprobs)),
            )
            for index, c in self._sorted_choices()
        ]
        usage = wire_usage(self.usage or Usage(prompt_tokens=0, completion_tokens=0))
        return encode(
            wire.ChatCompletion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        )

    def chunk(self, item: Delta | Usage) -> bytes | None:
        """SSE bytes for one item; ``None`` when there is nothing to send."""
        if type(item) is Usage:
            self.usage = item
            if not self.include_usage:
                return None
            return sse_event(encode(self._chunk([], usage=wire_usage(item))))
        assert isinstance(item, Delta)
        choice = self._choice(item.index)
        role = None
        if not choice.started:
            choice.started = True
            role = "assistant"
        calls = _chunk_tool_calls(item)
        content = item.text if item.text or (role and calls is None) else None
        delta = wire.ChunkDelta(role=role, content=content, tool_calls=calls)
        logprobs = None if item.logprobs is None else wire.ChatLogprobs(content=item.logprobs)
        out = wire.ChatChunkChoice(
            index=item.index, delta=delta, finish_reason=_finish_reason(item), logprobs=logprobs
        )
        return sse_event(encode(self._chunk([out])))

    def _chunk(self, choices: list[wire.ChatChunkChoice], usage: wire.WireUsage | None = None) -> wire.ChatCompletionChunk:
        if self.include_usage:
            return wire.ChatCompletionChunkWithUsage(
                id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
            )
        return wire.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices)


def _completion_logprobs(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int) -> wire.CompletionLogprobs:
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return wire.CompletionLogprobs(
        tokens=[lp.token for lp in logprobs],
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{top.token: top.logprob for top in lp.top_logprobs} for lp in logprobs],
        text_offset=offsets,
    )


class CompletionRenderer(Renderer):
    def body(self) -> bytes:
        choices = [
            wire.CompletionChoice(
                index=index,
                text="".join(c.texts),
                finish_reason=c.finish_reason,
                logprobs=None if c.logprobs is None else _completion_logprobs(c.logprobs, 0),
            )
            for index, c in self._sorted_choices()
        ]
        usage = wire_usage(self.usage or Usage(prompt_tokens=0, completion_tokens=0))
        return encode(wire.Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage))

    def chunk(self, item: Delta | Usage) -> bytes | None:
        if type(item) is Usage:
            self.usage = item
            if not self.include_usage:
                return None
            return sse_event(
                encode(wire.Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=wire_usage(item)))
            )
        assert isinstance(item, Delta)
        choice = self._choice(item.index)
        logprobs = None
        if item.logprobs is not None:
            logprobs = _completion_logprobs(item.logprobs, choice.text_offset)
        choice.text_offset += len(item.text)
        out = wire.CompletionChoice(
            index=item.index, text=item.text, finish_reason=_finish_reason(item), logprobs=logprobs
        )
        return sse_event(encode(wire.Completion(id=self.id, created=self.created, model=self.model, choices=[out])))


def embeddings_body(result: EmbeddingResult, model: str, *, as_base64: bool) -> bytes:
    data = [
        wire.Embedding(index=i, embedding=_base64_floats(e) if as_base64 else list(e))
        for i, e in enumerate(result.embeddings)
    ]
    usage = wire.EmbeddingsUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return encode(wire.EmbeddingsResponse(data=data, model=model, usage=usage))


def _base64_floats(values: tuple[float, ...]) -> str:
    # OpenAI's base64 encoding: little-endian float32, as the official client decodes it
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
