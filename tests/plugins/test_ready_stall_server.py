"""/ready means it: a backend with a request in flight and no token for stall_timeout_s makes it
503 naming the model as stalled, and the metric taxiway_model_stalled says so; it recovers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from bench.stub_upstream import StubUpstream
from tests.conftest import serve_process

CONFIG = """
[server]
stall_timeout_s = 0.5

[[models]]
name = "m"
backend = "openai"
options = {{ base_url = "http://127.0.0.1:{port}/v1", upstream_model = "stub" }}
"""


def test_ready_turns_503_on_a_stalled_backend(tmp_path: Path, stub_upstream: StubUpstream) -> None:
    with serve_process(CONFIG.format(port=stub_upstream.port), tmp_path, env={"TAXIWAY_HOME": str(tmp_path)}) as server:
        assert httpx.get(f"{server.url}/ready").status_code == 200
        body = {"model": "m", "messages": [{"role": "user", "content": "[[delay=1.2 tokens=2]] slow"}], "stream": True}
        done = threading.Event()

        def slow() -> None:
            with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=30) as response:
                response.read()
            done.set()

        threading.Thread(target=slow, daemon=True).start()
        deadline = time.monotonic() + 2.0
        while (ready := httpx.get(f"{server.url}/ready")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.status_code == 503, ready.text
        [stalled] = ready.json()["not_ready"]
        assert stalled["model"] == "m" and stalled["state"] == "stalled" and "no token" in stalled["detail"]
        assert 'taxiway_model_stalled{model="m"} 1.0' in httpx.get(f"{server.url}/metrics").text
        assert done.wait(30)
        assert httpx.get(f"{server.url}/ready").status_code == 200
        assert 'taxiway_model_stalled{model="m"} 0.0' in httpx.get(f"{server.url}/metrics").text
