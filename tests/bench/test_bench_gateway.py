"""``taxiway bench gateway --compare-ops``: a bare gateway and one with operations on (a virtual
key, Redis limits, metrics, the ledger) measured in the same rounds against one stub upstream."""

from __future__ import annotations

import asyncio
import math
from argparse import Namespace

from bench.overhead import _bench, format_summary


def test_compare_ops_measures_both_gateways_in_one_run() -> None:
    args = Namespace(rounds=2, sequential=10, concurrency=4, concurrent_requests=40, ops=False, compare_ops=True,
                     json=None)  # fmt: skip
    summary = asyncio.run(_bench(args))
    bare = summary.bare
    assert bare is not None
    for value in (bare.p50_ms, bare.cpu_ms_per_request, summary.gateway_p50_ms, summary.gateway_cpu_ms_per_request):
        assert math.isfinite(value) and value > 0
    # the ops gateway authenticated the key and metered each request: its own overhead header is there
    assert summary.overhead_header_p50_ms > 0 and bare.overhead_header_p50_ms > 0
    assert summary.ops_added_cpu_ms_per_request == summary.gateway_cpu_ms_per_request - bare.cpu_ms_per_request
    assert "operations add" in format_summary(summary)
