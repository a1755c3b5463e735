"""``LLMEngine``: the synchronous serving core — requests in, one step at a time, deltas out.

One step is ``schedule → run → update`` (see ``scheduler.py``), then the sampled tokens of every
sequence become text: incremental detokenisation (whole UTF-8 characters only), stop strings cut
across token boundaries (a matched stop finishes the choice at once and frees its blocks), and
logprobs with the token's text and bytes. Not thread-safe: ``async_engine.AsyncEngine`` drives it
from one thread.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import Any

import msgspec
import structlog

from backends.engine.text.detokenizer import IncrementalDetokenizer, StopMatcher
from backends.engine.runner.model_runner import ModelRunner, SampledToken
from backends.engine.runner.sampling import validate_sampling_params
from backends.engine.sched.admission import QueueFullError, RequestTooLargeError
from backends.engine.sched.scheduler import Scheduler
from backends.engine.sched.sequence import Sequence, SequenceGroup
from backends.engine.structured.grammar import GrammarCompiler
from backends.engine.structured.matchers import SequenceMatchers
from backends.engine.text.tokenizer import Tokenizer
from gateway.errors import ContextLengthExceededError, InvalidRequestError, RateLimitError
from gateway.interface import (
    Delta,
    SamplingParams,
    StreamItem,
    TokenLogprob,
    TopLogprob,
    Usage,
)

log = structlog.get_logger(__name__)


class EngineOutput(msgspec.Struct):
    """What one step produced for one request: deltas, then ``Usage`` once it has finished."""

    request_id: str
    items: list[StreamItem]
    finished: bool = False


class StepCounts(msgspec.Struct, frozen=True):
    """What one step computed, as attention sees it: ``num_decode_rows`` sequences computing one
    new token, ``num_prefill_tokens`` the tokens of sequences computing several (prompt chunks,
    recomputation after preemption)."""

    num_prefill_tokens: int = 0
    num_decode_rows: int = 0


class _Choice:
    """Text state of one sequence (one choice of a request)."""

    __slots__ = ("detokenizer", "stop", "finished")

    def __init__(self, tokenizer: Tokenizer, prompt_ids: SequenceABC[int], stops: tuple[str, ...]) -> None:
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = StopMatcher(stops) if stops else None
        self.finished = False


class _Request:
    __slots__ = ("group", "choices", "prompt_ids")

    def __init__(self, group: SequenceGroup, prompt_ids: list[int]) -> None:
        self.group = group
        self.prompt_ids = prompt_ids
        self.choices: dict[int, _Choice] = {}


class LLMEngine:
    """Owns the scheduler and the model runner; turns their steps into ``Delta``s per request."""

    def __init__(self, scheduler: Scheduler, runner: ModelRunner, tokenizer: Tokenizer) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        # constrained decoding (SamplingParams.structured): grammars over this tokenizer
        self.grammars = GrammarCompiler(tokenizer, runner.vocab_size)
        runner.matchers = SequenceMatchers(self.grammars)
        self._requests: dict[str, _Request] = {}
        self.num_generated_tokens = 0
        self.num_steps = 0
        self.last_step = StepCounts()

    @property
    def model_config(self) -> Any:
        """The served model's ``ModelConfig`` (what adapters are checked against)."""
        return self.runner.config

    # -- requests -------------------------------------------------------------------------------

    def check_request(self, num_prompt_tokens: int, sampling: SamplingParams, *, param: str) -> None:
        """Raise a 400 if the request can never be served (context, ``n``); safe from any thread."""
        validate_sampling_params(sampling, self.runner.vocab_size)
        if sampling.structured is not None:
            self.grammars.check(sampling.structured)  # a 400 naming what cannot be enforced
        try:
            self.scheduler.check_request(num_prompt_tokens, sampling)
        except RequestTooLargeError as exc:
            where = param if exc.param == "messages" else exc.param
            cls = ContextLengthExceededError if where in ("messages", "prompt", "max_tokens") else InvalidRequestError
            raise cls(str(exc), param=where) from exc

    def add_request(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams, *, lora: Any = None) -> None:
        """Queue a request (``lora``: its ``LoRAAdapter``, None for the base model). Raises
        ``RateLimitError`` when the waiting queue is full."""
        group = SequenceGroup(request_id, prompt_ids, sampling, lora=lora)
        try:
            self.scheduler.add(group)
        except QueueFullError as exc:
            raise RateLimitError(str(exc), retry_after=1.0) from exc
        except RequestTooLargeError as exc:
            raise ContextLengthExceededError(str(exc), param=exc.param) from exc
        self._requests[request_id] = _Request(group, prompt_ids)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its blocks are free before the next step."""
        self.scheduler.abort(request_id)
        self._requests.pop(request_id, None)

    def abort_all(self) -> list[str]:
        ids = list(self._requests)
        for request_id in ids:
            self.abort_request(request_id)
        return ids

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> list[EngineOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            self.last_step = StepCounts()
            return []
        decode_rows = sum(1 for s in out.scheduled if s.num_new_tokens == 1)
        self.last_step = StepCounts(out.num_batched_tokens - decode_rows, decode_rows)
        try:
            sampled = self.runner.run(out)
        except BaseException:
            self.scheduler.discard(out)  # the caller fails and aborts the requests in flight
            raise
        self.num_steps += 1
        self.scheduler.update(out, {seq_id: s.token_id for seq_id, s in sampled.items()})

        outputs: dict[str, EngineOutput] = {}
        for sched in out.scheduled:
            token = sampled.get(sched.seq_id)
            if token is None:
                continue
            seq = sched.seq
            group = seq.group
            assert group is not None
            request = self._requests.get(group.request_id)
            if request is None:
                continue  # aborted meanwhile
            self.num_generated_tokens += 1
            delta = self._delta(request, seq, token)
            output = outputs.get(group.request_id)
            if output is None:
                output = outputs[group.request_id] = EngineOutput(group.request_id, [])
            if delta is not None:
                output.items.append(delta)

        # requests whose every choice is done: usage, then forget them
        for request_id, output in outputs.items():
            request = self._requests[request_id]
            if all(s.is_finished for s in request.group.seqs):
                output.items.append(self._usage(request))
                output.finished = True
                del self._requests[request_id]
        return list(outputs.values())

    def _delta(self, request: _Request, seq: Sequence, token: SampledToken) -> Delta | None:
        choice = request.choices.get(seq.seq_id)
        if choice is None:
            choice = request.choices[seq.seq_id] = _Choice(
                self.tokenizer, request.prompt_ids, seq.sampling.stop
            )
        if choice.finished:
            return None
        text = choice.detokenizer.add(token.token_id)
        finish_reason = seq.finish_reason if seq.is_finished else None
        if finish_reason is not None:
            text += choice.detokenizer.flush()
        if choice.stop is not None:
            text, stopped = choice.stop.feed(text)
            if stopped:
                if not seq.is_finished:
                    self.scheduler.finish(seq.seq_id, "stop")
                finish_reason = "stop"
            elif finish_reason is not None:
                text += choice.stop.flush()
        choice.finished = finish_reason is not None
        return Delta(
            index=seq.index,
            text=text,
            token_ids=(token.token_id,),
            logprobs=self._logprobs(token) if seq.sampling.logprobs else None,
            finish_reason=finish_reason,
        )

    def _logprobs(self, token: SampledToken) -> tuple[TokenLogprob, ...]:
        tok = self.tokenizer
        tops = tuple(
            TopLogprob(token=tok.token_text(i), logprob=lp, bytes=list(tok.token_bytes(i)))
            for i, lp in token.top_logprobs
        )
        return (
            TokenLogprob(
                token=tok.token_text(token.token_id),
                logprob=token.logprob,
                bytes=list(tok.token_bytes(token.token_id)),
                top_logprobs=tops,
            ),
        )

    @staticmethod
    def _usage(request: _Request) -> Usage:
        seqs = request.group.seqs
        return Usage(
            prompt_tokens=len(request.prompt_ids),
            completion_tokens=sum(s.num_output_tokens for s in seqs),
            cached_tokens=request.group.leader.num_cached_tokens,
        )
