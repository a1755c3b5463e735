"""Virtual keys on a real server with the official openai client: a disabled, expired,
over-budget, too-large or wrong-model key gets 401/403/429 with a message naming the reason and
nothing about other keys; keys are created, disabled and rotated by the CLI without a restart;
static keys keep working."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest

from bench.stub_upstream import StubUpstream
from tests.conftest import serve_process
from tests.plugins.ops_servers import taxiway

CONFIG = """
[[models]]
name = "m"
aliases = ["default"]
backend = "openai"
options = {{ base_url = "http://127.0.0.1:{port}/v1", upstream_model = "stub" }}

[[models]]
name = "other"
backend = "openai"
options = {{ base_url = "http://127.0.0.1:{port}/v1", upstream_model = "stub" }}

[plugins.auth]
keys = ["sk-static-one"]
refresh_s = 0.1
"""
NAMES = ("team-a", "to-disable", "short-lived", "small-budget", "small-tpm")


def _chat(client: openai.OpenAI, model: str = "default", max_tokens: int = 4) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello there"}],
                                          max_tokens=max_tokens)  # fmt: skip


def _leaks(message: str, own: str) -> list[str]:
    return [name for name in NAMES if name != own and name in message] + (["sk-"] if "sk-" in message else [])


def test_virtual_keys_refused_for_the_right_reason(tmp_path: Path, stub_upstream: StubUpstream) -> None:
    home = tmp_path / "home"
    config = tmp_path / "c.toml"
    config.write_text(CONFIG.format(port=stub_upstream.port))

    def create(name: str, *flags: str) -> str:
        return taxiway("keys", "create", "--config", str(config), "--name", name, *flags, home=home).strip()

    keys = {
        "team-a": create("team-a", "--models", "default", "--rpm", "100", "--tpm", "5000"),
        "to-disable": create("to-disable"),
        "short-lived": create("short-lived", "--expires", "3s"),
        "small-budget": create("small-budget", "--budget-tokens-per-day", "5"),
        "small-tpm": create("small-tpm", "--tpm", "50"),
    }
    assert all(key.startswith("sk-tw-") for key in keys.values())
    listed = taxiway("keys", "list", "--config", str(config), home=home)
    assert all(name in listed for name in NAMES) and not any(key in listed for key in keys.values())
    with pytest.raises(AssertionError, match="exists"):
        create("team-a")  # names are unique

    with serve_process(config, tmp_path, env={"TAXIWAY_HOME": str(home)}) as server:
        def client(key: str) -> openai.OpenAI:
            return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0)

        # a static key keeps working; an unknown key is refused without naming anyone
        assert _chat(client("sk-static-one")).choices[0].message.content
        with pytest.raises(openai.AuthenticationError) as unknown:
            _chat(client("sk-tw-not-a-key"))
        assert unknown.value.code == "invalid_api_key" and not _leaks(unknown.value.message, "")

        # the key's own models only (an alias names its model); x-ratelimit headers on its answers
        raw = client(keys["team-a"]).chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "100"
        assert raw.headers["x-ratelimit-remaining-requests"] == "99"
        assert raw.headers["x-ratelimit-limit-tokens"] == "5000"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 5000
        with pytest.raises(openai.PermissionDeniedError) as wrong_model:
            _chat(client(keys["team-a"]), model="other")
        assert wrong_model.value.code == "model_not_allowed" and "'other'" in wrong_model.value.message
        assert not _leaks(wrong_model.value.message, "team-a")

        # disabled by the CLI while the server runs
        assert _chat(client(keys["to-disable"])).choices
        taxiway("keys", "disable", "--config", str(config), "to-disable", home=home)
        time.sleep(0.5)
        with pytest.raises(openai.AuthenticationError) as disabled:
            _chat(client(keys["to-disable"]))
        assert disabled.value.code == "key_disabled" and "disabled" in disabled.value.message
        assert not _leaks(disabled.value.message, "to-disable")

        # over its daily budget: the first request spends it, the next is refused until tomorrow
        assert _chat(client(keys["small-budget"])).usage.total_tokens >= 5
        with pytest.raises(openai.RateLimitError) as budget:
            _chat(client(keys["small-budget"]))
        assert budget.value.code == "insufficient_quota" and "per day" in budget.value.message
        assert int(budget.value.response.headers["retry-after"]) > 0
        assert not _leaks(budget.value.message, "small-budget")

        # a request larger than the key's whole token limit
        with pytest.raises(openai.RateLimitError) as too_large:
            _chat(client(keys["small-tpm"]), max_tokens=200)
        assert "too large" in too_large.value.message and "tokens per minute" in too_large.value.message
        assert _chat(client(keys["small-tpm"]), max_tokens=8).choices  # a small one fits

        # rotated: the old secret stops working, the new one works, no restart
        new = taxiway("keys", "rotate", "--config", str(config), "team-a", home=home).strip()
        time.sleep(0.5)
        with pytest.raises(openai.AuthenticationError):
            _chat(client(keys["team-a"]))
        assert _chat(client(new)).choices

        # expired (3 s after it was created): answered until then, refused after
        deadline = time.monotonic() + 10
        while True:
            response = httpx.post(f"{server.base_url}/chat/completions", headers={"authorization": f"Bearer {keys['short-lived']}"},
                                  json={"model": "default", "messages": [{"role": "user", "content": "x"}]})  # fmt: skip
            if response.status_code != 200 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["code"] == "key_expired" and "expired" in error["message"]
        assert not _leaks(error["message"], "short-lived")
