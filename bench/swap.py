"""`taxiway bench swap`: latency and failures while a reload moves `default` from model A to model B.

Starts ``taxiway serve --config FILE`` (a subprocess on a free port) with ``default`` on model A and
waits for ``/ready``. C closed-loop clients then stream short chat requests to ``default``
(``bench.loadgen.stream_chat``: fixed prompt length and ``max_tokens``, temperature 0). At
``--swap-at-s`` the file is rewritten so that ``default`` is on model B (A removed) and the server
is told to reload (SIGHUP, or ``POST /admin/reload``); the load runs on until ``--duration-s``.

Every request falls in one window, by its own start and end (seconds from the load's start):

* **steady**: started after the warm-up, ended before the signal — A alone;
* **swap**: still running at the signal or started before the first token from B plus
  ``--margin-s`` — the reload (B loading beside A), the switch, A draining and B's first requests;
* **after**: started after that — B alone.

A request is *failed* on an HTTP error or an error event, *truncated* when its stream lacks
``[DONE]`` or a ``finish_reason``, *mixed* when its events name more than one model. The exit
status is 1 when any request failed, was truncated or mixed, or B never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from argparse import ArgumentParser, Namespace
from datetime import datetime
from pathlib import Path

import httpx
import msgspec

from bench.loadgen import RequestResult, RequestSpec, percentile, stream_chat
from bench.served import served
from bench.report import add_json_flag, human, write_json


class WindowReport(msgspec.Struct):
    name: str
    start_s: float  # from the load's start
    end_s: float
    num_requests: int
    num_failed: int
    num_truncated: int
    latency_p50_s: float  # end to end, of the requests that did not fail
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    answered_by: dict[str, int]


class SwapParams(msgspec.Struct):
    """The run's shape: the command line's options of the same names."""

    via: str
    concurrency: int
    duration_s: float
    swap_at_s: float
    warmup_s: float
    margin_s: float
    prompt_words: int
    max_tokens: int


class SwapReport(msgspec.Struct):
    date: str
    machine: str
    command: str
    load_average_before: list[float]
    load_average_after: list[float]
    params: SwapParams
    model_a: str  # the entry names, as the responses' ``model`` says
    model_b: str
    config_a: str
    config_b: str
    num_requests: int
    num_failed: int
    num_truncated: int
    num_mixed: int  # responses whose events name more than one model
    num_a_after_first_b: int  # requests sent after B's first token and answered by A (should be 0)
    signal_to_first_b_s: float | None  # the signal to the first token from B
    server_events_s: dict[str, float]  # the server's log: each of _EVENTS, first logged after the signal
    slowest: list[list[float | str]]  # the 5 slowest requests: [start after the signal, TTFT, E2E, models]
    steady: WindowReport
    swap: WindowReport
    after: WindowReport | None
    latency_p99_ratio: float  # swap / steady
    ttft_p99_ratio: float
    first_error: str = ""


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="the config served first, `default` on model A (needs --config-b); "
                             "default: one written from --model-a/--model-b")  # fmt: skip
    parser.add_argument("--config-b", type=Path, default=None, help="the config written over it at the swap")
    parser.add_argument("--model-a", default="smollm2-135m-instruct",
                        help="engine `model` of A: catalogue name, .gguf path or HF directory")  # fmt: skip
    parser.add_argument("--model-b", default=None, help="engine `model` of B (default: A's)")
    parser.add_argument("--options", default="",
                        help='engine options for both, as TOML inline-table items (e.g. \'threads = 2\')')  # fmt: skip
    parser.add_argument("--options-b", default=None,
                        help="more options for B (default: 'quantization = \"int8\"' when B is A's model)")  # fmt: skip
    parser.add_argument("--via", choices=("sighup", "admin"), default="sighup", help="how the reload is asked for")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration-s", type=float, default=20.0)
    parser.add_argument("--swap-at-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=2.0, help="requests started before this are left out")
    parser.add_argument("--margin-s", type=float, default=3.0, help="the swap window's end after B's first token")
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="wait for the server's /ready (s)")
    add_json_flag(parser, dest="out")


def run(args: Namespace) -> int:
    """Run the swap under load and print the windows' table; 1 if any request failed."""
    try:
        config_a, config_b = _configs(args)
        name_a, name_b = _default_entry(config_a, "--config"), _default_entry(config_b, "--config-b")
    except (ValueError, OSError) as exc:
        print(f"taxiway bench swap: {exc}", file=sys.stderr)
        return 2
    if not 0 < args.swap_at_s < args.duration_s:
        print("taxiway bench swap: want 0 < --swap-at-s < --duration-s", file=sys.stderr)
        return 2
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="taxiway-bench-swap-") as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(config_a)
        log = Path(tmp) / "server.log"
        with served(path, log, args.ready_timeout) as (url, proc):
            results, signal_s, signal_wall = asyncio.run(_load(args, url, proc, path, config_b))
        events = server_events(log, signal_wall)
    report = summarise(msgspec.convert(vars(args), SwapParams), results, signal_s, (name_a, name_b),
                       (config_a, config_b))  # fmt: skip
    report.server_events_s = events
    report.load_average_before, report.load_average_after = load_before, list(os.getloadavg())
    print(format_report(report), file=human(args.out))
    write_json(args.out, report)
    broken = report.num_failed + report.num_truncated + report.num_mixed + report.num_a_after_first_b
    return 1 if broken or report.signal_to_first_b_s is None else 0


# ---------------------------------------------------------------------------------------------
# the two configs


def _configs(args: Namespace) -> tuple[str, str]:
    if (args.config is None) != (args.config_b is None):
        raise ValueError("--config and --config-b go together")
    if args.config is not None:
        return args.config.read_text(), args.config_b.read_text()
    model_b = args.model_b or args.model_a
    extra_b = args.options_b if args.options_b is not None else ('quantization = "int8"' if not args.model_b else "")
    a = _engine_entry("model-a", args.model_a, args.options)
    b = _engine_entry("model-b", model_b, ", ".join(x for x in (args.options, extra_b) if x))
    if tomllib.loads(a)["models"][0]["options"] == tomllib.loads(b)["models"][0]["options"]:
        raise ValueError("model A and model B have the same options: give --model-b or --options-b")
    return a, b


def _engine_entry(name: str, model: str, options: str) -> str:
    items = ", ".join(x for x in (f"model = {_toml_string(model)}", options) if x)
    text = f'[[models]]\nname = "{name}"\naliases = ["default"]\nbackend = "engine"\noptions = {{ {items} }}\n'
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"options of {name} are not TOML inline-table items ({exc}): {options!r}") from exc
    return text


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _default_entry(config: str, flag: str) -> str:
    """The name of the entry that answers ``default``: responses carry it as their ``model``."""
    try:
        models = tomllib.loads(config).get("models", [])
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{flag}: {exc}") from exc
    for entry in models:
        if entry.get("name") == "default" or "default" in entry.get("aliases", ()):
            return str(entry["name"])
    raise ValueError(f"{flag}: no [[models]] entry is named or aliased `default`")


# ---------------------------------------------------------------------------------------------
# the server


# ---------------------------------------------------------------------------------------------
# the load


async def _load(
    args: Namespace, url: str, proc: subprocess.Popen[bytes], path: Path, config_b: str
) -> tuple[list[RequestResult], float, float]:
    """Every request's result, with ``started_s`` from the load's start; the signal's time from the
    load's start and by the wall clock."""
    spec = RequestSpec(prompt_words=args.prompt_words, max_tokens=args.max_tokens)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    results: list[RequestResult] = []
    counter = iter(range(sys.maxsize))
    start = time.perf_counter()
    stop_at = start + args.duration_s

    async def client_loop(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < stop_at:
            results.append(await stream_chat(client, "default", spec, next(counter), 0.0))

    async def swap(client: httpx.AsyncClient) -> tuple[float, float]:
        await asyncio.sleep(max(0.0, start + args.swap_at_s - time.perf_counter()))
        path.write_text(config_b)
        signalled, wall = time.perf_counter(), time.time()
        if args.via == "sighup":
            proc.send_signal(signal.SIGHUP)
        else:
            response = await client.post(f"{url}/admin/reload", timeout=args.ready_timeout)
            if response.status_code != 200:
                raise RuntimeError(f"POST /admin/reload: {response.status_code} {response.text}")
        return signalled - start, wall

    async with httpx.AsyncClient(base_url=f"{url}/v1", limits=limits, timeout=args.timeout) as client:
        async with httpx.AsyncClient() as admin:
            *_, (signal_s, wall) = await asyncio.gather(*(client_loop(client) for _ in range(args.concurrency)),
                                                        swap(admin))  # fmt: skip
    for result in results:
        result.started_s -= start
    return results, signal_s, wall


# what the server logs about a reload (gateway/fleet.py; engine.ready: the engine backend)
_EVENTS = ("backend.starting", "engine.ready", "config.reloaded", "backend.retired")


def server_events(log: Path, signal_wall: float) -> dict[str, float]:
    """Seconds from the signal to each of ``_EVENTS`` first logged after it (JSON log lines)."""
    seen: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        name, stamp = event.get("event"), event.get("timestamp")
        if name in _EVENTS and name not in seen and stamp:
            after = datetime.fromisoformat(stamp).timestamp() - signal_wall
            if after >= 0:
                seen[name] = after
    return seen


# ---------------------------------------------------------------------------------------------
# the report


def _is_truncated(result: RequestResult) -> bool:
    return result.ok and not (result.is_done and result.finish_reason)


def _window(name: str, start_s: float, end_s: float, results: list[RequestResult]) -> WindowReport:
    good = [r for r in results if r.ok]
    answered: dict[str, int] = {}
    for r in good:
        key = "+".join(r.models) or "?"
        answered[key] = answered.get(key, 0) + 1
    return WindowReport(
        name=name,
        start_s=start_s,
        end_s=end_s,
        num_requests=len(results),
        num_failed=len(results) - len(good),
        num_truncated=sum(_is_truncated(r) for r in results),
        latency_p50_s=percentile([r.latency_s for r in good], 0.5),
        latency_p99_s=percentile([r.latency_s for r in good], 0.99),
        ttft_p50_s=percentile([r.ttft_s for r in good], 0.5),
        ttft_p99_s=percentile([r.ttft_s for r in good], 0.99),
        answered_by=answered,
    )


def summarise(
    params: SwapParams, results: list[RequestResult], signal_s: float, names: tuple[str, str], configs: tuple[str, str]
) -> SwapReport:
    name_a, name_b = names
    from_b = [r.started_s + r.ttft_s for r in results if r.ok and r.models == [name_b]]
    first_b = min(from_b, default=None)
    swap_end = min(params.duration_s, first_b + params.margin_s) if first_b is not None else float("inf")
    steady = [r for r in results if r.started_s >= params.warmup_s and r.started_s + r.latency_s <= signal_s]
    swap = [r for r in results if r.started_s < swap_end and r.started_s + r.latency_s > signal_s]
    after = [r for r in results if r.started_s >= swap_end]
    end_s = max((r.started_s + r.latency_s for r in results), default=params.duration_s)
    steady_w = _window("steady", params.warmup_s, signal_s, steady)
    swap_w = _window("swap", signal_s, min(swap_end, end_s), swap)
    errors = [r.error for r in results if not r.ok]
    return SwapReport(
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        command="taxiway bench swap " + " ".join(sys.argv[3:]),
        load_average_before=[],
        load_average_after=[],
        params=params,
        model_a=name_a,
        model_b=name_b,
        config_a=configs[0],
        config_b=configs[1],
        num_requests=len(results),
        num_failed=len(errors),
        num_truncated=sum(_is_truncated(r) for r in results),
        num_mixed=sum(len(r.models) > 1 for r in results),
        num_a_after_first_b=sum(first_b is not None and r.started_s > first_b and name_a in r.models for r in results),
        signal_to_first_b_s=None if first_b is None else first_b - signal_s,
        server_events_s={},
        slowest=[[r.started_s - signal_s, r.ttft_s, r.latency_s, "+".join(r.models)]
                 for r in sorted(results, key=lambda r: -r.latency_s)[:5]],  # fmt: skip
        steady=steady_w,
        swap=swap_w,
        after=_window("after", swap_end, end_s, after) if after else None,
        latency_p99_ratio=swap_w.latency_p99_s / steady_w.latency_p99_s,
        ttft_p99_ratio=swap_w.ttft_p99_s / steady_w.ttft_p99_s,
        first_error=errors[0] if errors else "",
    )


def format_report(r: SwapReport) -> str:
    switch = "never" if r.signal_to_first_b_s is None else f"{r.signal_to_first_b_s:.2f} s"
    rows = [
        f"taxiway bench swap — {r.date} — {r.machine} — load average {r.load_average_before[0]:.2f} before, "
        f"{r.load_average_after[0]:.2f} after",
        f"C={r.params.concurrency}, {r.params.duration_s:g} s, {r.params.via} at {r.params.swap_at_s:g} s: "
        f"`default` from {r.model_a} to {r.model_b}; signal to B's first token: {switch}",
        "",
        "| window | from–to (s) | requests | failed | truncated | E2E p50 / p99 (s) | TTFT p50 / p99 (s) | answered by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in (r.steady, r.swap, r.after):
        if w is not None:
            who = ", ".join(f"{k} {v}" for k, v in sorted(w.answered_by.items()))
            rows.append(
                f"| {w.name} | {w.start_s:.1f}–{w.end_s:.1f} | {w.num_requests} | {w.num_failed} | {w.num_truncated} "
                f"| {w.latency_p50_s:.2f} / {w.latency_p99_s:.2f} | {w.ttft_p50_s:.2f} / {w.ttft_p99_s:.2f} | {who} |"
            )
    rows += [
        "",
        f"p99 swap / steady: E2E {r.latency_p99_ratio:.2f}x, TTFT {r.ttft_p99_ratio:.2f}x; "
        f"{r.num_requests} requests, {r.num_failed} failed, {r.num_truncated} truncated, {r.num_mixed} mixed, "
        f"{r.num_a_after_first_b} answered by A after B's first token",
    ]
    if r.server_events_s:
        rows.append("server log, after the signal: "
                    + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(r.server_events_s.items(), key=lambda kv: kv[1])))
    if r.first_error:
        rows.append(f"first error: {r.first_error}")
    return "\n".join(rows)
