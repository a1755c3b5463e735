"""Backend ``engine``: the in-repo PyTorch engine behind the gateway's model interface.

``start`` loads the model in the background (pulling a catalogue model on first use), runs one
warm-up request through the whole engine, then starts the step thread; only then is the model
ready. A load that fails — no torch, no model file, a corrupt one, any other error — is logged
(``engine.load_failed``) and leaves the model ``failed`` for the life of the process: ``/ready`` and
its stats give the reason, and its requests get a 503 naming it. Prompts are
rendered and tokenized on a pooled thread, never on the event loop (a prompt that cannot fit is a
400 before admission); everything else happens on the step thread (``async_engine``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
from collections.abc import AsyncIterator
from typing import Any

import structlog

from backends.engine.builder import EngineOptions
from gateway import tools
from gateway.errors import ConfigError, ContextLengthExceededError, InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from gateway.interface import (
    Backend,
    Capabilities,
    GenerationRequest,
    ReadyState,
    SamplingParams,
    StreamItem,
)

log = structlog.get_logger(__name__)

#: Weights under which an ``auto`` load beside a serving engine stays on a thread: a tiny model
#: loads in well under a second, less than the ~2 s a child process costs to start.
CHILD_LOAD_MIN_WEIGHT_BYTES = 32 * 2**20


class EngineBackend(Backend):
    Options = EngineOptions

    def __init__(self, model_name: str, options: EngineOptions) -> None:  # type: ignore[override]
        super().__init__(model_name, options)
        self.options: EngineOptions = options
        self._engine: Any = None  # LLMEngine, or a tensor-parallel one
        self._template: Any = None  # ChatTemplate
        self._async: Any = None  # AsyncEngine
        self._state = "not started"
        self._failure: str | None = None  # why the model cannot serve in this process
        self._capabilities: Capabilities | None = None  # known once loaded
        self._loading: asyncio.Task[None] | None = None
        self._ids = itertools.count()  # clients may reuse X-Request-ID; engine ids must be unique
        self._memory: Any = None  # memory.MemoryEstimate, once asked for
        # LoRA adapters (options.lora): each a model name of its own; the registry once loaded
        lora = options.lora
        self.accepts_adapters = lora is not None
        self._adapter_names: tuple[str, ...] = tuple(lora.adapters) if lora is not None else ()
        self._lora: Any = None  # lora.registry.LoRARegistry

    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            raise self._unavailable()
        return self._capabilities

    async def start(self) -> None:
        """Load the model in the background: the gateway serves (``/health``, other models)
        meanwhile, and this model turns ready when loaded and warm, or failed. After ``stop`` it
        loads again (a failed load is tried afresh)."""
        if (self._loading is not None and not self._loading.done()) or self._async is not None:
            return  # loading or loaded already
        self._failure = None
        self._state = "loading"
        self._loading = asyncio.create_task(self._start())

    def memory_required(self) -> int:
        """Bytes the model holds once loaded: weights as kept + KV cache + a stated overhead
        (``memory.estimate_memory``), from the file's header and the options, no weight read
        (milliseconds). A catalogue model not yet in the model cache is pulled first, as ``start``
        would. ``ConfigError`` when the file cannot be read or the engine cannot load it."""
        if self._memory is None:
            from backends.engine.builder import resolve_model_path
            from backends.engine.memory import estimate_memory

            self._memory = estimate_memory(resolve_model_path(self.options), self.options)
        return self._memory.total

    def _memory_estimate(self):  # type: ignore[no-untyped-def]
        self.memory_required()
        return self._memory

    def memory_bytes(self) -> int | None:
        """What the model holds now, or reserves while it loads: its declared ``memory_required``
        from the start of a load until ``stop``; 0 when not loaded (never started, stopped, failed)."""
        if self._async is None and (self._loading is None or self._loading.done()):
            return 0
        try:
            return self.memory_required()
        except Exception:  # noqa: BLE001 - an unreadable file fails the load, which reports it
            return None

    async def _start(self) -> None:
        try:
            # the first import of torch: without it the model fails like any other load
            from backends.engine.async_engine import AsyncEngine, freeze_loaded_objects, run_in_own_thread
            from backends.engine.runner.sampling import MAX_TOP_LOGPROBS

            await run_in_own_thread(self._load)  # not a pooled thread: see async_engine
            self._async = AsyncEngine(self._engine, on_step_failure=self._recover)
            self._async.start(asyncio.get_running_loop())
        except Exception as exc:  # noqa: BLE001 - whatever it is, the model reports it and stays failed
            self._failure = _reason(exc)
            # a traceback only where the reason alone may not explain it
            trace = None if isinstance(exc, (ConfigError, ImportError)) else exc
            log.error("engine.load_failed", model=self.model_name, error=self._failure, exc_info=trace)
            return
        # chat stays on without a template: ChatTemplate.render says why it cannot serve (400)
        structured = importlib.util.find_spec("llguidance") is not None  # the engine extra's grammar library
        self._capabilities = Capabilities(
            max_n=self.options.max_num_seqs, max_top_logprobs=MAX_TOP_LOGPROBS,
            structured_output=structured, tools=structured,
        )  # fmt: skip
        self._state = "ready"
        freeze_loaded_objects()
        log.info("engine.ready", model=self.model_name)

    def _load(self) -> None:
        if self.options.tensor_parallel > 1:
            from backends.engine.tp.engine import build_tp_engine

            self._engine = build_tp_engine(self.options)
        else:
            from backends.engine.async_engine import serving_beside
            from backends.engine.builder import build_engine

            self._engine = build_engine(self.options, in_child=self._load_in_child(serving_beside()))
        from backends.engine.text.chat_template import ChatTemplate

        self._template = ChatTemplate.from_tokenizer(self._engine.tokenizer)
        if self.options.lora is not None:
            self._load_adapters(self.options.lora)
        self._warm_up()

    def _load_adapters(self, options: Any) -> None:
        """The configured adapters, read and checked now: a bad one fails the model, naming it."""
        from backends.engine.lora.adapter import AdapterError
        from backends.engine.lora.registry import LoRARegistry

        self._lora = LoRARegistry(self._engine.model_config, options)
        for name, path in options.adapters.items():
            try:
                self._lora.keep(self._lora.read(name, path))
            except AdapterError as exc:
                raise ConfigError(str(exc), path=f"options.lora.adapters.{name}") from exc
        self._adapter_names = self._lora.names()

    def _load_in_child(self, serving_beside: bool) -> bool:
        """Whether this load runs in a child process (``child_load``): as ``load_process`` says;
        for ``auto``, when another engine serves in this process and the weights are worth it
        (a child costs ~2 s of its own, spawning and importing torch, at the lowest priority)."""
        mode = self.options.load_process
        if mode != "auto":
            return mode == "always"
        if not serving_beside:
            return False
        try:
            return self._memory_estimate().weights >= CHILD_LOAD_MIN_WEIGHT_BYTES
        except Exception:  # noqa: BLE001 - an unreadable file fails the load itself, which says why
            return False

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
        try:
            recover()
        except Exception as again:
            self._failure = f"the engine failed ({exc}) and could not restart: {again}"
            raise  # the step thread logs it; the model stays failed
        self._state = "ready"
        return True

    async def stop(self) -> None:
        """Unload: the step thread stops (a request still running ends with a 503), the engine,
        model and KV cache are dropped and their memory handed back to the OS. ``start`` loads
        the model again."""
        if self._loading is not None and not self._loading.done():
            await asyncio.wait([self._loading])  # a load thread cannot be interrupted
        self._loading = None
        if self._async is not None:
            await asyncio.to_thread(self._async.stop)
        close = getattr(self._engine, "close", None)
        if close is not None:
            close()
        loaded = self._engine is not None
        self._async = self._engine = self._template = self._capabilities = None
        if self._failure is None:
            self._state = "unloaded"
        if loaded:  # torch is imported: free what the model held (glibc keeps it otherwise)
            from backends.engine.async_engine import collect_after_unload
            from backends.engine.model.loader import return_freed_memory

            collect_after_unload()
            return_freed_memory(collect=False)
        log.info("engine.unloaded", model=self.model_name)

    def ready(self) -> ReadyState:
        if self._failure is not None:
            return ReadyState(ready=False, failed=True, detail=self._failure)
        if self._async is not None and self._async.ready:
            return ReadyState(ready=True)
        return ReadyState(ready=False, detail=self._state)

    def stats(self) -> Any:
        return self._async.stats() if self._async is not None else None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[StreamItem]:
        if self._async is None or not self._async.ready:
            raise self._unavailable()
        # off the event loop: a 4 MB prompt renders and tokenizes for seconds, a large schema's
        # grammar compiles for a while (the step thread alone runs torch; this thread runs none,
        # so no OpenMP team is left behind)
        prompt_ids = await asyncio.to_thread(self._checked_prompt_ids, request)
        lora = None
        if request.adapter is not None:
            lora = None if self._lora is None else await self._lora.acquire(request.adapter)
            if lora is None:  # unloaded since the gateway routed it here
                raise ModelNotFoundError(f"The model '{request.adapter}' does not exist", param="model")
        engine_id = f"{request.request_id}#{next(self._ids)}"
        stream = self._async.generate(engine_id, prompt_ids, request.sampling, lora=lora)
        if request.messages is not None and tools.calls_tools(request.tools, request.tool_choice):
            stream = tools.parse_tool_calls(stream, request.tools)
        async for item in stream:
            yield item

    def _checked_prompt_ids(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids, once the request is known to be one the engine can serve:
        a prompt that fits, sampling it can honour, a grammar it can enforce (400s otherwise)."""
        param = "messages" if request.messages is not None else "prompt"
        prompt_ids = self._prompt_ids(request, param)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        if request.sampling.structured is not None:
            self._check_tool_schemas(request)
        self._engine.check_request(len(prompt_ids), request.sampling, param=param)
        return prompt_ids

    def _prompt_ids(self, request: GenerationRequest, param: str) -> list[int]:
        """The prompt's token ids; a prompt longer than the engine can ever hold is a 400 before
        its ids are listed (``Tokenizer.encode_at_most``)."""
        from backends.engine.text.tokenizer import TooManyTokens

        tokenizer = self._engine.tokenizer
        max_seq_len = self._engine.scheduler.max_seq_len
        try:
            if request.messages is not None:
                return tokenizer.encode_at_most(self._render_chat(request), max_seq_len, add_special_tokens=False)
            return tokenizer.encode_at_most(request.prompt or "", max_seq_len, add_special_tokens=True)
        except TooManyTokens as exc:
            raise ContextLengthExceededError(
                f"the {param} ({exc}) exceeds the {max_seq_len}-token limit", param=param
            ) from None

    def _render_chat(self, request: GenerationRequest) -> str:
        """The prompt: tools through the template where it renders them, else in a system message
        (``gateway.tools.fallback_messages``); ``tool_choice: none`` shows the model no tools."""
        declared = request.tools if tools.calls_tools(request.tools, request.tool_choice) else ()
        source = self._template.source or ""
        if "tools" in source or "tool_calls" in source:
            context = {"tools": tools.openai_tools(declared)} if declared else None
            return self._template.render(request.messages, extra_context=context)
        if declared or any(m.role == "tool" or m.tool_calls for m in request.messages):
            return self._template.render(tools.fallback_messages(request.messages, declared))
        return self._template.render(request.messages)

    def _check_tool_schemas(self, request: GenerationRequest) -> None:
        """Each forced tool's ``parameters`` on its own, so a 400 names ``tools[i]``."""
        choice = request.tool_choice
        if choice is None or choice.mode not in ("required", "function"):
            return
        for i, tool in enumerate(request.tools):
            if tool.parameters is not None and (choice.mode == "required" or tool.name == choice.name):
                self._engine.grammars.json_schema(tool.parameters, param=f"tools[{i}].function.parameters")

    # -- LoRA adapters ----------------------------------------------------------------------------

    def adapters(self) -> tuple[str, ...]:
        return self._adapter_names

    async def load_adapter(self, name: str, path: str) -> None:
        """Read and check the adapter off the event loop; 400 naming the file and tensor when bad."""
        if not self.accepts_adapters:
            await super().load_adapter(name, path)
        if self._lora is None or self._async is None:
            raise self._unavailable()
        from backends.engine.lora.adapter import AdapterError

        try:
            await self._lora.add(name, path)
        except AdapterError as exc:
            raise InvalidRequestError(str(exc), param="lora_path") from exc
        self._adapter_names = self._lora.names()

    async def unload_adapter(self, name: str) -> None:
        """New requests for ``name`` get a 404; those in flight hold their adapter and finish."""
        if self._lora is None or not self._lora.remove(name):
            await super().unload_adapter(name)
        self._adapter_names = self._lora.names()

    def _unavailable(self) -> ServiceUnavailableError:
        if self._failure is not None:
            return ServiceUnavailableError(f"model '{self.model_name}' cannot serve: {self._failure}")
        return ServiceUnavailableError(f"model '{self.model_name}' is not ready ({self._state})")


def _reason(exc: Exception) -> str:
    """Why a load failed, in words for ``/ready`` and a 503's message."""
    if isinstance(exc, ImportError):
        return f"the engine's dependencies are missing (pip install 'taxiway[engine]'): {exc}"
    if isinstance(exc, ConfigError):  # names the model file or option itself
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
