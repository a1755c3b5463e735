"""`taxiway bench soak`: many mixed requests against a real server; does anything leak?

Starts ``taxiway serve`` (a subprocess on a free port; the built-in default config — the default
chat model and ``embed`` — unless ``--config``; the usage ledger in a temporary directory) and sends
``--requests`` requests (10,000) from ``--concurrency`` closed-loop clients (32), a seeded mix:

  ============  =====  ==========================================================================
  chat            32%  whole chat completion
  chat_stream     24%  streamed, with ``stream_options.include_usage``
  completion      14%  whole text completion
  compl_stream    10%  streamed text completion
  disconnect      10%  a streamed chat the client closes after its first token
  invalid          5%  bad JSON, bytes that are not UTF-8, a wrong type, a bad sampling value, an
                       unknown model: each must be a 4xx
  embedding        5%  ``/v1/embeddings`` on ``embed`` (a chat request when no such model is served)
  ============  =====  ==========================================================================

Every ``--sample-s`` it records the server's RSS and open file descriptors (the process and its
children, psutil) and the KV blocks in use (``GET /v1/models/{model}/stats``). Reported: status
counts (and 5xx), streams ended by an error event or without ``[DONE]``, KV blocks in use at the
end, RSS growth from the end of the warm-up (``--warmup-fraction`` of the requests) to the end,
and open fds at the start (after one priming request of each kind: files opened on first use are
not a leak) against the end (after ``--settle-s``, once the idle connections are closed). Writes
a plot (``--plot``, matplotlib) and ``--json``. Exit status 1 when a target is missed: a 5xx, a
broken stream, a KV block in use at the end, RSS growth of 5% or more, fds above the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from argparse import ArgumentParser, Namespace
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.loadgen import RequestSpec, prompt_text
from bench.served import served
from bench.report import add_json_flag, human, write_json
from bench.soak_report import Sample, SoakParams, SoakReport, format_report, missed_targets, write_plot

KINDS = ("chat", "chat_stream", "completion", "compl_stream", "disconnect", "invalid", "embedding")
_WEIGHTS = (32, 24, 14, 10, 10, 5, 5)


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=10_000, help="how many requests in all (default 10000)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config to serve (default: the built-in default, its ledger in a temporary directory)")  # fmt: skip
    parser.add_argument("--model", default="default", help="the chat model the load asks for")
    parser.add_argument("--embedding-model", default="embed", help="the embedding model, when served")
    parser.add_argument("--prompt-words", default="8-48", help="prompt length range, words")
    parser.add_argument("--max-tokens", default="4-24", help="max_tokens range")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="RSS growth is measured after this share")
    parser.add_argument("--sample-s", type=float, default=2.0, help="RSS / fds / KV sampling interval")
    parser.add_argument("--settle-s", type=float, default=8.0, help="wait after the load before the last sample")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="wait for the server's /ready (s)")
    parser.add_argument("--plot", type=Path, default=Path("soak.svg"), help="RSS / fds / KV over time (.svg or .png)")
    add_json_flag(parser)


def run(args: Namespace) -> int:
    """Soak a server with mixed requests; report 5xx, KV blocks, RSS growth, fds, and plot them."""
    from bench.loadgen import parse_range

    try:
        prompt_words, max_tokens = parse_range(args.prompt_words), parse_range(args.max_tokens)
    except ValueError as exc:
        print(f"taxiway bench soak: {exc}", file=sys.stderr)
        return 2
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="taxiway-bench-soak-") as tmp:
        config = args.config if args.config is not None else _default_config(Path(tmp))
        with served(config, Path(tmp) / "server.log", args.ready_timeout) as (url, proc):
            report = asyncio.run(_soak(args, url, proc, prompt_words, max_tokens))
        report.server_exit_code = proc.returncode
    report.load_average_before, report.load_average_after = load_before, list(os.getloadavg())
    if args.plot:
        write_plot(report, args.plot)
    write_json(args.json, report)
    print(format_report(report), file=human(args.json))
    return 0 if not missed_targets(report) else 1


# ---------------------------------------------------------------------------------------------
# the server


def _default_config(tmp: Path) -> Path:
    from gateway.config import DEFAULT_CONFIG_TOML

    path = tmp / "config.toml"
    # as `taxiway serve` runs without a config, but the ledger's rows go to the temporary directory
    path.write_text(DEFAULT_CONFIG_TOML + f'\n[usage]\nurl = "sqlite:///{tmp}/usage.sqlite3"\n')
    return path


def _measure(proc: psutil.Process) -> tuple[int, int]:
    """RSS and open fds of the server and its children (a process may come and go between calls)."""
    rss = fds = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            rss += p.memory_info().rss
            fds += p.num_fds()
    return rss, fds


# ---------------------------------------------------------------------------------------------
# the load


class _Tally:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.by_kind: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
        self.num_stream_errors = self.num_truncated = self.num_unexpected = self.num_transport_errors = 0
        self.errors: list[str] = []
        self.num_done = 0

    def add(self, kind: str, status: str, error: str = "") -> None:
        self.statuses[status] += 1
        self.by_kind[kind][status] += 1
        self.num_done += 1
        if error and len(self.errors) < 10:
            self.errors.append(f"{kind} {status}: {error[:300]}")


def _invalid(i: int, model: str) -> tuple[str, bytes]:
    """Five kinds of bad request, each a 4xx when the gateway is right."""
    good = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    variant = (i // len(KINDS)) % 5
    if variant == 0:
        return "/chat/completions", b'{"model": "' + model.encode() + b'", "messages": [{"role": '
    if variant == 1:
        return "/chat/completions", b'{"model": "\xff\xfe", "messages": []}'
    if variant == 2:
        return "/chat/completions", json.dumps({**good, "messages": "not a list"}).encode()
    if variant == 3:
        return "/chat/completions", json.dumps({**good, "temperature": -1, "max_tokens": -5}).encode()
    return "/completions", json.dumps({"model": f"no-such-model-{i}", "prompt": "hi"}).encode()


async def _one(client: httpx.AsyncClient, i: int, kind: str, spec: RequestSpec, params: SoakParams, tally: _Tally) -> None:
    prompt = prompt_text(spec, i)
    model = params.model
    stream = kind in ("chat_stream", "compl_stream", "disconnect")
    if kind == "invalid":
        path, content = _invalid(i, model)
    elif kind == "embedding":
        path, content = "/embeddings", json.dumps({"model": params.embedding_model, "input": [prompt, f"{i}"]}).encode()
    elif kind in ("completion", "compl_stream"):
        body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": spec.max_tokens, "stream": stream}
        path, content = "/completions", json.dumps(body).encode()
    else:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream,
                "max_tokens": 64 if kind == "disconnect" else spec.max_tokens}  # fmt: skip
        if stream:
            body["stream_options"] = {"include_usage": True}
        path, content = "/chat/completions", json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    try:
        async with client.stream("POST", path, content=content, headers=headers) as response:
            status = str(response.status_code)
            if response.status_code != 200 or not stream:
                text = (await response.aread()).decode(errors="replace")
                expected = response.status_code // 100 == (4 if kind == "invalid" else 2)
                if not expected:
                    tally.num_unexpected += 1
                tally.add(kind, status, "" if expected and response.status_code < 500 else text)
                return
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    tally.num_stream_errors += 1
                    tally.add(kind, status, f"error event: {event['error']}")
                    return
                if kind == "disconnect" and event.get("choices"):
                    tally.add(kind, status)
                    return  # leaving the block closes the connection mid-stream
            if not done:
                tally.num_truncated += 1
            tally.add(kind, status, "" if done else "no [DONE]")
    except httpx.HTTPError as exc:
        tally.num_transport_errors += 1
        tally.add(kind, "transport_error", f"{type(exc).__name__}: {exc}")


async def _soak(
    args: Namespace, url: str, proc: subprocess.Popen[bytes], prompt_words: tuple[int, int], max_tokens: tuple[int, int]
) -> SoakReport:
    server = psutil.Process(proc.pid)
    # the side channel (stats) keeps no connection open: it would count in the server's fds
    async with httpx.AsyncClient(base_url=url, timeout=30, headers={"connection": "close"}) as side:
        embedding_model = args.embedding_model if await _serves(side, args.embedding_model) else None
        params = SoakParams(
            num_requests=args.requests, concurrency=args.concurrency, model=args.model, embedding_model=embedding_model,
            prompt_words=list(prompt_words), max_tokens=list(max_tokens), seed=args.seed,
            warmup_fraction=args.warmup_fraction, sample_s=args.sample_s, settle_s=args.settle_s,
        )  # fmt: skip
        rng = random.Random(args.seed)
        kinds = rng.choices(KINDS, weights=_WEIGHTS, k=args.requests)
        if embedding_model is None:
            kinds = ["chat" if k == "embedding" else k for k in kinds]
        specs = [RequestSpec(rng.randint(*prompt_words), rng.randint(*max_tokens)) for _ in range(args.requests)]

        async def kv_blocks() -> tuple[int, int]:
            response = await side.get(f"/v1/models/{args.model}/stats")
            if response.status_code != 200:
                return -1, 0
            stats = response.json()
            return int(stats.get("kv_blocks_used", -1)), int(stats.get("kv_blocks_total", 0))

        # priming: one request of each kind, so that files opened on first use count as the start
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        async with httpx.AsyncClient(base_url=f"{url}/v1", limits=limits, timeout=args.timeout) as client:
            priming = _Tally()
            for j, kind in enumerate(k for k in KINDS if embedding_model is not None or k != "embedding"):
                await _one(client, -1 - j, kind, specs[0], params, priming)
        await asyncio.sleep(args.settle_s)
        rss_start, fds_start = _measure(server)

        tally = _Tally()
        samples: list[Sample] = []
        start = time.perf_counter()

        async def sampler() -> None:
            while True:
                rss, fds = _measure(server)
                used, _ = await kv_blocks()
                samples.append(Sample(time.perf_counter() - start, tally.num_done, rss, fds, used))
                await asyncio.sleep(args.sample_s)

        counter = iter(range(args.requests))
        async with httpx.AsyncClient(base_url=f"{url}/v1", limits=limits, timeout=args.timeout) as client:

            async def client_loop() -> None:
                for i in counter:
                    await _one(client, i, kinds[i], specs[i], params, tally)

            sampling = asyncio.create_task(sampler())
            await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
            duration_s = time.perf_counter() - start
        sampling.cancel()  # quiet from here: the sampler's own requests would hold a connection open
        rss, fds = _measure(server)
        used, _ = await kv_blocks()
        samples.append(Sample(time.perf_counter() - start, tally.num_done, rss, fds, used))
        await asyncio.sleep(args.settle_s)  # the server closes its idle connections (idle_timeout_s)
        rss_end, fds_end = _measure(server)
        used_end, total = await kv_blocks()
        samples.append(Sample(time.perf_counter() - start, tally.num_done, rss_end, fds_end, used_end))

    warm = next((s for s in samples if s.num_done >= args.warmup_fraction * args.requests), samples[-1])
    after_warm = [s.rss_bytes for s in samples if s.t_s >= warm.t_s]
    statuses = dict(sorted(tally.statuses.items()))
    return SoakReport(
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        command="taxiway bench soak " + " ".join(sys.argv[3:]),
        params=params,
        duration_s=duration_s,
        requests_per_s=args.requests / duration_s,
        statuses=statuses,
        by_kind={kind: dict(sorted(c.items())) for kind, c in tally.by_kind.items() if c},
        num_5xx=sum(n for status, n in statuses.items() if status.startswith("5")),
        num_stream_errors=tally.num_stream_errors,
        num_truncated=tally.num_truncated,
        num_unexpected=tally.num_unexpected,
        num_transport_errors=tally.num_transport_errors,
        kv_blocks_used_end=used_end,
        kv_blocks_total=total,
        rss_start_bytes=rss_start,
        rss_warm_bytes=warm.rss_bytes,
        rss_end_bytes=rss_end,
        rss_peak_after_warm_bytes=max(after_warm),
        rss_growth_pct=100.0 * (rss_end - warm.rss_bytes) / warm.rss_bytes,
        fds_start=fds_start,
        fds_end=fds_end,
        server_exit_code=None,
        load_average_before=[],
        load_average_after=[],
        first_errors=tally.errors,
        samples=samples,
    )


async def _serves(client: httpx.AsyncClient, model: str) -> bool:
    """Whether ``model`` (a name or an alias) answers: /v1/models lists names only."""
    return (await client.get(f"/v1/models/{model}")).status_code == 200
