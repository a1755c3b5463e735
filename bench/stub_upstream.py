"""A tiny OpenAI-compatible upstream on raw asyncio: instant echo answers and scripted failures.

For tests of the ``openai`` backend and for ``taxiway bench gateway``; not a model server. It
answers ``/v1/chat/completions``, ``/v1/completions`` (whole or streamed), ``/v1/embeddings`` and
``/v1/models``. The reply echoes the prompt: ``"echo: <last user message>"``, one token per word.

The prompt may carry directives in double brackets, e.g. ``[[status=429 retry_after=7]]``:
  status=N message=TEXT retry_after=S   answer with that HTTP error instead
  hang                                  never answer (the request waits until the client leaves)
  delay=S                               wait S seconds before each streamed chunk (and the answer)
  tokens=N                              reply with N tokens ("tok0 tok1 …") instead of the echo
  fail_after=N                          stream N chunks, then an SSE error event
  drop_after=N                          stream N chunks, then close the connection

Every request is recorded (``requests``), and so is every client that left before its answer was
complete (``cancelled``), so tests can assert what reached the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import threading
import time
from typing import Any

import msgspec

_DIRECTIVES = re.compile(r"\[\[([^\]]*)\]\]")
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}  # fmt: skip
_encode = msgspec.json.encode


class RecordedRequest(msgspec.Struct):
    path: str
    headers: dict[str, str]
    body: Any


class _Directives(msgspec.Struct):
    status: int = 200
    message: str = "scripted failure"
    retry_after: str | None = None
    hang: bool = False
    delay: float = 0.0
    tokens: int | None = None
    fail_after: int | None = None
    drop_after: int | None = None


def _directives(text: str) -> _Directives:
    fields: dict[str, Any] = {}
    for group in _DIRECTIVES.findall(text):
        for item in group.split():
            key, _, value = item.partition("=")
            if key == "hang":
                fields["hang"] = True
            elif key in ("status", "tokens", "fail_after", "drop_after"):
                fields[key] = int(value)
            elif key == "delay":
                fields[key] = float(value)
            elif key in ("message", "retry_after"):
                fields[key] = value.replace("_", " ") if key == "message" else value
    return _Directives(**fields)


class StubUpstream:
    """Serve with ``await serve(host, port)`` in a loop, or ``start_in_thread()`` from sync code."""

    def __init__(self, *, api_key: str | None = None, record: bool = True) -> None:
        self.api_key = api_key
        self.record = record
        self.requests: list[RecordedRequest] = []
        self.cancelled: list[str] = []  # prompts of requests whose client left early
        self.port = 0
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._created = int(time.time())

    # -----------------------------------------------------------------------------------------
    # running

    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
        self._server = await asyncio.start_server(self._connection, host, port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self._server

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> StubUpstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self.serve(host, port))
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="stub-upstream", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        """Stop a ``start_in_thread`` server: close it, cancel and await its connections."""
        loop, server = self._loop, self._server
        if loop is None or server is None or loop.is_closed():
            return

        async def shutdown() -> None:
            server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        """Poll ``predicate()`` until it is true or ``timeout`` passes (for tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.01)
        return bool(predicate())

    # -----------------------------------------------------------------------------------------
    # HTTP/1.1 with keep-alive

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                keep_open = await self._handle(method, path, headers, body, reader, writer)
                if not keep_open or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def _handle(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        raw: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        body = msgspec.json.decode(raw) if raw else None
        if self.record:
            self.requests.append(RecordedRequest(path=path, headers=headers, body=body))
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return self._send_error(writer, 401, "bad upstream key", None)
        if method == "GET" and path == "/v1/models":
            self._send_json(writer, 200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})
            return True
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            return self._send_error(writer, 404, f"no route {method} {path}", None)
        assert isinstance(body, dict)
        if path == "/v1/embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [{"object": "embedding", "index": i, "embedding": [float(len(t)), 0.5, -0.5]} for i, t in enumerate(inputs)]
            usage = {"prompt_tokens": sum(len(t.split()) for t in inputs), "total_tokens": 0}
            self._send_json(writer, 200, {"object": "list", "data": data, "model": body["model"], "usage": usage})
            return True
        is_chat = path == "/v1/chat/completions"
        prompt = body["messages"][-1]["content"] if is_chat else body["prompt"]
        if isinstance(prompt, list):
            prompt = " ".join(p.get("text", "") for p in prompt)
        d = _directives(prompt)
        if d.hang:
            await self._until_client_leaves(reader, prompt, timeout=None)
            return False
        if d.delay and not body.get("stream"):
            if await self._until_client_leaves(reader, prompt, timeout=d.delay):
                return False
        if d.status != 200:
            return self._send_error(writer, d.status, d.message, d.retry_after)
        words = [f"tok{i}" for i in range(d.tokens)] if d.tokens is not None else ["echo:", *prompt.split()]
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        if body.get("stream"):
            return await self._stream(body, is_chat, pieces, prompt, d, reader, writer)
        self._send_json(writer, 200, self._whole(body, is_chat, pieces, prompt))
        return True

    async def _until_client_leaves(self, reader: asyncio.StreamReader, prompt: str, timeout: float | None) -> bool:
        """Wait up to ``timeout``; True (and recorded) when the client closed the connection."""
        try:
            data = await asyncio.wait_for(reader.read(1), timeout)
        except TimeoutError:
            return False
        except ConnectionError:
            data = b""
        if not data:
            self.cancelled.append(prompt)
            return True
        return False

    # -----------------------------------------------------------------------------------------
    # bodies

    def _logprobs(self, body: dict[str, Any], is_chat: bool, pieces: list[str]) -> Any:
        if is_chat:
            if not body.get("logprobs"):
                return None
            k = body.get("top_logprobs") or 0
            return {
                "content": [
                    {
                        "token": p,
                        "logprob": -0.5,
                        "bytes": list(p.encode()),
                        "top_logprobs": [{"token": p if j == 0 else f"alt{j}", "logprob": -0.5 - j, "bytes": None} for j in range(k)],
                    }
                    for p in pieces
                ]
            }
        if body.get("logprobs") is None:
            return None
        k = body["logprobs"]
        return {
            "tokens": pieces,
            "token_logprobs": [-0.5] * len(pieces),
            "top_logprobs": [{p if j == 0 else f"alt{j}": -0.5 - j for j in range(k)} for p in pieces],
            "text_offset": [sum(len(x) for x in pieces[:i]) for i in range(len(pieces))],
        }

    def _usage(self, prompt: str, pieces: list[str], n: int) -> dict[str, int]:
        prompt_tokens = len(prompt.split())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": len(pieces) * n,
                "total_tokens": prompt_tokens + len(pieces) * n}  # fmt: skip

    def _whole(self, body: dict[str, Any], is_chat: bool, pieces: list[str], prompt: str) -> dict[str, Any]:
        n = body.get("n") or 1
        finish = "length" if body.get("max_tokens") and body["max_tokens"] <= len(pieces) else "stop"
        text = "".join(pieces)
        logprobs = self._logprobs(body, is_chat, pieces)
        if is_chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                        "finish_reason": finish} for i in range(n)]  # fmt: skip
        else:
            choices = [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish} for i in range(n)]
        return {
            "id": "upstream-1",
            "object": "chat.completion" if is_chat else "text_completion",
            "created": self._created,
            "model": body["model"],
            "choices": choices,
            "usage": self._usage(prompt, pieces, n),
            "system_fingerprint": "stub",
        }

    async def _stream(
        self,
        body: dict[str, Any],
        is_chat: bool,
        pieces: list[str],
        prompt: str,
        d: _Directives,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        left = asyncio.ensure_future(self._until_client_leaves(reader, prompt, timeout=None))
        n = body.get("n") or 1
        base = {"id": "upstream-1", "object": "chat.completion.chunk" if is_chat else "text_completion",
                "created": self._created, "model": body["model"], "system_fingerprint": "stub"}  # fmt: skip
        try:
            for position, piece in enumerate(pieces):
                if d.delay:
                    await asyncio.wait({left}, timeout=d.delay)
                if left.done():
                    return False
                if d.fail_after is not None and position == d.fail_after:
                    self._chunk(writer, {"error": {"message": "scripted failure mid-stream", "type": "server_error"}})
                    break
                if d.drop_after is not None and position == d.drop_after:
                    writer.transport.abort()
                    return False
                last = position == len(pieces) - 1
                lp = self._logprobs(body, is_chat, [piece])
                for i in range(n):
                    if is_chat:
                        delta = {"role": "assistant", "content": piece} if position == 0 else {"content": piece}
                        choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": "stop" if last else None}
                    else:
                        choice = {"index": i, "text": piece, "logprobs": lp, "finish_reason": "stop" if last else None}
                    self._chunk(writer, {**base, "choices": [choice]})
                await writer.drain()
            if body.get("stream_options", {}).get("include_usage"):
                self._chunk(writer, {**base, "choices": [], "usage": self._usage(prompt, pieces, n)})
            self._raw_chunk(writer, b"data: [DONE]\n\n")
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        finally:
            left.cancel()

    # -----------------------------------------------------------------------------------------
    # writing

    def _chunk(self, writer: asyncio.StreamWriter, payload: dict[str, Any]) -> None:
        self._raw_chunk(writer, b"data: " + _encode(payload) + b"\n\n")

    @staticmethod
    def _raw_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    @staticmethod
    def _send_json(writer: asyncio.StreamWriter, status: int, payload: Any, extra: bytes = b"") -> None:
        data = _encode(payload)
        writer.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, _REASONS.get(status, "Status").encode(), len(data), extra, data)
        )

    def _send_error(self, writer: asyncio.StreamWriter, status: int, message: str, retry_after: str | None) -> bool:
        extra = f"retry-after: {retry_after}\r\n".encode() if retry_after else b""
        kind = "rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "server_error"
        self._send_json(writer, status, {"error": {"message": message, "type": kind, "param": None, "code": None}}, extra)
        return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A stub OpenAI-compatible upstream (tests, benchmarks)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8101)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    stub = StubUpstream(record=False)

    async def run() -> None:
        server = await stub.serve(args.host, args.port)
        print(f"stub upstream on http://{args.host}:{stub.port}/v1", flush=True)
        await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
