"""``OpenAIBackend``: a model served by an OpenAI-compatible upstream over a pooled httpx client,
with connect retries and a cooldown after failures (``health``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Literal

import httpx
import msgspec
import structlog

from gateway.errors import ConfigError, ServiceUnavailableError, TaxiwayError, UnsupportedParameterError
from gateway.interface import (
    SAMPLING_PARAM_NAMES,
    Backend,
    Capabilities,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    ReadyState,
    StreamItem,
)

from backends.openai import upstream
from backends.openai.health import Cooldown, UpstreamStats, retry_delays
from backends.openai.sse import iter_sse_data
from backends.openai.transport import LeanTransport

log = structlog.get_logger(__name__)

_STANDARD_PARAMS = frozenset(SAMPLING_PARAM_NAMES) - set(upstream.EXTENSION_PARAMS)


class Options(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    base_url: str  # e.g. "http://127.0.0.1:8101/v1"
    api_key: str | None = None
    upstream_model: str | None = None  # the upstream's name for the model; default: the public name
    timeout_s: float = 600.0  # longest wait for the upstream's next bytes
    connect_timeout_s: float = 5.0
    max_connections: int = 100
    headers: dict[str, str] = {}
    #: the upstream accepts vLLM/llama.cpp's top_k, min_p, repetition_penalty and ignore_eos
    sampling_extensions: bool = False
    embeddings: bool = False
    chat: bool = True
    completions: bool = True
    max_n: int = 128
    max_top_logprobs: int = 20
    #: the upstream enforces ``response_format`` json_object / json_schema; it does function
    #: calling (``tools``, ``tool_choice``). Off: those requests are 400s naming the field.
    structured_output: bool = False
    tools: bool = False
    #: "lean": the gateway's own keep-alive transport (backends.openai.transport); "httpcore": httpx's
    transport: Literal["lean", "httpcore"] = "lean"
    #: connect errors retried (with backoff 0.1, 0.2, 0.4 … s, at most 2 s); never once a request was sent
    retries: int = 2
    #: after a failure (connect error, 5xx, timeout) refuse requests at once this long, then probe;
    #: 0 (default): off — the gateway's per-entry ``cooldown_s`` already tries a failed deployment
    #: last, and still tries it when it is all there is; this breaker fails those fast instead
    cooldown_s: float = 0.0


class OpenAIBackend(Backend):
    Options = Options

    def __init__(self, model_name: str, options: msgspec.Struct) -> None:
        super().__init__(model_name, options)
        assert isinstance(options, Options)
        self.opts = options
        if not options.base_url.startswith(("http://", "https://")):
            raise ConfigError("must be an http:// or https:// URL", path="base_url")
        for key in ("timeout_s", "connect_timeout_s", "max_connections"):
            if getattr(options, key) <= 0:
                raise ConfigError("must be positive", path=key)
        for key in ("retries", "cooldown_s"):
            if getattr(options, key) < 0:
                raise ConfigError("must not be negative", path=key)
        self._cooldown = Cooldown(model_name, options.cooldown_s)
        self.upstream_model = options.upstream_model or model_name
        params = _STANDARD_PARAMS | (set(upstream.EXTENSION_PARAMS) if options.sampling_extensions else set())
        self._capabilities = Capabilities(
            chat=options.chat,
            completions=options.completions,
            embeddings=options.embeddings,
            embedding_token_ids=options.embeddings,  # passed on as they came
            sampling_params=frozenset(params),
            max_n=options.max_n,
            max_top_logprobs=options.max_top_logprobs,
            structured_output=options.structured_output,
            tools=options.tools,
        )
        self._headers = {"content-type": "application/json", **options.headers}
        if options.api_key:
            self._headers["authorization"] = f"Bearer {options.api_key}"
        self._client: httpx.AsyncClient | None = None
        # Requests are built from parsed-once URLs and header lists: httpx's per-request URL
        # merging is a noticeable share of the gateway's CPU on the hot path.
        base = options.base_url.rstrip("/")
        self._chat_url = httpx.URL(base + "/chat/completions")
        self._completions_url = httpx.URL(base + "/completions")
        self._embeddings_url = httpx.URL(base + "/embeddings")
        self._request_headers = [(k.lower().encode(), v.encode()) for k, v in self._headers.items()]
        #: how its errors name this upstream: the entry and where it points (no path, no credentials)
        url = self._chat_url
        self.upstream_label = f"upstream of '{model_name}' ({url.host}{f':{url.port}' if url.port else ''})"
        self._timeouts = httpx.Timeout(options.timeout_s, connect=options.connect_timeout_s).as_dict()

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def start(self) -> None:
        opts = self.opts
        transport: httpx.AsyncBaseTransport
        if opts.transport == "lean":
            transport = LeanTransport(max_connections=opts.max_connections)
        else:
            limits = httpx.Limits(max_connections=opts.max_connections, max_keepalive_connections=opts.max_connections)
            transport = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
        self._client = httpx.AsyncClient(
            base_url=opts.base_url.rstrip("/"),
            headers=self._headers,
            timeout=httpx.Timeout(opts.timeout_s, connect=opts.connect_timeout_s),
            transport=transport,
            follow_redirects=False,
            trust_env=False,  # never route to an upstream through a proxy from the environment
        )

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def ready(self) -> ReadyState:
        if self._client is None:
            return ReadyState(ready=False, detail="not started")
        if self._cooldown.until is not None:
            return ReadyState(ready=False, detail=f"cooling down after: {self._cooldown.reason}")
        return ReadyState(ready=True)

    def cooling_down_until(self) -> float | None:
        return self._cooldown.until

    def stats(self) -> UpstreamStats:
        return self._cooldown.stats()

    # -----------------------------------------------------------------------------------------

    async def _send(self, url: httpx.URL, body: bytes, request_id: str, *, stream: bool = False) -> httpx.Response:
        """The upstream's answer to a POST of ``body``; an error status raises its mapped error.
        A connect error is retried (``retries``); a 5xx starts the cooldown, any other answer ends it.

        httpx's own failures pass through: the caller maps them with ``_transport_error``
        around everything it reads, a stream's later chunks included.
        """
        if self._client is None:
            raise ServiceUnavailableError(f"the model '{self.model_name}' is not started")
        headers = [*self._request_headers, (b"x-request-id", request_id.encode())]
        request = httpx.Request("POST", url, headers=headers, content=body, extensions={"timeout": self._timeouts})
        probe = self._cooldown.admit()
        try:
            response = await self._send_retrying(request, stream)
        finally:
            self._cooldown.settle(probe)  # a failure is the caller's verdict (_transport_error)
        if response.status_code >= 500:
            self._cooldown.failed(f"status {response.status_code}")
        else:
            self._cooldown.succeeded()
        if response.status_code >= 400:
            try:
                content = await response.aread()
            finally:
                await response.aclose()
            raise upstream.status_error(response.status_code, content, response.headers.get("retry-after"))
        return response

    async def _send_retrying(self, request: httpx.Request, stream: bool) -> httpx.Response:
        """``send``, retrying a failure to connect: nothing reached the upstream, so nothing is
        duplicated. Any later failure passes through."""
        assert self._client is not None
        delays = retry_delays(self.opts.retries)
        while True:
            try:
                return await self._client.send(request, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                delay = next(delays, None)
                if delay is None:
                    raise
                self._cooldown.num_connect_retries += 1
                log.info("upstream.connect_retry", model=self.model_name, delay_s=delay, error=repr(exc))
                await asyncio.sleep(delay)

    def _transport_error(self, exc: httpx.HTTPError) -> TaxiwayError:
        """httpx's failure as our error; the upstream cools down when it could not be reached or
        did not answer in time."""
        error = upstream.transport_error(exc)
        if isinstance(exc, httpx.TransportError):
            self._cooldown.failed(str(error))
        return self._named(error)

    def _named(self, error: TaxiwayError) -> TaxiwayError:
        """A 5xx this upstream caused (a malformed answer, a broken stream, no answer), its message
        naming the upstream: a gateway in front of several must say which one failed."""
        if error.status_code >= 500 and not error.message.startswith("upstream of "):
            error.message = f"{self.upstream_label}: {error.message}"
            error.args = (error.message,)
        return error

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        if request.sampling.ignore_eos and not self.opts.sampling_extensions:
            raise UnsupportedParameterError("'ignore_eos' is not supported by this model", param="ignore_eos")
        url = self._chat_url if request.messages is not None else self._completions_url
        body = upstream.request_body(request, self.upstream_model, stream=request.stream)
        try:
            if not request.stream:
                response = await self._send(url, body, request.request_id)
                whole = upstream.decode_response(response.content)
                for delta in upstream.deltas(whole):
                    yield delta
                yield upstream.usage(whole.usage)
                return
            # Leaving early (the gateway closes us when the client goes away) closes the upstream
            # response, and with it the upstream's connection: the upstream stops generating.
            response = await self._send(url, body, request.request_id, stream=True)
            try:
                usage = None
                async for data in iter_sse_data(response.aiter_bytes()):
                    if data == b"[DONE]":
                        break
                    chunk = upstream.decode_response(data)
                    for delta in upstream.deltas(chunk):
                        yield delta
                    if chunk.usage is not None:
                        usage = chunk.usage
                yield upstream.usage(usage)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        except TaxiwayError as exc:  # a malformed answer or event, an upstream 5xx
            raise self._named(exc) from None

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        inputs = request.token_ids or request.inputs
        body = upstream.embeddings_body(inputs, self.upstream_model, request.dimensions)
        try:
            response = await self._send(self._embeddings_url, body, request.request_id)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        except TaxiwayError as exc:
            raise self._named(exc) from None
        try:
            result = upstream.decode_embeddings(response.content)
        except TaxiwayError as exc:
            raise self._named(exc) from None
        data = sorted(result.data, key=lambda e: e.index)
        prompt_tokens = result.usage.prompt_tokens if result.usage else 0
        return EmbeddingResult(embeddings=tuple(tuple(e.embedding) for e in data), prompt_tokens=prompt_tokens)
