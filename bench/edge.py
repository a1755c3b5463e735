"""``taxiway bench edge``: what the edge's limits (``gateway.edge.EdgeProtocol``) add to each request,
against uvicorn's own httptools protocol it extends.

One connection per run, ``--requests`` keep-alive requests (an OpenAI client's POST: eight headers
and a small JSON body, in one segment) fed to ``data_received``, a no-op ASGI app answering each;
no sockets, so the figure is the protocol's own cost. The two protocols alternate over ``--rounds``
rounds (swapping the order each round); medians of microseconds per request.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import time
from argparse import ArgumentParser, Namespace
from typing import Any

import msgspec

from bench.report import add_json_flag, human, write_json

_BODY = b'{"model":"default","messages":[{"role":"user","content":"hello, there!"}]}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: OpenAI/Python 1.0\r\n"
    b"Accept: application/json\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-123\r\n"
    b"X-Stainless-Lang: python\r\nContent-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


class EdgeReport(msgspec.Struct):
    requests_per_round: int
    rounds: int
    uvicorn_us: list[float]  # per request, each round
    edge_us: list[float]
    uvicorn_median_us: float
    edge_median_us: float
    num_responses: int  # 200s, both protocols, all rounds: every request must have been answered


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=20_000, help="requests per round and protocol")
    parser.add_argument("--rounds", type=int, default=7)
    add_json_flag(parser)


def run(args: Namespace) -> int:
    """Microseconds per request: the edge's protocol vs uvicorn's httptools protocol."""
    import uvloop

    report = uvloop.run(_measure(args.requests, args.rounds))
    write_json(args.json, report)
    print(
        f"per request, median of {report.rounds} rounds of {report.requests_per_round}: uvicorn httptools "
        f"{report.uvicorn_median_us:.2f} us, EdgeProtocol {report.edge_median_us:.2f} us "
        f"({report.edge_median_us - report.uvicorn_median_us:+.2f} us)",
        file=human(args.json),
    )
    return 0 if report.num_responses == 2 * report.rounds * report.requests_per_round else 1


class _Transport:
    """Just enough of an asyncio transport: counts the 200 responses written."""

    def __init__(self) -> None:
        self.num_responses = 0
        self._is_closing = False

    def write(self, data: bytes) -> None:
        self.num_responses += data.startswith(b"HTTP/1.1 200 ")

    def is_closing(self) -> bool:
        return self._is_closing

    def close(self) -> None:
        self._is_closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def _round(protocol: Any, num_requests: int) -> tuple[float, int]:
    import uvicorn
    from uvicorn.server import ServerState

    config = uvicorn.Config(_app, http=protocol, log_config=None, lifespan="off")
    config.load()
    conn = config.http_protocol_class(  # type: ignore[call-arg]
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    start = time.perf_counter()
    for _ in range(num_requests):
        conn.data_received(REQUEST)
        await asyncio.sleep(0)  # the request's task runs and answers
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - start
    conn.connection_lost(None)
    return elapsed / num_requests * 1e6, transport.num_responses


async def _measure(num_requests: int, rounds: int) -> EdgeReport:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from gateway.edge import EdgeLimits, EdgeProtocol

    edge = functools.partial(EdgeProtocol, limits=EdgeLimits())
    times: dict[str, list[float]] = {"uvicorn": [], "edge": []}
    num_responses = 0
    for r in range(rounds):
        order = [("uvicorn", HttpToolsProtocol), ("edge", edge)]
        for name, protocol in order if r % 2 == 0 else order[::-1]:
            us, answered = await _round(protocol, num_requests)
            times[name].append(round(us, 3))
            num_responses += answered
    return EdgeReport(
        requests_per_round=num_requests,
        rounds=rounds,
        uvicorn_us=times["uvicorn"],
        edge_us=times["edge"],
        uvicorn_median_us=statistics.median(times["uvicorn"]),
        edge_median_us=statistics.median(times["edge"]),
        num_responses=num_responses,
    )
