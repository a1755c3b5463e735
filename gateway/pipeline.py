"""The request flow of the API endpoints, from bytes in to bytes out.

    authenticate → read body → decode → route → normalise + capability check → before_request
    → backend stream (timed; failing before its first item, the next candidate's) → render → send
    → after_request / on_error

Each endpoint is an ASGI callable mounted by ``gateway.app``. Errors are raised as ``TaxiwayError``
and sent in one place (``_fail``, rendered by ``gateway.render``); after a stream has started an
error ends it with an SSE error event and ``[DONE]``. The time spent awaiting the backend is
measured, and the rest of the request's time is reported as the gateway's overhead in
``X-Taxiway-Overhead-Ms``. A request for a group or a model with fallbacks may be answered by
another deployment or model than the first one tried (``gateway.failover``): the response's
``model`` and ``X-Taxiway-Model`` name the one that answered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import structlog

from gateway import normalize
from gateway.asgi import (
    JSON,
    SSE_HEADERS,
    DisconnectWatcher,
    Scope,
    read_body,
    request_headers,
    request_id,
    send_bytes,
    send_error,
)
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.context import RequestContext
from gateway.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, Endpoint, overhead_header, response_headers
from gateway.errors import (
    ClientDisconnectedError,
    InternalError,
    MethodNotAllowedError,
    RequestTimeLimitError,
    ServiceUnavailableError,
    TaxiwayError,
)
from gateway.failover import Attempts
from gateway.fleet import Fleet
from gateway.hooks import LifecycleHooks
from gateway.interface import GenerationRequest, StreamItem, Usage
from gateway.render import (
    SSE_DONE,
    ChatRenderer,
    CompletionRenderer,
    embeddings_body,
    sse_error,
)
from gateway.router import Route, Router
from gateway.scoring import ScoringEndpoints

log = structlog.get_logger("taxiway.gateway")

perf_counter = time.perf_counter


class Gateway(ScoringEndpoints):
    """Serves the API: routing through the fleet's current table, hooks, the backends' lifetimes
    (``gateway.fleet``), each request counted in on its route from admission to its last byte."""

    def __init__(self, settings: Settings, fleet: Fleet, hooks: LifecycleHooks) -> None:
        self.settings = settings
        self.fleet = fleet
        self.hooks = hooks
        self.max_body_bytes = settings.server.max_body_bytes
        self.max_request_time_s = settings.server.max_request_time_s
        self.catalog = Catalog(int(time.time()))
        self.is_draining = False  # set by ``drain``: /ready is 503, new requests are refused
        self.num_running = 0  # API requests between admission and their last byte
        self._watchers: set[DisconnectWatcher] = set()  # the generation requests ``drain`` may cut

    @property
    def router(self) -> Router:
        return self.fleet.router

    @asynccontextmanager
    async def lifespan(self, _app: object = None) -> AsyncIterator[None]:
        """Start every backend before serving, stop them all at shutdown."""
        try:
            await self.fleet.start()
            yield
        finally:
            await self.fleet.stop()

    # -----------------------------------------------------------------------------------------
    # draining (gateway.server calls it on SIGTERM)

    async def drain(self, timeout_s: float, *, grace_s: float = 5.0) -> None:
        """Refuse new requests (503, Retry-After) and report not-ready from now on; let the
        running ones finish for ``timeout_s``, then cut the generations left (a stream ends with
        an error event, a whole response is a 503) and wait ``grace_s`` more for them to end.

        Every request still ends through the hooks (``after_request`` or ``on_error``), so its
        usage is recorded before the plugins shut down.
        """
        self.is_draining = True
        log.info("server.draining", num_running=self.num_running, drain_timeout_s=timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.num_running and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.num_running:
            log.warning("server.drain_timeout", num_running=self.num_running, num_cut=len(self._watchers))
            for watcher in list(self._watchers):
                watcher.cut(
                    ServiceUnavailableError(
                        f"The server is shutting down: the response was cut after the {timeout_s:g} s drain",
                        code="server_shutting_down",
                    )  # fmt: skip
                )
            deadline = loop.time() + grace_s
            while self.num_running and loop.time() < deadline:
                await asyncio.sleep(0.05)
        log.info("server.drained", num_running=self.num_running)

    # -----------------------------------------------------------------------------------------
    # context, admission and the two ways a response ends

    def _context(self, scope: Scope, endpoint: str) -> tuple[RequestContext, dict[str, str]]:
        started = perf_counter()
        headers = request_headers(scope)
        ctx = RequestContext(request_id=request_id(headers), endpoint=endpoint, started_at=started)
        # every line logged for this request names it, the backend's too (gateway.logs)
        structlog.contextvars.bind_contextvars(request_id=ctx.request_id)
        return ctx, headers

    async def _admit(
        self, ctx: RequestContext, endpoint: Endpoint, scope: Scope, receive: Any, headers: dict[str, str]
    ) -> tuple[Any, Attempts]:
        """The wire request and its attempts, counted in on its first candidate (normalised for
        it); raises what the client did wrong.

        Nothing has reached the backend yet: the caller releases the attempts when the response
        ends. ``before_request`` is left to the caller, which may first fill in more of ``ctx``.
        """
        if scope["method"] != "POST":
            raise MethodNotAllowedError(f"Method {scope['method']} is not allowed; use POST", allow="POST")
        await self.hooks.authenticate(ctx, headers)
        body = await read_body(receive, headers, self.max_body_bytes)
        req = normalize.decode(body, endpoint.decoder)
        ctx.request = req

        def prepare(route: Route) -> Any:
            request = endpoint.normalize(req, request_id=ctx.request_id, model=route.name, caps=route.backend.capabilities)
            if isinstance(request, GenerationRequest) and req.model in route.backend.adapters():
                request = msgspec.structs.replace(request, adapter=req.model)  # the name chose a LoRA adapter
            return request

        # an unloaded model loads first (evicting idle ones for room) or raises the budget's 503
        await self.fleet.budget.ensure_loaded(self.router.chain(req.model))
        attempts = Attempts(self.router.chain(req.model), prepare)
        # no await since the lookup: a reload's swap cannot slip in between, so a drain sees this request
        _serving(ctx, attempts.admit())
        return req, attempts

    @staticmethod
    def _refusal() -> ServiceUnavailableError:
        """A request arriving during the drain; ``Connection: close`` sends the client's next one
        elsewhere (or to a refused connection once the server has exited)."""
        return ServiceUnavailableError(
            "The server is shutting down; retry on another instance or after its restart",
            code="server_shutting_down", headers={"Retry-After": "5", "Connection": "close"},
        )  # fmt: skip

    def _over_time(self) -> RequestTimeLimitError:
        return RequestTimeLimitError(f"The request ran longer than max_request_time_s ({self.max_request_time_s:g} s)")

    async def _succeed(self, ctx: RequestContext, body: bytes, usage: Usage | None, send: Any) -> None:
        """Send ``body`` as the whole 200 response and tell the ``after_request`` hooks."""
        now = perf_counter()
        ctx.timings.total_s = now - ctx.started_at
        headers = response_headers(ctx, (JSON,))
        headers.append(overhead_header(ctx, now))
        await send_bytes(send, 200, body, headers)
        await self.hooks.after_request(ctx, usage)

    async def _fail(self, ctx: RequestContext, exc: Exception, send: Any) -> None:
        """Send ``exc`` as the whole response and tell the ``on_error`` hooks.

        Anything but a ``TaxiwayError`` is a bug: logged with its traceback, sent as a 500.
        """
        error = exc if isinstance(exc, TaxiwayError) else self._internal(ctx, exc)
        ctx.status_code = error.status_code
        ctx.timings.total_s = perf_counter() - ctx.started_at
        if ctx.response_headers:  # set by hooks (the limits' x-ratelimit-*); the error's own win
            for name, value in ctx.response_headers:
                error.headers.setdefault(name.decode(), value.decode())
        await send_error(send, error, ctx.request_id)
        await self.hooks.on_error(ctx, error)

    async def _disconnected(self, ctx: RequestContext) -> None:
        ctx.status_code = ClientDisconnectedError.status_code
        ctx.timings.total_s = perf_counter() - ctx.started_at
        await self.hooks.on_error(ctx, ClientDisconnectedError("the client disconnected"))

    @staticmethod
    def _internal(ctx: RequestContext, exc: BaseException) -> InternalError:
        log.error("request.internal_error", request_id=ctx.request_id, model=ctx.model, exc_info=exc)
        return InternalError("Internal server error")

    # -----------------------------------------------------------------------------------------
    # generation

    async def chat_completions(self, scope: Scope, receive: Any, send: Any) -> None:
        await self._generate(CHAT, scope, receive, send)

    async def completions(self, scope: Scope, receive: Any, send: Any) -> None:
        await self._generate(COMPLETIONS, scope, receive, send)

    async def _generate(self, endpoint: Endpoint, scope: Scope, receive: Any, send: Any) -> None:
        await self._admitted(endpoint, scope, receive, send, self._stream)

    async def _admitted(
        self, endpoint: Endpoint, scope: Scope, receive: Any, send: Any, handle: Callable[..., Awaitable[None]]
    ) -> None:
        """Admit a POST request, then ``handle(endpoint, ctx, req, attempts, receive, send)`` it; the
        request stays counted in on its candidate until ``handle`` has sent the response."""
        ctx, headers = self._context(scope, endpoint.name)
        if self.is_draining:  # refused before it counts: refusals must not hold the drain open
            await self._fail(ctx, self._refusal(), send)
            return
        self.num_running += 1
        try:
            try:
                req, attempts = await self._admit(ctx, endpoint, scope, receive, headers)
            except Exception as exc:
                await self._fail(ctx, exc, send)
                return
            try:
                await handle(endpoint, ctx, req, attempts, receive, send)
            finally:
                attempts.release()
        finally:
            self.num_running -= 1

    async def _stream(
        self, endpoint: Endpoint, ctx: RequestContext, req: Any, attempts: Attempts, receive: Any, send: Any
    ) -> None:
        ctx.is_stream = req.stream
        try:
            await self.hooks.before_request(ctx)
        except Exception as exc:
            await self._fail(ctx, exc, send)
            return

        include_usage = req.stream_options is not None and req.stream_options.include_usage

        def renderer(route: Route) -> ChatRenderer | CompletionRenderer:
            return endpoint.render(ctx.request_id, route.name, include_usage)

        task = asyncio.current_task()
        assert task is not None
        watcher = DisconnectWatcher(receive, task)
        self._watchers.add(watcher)
        if self.max_request_time_s:
            remaining_s = self.max_request_time_s - (perf_counter() - ctx.started_at)
            watcher.cut_at(asyncio.get_running_loop().time() + remaining_s, self._over_time())
        stream: AsyncIterator[StreamItem] | None = None
        # Until the response starts a failure is an ordinary HTTP error with its status code, and
        # goes to the next candidate when one may answer: a whole response is collected first, a
        # stream's first item awaited first, so that a backend failing at once (full queue,
        # upstream down) is answered elsewhere or is a 429 or 502, not a broken stream.
        try:
            try:
                if req.stream:
                    stream, item = await attempts.answer(lambda route, request: self._open(ctx, route, request))
                else:
                    body, usage = await attempts.answer(lambda route, request: self._collect(ctx, route, request, renderer))
            except TaxiwayError as error:
                watcher.stop()
                await self._fail(ctx, error, send)
                return
            if stream is not None:
                assert attempts.route is not None
                await self._send_stream(ctx, item, stream, renderer(attempts.route), watcher, send)
            else:
                watcher.stop()
                await self._succeed(ctx, body, usage, send)
        except asyncio.CancelledError:
            # a stream that started ends a cut in ``_send_stream``; here it is cut before its response
            if watcher.disconnected:
                task.uncancel()
                await self._disconnected(ctx)
            elif watcher.cut_error is not None:
                task.uncancel()
                watcher.stop()
                await self._fail(ctx, watcher.cut_error, send)
            else:
                raise
        finally:
            watcher.stop()
            self._watchers.discard(watcher)
            if stream is not None:
                await self._close(ctx, stream)

    async def _open(
        self, ctx: RequestContext, route: Route, request: Any
    ) -> tuple[AsyncIterator[StreamItem], StreamItem | None]:
        """``route``'s stream and its first item: until that item, a failure may go elsewhere."""
        _serving(ctx, route)
        stream = route.backend.generate(request)
        try:
            return stream, await self._next(ctx, stream)
        except BaseException:
            await self._close(ctx, stream)
            raise

    async def _collect(
        self, ctx: RequestContext, route: Route, request: Any, renderer: Callable[[Route], Any]
    ) -> tuple[bytes, Usage | None]:
        """``route``'s whole response body and usage: nothing is sent before it, so a failure on
        the way (a choice ended in error included) may go elsewhere."""
        _serving(ctx, route)
        whole = renderer(route)
        stream = route.backend.generate(request)
        try:
            while (item := await self._next(ctx, stream)) is not None:
                whole.add(item)
            return whole.body(), whole.usage
        finally:
            await self._close(ctx, stream)

    async def _close(self, ctx: RequestContext, stream: AsyncIterator[StreamItem]) -> None:
        try:
            aclose = getattr(stream, "aclose", None)  # async generators have it; other iterators may not
            if aclose is not None:
                await aclose()
        except Exception:
            log.exception("backend.close_failed", request_id=ctx.request_id, model=ctx.model)

    async def _next(self, ctx: RequestContext, stream: AsyncIterator[StreamItem]) -> StreamItem | None:
        """The backend's next item (``None`` at the end), its wait added to ``timings.backend_s``."""
        start = perf_counter()
        try:
            item = await stream.__anext__()
        except StopAsyncIteration:
            item = None
        except TaxiwayError:
            ctx.timings.backend_s += perf_counter() - start
            raise
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise self._internal(ctx, exc) from exc
        now = perf_counter()
        ctx.timings.backend_s += now - start
        if ctx.route is not None:
            ctx.route.last_progress = now  # /ready's stall check (gateway.catalog)
        if ctx.timings.first_token_s is None:
            ctx.timings.first_token_s = now - ctx.started_at
        return item

    async def _send_stream(
        self,
        ctx: RequestContext,
        item: StreamItem | None,
        stream: AsyncIterator[StreamItem],
        renderer: ChatRenderer | CompletionRenderer,
        watcher: DisconnectWatcher,
        send: Any,
    ) -> None:
        """SSE events from ``item`` on; a failure now ends the stream with an error event."""
        headers = response_headers(ctx, SSE_HEADERS)
        headers.append(overhead_header(ctx, perf_counter()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        failure: TaxiwayError | None = None
        tail = SSE_DONE
        try:
            while item is not None:
                chunk = renderer.chunk(item)
                if chunk is not None:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                item = await self._next(ctx, stream)
        except TaxiwayError as error:
            failure = error
        except asyncio.CancelledError:
            if watcher.cut_error is None:  # the client left, or the server is going down hard
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            failure = watcher.cut_error
        if failure is not None:
            ctx.status_code = failure.status_code
            tail = sse_error(failure)
        watcher.stop()
        ctx.timings.total_s = perf_counter() - ctx.started_at
        await send({"type": "http.response.body", "body": tail, "more_body": False})
        if failure is None:
            await self.hooks.after_request(ctx, renderer.usage)
        else:
            await self.hooks.on_error(ctx, failure)

    # -----------------------------------------------------------------------------------------
    # embeddings

    async def embeddings(self, scope: Scope, receive: Any, send: Any) -> None:
        await self._admitted(EMBEDDINGS, scope, receive, send, self._embeddings)

    async def _embeddings(
        self, _endpoint: Endpoint, ctx: RequestContext, req: Any, attempts: Attempts, _receive: Any, send: Any
    ) -> None:
        await self._whole_answer(
            ctx, attempts, send, _embed, lambda result: embeddings_body(result, ctx.model or "", as_base64=req.encoding_format == "base64")
        )  # fmt: skip

    async def _whole_answer(
        self,
        ctx: RequestContext,
        attempts: Attempts,
        send: Any,
        call: Callable[[Route, Any], Awaitable[tuple[Any, Usage]]],
        render: Callable[[Any], bytes],
    ) -> None:
        """An endpoint answered whole (embeddings, score, rerank, classify): ``call(route,
        request)`` on the route that takes it (the next candidate after a failure), bounded by
        ``max_request_time_s``; ``render(result)`` is the body."""

        async def on(route: Route, request: Any) -> tuple[Any, Usage]:
            _serving(ctx, route)
            return await call(route, request)

        try:
            await self.hooks.before_request(ctx)
            start = perf_counter()
            try:
                async with asyncio.timeout(self.max_request_time_s or None):
                    result, usage = await attempts.answer(on)
            except TimeoutError as exc:
                raise self._over_time() from exc
            finally:
                ctx.timings.backend_s = perf_counter() - start
            out = render(result)
        except Exception as exc:
            await self._fail(ctx, exc, send)
            return
        await self._succeed(ctx, out, usage, send)

    # -----------------------------------------------------------------------------------------
    # models, stats, health

    async def models(self, scope: Scope, receive: Any, send: Any) -> None:
        """GET /v1/models, GET /v1/models/{model} and GET /v1/models/{model}/stats."""
        ctx, headers = self._context(scope, "models")
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise MethodNotAllowedError(f"Method {scope['method']} is not allowed; use GET", allow="GET, HEAD")
            if self.is_draining:
                raise self._refusal()
            await self.hooks.authenticate(ctx, headers)
            body = self.catalog.get(self.router, scope["path"])  # below the /v1/models mount
        except Exception as exc:
            await self._fail(ctx, exc, send)
            return
        await send_bytes(send, 200, body, response_headers(ctx, (JSON,)))

    async def health(self, scope: Scope, receive: Any, send: Any) -> None:
        if await _probe_method_refused(scope, send):
            return
        await send_bytes(send, 200, b'{"status":"ok"}', [JSON])

    async def ready(self, scope: Scope, receive: Any, send: Any) -> None:
        if await _probe_method_refused(scope, send):
            return
        if self.is_draining:
            await send_bytes(send, 503, b'{"status":"draining"}', [JSON])
            return
        status, body = self.catalog.readiness(
            self.router, self.fleet.budget.loads_on_request, stall_timeout_s=self.settings.server.stall_timeout_s
        )
        await send_bytes(send, status, body, [JSON])


async def _probe_method_refused(scope: Scope, send: Any) -> bool:
    """A probe answers GET and HEAD; anything else is refused with a 405 (True)."""
    if scope["method"] in ("GET", "HEAD"):
        return False
    error = MethodNotAllowedError(f"Method {scope['method']} is not allowed; use GET", allow="GET, HEAD")
    await send_error(send, error, request_id(request_headers(scope)))
    return True


def _serving(ctx: RequestContext, route: Route) -> None:
    """``route`` is the one the request is tried on now (hooks and ``X-Taxiway-Model`` name it)."""
    ctx.model = route.name
    ctx.backend_name = route.backend_name
    ctx.route = route


async def _embed(route: Route, request: Any) -> tuple[Any, Usage]:
    result = await route.backend.embed(request)
    return result, Usage(prompt_tokens=result.prompt_tokens, completion_tokens=0)
