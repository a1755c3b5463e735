"""``taxiway chat`` in a pseudo-terminal against a real ``taxiway serve MODEL --api-key KEY``
(no config): type, read the answer as it streams, see its timings, quit. The same server answers
``taxiway ps`` and shows that ``serve MODEL`` served that model alone, under the key."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pexpect
import pytest

from tests.conftest import REPO_ROOT, ServerProcess, serve_process

pytestmark = pytest.mark.slow

KEY = "chat-test-key"
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serve_process(None, tmp_path_factory.mktemp("chat"), extra_args=(MODEL, "--api-key", KEY),
                       startup_timeout=120) as server:  # fmt: skip
        server.wait_ready(180)
        yield server


def _taxiway(*args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "gateway", *args], cwd=str(REPO_ROOT), encoding="utf-8",
                         timeout=120, dimensions=(40, 120))  # fmt: skip


def test_serve_model_serves_that_model_alone_under_the_key(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/models", timeout=10).status_code == 401
    cards = httpx.get(f"{server.base_url}/models", headers={"authorization": f"Bearer {KEY}"}, timeout=10).json()
    assert [(c["id"], c["root"]) for c in cards["data"]] == [(MODEL, MODEL), ("default", MODEL)]


def test_chat_streams_the_answer_in_a_terminal(server: ServerProcess) -> None:
    chat = _taxiway("chat", "--url", server.url, "--api-key", KEY, "--temperature", "0", "--max-tokens", "40")
    try:
        chat.expect_exact(f"Chatting with default at {server.url}")
        chat.expect_exact(">>> ")
        chat.sendline("Name three colours of the rainbow.")
        # the answer arrives in pieces: read what the terminal shows as it grows, until the timings line
        seen: list[tuple[float, str]] = []
        text = ""
        deadline = time.monotonic() + 120  # generous: a busy machine slows the model, not the check
        while "[TTFT" not in text and time.monotonic() < deadline:
            try:
                text += chat.read_nonblocking(4096, timeout=1)
                seen.append((time.monotonic(), text))
            except pexpect.TIMEOUT:
                continue
        stats = re.search(r"\[TTFT ([\d.]+) s · ([\d.]+) tokens/s · (\d+) prompt \+ (\d+) completion tokens\]", text)
        assert stats is not None, text
        ttft, tokens_per_s, completion = float(stats[1]), float(stats[2]), int(stats[4])
        answer = text.split("\n", 1)[1].split("[TTFT")[0].strip()  # past the echoed line
        assert answer and 0 < ttft < 30 and tokens_per_s > 0 and 1 < completion <= 40
        # streamed: the terminal showed the answer growing, in two or more reads, before its timings
        bodies = {t.split("\n", 1)[1].strip() for _, t in seen if "\n" in t and "[TTFT" not in t} - {""}
        assert len(bodies) >= 2 and all(answer.startswith(b) for b in bodies), (bodies, answer)

        if ">>> " not in text.split("[TTFT", 1)[1]:  # the next prompt may have come in the last read
            chat.expect_exact(">>> ")
        # the next turn remembers this one: a longer prompt
        chat.sendline("And one more?")
        chat.expect(r"\[TTFT [\d.]+ s · [\d.]+ tokens/s · (\d+) prompt")
        assert int(chat.match[1]) > int(stats[3]) + completion
        chat.expect_exact(">>> ")
        chat.sendline("/bye")
        chat.expect(pexpect.EOF)
    finally:
        chat.close()
    assert chat.exitstatus == 0


def test_chat_shows_the_apis_error_and_quits_on_ctrl_d(server: ServerProcess) -> None:
    wrong = _taxiway("chat", "--url", server.url, "--api-key", "wrong")
    wrong.expect(pexpect.EOF)
    wrong.close()
    assert wrong.exitstatus == 1 and "401: Incorrect API key provided." in (wrong.before or "")

    chat = _taxiway("chat", "nope", "--url", server.url, "--api-key", KEY)
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 1 and f"it serves: {MODEL}, default" in (chat.before or "")

    chat = _taxiway("chat", MODEL, "--url", server.url, "--api-key", KEY, "--max-tokens", "0")
    chat.expect_exact(">>> ")
    chat.sendline("Hi")  # max_tokens 0: the server's 400, its message shown, the chat goes on
    chat.expect(r"error: 400: .*max_tokens")
    chat.expect_exact(">>> ")
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ps_lists_the_served_model(server: ServerProcess, tmp_path: Path) -> None:
    ps = _taxiway("ps", "--url", server.url)
    ps.expect(pexpect.EOF)
    ps.close()
    lines = (ps.before or "").strip().splitlines()
    assert ps.exitstatus == 0 and lines[0].split()[:4] == ["NAME", "ALIASES", "BACKEND", "STATE"], lines
    assert lines[1].split()[:4] == [MODEL, "default", "engine", "loaded"], lines
