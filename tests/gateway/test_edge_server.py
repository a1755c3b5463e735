"""The edge's limits on a real ``taxiway serve``, driven over raw sockets: malformed and oversized
requests, slowloris heads and bodies, idle and surplus connections, and max_request_time_s —
each answered with OpenAI's error JSON (or a silent close where nothing was asked)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.stub_upstream import StubUpstream
from tests.conftest import ServerProcess, serve_process

CONFIG = """
[server]
header_timeout_s = 1.0
body_timeout_s = 1.0
idle_timeout_s = 2.0
max_header_bytes = 8192
max_headers = 20
max_url_bytes = 2048
max_request_time_s = 1.5

[[models]]
name = "m"
backend = "openai"
options = {{ base_url = "http://127.0.0.1:{port}/v1", upstream_model = "stub" }}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, stub_upstream: StubUpstream) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("edge")
    with serve_process(CONFIG.format(port=stub_upstream.port), tmp, env={"TAXIWAY_HOME": str(tmp)}) as running:
        yield running


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, closed): one whole response read, and whether the server then
    closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    closed = sock.recv(1) == b""
    return int(status_line.split()[1]), headers, rest[:length], closed


def _error(body: bytes) -> dict[str, object]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def _exchange(server: ServerProcess, raw: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    with _connect(server) as sock:
        sock.sendall(raw)
        return _read_response(sock)


def test_a_100kb_url_is_414_json(server: ServerProcess) -> None:
    status, headers, body, closed = _exchange(server, b"GET /v1/models?" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414 and headers["content-type"] == "application/json" and closed
    assert _error(body)["code"] == "url_too_long"


def test_an_absurd_content_length_is_400_json(server: ServerProcess) -> None:
    raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999999\r\n\r\n{}"
    status, headers, body, closed = _exchange(server, raw)
    assert status == 400 and headers["content-type"] == "application/json" and closed
    assert _error(body)["type"] == "invalid_request_error"


def test_a_content_length_over_the_body_limit_is_413_json(server: ServerProcess) -> None:
    raw = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999\r\n\r\n{}"
    status, _, body, _ = _exchange(server, raw)
    assert status == 413 and _error(body)["code"] == "payload_too_large"


def test_bytes_that_are_not_http_are_400_json(server: ServerProcess) -> None:
    status, headers, body, closed = _exchange(server, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    assert status == 400 and headers["content-type"] == "application/json" and closed
    assert "Malformed HTTP request" in str(_error(body)["message"])


def test_a_path_that_is_not_ascii_is_400_json(server: ServerProcess) -> None:
    status, _, body, closed = _exchange(server, b"GET /v1/mod\xc3\xa9ls HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400 and closed and "url" in str(_error(body)["message"])


def test_too_many_header_fields_are_431_json(server: ServerProcess) -> None:
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(21))
    status, _, body, closed = _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    assert status == 431 and closed and _error(body)["code"] == "request_header_fields_too_large"
    # 20 fields with Host are within the limit (read without waiting for the idle close: 2 s)
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(19))
    with _connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        assert _read_response_keep_alive(sock) == 200


def test_headers_over_max_header_bytes_are_431_json_even_sent_slowly(server: ServerProcess) -> None:
    with _connect(server) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(10):  # one endless header, 1 KiB at a time: never held whole in memory past the limit
            try:
                sock.sendall(b"v" * 1024)
            except OSError:
                break
            time.sleep(0.01)
        status, _, body, closed = _read_response(sock)
    assert status == 431 and closed and _error(body)["code"] == "request_header_fields_too_large"


def test_a_body_shorter_than_its_content_length_is_408_json_within_the_timeout(server: ServerProcess) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n{\"model\": \"m\"")  # fmt: skip
        start = time.monotonic()
        status, headers, body, closed = _read_response(sock)
        elapsed = time.monotonic() - start
    assert status == 408 and headers["content-type"] == "application/json" and closed
    assert _error(body)["code"] == "request_timeout" and "body" in str(_error(body)["message"])
    assert 0.9 <= elapsed < 5.0  # body_timeout_s = 1


def test_a_slowloris_head_is_408_json(server: ServerProcess) -> None:
    with _connect(server) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        for _ in range(4):
            time.sleep(0.4)
            try:
                sock.sendall(b"X-Slow: 1\r\n")  # a field at a time, never the blank line
            except OSError:
                break
        status, _, body, closed = _read_response(sock)
        elapsed = time.monotonic() - start
    assert status == 408 and closed and "headers" in str(_error(body)["message"])
    assert 0.9 <= elapsed < 5.0  # header_timeout_s = 1


def test_an_idle_connection_is_closed_silently(server: ServerProcess) -> None:
    for first in (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"):  # new, and kept alive after a request
        with _connect(server) as sock:
            if first:
                sock.sendall(first)
                assert _read_response_keep_alive(sock) == 200
            start = time.monotonic()
            assert sock.recv(1024) == b""  # closed, nothing written
            assert 1.5 <= time.monotonic() - start < 6.0  # idle_timeout_s = 2


def _read_response_keep_alive(sock: socket.socket) -> int:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")).split(b":")[1])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split()[1])


def test_requests_on_one_connection_still_work(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, timeout=10) as client:
        for i in range(3):
            response = client.post("/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}]})
            assert response.status_code == 200 and f"hi {i}" in response.text


def test_max_request_time_cuts_a_stream_with_an_error_event_and_a_whole_answer_with_504(server: ServerProcess) -> None:
    slow = [{"role": "user", "content": "[[delay=0.3 tokens=20]] slow"}]  # 6 s; max_request_time_s = 1.5
    with httpx.Client(base_url=server.base_url, timeout=20) as client:
        start = time.monotonic()
        hang = [{"role": "user", "content": "[[hang]] never answered"}]
        response = client.post("/chat/completions", json={"model": "m", "messages": hang})
        assert response.status_code == 504 and response.json()["error"]["code"] == "request_time_exceeded"
        assert 1.4 <= time.monotonic() - start < 4.0
        with client.stream("POST", "/chat/completions", json={"model": "m", "messages": slow, "stream": True}) as stream:
            assert stream.status_code == 200
            events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_time_exceeded"
        assert 1 <= len(events) - 2 < 20  # some tokens, then the cut
        # a quick one is untouched
        quick = client.post("/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "fast"}]})
        assert quick.status_code == 200


def test_connections_past_max_connections_get_503_json(tmp_path: Path, stub_upstream: StubUpstream) -> None:
    config = CONFIG.format(port=stub_upstream.port).replace("[server]", "[server]\nmax_connections = 3")
    with serve_process(config, tmp_path, env={"TAXIWAY_HOME": str(tmp_path)}) as server:
        held = [_connect(server) for _ in range(3)]
        try:
            time.sleep(0.2)
            status, headers, body, closed = _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status == 503 and closed and headers["retry-after"] == "1"
            assert _error(body)["code"] == "too_many_connections"
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert httpx.get(f"{server.url}/health").status_code == 200
