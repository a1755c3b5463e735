"""Graceful drain on a real ``taxiway serve``: 32 streams in flight, SIGTERM. /ready turns 503 at
once, a new request gets 503 with Retry-After, the streams that can finish within
drain_timeout_s do, the rest end with an error event, none is cut silently (a whole answer still
pending is a 503); the process exits 0 and the usage ledger holds a row for every request."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path

import httpx

from bench.stub_upstream import StubUpstream
from tests.conftest import ServerProcess, serve_process

CONFIG = """
[server]
drain_timeout_s = 2.0

[[models]]
name = "m"
backend = "openai"
options = {{ base_url = "http://127.0.0.1:{port}/v1", upstream_model = "stub" }}

[usage]
flush_interval_s = 0.1
"""

NUM_STREAMS = 32
SHORT = "[[delay=0.1 tokens=12]] short"  # about 1.2 s: ends within the 2 s drain
LONG = "[[delay=0.25 tokens=60]] long"  # about 15 s: cut at the drain's end


async def _stream(client: httpx.AsyncClient, i: int, started: asyncio.Event, num_started: list[int]) -> dict[str, object]:
    """One stream's outcome: its events, whether it ended with [DONE], how the transport ended."""
    body = {"model": "m", "messages": [{"role": "user", "content": SHORT if i % 2 else LONG}], "stream": True}
    events: list[str] = []
    try:
        async with client.stream("POST", "/chat/completions", json=body, headers={"x-request-id": f"drain-{i}"}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        num_started[0] += 1
                        if num_started[0] == NUM_STREAMS:
                            started.set()
    except httpx.TransportError as exc:
        return {"events": events, "transport_error": repr(exc)}
    return {"events": events, "transport_error": None}


async def _scenario(server: ServerProcess) -> tuple[list[dict[str, object]], dict[str, object]]:
    started = asyncio.Event()
    num_started = [0]
    limits = httpx.Limits(max_connections=NUM_STREAMS + 4)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(_stream(client, i, started, num_started)) for i in range(NUM_STREAMS)]
        # and one whole answer that never comes: cut at the drain's end before its response started
        hung = asyncio.create_task(client.post(
            "/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "[[hang]] whole"}]},
            headers={"x-request-id": "drain-whole"},
        ))  # fmt: skip
        await asyncio.wait_for(started.wait(), 30)  # every stream has its first chunk
        server.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # at once: not ready, and a new request is refused with Retry-After (a fresh connection each)
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as fresh:
            await asyncio.sleep(0.3)
            ready = await fresh.get("/ready")
            refused = await fresh.post(
                "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "new"}]}
            )
        after_signal = {
            "ready": ready.status_code, "refused": refused.status_code,
            "retry_after": refused.headers.get("retry-after"), "refused_code": refused.json()["error"]["code"],
        }  # fmt: skip
        outcomes = await asyncio.gather(*tasks)
        after_signal["streams_done_s"] = time.monotonic() - signalled
        whole = await hung
        after_signal["whole"] = whole.status_code
        after_signal["whole_code"] = whole.json()["error"]["code"]
    return outcomes, after_signal


def test_sigterm_drains_32_streams_none_cut_silently(tmp_path: Path, stub_upstream: StubUpstream) -> None:
    home = tmp_path / "home"
    with serve_process(CONFIG.format(port=stub_upstream.port), tmp_path, env={"TAXIWAY_HOME": str(home)}) as server:
        outcomes, after_signal = asyncio.run(_scenario(server))
        assert server.proc.wait(20) == 0, server.logs()
        logs = server.logs()

    assert after_signal["ready"] == 503
    assert after_signal["refused"] == 503 and after_signal["retry_after"] == "5"
    assert after_signal["refused_code"] == "server_shutting_down"
    assert after_signal["streams_done_s"] < 2.0 + 3.0  # the drain's 2 s, then the cut
    assert (after_signal["whole"], after_signal["whole_code"]) == (503, "server_shutting_down")

    whole = cut = 0
    for i, outcome in enumerate(outcomes):
        events = outcome["events"]
        assert outcome["transport_error"] is None, (i, outcome)  # no silent cut
        assert isinstance(events, list) and events[-1] == "[DONE]", (i, events)
        last = json.loads(events[-2])
        if "error" in last:  # ended by the drain: an error event, then [DONE]
            assert last["error"]["code"] == "server_shutting_down", (i, last)
            assert i % 2 == 0, "a short stream fits in the drain and must not be cut"
            cut += 1
        else:  # the whole answer
            assert last["choices"][0]["finish_reason"] == "stop", (i, events)
            text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
            assert text.split() == [f"tok{k}" for k in range(12)], (i, text)
            whole += 1
    assert whole == NUM_STREAMS // 2 and cut == NUM_STREAMS // 2
    assert "server.drain_timeout" in logs and "Application shutdown complete" in logs

    # the usage of every request is recorded: the 32 streams (200 whole, 503 cut), the whole answer
    # cut, and the refused one
    with sqlite3.connect(home / "usage.sqlite3") as db:
        rows = dict(db.execute("SELECT request_id, status FROM usage WHERE request_id LIKE 'drain-%'").fetchall())
        statuses = [status for (status,) in db.execute("SELECT status FROM usage")]
    assert rows == {f"drain-{i}": 200 if i % 2 else 503 for i in range(NUM_STREAMS)} | {"drain-whole": 503}
    assert statuses.count(503) == NUM_STREAMS // 2 + 2
