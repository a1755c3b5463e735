"""One log stream: structlog's events and the standard library's records as one JSON line each,
with the logger's name and the request id bound for the request."""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator

import httpx
import msgspec
import pytest
import structlog

from gateway.logs import configure_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield out
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    root.handlers[:], root.level = handlers, level


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [msgspec.json.decode(line) for line in stream.getvalue().splitlines()]


def test_structlog_and_stdlib_records_are_json_lines_with_logger_and_request_id(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    structlog.contextvars.bind_contextvars(request_id="req-7")
    structlog.get_logger("taxiway.access").info("request.completed", status=200)
    # uvicorn's access line, as uvicorn logs it
    logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "POST", "/v1/x", "1.1", 200)
    structlog.contextvars.clear_contextvars()
    logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    done, access, error = _lines(stream)
    assert done["event"] == "request.completed" and done["status"] == 200
    assert (done["logger"], done["request_id"], done["level"]) == ("taxiway.access", "req-7", "info")
    assert access["event"] == '127.0.0.1:5 - "POST /v1/x HTTP/1.1" 200'
    assert (access["logger"], access["request_id"], access["level"]) == ("uvicorn.access", "req-7", "info")
    assert (error["logger"], error["level"]) == ("uvicorn.error", "warning") and "request_id" not in error
    assert all("timestamp" in line for line in (done, access, error))


def test_exceptions_and_levels(stream: io.StringIO) -> None:
    configure_logging("info", "json", stream=stream)
    log = structlog.get_logger("taxiway.test")
    log.debug("not.shown")
    logging.getLogger("httpcore").debug("not shown either")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("it.failed")
        logging.getLogger("some.library").exception("it failed too")
    ours, theirs = _lines(stream)
    assert ours["event"] == "it.failed" and "ValueError: boom" in str(ours["exception"])
    assert theirs["logger"] == "some.library" and "ValueError: boom" in str(theirs["exception"])


def test_debug_shows_our_events_not_other_libraries_debug(stream: io.StringIO) -> None:
    configure_logging("debug", "json", stream=stream)
    structlog.get_logger("taxiway.test").debug("shown")
    logging.getLogger("httpcore").debug("one of several lines per upstream call")
    (line,) = _lines(stream)
    assert line["event"] == "shown" and line["level"] == "debug"


def test_console_format_stays_readable(stream: io.StringIO) -> None:
    configure_logging("info", "console", stream=stream)
    structlog.contextvars.bind_contextvars(request_id="req-8")
    structlog.get_logger("taxiway.access").info("request.completed", status=200)
    logging.getLogger("uvicorn.error").info("Application startup complete.")
    ours, theirs = stream.getvalue().splitlines()
    assert "request.completed" in ours and "taxiway.access" in ours and "req-8" in ours
    assert "Application startup complete." in theirs and "uvicorn.error" in theirs
    assert not ours.startswith("{")


def test_configuring_again_moves_every_logger_to_the_new_stream(stream: io.StringIO) -> None:
    log = structlog.get_logger("taxiway.test")
    configure_logging("info", "json", stream=io.StringIO())
    log.info("first")  # the logger is cached from here on
    configure_logging("info", "json", stream=stream)
    log.info("second")
    logging.getLogger("uvicorn.error").info("third")
    assert [line["event"] for line in _lines(stream)] == ["second", "third"]


@pytest.mark.slow
def test_a_served_request_logs_json_lines_naming_it(taxiway_server) -> None:  # type: ignore[no-untyped-def]
    """A real ``taxiway serve`` on the engine: every line of its log is JSON with a logger name, and
    each line of a request — the gateway's and the engine's, logged on its step thread — has its id."""
    from backends.engine.catalogue import default_home, pull

    path = pull("smollm2-135m-instruct", home=default_home(os.environ), progress=False)
    server = taxiway_server(f"""
        [log]
        level = "debug"
        format = "json"

        [[models]]
        name = "m"
        backend = "engine"
        options = {{ model = "{path}", threads = 1, max_num_seqs = 2, kv_cache_tokens = 1024, max_model_len = 512 }}
    """)  # fmt: skip
    server.wait_ready(timeout=300)

    request_id = f"log-{time.monotonic_ns()}"
    response = httpx.post(f"{server.base_url}/chat/completions", headers={"x-request-id": request_id}, timeout=60,
                          json={"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})  # fmt: skip
    assert response.status_code == 200, response.text
    logs = server.wait_for_log('"engine.request.finished"', '"request.completed"')
    lines = [msgspec.json.decode(line) for line in logs.splitlines()]  # every line is JSON
    assert all(isinstance(line["logger"], str) and line["level"] and line["timestamp"] for line in lines)
    assert {"Application startup complete.", "engine.ready"} <= {line["event"] for line in lines}
    uvicorn = [line for line in lines if line["logger"] == "uvicorn.error"]
    assert uvicorn and all("request_id" not in line for line in uvicorn)
    mine = {(line["logger"], line["event"]) for line in lines if line.get("request_id") == request_id}
    assert mine == {
        ("taxiway.access", "request.completed"),
        ("backends.engine.async_engine", "engine.request.added"),
        ("backends.engine.async_engine", "engine.request.finished"),
    }
    (finished,) = [line for line in lines if line["event"] == "engine.request.finished"]
    assert finished["completion_tokens"] == 3 and finished["engine_request_id"].startswith(f"{request_id}#")
