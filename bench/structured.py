"""``taxiway bench structured``: output tokens/s of a json_schema workload vs the same workload
free, on the engine in process, continuous batching at a fixed concurrency, one run each.

The same chat prompts and ``max_tokens`` both ways; the constrained run gives every request
``SamplingParams.structured`` (the schema below), so its rows carry a grammar mask in each step.
Target (issue 17): constrained >= 0.85x the free output tokens/s.
"""

from __future__ import annotations

import json
import sys
import time
from argparse import ArgumentParser, Namespace

from bench.report import add_json_flag, human, write_json

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
        "bio": {"type": "string", "maxLength": 300},
    },
    "required": ["name", "age", "city", "hobbies", "bio"],
    "additionalProperties": False,
}
TOPICS = ["a chef", "a pilot", "a painter", "a farmer", "a nurse", "a teacher", "a poet", "a sailor"]


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    add_json_flag(parser, dest="out")


def _run(engine, prompts, params, concurrency: int) -> tuple[float, int, int]:  # type: ignore[no-untyped-def]
    """Wall seconds, output tokens and completed-with-stop count, ``concurrency`` in flight."""
    start = time.perf_counter()
    pending = list(enumerate(prompts))
    in_flight = tokens = stopped = 0
    while pending or in_flight:
        while pending and in_flight < concurrency:
            i, ids = pending.pop(0)
            engine.add_request(f"r{i}-{id(params)}", ids, params)
            in_flight += 1
        for output in engine.step():
            for item in output.items:
                if hasattr(item, "token_ids"):
                    tokens += len(item.token_ids)
                    stopped += item.finish_reason == "stop"
            if output.finished:
                in_flight -= 1
    return time.perf_counter() - start, tokens, stopped


def run(args: Namespace) -> int:
    """Output tokens/s of a json_schema-constrained workload vs the same workload free."""
    from backends.engine.builder import EngineOptions, build_engine
    from backends.engine.text.chat_template import ChatTemplate
    from gateway.interface import ChatMessage, SamplingParams, StructuredOutput
    from gateway.logs import configure_logging

    configure_logging("warning", stream=sys.stderr)
    options = EngineOptions(
        model=args.model, threads=args.threads, max_num_seqs=args.concurrency, max_num_batched_tokens=512,
        kv_cache_tokens=args.concurrency * 1024,
    )  # fmt: skip
    engine = build_engine(options, progress=True)
    template = ChatTemplate.from_tokenizer(engine.tokenizer)
    prompts = []
    for i in range(args.num_requests):
        text = f"Describe {TOPICS[i % len(TOPICS)]} number {i}: name, age, city, hobbies and a short bio."
        prompt = template.render([ChatMessage(role="user", content=text)])
        prompts.append(engine.tokenizer.encode(prompt, add_special_tokens=False))
    free = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=0)
    constrained = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.7, seed=0, structured=StructuredOutput(json_schema=json.dumps(SCHEMA))
    )
    _run(engine, prompts[:2], constrained, args.concurrency)  # warm-up: the grammar compiled, the kernels loaded
    results = {}
    for name, params in (("free", free), ("json_schema", constrained)):
        seconds, tokens, stopped = _run(engine, prompts, params, args.concurrency)
        results[name] = {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds,
                         "finished_stop": stopped}  # fmt: skip
        print(f"{name:12s} {tokens:6d} output tokens in {seconds:6.1f} s = {tokens / seconds:7.1f} tok/s "
              f"({stopped}/{len(prompts)} stopped, the rest at max_tokens)", file=human(args.out))  # fmt: skip
    ratio = results["json_schema"]["tokens_per_s"] / results["free"]["tokens_per_s"]
    results["ratio"] = ratio
    print(f"json_schema / free output tokens/s: {ratio:.2f}x (target >= 0.85x)", file=human(args.out))
    write_json(args.out, results)
    return 0
