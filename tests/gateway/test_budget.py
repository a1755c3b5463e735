"""The memory budget in process (fake backends that declare their memory): what starts, the LRU
eviction, in-flight and pinned models kept, the 503 naming the budget, one shared load,
keep_alive, and the config keys. The same against a real server and engine models is
tests/gateway/test_budget_server.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from gateway_fakes import FakeBackend, fake_plugins

from gateway.app import create_app
from gateway.budget import Budget, format_size, parse_seconds, parse_size
from gateway.config import load_settings, parse_settings
from gateway.errors import ConfigError, ServiceUnavailableError
from gateway.fleet import read_config
from gateway.hookspecs import hookimpl
from gateway.interface import ReadyState
from gateway.plugins import Plugins
from gateway.router import build_router

MIB = 1 << 20


class SizedBackend(FakeBackend):
    """A fake that needs ``memory_mib`` and holds it while started; counts its starts."""

    class Options(FakeBackend.Options, frozen=True, kw_only=True, forbid_unknown_fields=True):
        memory_mib: int = 0
        start_s: float = 0.0

    def __init__(self, model_name: str, options: Any) -> None:
        super().__init__(model_name, options)
        self.is_loaded = False
        self.num_starts = 0

    async def start(self) -> None:
        self.num_starts += 1
        await asyncio.sleep(self.options.start_s)
        self.is_loaded = True
        await super().start()

    async def stop(self) -> None:
        self.is_loaded = False
        await super().stop()

    def ready(self) -> ReadyState:
        return ReadyState(ready=self.is_loaded, detail="" if self.is_loaded else "unloaded")

    def memory_required(self) -> int | None:
        return self.options.memory_mib * MIB

    def memory_bytes(self) -> int | None:
        return self.options.memory_mib * MIB if self.is_loaded else 0


class SizedPlugin:
    @hookimpl
    def register_backends(self, register: Callable[..., None]) -> None:
        register("sized", SizedBackend)


def _plugins() -> Plugins:
    return fake_plugins(("sized", SizedPlugin()))


def _entry(name: str, mib: int, extra: str = "", options: str = "") -> str:
    return f'[[models]]\nname = "{name}"\nbackend = "sized"\noptions = {{ memory_mib = {mib}{options} }}\n{extra}\n'


def _write(tmp_path: Path, text: str) -> Path:
    FakeBackend.instances.clear()
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def _backend(name: str) -> SizedBackend:
    (backend,) = [b for b in FakeBackend.instances if b.model_name == name and isinstance(b, SizedBackend)]
    return backend


@contextlib.asynccontextmanager
async def _client(path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(load_settings(path), plugins=_plugins(), config_path=path)
    async with app.lifespan(), httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        yield client


async def _states(client: httpx.AsyncClient) -> dict[str, str]:
    return {m["name"]: m["state"] for m in (await client.get("/admin/models")).json()["data"]}


async def _ask(client: httpx.AsyncClient, model: str) -> httpx.Response:
    return await client.post("/v1/completions", json={"model": model, "prompt": "one two", "max_tokens": 4})


THREE = "[server]\nmemory_budget = \"250MiB\"\n" + "".join(
    _entry(name, 100, 'load = "on_demand"' if name == "c" else "") for name in "abc"
)


def test_make_room_evicts_idle_unpinned_least_recently_used_first() -> None:
    entries = [_entry(name, 100, "pin = true" if name == "p" else "") for name in "abcdp"]
    settings = parse_settings('[server]\nmemory_budget = "400MiB"\n' + "".join(entries), env={})
    router = build_router(settings, _plugins())
    budget = Budget(settings, router)
    budget.bind(lambda: router.routes, None, None, None)  # type: ignore[arg-type]  # decisions only
    a, b, c, d, p = router.routes
    for route, last_used in ((a, 3.0), (b, 1.0), (c, 2.0), (p, 0.5)):
        route.phase, route.last_used = "serving", last_used
    d.phase = "stopped"
    assert budget.held() == 400 * MIB  # a, b, c and the pinned p; d unloaded
    b.num_in_flight = 1  # the least recently used, but in flight
    assert budget.make_room(d) == [c] and c.phase == "stopped"  # then c, older than a
    c.phase = "serving"
    with pytest.raises(ServiceUnavailableError) as caught:
        d.backend.options = msgspec.structs.replace(d.backend.options, memory_mib=300)
        budget._needs.clear()
        budget.make_room(d)  # a and c free 200 MiB: not enough, and nothing is marked
    assert caught.value.message == "memory budget 400.0 MiB: 400.0 MiB held by models in use, 'd' needs 300.0 MiB"
    assert caught.value.headers == {"Retry-After": "5"} and a.phase == c.phase == "serving"


async def test_lru_eviction_and_in_flight_models_kept(tmp_path: Path) -> None:
    async with _client(_write(tmp_path, THREE)) as client:
        assert await _states(client) == {"a": "loaded", "b": "loaded", "c": "unloaded"}
        assert (await client.get("/ready")).status_code == 200  # c loads on its request: not "not ready"
        assert (await _ask(client, "b")).status_code == 200
        assert (await _ask(client, "a")).status_code == 200  # b is now the least recently used
        assert (await _ask(client, "c")).status_code == 200
        assert await _states(client) == {"a": "loaded", "b": "unloaded", "c": "loaded"}
        assert not _backend("b").is_loaded and _backend("c").num_starts == 1

        # c streams slowly (in flight) and a is used after it: c is the least recently used, yet b
        # comes back by evicting a
        _backend("c").delay_s = 0.2
        stream = asyncio.create_task(client.post("/v1/completions", json={"model": "c", "prompt": "x y z w",
                                                                          "max_tokens": 8, "stream": True}))
        await asyncio.sleep(0.1)
        assert (await _ask(client, "a")).status_code == 200
        assert (await _ask(client, "b")).status_code == 200
        assert await _states(client) == {"a": "unloaded", "b": "loaded", "c": "loaded"}

        # now b is idle but c still streams: a fits only by evicting b; then nothing is left
        _backend("b").delay_s = 0.2
        held = asyncio.create_task(_ask(client, "b"))
        await asyncio.sleep(0.1)
        refused = await _ask(client, "a")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        message = refused.json()["error"]["message"]
        assert message == "memory budget 250.0 MiB: 200.0 MiB held by models in use, 'a' needs 100.0 MiB"
        assert (await stream).status_code == 200 and (await held).status_code == 200
        assert (await _ask(client, "a")).status_code == 200  # both idle again: the LRU one (c) goes
        assert await _states(client) == {"a": "loaded", "b": "loaded", "c": "unloaded"}


async def test_no_room_goes_to_a_loaded_fallback(tmp_path: Path) -> None:
    text = '[server]\nmemory_budget = "150MiB"\n' + _entry("a", 100) + _entry("b", 100, 'fallbacks = ["a"]')
    async with _client(_write(tmp_path, text)) as client:
        assert await _states(client) == {"a": "loaded", "b": "unloaded"}
        _backend("a").delay_s = 0.2
        held = asyncio.create_task(_ask(client, "a"))
        await asyncio.sleep(0.1)
        answered = await _ask(client, "b")  # no room for b while a streams: a answers for it
        assert answered.status_code == 200 and answered.json()["model"] == "a"
        assert (await held).status_code == 200
        assert (await _ask(client, "b")).json()["model"] == "b"  # a idle now: evicted for b


async def test_pinned_models_stay_and_eager_models_start_if_they_fit(tmp_path: Path) -> None:
    budget = "[server]\nmemory_budget = 250_000_000\n"
    text = budget + _entry("a", 100, "pin = true") + _entry("b", 100) + _entry("c", 100)
    async with _client(_write(tmp_path, text)) as client:
        # c is eager but does not fit beside a and b: it loads on its first request, like on_demand
        assert await _states(client) == {"a": "loaded", "b": "loaded", "c": "unloaded"}
        assert (await _ask(client, "b")).status_code == 200
        assert (await _ask(client, "c")).status_code == 200  # a is older but pinned: b goes
        assert await _states(client) == {"a": "loaded", "b": "unloaded", "c": "loaded"}


async def test_concurrent_requests_share_one_load(tmp_path: Path) -> None:
    text = "[server]\nmemory_budget = \"1GiB\"\n" + _entry("a", 100, 'load = "on_demand"', ", start_s = 0.2")
    async with _client(_write(tmp_path, text)) as client:
        responses = await asyncio.gather(*(_ask(client, "a") for _ in range(5)))
        assert [r.status_code for r in responses] == [200] * 5 and _backend("a").num_starts == 1
        model = (await client.get("/admin/models")).json()["data"][0]
        assert model["state"] == "loaded" and model["memory_bytes"] == 100 * MIB


async def test_load_timeout(tmp_path: Path) -> None:
    text = "[server]\nload_timeout_s = 0.1\n" + _entry("a", 1, 'load = "on_demand"', ", start_s = 0.5")
    async with _client(_write(tmp_path, text)) as client:
        slow = await _ask(client, "a")
        assert slow.status_code == 503 and "still loading" in slow.json()["error"]["message"]
        assert "retry-after" in slow.headers
        await asyncio.sleep(0.5)
        assert (await _ask(client, "a")).status_code == 200  # the load went on: no second start
        assert _backend("a").num_starts == 1


async def test_keep_alive_unloads_idle_models(tmp_path: Path) -> None:
    text = _entry("a", 10, "keep_alive = 0.3") + _entry("b", 10, 'keep_alive = "1h"') + _entry("c", 10)
    async with _client(_write(tmp_path, text)) as client:
        assert (await _ask(client, "a")).status_code == 200
        await asyncio.sleep(1.2)  # polled every 0.5 s
        assert await _states(client) == {"a": "unloaded", "b": "loaded", "c": "loaded"}
        assert (await _ask(client, "a")).status_code == 200  # loads again on its next request
        assert (await _states(client))["a"] == "loaded"


async def test_admin_unload_stays_unloaded_and_admin_load_evicts(tmp_path: Path) -> None:
    async with _client(_write(tmp_path, THREE)) as client:
        assert (await client.post("/admin/models/a/unload")).json()["state"] == "unloaded"
        refused = await _ask(client, "a")
        assert refused.status_code == 503 and "/admin/models/a/load" in refused.json()["error"]["message"]
        assert (await client.get("/ready")).json()["not_ready"][0]["model"] == "a"  # unloaded on purpose
        assert (await _ask(client, "c")).status_code == 200  # fits in a's room: nothing evicted
        loaded = await client.post("/admin/models/a/load")  # evicts the LRU idle one (b) for room
        assert loaded.json()["state"] == "loaded"
        assert await _states(client) == {"a": "loaded", "b": "unloaded", "c": "loaded"}


async def test_reload_takes_the_new_policies(tmp_path: Path) -> None:
    path = _write(tmp_path, THREE)
    async with _client(path) as client:
        path.write_text(THREE.replace('load = "on_demand"', "pin = true").replace("250MiB", "350MiB")
                        + _entry("d", 100, 'load = "on_demand"'))
        assert (await client.post("/admin/reload")).status_code == 200
        assert await _states(client) == {"a": "loaded", "b": "loaded", "c": "unloaded", "d": "unloaded"}
        assert (await _ask(client, "c")).status_code == 200  # the new budget: room for three
        assert (await _ask(client, "d")).status_code == 200  # c is pinned now: a (LRU) goes
        assert await _states(client) == {"a": "unloaded", "b": "loaded", "c": "loaded", "d": "loaded"}


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("[server]\nmemory_budget = \"100MiB\"\n" + _entry("a", 10) + _entry("b", 101), "models[1]",
         "the model 'b' needs 101.0 MiB, more than the whole memory budget 100.0 MiB"),
        ("[server]\nmemory_budget = \"8 parsecs\"\n" + _entry("a", 1), "server.memory_budget", "not a size"),
        ("[server]\nmemory_budget = 0\n" + _entry("a", 1), "server.memory_budget", "must be greater than 0"),
        ("[server]\nload_timeout_s = 0\n" + _entry("a", 1), "server.load_timeout_s", "must be greater than 0"),
        (_entry("a", 1, 'load = "lazy"'), "models[0].load", "must be one of eager, on_demand"),
        (_entry("a", 1, 'keep_alive = "soon"'), "models[0].keep_alive", "not a duration"),
        (_entry("a", 1, "keep_alive = -2"), "models[0].keep_alive", "must be -1"),
        (_entry("a", 1, 'pin = "yes"'), "models[0].pin", "Expected `bool`"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, text: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_config(_write(tmp_path, text), _plugins())  # what check-config and a reload run
    assert caught.value.path == path and message in str(caught.value)


def test_sizes_and_durations() -> None:
    assert parse_size("8GiB", "k") == 8 << 30 and parse_size("512MiB", "k") == 512 << 20
    assert parse_size("1.5GB", "k") == 1_500_000_000 and parse_size(4096, "k") == 4096 and parse_size(None, "k") is None
    assert parse_seconds("5m", "k") == 300 and parse_seconds(-1, "k") == -1 and parse_seconds("250ms", "k") == 0.25
    assert format_size(int(7.1 * (1 << 30))) == "7.1 GiB" and format_size(512) == "512 B"
