"""The stable model interface between the gateway and every backend.

Backends never see HTTP types. The gateway turns an OpenAI request into a ``GenerationRequest``,
checks it against the backend's ``Capabilities`` (anything unsupported is a 400 naming the
parameter), then iterates ``Backend.generate``. Closing that async iterator (``aclose()``, which
the gateway does when the client goes away) must stop the backend's work for the request.

This module is the contract third-party backends build against: change it only compatibly.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from typing import ClassVar, Literal

import msgspec

FinishReason = Literal["stop", "length", "abort", "error", "tool_calls"]


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A function call the assistant made: ``arguments`` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    content: str = ""
    name: str | None = None
    #: an assistant message's calls; a ``tool`` message's answer names the call it answers
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


class StructuredOutput(msgspec.Struct, frozen=True, kw_only=True):
    """Constrained decoding: the output must be JSON valid against ``json_schema`` (the schema's
    JSON text). With ``wrap``, the output is such values each written ``wrap[0] + value + wrap[1]``
    (tool calls), one of them, or one or more joined by a newline when ``multiple``. ``param``
    names the request field the schema came from, for the 400 a schema the backend cannot
    enforce gets."""

    json_schema: str
    param: str = "response_format"
    wrap: tuple[str, str] | None = None
    multiple: bool = False


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """Decoding parameters. Defaults mean "off" so the gateway can tell what a request asked for."""

    max_tokens: int | None = None  # None: up to the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = msgspec.field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0  # alternatives per position; needs logprobs
    n: int = 1
    ignore_eos: bool = False
    #: constrained decoding (``response_format``, forced tool calls); None: free text
    structured: StructuredOutput | None = None


# Parameter names (as clients spell them) mapped to a predicate "was it asked for".
# The gateway rejects any asked-for name missing from ``Capabilities.sampling_params``.
SAMPLING_PARAM_NAMES: tuple[str, ...] = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "n",
)


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    """``response_format``: ``json_object``, or ``json_schema`` with its ``name``, ``schema`` and ``strict``."""

    type: Literal["json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, object] | None = None
    strict: bool | None = None
    description: str | None = None


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    """A function the model may call; ``parameters`` is its arguments' JSON schema."""

    name: str
    description: str | None = None
    parameters: dict[str, object] | None = None
    strict: bool | None = None


class ToolChoice(msgspec.Struct, frozen=True, kw_only=True):
    """``tool_choice``: ``none``, ``auto``, ``required``, or ``function`` naming ``name``."""

    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None


class GenerationRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One normalised request. Exactly one of ``messages`` (chat) or ``prompt`` (completion) is set."""

    request_id: str
    model: str  # the public model name the client used (after alias resolution)
    messages: tuple[ChatMessage, ...] | None = None
    prompt: str | None = None
    sampling: SamplingParams = SamplingParams()
    user: str | None = None
    #: The client streams the response. A hint only: the stream contract is the same either way,
    #: but a proxy may ask its upstream for one whole response when the client does not stream.
    stream: bool = False
    #: The LoRA adapter the client chose by naming it as the model (one of ``Backend.adapters()``
    #: of the backend ``model`` names), None for the base model.
    adapter: str | None = None
    #: structured output and tools as the client asked (a proxy passes them on; the engine
    #: enforces ``sampling.structured``, built from them by the gateway)
    response_format: ResponseFormat | None = None
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True


class TopLogprob(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens served from a prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ToolCallDelta(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of the ``index``-th tool call of a choice: its first piece has ``id`` and
    ``name``; the ``arguments`` of its pieces, joined, are the call's JSON arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class Delta(msgspec.Struct, frozen=True, kw_only=True):
    """An increment of one choice. ``finish_reason`` set means that choice is complete.

    ``text`` is always whole UTF-8 characters; stop strings are already cut from it.
    """

    index: int = 0
    text: str = ""
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()


# A backend's stream: deltas for each choice in any interleaving, then exactly one ``Usage`` last.
StreamItem = Delta | Usage


class EmbeddingRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One normalised embeddings request: ``inputs`` (texts), or ``token_ids`` when the client sent
    token ids (only to backends whose ``Capabilities.embedding_token_ids`` is set; ``inputs`` is
    then empty). Never empty, no empty input, at most ``Capabilities.max_embedding_inputs``."""

    request_id: str
    model: str
    inputs: tuple[str, ...]
    dimensions: int | None = None
    user: str | None = None
    token_ids: tuple[tuple[int, ...], ...] = ()


class EmbeddingResult(msgspec.Struct, frozen=True, kw_only=True):
    embeddings: tuple[tuple[float, ...], ...]
    prompt_tokens: int


class ScoreRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Text pairs to score (``/v1/score``, ``/v1/rerank``): a cross-encoder reads each pair as one
    input; an embedding model scores the cosine of the two texts' vectors. Never empty, at most
    ``Capabilities.max_embedding_inputs`` pairs, no empty text."""

    request_id: str
    model: str
    pairs: tuple[tuple[str, str], ...]
    user: str | None = None


class ScoreResult(msgspec.Struct, frozen=True, kw_only=True):
    scores: tuple[float, ...]  # one per pair, in order
    prompt_tokens: int


class ClassifyRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Texts for a sequence-classification model (``/v1/classify``)."""

    request_id: str
    model: str
    inputs: tuple[str, ...]
    user: str | None = None


class ClassifyResult(msgspec.Struct, frozen=True, kw_only=True):
    labels: tuple[str, ...]  # the model's, in the order of each row of ``probs``
    probs: tuple[tuple[float, ...], ...]  # one row per input
    prompt_tokens: int


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What a backend instance can do. Checked by the gateway before ``generate``."""

    chat: bool = True
    completions: bool = True
    embeddings: bool = False
    #: embeddings: inputs per request; the model's vector size (None: unknown, e.g. a proxy); whether
    #: it was trained for shorter vectors (``dimensions`` below it: truncated, renormalised); token-id inputs
    max_embedding_inputs: int = 2048
    embedding_dimensions: int | None = None
    embedding_matryoshka: bool = False
    embedding_token_ids: bool = False
    #: text pairs scored (``/v1/score``, ``/v1/rerank``); texts classified (``/v1/classify``)
    score: bool = False
    classify: bool = False
    sampling_params: frozenset[str] = frozenset(SAMPLING_PARAM_NAMES)
    #: ``response_format`` json_object / json_schema; ``tools`` (function calling)
    structured_output: bool = False
    tools: bool = False
    max_n: int = 1
    max_top_logprobs: int = 0


ModelState = Literal["ready", "not ready", "failed"]


class ReadyState(msgspec.Struct, frozen=True, kw_only=True):
    """Whether a model serves now (``Backend.ready``).

    Not ready, ``detail`` says what it waits for ("loading"). ``failed``: it never will in this
    process, because its start failed (no torch, no model file, a corrupt file): ``detail`` says
    why, and the backend answers its requests with a 503 naming that reason.
    """

    ready: bool
    detail: str = ""
    failed: bool = False

    @property
    def state(self) -> ModelState:
        """As ``/ready`` and ``/v1/models/{model}/stats`` report it."""
        return "ready" if self.ready else "failed" if self.failed else "not ready"


class Backend(abc.ABC):
    """A configured model served by some backend implementation.

    One instance per ``[[models]]`` entry. Construction must be cheap and must validate options
    (raise ``gateway.errors.ConfigError`` naming the option); heavy work (loading weights,
    opening connection pools) belongs in ``start``.
    """

    #: Struct type the model entry's ``options`` table is converted into (msgspec.convert).
    Options: ClassVar[type[msgspec.Struct]]

    def __init__(self, model_name: str, options: msgspec.Struct) -> None:
        self.model_name = model_name
        self.options = options

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities:
        """What this instance supports (may depend on the loaded model, e.g. a chat template).

        A backend that cannot tell yet, or never will (its model failed to load), raises
        ``ServiceUnavailableError`` (503) saying why.
        """

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources. Called in the app's lifespan before serving, when a reload adds
        the model, and by ``POST /admin/models/{name}/load`` after a ``stop``."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Release resources: at shutdown, when a reload retires the instance, on
        ``POST /admin/models/{name}/unload``. No request is in flight. Must not raise."""

    def memory_bytes(self) -> int | None:
        """Memory this instance holds (weights, caches), for ``GET /admin/models``; None if unknown."""
        return None

    def ready(self) -> ReadyState:
        """Cheap and non-blocking: ``/ready`` and the stats route call it per request."""
        return ReadyState(ready=True)

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        """Stream deltas for ``request``, then one ``Usage``.

        Raise ``TaxiwayError`` subclasses for failures (before or during the stream). Closing the
        returned iterator early cancels the work.
        """

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        from gateway.errors import InvalidRequestError

        raise InvalidRequestError(
            f"model '{request.model}' does not support embeddings", param="model"
        )

    async def score(self, request: ScoreRequest) -> ScoreResult:
        from gateway.errors import InvalidRequestError

        raise InvalidRequestError(f"model '{request.model}' does not score text pairs", param="model")

    async def classify(self, request: ClassifyRequest) -> ClassifyResult:
        from gateway.errors import InvalidRequestError

        raise InvalidRequestError(f"model '{request.model}' is not a classification model", param="model")

    def stats(self) -> msgspec.Struct | None:
        """Backend statistics served as JSON (engine: running, waiting, KV blocks…), or None."""
        return None

    # -- for the gateway's memory budget and balancing (optional) ---------------------------------

    def memory_required(self) -> int | None:
        """Bytes the model will hold once started (weights, caches…), declared before ``start``
        for the memory budget; cheap (no weights read). None: nothing the budget counts (a proxy),
        or the backend cannot tell. May raise ``ConfigError`` when the model's files are unreadable."""
        return None

    # -- LoRA adapters: models of their own on this backend's base model (optional) ---------------

    #: Whether ``load_adapter`` / ``unload_adapter`` work on this instance.
    accepts_adapters: ClassVar[bool] = False

    def adapters(self) -> tuple[str, ...]:
        """The adapters served now, each a model name of its own (``/v1/models``: ``root`` is this
        model); a request naming one comes here with ``GenerationRequest.adapter`` set. Cheap."""
        return ()

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve the adapter at ``path`` as model ``name`` (``POST /v1/load_lora_adapter``); raise
        ``InvalidRequestError`` naming what is wrong with it."""
        from gateway.errors import InvalidRequestError

        raise InvalidRequestError(f"model '{self.model_name}' does not serve LoRA adapters", param="lora_name")

    async def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name``: new requests for it get a 404; requests in flight finish."""
        from gateway.errors import NotFoundError

        raise NotFoundError(f"model '{self.model_name}' serves no adapter '{name}'", param="lora_name")

    def cooling_down_until(self) -> float | None:
        """While a deployment cools down after a failure: the ``time.monotonic()`` instant it
        will be tried again (a balancer prefers others until then); None when it is not."""
        return None
