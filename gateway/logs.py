"""Logging set-up: one stream for structlog's events and the standard library's records alike.

Every line, whether a structlog event (``request.completed``) or a record of uvicorn, httpx or any
other library, is rendered by the same structlog processors and written by one handler — the
standard library's records through structlog's ``ProcessorFormatter``, structlog's events straight
to the handler's stream (``_HandlerLogger``): one JSON object per line when logs go to a file or
pipe, console rendering on a terminal. Each line carries its level,
time, logger name and the context variables bound where it was logged — the gateway binds
``request_id`` per request (``structlog.contextvars.bind_contextvars``), so every line logged while
serving a request names it. Threads do not inherit context variables: code that logs for a
request on another thread (the engine's step thread) takes the request's variables along
(``structlog.contextvars.get_contextvars()``) and logs with them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import msgspec
import structlog
from structlog.stdlib import ProcessorFormatter

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _json_dumps(event: dict[str, Any], **_: Any) -> str:
    return msgspec.json.encode(event, enc_hook=str).decode()


class _HandlerLogger:
    """structlog's logger: writes each rendered event to the one handler's stream, under its lock.

    structlog's own events skip the standard library's record machinery: a ``LogRecord`` made,
    copied and formatted costs ~10 us more a line (15 against 5 us for the access line). The
    handler is looked up per line, as loggers are cached at first use and may outlive a
    ``configure_logging``.
    """

    __slots__ = ("name",)

    def __init__(self, name: str = "", *_: Any) -> None:
        self.name = name  # for ``add_logger_name``

    def msg(self, line: str) -> None:
        handler = _handler
        with handler.lock:  # the lock the standard library's records take: lines never interleave
            handler.stream.write(line + "\n")
            handler.stream.flush()

    debug = info = warning = error = critical = exception = msg


class _StdStream:
    """``sys.stdout`` or ``sys.stderr`` as it is when a line is written, not when logging was
    configured: a test (or an embedding program) that swaps it and closes its stand-in afterwards
    leaves logging writing to the real one again, not to a closed stream."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        return getattr(sys, self.name).write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()

    def isatty(self) -> bool:
        return getattr(sys, self.name).isatty()


_handler = logging.StreamHandler(_StdStream("stdout"))  # replaced by configure_logging


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Route structlog and every standard-library logger to ``stream`` (stdout) as one stream.

    ``fmt`` is "json", "console" or "auto" (console when ``stream`` is a terminal). Replaces the
    root logger's handlers, so calling it again moves all logging to the new stream (a structlog
    logger keeps the level it was first used at).
    """
    global _handler
    if stream is None or stream is sys.stdout:
        stream = _StdStream("stdout")
    elif stream is sys.stderr:
        stream = _StdStream("stderr")
    is_console = fmt == "console" or (fmt == "auto" and stream.isatty())
    # run for structlog's events and the standard library's records alike
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    render: list[Any]
    if is_console:
        render = [structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)]
    else:
        render = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer(serializer=_json_dumps)]
    handler = _handler = logging.StreamHandler(stream)
    handler.setFormatter(
        ProcessorFormatter(processors=[ProcessorFormatter.remove_processors_meta, *render], foreign_pre_chain=shared)
    )
    structlog.configure(
        processors=[*shared, *render],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_HandlerLogger,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # other libraries' DEBUG records (httpcore writes several per upstream call) stay out
    root.setLevel(max(_LEVELS[level], logging.INFO))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per upstream call otherwise
