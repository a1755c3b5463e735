"""`taxiway bench batching`: one workload, three ways of batching it, on the same engine.

- **none**: one request at a time.
- **static**: fixed batches of C requests; a batch runs until its longest request is done (every
  member computes that many steps, as padded batch generation does) and only then does the next
  batch start. Useful tokens are each request's own length.
- **continuous**: C requests in flight; a finished request's slot is refilled at the next step.

Output lengths are exact (``ignore_eos``), so every mode produces the same useful tokens. Each
mode also reports where its time went, step by step: steps that computed prompt tokens (with any
decodes beside them) and decode-only steps, with the rows each computed (static's padding
included), which is what the ratios between the modes come from.
"""

from __future__ import annotations

import random
import sys
import time
from argparse import ArgumentParser, Namespace

import msgspec

from bench.report import add_json_flag, human, write_json


class Job(msgspec.Struct, frozen=True):
    prompt_ids: list[int]
    max_tokens: int


class StepTally(msgspec.Struct):
    """A mode's steps (``LLMEngine.last_step``), timed one by one."""

    num_steps: int = 0
    num_prefill_tokens: int = 0
    num_decode_rows: int = 0  # sequences that computed one token (static: padding included)
    prefill_steps_s: float = 0.0  # steps that computed prompt tokens, decodes beside them included
    num_decode_only_steps: int = 0
    num_decode_only_rows: int = 0
    decode_only_steps_s: float = 0.0

    def step(self, engine) -> list:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - start
        counts = engine.last_step
        self.num_steps += 1
        self.num_prefill_tokens += counts.num_prefill_tokens
        self.num_decode_rows += counts.num_decode_rows
        if counts.num_prefill_tokens:
            self.prefill_steps_s += elapsed
        else:
            self.num_decode_only_steps += 1
            self.num_decode_only_rows += counts.num_decode_rows
            self.decode_only_steps_s += elapsed
        return outputs


class ModeResult(msgspec.Struct):
    mode: str
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    prompt_tokens: int
    steps: StepTally


def make_jobs(tokenizer, num: int, prompt: tuple[int, int], output: tuple[int, int], seed: int) -> list[Job]:  # type: ignore[no-untyped-def]
    from backends.engine.text.chat_template import ChatTemplate
    from bench.loadgen import RequestSpec, prompt_text
    from gateway.interface import ChatMessage

    rng = random.Random(seed)
    template = ChatTemplate.from_tokenizer(tokenizer)
    jobs = []
    for i in range(num):
        length = rng.randint(*prompt)
        text = prompt_text(RequestSpec(length, 1), i)
        ids = tokenizer.encode(template.render([ChatMessage(role="user", content=text)]), add_special_tokens=False)
        jobs.append(Job(ids[-length:] if len(ids) > length else ids, rng.randint(*output)))
    return jobs


def _params(max_tokens: int):  # type: ignore[no-untyped-def]
    from gateway.interface import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _drain(engine, tally: StepTally) -> None:  # type: ignore[no-untyped-def]
    while engine.has_unfinished():
        tally.step(engine)


def run_none(engine, jobs: list[Job], tally: StepTally) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for i, job in enumerate(jobs):
        engine.add_request(f"none-{i}", job.prompt_ids, _params(job.max_tokens))
        _drain(engine, tally)
    return time.perf_counter() - start


def run_static(engine, jobs: list[Job], batch: int, tally: StepTally) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for first in range(0, len(jobs), batch):
        group = jobs[first : first + batch]
        longest = max(j.max_tokens for j in group)
        for i, job in enumerate(group):
            engine.add_request(f"static-{first + i}", job.prompt_ids, _params(longest))
        _drain(engine, tally)
    return time.perf_counter() - start


def run_continuous(engine, jobs: list[Job], concurrency: int, tally: StepTally, adapters: list | None = None) -> float:  # type: ignore[no-untyped-def]
    """Closed loop at ``concurrency``; request i on ``adapters[i % len]`` when adapters are given."""
    start = time.perf_counter()
    pending = list(enumerate(jobs))
    in_flight = 0
    while pending or in_flight:
        while pending and in_flight < concurrency:
            i, job = pending.pop(0)
            lora = adapters[i % len(adapters)] if adapters else None
            engine.add_request(f"cont-{len(adapters or ())}-{i}", job.prompt_ids, _params(job.max_tokens), lora=lora)
            in_flight += 1
        for output in tally.step(engine):
            if output.finished:
                in_flight -= 1
    return time.perf_counter() - start


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", default="16-512")
    parser.add_argument("--output-tokens", default="16-256")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--modes", default="none,static,continuous")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (the GPU path: fused kernels, CUDA graphs)")
    parser.add_argument("--quantization", choices=["int4", "int8", "none"], default=None, help="default: as stored")
    parser.add_argument("--seed", type=int, default=0)
    add_json_flag(parser, dest="out")


def run(args: Namespace) -> int:
    """Output tokens/s of one workload with no, static and continuous batching on the engine."""
    from backends.engine.builder import EngineOptions, build_engine
    from bench.loadgen import parse_range
    from gateway.logs import configure_logging

    configure_logging("warning", stream=sys.stderr)
    options = EngineOptions(
        model=args.model, dtype=args.dtype, threads=args.threads, max_num_seqs=args.concurrency,
        device=args.device, quantization=args.quantization,
        max_num_batched_tokens=512, kv_cache_tokens=args.concurrency * 1024,
        enable_prefix_caching=False,  # each mode starts cold: no mode reuses another's prompts
    )  # fmt: skip
    engine = build_engine(options, progress=True)
    jobs = make_jobs(engine.tokenizer, args.num_requests, parse_range(args.prompt_tokens),
                     parse_range(args.output_tokens), args.seed)  # fmt: skip
    useful = sum(j.max_tokens for j in jobs)
    prompt_tokens = sum(len(j.prompt_ids) for j in jobs)
    engine.add_request("warm-up", jobs[0].prompt_ids, _params(4))
    _drain(engine, StepTally())
    results = []
    for mode in args.modes.split(","):
        tally = StepTally()
        if mode == "none":
            wall = run_none(engine, jobs, tally)
        elif mode == "static":
            wall = run_static(engine, jobs, args.concurrency, tally)
        elif mode == "continuous":
            wall = run_continuous(engine, jobs, args.concurrency, tally)
        else:
            print(f"unknown mode {mode!r}", file=sys.stderr)
            return 2
        results.append(ModeResult(mode, wall, useful, useful / wall, prompt_tokens, tally))
        print(f"{mode:>10}: {wall:7.1f} s  {useful / wall:7.1f} output tok/s", file=sys.stderr)
    print(report(results, len(jobs), args.concurrency), file=human(args.out))
    write_json(args.out, results)
    return 0


def report(results: list[ModeResult], num_requests: int, concurrency: int) -> str:
    """The modes side by side (markdown), then where each one's time went."""
    base = {r.mode: r.output_tokens_per_s for r in results}
    lines = ["| mode | wall (s) | output tok/s | vs none | vs static |", "|---|---|---|---|---|"]
    for r in results:
        vs_none = r.output_tokens_per_s / base["none"] if "none" in base else float("nan")
        vs_static = r.output_tokens_per_s / base["static"] if "static" in base else float("nan")
        lines.append(f"| {r.mode} | {r.wall_s:.1f} | {r.output_tokens_per_s:.1f} | {vs_none:.2f}x | {vs_static:.2f}x |")
    lines += [
        "",
        "| mode | steps | rows decoded | steps with prompt tokens (s) | decode-only steps | their time (s) "
        "| ms per decode-only step | rows per decode-only step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r.steps
        n = t.num_decode_only_steps or float("nan")
        per_step, rows = t.decode_only_steps_s / n * 1e3, t.num_decode_only_rows / n
        lines.append(
            f"| {r.mode} | {t.num_steps} | {t.num_decode_rows} | {t.prefill_steps_s:.1f} | {t.num_decode_only_steps} "
            f"| {t.decode_only_steps_s:.1f} | {per_step:.1f} | {rows:.1f} |"
        )
    prompt_tokens = results[0].prompt_tokens if results else 0
    output_tokens = results[0].output_tokens if results else 0
    lines.append(
        f"\n{num_requests} requests, {prompt_tokens} prompt tokens, {output_tokens} output tokens, concurrency {concurrency}"
    )
    return "\n".join(lines)


if __name__ == "__main__":  # python -m bench.batching: on a device machine without the package installed
    from argparse import ArgumentParser

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    sys.exit(run(parser.parse_args()))
