"""`taxiway bench serving`: a closed-loop load generator for any OpenAI-compatible server.

Each concurrency level runs the same seeded workload: C clients, each sending its next streaming
chat request as soon as its last one finished. Reported per level: output tokens/s and requests/s
over the level's wall time, time to first token, inter-token latency and end-to-end latency
(p50/p95). Works against Taxiway, llama.cpp's server, vLLM — anything that speaks
``/v1/chat/completions`` with SSE.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from argparse import ArgumentParser, Namespace
from pathlib import Path

import httpx
import msgspec

from bench.report import add_json_flag, human, write_json

# Common English words: each is one token in most BPE vocabularies, so a prompt of N words is
# close to N tokens. Exact counts come back from the server's usage report.
_WORDS = (
    "the of and to in is was for on that with as by at from his her they this which are have not "
    "but had one were their all can said there use an each she do how will up other about out many "
    "then them these so some would make like him into time has look two more write go see number "
    "way could people my than first water been call who oil its now find long down day did get come "
    "made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line"
).split()


class RequestSpec(msgspec.Struct, frozen=True):
    prompt_words: int
    max_tokens: int


class RequestResult(msgspec.Struct):
    ok: bool  # a 200 whose stream carried no error event (``is_done`` says if it was whole)
    error: str = ""
    started_s: float = 0.0  # time.perf_counter() when the request was sent
    ttft_s: float = 0.0
    latency_s: float = 0.0  # until the stream ended, or until the request failed
    output_tokens: int = 0
    prompt_tokens: int = 0
    itl_s: list[float] = []
    models: list[str] = []  # the events' ``model``, each name once, in the order seen
    finish_reason: str = ""
    is_done: bool = False  # the stream ended with ``data: [DONE]``


class LevelReport(msgspec.Struct):
    concurrency: int
    num_requests: int
    num_errors: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p50_ms: float
    itl_p95_ms: float
    latency_p50_s: float
    latency_p95_s: float
    first_error: str = ""


class BenchReport(msgspec.Struct):
    base_url: str
    model: str
    date: str
    prompt_tokens: str
    output_tokens: str
    levels: list[LevelReport]


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    lo = int(low)
    hi = int(high) if high else lo
    if lo < 1 or hi < lo:
        raise ValueError(f"bad range {text!r}: want N or LOW-HIGH with 1 <= LOW <= HIGH")
    return lo, hi


def make_workload(num: int, prompt: tuple[int, int], output: tuple[int, int], seed: int) -> list[RequestSpec]:
    rng = random.Random(seed)
    return [RequestSpec(rng.randint(*prompt), rng.randint(*output)) for _ in range(num)]


def prompt_text(spec: RequestSpec, index: int) -> str:
    # A distinct opening per request keeps a prefix cache from serving whole prompts.
    rng = random.Random(index)
    words = [rng.choice(_WORDS) for _ in range(spec.prompt_words)]
    return f"Request {index}: " + " ".join(words)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def stream_chat(
    client: httpx.AsyncClient, model: str, spec: RequestSpec, index: int, temperature: float
) -> RequestResult:
    """One streaming chat request, read to its end; failures come back as ``ok=False``, never raised."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt_text(spec, index)}],
        "max_tokens": spec.max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = 0.0
    last = 0.0
    itl: list[float] = []
    chunks = 0
    usage: dict | None = None
    models: list[str] = []
    finish_reason = ""
    is_done = False

    def failed(error: str) -> RequestResult:
        return RequestResult(ok=False, error=error, started_s=start, latency_s=time.perf_counter() - start,
                             models=models)  # fmt: skip

    try:
        async with client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return failed(f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    is_done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    return failed(str(event["error"])[:200])
                if event.get("model") and event["model"] not in models:
                    models.append(event["model"])
                if event.get("usage"):
                    usage = event["usage"]
                for choice in event.get("choices") or ():
                    finish_reason = choice.get("finish_reason") or finish_reason
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        if first == 0.0:
                            first = now
                        else:
                            itl.append(now - last)
                        last = now
                        chunks += 1
    except httpx.HTTPError as exc:
        return failed(f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    return RequestResult(
        ok=True,
        started_s=start,
        ttft_s=(first or end) - start,
        latency_s=end - start,
        output_tokens=int(usage["completion_tokens"]) if usage else chunks,
        prompt_tokens=int(usage["prompt_tokens"]) if usage else 0,
        itl_s=itl,
        models=models,
        finish_reason=finish_reason,
        is_done=is_done,
    )


async def run_level(
    base_url: str,
    model: str,
    api_key: str | None,
    workload: list[RequestSpec],
    concurrency: int,
    temperature: float,
    timeout_s: float,
    progress: bool,
) -> LevelReport:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(workload)):
        queue.put_nowait(i)
    results: list[RequestResult] = []
    bar = _progress_bar(len(workload), f"C={concurrency}", progress)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await stream_chat(client, model, workload[index], index, temperature))
            bar.update(1)

    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, limits=limits, timeout=timeout_s
    ) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    bar.close()

    good = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    itl = [x for r in good for x in r.itl_s]
    out_tokens = sum(r.output_tokens for r in good)
    return LevelReport(
        concurrency=concurrency,
        num_requests=len(results),
        num_errors=len(errors),
        wall_s=wall,
        output_tokens=out_tokens,
        output_tokens_per_s=out_tokens / wall,
        requests_per_s=len(good) / wall,
        ttft_p50_s=percentile([r.ttft_s for r in good], 0.5),
        ttft_p95_s=percentile([r.ttft_s for r in good], 0.95),
        itl_p50_ms=percentile(itl, 0.5) * 1e3,
        itl_p95_ms=percentile(itl, 0.95) * 1e3,
        latency_p50_s=percentile([r.latency_s for r in good], 0.5),
        latency_p95_s=percentile([r.latency_s for r in good], 0.95),
        first_error=errors[0].error if errors else "",
    )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, leave=True)


def write_plot(report: BenchReport, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conc = [lv.concurrency for lv in report.levels]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(conc, [lv.output_tokens_per_s for lv in report.levels], marker="o")
    ax1.set_xlabel("concurrency")
    ax1.set_ylabel("output tokens/s")
    ax1.set_xscale("log", base=2)
    ax1.grid(True, alpha=0.3)
    ax2.plot(conc, [lv.ttft_p50_s for lv in report.levels], marker="o", label="p50")
    ax2.plot(conc, [lv.ttft_p95_s for lv in report.levels], marker="x", label="p95")
    ax2.set_xlabel("concurrency")
    ax2.set_ylabel("time to first token (s)")
    ax2.set_xscale("log", base=2)
    ax2.legend()
    ax2.grid(True, alpha=0.3)
    fig.suptitle(f"{report.model} @ {report.base_url}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(report: BenchReport) -> str:
    rows = [
        "| C | requests | errors | out tok/s | req/s | TTFT p50 / p95 (s) | ITL p50 / p95 (ms) | E2E p50 / p95 (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lv in report.levels:
        rows.append(
            f"| {lv.concurrency} | {lv.num_requests} | {lv.num_errors} | {lv.output_tokens_per_s:.1f} "
            f"| {lv.requests_per_s:.2f} | {lv.ttft_p50_s:.2f} / {lv.ttft_p95_s:.2f} "
            f"| {lv.itl_p50_ms:.1f} / {lv.itl_p95_ms:.1f} | {lv.latency_p50_s:.2f} / {lv.latency_p95_s:.2f} |"
        )
    return "\n".join(rows)


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="server's /v1 URL")
    parser.add_argument("--model", default="default", help="model name to request")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument("--num-requests", type=int, default=0,
                        help="requests per level (default: max(16, 4 x concurrency))")
    parser.add_argument("--prompt-tokens", default="16-512", help="N or LOW-HIGH (uniform)")
    parser.add_argument("--output-tokens", default="128", help="N or LOW-HIGH (uniform)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    add_json_flag(parser, dest="out")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    parser.add_argument("--no-progress", action="store_true")


def run(args: Namespace) -> int:
    """Load-test any OpenAI-compatible server: TTFT, latency and tokens/s per concurrency."""
    try:
        prompt_range = parse_range(args.prompt_tokens)
        output_range = parse_range(args.output_tokens)
        levels = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
    except ValueError as exc:
        print(f"taxiway bench serving: {exc}", file=sys.stderr)
        return 2
    reports = []
    for conc in levels:
        num = args.num_requests or max(16, 4 * conc)
        workload = make_workload(num, prompt_range, output_range, args.seed)
        report = asyncio.run(
            run_level(args.base_url, args.model, args.api_key, workload, conc,
                      args.temperature, args.timeout, not args.no_progress)
        )
        reports.append(report)
        print(f"C={conc}: {report.output_tokens_per_s:.1f} output tok/s, TTFT p50 {report.ttft_p50_s:.2f} s, "
              f"{report.num_errors} errors", file=sys.stderr, flush=True)  # fmt: skip
    bench = BenchReport(
        base_url=args.base_url,
        model=args.model,
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        levels=reports,
    )
    print(format_table(bench), file=human(args.out))
    write_json(args.out, bench)
    if args.plot:
        write_plot(bench, args.plot)
    return 1 if any(lv.num_errors == lv.num_requests for lv in reports) else 0
