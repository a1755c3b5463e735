"""``taxiway bench tp``: tensor parallel (tp=2, one thread per rank) against one process (tp=1, two
threads), in one run on one machine.

Both engines are built in this process (rank 1 of the tp=2 engine is a spawned worker) and
driven directly (no HTTP): greedy decoding of fixed prompts with EOS ignored, so every request
makes exactly ``--tokens`` tokens. Decode tokens/s counts the tokens sampled after every request
of the batch has its first token (prefill excluded), for one stream and for ``--concurrency``
streams; the rounds alternate tp=1 and tp=2 and the medians are reported.

It also measures the all-reduce alone: two processes (one thread each) connected like the
engine's ranks time gloo ``all_reduce`` of ``[B, hidden]`` tensors (median and mean: the latency
has a heavy tail of thread wake-ups, and a step pays the mean), which gives the floor a
tensor-parallel step pays on top of its halved compute: ``2 x num_layers`` all-reduces
(o_proj and down_proj of every layer), plus the embedding's and the logits' collectives.

Kept free of torch at import: building the CLI imports this module.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from bench.report import add_json_flag, human, write_json

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain, step by step, how a bicycle works.",
    "Describe the water cycle to a ten-year-old.",
    "List every planet of the solar system with one fact about each.",
    "What makes a good cup of coffee? Answer in detail.",
    "Summarise the history of the printing press.",
    "Give me a week of vegetarian dinner ideas.",
    "How do vaccines train the immune system?",
    "Write a poem about autumn in a big city.",
    "Compare trains and planes for a 500 km trip.",
    "Explain recursion with an example in Python.",
    "What should I pack for a hiking weekend?",
    "Tell me about the life of octopuses.",
    "How does compound interest work?",
    "Describe a day in the life of a medieval baker.",
    "Why do leaves change colour in autumn?",
]


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``taxiway bench tp``."""
    parser.description = "Engine decode tokens/s: tensor parallel tp=2 (one thread per rank) vs tp=1 (two threads)."
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name, .gguf file or HF directory")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--concurrency", type=int, default=16, help="streams in the batched measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating tp=1 / tp=2 rounds (medians reported)")
    parser.add_argument("--threads", type=int, default=2, help="cores to use: tp=1 gets them all, tp=2 one per rank")
    parser.add_argument("--allreduce-iters", type=int, default=300)
    add_json_flag(parser)


def run(args: argparse.Namespace) -> int:
    """Benchmark tensor parallelism (tp=2 vs tp=1) on this machine."""
    import torch

    from backends.engine.builder import EngineOptions, build_engine
    from backends.engine.tp.engine import build_tp_engine

    base = EngineOptions(
        model=args.model, dtype=args.dtype, max_num_seqs=max(16, args.concurrency), max_num_batched_tokens=1024,
        kv_cache_tokens=max(4096, args.concurrency * (args.tokens + 128)),
    )  # fmt: skip
    threads = args.threads
    per_rank = max(1, threads // 2)
    load_before = os.getloadavg()[0]
    print("loading tp=1 and tp=2 engines ...", file=sys.stderr)
    single = build_engine(_replace(base, tensor_parallel=1, threads=threads))
    tp = build_tp_engine(_replace(base, tensor_parallel=2, threads=per_rank))
    try:
        config = single.runner.config
        print("timing gloo all_reduce between 2 processes (1 thread each) ...", file=sys.stderr)
        allreduce = measure_allreduce(config.hidden_size, args.allreduce_iters)
        results: dict[str, list[dict[str, float]]] = {}
        for round_ in range(args.rounds):
            # tp1x1: the same tp=1 engine on one thread, the fair per-core reference on a busy machine
            for name, engine, n_threads in (("tp1", single, threads), ("tp1x1", single, 1), ("tp2", tp, per_rank)):
                torch.set_num_threads(n_threads)  # process-wide: rank 0 shares this process with tp=1
                for streams in (1, args.concurrency):
                    key = f"{name}/c{streams}"
                    prompts = PROMPTS * (streams // len(PROMPTS) + 1)
                    figures = decode_rate(engine, prompts, streams, args.tokens)
                    results.setdefault(key, []).append(figures)
                    print(f"round {round_ + 1} {key}: {figures['tokens_per_s']:.1f} tok/s, "
                          f"{figures['ms_per_step']:.2f} ms/step", file=sys.stderr)  # fmt: skip
        report = summarise(results, allreduce, config, args, tp.rank_weight_bytes)
        report["load_avg_before_after"] = [load_before, os.getloadavg()[0]]
    finally:
        tp.close()
    print(format_report(report), file=human(args.json))
    write_json(args.json, report)
    return 0


def _replace(options: Any, **changes: Any) -> Any:
    import msgspec

    return msgspec.structs.replace(options, **changes)


def decode_rate(engine: Any, prompts: list[str], streams: int, tokens: int) -> dict[str, float]:
    """Greedy decode of ``streams`` requests; tokens/s and ms/step after every request's first token."""
    from gateway.interface import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    ids = [engine.tokenizer.encode(p) for p in prompts[:streams]]
    for i, prompt in enumerate(ids):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", prompt, params)
    started: set[str] = set()
    while len(started) < streams:  # prefill (and the first token of each)
        started.update(o.request_id for o in engine.step())
    t0 = time.perf_counter()
    generated = steps = 0
    while engine.has_unfinished():
        for output in engine.step():
            generated += sum(len(getattr(item, "token_ids", ()) or ()) for item in output.items)
        steps += 1
    elapsed = time.perf_counter() - t0
    return {"tokens_per_s": generated / elapsed, "ms_per_step": 1000 * elapsed / max(steps, 1), "steps": steps}


# --------------------------------------------------------------------------------------------
# the all-reduce alone


def measure_allreduce(hidden: int, iters: int) -> dict[str, float]:
    """µs per gloo all_reduce of ``[B, hidden]`` between two local processes, per dtype and B."""
    import torch

    from backends.engine.tp.comm import LoopbackStore

    server = LoopbackStore(2)
    ctx = torch.multiprocessing.get_context("spawn")
    peer = ctx.Process(target=_allreduce_peer, args=(server.port, hidden, iters), daemon=True)
    peer.start()
    try:
        return _allreduce_loop(server.store, 0, hidden, iters)
    finally:
        peer.join(60)
        if peer.exitcode is None:
            peer.kill()
        server.close()


def _allreduce_peer(port: int, hidden: int, iters: int) -> None:
    import torch.distributed as dist

    from backends.engine.tp.comm import STORE_TIMEOUT

    _allreduce_loop(dist.TCPStore("127.0.0.1", port, 2, False, STORE_TIMEOUT), 1, hidden, iters)


def _allreduce_loop(store: Any, rank: int, hidden: int, iters: int) -> dict[str, float]:
    import torch

    from backends.engine.tp.comm import TPGroup

    torch.set_num_threads(1)
    group = TPGroup(rank, 2)
    group.connect(store, loopback=True)
    out: dict[str, float] = {}
    try:
        for dtype in (torch.bfloat16, torch.float32):
            for rows in (1, 16):
                x = torch.ones(rows, hidden, dtype=dtype)
                for _ in range(20):
                    group.all_reduce(x)
                times = []
                for _ in range(iters):
                    t0 = time.perf_counter()
                    group.all_reduce(x)
                    times.append(time.perf_counter() - t0)
                name = f"{str(dtype).removeprefix('torch.')}/B{rows}"
                out[f"{name}/median"] = 1e6 * statistics.median(times)
                out[f"{name}/mean"] = 1e6 * statistics.fmean(times)  # the tail is heavy: a step pays the mean
    finally:
        group.close()
    return out


# --------------------------------------------------------------------------------------------
# report


def summarise(
    results: dict[str, list[dict[str, float]]], allreduce: dict[str, float], config: Any, args: Any,
    rank_bytes: list[int],
) -> dict[str, Any]:  # fmt: skip
    fields = ("tokens_per_s", "ms_per_step")
    med = {k: {f: statistics.median(r[f] for r in runs) for f in fields} for k, runs in results.items()}
    dtype = args.dtype
    per_layer = 2 * config.num_layers
    report: dict[str, Any] = {
        "model": args.model, "dtype": dtype, "tokens": args.tokens, "concurrency": args.concurrency,
        "rounds": args.rounds, "threads": args.threads, "medians": med, "allreduce_us": allreduce,
        "rank_weight_bytes": rank_bytes, "num_layers": config.num_layers, "hidden_size": config.hidden_size,
    }  # fmt: skip
    for streams in (1, args.concurrency):
        one, one_x1, two = med[f"tp1/c{streams}"], med[f"tp1x1/c{streams}"], med[f"tp2/c{streams}"]
        us = allreduce.get(f"{dtype}/B{1 if streams == 1 else 16}/mean", float("nan"))
        report[f"c{streams}"] = {
            "tp2_over_tp1": two["tokens_per_s"] / one["tokens_per_s"],
            "tp2_over_tp1x1": two["tokens_per_s"] / one_x1["tokens_per_s"],
            "step_ms_tp1": one["ms_per_step"],
            "step_ms_tp1x1": one_x1["ms_per_step"],
            "step_ms_tp2": two["ms_per_step"],
            "allreduce_ms_per_step": per_layer * us / 1000,
        }
    return report


def format_report(report: dict[str, Any]) -> str:
    med = report["medians"]
    c = report["concurrency"]
    lines = [
        f"model {report['model']}, {report['dtype']}, {report['tokens']} tokens per request, "
        f"medians of {report['rounds']} rounds; weights per rank: "
        + ", ".join(f"{b / 2**20:.1f} MiB" for b in report["rank_weight_bytes"]),
        "",
        "| streams | tok/s tp=1 (2 thr) | tp=1 (1 thr) | tp=2 (1 thr/rank) | tp2 / tp1 | tp2 / tp1 (1 thr) "
        "| ms/step tp=1 (2 thr) | tp=1 (1 thr) | tp=2 | all-reduce ms/step (2 x layers x mean) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for streams in (1, c):
        r = report[f"c{streams}"]
        rates = [med[f"{k}/c{streams}"]["tokens_per_s"] for k in ("tp1", "tp1x1", "tp2")]
        lines.append(
            f"| {streams} | {rates[0]:.1f} | {rates[1]:.1f} | {rates[2]:.1f} | {r['tp2_over_tp1']:.2f}x "
            f"| {r['tp2_over_tp1x1']:.2f}x | {r['step_ms_tp1']:.2f} | {r['step_ms_tp1x1']:.2f} "
            f"| {r['step_ms_tp2']:.2f} | {r['allreduce_ms_per_step']:.2f} |"
        )
    us = ", ".join(f"{k} {v:.0f}" for k, v in report["allreduce_us"].items())
    load = report.get("load_avg_before_after", ["?", "?"])
    lines += ["", f"gloo all_reduce, µs per call: {us}", f"load average (1 min) before / after: {load}"]
    return "\n".join(lines)
