"""Groups and fallbacks against real ``taxiway serve`` processes and real upstreams.

- *failover*: clients stream in a loop from a group of two stub upstreams; one upstream is stopped
  mid-run: no request that had not started streaming fails (one cut mid-stream may end with an
  error event: nothing is retried after the first byte); started again on its port, it is probed
  back and gets requests again;
- a dead upstream (nothing listening) falls back to an engine model (a tiny random llama), and
  the response's ``model`` and ``X-Taxiway-Model`` name the fallback.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.stub_upstream import StubUpstream
from bench.synthetic import write_random_llama
from tests.conftest import free_port

ServerFactory = Callable[..., "object"]

NUM_CLIENTS = 4


def _group_entry(stub: StubUpstream) -> str:
    # short cooldowns (the gateway's and the backend's own) so that the test sees the probe back
    return f"""
[[models]]
name = "chat"
aliases = ["default"]
backend = "openai"
cooldown_s = 0.5
options = {{ base_url = "{stub.base_url}", upstream_model = "smollm2", cooldown_s = 0.5 }}
"""


class _Outcome:
    __slots__ = ("error", "models", "num_chunks", "done", "header")

    def __init__(self) -> None:
        self.error: str | None = None
        self.models: set[str] = set()
        self.num_chunks = 0  # chunks received before the end (or the error)
        self.done = False
        self.header: str | None = None


def _stream_once(client: httpx.Client, url: str, body: dict[str, object], path: str = "chat/completions") -> _Outcome:
    outcome = _Outcome()
    try:
        with client.stream("POST", f"{url}/v1/{path}", json=body) as response:
            outcome.header = response.headers.get("x-taxiway-model")
            if response.status_code != 200:
                outcome.error = f"{response.status_code}: {response.read()!r}"
                return outcome
            payloads = (line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: "))
            for data in payloads:
                event = None if data == "[DONE]" else json.loads(data)
                outcome.done = outcome.done or event is None
                if event is not None and "error" in event:
                    outcome.error = str(event["error"])
                elif event is not None:
                    outcome.num_chunks += 1
                    outcome.models.add(event["model"])
    except httpx.HTTPError as exc:
        outcome.error = repr(exc)
    return outcome


def test_failover_when_a_deployment_dies(taxiway_server: ServerFactory) -> None:
    stub_a, stub_b = StubUpstream().start_in_thread(), StubUpstream().start_in_thread()
    revived: StubUpstream | None = None
    try:
        server = taxiway_server(_group_entry(stub_a) + _group_entry(stub_b))
        url = server.url  # type: ignore[attr-defined]
        outcomes: list[_Outcome] = []
        stop = threading.Event()
        body = {"model": "default", "stream": True, "messages": [{"role": "user", "content": "[[tokens=6 delay=0.01]]"}]}

        def client_loop() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    outcomes.append(_stream_once(client, url, body))

        threads = [threading.Thread(target=client_loop) for _ in range(NUM_CLIENTS)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.0)
            before = len(outcomes)
            num_a, num_b = len(stub_a.requests), len(stub_b.requests)
            stub_b.stop()  # killed mid-run: its streams are cut, its port refuses
            killed = len(outcomes)
            time.sleep(1.5)  # B probed (and failing) every 0.5 s meanwhile
            revived = StubUpstream().start_in_thread(port=stub_b.port)
            time.sleep(1.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)

        # balanced while both lived: least in flight, ties in turn
        assert num_a > 5 and num_b > 5 and 0.5 < num_a / num_b < 2, (num_a, num_b)
        failed = [o for o in outcomes if o.error is not None]
        assert all(o.num_chunks > 0 for o in failed), [o.error for o in failed if o.num_chunks == 0][:3]
        assert len(failed) <= NUM_CLIENTS  # at most the streams cut when the upstream stopped
        after = outcomes[killed + NUM_CLIENTS :]
        assert len(after) > 20 and all(o.error is None and o.done for o in after)
        assert len(revived.requests) > 5  # probed back, then balanced again
        assert all(o.models == {"chat"} and o.header == "chat" for o in outcomes if o.error is None)

        models = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
        assert [m["id"] for m in models] == ["chat", "default"]  # the group's name once
        admin = httpx.get(f"{url}/admin/models", timeout=5).json()["data"]
        assert [m["name"] for m in admin] == ["chat", "chat"]  # one row per deployment
        events = [json.loads(line).get("event") for line in server.logs().splitlines() if line.startswith("{")]  # type: ignore[attr-defined]
        # cooled down after its first failure: only requests already routed to it then fail over
        # B cooled down after its first failure (the gateway's or the backend's own cooldown): only
        # requests routed to it before that failed over, and one probe per cooldown (1.5 s / 0.5 s)
        # — not the half of all requests (~40) that balancing alone would send it
        assert any(e.endswith("cooling_down") for e in events) and events.count("request.failover") <= NUM_CLIENTS + 3
        print(f"failover: {before} responses before the kill, {len(outcomes) - killed} after, "
              f"{len(failed)} cut mid-stream, 0 failed before their first byte, "
              f"{events.count('request.failover')} failed over")  # fmt: skip
    finally:
        for stub in (stub_a, stub_b, revived):
            if stub is not None:
                stub.stop()


def test_fallback_from_a_dead_upstream_to_an_engine_model(taxiway_server: ServerFactory, tmp_path: Path) -> None:
    shape = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, tokenizer=True)
    model = write_random_llama(tmp_path / "tiny", seed=3, **shape)  # type: ignore[arg-type]
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    server = taxiway_server(f"""
[[models]]
name = "primary"
backend = "openai"
fallbacks = ["tiny"]
options = {{ base_url = "{dead}" }}

[[models]]
name = "tiny"
backend = "engine"
options = {{ model = "{model}", dtype = "float32", threads = 1, native_kernels = false, kv_cache_tokens = 512 }}
""")
    url = server.url  # type: ignore[attr-defined]

    def tiny_loaded() -> bool:
        rows = httpx.get(f"{url}/admin/models", timeout=5).json()["data"]
        return any(row["name"] == "tiny" and row["state"] == "loaded" for row in rows)

    deadline = time.monotonic() + 60
    while not tiny_loaded():
        assert time.monotonic() < deadline, "the engine model did not load"
        time.sleep(0.1)

    body = {"model": "primary", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert whole.status_code == 200, whole.text
    assert whole.json()["model"] == "tiny" and whole.headers["x-taxiway-model"] == "tiny"
    with httpx.Client(timeout=30) as client:
        streamed = _stream_once(client, url, {**body, "stream": True}, "completions")
    assert streamed.error is None and streamed.done and streamed.models == {"tiny"} and streamed.header == "tiny"
    logs = server.logs()  # type: ignore[attr-defined]
    assert "request.failover" in logs and "route.cooling_down" in logs
