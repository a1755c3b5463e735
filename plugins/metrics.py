"""``GET /metrics``: Prometheus text exposition (``prometheus-client``), names ``taxiway_*``.

Per request (on ``after_request`` / ``on_error``, never per token) and, at scrape time, from the
routing table (each model's state, memory, in-flight requests, the engine's stats, each
deployment's cooldown). Every metric and the vLLM metric it stands for is listed in
docs/configuration.md ("Metrics"), so that a vLLM dashboard ports by renaming.
``[plugins.metrics] admin = true`` serves it below the admin keys instead (``/admin/metrics``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
from prometheus_client import REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.config import Settings, convert_table
from gateway.context import RequestContext
from gateway.errors import TaxiwayError
from gateway.hookspecs import RouteResponse, hookimpl
from gateway.interface import Usage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)

REQUESTS = Counter("taxiway_requests", "Requests by model, endpoint and HTTP status", ["model", "endpoint", "status"])
E2E = Histogram("taxiway_e2e_request_latency_seconds", "Arrival to last byte", ["model"], buckets=_LATENCY_BUCKETS)
TTFT = Histogram("taxiway_time_to_first_token_seconds", "Arrival to the backend's first item", ["model"],
                 buckets=_LATENCY_BUCKETS)  # fmt: skip
ITL = Histogram("taxiway_inter_token_latency_seconds", "A stream's mean time between output tokens", ["model"],
                buckets=_TOKEN_BUCKETS)  # fmt: skip
QUEUE = Histogram("taxiway_request_queue_time_seconds", "Arrival to the backend's first item less its own time "
                  "(admission: auth, limits, a model load)", ["model"], buckets=_LATENCY_BUCKETS)  # fmt: skip
PROMPT_TOKENS = Counter("taxiway_prompt_tokens", "Prompt tokens processed", ["model"])
GENERATION_TOKENS = Counter("taxiway_generation_tokens", "Tokens generated", ["model"])
CACHED_TOKENS = Counter("taxiway_prompt_tokens_cached", "Prompt tokens served from a prefix cache", ["model"])
OVERHEAD = Histogram("taxiway_gateway_overhead_seconds", "The gateway's own time in a request (not the backend's)",
                     buckets=_OVERHEAD_BUCKETS)  # fmt: skip


class MetricsOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    admin: bool = False  # serve at /admin/metrics behind the admin keys instead of /metrics
    enabled: bool = True  # false: no per-request metrics (the route gauges stay)


class _State:
    admin = False
    enabled = True
    router: Callable[[], Any] | None = None
    stall_timeout_s = 0.0
    #: label tuple → the children of a request's metrics, resolved once (labels() costs µs)
    children: dict[tuple[str, str, int], tuple[Any, ...]] = {}


_state = _State()


@hookimpl
def plugin_configure(settings: Settings) -> None:
    options = convert_table(settings.plugins.get("metrics", {}), MetricsOptions, "plugins.metrics")
    _state.admin = options.admin
    _state.enabled = options.enabled
    _state.stall_timeout_s = settings.server.stall_timeout_s


def _children(model: str, endpoint: str, status: int) -> tuple[Any, ...]:
    key = (model, endpoint, status)
    children = _state.children.get(key)
    if children is None:
        children = (
            REQUESTS.labels(model, endpoint, str(status)), E2E.labels(model), TTFT.labels(model), ITL.labels(model),
            QUEUE.labels(model), PROMPT_TOKENS.labels(model), GENERATION_TOKENS.labels(model),
            CACHED_TOKENS.labels(model),
        )  # fmt: skip
        _state.children[key] = children
    return children


def _record(ctx: RequestContext, usage: Usage | None) -> None:
    if not _state.enabled:
        return
    requests, e2e, ttft, itl, queue, prompt, generation, cached = _children(
        ctx.model or "", ctx.endpoint, ctx.status_code
    )
    requests.inc()
    timings = ctx.timings
    if timings.total_s is not None:
        e2e.observe(timings.total_s)
        OVERHEAD.observe(max(0.0, timings.total_s - timings.backend_s))
    if usage is None:
        return
    prompt.inc(usage.prompt_tokens)
    generation.inc(usage.completion_tokens)
    if usage.cached_tokens:
        cached.inc(usage.cached_tokens)
    first = timings.first_token_s
    if first is not None and ctx.is_stream:
        ttft.observe(first)
        if timings.total_s is not None and usage.completion_tokens > 1:
            itl.observe(max(0.0, timings.total_s - first) / (usage.completion_tokens - 1))
    if first is not None:
        # the backend's own time before its first item is unknown here: its whole wait is excluded
        queue.observe(max(0.0, first - min(first, timings.backend_s)))


@hookimpl
def after_request(ctx: RequestContext, usage: Usage | None) -> None:
    _record(ctx, usage)


@hookimpl
def on_error(ctx: RequestContext, error: TaxiwayError) -> None:
    _record(ctx, None)


class RoutesCollector(Collector):
    """Gauges read from the routing table at scrape time (and the engine's own counters)."""

    def collect(self) -> Iterator[Any]:
        router = _state.router() if _state.router is not None else None
        if router is None:
            return
        state = GaugeMetricFamily("taxiway_model_state", "1 for the model's state", labels=["model", "state"])
        memory = GaugeMetricFamily("taxiway_model_memory_bytes", "Memory the model holds", labels=["model"])
        in_flight = GaugeMetricFamily("taxiway_deployment_in_flight", "Requests in flight per deployment",
                                      labels=["model", "deployment", "backend"])  # fmt: skip
        cooling = GaugeMetricFamily("taxiway_deployment_cooling_down", "1 while a deployment cools down after a "
                                    "failure", labels=["model", "deployment"])  # fmt: skip
        failures = CounterMetricFamily("taxiway_deployment_failures", "Failures that sent a deployment into cooldown",
                                       labels=["model", "deployment"])  # fmt: skip
        stalled = GaugeMetricFamily("taxiway_model_stalled", "1 when requests are in flight but no token came for "
                                    "stall_timeout_s (/ready is then 503)", labels=["model"])  # fmt: skip
        running = GaugeMetricFamily("taxiway_num_requests_running", "Requests the engine runs", labels=["model"])
        waiting = GaugeMetricFamily("taxiway_num_requests_waiting", "Requests waiting in the engine", labels=["model"])
        kv = GaugeMetricFamily("taxiway_kv_cache_usage_perc", "KV-cache blocks in use (0-1)", labels=["model"])
        prefix = GaugeMetricFamily("taxiway_prefix_cache_hit_ratio", "Prefix-cache hit ratio (0-1)", labels=["model"])
        preemptions = CounterMetricFamily("taxiway_num_preemptions", "Sequences preempted", labels=["model"])
        now_mono, now_perf = time.monotonic(), time.perf_counter()
        seen: dict[str, int] = {}
        for route in router.routes:
            index = seen[route.name] = seen.get(route.name, -1) + 1
            deployment = str(index)
            state.add_metric([route.name, route.state], 1)
            nbytes = route.backend.memory_bytes()
            if nbytes is not None:
                memory.add_metric([route.name], nbytes)
            in_flight.add_metric([route.name, deployment, route.backend_name], route.num_in_flight)
            until = route.backend.cooling_down_until() or route.health.until
            cooling.add_metric([route.name, deployment], 1 if until is not None and until > now_mono else 0)
            failures.add_metric([route.name, deployment], route.health.num_failures)
            stall = _state.stall_timeout_s > 0 and route.stalled_for(now_perf) > _state.stall_timeout_s
            stalled.add_metric([route.name], 1 if stall else 0)
            stats = route.backend.stats()
            if stats is None:
                continue
            if hasattr(stats, "num_running"):
                running.add_metric([route.name], stats.num_running)
                waiting.add_metric([route.name], stats.num_waiting)
            total = getattr(stats, "kv_blocks_total", 0)
            if total:
                kv.add_metric([route.name], stats.kv_blocks_used / total)
            if hasattr(stats, "prefix_cache_hit_rate"):
                prefix.add_metric([route.name], stats.prefix_cache_hit_rate)
            if hasattr(stats, "num_preemptions"):
                preemptions.add_metric([route.name], stats.num_preemptions)
        yield from (state, memory, in_flight, cooling, failures, stalled, running, waiting, kv, prefix, preemptions)


REGISTRY.register(RoutesCollector())


async def _metrics(scope: dict[str, Any], receive: Any) -> RouteResponse:
    return RouteResponse(generate_latest(REGISTRY), CONTENT_TYPE)


@hookimpl
def register_routes(register: Callable[..., None], router: Callable[[], Any]) -> None:
    _state.router = router
    if _state.admin:
        register("metrics", _metrics, admin=True)
    else:
        register("/metrics", _metrics)
