"""Live reload in process (fake backends): the diff by entry, drain, the bad file, the admin API.

The same against real servers and engine models is tests/gateway/test_reload_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from gateway_fakes import FakeBackend, fake_plugins

from gateway.app import create_app
from gateway.cli import format_ps
from gateway.config import load_settings, parse_settings
from gateway.errors import ConfigError, UpstreamError

A_B = """
[[models]]
name = "a"
aliases = ["default"]
backend = "fake"

[[models]]
name = "b"
backend = "fake"
"""

# b removed, c added, `default` moved from a to c; a itself unchanged
A_C = """
[[models]]
name = "a"
backend = "fake"

[[models]]
name = "c"
aliases = ["default"]
backend = "fake"
"""


def _instance(name: str) -> FakeBackend:
    (backend,) = [b for b in FakeBackend.instances if b.model_name == name and b.started]
    return backend


def _complete(model: str, prompt: str = "one two three", stream: bool = False) -> dict[str, object]:
    return {"model": model, "prompt": prompt, "max_tokens": 8, "stream": stream}


@contextlib.asynccontextmanager
async def _client(path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this event loop (litestar's test client runs it in a thread of its own, one
    request at a time): requests here overlap a reload."""
    app = create_app(load_settings(path), plugins=fake_plugins(), config_path=path)
    async with app.lifespan(), httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        yield client


def _config(tmp_path: Path) -> Path:
    FakeBackend.instances.clear()
    path = tmp_path / "config.toml"
    path.write_text(A_B)
    return path


async def _admin_models(client: httpx.AsyncClient) -> dict[str, dict[str, object]]:
    response = await client.get("/admin/models")
    assert response.status_code == 200, response.text
    return {m["name"]: m for m in response.json()["data"]}


async def test_reload_applies_the_diff_by_entry(tmp_path: Path) -> None:
    path = _config(tmp_path)
    async with _client(path) as client:
        a, b = _instance("a"), _instance("b")
        b.delay_s = 0.05
        # a stream on b, in flight across the reload that removes b
        in_flight = asyncio.ensure_future(client.post("/v1/completions", json=_complete("b", "w " * 20, stream=True)))
        while not b.requests:
            await asyncio.sleep(0.01)

        path.write_text(A_C)
        response = await client.post("/admin/reload")
        assert response.status_code == 200, response.text
        assert response.json() == {
            "added": ["c"], "removed": ["b"], "changed": [], "unchanged": ["a"], "status": "reloaded"
        }  # fmt: skip

        models = await _admin_models(client)
        assert models["b"]["state"] == "draining" and models["b"]["in_flight"] == 1 and not b.stopped
        assert models["c"]["state"] == "loaded" and models["c"]["aliases"] == ["default"]
        assert (await client.post("/v1/completions", json=_complete("b"))).status_code == 404  # no new request
        assert (await client.post("/v1/completions", json=_complete("default"))).json()["model"] == "c"

        streamed = await in_flight  # the drained stream finished whole
        assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
        assert '"finish_reason":"stop"' in streamed.text and "error" not in streamed.text
        for _ in range(100):
            if b.stopped:
                break
            await asyncio.sleep(0.02)
        assert b.stopped and "b" not in await _admin_models(client)
        # unchanged: the same instance, never restarted nor stopped
        assert _instance("a") is a and not a.stopped
        assert [x.model_name for x in FakeBackend.instances if x.started] == ["a", "b", "c"]


async def test_changed_entry_is_replaced(tmp_path: Path) -> None:
    path = _config(tmp_path)
    async with _client(path) as client:
        old_a = _instance("a")
        path.write_text(A_B.replace('backend = "fake"\n', 'backend = "fake"\noptions = { max_n = 2 }\n', 1))
        response = await client.post("/admin/reload")
        assert response.json()["changed"] == ["a"] and response.json()["unchanged"] == ["b"]
        new_a = next(x for x in FakeBackend.instances if x.model_name == "a" and x is not old_a and x.started)
        assert new_a.options.max_n == 2
        assert (await client.post("/v1/completions", json=_complete("default"))).status_code == 200
        assert new_a.requests and not old_a.requests[-1:]  # the request went to the new version
        for _ in range(100):
            if old_a.stopped:
                break
            await asyncio.sleep(0.02)
        assert old_a.stopped and not new_a.stopped


async def test_bad_reload_keeps_the_old_config(tmp_path: Path) -> None:
    path = _config(tmp_path)
    async with _client(path) as client:
        path.write_text(A_C.replace('backend = "fake"', 'backend = "nope"', 1))
        response = await client.post("/admin/reload")
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "models[0].backend" and error["code"] == "invalid_config"
        assert "models[0].backend" in error["message"]
        path.write_text(A_C + "\n[server]\nport = 99999\n")
        assert (await client.post("/admin/reload")).json()["error"]["param"] == "server.port"
        # still serving the old table
        assert (await client.post("/v1/completions", json=_complete("default"))).json()["model"] == "a"
        assert (await client.post("/v1/completions", json=_complete("b"))).status_code == 200


async def test_a_new_model_that_fails_to_start_keeps_the_old_config(tmp_path: Path) -> None:
    path = _config(tmp_path)
    async with _client(path) as client:
        path.write_text(A_C.replace('name = "c"\naliases = ["default"]\nbackend = "fake"',
                                    'name = "c"\naliases = ["default"]\nbackend = "fake"\n'
                                    'options = { ready = false, failed = true }'))  # fmt: skip
        response = await client.post("/admin/reload")
        assert response.status_code == 503 and "'c' failed to start" in response.json()["error"]["message"]
        assert _instance("c").stopped
        assert (await client.post("/v1/completions", json=_complete("default"))).json()["model"] == "a"
        assert set(await _admin_models(client)) == {"a", "b"}


async def test_unload_and_load(tmp_path: Path) -> None:
    path = _config(tmp_path)
    async with _client(path) as client:
        response = await client.post("/admin/models/default/unload")
        assert response.status_code == 200 and response.json()["state"] == "unloaded" and _instance("a").stopped
        refused = await client.post("/v1/completions", json=_complete("a"))
        assert refused.status_code == 503 and "unloaded" in refused.json()["error"]["message"]
        assert (await client.post("/admin/models/a/load")).json()["state"] == "loaded"
        assert (await client.post("/v1/completions", json=_complete("a"))).status_code == 200
        _instance("a").fail_with = UpstreamError("upstream down")
        assert (await client.post("/v1/completions", json=_complete("a", stream=True))).status_code == 502
        models = await _admin_models(client)  # every response ended, failed ones too: none in flight
        assert [m["in_flight"] for m in models.values()] == [0, 0] and models["a"]["last_used"] is not None
        assert models["b"]["last_used"] is None and models["a"]["memory_bytes"] is None
        assert (await client.post("/admin/models/zz/load")).status_code == 404
        assert (await client.get("/admin/models/a/load")).status_code == 405


@pytest.mark.parametrize(
    ("extra", "host", "headers", "status"),
    [
        ("", "127.0.0.1", {}, 200),  # no admin key: loopback only
        ("", "0.0.0.0", {}, 403),
        ('[admin]\nkeys = ["adm-1"]\n', "0.0.0.0", {}, 401),
        ('[admin]\nkeys = ["adm-1"]\n', "0.0.0.0", {"authorization": "Bearer adm-1"}, 200),
        ('[admin]\nkey_hashes = ["sha256:' + "0" * 64 + '"]\n', "127.0.0.1", {}, 401),
    ],
)
async def test_admin_keys(tmp_path: Path, extra: str, host: str, headers: dict[str, str], status: int) -> None:
    path = tmp_path / "config.toml"
    path.write_text(A_B + f'\n[server]\nhost = "{host}"\n' + extra)
    async with _client(path) as client:
        assert (await client.get("/admin/models", headers=headers)).status_code == status
        assert (await client.post("/admin/reload", headers=headers)).status_code == status


def test_ps_table() -> None:
    rows = [
        {"name": "a", "aliases": ["default"], "backend": "engine", "state": "loaded", "memory_bytes": 300 * 2**20,
         "in_flight": 2, "last_used": 95.0},
        {"name": "b", "aliases": [], "backend": "openai", "state": "draining", "memory_bytes": None,
         "in_flight": 0, "last_used": None},
    ]  # fmt: skip
    assert format_ps(rows, now=100.0).splitlines() == [
        "NAME   ALIASES   BACKEND   STATE      MEMORY    IN FLIGHT   LAST USED",
        "a      default   engine    loaded     300 MiB   2           5s ago",
        "b      -         openai    draining   -         0           never",
    ]


@pytest.mark.parametrize(
    ("table", "path"),
    [
        ('[admin]\nkey_hashes = ["md5:00"]\n', "admin.key_hashes[0]"),
        ("[admin]\nkeyz = []\n", "admin.keyz"),
        ("[server]\nready_timeout_s = 0\n", "server.ready_timeout_s"),
    ],
)
def test_new_keys_are_validated(table: str, path: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_settings(A_B + table, env={})
    assert raised.value.path == path
