"""A tiny random-weight engine model with a byte tokenizer and a chat template, and the
``taxiway serve`` config that serves it fast: for tests that need a real server answering every
endpoint, not a good answer."""

from __future__ import annotations

import json
from pathlib import Path

from bench.synthetic import write_random_llama

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_tiny_chat_model(path: Path, *, max_positions: int = 65536) -> Path:
    """A 2-layer llama (hidden 64, 300 tokens: bytes and ``<eos>``) that also serves chat."""
    write_random_llama(
        path, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, tokenizer=True,
        max_positions=max_positions,
    )  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "chat_template": CHAT_TEMPLATE}))
    return path


def tiny_engine_config(
    model: Path, *, name: str = "tiny", aliases: tuple[str, ...] = (), kv_cache_tokens: int = 65536, extra: str = ""
) -> str:
    """One engine model entry (threads 1, float32, no native kernels: starts in about a second)."""
    return f"""
[[models]]
name = "{name}"
aliases = {list(aliases)!r}
backend = "engine"
[models.options]
model = "{model}"
dtype = "float32"
threads = 1
native_kernels = false
max_num_seqs = 4
kv_cache_tokens = {kv_cache_tokens}
{extra}
"""


def every_route_config(model: Path, *, kv_cache_tokens: int = 1024) -> str:
    """The server of the OpenAPI and fuzz tests: ``tiny`` (alias ``default``, the document's
    examples' model) and ``spare`` to unload and load again, small caches. A memory budget (far
    more than both need) makes an unloaded model load on its next request, as it would in a
    deployment that unloads models: /ready stays 200 and requests for it do not get 503s. The
    cache bounds the context too: a request without ``max_tokens`` generates until it is full."""
    return f"[server]\nmemory_budget = {2**30}\n" + tiny_engine_config(
        model, aliases=("default",), kv_cache_tokens=kv_cache_tokens
    ) + tiny_engine_config(model, name="spare", kv_cache_tokens=kv_cache_tokens)
