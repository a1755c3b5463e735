"""Inputs of megabytes to ``POST /v1/embeddings`` (the encoder backend, the real
all-MiniLM-L6-v2, a real ``taxiway serve``): tokenized off the event loop and by a prefix, so
five 3.9 MB inputs at once are quick 400s while ``/health`` answers within 100 ms (they held it
9.3 s when the whole of each was tokenized on the loop), and a truncating model embeds one as it
embeds its beginning."""

from __future__ import annotations

import os
import threading

import httpx
import numpy as np
import pytest

from backends.engine.catalogue import default_home, pull
from tests.gateway.test_hostile_server import _HealthProbe

pytestmark = pytest.mark.slow

_TEXT = ("All work and no play makes Jack a dull boy. " * 90_000)[:3_899_000]


@pytest.fixture(scope="module")
def server(shared_taxiway_server):  # type: ignore[no-untyped-def]
    model_zip = pull("all-minilm-l6-v2", home=default_home(os.environ), progress=False)
    config = f"""
        [[models]]
        name = "embed"
        backend = "encoder"
        options = {{ model = "{model_zip}", dtype = "float32" }}
        [[models]]
        name = "embed-truncating"
        backend = "encoder"
        options = {{ model = "{model_zip}", truncate = true, dtype = "float32" }}
    """
    server = shared_taxiway_server(config, startup_timeout=60)
    server.wait_ready(timeout=120)
    return server


def test_five_huge_inputs_leave_health_answering(server) -> None:  # type: ignore[no-untyped-def]
    responses: list[httpx.Response] = []
    # encoded before the probe starts: json.dumps of 3.9 MB here would hold this process's GIL,
    # and the probe's thread with it
    body = httpx.Request("POST", "/", json={"model": "embed", "input": _TEXT}).content

    def post() -> None:
        headers = {"content-type": "application/json"}
        responses.append(httpx.post(f"{server.url}/v1/embeddings", content=body, headers=headers, timeout=120))

    threads = [threading.Thread(target=post) for _ in range(5)]
    with _HealthProbe(server.url) as probe:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    slowest = max(probe.latencies_s)
    print(f"five 3.9 MB embedding inputs: slowest /health {slowest * 1000:.1f} ms")
    assert len(responses) == 5 and not probe.failures
    for response in responses:
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "input"
        assert "has at least" in error["message"]
    assert slowest < 0.1


def test_a_truncating_model_embeds_a_huge_input_as_its_beginning(server) -> None:  # type: ignore[no-untyped-def]
    def embed(text: str) -> np.ndarray:
        response = httpx.post(
            f"{server.url}/v1/embeddings", json={"model": "embed-truncating", "input": text}, timeout=120
        )
        assert response.status_code == 200, response.text
        return np.array(response.json()["data"][0]["embedding"])

    # 2,000 characters are well over the model's 256 tokens: both are cut to the same first ones
    assert np.allclose(embed(_TEXT), embed(_TEXT[:2000]), atol=1e-6)
    spaced = " " * 1_000_000 + "Paris is the capital of France."  # few tokens for many characters
    assert np.allclose(embed(spaced), embed("Paris is the capital of France."), atol=1e-5)
