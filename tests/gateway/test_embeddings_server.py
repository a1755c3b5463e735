"""``POST /v1/embeddings`` on a real ``taxiway serve`` with the encoder backend and the real
all-MiniLM-L6-v2, through real HTTP: the official ``openai`` client for every input form and
encoding format against sentence-transformers, a LangChain-sized batch, the 400s, concurrent
requests batched together, the event loop free while they run, and the ``openai`` backend
proxying embeddings to it."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from backends.engine.catalogue import default_home, pull
from backends.engine.encoder.loader import unpack
from tests.backends.engine.encoder.conftest import BASE_SENTENCES, mixed_sentences


@pytest.fixture(scope="module")
def model_zip() -> str:
    return str(pull("all-minilm-l6-v2", home=default_home(os.environ), progress=False))


@pytest.fixture(scope="module")
def server(shared_taxiway_server, model_zip: str):  # type: ignore[no-untyped-def]
    # float32 math: the vectors through HTTP are sentence-transformers' to 1e-5 (the served
    # default, bfloat16 where the CPU has it, is held to its own bar in test_encoder_reference.py)
    config = f"""
        [[models]]
        name = "all-minilm-l6-v2"
        aliases = ["embed"]
        backend = "encoder"
        options = {{ model = "{model_zip}", max_batch_tokens = 4096, dtype = "float32" }}

        [[models]]
        name = "minilm-truncating"
        backend = "encoder"
        options = {{ model = "{model_zip}", truncate = true, max_inputs = 4, dtype = "float32" }}
    """
    server = shared_taxiway_server(config, startup_timeout=60)
    server.wait_ready(timeout=120)
    return server


@pytest.fixture(scope="module")
def st_model(model_zip: str):  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(unpack(Path(model_zip))), device="cpu")


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _vectors(response) -> np.ndarray:  # type: ignore[no-untyped-def]
    assert [d.index for d in response.data] == list(range(len(response.data)))
    rows = [
        np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") if isinstance(d.embedding, str) else d.embedding
        for d in response.data
    ]
    return np.asarray(rows, dtype=np.float32)


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_every_input_form_matches_sentence_transformers(client, st_model, server, encoding_format) -> None:  # type: ignore[no-untyped-def]
    texts = BASE_SENTENCES[:6]
    reference = st_model.encode(texts)
    tokenizer = st_model.tokenizer
    plain_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    forms = {
        "string": (texts[0], reference[:1]),
        "strings": (texts, reference),
        "token ids": (plain_ids[1], reference[1:2]),
        "lists of token ids": (plain_ids, reference),
    }
    for form, (value, expected) in forms.items():
        response = client.embeddings.create(model="embed", input=value, **kwargs)
        got = _vectors(response)
        if encoding_format == "base64":
            assert all(isinstance(d.embedding, str) for d in response.data), form
        assert got.shape == expected.shape, form
        assert _cos(got, expected).min() >= 0.99999, form
        assert response.model == "all-minilm-l6-v2" and response.object == "list"  # the alias resolved
        num_tokens = sum(len(ids) + 2 for ids in (plain_ids[:1] if form == "string" else [plain_ids[1]] if form == "token ids" else plain_ids))
        assert response.usage.prompt_tokens == response.usage.total_tokens == num_tokens, form


def test_a_langchain_sized_batch_of_1000_strings(client, st_model) -> None:  # type: ignore[no-untyped-def]
    # 1,000 short chunks in one request, as LangChain's OpenAIEmbeddings sends them (its
    # chunk_size); short, to keep this test a few seconds on 2 cores
    texts = [f"{BASE_SENTENCES[i % len(BASE_SENTENCES)]} #{i}" for i in range(1000)]
    response = client.embeddings.create(model="embed", input=texts)
    got = _vectors(response)
    assert got.shape == (1000, 384)
    sample = [0, 1, 17, 500, 998, 999]
    assert _cos(got[sample], st_model.encode([texts[i] for i in sample])).min() >= 0.99999


def _error(server, body: dict) -> dict:  # type: ignore[no-untyped-def]
    response = httpx.post(f"{server.base_url}/embeddings", json=body, timeout=60)
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_bad_requests_are_openai_errors_naming_the_field(server) -> None:  # type: ignore[no-untyped-def]
    long_text = " ".join(BASE_SENTENCES) * 3
    cases = [
        ({"input": ""}, "input", "input[0]"),
        ({"input": ["a", ""]}, "input", "input[1]"),
        ({"input": []}, "input", "must not be empty"),
        ({"input": [[1, 2], []]}, "input", "input[1]"),
        ({"input": [1, "a"]}, "input", "must be a string"),
        ({"input": [[5, -1]]}, "input", "input[0]"),
        ({"input": [[999999]]}, "input", "vocabulary"),
        ({"input": ["ok", long_text]}, "input", "input[1] has "),
        ({"input": "hi", "dimensions": 128}, "dimensions", "not supported"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "float"),
        ({"model": "minilm-truncating", "input": ["a"] * 5}, "input", "at most 4"),
        ({"model": "nope", "input": "a"}, "model", "nope"),
    ]
    for body, param, fragment in cases:
        body = {"model": "embed", **body}
        if body["model"] == "nope":
            response = httpx.post(f"{server.base_url}/embeddings", json=body, timeout=60)
            assert response.status_code == 404
            error = response.json()["error"]
        else:
            error = _error(server, body)
        assert error["param"] == param and fragment in error["message"], (body, error)
        assert error["type"] == "invalid_request_error"
    over = _error(server, {"model": "embed", "input": ["ok", long_text]})
    assert over["code"] == "context_length_exceeded"
    assert "256" in over["message"]  # the limit is named beside the input's length
    chat = httpx.post(f"{server.base_url}/chat/completions", json={"model": "embed", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "model"


def test_truncate_true_cuts_like_sentence_transformers(client, st_model) -> None:  # type: ignore[no-untyped-def]
    long_text = " ".join(BASE_SENTENCES) * 3
    response = client.embeddings.create(model="minilm-truncating", input=[long_text, "short"])
    assert response.usage.prompt_tokens == 256 + len(st_model.tokenizer("short")["input_ids"])
    assert _cos(_vectors(response), st_model.encode([long_text, "short"])).min() >= 0.99999


async def test_concurrent_requests_are_batched_and_the_loop_stays_free(server) -> None:  # type: ignore[no-untyped-def]
    texts = mixed_sentences(48, seed=2)
    url = f"{server.base_url}/embeddings"
    async with httpx.AsyncClient(timeout=120) as http:
        alone = [(await http.post(url, json={"model": "embed", "input": t})).json()["data"][0]["embedding"] for t in texts[:4]]
        before = (await http.get(f"{server.base_url}/models/embed/stats")).json()
        health_waits: list[float] = []

        async def poll_health() -> None:
            while True:
                start = time.perf_counter()
                assert (await http.get(f"{server.url}/health")).status_code == 200
                health_waits.append(time.perf_counter() - start)
                await asyncio.sleep(0.05)

        poller = asyncio.create_task(poll_health())
        responses = await asyncio.gather(*(http.post(url, json={"model": "embed", "input": t}) for t in texts))
        poller.cancel()
        after = (await http.get(f"{server.base_url}/models/embed/stats")).json()
    vectors = [r.json()["data"][0]["embedding"] for r in responses]
    assert _cos(np.array(vectors[:4]), np.array(alone)).min() >= 0.99999  # batched = alone
    steps = after["steps"] - before["steps"]
    assert after["inputs"] - before["inputs"] == len(texts) and steps < len(texts) / 2, (before, after)
    # the loop answered /health while the steps ran (one step is a few hundred ms on 2 cores)
    assert len(health_waits) >= 3 and max(health_waits) < 1.0, health_waits


def test_the_openai_backend_proxies_embeddings(taxiway_server, server, client) -> None:  # type: ignore[no-untyped-def]
    proxy = taxiway_server(f"""
        [[models]]
        name = "remote-embed"
        backend = "openai"
        options = {{ base_url = "{server.base_url}", upstream_model = "embed", embeddings = true }}
    """)
    remote = openai.OpenAI(base_url=proxy.base_url, api_key="unused", max_retries=0)
    for value in (["hello world", "bonjour"], [[7592, 2088], [14753]]):
        direct = _vectors(client.embeddings.create(model="embed", input=value))
        proxied = remote.embeddings.create(model="remote-embed", input=value)
        assert proxied.model == "remote-embed"
        assert _cos(_vectors(proxied), direct).min() >= 0.999999
