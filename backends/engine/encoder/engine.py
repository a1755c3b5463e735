"""``EncoderEngine``: the encoder's step thread, and the asyncio side that hands it work.

``embed(inputs)`` (on the event loop) posts one job — a request's token-id inputs — and awaits
its future. The step thread takes the scheduler's next group (``scheduler.py``: a token budget per
step, similar lengths together, the oldest input always in), runs one forward, and writes each
row into its job's result; the job's future is settled on the loop, via ``call_soon_threadsafe``,
once all its inputs have run. The loop never runs a forward: torch releases the GIL inside its
kernels, so the loop keeps serving while a step runs.

A cancelled await (the client went away) drops the job's inputs that have not run. ``stop()``
fails what is still waiting with a 503.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import structlog
import torch

from backends.engine.encoder.runtime import EncoderModel
from backends.engine.encoder.scheduler import EncoderScheduler
from gateway.errors import ServiceUnavailableError

log = structlog.get_logger(__name__)


class _Job:
    __slots__ = ("future", "loop", "num_left", "rows")

    def __init__(self, loop: asyncio.AbstractEventLoop, num_inputs: int, dimensions: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[torch.Tensor] = loop.create_future()
        self.rows = torch.empty(num_inputs, dimensions)
        self.num_left = num_inputs


class EncoderEngine:
    def __init__(self, model: EncoderModel, *, max_batch_tokens: int, max_batch_size: int) -> None:
        self.model = model
        self.scheduler = EncoderScheduler(max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.num_steps = 0
        self.num_inputs = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="taxiway-encoder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the step thread (after its current step); waiting jobs fail with a 503."""
        with self._cond:
            self._stopping = True
            waiting = {item.job for item in self.scheduler.schedule_all()}
            self._cond.notify_all()
        for job in waiting:
            _settle(job, exc=ServiceUnavailableError("the embedding model was stopped"))
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    async def embed(self, inputs: Sequence[list[int]], seconds: Sequence[int] | None = None) -> torch.Tensor:
        """``[len(inputs), output_size]`` float32, one row per input (token ids, special tokens
        included, each within the model's length): its vector, or a classifier's logits.
        ``seconds``: text pairs, where each one's second text starts."""
        job = _Job(asyncio.get_running_loop(), len(inputs), self.model.output_size)
        with self._cond:
            if self._stopping:
                raise ServiceUnavailableError("the embedding model is stopping")
            self.scheduler.add(job, inputs, seconds)
            self._cond.notify()
        try:
            return await job.future
        except asyncio.CancelledError:
            with self._cond:
                self.scheduler.cancel(job)
            raise

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.scheduler.num_waiting:
                    self._cond.wait()
                if self._stopping:
                    return
                group = self.scheduler.schedule()
            try:
                seconds = [item.second for item in group] if any(item.second is not None for item in group) else None
                out = self.model.embed([item.token_ids for item in group], seconds)
            except Exception as exc:  # noqa: BLE001 - the jobs answer it; the thread serves on
                log.exception("encoder.step_failed", num_inputs=len(group))
                for job in {item.job for item in group}:
                    with self._cond:
                        self.scheduler.cancel(job)
                    _settle(job, exc=ServiceUnavailableError(f"the embedding step failed: {exc}"))
                continue
            self.num_steps += 1
            self.num_inputs += len(group)
            for row, item in enumerate(group):
                job = item.job
                job.rows[item.index] = out[row]
                job.num_left -= 1
                if job.num_left == 0:
                    _settle(job, result=job.rows)


def _settle(job: _Job, *, result: torch.Tensor | None = None, exc: BaseException | None = None) -> None:
    def settle() -> None:
        if job.future.done():
            return
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)  # type: ignore[arg-type]

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody awaits the job any more
        pass

