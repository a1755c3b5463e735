"""`taxiway bench batching`: one workload, three ways of batching it, on the same engine.

- **none**: one request at a time.
- **static**: fixed batches of C requests; a batch runs until its longest request is done (every
  member computes that many steps, as padded batch generation does) and only then does the next
  batch start. Useful tokens are each request's own length.
- **continuous**: C requests in flight; a finished request's slot is refilled at the next step.

Output lengths are exact (``ignore_eos``), so every mode produces the same useful tokens.
"""

from __future__ import annotations

import random
import sys
import time
from argparse import ArgumentParser, Namespace

import msgspec


class Job(msgspec.Struct, frozen=True):
    prompt_ids: list[int]
    max_tokens: int


class ModeResult(msgspec.Struct):
    mode: str
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    prompt_tokens: int


def make_jobs(tokenizer, num: int, prompt: tuple[int, int], output: tuple[int, int], seed: int) -> list[Job]:  # type: ignore[no-untyped-def]
    from backends.engine.chat_template import ChatTemplate
    from gateway.bench.loadgen import RequestSpec, prompt_text
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


def _drain(engine) -> None:  # type: ignore[no-untyped-def]
    while engine.has_unfinished():
        engine.step()


def run_none(engine, jobs: list[Job]) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for i, job in enumerate(jobs):
        engine.add_request(f"none-{i}", job.prompt_ids, _params(job.max_tokens))
        _drain(engine)
    return time.perf_counter() - start


def run_static(engine, jobs: list[Job], batch: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for first in range(0, len(jobs), batch):
        group = jobs[first : first + batch]
        longest = max(j.max_tokens for j in group)
        for i, job in enumerate(group):
            engine.add_request(f"static-{first + i}", job.prompt_ids, _params(longest))
        _drain(engine)
    return time.perf_counter() - start


def run_continuous(engine, jobs: list[Job], concurrency: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    pending = list(enumerate(jobs))
    in_flight = 0
    while pending or in_flight:
        while pending and in_flight < concurrency:
            i, job = pending.pop(0)
            engine.add_request(f"cont-{i}", job.prompt_ids, _params(job.max_tokens))
            in_flight += 1
        for output in engine.step():
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
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the JSON results here")


def run(args: Namespace) -> int:
    from backends.engine.builder import EngineOptions, build_engine
    from gateway.bench.loadgen import parse_range
    from gateway.logs import configure_logging

    configure_logging("warning", stream=sys.stderr)
    options = EngineOptions(
        model=args.model, dtype=args.dtype, threads=args.threads, max_num_seqs=args.concurrency,
        max_num_batched_tokens=512, kv_cache_tokens=args.concurrency * 1024,
        enable_prefix_caching=False,  # each mode starts cold: no mode reuses another's prompts
    )  # fmt: skip
    engine = build_engine(options, progress=True)
    jobs = make_jobs(engine.tokenizer, args.num_requests, parse_range(args.prompt_tokens),
                     parse_range(args.output_tokens), args.seed)  # fmt: skip
    useful = sum(j.max_tokens for j in jobs)
    prompt_tokens = sum(len(j.prompt_ids) for j in jobs)
    engine.add_request("warm-up", jobs[0].prompt_ids, _params(4))
    _drain(engine)
    results = []
    for mode in args.modes.split(","):
        if mode == "none":
            wall = run_none(engine, jobs)
        elif mode == "static":
            wall = run_static(engine, jobs, args.concurrency)
        elif mode == "continuous":
            wall = run_continuous(engine, jobs, args.concurrency)
        else:
            print(f"unknown mode {mode!r}", file=sys.stderr)
            return 2
        results.append(ModeResult(mode, wall, useful, useful / wall, prompt_tokens))
        print(f"{mode:>10}: {wall:7.1f} s  {useful / wall:7.1f} output tok/s", file=sys.stderr)
    base = {r.mode: r.output_tokens_per_s for r in results}
    print("| mode | wall (s) | output tok/s | vs none | vs static |\n|---|---|---|---|---|")
    for r in results:
        vs_none = r.output_tokens_per_s / base["none"] if "none" in base else float("nan")
        vs_static = r.output_tokens_per_s / base["static"] if "static" in base else float("nan")
        print(f"| {r.mode} | {r.wall_s:.1f} | {r.output_tokens_per_s:.1f} | {vs_none:.2f}x | {vs_static:.2f}x |")
    print(f"\n{len(jobs)} requests, {prompt_tokens} prompt tokens, {useful} output tokens, concurrency {args.concurrency}")
    if args.out:
        with open(args.out, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(results)))
    return 0
