"""Hostile requests against a real ``taxiway serve`` (a tiny engine model), through real HTTP:
each case the hardening issue found is a 400 naming the field, or the right answer, never a 500,
a NaN answer or a stalled event loop."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from gateway.nesting import MAX_JSON_DEPTH
from tests.gateway.tiny_engine import tiny_engine_config, write_tiny_chat_model

MAX_POSITIONS = 65536


@pytest.fixture(scope="module")
def server(shared_taxiway_server, tmp_path_factory):  # type: ignore[no-untyped-def]
    model = write_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model", max_positions=MAX_POSITIONS)
    server = shared_taxiway_server(tiny_engine_config(model))
    server.wait_ready(timeout=120)
    return server


def _post(server, path: str, body: bytes | dict, timeout: float = 60) -> httpx.Response:  # type: ignore[no-untyped-def]
    if isinstance(body, dict):
        return httpx.post(f"{server.url}{path}", json=body, timeout=timeout)
    return httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=timeout)


def _assert_400(response: httpx.Response, param: str | None) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    return error


# -- the decoder -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "field", "depth"),
    [
        ("/v1/chat/completions", "tools", 1000),
        ("/v1/chat/completions", "metadata", 1000),
        ("/v1/chat/completions", "anything_unknown", 100_000),
        ("/v1/completions", "response_format", 1000),
        ("/v1/embeddings", "extra", 1000),
        ("/v1/load_lora_adapter", "lora_path", 1000),
    ],
)
def test_deep_json_is_a_400_naming_the_field(server, path: str, field: str, depth: int) -> None:  # type: ignore[no-untyped-def]
    head = b'{"model":"tiny","messages":[{"role":"user","content":"hi"}],"prompt":"hi","input":"hi","lora_name":"x",'
    body = head + f'"{field}":'.encode() + b"[" * depth + b"]" * depth + b"}"
    error = _assert_400(_post(server, path, body), field)
    assert f"nests deeper than {MAX_JSON_DEPTH} levels" in error["message"]
    assert error["code"] == "json_too_deep"


def test_invalid_utf8_is_a_400_naming_the_byte(server) -> None:  # type: ignore[no-untyped-def]
    body = b'{"model":"tiny","prompt":"caf\xc3 au lait"}'
    offset = body.index(b"\xc3")
    error = _assert_400(_post(server, "/v1/completions", body), None)
    assert error["message"].endswith(f"invalid UTF-8 at byte {offset}")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ('"max_tokens":1e400', "max_tokens"),
        ('"temperature":-1e999', "temperature"),
        ('"stop":[["a"]]', "stop"),
        ('"stream_options":{"include_usage":[]}', "stream_options.include_usage"),
    ],
)
def test_wrong_types_and_huge_numbers_name_the_field(server, extra: str, param: str) -> None:  # type: ignore[no-untyped-def]
    body = f'{{"model":"tiny","prompt":"hi",{extra}}}'.encode()
    response = _post(server, "/v1/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)


_HUGE = 10**30


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": _HUGE}, "max_tokens"),
        ({"n": _HUGE}, "n"),
        ({"logprobs": _HUGE}, "logprobs"),
        ({"logit_bias": {str(_HUGE): 1}}, "logit_bias"),
        ({"temperature": 1e308}, "temperature"),
        ({"seed": _HUGE}, None),  # any integer seeds a generator
        ({"seed": -_HUGE}, None),
        ({"top_k": _HUGE}, None),  # more than the vocabulary: all of it
        ({"top_p": 1e-320}, None),  # 0 as float32: the top token alone
        ({"min_p": 1e-320}, None),
    ],
)
def test_huge_and_tiny_numbers_are_answered_or_named(server, fields: dict, param: str | None) -> None:  # type: ignore[no-untyped-def]
    response = _post(server, "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 2, **fields})
    if param is None:
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 2
    else:
        _assert_400(response, param)


# -- sampling parameters in float32 ------------------------------------------------------------


def _completion(server, **fields) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"model": "tiny", "prompt": "The lighthouse keeper", "max_tokens": 12, "ignore_eos": True, **fields}
    return _post(server, "/v1/completions", body)


@pytest.mark.parametrize("temperature", [1e-45, 1e-39])
def test_a_temperature_too_small_for_float32_is_greedy(server, temperature: float) -> None:  # type: ignore[no-untyped-def]
    greedy = _completion(server, temperature=0)
    assert greedy.status_code == 200, greedy.text
    tiny = _completion(server, temperature=temperature, seed=7)
    assert tiny.status_code == 200, tiny.text
    text = tiny.json()["choices"][0]["text"]
    assert text == greedy.json()["choices"][0]["text"]
    assert len(set(text)) > 1  # not one token repeated (NaN probabilities pick token 0 each step)


@pytest.mark.parametrize("penalty", [1e-300, 1e300])
def test_a_repetition_penalty_float32_cannot_hold_is_a_400(server, penalty: float) -> None:  # type: ignore[no-untyped-def]
    error = _assert_400(_completion(server, repetition_penalty=penalty), "repetition_penalty")
    assert "float32" in error["message"]


# -- CPU-heavy request work off the event loop -------------------------------------------------


class _HealthProbe:
    """``GET /health`` every 10 ms on a thread of its own; ``latencies_s`` of each answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies_s: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                response = client.get(f"{self.url}/health")
                self.latencies_s.append(time.perf_counter() - start)
                if response.status_code != 200:
                    self.failures.append(response.text)
                time.sleep(0.01)

    def __enter__(self) -> _HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def _huge_bodies(size: int) -> list[tuple[str, bytes]]:
    """Five bodies of about ``size`` bytes each: completions and chat (the template renders it)."""
    text = ("All work and no play makes Jack a dull boy. " * (size // 44 + 1))[: size - 200]
    completion = httpx.Request("POST", "/", json={"model": "tiny", "prompt": text, "max_tokens": 4}).content
    chat = httpx.Request(
        "POST", "/", json={"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 4}
    ).content
    return [("/v1/completions", completion)] * 3 + [("/v1/chat/completions", chat)] * 2


def _at_once(server, bodies: list[tuple[str, bytes]]) -> tuple[list[httpx.Response], float, float]:  # type: ignore[no-untyped-def]
    """Post ``bodies`` together while probing /health: the responses, the slowest /health and
    the wall time of the whole burst (seconds)."""
    responses: list[httpx.Response] = []

    def post(path: str, body: bytes) -> None:
        responses.append(_post(server, path, body, timeout=120))

    threads = [threading.Thread(target=post, args=item) for item in bodies]
    with _HealthProbe(server.url) as probe:
        time.sleep(0.1)
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        elapsed = time.perf_counter() - start
        time.sleep(0.1)
    assert not probe.failures
    assert len(probe.latencies_s) > 10
    return responses, max(probe.latencies_s), elapsed


def test_five_huge_prompts_leave_health_answering(server) -> None:  # type: ignore[no-untyped-def]
    """Five 3.9 MB prompts at once (the issue's case: /health waited up to 28 s)."""
    bodies = _huge_bodies(3_900_000)
    assert all(3_800_000 < len(body) < 4 * 2**20 for _, body in bodies)
    responses, slowest, elapsed = _at_once(server, bodies)
    print(f"five 3.9 MB prompts: {elapsed:.2f}s, slowest /health {slowest * 1000:.1f} ms")
    for response in responses:
        error = _assert_400(response, "prompt" if "prompt" in response.request.content[:40].decode() else "messages")
        assert error["code"] == "context_length_exceeded"
    assert slowest < 0.1


def test_five_long_prompts_tokenized_off_the_loop(server) -> None:  # type: ignore[no-untyped-def]
    """Prompts short enough to need tokenizing (the bound, 5 characters a token at most, does not
    refuse them): 100 k tokens each, over the 65,536 of the context, counted on pooled threads
    while /health answers."""
    bodies = _huge_bodies(100_000)
    responses, slowest, elapsed = _at_once(server, bodies)
    print(f"five 100 kB prompts: {elapsed:.2f}s, slowest /health {slowest * 1000:.1f} ms")
    for response in responses:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert "at least" not in response.json()["error"]["message"]  # counted, not bounded
    assert slowest < 0.1


def test_a_long_prompt_that_fits_is_answered(server) -> None:  # type: ignore[no-untyped-def]
    prompt = "word " * 4000
    response = _completion(server, prompt=prompt, max_tokens=2, temperature=0)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(prompt)  # one byte, one token

