"""The upstream transport's edges, against raw HTTP servers on real sockets: a malformed chunk
size, Content-Length or SSE event is a 502 naming the upstream (never a 500); SSE lines may end
in CR, LF or CRLF; a TLS context is built once per upstream. The last case runs end to end
through ``taxiway serve``."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from backends.openai import transport
from backends.openai.backend import OpenAIBackend, Options
from backends.openai.sse import iter_sse_data
from gateway.errors import UpstreamError
from gateway.interface import ChatMessage, GenerationRequest, SamplingParams

_CHUNK = b'{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}'  # noqa: E501
_WHOLE = b'{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'  # noqa: E501


async def _events(chunks: list[bytes]) -> list[bytes]:
    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return [data async for data in iter_sse_data(source())]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
async def test_sse_lines_end_in_lf_crlf_or_cr(eol: bytes) -> None:
    stream = eol.join([b"data: one", b"", b": comment", b"data: two", b"data: lines", b"", b"data: [DONE]", b"", b""])
    expected = [b"one", b"two\nlines", b"[DONE]"]
    assert await _events([stream]) == expected
    assert await _events([stream[i : i + 1] for i in range(len(stream))]) == expected  # split anywhere


async def test_a_crlf_split_across_chunks_is_one_line_end() -> None:
    # "\r" | "\n\r\n": had the first CR ended a line, the LF after it would end the event early
    assert await _events([b"data: a\r", b"\ndata: b\r", b"\n\r\n"]) == [b"a\nb"]
    assert await _events([b"data: a\r", b"\r", b"data: b\r\r"]) == [b"a", b"b"]  # lone CRs


# -- raw upstreams -----------------------------------------------------------------------------


@contextlib.contextmanager
def _raw_upstream(response: bytes, *, read_request: bool = True) -> Iterator[str]:
    """An HTTP server (a thread) answering every request with ``response`` as is, then closing;
    yields its base URL. ``read_request=False``: it answers on accepting, before any bytes come
    (a TLS client's hello has no end of headers to wait for: it would wait out its 5 s timeout)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):  # a client that gives up (a TLS handshake)
                conn.settimeout(5)
                data = b"" if read_request else b"\r\n\r\n"
                while b"\r\n\r\n" not in data and (more := conn.recv(65536)):
                    data += more
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                while len(body) < length and (more := conn.recv(65536)):
                    body += more
                conn.sendall(response)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _request(stream: bool) -> GenerationRequest:
    return GenerationRequest(
        request_id="r1", model="edge", messages=(ChatMessage(role="user", content="hi"),),
        sampling=SamplingParams(max_tokens=4), stream=stream,
    )  # fmt: skip


_CHUNKED = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n"
_MALFORMED = {
    "chunk size": (_CHUNKED % b"text/event-stream") + b"zz\r\ndata: x\r\n\r\n0\r\n\r\n",
    "chunk longer than its size": (_CHUNKED % b"text/event-stream") + b"3\r\ndata: x\r\n\r\n0\r\n\r\n",
    "content-length": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12x\r\n\r\n{}",
    "sse event": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
    + b"data: " + _CHUNK + b"\n\ndata: {not json\n\n",
    "whole body": b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n\r\n[1,2",
}


@pytest.mark.parametrize("transport_kind", ["lean", "httpcore"])
@pytest.mark.parametrize("case", list(_MALFORMED))
async def test_malformed_answers_are_502s_naming_the_upstream(case: str, transport_kind: str) -> None:
    with _raw_upstream(_MALFORMED[case]) as base_url:
        backend = OpenAIBackend("edge", Options(base_url=base_url, transport=transport_kind, timeout_s=5, retries=0))
        await backend.start()
        try:
            for stream in (True, False):
                with pytest.raises(UpstreamError) as info:
                    async for _ in backend.generate(_request(stream)):
                        pass
                assert info.value.status_code == 502
                assert info.value.message.startswith("upstream of 'edge' (127.0.0.1:"), info.value.message
        finally:
            await backend.stop()


async def test_a_well_framed_crlf_stream_is_served() -> None:
    events = b"".join(b"data: " + _CHUNK + b"\r\n\r\n" for _ in range(3)) + b"data: [DONE]\r\n\r\n"
    body = b"".join(b"%x\r\n%s\r\n" % (len(events[i : i + 7]), events[i : i + 7]) for i in range(0, len(events), 7))
    with _raw_upstream((_CHUNKED % b"text/event-stream") + body + b"0\r\n\r\n") as base_url:
        backend = OpenAIBackend("edge", Options(base_url=base_url, timeout_s=5, retries=0))
        await backend.start()
        try:
            items = [item async for item in backend.generate(_request(True))]
        finally:
            await backend.stop()
    assert "".join(getattr(item, "text", "") or "" for item in items) == "hihihi"


async def test_the_tls_context_is_built_once_per_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    built = []
    real = transport.ssl.create_default_context

    def counting(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        built.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(transport.ssl, "create_default_context", counting)
    with _raw_upstream(b"not TLS", read_request=False) as base_url:  # every handshake fails: each try is a new connection
        lean = transport.LeanTransport()
        async with httpx.AsyncClient(transport=lean) as client:
            for _ in range(3):
                with pytest.raises(httpx.HTTPError):
                    await client.get(base_url.replace("http://", "https://") + "/models", timeout=5)
    assert len(built) == 1


def test_a_malformed_upstream_is_a_502_through_taxiway_serve(taxiway_server) -> None:  # type: ignore[no-untyped-def]
    with _raw_upstream(_MALFORMED["chunk size"]) as base_url:
        server = taxiway_server(f"""
            [[models]]
            name = "edge"
            backend = "openai"
            options = {{ base_url = "{base_url}", timeout_s = 5, retries = 0 }}
        """)
        body = {"model": "edge", "messages": [{"role": "user", "content": "hi"}]}
        for stream in (False, True):
            response = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "stream": stream}, timeout=30)
            assert response.status_code == 502, response.text
            error = response.json()["error"]
            assert error["type"] == "upstream_error"
            assert error["message"].startswith("upstream of 'edge' (127.0.0.1:") and "chunk size" in error["message"]
    assert "request.internal_error" not in server.logs()
