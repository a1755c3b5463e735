"""*budget* against a real ``taxiway serve``: three engine models (tiny random llamas) of which two
fit the memory budget by their declared needs. A request for the third loads it and evicts the
idle least-recently-used one; a model with a stream in flight is not evicted; with both loaded
models streaming, a request for the third is the 503 naming the budget.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from bench.synthetic import write_random_llama
from gateway.budget import format_size
from gateway.fleet import read_config
from gateway.plugins import load_plugins

ServerFactory = Callable[..., "object"]

# a long context so that a held stream (ignore_eos) outlives the test's steps: ~0.7 ms a token
_SHAPE = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, tokenizer=True,
              max_positions=32768)  # fmt: skip


def _entry(name: str, model: Path, load: str) -> str:
    return f"""
[[models]]
name = "{name}"
backend = "engine"
load = "{load}"
[models.options]
model = "{model}"
dtype = "float32"
threads = 1
native_kernels = false
max_num_seqs = 2
kv_cache_tokens = 65536
enable_prefix_caching = false
"""


def _states(url: str) -> dict[str, tuple[str, int]]:
    data = httpx.get(f"{url}/admin/models", timeout=10).json()["data"]
    return {m["name"]: (m["state"], m["in_flight"]) for m in data}


def _wait_for(url: str, states: dict[str, tuple[str, int]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _states(url) != states:
        assert time.monotonic() < deadline, _states(url)
        time.sleep(0.05)


def _ask(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "hello", "max_tokens": 2, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=60)


@contextlib.contextmanager
def _streaming(url: str, model: str) -> Iterator[None]:
    """A long stream of ``model`` open (its first event read) until the block ends."""
    body = {"model": model, "prompt": "hello", "max_tokens": 30000, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()  # kept: a dropped iterator closes the response
        assert next(lines).startswith("data: ")
        yield


def test_budget(taxiway_server: ServerFactory, tmp_path: Path) -> None:
    shape: dict = _SHAPE  # type: ignore[type-arg]
    models = {name: write_random_llama(tmp_path / name, seed=i, **shape) for i, name in enumerate("abc")}
    entries = "".join(_entry(name, path, "on_demand" if name == "c" else "eager") for name, path in models.items())
    path = tmp_path / "config.toml"
    path.write_text(entries)
    needs = [route.backend.memory_required() for route in read_config(path, load_plugins())[1].routes]
    print("memory_required of a, b, c:", needs)
    assert len(set(needs)) == 1 and needs[0] is not None and needs[0] > 0
    budget = needs[0] * 5 // 2  # two fit, three do not
    path.write_text(f"[server]\nmemory_budget = {budget}\n" + entries)

    server = taxiway_server(path)
    url = server.url  # type: ignore[attr-defined]
    _wait_for(url, {"a": ("loaded", 0), "b": ("loaded", 0), "c": ("unloaded", 0)})

    # the third loads on its request, evicting the idle least recently used (b)
    assert _ask(url, "b").status_code == 200 and _ask(url, "a").status_code == 200
    assert _ask(url, "c").status_code == 200
    assert _states(url) == {"a": ("loaded", 0), "b": ("unloaded", 0), "c": ("loaded", 0)}
    memory = {m["name"]: m["memory_bytes"] for m in httpx.get(f"{url}/admin/models", timeout=10).json()["data"]}
    assert memory == {"a": needs[0], "b": 0, "c": needs[0]}

    with _streaming(url, "c"):
        # c, streaming, is now the least recently used: b comes back by evicting a instead
        assert _ask(url, "a").status_code == 200
        assert _ask(url, "b").status_code == 200
        assert _states(url) == {"a": ("unloaded", 0), "b": ("loaded", 0), "c": ("loaded", 1)}
        with _streaming(url, "b"):
            refused = _ask(url, "a")  # nothing can make room
            assert refused.status_code == 503 and refused.headers["retry-after"]
            message = refused.json()["error"]["message"]
            print(message)
            held, need = format_size(2 * needs[0]), format_size(needs[0])
            assert message == f"memory budget {format_size(budget)}: {held} held by models in use, 'a' needs {need}"
            assert _states(url) == {"a": ("unloaded", 0), "b": ("loaded", 1), "c": ("loaded", 1)}
    _wait_for(url, {"a": ("unloaded", 0), "b": ("loaded", 0), "c": ("loaded", 0)})  # the streams closed
    assert _ask(url, "a").status_code == 200  # both idle again: the least recently used (c) goes
    assert _states(url) == {"a": ("loaded", 0), "b": ("loaded", 0), "c": ("unloaded", 0)}
