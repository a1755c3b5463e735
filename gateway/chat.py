"""``taxiway chat``: an interactive chat in the terminal with a running server's model.

A client like any other: it streams ``POST /v1/chat/completions`` and prints each piece as it
comes, then a line of timings (TTFT, tokens/s, usage). The conversation is kept and sent again
with each turn. ``/clear`` forgets it, ``/bye`` (or Ctrl-D) quits; Ctrl-C stops an answer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from typing import Any, TextIO

import httpx

PROMPT = ">>> "
HELP = "Type a message. /clear forgets the conversation, /bye (or Ctrl-D) quits, Ctrl-C stops an answer."


class ChatError(Exception):
    """The server refused a request: its OpenAI error message."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Chat with a model of a running Taxiway server (`taxiway serve MODEL` in another terminal), "
        "the answer streamed as it is written, with TTFT, tokens/s and usage after each."
    )
    parser.add_argument("model", nargs="?", default="default", metavar="MODEL",
                        help="a model the server serves (default: default)")  # fmt: skip
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    parser.add_argument("--api-key", metavar="KEY", help="when the server asks for one")
    parser.add_argument("--system", metavar="TEXT", help="a system prompt")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: the server's)")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest answer, in tokens")


def run(args: argparse.Namespace) -> int:
    """Chat with a model of a running server in the terminal, answers streamed."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url.rstrip("/") + "/v1", headers=headers, timeout=httpx.Timeout(600, connect=5)) as client:
        try:
            models = _models(client)
        except httpx.TransportError as exc:
            print(f"taxiway chat: cannot reach {args.url} ({exc}); start one with `taxiway serve MODEL`", file=sys.stderr)
            return 1
        except ChatError as exc:
            print(f"taxiway chat: {exc}", file=sys.stderr)
            return 1
        if args.model not in models:
            print(f"taxiway chat: the server has no model {args.model!r} (it serves: {', '.join(models)})", file=sys.stderr)
            return 1
        session = Session(client, args.model, system=args.system, temperature=args.temperature,
                          max_tokens=args.max_tokens)  # fmt: skip
        print(f"Chatting with {args.model} at {args.url}. {HELP}")
        return session.loop(sys.stdout)


def _models(client: httpx.Client) -> list[str]:
    response = client.get("/models")
    _raise_for_error(response)
    return [card["id"] for card in response.json()["data"]]


def _raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text
    raise ChatError(f"{response.status_code}: {message}")


class Session:
    """One conversation: the messages so far and the sampling settings sent with each turn."""

    def __init__(
        self, client: httpx.Client, model: str, *, system: str | None, temperature: float | None, max_tokens: int | None
    ) -> None:
        self.client = client
        self.model = model
        self.system = system
        self.params: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
        self.history: list[dict[str, str]] = []

    def loop(self, out: TextIO) -> int:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                out.write("\n")
                return 0
            except KeyboardInterrupt:
                out.write("\n")
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/bye", "/quit", "/exit"):
                return 0
            if text == "/clear":
                self.history.clear()
                out.write("(conversation cleared)\n")
                continue
            if text in ("/help", "/?"):
                out.write(HELP + "\n")
                continue
            self.turn(text, out)

    def turn(self, text: str, out: TextIO) -> None:
        """Send ``text`` with the conversation so far; print the answer as it streams, then its timings."""
        messages = [*([{"role": "system", "content": self.system}] if self.system else []), *self.history,
                    {"role": "user", "content": text}]  # fmt: skip
        started = time.perf_counter()
        first = last = None
        usage: dict[str, int] | None = None
        pieces: list[str] = []
        try:
            for chunk in self._stream(messages):
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", ()):
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        last = time.perf_counter()
                        first = first or last
                        pieces.append(content)
                        out.write(content)
                        out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]\n")
            return
        except ChatError as exc:
            out.write(f"error: {exc}\n")
            return
        except httpx.TransportError as exc:
            out.write(f"error: the server went away ({exc})\n")
            return
        out.write("\n")
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]
        out.write(_stats(started, first, last, usage) + "\n")

    def _stream(self, messages: list[dict[str, str]]) -> Iterator[dict[str, Any]]:
        body = {"model": self.model, "messages": messages, "stream": True, "stream_options": {"include_usage": True},
                **{k: v for k, v in self.params.items() if v is not None}}  # fmt: skip
        with self.client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                _raise_for_error(response)
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:  # an error after the stream began
                    raise ChatError(chunk["error"].get("message", "error"))
                yield chunk


def _stats(started: float, first: float | None, last: float | None, usage: dict[str, int] | None) -> str:
    parts = []
    if first is not None:
        parts.append(f"TTFT {first - started:.2f} s")
    if usage is not None and first is not None and last is not None and last > first and usage["completion_tokens"] > 1:
        # decode rate: the tokens after the first over the time after it (TTFT shown apart)
        parts.append(f"{(usage['completion_tokens'] - 1) / (last - first):.1f} tokens/s")
    if usage is not None:
        parts.append(f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens")
    return "[" + " · ".join(parts) + "]"
