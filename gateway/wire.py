"""OpenAI's HTTP wire format as msgspec Structs: request bodies in, response bodies out.

Request structs declare every field the gateway acts on. Fields that would change the meaning of
a request but that no backend supports (audio, predictions…) are declared too, so
``gateway.normalize`` can reject them by name; anything else unknown is ignored, as OpenAI-compatible
servers commonly do (``parallel_tool_calls``, ``store``, ``metadata``, ``service_tier``…).
"""

from __future__ import annotations

from typing import Any

import msgspec

from gateway.interface import TokenLogprob

# ---------------------------------------------------------------------------------------------
# requests


class ContentPart(msgspec.Struct):
    type: str
    text: Any = None


class Message(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    audio: Any = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _SamplingFields(msgspec.Struct, kw_only=True):
    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    user: str | None = None
    # extensions of vLLM and llama.cpp
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # structured output and tools (gateway.tools decodes them)
    tools: Any = None
    tool_choice: Any = None
    response_format: Any = None
    # rejected unless absent or trivial
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    prompt: str | list[Any]  # text, texts, token ids or lists of token ids
    logprobs: int | None = None
    # rejected unless absent or trivial
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    response_format: Any = None


class EmbeddingsRequest(msgspec.Struct, kw_only=True):
    model: str
    input: str | list[Any]
    dimensions: int | None = None
    encoding_format: str | None = None
    user: str | None = None


class ScoreRequest(msgspec.Struct, kw_only=True):
    """vLLM's ``/v1/score``: ``text_1`` against ``text_2`` — one against one, one against many,
    or two lists of one length pairwise."""

    model: str
    text_1: str | list[str]
    text_2: str | list[str]
    user: str | None = None


class RerankDocument(msgspec.Struct, kw_only=True):
    text: str


class RerankRequest(msgspec.Struct, kw_only=True):
    """The rerank API of Cohere and Jina (and vLLM's, llama.cpp's server's): ``documents`` ordered
    by relevance to ``query``, the ``top_n`` first."""

    model: str
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = None
    return_documents: bool = True
    user: str | None = None


class ClassifyRequest(msgspec.Struct, kw_only=True):
    """vLLM's ``/v1/classify``: each text's label probabilities from a sequence classifier."""

    model: str
    input: str | list[str]
    user: str | None = None


# ---------------------------------------------------------------------------------------------
# responses


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class WireUsage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatLogprobs(msgspec.Struct):
    content: tuple[TokenLogprob, ...]


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text


class WireToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class AssistantMessage(msgspec.Struct):
    content: str | None
    role: str = "assistant"
    tool_calls: list[WireToolCall] | msgspec.UnsetType = msgspec.UNSET  # only when it made calls


class ChunkFunction(msgspec.Struct):
    arguments: str
    name: str | msgspec.UnsetType = msgspec.UNSET


class ChunkToolCall(msgspec.Struct):
    """A piece of a streamed call: the first has ``id``, ``type`` and ``function.name``."""

    index: int
    function: ChunkFunction
    id: str | msgspec.UnsetType = msgspec.UNSET
    type: str | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: WireUsage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class ChunkDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None


class ChatCompletionChunkWithUsage(ChatCompletionChunk):
    """A chunk of a stream with ``stream_options.include_usage``: ``usage`` is null but on the last."""

    usage: WireUsage | None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: WireUsage | None = None
    object: str = "text_completion"
    system_fingerprint: str | None = None


class Embedding(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingsUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(msgspec.Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage
    object: str = "list"


class ScoreData(msgspec.Struct):
    index: int
    score: float
    object: str = "score"


class ScoreResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    data: list[ScoreData]
    usage: EmbeddingsUsage
    object: str = "list"


class RerankResult(msgspec.Struct, omit_defaults=True):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankUsage(msgspec.Struct):
    total_tokens: int


class RerankResponse(msgspec.Struct):
    id: str
    model: str
    results: list[RerankResult]
    usage: RerankUsage


class ClassifyData(msgspec.Struct):
    index: int
    label: str
    probs: list[float]
    num_classes: int
    object: str = "classification"


class ClassifyResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    data: list[ClassifyData]
    usage: EmbeddingsUsage
    object: str = "list"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "taxiway"
    object: str = "model"
    root: str = ""  # the configured model a name resolves to (itself, or the entry an alias names)
    aliases: tuple[str, ...] = ()
    # the API paths it serves once loaded ("/v1/chat/completions", "/v1/embeddings"); empty while unknown
    endpoints: tuple[str, ...] = ()


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody
