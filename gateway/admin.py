"""The admin API: which models run, load/unload one, reload the config.

    GET  /admin/models                    every instance: name, aliases, backend, state, memory, in flight
    POST /admin/models/{name}/load        start an unloaded model
    POST /admin/models/{name}/unload      refuse its new requests (503), drain, stop
    POST /admin/reload                    re-read the config file (``Fleet.reload``); 400 naming the key
    POST /v1/load_lora_adapter            serve a LoRA adapter as a model (vLLM's shape: lora_name, lora_path)
    POST /v1/unload_lora_adapter          stop serving one (lora_name); its requests in flight finish

Protected by ``[admin]`` keys (``Authorization: Bearer``), never by the client keys. With no admin
key configured the routes answer only when the server binds a loopback address (then only local
processes reach it anyway); bound anywhere else they are refused with a 403, so that an open
gateway is never an open admin API.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import msgspec
import structlog

from gateway import normalize
from gateway.asgi import JSON, Scope, read_body, request_headers, request_id, send_bytes, send_error
from gateway.config import Settings
from gateway.errors import (
    ConfigError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    PermissionDeniedError,
    TaxiwayError,
)
from gateway.fleet import Fleet
from gateway.keys import check_bearer, key_digests
from gateway.render import encode
from gateway.router import Route

log = structlog.get_logger("taxiway.admin")


class AdminModel(msgspec.Struct):
    """One backend instance as ``GET /admin/models`` and ``taxiway ps`` show it."""

    name: str
    aliases: tuple[str, ...]
    backend: str
    state: str  # loaded, loading, unloaded, draining, failed
    memory_bytes: int | None
    in_flight: int
    last_used: float | None  # Unix time of the last request admitted, None if never


class AdminModels(msgspec.Struct):
    data: list[AdminModel]
    object: str = "list"


class LoRAAdapterRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The body of ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's fields;
    ``model`` names the base model where several serve adapters)."""

    lora_name: str
    lora_path: str = ""
    model: str | None = None


_LORA_ADAPTER_REQUEST = msgspec.json.Decoder(LoRAAdapterRequest)


class LoRAAdapterStatus(msgspec.Struct):
    lora_name: str
    root: str  # the base model
    status: str  # "loaded" | "unloaded"
    object: str = "lora_adapter"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def describe(route: Route) -> AdminModel:
    return AdminModel(
        name=route.name,
        aliases=route.aliases,
        backend=route.backend_name,
        state=route.state,
        memory_bytes=route.backend.memory_bytes(),
        in_flight=route.num_in_flight,
        last_used=route.last_used,
    )


class Admin:
    """The ``/admin`` mount. ``bind_host`` is the address the server listens on, fixed at start."""

    def __init__(self, fleet: Fleet, settings: Settings, bind_host: str) -> None:
        self.fleet = fleet
        self.is_loopback = is_loopback(bind_host)
        #: routes plugins serve below /admin (``register_routes(..., admin=True)``): path → handler
        self.plugin_routes: dict[str, Any] = {}
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Take the admin keys of ``settings`` (at start and after each reload)."""
        self.digests = key_digests(settings.admin.keys, settings.admin.key_hashes, "admin")

    async def lora_adapter(self, scope: Scope, receive: Any, send: Any) -> None:
        """``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``, behind the admin keys."""
        await self._handle(scope, receive, send, self._lora_adapter)

    async def handle(self, scope: Scope, receive: Any, send: Any) -> None:
        await self._handle(scope, receive, send, self._dispatch)

    async def _handle(self, scope: Scope, receive: Any, send: Any, dispatch: Any) -> None:
        headers = request_headers(scope)
        try:
            self._authorize(headers)
            plugin_route = self.plugin_routes.get(scope["path"].strip("/"))
            if plugin_route is not None:
                if scope["method"] not in ("GET", "HEAD", "POST"):  # as the plugin routes outside /admin
                    raise MethodNotAllowedError(
                        f"Method {scope['method']} is not allowed; use GET or POST", allow="GET, HEAD, POST"
                    )
                response = await plugin_route(scope, receive)
                await send_bytes(send, 200, response.body, [(b"content-type", response.content_type.encode())])
                return
            body = await dispatch(scope["method"], scope["path"].strip("/"), receive, headers)
        except Exception as exc:
            error = exc if isinstance(exc, TaxiwayError) else _internal(exc)
            await send_error(send, error, request_id(headers))
            return
        await send_bytes(send, 200, body, [JSON])

    def _authorize(self, headers: dict[str, str]) -> None:
        if self.digests:
            check_bearer(self.digests, headers)
        elif not self.is_loopback:
            raise PermissionDeniedError(
                "The admin API is disabled: no [admin] keys are configured and the server is not bound to loopback"
            )

    async def _dispatch(self, method: str, path: str, receive: Any, headers: dict[str, str]) -> bytes:
        """``path`` is below the ``/admin`` mount, without its slashes."""
        if path == "models":
            _expect(method, "GET")
            routes = [*self.fleet.router.routes, *self.fleet.draining]
            return encode(AdminModels(data=[describe(route) for route in routes]))
        if path == "reload":
            _expect(method, "POST")
            await read_body(receive, headers, 1 << 16)
            try:
                return encode(await self.fleet.reload())
            except ConfigError as exc:
                raise InvalidRequestError(f"invalid config: {exc}", param=exc.path, code="invalid_config") from exc
        head, _, action = path.rpartition("/")
        if head.startswith("models/") and action in ("load", "unload"):
            _expect(method, "POST")
            name = head.removeprefix("models/")
            route = await (self.fleet.load(name) if action == "load" else self.fleet.unload(name))
            return encode(describe(route))
        raise NotFoundError(f"Unknown admin route: {method} /admin/{path}")


    async def _lora_adapter(self, method: str, path: str, receive: Any, headers: dict[str, str]) -> bytes:
        _expect(method, "POST")
        req = normalize.decode(await read_body(receive, headers, 1 << 16), _LORA_ADAPTER_REQUEST)
        router = self.fleet.router
        if path.endswith("unload_lora_adapter"):
            route = router.get(req.lora_name)
            if route is None or req.lora_name not in route.backend.adapters():
                raise NotFoundError(f"No LoRA adapter named '{req.lora_name}' is loaded", param="lora_name")
            await route.backend.unload_adapter(req.lora_name)
            log.info("lora.unloaded", lora_name=req.lora_name, model=route.name)
            return encode(LoRAAdapterStatus(lora_name=req.lora_name, root=route.name, status="unloaded"))
        if not req.lora_name or not req.lora_path:
            raise InvalidRequestError("lora_name and lora_path are required", param="lora_name" if not req.lora_name else "lora_path")
        if router.get(req.lora_name) is not None:
            raise InvalidRequestError(f"The model name '{req.lora_name}' is taken", param="lora_name")
        route = _adapter_base(router.routes, req.model)
        await route.backend.load_adapter(req.lora_name, req.lora_path)
        log.info("lora.loaded", lora_name=req.lora_name, lora_path=req.lora_path, model=route.name)
        return encode(LoRAAdapterStatus(lora_name=req.lora_name, root=route.name, status="loaded"))


def _adapter_base(routes: tuple[Route, ...], model: str | None) -> Route:
    """The model a new adapter runs on: ``model`` if given, else the only one serving adapters."""
    candidates = [r for r in routes if r.backend.accepts_adapters and (model is None or model in (r.name, *r.aliases))]
    if len(candidates) == 1:
        return candidates[0]
    if model is not None:
        raise InvalidRequestError(f"The model '{model}' does not serve LoRA adapters", param="model")
    if not candidates:
        raise InvalidRequestError("No model serves LoRA adapters (an engine model with options.lora does)")
    raise InvalidRequestError("Several models serve LoRA adapters: name the base in 'model'", param="model")


def _expect(method: str, allowed: str) -> None:
    if method != allowed:
        raise MethodNotAllowedError(f"Method {method} is not allowed; use {allowed}", allow=allowed)


def _internal(exc: BaseException) -> InternalError:
    log.error("admin.internal_error", exc_info=exc)
    return InternalError("Internal server error")
