"""Rate limits per virtual key and per model: requests and tokens per minute, requests in flight,
a key's tokens per day. On ``before_request`` (admission) and at the request's end.

```toml
[limits]
storage = "redis://127.0.0.1:6379/0"   # default "memory": this process alone
on_storage_error = "open"              # or "closed" (503) when Redis cannot be reached
default_max_tokens = 256               # reserved for a request that sets no max_tokens

[limits.models.default]                # a model name or alias
rpm = 600
tpm = 200000
max_parallel = 32
```

A key's limits come with it (``taxiway keys create --rpm … --tpm … --max-parallel …
--budget-tokens-per-day …``). Tokens: the prompt's estimate (4 characters a token) plus
``max_tokens`` are taken at admission, the unused part given back at the end. Over a limit: 429
with ``Retry-After``; every response of a limited request carries OpenAI's ``x-ratelimit-*``
headers for its key (or its model when the key has none). The store is unreachable: the request
is let through (``open``) or refused with a 503 (``closed``), logged and counted
(``taxiway_limits_storage_errors_total``).
"""

from __future__ import annotations

import math
import os
from typing import Any

import msgspec
import structlog
from prometheus_client import Counter

from gateway.config import Settings, convert_table
from gateway.context import RequestContext
from gateway.errors import ConfigError, RateLimitError, ServiceUnavailableError, TaxiwayError
from gateway.hookspecs import hookimpl
from gateway.interface import Usage
from gateway.keys import KeyInfo
from plugins.limits.store import Decision, MemoryStore, Scope

log = structlog.get_logger("taxiway.limits")

STORAGE_ERRORS = Counter(
    "taxiway_limits_storage_errors", "Rate-limit checks the store (Redis) could not answer", ["outcome"]
)
REFUSED = Counter("taxiway_limits_refused", "Requests refused by a rate limit", ["scope", "limit"])


class ModelLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None


class LimitsOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    storage: str = "memory"
    on_storage_error: str = "open"
    default_max_tokens: int = 256
    models: dict[str, ModelLimits] = {}


class _State:
    store: Any = MemoryStore()
    storage = "memory"
    fail_open = True
    default_max_tokens = 256
    model_scopes: dict[str, Scope] = {}
    key_scopes: dict[KeyInfo, Scope | None] = {}
    #: requests admitted and not yet ended: id(ctx) → (scopes, tokens reserved)
    held: dict[int, tuple[tuple[Scope, ...], int]] = {}


_state = _State()


@hookimpl
def plugin_configure(settings: Settings) -> None:
    options = convert_table(settings.limits, LimitsOptions, "limits")
    if options.on_storage_error not in ("open", "closed"):
        raise ConfigError("must be open or closed", path="limits.on_storage_error")
    if options.storage == _state.storage:
        pass  # a reload with the same storage keeps its state (and the requests it holds)
    elif options.storage == "memory":
        _state.store = MemoryStore()
    elif options.storage.startswith(("redis://", "rediss://", "unix://")):
        from plugins.limits.redis_store import RedisStore

        _state.store = RedisStore(options.storage)
    else:
        raise ConfigError("expected 'memory' or a 'redis://…' URL", path="limits.storage")
    _state.storage = options.storage
    names = {name for entry in settings.models for name in (entry.name, *entry.aliases)}
    canonical = {alias: entry.name for entry in settings.models for alias in (entry.name, *entry.aliases)}
    scopes: dict[str, Scope] = {}
    for name, limits in options.models.items():
        if name not in names:
            raise ConfigError(f"unknown model {name!r}", path=f"limits.models.{name}")
        for field in ("rpm", "tpm", "max_parallel"):
            value = getattr(limits, field)
            if value is not None and value < 0:
                raise ConfigError("must not be negative", path=f"limits.models.{name}.{field}")
        scopes[canonical[name]] = Scope(f"model:{canonical[name]}", limits.rpm, limits.tpm, limits.max_parallel)
    _state.model_scopes = scopes
    _state.fail_open = options.on_storage_error == "open"
    _state.default_max_tokens = options.default_max_tokens
    _state.key_scopes = {}


@hookimpl
async def plugin_shutdown() -> None:
    await _state.store.close()


def _key_scope(key: KeyInfo) -> Scope | None:
    scope = _state.key_scopes.get(key, False)
    if scope is False:
        limits = (key.rpm, key.tpm, key.max_parallel, key.budget_tokens_per_day)
        scope = None if all(v is None for v in limits) else Scope(f"key:{key.id}", *limits)
        if len(_state.key_scopes) > 4096:
            _state.key_scopes.clear()
        _state.key_scopes[key] = scope
    return scope  # type: ignore[return-value]


def estimate_tokens(request: Any, default_max_tokens: int) -> int:
    """Prompt tokens (4 characters a token, the usual rule of thumb) plus the most it may generate."""
    chars = 0
    messages = getattr(request, "messages", None)
    if messages is not None:
        for message in messages:
            content = message.content
            chars += len(content) if isinstance(content, str) else len(msgspec.json.encode(content))
            chars += 16  # the role and the chat template's markers
    else:
        prompt = getattr(request, "prompt", None) or getattr(request, "input", None)
        chars += len(prompt) if isinstance(prompt, str) else len(msgspec.json.encode(prompt))
    max_tokens = getattr(request, "max_completion_tokens", None) or getattr(request, "max_tokens", None)
    if max_tokens is None:
        max_tokens = 0 if hasattr(request, "input") else default_max_tokens
    return chars // 4 + 1 + max_tokens * max(1, getattr(request, "n", None) or 1)


@hookimpl
async def before_request(ctx: RequestContext) -> None:
    key_scope = _key_scope(ctx.key) if ctx.key is not None else None
    model_scope = _state.model_scopes.get(ctx.model) if ctx.model is not None else None
    if key_scope is None and model_scope is None:
        return
    scopes = tuple(s for s in (key_scope, model_scope) if s is not None)
    tpm = any(s.tpm is not None for s in scopes)
    tokens = estimate_tokens(ctx.request, _state.default_max_tokens) if tpm and ctx.request is not None else 0
    try:
        decision = await _state.store.acquire(scopes, tokens, f"{ctx.request_id}:{os.urandom(4).hex()}")
    except Exception as exc:  # the store unreachable (redis.RedisError, OSError, a timeout)
        STORAGE_ERRORS.labels("open" if _state.fail_open else "closed").inc()
        log.warning("limits.storage_error", error=f"{type(exc).__name__}: {exc}"[:200], fail_open=_state.fail_open)
        if _state.fail_open:
            return
        raise ServiceUnavailableError("The rate-limit store is unavailable; try again shortly.") from exc
    first = scopes[0]
    if not decision.admitted:
        scope = scopes[decision.scope]
        REFUSED.labels(scope.name.partition(":")[0], decision.limit).inc()
        raise _refusal(scope, decision, tokens)
    ctx.response_headers = [*(ctx.response_headers or ()), *_headers(first, decision)]
    _state.held[id(ctx)] = (scopes, tokens)


async def _release(ctx: RequestContext, usage: Usage | None) -> None:
    held = _state.held.pop(id(ctx), None)
    if held is None:
        return
    scopes, reserved = held
    used = usage.prompt_tokens + usage.completion_tokens if usage is not None else 0
    try:
        await _state.store.release(scopes, reserved, used)
    except Exception as exc:
        STORAGE_ERRORS.labels("release").inc()
        log.warning("limits.storage_error", error=f"{type(exc).__name__}: {exc}"[:200], phase="release")


@hookimpl
async def after_request(ctx: RequestContext, usage: Usage | None) -> None:
    await _release(ctx, usage)


@hookimpl
async def on_error(ctx: RequestContext, error: TaxiwayError) -> None:
    await _release(ctx, None)


def duration(seconds: float) -> str:
    """OpenAI's reset format: ``"1s"``, ``"6m0s"``, ``"250ms"``."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _headers(scope: Scope, decision: Decision) -> list[tuple[bytes, bytes]]:
    headers = []
    if scope.rpm is not None:
        headers += [
            (b"x-ratelimit-limit-requests", str(scope.rpm).encode()),
            (b"x-ratelimit-remaining-requests", str(max(0, decision.remaining_requests)).encode()),
            (b"x-ratelimit-reset-requests", duration(decision.reset_requests_s).encode()),
        ]
    if scope.tpm is not None:
        headers += [
            (b"x-ratelimit-limit-tokens", str(scope.tpm).encode()),
            (b"x-ratelimit-remaining-tokens", str(max(0, decision.remaining_tokens)).encode()),
            (b"x-ratelimit-reset-tokens", duration(decision.reset_tokens_s).encode()),
        ]
    return headers


_WHAT = {
    "requests": ("requests per minute (RPM)", "rpm"),
    "tokens": ("tokens per minute (TPM)", "tpm"),
    "parallel": ("requests in flight", "max_parallel"),
    "budget": ("tokens per day (budget)", "budget_tokens_per_day"),
}


def _refusal(scope: Scope, decision: Decision, tokens: int) -> RateLimitError:
    """The 429 for ``scope``'s ``decision.limit``: names the limit and whose it is, nothing else."""
    kind, name = scope.name.split(":", 1)
    whose = "this API key" if kind == "key" else f"the model '{name}'"
    what, field = _WHAT[decision.limit]
    limit = getattr(scope, field)
    headers = {}
    if decision.limit == "requests":
        headers = {"x-ratelimit-limit-requests": str(limit), "x-ratelimit-remaining-requests": "0",
                   "x-ratelimit-reset-requests": duration(decision.retry_after_s or 0)}  # fmt: skip
    elif decision.limit == "tokens":
        headers = {"x-ratelimit-limit-tokens": str(limit), "x-ratelimit-remaining-tokens": "0",
                   "x-ratelimit-reset-tokens": duration(decision.retry_after_s or 0)}  # fmt: skip
    if decision.retry_after_s is None:
        return RateLimitError(
            f"Request too large for {whose}: it needs {tokens} tokens ({what}: limit {limit}). "
            "Send a shorter prompt or a lower max_tokens.",
            retry_after=60.0, code="rate_limit_exceeded", headers=headers,
        )  # fmt: skip
    code = "insufficient_quota" if decision.limit == "budget" else "rate_limit_exceeded"
    retry = decision.retry_after_s
    return RateLimitError(
        f"Rate limit reached for {whose} on {what}: limit {limit}. Try again in {duration(retry)}.",
        retry_after=float(math.ceil(retry)), code=code, headers=headers,
    )  # fmt: skip
