"""Backend ``engine``: the in-repo PyTorch engine behind the gateway's model interface.

``start`` loads the model (pulling a catalogue model on first use), runs one warm-up request
through the whole engine, then starts the step thread; only then is the model ready. Prompts are
rendered and tokenized on the event loop (fast, and a prompt that cannot fit is a 400 before
admission); everything else happens on the step thread (``async_engine``).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import structlog

from backends.engine.builder import EngineOptions
from gateway.errors import InvalidRequestError, ServiceUnavailableError
from gateway.interface import (
    Backend,
    Capabilities,
    GenerationRequest,
    ReadyState,
    SamplingParams,
    StreamItem,
)

log = structlog.get_logger(__name__)


class EngineBackend(Backend):
    Options = EngineOptions

    def __init__(self, model_name: str, options: EngineOptions) -> None:  # type: ignore[override]
        super().__init__(model_name, options)
        self.options: EngineOptions = options
        self._engine: Any = None  # LLMEngine, or a tensor-parallel one
        self._template: Any = None  # ChatTemplate
        self._async: Any = None  # AsyncEngine
        self._state = "not started"
        self._loading: asyncio.Task[None] | None = None
        self._ids = itertools.count()  # clients may reuse X-Request-ID; engine ids must be unique

    @property
    def capabilities(self) -> Capabilities:
        from backends.engine.runner.sampling import MAX_TOP_LOGPROBS  # torch: only once a model is served

        # chat stays on without a template: ChatTemplate.render says why it cannot serve (400)
        return Capabilities(
            chat=True,
            completions=True,
            max_n=self.options.max_num_seqs,
            max_top_logprobs=MAX_TOP_LOGPROBS,
        )

    async def start(self) -> None:
        """Check the model can be found, then load it in the background: the gateway serves
        (``/health``, other models) meanwhile, and this model turns ready when loaded and warm."""
        self._check_model_named()
        self._state = "loading"
        self._loading = asyncio.create_task(self._start())

    async def _start(self) -> None:
        from backends.engine.async_engine import AsyncEngine, run_in_own_thread

        try:
            await run_in_own_thread(self._load)  # not a pooled thread: see async_engine
        except Exception as exc:
            self._state = f"failed to load: {exc}"
            log.error("engine.load_failed", model=self.model_name, error=str(exc))
            return

        self._async = AsyncEngine(self._engine, on_step_failure=self._recover)
        self._async.start(asyncio.get_running_loop())
        self._state = "ready"
        log.info("engine.ready", model=self.model_name)

    def _check_model_named(self) -> None:
        from pathlib import Path

        from backends.engine.catalogue import lookup

        if not Path(self.options.model).expanduser().exists():
            lookup(self.options.model)  # ConfigError listing the catalogue names

    def _load(self) -> None:
        if self.options.tensor_parallel > 1:
            from backends.engine.tp.engine import build_tp_engine

            self._engine = build_tp_engine(self.options)
        else:
            from backends.engine.builder import build_engine

            self._engine = build_engine(self.options)
        from backends.engine.text.chat_template import ChatTemplate

        self._template = ChatTemplate.from_tokenizer(self._engine.tokenizer)
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny request through schedule → forward → sample → detokenize."""
        engine = self._engine
        engine.add_request("warm-up", engine.tokenizer.encode("Hello"), SamplingParams(max_tokens=2, temperature=0))
        while engine.has_unfinished():
            engine.step()

    def _recover(self, exc: BaseException) -> bool:
        recover = getattr(self._engine, "recover", None)
        if recover is None:
            return True  # a single-process engine keeps its state; the failed requests are gone
        self._state = f"recovering after: {exc}"
        recover()
        self._state = "ready"
        return True

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            await asyncio.wait([self._loading])  # a load thread cannot be interrupted
        if self._async is not None:
            await asyncio.to_thread(self._async.stop)
        close = getattr(self._engine, "close", None)
        if close is not None:
            close()

    def ready(self) -> ReadyState:
        if self._async is not None and self._async.ready:
            return ReadyState(ready=True)
        return ReadyState(ready=False, detail=self._state)

    def stats(self) -> Any:
        return self._async.stats() if self._async is not None else None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        if self._async is None or not self._async.ready:
            raise ServiceUnavailableError(f"model '{self.model_name}' is not ready ({self._state})")
        engine = self._engine
        tokenizer = engine.tokenizer
        if request.messages is not None:
            prompt = self._template.render(request.messages)
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
            param = "messages"
        else:
            prompt_ids = tokenizer.encode(request.prompt or "", add_special_tokens=True)
            param = "prompt"
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        engine.check_request(len(prompt_ids), request.sampling, param=param)
        engine_id = f"{request.request_id}#{next(self._ids)}"
        async for item in self._async.generate(engine_id, prompt_ids, request.sampling):
            yield item
