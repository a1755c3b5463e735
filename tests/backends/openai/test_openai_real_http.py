"""End to end over real sockets: the official ``openai`` client → ``taxiway serve`` (a subprocess,
uvicorn) → the ``openai`` backend → a stub upstream HTTP server (a thread of this process).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import msgspec
import openai
import pytest

from bench.stub_upstream import StubUpstream

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _main_config(stub: StubUpstream, closed_port: int) -> str:
    return f"""
        [server]
        max_body_bytes = 65536

        [[models]]
        name = "assistant"
        aliases = ["default"]
        backend = "openai"
        options = {{ base_url = "{stub.base_url}", api_key = "${{UPSTREAM_KEY}}", upstream_model = "smollm2", timeout_s = 1.0, embeddings = true }}

        [[models]]
        name = "down"
        backend = "openai"
        options = {{ base_url = "http://127.0.0.1:{closed_port}/v1", connect_timeout_s = 1.0 }}
    """


@pytest.fixture(scope="session")
def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def second_stub() -> object:
    stub = StubUpstream().start_in_thread()
    yield stub
    stub.stop()


@pytest.fixture(scope="session")
def thirdparty_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The out-of-tree backend package, pip-installed into a temp dir (found through its entry point)."""
    work = tmp_path_factory.mktemp("thirdparty")
    source = work / "src"
    shutil.copytree(FIXTURES / "thirdparty_pkg", source)
    target = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],  # fmt: skip
        check=True,
        capture_output=True,
    )
    return target


@pytest.fixture
def server(shared_taxiway_server, stub_upstream, closed_port):  # type: ignore[no-untyped-def]
    return shared_taxiway_server(_main_config(stub_upstream, closed_port), env={"UPSTREAM_KEY": "upstream-secret"})


@pytest.fixture
def client(server) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=10)


def _marker() -> str:
    return uuid.uuid4().hex[:8]


def _last_request_with(stub: StubUpstream, text: str) -> dict:
    for recorded in reversed(stub.requests):
        body = recorded.body or {}
        content = body.get("prompt") or (body.get("messages") or [{}])[-1].get("content", "")
        if text in str(content):
            return {"headers": recorded.headers, **body}
    raise AssertionError(f"no upstream request contained {text!r}")


# ---------------------------------------------------------------------------------------------
# one client test, three configs mapping "assistant" to different places


@pytest.fixture(params=["upstream-a", "upstream-b", "third-party-backend"])
def assistant_base_url(request, shared_taxiway_server, stub_upstream, second_stub, closed_port, thirdparty_site):  # type: ignore[no-untyped-def]
    if request.param == "upstream-a":
        config = _main_config(stub_upstream, closed_port)
        return shared_taxiway_server(config, env={"UPSTREAM_KEY": "upstream-secret"}).base_url
    if request.param == "upstream-b":
        config = f"""
            [[models]]
            name = "assistant"
            backend = "openai"
            options = {{ base_url = "{second_stub.base_url}", upstream_model = "another-name" }}
        """
        return shared_taxiway_server(config).base_url
    config = """
        [[models]]
        name = "assistant"
        backend = "echo"
    """
    return shared_taxiway_server(config, env={"PYTHONPATH": str(thirdparty_site)}).base_url


def test_same_client_code_whatever_serves_the_model(assistant_base_url: str) -> None:
    client = openai.OpenAI(base_url=assistant_base_url, api_key="unused", max_retries=0, timeout=10)

    assert "assistant" in [m.id for m in client.models.list()]

    whole = client.chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": "hello taxi way"}], n=2, max_tokens=50
    )
    assert whole.model == "assistant"
    assert whole.id.startswith("chatcmpl-")
    assert [c.message.content for c in whole.choices] == ["echo: hello taxi way"] * 2
    assert [c.finish_reason for c in whole.choices] == ["stop", "stop"]
    assert whole.usage is not None and whole.usage.completion_tokens == 8

    chunks = list(
        client.chat.completions.create(
            model="assistant",
            messages=[{"role": "user", "content": "hello taxi way"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert {c.model for c in chunks} == {"assistant"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: hello taxi way"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.completion_tokens == 4

    completion = client.completions.create(model="assistant", prompt="once upon a time", max_tokens=20)
    assert completion.model == "assistant"
    assert completion.choices[0].text == "echo: once upon a time"


# ---------------------------------------------------------------------------------------------
# the openai backend in detail


def test_chat_passes_n_and_logprobs_and_maps_the_model_name(client: openai.OpenAI, stub_upstream: StubUpstream) -> None:
    marker = _marker()
    result = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": f"hi {marker}"}], n=2, logprobs=True, top_logprobs=2
    )
    assert result.model == "assistant"
    assert len(result.choices) == 2
    logprobs = result.choices[1].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [t.token for t in logprobs.content] == ["echo:", " hi", f" {marker}"]
    assert logprobs.content[0].logprob == -0.5
    assert [t.token for t in logprobs.content[1].top_logprobs] == [" hi", "alt1"]
    sent = _last_request_with(stub_upstream, marker)
    assert sent["model"] == "smollm2"
    assert sent["n"] == 2 and sent["logprobs"] is True and sent["top_logprobs"] == 2
    assert sent["headers"]["authorization"] == "Bearer upstream-secret"  # ${UPSTREAM_KEY} interpolated


def test_completions_logprobs_passthrough(client: openai.OpenAI) -> None:
    result = client.completions.create(model="assistant", prompt="once upon", logprobs=2, max_tokens=5)
    logprobs = result.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["echo:", " once", " upon"]
    assert logprobs.token_logprobs == [-0.5, -0.5, -0.5]
    assert logprobs.top_logprobs == [{"echo:": -0.5, "alt1": -1.5}, {" once": -0.5, "alt1": -1.5}, {" upon": -0.5, "alt1": -1.5}]
    assert result.usage is not None and result.usage.total_tokens == 5


def test_streaming_completions_with_usage_and_logprobs(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model="assistant", prompt="a b c", stream=True, logprobs=1, stream_options={"include_usage": True}
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == "echo: a b c"
    assert [c.choices[0].logprobs.tokens[0] for c in text_chunks] == ["echo:", " a", " b", " c"]  # type: ignore[union-attr]
    assert text_chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_request_id_is_honoured_and_overhead_reported(client: openai.OpenAI, stub_upstream: StubUpstream) -> None:
    marker = _marker()
    raw = client.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": marker}], extra_headers={"X-Request-ID": f"req-{marker}"}
    )
    assert raw.headers["x-request-id"] == f"req-{marker}"
    assert float(raw.headers["x-taxiway-overhead-ms"]) >= 0.0
    assert raw.parse().id == f"chatcmpl-req-{marker}"
    assert _last_request_with(stub_upstream, marker)["headers"]["x-request-id"] == f"req-{marker}"


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="assistant", input=["abc", "de"])  # base64 on the wire
    assert [d.embedding for d in result.data] == [[3.0, 0.5, -0.5], [2.0, 0.5, -0.5]]
    floats = client.embeddings.create(model="assistant", input="abcd", encoding_format="float")
    assert floats.data[0].embedding == [4.0, 0.5, -0.5]
    assert floats.model == "assistant"


# ---------------------------------------------------------------------------------------------
# errors, in OpenAI's shape


def test_unknown_model_is_404_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert "no-such-model" in info.value.message
    assert info.value.code == "model_not_found"


def test_bad_field_is_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "x"}], temperature=3.5)
    assert info.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]  # type: ignore[list-item]
        )
    assert info.value.param == "messages[0].content"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model="assistant",
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert info.value.param == "tools"


def test_malformed_json_is_400(server) -> None:  # type: ignore[no-untyped-def]
    response = httpx.post(f"{server.base_url}/chat/completions", content=b'{"model": "assistant", "messages": [',
                          headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_too_large_body_is_413(server) -> None:  # type: ignore[no-untyped-def]
    body = msgspec.json.encode({"model": "assistant", "messages": [{"role": "user", "content": "x" * 70000}]})
    response = httpx.post(f"{server.base_url}/chat/completions", content=body)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_upstream_down_is_502(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="down", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 502
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="down", messages=[{"role": "user", "content": "x"}], stream=True)
    assert info.value.status_code == 502


def test_upstream_429_passes_on_with_retry_after(client: openai.OpenAI) -> None:
    for stream in (False, True):
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(
                model="assistant", messages=[{"role": "user", "content": "[[status=429 retry_after=7]]"}], stream=stream
            )
        assert info.value.response.headers["retry-after"] == "7"
        assert info.value.body["message"] == "scripted failure"  # type: ignore[index]


@pytest.mark.parametrize(("status", "expected"), [(400, 400), (422, 422), (500, 502), (503, 503), (401, 502)])
def test_upstream_statuses_are_mapped(client: openai.OpenAI, status: int, expected: int) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": f"[[status={status} message=upstream_says_no]]"}]
        )
    assert info.value.status_code == expected
    assert "upstream says no" in info.value.message


def test_upstream_timeout_is_504(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="assistant", messages=[{"role": "user", "content": "[[hang]]"}])
    assert info.value.status_code == 504


def _sse_events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]


def test_error_after_stream_started_ends_with_error_event_and_done(server) -> None:  # type: ignore[no-untyped-def]
    for directive in ("[[fail_after=2]]", "[[drop_after=2]]"):
        body = {"model": "assistant", "messages": [{"role": "user", "content": f"{directive} a b c d"}], "stream": True}
        response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=10)
        assert response.status_code == 200
        events = _sse_events(response.text)
        assert events[-1] == "[DONE]"
        error = msgspec.json.decode(events[-2])["error"]
        assert error["type"] == "upstream_error" and error["message"]
        assert len(events) == 4  # two chunks, the error, [DONE]


def test_client_disconnect_cancels_the_upstream_request(server, stub_upstream: StubUpstream) -> None:  # type: ignore[no-untyped-def]
    # streaming: read one chunk, then hang up
    marker = f"[[delay=0.1 tokens=100]] stream-{_marker()}"
    body = {"model": "assistant", "messages": [{"role": "user", "content": marker}], "stream": True}
    with httpx.Client(timeout=10) as http, http.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
    assert stub_upstream.wait_for(lambda: marker in stub_upstream.cancelled, timeout=5)

    # whole response: the client gives up waiting
    marker = f"[[hang]] whole-{_marker()}"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/chat/completions", timeout=0.5,
                   json={"model": "assistant", "messages": [{"role": "user", "content": marker}]})  # fmt: skip
    assert stub_upstream.wait_for(lambda: marker in stub_upstream.cancelled, timeout=5)
    # (the gateway's own 1 s upstream timeout would also cut it, but only after the client left)


def test_health_ready_and_access_log(server) -> None:  # type: ignore[no-untyped-def]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    marker = _marker()
    httpx.post(f"{server.base_url}/chat/completions", headers={"x-request-id": f"log-{marker}"},
               json={"model": "assistant", "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
    logs = server.wait_for_log(f"log-{marker}")  # the access line is written after the response is sent
    lines = [msgspec.json.decode(line) for line in logs.splitlines() if f"log-{marker}" in line]
    assert len(lines) == 1
    (line,) = lines
    assert line["event"] == "request.completed" and line["status"] == 200
    assert line["model"] == "assistant" and line["backend"] == "openai"
    assert line["prompt_tokens"] == 1 and line["completion_tokens"] == 2
    assert line["latency_ms"] > 0 and line["ttft_ms"] > 0 and line["overhead_ms"] >= 0
