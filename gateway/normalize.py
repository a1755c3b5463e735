"""Request bodies → ``GenerationRequest`` / ``EmbeddingRequest``, validated.

Every rejection is an ``InvalidRequestError`` (400) whose ``param`` names the offending field as
the client spelled it; anything the serving backend cannot do is an ``UnsupportedParameterError``.
Nothing a client asked for is silently dropped.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from gateway import tools as tool_fields
from gateway import wire
from gateway.config import split_validation_error
from gateway.errors import InvalidRequestError, UnsupportedParameterError
from gateway.interface import (
    SAMPLING_PARAM_NAMES,
    Capabilities,
    ChatMessage,
    EmbeddingRequest,
    GenerationRequest,
    SamplingParams,
    ToolCall,
)
from gateway.nesting import TooDeep, check_depth

T = TypeVar("T")

_ROLES = frozenset(("system", "user", "assistant", "developer", "tool"))
_DEFAULTS = SamplingParams()
_MAX_N = 128
_MAX_TOP_LOGPROBS = 20


def decode(body: bytes, decoder: msgspec.json.Decoder[T]) -> T:
    """Decode a JSON body into a wire Struct. Every way a body can be wrong is a 400 naming the
    field (a wrong type or value at any depth, a number out of range, nesting past
    ``MAX_JSON_DEPTH``) or the byte (malformed JSON, invalid UTF-8)."""
    if not body:
        raise InvalidRequestError("The request body is empty; expected a JSON object")
    try:
        check_depth(body)
        return decoder.decode(body)
    except TooDeep as exc:
        raise InvalidRequestError(str(exc), param=exc.field or None, code="json_too_deep") from None
    except msgspec.ValidationError as exc:
        message, param = split_validation_error(str(exc))
        if message == "required key is missing":
            message = f"Missing required parameter: '{param}'"
        elif param:
            kind = "type" if message.startswith("Expected `") and "`," in message else "value"
            message = f"Invalid {kind} for '{param}': {message}"
        raise InvalidRequestError(message, param=param or None) from None
    except msgspec.DecodeError as exc:
        message = str(exc)
        if message.startswith("Invalid UTF-8"):
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as bad:
                message = f"invalid UTF-8 at byte {bad.start}"
        raise InvalidRequestError(f"The request body is not valid JSON: {message}") from None
    except RecursionError:  # past the depth check: the server's own stack was already deep
        raise InvalidRequestError("The request body nests too deeply to decode", code="json_too_deep") from None


# ---------------------------------------------------------------------------------------------
# chat and completions


def chat_request(req: wire.ChatCompletionRequest, *, request_id: str, model: str, caps: Capabilities) -> GenerationRequest:
    if not caps.chat:
        raise UnsupportedParameterError(f"The model '{model}' does not support chat completions", param="model")
    _reject_chat_extras(req)
    if not req.messages:
        raise InvalidRequestError("'messages' must contain at least one message", param="messages")
    messages = tuple(_message(m, i) for i, m in enumerate(req.messages))
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequestError("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    sampling = _sampling(
        req,
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
        top_logprobs_param="top_logprobs",
    )
    _check_capabilities(sampling, caps, top_logprobs_param="top_logprobs")
    fmt = tool_fields.response_format(req.response_format, caps)
    declared = tool_fields.tools(req.tools, caps)
    choice = tool_fields.tool_choice(req.tool_choice, declared)
    parallel = True if req.parallel_tool_calls is None else req.parallel_tool_calls
    structured = tool_fields.tool_constraint(declared, choice, parallel=parallel)
    if structured is not None and fmt is not None:
        raise InvalidRequestError(
            "'response_format' cannot be combined with a 'tool_choice' that forces a call", param="response_format"
        )
    if fmt is not None:
        structured = tool_fields.format_constraint(fmt)
    if structured is not None:
        sampling = msgspec.structs.replace(sampling, structured=structured)
    return GenerationRequest(
        request_id=request_id, model=model, messages=messages, sampling=sampling, user=req.user, stream=req.stream,
        response_format=fmt, tools=declared, tool_choice=choice, parallel_tool_calls=parallel,
    )  # fmt: skip


def completion_request(
    req: wire.CompletionRequest, *, request_id: str, model: str, caps: Capabilities
) -> GenerationRequest:
    if not caps.completions:
        raise UnsupportedParameterError(f"The model '{model}' does not support completions", param="model")
    if req.echo:
        raise UnsupportedParameterError("'echo' is not supported", param="echo")
    if req.suffix:
        raise UnsupportedParameterError("'suffix' is not supported", param="suffix")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise UnsupportedParameterError("'best_of' other than 'n' is not supported", param="best_of")
    prompt = _prompt(req.prompt)
    if req.logprobs is not None and not 0 <= req.logprobs <= _MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"'logprobs' must be between 0 and {_MAX_TOP_LOGPROBS}", param="logprobs")
    sampling = _sampling(
        req,
        # OpenAI's legacy completions default to 16 tokens.
        max_tokens=16 if req.max_tokens is None else req.max_tokens,
        max_tokens_param="max_tokens",
        logprobs=req.logprobs is not None,
        top_logprobs=req.logprobs or 0,
        top_logprobs_param="logprobs",
    )
    _check_capabilities(sampling, caps, top_logprobs_param="logprobs")
    fmt = tool_fields.response_format(req.response_format, caps)
    if fmt is not None:
        sampling = msgspec.structs.replace(sampling, structured=tool_fields.format_constraint(fmt))
    return GenerationRequest(
        request_id=request_id, model=model, prompt=prompt, sampling=sampling, user=req.user, stream=req.stream,
        response_format=fmt,
    )  # fmt: skip


def _reject_chat_extras(req: wire.ChatCompletionRequest) -> None:
    if req.functions:
        raise UnsupportedParameterError("'functions' (function calling) is not supported", param="functions")
    if req.function_call not in (None, "none", "auto"):
        raise UnsupportedParameterError("'function_call' is not supported", param="function_call")
    if req.audio is not None:
        raise UnsupportedParameterError("'audio' output is not supported", param="audio")
    if req.modalities is not None and req.modalities != ["text"]:
        raise UnsupportedParameterError("only the 'text' modality is supported", param="modalities")
    if req.prediction is not None:
        raise UnsupportedParameterError("'prediction' is not supported", param="prediction")
    if req.web_search_options is not None:
        raise UnsupportedParameterError("'web_search_options' is not supported", param="web_search_options")


def _message(m: wire.Message, i: int) -> ChatMessage:
    if m.role not in _ROLES:
        if m.role == "function":
            raise UnsupportedParameterError(
                "messages with role 'function' are not supported; use 'tool'", param=f"messages[{i}].role"
            )
        raise InvalidRequestError(
            f"Invalid role '{m.role}'; expected one of 'system', 'user', 'assistant', 'developer', 'tool'",
            param=f"messages[{i}].role",
        )
    if m.function_call:
        raise UnsupportedParameterError(
            "'function_call' in messages is not supported; use 'tool_calls'", param=f"messages[{i}].function_call"
        )
    calls: tuple[ToolCall, ...] = ()
    if m.tool_calls is not None:
        if m.role != "assistant":
            raise InvalidRequestError("only assistant messages have 'tool_calls'", param=f"messages[{i}].tool_calls")
        calls = tool_fields.message_tool_calls(m.tool_calls, f"messages[{i}]")
    if m.role == "tool" and not isinstance(m.tool_call_id, str):
        raise InvalidRequestError(
            "a message with role 'tool' needs the 'tool_call_id' it answers", param=f"messages[{i}].tool_call_id"
        )
    if m.audio is not None:
        raise UnsupportedParameterError("audio in messages is not supported", param=f"messages[{i}].audio")
    content = m.content
    if content is None:
        if m.role != "assistant":
            raise InvalidRequestError("'content' is required", param=f"messages[{i}].content")
        content = ""
    elif not isinstance(content, str):
        texts = []
        for part in content:
            if part.type != "text" or not isinstance(part.text, str):
                raise UnsupportedParameterError(
                    f"content parts of type '{part.type}' are not supported; only 'text'",
                    param=f"messages[{i}].content",
                )
            texts.append(part.text)
        content = "".join(texts)
    tool_call_id = m.tool_call_id if m.role == "tool" else None
    return ChatMessage(role=m.role, content=content, name=m.name, tool_calls=calls, tool_call_id=tool_call_id)


def _prompt(prompt: str | list[Any]) -> str:
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    if prompt and all(isinstance(p, str) for p in prompt):
        raise UnsupportedParameterError("only one prompt per request is supported", param="prompt")
    raise UnsupportedParameterError("token-id prompts are not supported; send text", param="prompt")


def _sampling(
    req: wire._SamplingFields,
    *,
    max_tokens: int | None,
    max_tokens_param: str,
    logprobs: bool,
    top_logprobs: int,
    top_logprobs_param: str,
) -> SamplingParams:
    if max_tokens is not None and max_tokens < 1:
        raise InvalidRequestError(f"'{max_tokens_param}' must be at least 1", param=max_tokens_param)
    _in_range(req.temperature, "temperature", 0.0, 2.0)
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise InvalidRequestError("'top_p' must be greater than 0 and at most 1", param="top_p")
    n = 1 if req.n is None else req.n
    if not 1 <= n <= _MAX_N:
        raise InvalidRequestError(f"'n' must be between 1 and {_MAX_N}", param="n")
    _in_range(req.presence_penalty, "presence_penalty", -2.0, 2.0)
    _in_range(req.frequency_penalty, "frequency_penalty", -2.0, 2.0)
    _in_range(req.min_p, "min_p", 0.0, 1.0)
    if not 0 <= top_logprobs <= _MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            f"'{top_logprobs_param}' must be between 0 and {_MAX_TOP_LOGPROBS}", param=top_logprobs_param
        )
    if req.top_k is not None and req.top_k < -1:
        raise InvalidRequestError("'top_k' must be -1 or 0 (off) or positive", param="top_k")
    if req.repetition_penalty is not None and req.repetition_penalty <= 0.0:
        raise InvalidRequestError("'repetition_penalty' must be positive", param="repetition_penalty")
    stop: tuple[str, ...] = ()
    if isinstance(req.stop, str):
        stop = (req.stop,) if req.stop else ()
    elif req.stop:
        stop = tuple(s for s in req.stop if s)
    fields: dict[str, Any] = {"n": n, "stop": stop, "logprobs": logprobs, "top_logprobs": top_logprobs}
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "min_p",
                 "repetition_penalty", "ignore_eos"):  # fmt: skip
        value = getattr(req, name)
        if value is not None:
            fields[name] = value
    if req.top_k is not None:
        fields["top_k"] = max(0, req.top_k)
    if req.logit_bias:
        fields["logit_bias"] = _logit_bias(req.logit_bias)
    return SamplingParams(**fields)


def _in_range(value: float | None, name: str, low: float, high: float) -> None:
    if value is not None and not low <= value <= high:
        raise InvalidRequestError(f"'{name}' must be between {low:g} and {high:g}", param=name)


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidRequestError(f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias") from None
        if not -100.0 <= value <= 100.0:
            raise InvalidRequestError("'logit_bias' values must be between -100 and 100", param="logit_bias")
        out[token] = value
    return out


def _check_capabilities(sampling: SamplingParams, caps: Capabilities, *, top_logprobs_param: str) -> None:
    supported = caps.sampling_params
    for name in SAMPLING_PARAM_NAMES:
        if name not in supported and getattr(sampling, name) != getattr(_DEFAULTS, name):
            param = top_logprobs_param if name in ("logprobs", "top_logprobs") else name
            raise UnsupportedParameterError(f"'{param}' is not supported by this model", param=param)
    if sampling.n > caps.max_n:
        raise UnsupportedParameterError(f"'n' must be at most {caps.max_n} for this model", param="n")
    if sampling.top_logprobs > caps.max_top_logprobs:
        raise UnsupportedParameterError(
            f"'{top_logprobs_param}' must be at most {caps.max_top_logprobs} for this model", param=top_logprobs_param
        )


# ---------------------------------------------------------------------------------------------
# embeddings


def embedding_request(
    req: wire.EmbeddingsRequest, *, request_id: str, model: str, caps: Capabilities
) -> EmbeddingRequest:
    """OpenAI's four ``input`` forms: a string, a list of strings, a list of token ids, a list of
    lists of token ids. Empty inputs, more than the model's ``max_embedding_inputs`` and a
    ``dimensions`` the model cannot give are 400s naming the parameter (and the input's index)."""
    if not caps.embeddings:
        raise UnsupportedParameterError(f"The model '{model}' does not support embeddings", param="model")
    texts, token_ids = _embedding_inputs(req.input)
    num_inputs = len(texts) + len(token_ids)
    if num_inputs > caps.max_embedding_inputs:
        raise InvalidRequestError(
            f"'input' has {num_inputs} items; this model takes at most {caps.max_embedding_inputs} per request",
            param="input",
        )
    if token_ids and not caps.embedding_token_ids:
        raise UnsupportedParameterError(f"The model '{model}' does not take token-id inputs; send text", param="input")
    if req.encoding_format not in (None, "float", "base64"):
        raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    if req.dimensions is not None:
        _check_dimensions(req.dimensions, caps)
    return EmbeddingRequest(
        request_id=request_id, model=model, inputs=texts, token_ids=token_ids, dimensions=req.dimensions, user=req.user
    )


def _embedding_inputs(raw: str | list[Any]) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    if isinstance(raw, str):
        raw = [raw]
    if not raw:
        raise InvalidRequestError("'input' must not be empty", param="input")
    if all(isinstance(x, str) for x in raw):
        for i, text in enumerate(raw):
            if not text:
                raise InvalidRequestError(f"'input[{i}]' is an empty string", param="input")
        return tuple(raw), ()
    if all(_is_token_id(x) for x in raw):
        return (), (tuple(raw),)
    if all(isinstance(x, list) for x in raw):
        for i, ids in enumerate(raw):
            if not ids:
                raise InvalidRequestError(f"'input[{i}]' is an empty list of token ids", param="input")
            if not all(_is_token_id(t) for t in ids):
                raise InvalidRequestError(f"'input[{i}]' must be a list of token ids (integers >= 0)", param="input")
        return (), tuple(tuple(ids) for ids in raw)
    raise InvalidRequestError(
        "'input' must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        param="input",
    )


def _is_token_id(x: object) -> bool:
    return type(x) is int and x >= 0  # JSON true/false decode as bool, a subclass of int


def _check_dimensions(dimensions: int, caps: Capabilities) -> None:
    native = caps.embedding_dimensions
    if dimensions < 1:
        raise InvalidRequestError("'dimensions' must be at least 1", param="dimensions")
    if native is None or dimensions == native:
        return  # a proxy's upstream decides; the model's own size is always fine
    if not caps.embedding_matryoshka:
        raise UnsupportedParameterError(
            f"'dimensions' is not supported by this model: its embeddings have {native} dimensions "
            "and it was not trained for shorter ones",
            param="dimensions",
        )
    if dimensions > native:
        raise InvalidRequestError(f"'dimensions' must be at most {native} for this model", param="dimensions")
