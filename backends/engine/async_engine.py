"""``AsyncEngine``: runs ``LLMEngine`` steps on a thread of its own and streams to asyncio.

The step loop never runs on the event loop: torch releases the GIL inside its kernels, so the
gateway keeps accepting and streaming while a step computes. Requests and aborts cross into the
step thread through an inbox that the loop drains between steps (the scheduler is not
thread-safe); each step's outputs cross back with one ``call_soon_threadsafe`` per step, not per
token. Closing a request's async iterator (the client went away) queues an abort, so its blocks
are free before the next step starts. Context variables stay behind on the event loop, so a
request's bound log variables (its ``request_id``, see ``gateway.logs``) cross with it and the step
thread logs that request's lines with them.

Torch's CPU kernels run on libgomp, which keeps one OpenMP thread team per thread that ever ran
a parallel region, and stops its workers from spin-waiting once the process holds more such
threads than there are cores. A team left behind by a pooled thread (``asyncio.to_thread``) or
the main thread therefore slows every step: on 2 cores the served SmolLM2 went from 13.5 to
~23 ms per token. So the model loads on a thread of its own that exits when done
(``run_in_own_thread``), and nothing but the step thread runs torch afterwards.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import msgspec
import structlog

from backends.engine.engine import EngineOutput, LLMEngine
from gateway.errors import ServiceUnavailableError, TaxiwayError
from gateway.interface import SamplingParams, StreamItem, Usage

log = structlog.get_logger(__name__)

_RATE_WINDOW_S = 5.0

T = TypeVar("T")


class EngineStats(msgspec.Struct, frozen=True, kw_only=True):
    ready: bool
    num_requests: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_block_size: int
    prefix_cache_hit_rate: float
    generation_tokens_per_s: float
    num_steps: int
    num_step_failures: int


class _Add(msgspec.Struct):
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    log_context: dict[str, Any]  # the request's bound log variables
    lora: Any = None  # the request's LoRAAdapter, None for the base model


class _Abort(msgspec.Struct):
    request_id: str


#: A load runs beside models already serving (a reload, an on-demand load): at the lowest CPU
#: priority it takes what serving leaves. `taxiway bench swap` (C=16, 2 cores, 30 s runs back to
#: back): p99 latency during the swap 8.4x steady at nice 0, 5.9x at 10, 4.5x at 19.
LOAD_NICENESS = 19


#: Engines started in this process (``serving_beside``).
_STARTED: weakref.WeakSet[AsyncEngine] = weakref.WeakSet()


def serving_beside() -> bool:
    """Whether an engine in this process is serving: a load now runs beside it (``child_load``)."""
    return any(engine.ready for engine in list(_STARTED))


def freeze_loaded_objects() -> None:
    """Move every object alive now (a load's modules, parameters' wrappers, vocabularies) out of
    the cyclic collector's reach. A full collection then walks only what requests created since:
    with two MiniLMs loaded one took 150-200 ms, stalling the event loop mid-request. Called once a
    model is loaded; an unload calls ``collect_after_unload``."""
    gc.freeze()


def collect_after_unload() -> None:
    """After an unload: what it dropped that only reference cycles hold would stay frozen for
    good. Unfreeze, collect it, freeze what stays (the models still loaded)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def run_in_own_thread(fn: Callable[[], T], name: str = "taxiway-engine-load") -> T:
    """``fn()`` on a new thread that ends with it (so its OpenMP team goes too); awaits the result."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            with contextlib.suppress(OSError):  # inherited by the OpenMP team this thread starts
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICENESS)
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


class AsyncEngine:
    """Owns the step thread. ``on_step_failure`` runs on that thread after a failed step (the
    in-flight requests have already been failed with 503); it may restart workers and returns
    whether the engine can serve again."""

    def __init__(
        self,
        engine: LLMEngine,
        *,
        on_step_failure: Callable[[BaseException], bool] | None = None,
    ) -> None:
        self.engine = engine
        self._on_step_failure = on_step_failure
        self._inbox: collections.deque[_Add | _Abort] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, asyncio.Queue[EngineOutput | BaseException]] = {}
        self._log_contexts: dict[str, dict[str, Any]] = {}  # step thread only: requests in the engine
        self._ready = False
        self._num_failures = 0
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._last_generated = 0
        self._stats = self._snapshot()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready = True
        self._thread = threading.Thread(target=self._run, name="taxiway-engine", daemon=True)
        self._thread.start()
        _STARTED.add(self)

    def stop(self) -> None:
        """Stop the step thread (its step ends first); a request still streaming gets a 503."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._ready = False
        if self._streams:
            self._post(self._fail, list(self._streams), ServiceUnavailableError("the model was unloaded"))
        if self._thread is None or not self._thread.is_alive():
            # the caller frees the model next: this (often still referenced by the pooled thread
            # that ran stop) must not keep it alive past that
            self.engine = None  # type: ignore[assignment]

    @property
    def ready(self) -> bool:
        return self._ready and self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self._stats

    # -- requests (event-loop side) -------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, *, lora: Any = None
    ) -> AsyncIterator[StreamItem]:
        """Deltas for the request as steps produce them, then its ``Usage``."""
        if not self.ready:
            raise ServiceUnavailableError("the engine is not ready")
        if request_id in self._streams:
            raise ServiceUnavailableError(f"request id {request_id!r} is already running")
        queue: asyncio.Queue[EngineOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        self._submit(_Add(request_id, prompt_ids, sampling, structlog.contextvars.get_contextvars(), lora))
        finished = False
        try:
            while True:
                output = await queue.get()
                if isinstance(output, BaseException):
                    finished = True  # the engine already dropped it
                    raise output
                for item in output.items:
                    yield item
                if output.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._submit(_Abort(request_id))

    def _submit(self, command: _Add | _Abort) -> None:
        self._inbox.append(command)
        self._wake.set()

    def _dispatch(self, outputs: list[EngineOutput]) -> None:
        for output in outputs:
            queue = self._streams.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        for request_id in request_ids:
            queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(error)

    # -- the step thread ------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        while not self._stopping:
            self._wake.clear()
            self._drain_inbox()
            if not engine.has_unfinished():
                self._stats = self._snapshot()
                self._wake.wait(timeout=1.0)
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not kill the loop
                self._step_failed(exc)
                continue
            self._count_tokens()
            if outputs:
                self._post(self._dispatch, outputs)
                self._log_finished(outputs)
            self._stats = self._snapshot()

    def _drain_inbox(self) -> None:
        while self._inbox:
            command = self._inbox.popleft()
            if isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
                context = self._log_contexts.pop(command.request_id, None)
                if context is not None:
                    log.debug("engine.request.aborted", engine_request_id=command.request_id, **context)
                continue
            try:
                self.engine.add_request(command.request_id, command.prompt_ids, command.sampling, lora=command.lora)
            except TaxiwayError as exc:
                self._post(self._fail, [command.request_id], exc)
                continue
            self._log_contexts[command.request_id] = command.log_context
            log.debug(
                "engine.request.added",
                engine_request_id=command.request_id,
                prompt_tokens=len(command.prompt_ids),
                **command.log_context,
            )

    def _log_finished(self, outputs: list[EngineOutput]) -> None:
        for output in outputs:
            if output.finished:
                context = self._log_contexts.pop(output.request_id, {})
                usage = output.items[-1] if output.items and isinstance(output.items[-1], Usage) else None
                completion_tokens = usage.completion_tokens if usage else None
                log.debug(
                    "engine.request.finished",
                    engine_request_id=output.request_id,
                    completion_tokens=completion_tokens,
                    **context,
                )

    def _step_failed(self, exc: BaseException) -> None:
        self._num_failures += 1
        self._ready = False
        failed = self.engine.abort_all()
        request_ids = [self._log_contexts.pop(engine_id, {}).get("request_id") for engine_id in failed]
        log.error("engine.step_failed", error=repr(exc), request_ids=request_ids)
        error = ServiceUnavailableError(f"the engine failed while running this request: {exc}")
        self._post(self._fail, failed, error)
        recovered = True
        if self._on_step_failure is not None:
            try:
                recovered = self._on_step_failure(exc)
            except Exception as again:  # noqa: BLE001
                log.error("engine.recovery_failed", error=repr(again))
                recovered = False
        self._ready = recovered
        if recovered:
            log.info("engine.recovered")

    def _post(self, fn: Callable[..., None], *args: object) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def _count_tokens(self) -> None:
        now = time.monotonic()
        total = self.engine.num_generated_tokens
        self._rate.append((now, total - self._last_generated))
        self._last_generated = total
        while self._rate and now - self._rate[0][0] > _RATE_WINDOW_S:
            self._rate.popleft()

    def _snapshot(self) -> EngineStats:
        sched = self.engine.scheduler.stats()
        blocks = sched.blocks
        now = time.monotonic()
        recent = [n for t, n in self._rate if now - t <= _RATE_WINDOW_S]
        return EngineStats(
            ready=self._ready,
            num_requests=self.engine.num_requests,
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            num_preemptions=sched.num_preemptions,
            kv_blocks_total=blocks.num_blocks,
            kv_blocks_used=blocks.num_used_blocks,
            kv_blocks_free=blocks.num_free_blocks,
            kv_block_size=blocks.block_size,
            prefix_cache_hit_rate=blocks.prefix_cache_hit_rate,
            generation_tokens_per_s=sum(recent) / _RATE_WINDOW_S,
            num_steps=self.engine.num_steps,
            num_step_failures=self._num_failures,
        )
