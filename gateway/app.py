"""The litestar application, built by ``create_app(settings)``.

litestar routes requests, runs the lifespan (backends' start/stop) and renders the errors it
raises itself (unknown route, wrong method) in OpenAI's shape. The API endpoints are raw ASGI
handlers on ``gateway.pipeline.Gateway``, which keeps the per-request path lean.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
from litestar import Litestar, Request, Response
from litestar.exceptions import HTTPException
from litestar.handlers import asgi

from gateway.admin import Admin
from gateway.asgi import Scope, request_headers, request_id, send_bytes, send_error
from gateway.budget import Budget
from gateway.config import Settings
from gateway.errors import (
    InternalError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    TaxiwayError,
)
from gateway.fleet import Fleet, read_config
from gateway.hooks import LifecycleHooks, call_hook
from gateway.hookspecs import RouteResponse
from gateway.openapi import openapi_route
from gateway.pipeline import Gateway
from gateway.plugins import Plugins, load_plugins
from gateway.playground import Playground
from gateway.render import error_body, error_headers
from gateway.reload import ReloadTriggers
from gateway.router import build_router

log = structlog.get_logger("taxiway.app")


def create_app(
    settings: Settings,
    *,
    plugins: Plugins | None = None,
    config_path: str | os.PathLike[str] | None = None,
    watch_s: float | None = None,
) -> Litestar:
    """Build the app for ``settings``. Raises ``ConfigError`` before anything is served.

    ``plugins`` defaults to everything in the ``taxiway`` entry-point group; tests pass their own
    (``load_plugins(extra=[...])``) to add fake backends. ``config_path`` is the file a reload
    reads again (SIGHUP, ``POST /admin/reload``, and every ``watch_s`` seconds when it changed).
    """
    plugins = plugins if plugins is not None else load_plugins()
    plugins.pm.hook.plugin_configure(settings=settings)
    router = build_router(settings, plugins)
    reader = None if config_path is None else functools.partial(read_config, config_path, plugins)
    fleet = Fleet(router, reader, ready_timeout_s=settings.server.ready_timeout_s, budget=Budget(settings, router))
    gateway = Gateway(settings, fleet, LifecycleHooks(plugins.pm))
    admin = Admin(fleet, settings, settings.server.host)
    fleet.on_settings = admin.configure
    triggers = ReloadTriggers(fleet, config_path, watch_s)

    # The API endpoints, raw ASGI handlers: they leave the scope as it is, so litestar need not copy it.
    route_handlers = [
        asgi(path, copy_scope=False)(handler)
        for path, handler in (
            ("/v1/chat/completions", gateway.chat_completions),
            ("/v1/completions", gateway.completions),
            ("/v1/embeddings", gateway.embeddings),
            ("/v1/score", gateway.score),
            ("/v1/rerank", gateway.rerank),
            ("/rerank", gateway.rerank),  # the path Jina's and llama.cpp's clients call
            ("/v1/classify", gateway.classify),
            ("/health", gateway.health),
            ("/ready", gateway.ready),
        )
    ]
    # A mount, not a path parameter: model names may contain "/" ("org/model/stats").
    route_handlers.append(asgi("/v1/models", is_mount=True, copy_scope=True)(gateway.models))
    route_handlers.append(asgi("/admin", is_mount=True, copy_scope=True)(admin.handle))
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):  # vLLM's paths, the admin's keys
        route_handlers.append(asgi(path, copy_scope=True)(admin.lora_adapter))
    route_handlers.extend(_plugin_routes(plugins, fleet, admin))
    playground = Playground()  # the page at "/", its files below /playground
    route_handlers.append(asgi("/", copy_scope=False)(playground.page))
    route_handlers.append(asgi("/playground", is_mount=True, copy_scope=True)(playground.asset))

    app = Litestar(
        route_handlers=route_handlers,
        # the plugins' first in, last out: their shutdown (the usage ledger's flush) after every request ended
        lifespan=[functools.partial(_plugin_lifespan, plugins), gateway.lifespan, triggers.lifespan],
        exception_handlers={HTTPException: _render_http_exception, Exception: _render_exception},
        openapi_config=None,
        logging_config=None,
        debug=False,
    )
    app.state.gateway = gateway
    # every route above, described from the Structs it decodes and answers with
    app.register(asgi("/openapi.json", copy_scope=False)(openapi_route(route_handlers, list(admin.plugin_routes))))
    return app


def _plugin_routes(plugins: Plugins, fleet: Fleet, admin_api: Admin) -> list[Any]:
    """The plugins' HTTP routes (``register_routes``); admin ones go below the admin mount."""
    handlers: list[Any] = []

    def register(path: str, handler: Callable[..., Awaitable[RouteResponse]], admin: bool = False) -> None:
        if admin:
            admin_api.plugin_routes[path.strip("/")] = handler
            return

        async def serve(scope: Scope, receive: Any, send: Any) -> None:
            try:
                if scope["method"] not in ("GET", "HEAD", "POST"):
                    raise MethodNotAllowedError(
                        f"Method {scope['method']} is not allowed for {scope['path']}", allow="GET, HEAD, POST"
                    )
                response = await handler(scope, receive)
            except Exception as exc:
                error = exc if isinstance(exc, TaxiwayError) else InternalError("Internal server error")
                if not isinstance(exc, TaxiwayError):
                    log.error("plugin_route.failed", path=scope["path"], exc_info=exc)
                await send_error(send, error, request_id(request_headers(scope)))
                return
            await send_bytes(send, 200, response.body, [(b"content-type", response.content_type.encode())])

        handlers.append(asgi(path, copy_scope=False, opt={"plugin_route": True})(serve))  # (gateway.openapi)

    plugins.pm.hook.register_routes(register=register, router=lambda: fleet.router)
    return handlers


@asynccontextmanager
async def _plugin_lifespan(plugins: Plugins, _app: object = None) -> AsyncIterator[None]:
    await call_hook(plugins.pm, "plugin_startup")
    try:
        yield
    finally:
        await call_hook(plugins.pm, "plugin_shutdown", raises=False)


def _render(request: Request[Any, Any, Any], error: TaxiwayError) -> Response[bytes]:
    headers = error_headers(error, request_id(request_headers(request.scope)))  # type: ignore[arg-type]
    return Response(
        content=error_body(error), status_code=error.status_code, media_type="application/json", headers=headers
    )


def _render_http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    """litestar's own errors (no route, wrong method) as our ``TaxiwayError``s."""
    error: TaxiwayError
    if exc.status_code == 404:
        error = NotFoundError(f"Unknown route: {request.method} {request.url.path}")
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        error = MethodNotAllowedError(f"Method {request.method} is not allowed for {request.url.path}", allow=allow)
    elif exc.status_code == 413:
        error = PayloadTooLargeError(str(exc.detail))
    else:
        error = TaxiwayError(str(exc.detail))
        error.status_code = exc.status_code
        error.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return _render(request, error)


def _render_exception(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    if isinstance(exc, TaxiwayError):
        return _render(request, exc)
    log.error("request.unhandled", path=request.url.path, exc_info=exc)
    return _render(request, InternalError("Internal server error"))
