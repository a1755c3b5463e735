"""The upstream's wire format: requests built from a ``GenerationRequest``, responses and SSE
chunks decoded into ``Delta`` / ``Usage``, and upstream failures mapped to gateway errors (the one
place that does: malformed answers, error statuses, httpx's transport errors).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, TypeVar

import httpx
import msgspec

from gateway.errors import (
    RateLimitError,
    ServiceUnavailableError,
    TaxiwayError,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeoutError,
)
from gateway.interface import (
    Delta,
    FinishReason,
    GenerationRequest,
    TokenLogprob,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from gateway.tools import message_dict

EXTENSION_PARAMS = ("top_k", "min_p", "repetition_penalty")

# ---------------------------------------------------------------------------------------------
# responses


class _Function(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCall(msgspec.Struct):
    index: int | None = None  # chunks number the calls; whole messages list them in order
    id: str | None = None
    function: _Function | None = None


class _Message(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_ToolCall] | None = None


class _Logprobs(msgspec.Struct):
    """Both shapes in one Struct: chat's ``content``, or completions' parallel lists."""

    content: tuple[TokenLogprob, ...] | None = None
    tokens: list[str] | None = None
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float] | None] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    message: _Message | None = None  # chat, whole
    delta: _Message | None = None  # chat, chunk
    text: str | None = None  # completions
    logprobs: _Logprobs | None = None
    finish_reason: str | None = None


class _PromptDetails(msgspec.Struct):
    cached_tokens: int | None = 0


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: _PromptDetails | None = None


class _ErrorBody(msgspec.Struct):
    message: str = ""
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class Response(msgspec.Struct):
    """A whole response or one SSE chunk, of chat or completions."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _ErrorBody | None = None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody | str | None = None
    message: str | None = None  # some servers answer {"message": …}


class _Embedding(msgspec.Struct):
    embedding: list[float]
    index: int = 0


class EmbeddingsResponse(msgspec.Struct):
    data: list[_Embedding]
    usage: _Usage | None = None


_response = msgspec.json.Decoder(Response)
_embeddings_response = msgspec.json.Decoder(EmbeddingsResponse)
_encoder = msgspec.json.Encoder()

T = TypeVar("T")


def _decode(decoder: msgspec.json.Decoder[T], payload: bytes | str) -> T:
    try:
        return decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise UpstreamError(f"the upstream sent a malformed response: {exc}") from None


def decode_response(payload: bytes | str) -> Response:
    """A whole chat or completions response, or one SSE chunk; ``UpstreamError`` when malformed."""
    return _decode(_response, payload)


def decode_embeddings(payload: bytes) -> EmbeddingsResponse:
    """An embeddings response; ``UpstreamError`` when malformed."""
    return _decode(_embeddings_response, payload)


def usage(raw: _Usage | None) -> Usage:
    if raw is None:
        return Usage(prompt_tokens=0, completion_tokens=0)
    cached = raw.prompt_tokens_details.cached_tokens if raw.prompt_tokens_details else 0
    return Usage(prompt_tokens=raw.prompt_tokens, completion_tokens=raw.completion_tokens, cached_tokens=cached or 0)


def _finish_reason(reason: str | None) -> FinishReason | None:
    if reason is None:
        return None
    if reason in ("length", "tool_calls"):
        return reason
    return "stop"  # stop, content_filter, eos…: the choice ended normally


def _logprobs(raw: _Logprobs | None) -> tuple[TokenLogprob, ...] | None:
    if raw is None:
        return None
    if raw.tokens is None or raw.token_logprobs is None:
        return raw.content
    tops = raw.top_logprobs or []
    return tuple(
        TokenLogprob(
            token=token,
            logprob=0.0 if lp is None else lp,
            top_logprobs=tuple(
                TopLogprob(token=t, logprob=v) for t, v in ((tops[i] or {}) if i < len(tops) else {}).items()
            ),
        )
        for i, (token, lp) in enumerate(zip(raw.tokens, raw.token_logprobs, strict=False))
    )


def deltas(response: Response) -> Iterator[Delta]:
    """The ``Delta`` of each choice in a whole response or a chunk."""
    if response.error is not None:
        raise UpstreamError(f"the upstream failed: {response.error.message}")
    for choice in response.choices:
        message = choice.delta or choice.message
        text = message.content if message is not None else choice.text
        yield Delta(
            index=choice.index,
            text=text or "",
            logprobs=_logprobs(choice.logprobs),
            finish_reason=_finish_reason(choice.finish_reason),
            tool_calls=_tool_calls(message),
        )


def _tool_calls(message: _Message | None) -> tuple[ToolCallDelta, ...]:
    if message is None or not message.tool_calls:
        return ()
    return tuple(
        ToolCallDelta(
            index=i if call.index is None else call.index,
            id=call.id,
            name=call.function.name if call.function else None,
            arguments=(call.function.arguments or "") if call.function else "",
        )
        for i, call in enumerate(message.tool_calls)
    )


# ---------------------------------------------------------------------------------------------
# requests


def request_body(request: GenerationRequest, upstream_model: str, *, stream: bool) -> bytes:
    """The upstream request: only what the client asked for, under the upstream's model name."""
    s = request.sampling
    body: dict[str, Any] = {"model": upstream_model}
    if request.messages is not None:
        body["messages"] = [message_dict(m, decode_arguments=False) for m in request.messages]
        if request.tools:
            body["tools"] = [
                {"type": "function", "function": {k: v for k, v in msgspec.structs.asdict(t).items() if v is not None}}
                for t in request.tools
            ]
            body["parallel_tool_calls"] = request.parallel_tool_calls
        choice = request.tool_choice
        if choice is not None:
            body["tool_choice"] = (
                {"type": "function", "function": {"name": choice.name}} if choice.mode == "function" else choice.mode
            )
        if s.logprobs:
            body["logprobs"] = True
            if s.top_logprobs:
                body["top_logprobs"] = s.top_logprobs
    else:
        body["prompt"] = request.prompt
        if s.logprobs:
            body["logprobs"] = s.top_logprobs
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    fmt = request.response_format
    if fmt is not None:
        if fmt.type == "json_object":
            body["response_format"] = {"type": "json_object"}
        else:
            spec = {k: v for k, v in msgspec.structs.asdict(fmt).items() if k != "type" and v is not None}
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
    if s.max_tokens is not None:
        body["max_tokens"] = s.max_tokens
    if s.n != 1:
        body["n"] = s.n
    if s.temperature != 1.0:
        body["temperature"] = s.temperature
    if s.top_p != 1.0:
        body["top_p"] = s.top_p
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.presence_penalty:
        body["presence_penalty"] = s.presence_penalty
    if s.frequency_penalty:
        body["frequency_penalty"] = s.frequency_penalty
    if s.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in s.logit_bias.items()}
    if s.top_k:
        body["top_k"] = s.top_k
    if s.min_p:
        body["min_p"] = s.min_p
    if s.repetition_penalty != 1.0:
        body["repetition_penalty"] = s.repetition_penalty
    if s.ignore_eos:
        body["ignore_eos"] = True
    if request.user is not None:
        body["user"] = request.user
    return _encoder.encode(body)


def embeddings_body(
    inputs: tuple[str, ...] | tuple[tuple[int, ...], ...], upstream_model: str, dimensions: int | None
) -> bytes:
    """Texts, or lists of token ids, as the upstream's ``input``."""
    body: dict[str, Any] = {"model": upstream_model, "input": list(inputs), "encoding_format": "float"}
    if dimensions is not None:
        body["dimensions"] = dimensions
    return _encoder.encode(body)


# ---------------------------------------------------------------------------------------------
# errors


def _error_fields(content: bytes) -> tuple[str, str | None, str | None, str | None]:
    try:
        envelope = msgspec.json.decode(content, type=_ErrorEnvelope)
    except msgspec.DecodeError:
        text = content.decode("utf-8", "replace").strip()
        return (text[:500] or "no error message"), None, None, None
    error = envelope.error
    if isinstance(error, _ErrorBody):
        code = None if error.code is None else str(error.code)
        return error.message or "no error message", error.type, error.param, code
    return (error or envelope.message or "no error message"), None, None, None


def _retry_after(value: str | None) -> float:
    try:
        return max(1.0, float(value)) if value else 1.0
    except ValueError:
        return 1.0  # an HTTP date: not worth parsing for a hint


def transport_error(exc: httpx.HTTPError) -> TaxiwayError:
    """httpx's failure to reach the upstream or read its answer → 504 for a timeout, else 502."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeoutError(f"the upstream did not answer in time ({type(exc).__name__})")
    return UpstreamError(f"cannot reach the upstream: {type(exc).__name__}: {exc}")


def status_error(status: int, content: bytes, retry_after: str | None) -> TaxiwayError:
    """An upstream's error status → the error our client sees.

    4xx pass on with their status and message (429 keeps Retry-After); 401/403 mean the gateway's
    own upstream credentials are wrong, which is our failure (502), not the client's. 503 stays 503,
    504 becomes our timeout, any other 5xx is a bad gateway.
    """
    message, error_type, param, code = _error_fields(content)
    if status == 429:
        return RateLimitError(message, retry_after=_retry_after(retry_after))
    if status in (401, 403, 407):
        return UpstreamError(f"the upstream rejected the gateway's credentials ({status}): {message}")
    if 400 <= status < 500:
        return UpstreamStatusError(
            message, status_code=status, error_type=error_type or "invalid_request_error", param=param, code=code
        )
    if status == 503:
        headers = {"Retry-After": retry_after} if retry_after else None
        return ServiceUnavailableError(f"the upstream is unavailable: {message}", headers=headers)
    if status == 504:
        return UpstreamTimeoutError(f"the upstream timed out: {message}")
    return UpstreamError(f"the upstream failed ({status}): {message}")
