"""Backend ``encoder``: embedding models (BERT-family encoders) on the in-repo engine.

``start`` loads the model in the background (pulling a catalogue model on first use, unpacking a
``model.zip``), embeds one warm-up input, then starts the step thread (``engine.py``); only then is
the model ready. A failed load leaves the model ``failed`` with its reason, like the ``engine``
backend's. ``embed`` tokenizes off the event loop, checks each input's length (a 400 naming the
input, or cut to the model's length with ``truncate = true``) and awaits the batched forward.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import structlog

from gateway.errors import ConfigError, ContextLengthExceededError, InvalidRequestError, ServiceUnavailableError
from gateway.interface import (
    Backend,
    Capabilities,
    ClassifyRequest,
    ClassifyResult,
    EmbeddingRequest,
    EmbeddingResult,
    ReadyState,
    ScoreRequest,
    ScoreResult,
)

log = structlog.get_logger(__name__)

Positive = Annotated[int, msgspec.Meta(gt=0)]

#: inputs tokenized on the event loop itself, when short; more go to a worker thread (a few µs
#: each, but a 2,048-input request would hold the loop for tens of milliseconds, and one 3.9 MB
#: input for seconds)
_INLINE_TOKENIZE = 4
_INLINE_TOKENIZE_CHARS = 4096


class EncoderOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``options`` table of a model served by the ``encoder`` backend."""

    model: str = "all-minilm-l6-v2"  # catalogue name, model directory or .zip of one
    quantization: Literal["none", "int8"] = "none"  # int8: linear weights int8 (quant.py)
    # the layers' matmuls and attention (model.py); auto: bfloat16 where the CPU has it natively
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    truncate: bool = False  # cut inputs over the model's length instead of a 400
    max_inputs: Positive = 2048  # inputs per request (OpenAI's limit)
    max_batch_tokens: Positive = 4096  # padded token slots per step
    max_batch_size: Positive = 256  # inputs per step
    matryoshka: bool = False  # trained for shorter vectors: `dimensions` truncates and renormalises
    home: str | None = None  # model cache; default $TAXIWAY_HOME or ~/.cache/taxiway


class EncoderStats(msgspec.Struct, frozen=True, kw_only=True):
    waiting: int
    steps: int
    inputs: int
    quantization: str
    max_length: int
    dimensions: int


class EncoderBackend(Backend):
    Options = EncoderOptions

    def __init__(self, model_name: str, options: EncoderOptions) -> None:  # type: ignore[override]
        super().__init__(model_name, options)
        self.options: EncoderOptions = options
        self._model: Any = None  # runtime.EncoderModel
        self._engine: Any = None  # engine.EncoderEngine
        self._state = "not started"
        self._failure: str | None = None
        self._capabilities: Capabilities | None = None
        self._loading: asyncio.Task[None] | None = None

    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            raise self._unavailable()
        return self._capabilities

    # -- lifetime

    async def start(self) -> None:
        if (self._loading is not None and not self._loading.done()) or self._engine is not None:
            return
        self._failure = None
        self._state = "loading"
        self._loading = asyncio.create_task(self._start())

    async def _start(self) -> None:
        try:
            from backends.engine.async_engine import freeze_loaded_objects, run_in_own_thread
            from backends.engine.encoder.engine import EncoderEngine

            model = await run_in_own_thread(self._load, name="taxiway-encoder-load")
            engine = EncoderEngine(
                model, max_batch_tokens=self.options.max_batch_tokens, max_batch_size=self.options.max_batch_size
            )
            engine.start()
        except Exception as exc:  # noqa: BLE001 - whatever it is, the model reports it and stays failed
            self._failure = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            log.error("encoder.load_failed", model=self.model_name, error=self._failure,
                      exc_info=None if isinstance(exc, (ConfigError, ImportError)) else exc)  # fmt: skip
            return
        self._model, self._engine = model, engine
        self._capabilities = Capabilities(
            chat=False,
            completions=False,
            embeddings=model.head is None,  # a classifier's outputs are logits, not vectors
            score=model.head is None or len(model.labels) == 1,  # an embedding model or a cross-encoder
            classify=model.head is not None,
            sampling_params=frozenset(),
            max_embedding_inputs=self.options.max_inputs,
            embedding_dimensions=model.dimensions,
            embedding_matryoshka=self.options.matryoshka,
            embedding_token_ids=True,
        )
        self._state = "ready"
        freeze_loaded_objects()
        log.info("encoder.ready", model=self.model_name, quantization=model.quantization, dtype=model.dtype,
                 max_length=model.max_length)  # fmt: skip

    def _load(self) -> Any:
        from backends.engine.encoder.loader import load_encoder

        model = load_encoder(
            self.model_path(progress=False), quantization=self.options.quantization, dtype=self.options.dtype
        )
        model.embed([model.tokenize(["Hello"])[0]])  # warm-up: the first forward allocates
        return model

    def model_path(self, progress: bool = False) -> Path:
        """The model's directory or ``.zip``: a path as given, else the catalogue's (pulled on first use)."""
        from backends.engine.builder import model_home
        from backends.engine.catalogue import pull

        path = Path(self.options.model).expanduser()
        if path.exists():
            return path
        return pull(self.options.model, home=model_home(self.options), progress=progress)  # type: ignore[arg-type]

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            await asyncio.wait([self._loading])
        self._loading = None
        loaded = self._engine is not None
        if self._engine is not None:
            await asyncio.to_thread(self._engine.stop)
        self._engine = self._model = self._capabilities = None
        if loaded:
            from backends.engine.async_engine import collect_after_unload

            collect_after_unload()
        if self._failure is None:
            self._state = "unloaded"

    def ready(self) -> ReadyState:
        if self._failure is not None:
            return ReadyState(ready=False, failed=True, detail=self._failure)
        if self._engine is not None:
            return ReadyState(ready=True)
        return ReadyState(ready=False, detail=self._state)

    def memory_bytes(self) -> int | None:
        return 0 if self._model is None else int(self._model.nbytes)

    def stats(self) -> EncoderStats | None:
        if self._engine is None:
            return None
        m = self._model
        return EncoderStats(
            waiting=self._engine.num_waiting, steps=self._engine.num_steps, inputs=self._engine.num_inputs,
            quantization=m.quantization, max_length=m.max_length, dimensions=m.dimensions,
        )  # fmt: skip

    # -- requests

    def generate(self, request: Any) -> Any:
        raise InvalidRequestError(f"model '{self.model_name}' is an embedding model", param="model")

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        engine, model = self._engine, self._model
        if engine is None:
            raise self._unavailable()
        if request.token_ids:
            inputs = [model.wrap(_checked_ids(i, ids, model.config.vocab_size)) for i, ids in enumerate(request.token_ids)]
        elif len(request.inputs) <= _INLINE_TOKENIZE and sum(map(len, request.inputs)) <= _INLINE_TOKENIZE_CHARS:
            inputs = model.tokenize(request.inputs)
        else:
            inputs = await asyncio.to_thread(model.tokenize, request.inputs)
        inputs = [self._fit(i, ids, model) for i, ids in enumerate(inputs)]
        vectors = await engine.embed(inputs)  # [N, dimensions]
        if request.dimensions is not None and request.dimensions < vectors.shape[1]:
            vectors = _shorten(vectors, request.dimensions)
        return EmbeddingResult(
            embeddings=tuple(map(tuple, vectors.tolist())), prompt_tokens=sum(len(ids) for ids in inputs)
        )

    async def score(self, request: ScoreRequest) -> ScoreResult:
        """A cross-encoder: each pair as one input, ``sigmoid(logit)`` (sentence-transformers'
        ``CrossEncoder`` for one label). An embedding model: the cosine of the two texts' vectors,
        each distinct text embedded once."""
        import torch
        import torch.nn.functional as F

        engine, model = self._engine, self._model
        if engine is None:
            raise self._unavailable()
        if model.head is not None:
            ids, seconds = await asyncio.to_thread(model.tokenize_pairs, request.pairs, truncate=self.options.truncate)
            for i, pair_ids in enumerate(ids):
                self._check_pair_length(i, len(pair_ids), model)
            logits = await engine.embed(ids, seconds)  # [N, 1]
            scores = torch.sigmoid(logits[:, 0])
            return ScoreResult(scores=tuple(scores.tolist()), prompt_tokens=sum(map(len, ids)))
        texts = list(dict.fromkeys(t for pair in request.pairs for t in pair))  # distinct, in order
        inputs = await asyncio.to_thread(model.tokenize, texts)
        row = {text: i for i, text in enumerate(texts)}
        if not self.options.truncate:
            for i, pair in enumerate(request.pairs):
                self._check_pair_length(i, max(len(inputs[row[t]]) for t in pair), model)
        inputs = [model.truncate(ids) for ids in inputs]
        vectors = F.normalize(await engine.embed(inputs), dim=1)
        a = vectors[[row[x] for x, _ in request.pairs]]
        b = vectors[[row[y] for _, y in request.pairs]]
        return ScoreResult(scores=tuple((a * b).sum(1).tolist()), prompt_tokens=sum(map(len, inputs)))

    async def classify(self, request: ClassifyRequest) -> ClassifyResult:
        engine, model = self._engine, self._model
        if engine is None:
            raise self._unavailable()
        import torch

        inputs = [self._fit(i, ids, model) for i, ids in enumerate(await asyncio.to_thread(model.tokenize, request.inputs))]
        probs = torch.softmax(await engine.embed(inputs), dim=1)
        return ClassifyResult(
            labels=model.labels, probs=tuple(map(tuple, probs.tolist())), prompt_tokens=sum(map(len, inputs))
        )

    def _check_pair_length(self, index: int, length: int, model: Any) -> None:
        if length > model.max_length:
            raise ContextLengthExceededError(
                f"text pair {index} (the query with documents[{index}], or text_1 with text_2 item {index}) has "
                f"{length} tokens{' in one text' if model.head is None else ''}, "
                f"over this model's maximum of {model.max_length} "
                f"(special tokens included); shorten it, or serve the model with truncate = true",
                param=None,  # a pair: documents[i], or the i-th of text_1 / text_2
            )

    def _fit(self, index: int, ids: list[int], model: Any) -> list[int]:
        if len(ids) <= model.max_length:
            return ids
        if self.options.truncate:
            return model.truncate(ids)
        raise ContextLengthExceededError(
            f"input[{index}] has {'at least ' if getattr(ids, 'at_least', False) else ''}{len(ids)} tokens, "
            f"over this model's maximum of {model.max_length} "
            f"(special tokens included); shorten it, or serve the model with truncate = true",
            param="input",
        )

    def _unavailable(self) -> ServiceUnavailableError:
        if self._failure is not None:
            return ServiceUnavailableError(f"model '{self.model_name}' cannot serve: {self._failure}")
        return ServiceUnavailableError(f"model '{self.model_name}' is not ready ({self._state})")


def _checked_ids(index: int, ids: tuple[int, ...], vocab_size: int) -> tuple[int, ...]:
    if max(ids) >= vocab_size:
        raise InvalidRequestError(
            f"input[{index}] has token id {max(ids)}, outside this model's vocabulary of {vocab_size}", param="input"
        )
    return ids


def _shorten(vectors: Any, dimensions: int) -> Any:
    """Matryoshka: the first ``dimensions`` components, renormalised."""
    import torch.nn.functional as F

    return F.normalize(vectors[:, :dimensions], p=2.0, dim=1)
