"""The access log: one structured line per request, on ``after_request`` and ``on_error``.

Fields: request id, endpoint, model, backend, status, stream, token counts, latency, time to first
token and the gateway's own overhead, all in milliseconds.
"""

from __future__ import annotations

from typing import Any

import structlog

from gateway.context import RequestContext
from gateway.errors import TaxiwayError
from gateway.hookspecs import hookimpl
from gateway.interface import Usage

log = structlog.get_logger("taxiway.access")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _fields(ctx: RequestContext) -> dict[str, Any]:
    timings = ctx.timings
    return {
        "request_id": ctx.request_id,
        "endpoint": ctx.endpoint,
        "model": ctx.model,
        "backend": ctx.backend_name,
        "status": ctx.status_code,
        "stream": ctx.is_stream,
        "principal": ctx.principal,
        "latency_ms": _ms(timings.total_s),
        "ttft_ms": _ms(timings.first_token_s),
        "overhead_ms": _ms(timings.overhead_s),
    }


@hookimpl
def after_request(ctx: RequestContext, usage: Usage | None) -> None:
    log.info(
        "request.completed",
        **_fields(ctx),
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
    )


@hookimpl
def on_error(ctx: RequestContext, error: TaxiwayError) -> None:
    log.warning(
        "request.failed",
        **_fields(ctx),
        error_type=error.error_type,
        error_code=error.code,
        error=error.message,
    )
