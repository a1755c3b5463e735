"""Calls the request-lifecycle hooks: in pluggy's order, one at a time, awaiting async ones.

pluggy itself does not await coroutines, so the implementations are collected once at start-up
and called here. A hook nobody implements costs one empty loop on the hot path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pluggy
import structlog

from gateway.context import RequestContext
from gateway.errors import TaxiwayError
from gateway.interface import Usage

log = structlog.get_logger("taxiway.hooks")

_Impl = tuple[Callable[..., Any], tuple[str, ...], bool, str]


def _impls(pm: pluggy.PluginManager, name: str) -> tuple[_Impl, ...]:
    caller = getattr(pm.hook, name)
    # pluggy calls the most recently registered first (and honours tryfirst/trylast) by walking
    # its list backwards; do the same.
    return tuple(
        (
            impl.function,
            tuple(impl.argnames),
            inspect.iscoroutinefunction(impl.function),
            impl.plugin_name,
        )
        for impl in reversed(caller.get_hookimpls())
    )


async def _call(impls: tuple[_Impl, ...], kwargs: dict[str, Any]) -> None:
    for function, argnames, is_async, _ in impls:
        result = function(**{name: kwargs[name] for name in argnames})
        if is_async or inspect.isawaitable(result):
            await result


class LifecycleHooks:
    """The four request-lifecycle hooks of ``gateway.hookspecs``, ready to call."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._authenticate = _impls(pm, "authenticate")
        self._before_request = _impls(pm, "before_request")
        self._after_request = _impls(pm, "after_request")
        self._on_error = _impls(pm, "on_error")

    async def authenticate(self, ctx: RequestContext, headers: dict[str, str]) -> None:
        """Raises what an implementation raises (401/403)."""
        if self._authenticate:
            await _call(self._authenticate, {"ctx": ctx, "headers": headers})

    async def before_request(self, ctx: RequestContext) -> None:
        """Raises what an implementation raises (e.g. 429)."""
        if self._before_request:
            await _call(self._before_request, {"ctx": ctx})

    async def after_request(self, ctx: RequestContext, usage: Usage | None) -> None:
        """Never raises: a failing implementation is logged and the next one still runs."""
        await self._notify(self._after_request, {"ctx": ctx, "usage": usage}, ctx)

    async def on_error(self, ctx: RequestContext, error: TaxiwayError) -> None:
        """Never raises: a failing implementation is logged and the next one still runs."""
        await self._notify(self._on_error, {"ctx": ctx, "error": error}, ctx)

    async def _notify(self, impls: tuple[_Impl, ...], kwargs: dict[str, Any], ctx: RequestContext) -> None:
        for function, argnames, is_async, plugin_name in impls:
            try:
                result = function(**{name: kwargs[name] for name in argnames})
                if is_async or inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("hook.failed", plugin=plugin_name, request_id=ctx.request_id)


async def call_hook(pm: pluggy.PluginManager, name: str, *, raises: bool = True, **kwargs: Any) -> None:
    """Call every implementation of hook ``name`` in pluggy's order, awaiting async ones (for the
    once-per-process hooks: ``plugin_startup``, ``plugin_shutdown``). ``raises=False``: a failure
    is logged and the next implementation still runs."""
    for function, argnames, is_async, plugin_name in _impls(pm, name):
        try:
            result = function(**{arg: kwargs[arg] for arg in argnames})
            if is_async or inspect.isawaitable(result):
                await result
        except Exception:
            if raises:
                raise
            log.exception("hook.failed", plugin=plugin_name, hook=name)
