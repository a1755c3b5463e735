"""The usage ledger on real servers: a real PostgreSQL (``pgserver``) and SQLite hold exactly one
row per request after 1,000 mixed requests, a SIGTERM in the middle and a database outage
(PostgreSQL stopped and started again; SQLite locked by another writer); ``/metrics`` parses with
prometheus_client's parser and its counters equal the ledger's; ``taxiway usage`` and
``GET /admin/usage`` report the same totals."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.stub_upstream import StubUpstream
from tests.conftest import ServerProcess, serve_process
from tests.plugins.ops_servers import Postgres, taxiway

CONFIG = """
[[models]]
name = "m"
aliases = ["default"]
backend = "openai"
options = {{ base_url = "http://127.0.0.1:{port}/v1", upstream_model = "stub" }}

[usage]
flush_interval_s = 0.1
{url}
"""


def _request(i: int) -> tuple[str, dict[str, object]]:
    """The i-th of a mix: chat, streamed chat, completions, a 400, a 404, an upstream failure (502)."""
    kind = i % 10
    chat = {"model": "default", "messages": [{"role": "user", "content": f"hello number {i}"}], "max_tokens": 8}
    if kind in (0, 1, 2):
        return "/chat/completions", chat
    if kind in (3, 4):
        return "/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}
    if kind in (5, 6):
        return "/completions", {"model": "m", "prompt": f"say {i} words", "max_tokens": 4}
    if kind == 7:
        return "/chat/completions", {"model": "default", "messages": "not a list"}
    if kind == 8:
        return "/chat/completions", {**chat, "model": "no-such-model"}
    return "/chat/completions", {**chat, "messages": [{"role": "user", "content": "[[status=500]] fail"}]}


async def _send(base_url: str, ids: range, answered: dict[str, int], *, on_count: tuple[int, Callable[[], None]] | None = None) -> None:
    """Send requests ``ids`` (16 at a time); record the status of each one that got an answer.
    ``on_count=(n, fn)`` calls ``fn`` once ``n`` of them have been answered (mid-burst)."""
    semaphore = asyncio.Semaphore(16)
    done = 0
    async with httpx.AsyncClient(timeout=30) as client:

        async def one(i: int) -> None:
            nonlocal done
            path, body = _request(i)
            request_id = f"req-{i}"
            async with semaphore:
                try:
                    async with client.stream("POST", base_url + path, json=body,
                                             headers={"x-request-id": request_id}) as response:  # fmt: skip
                        await response.aread()
                except httpx.TransportError:
                    return  # the server was going away: it never answered
                answered[request_id] = response.status_code
                done += 1
                if on_count is not None and done == on_count[0]:
                    on_count[1]()

        await asyncio.gather(*(one(i) for i in ids))


def _metrics(server: ServerProcess) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = httpx.get(f"{server.url}/metrics").text
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _scenario(tmp_path: Path, stub: StubUpstream, url_line: str, outage: tuple[Callable[[], None], Callable[[], None]],
              rows: Callable[[], list[tuple[object, ...]]], outage_s: float = 0.5) -> None:  # fmt: skip
    """1,000 requests: 400 to gateway A (SIGTERM after 200 answers), then 600 to gateway B (the
    database down for 200 of them); then every answered request has exactly one ledger row."""
    home = tmp_path / "home"
    env = {"TAXIWAY_HOME": str(home)}
    config = CONFIG.format(port=stub.port, url=url_line)
    answered: dict[str, int] = {}
    with serve_process(config, tmp_path, env=env) as a:
        asyncio.run(_send(a.base_url, range(0, 400), answered, on_count=(200, lambda: a.proc.send_signal(signal.SIGTERM))))
        assert a.proc.wait(20) in (0, -signal.SIGTERM), a.logs()  # uvicorn re-raises the signal once shut down
        assert "Application shutdown complete" in a.logs()
    assert 200 <= len(answered) < 400  # the SIGTERM cut the burst
    b_answered: dict[str, int] = {}
    with serve_process(config, tmp_path, env=env) as b:
        asyncio.run(_send(b.base_url, range(400, 700), b_answered))
        stop_db, start_db = outage
        stop_db()
        try:
            asyncio.run(_send(b.base_url, range(700, 900), b_answered))
            time.sleep(outage_s)  # the writer tries, fails, spools
        finally:
            start_db()
        asyncio.run(_send(b.base_url, range(900, 1000), b_answered))
        assert len(b_answered) == 600
        metrics = _metrics(b)
        usage = httpx.get(f"{b.url}/admin/usage", params={"since": "1h", "by": "model,status"}).json()
        b.proc.send_signal(signal.SIGTERM)
        assert b.proc.wait(20) in (0, -signal.SIGTERM), b.logs()
        assert "usage.write_failed" in b.logs() and "usage.replayed" in b.logs()
    answered.update(b_answered)

    ledger = rows()
    ids = Counter(row[0] for row in ledger)
    assert max(ids.values()) == 1  # no request twice
    assert set(ids) == set(answered)  # every answered request once, nothing else
    by_id = {row[0]: row for row in ledger}
    for request_id, status in answered.items():
        assert by_id[request_id][3] == status, request_id
    assert Counter(answered.values()).keys() >= {200, 400, 404, 502}

    # /metrics (gateway B) equals the ledger's rows of B's requests
    b_rows = [by_id[request_id] for request_id in b_answered]
    ledger_requests = Counter((row[1] or "", row[2], str(row[3])) for row in b_rows)
    metric_requests = {
        (dict(labels)["model"], dict(labels)["endpoint"], dict(labels)["status"]): value
        for labels, value in metrics["taxiway_requests_total"].items()
    }
    assert metric_requests == {key: float(n) for key, n in ledger_requests.items()}
    assert sum(metrics["taxiway_prompt_tokens_total"].values()) == sum(row[4] for row in b_rows) > 0
    assert sum(metrics["taxiway_generation_tokens_total"].values()) == sum(row[5] for row in b_rows) > 0
    # the admin report saw the same rows (all of them, A's and B's: those flushed before the report)
    assert sum(r["requests"] for r in usage["data"]) >= len(b_answered)


def test_ledger_on_postgresql_survives_sigterm_and_a_database_restart(tmp_path: Path, stub_upstream: StubUpstream) -> None:
    pg = Postgres(tmp_path / "pg")
    try:
        _scenario(
            tmp_path, stub_upstream, f'url = "{pg.url}"', (pg.stop, pg.start),
            lambda: pg.query("SELECT request_id, model, endpoint, status, prompt_tokens, completion_tokens FROM usage"),
        )  # fmt: skip
    finally:
        pg.close()


def test_ledger_on_sqlite_survives_sigterm_and_a_locked_database(tmp_path: Path, stub_upstream: StubUpstream) -> None:
    path = tmp_path / "home" / "usage.sqlite3"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:  # another writer holds the database: every write of the gateway fails
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        holder.append(conn)

    def unlock() -> None:
        holder.pop().execute("ROLLBACK")

    def rows() -> list[tuple[object, ...]]:
        with sqlite3.connect(path) as conn:
            return conn.execute(
                "SELECT request_id, model, endpoint, status, prompt_tokens, completion_tokens FROM usage"
            ).fetchall()

    # held past the writer's 2 s busy timeout, so that its writes fail rather than wait
    _scenario(tmp_path, stub_upstream, "", (lock, unlock), rows, outage_s=2.5)
    # the CLI reads the same file (the home's default database)
    out = taxiway("usage", "--since", "1h", "--by", "model,status", "--json", home=tmp_path / "home")
    report = [json.loads(line) for line in out.splitlines()]
    assert sum(r["requests"] for r in report) == len(rows())
