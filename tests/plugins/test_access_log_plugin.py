"""The access log: one JSON line per request with the request's facts."""

from __future__ import annotations

import io

import msgspec
import pytest
import structlog

from gateway.context import RequestContext, Timings
from gateway.errors import RateLimitError
from gateway.interface import Usage
from gateway.logs import configure_logging
from plugins import access_log


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [msgspec.json.decode(line) for line in stream.getvalue().splitlines()]


def test_one_json_line_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    # a fresh logger: the module's keeps the level of the configuration it was first used under
    # (cache_logger_on_first_use), which an earlier test in this process may have set to warning
    monkeypatch.setattr(access_log, "log", structlog.get_logger("taxiway.access"))
    try:
        ctx = RequestContext(request_id="r1", endpoint="chat.completions", started_at=0.0, model="m",
                             backend_name="openai", is_stream=True,
                             timings=Timings(backend_s=0.010, first_token_s=0.004, total_s=0.0125))  # fmt: skip
        access_log.after_request(ctx, Usage(prompt_tokens=5, completion_tokens=7))
        failed = RequestContext(request_id="r2", endpoint="completions", started_at=0.0, status_code=429)
        access_log.on_error(failed, RateLimitError("slow down"))
        done, error = _lines(stream)
    finally:
        structlog.reset_defaults()
    assert done["event"] == "request.completed" and done["request_id"] == "r1"
    assert (done["model"], done["backend"], done["status"], done["stream"]) == ("m", "openai", 200, True)
    assert (done["prompt_tokens"], done["completion_tokens"]) == (5, 7)
    assert (done["latency_ms"], done["ttft_ms"], done["overhead_ms"]) == (12.5, 4.0, 2.5)
    assert error["event"] == "request.failed" and error["status"] == 429 and error["error_type"] == "rate_limit_error"
    assert error["level"] == "warning" and "timestamp" in done
