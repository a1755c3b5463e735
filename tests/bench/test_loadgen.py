"""`taxiway bench serving` against a real HTTP server (the stub upstream)."""

from __future__ import annotations

import asyncio
import json

from bench import loadgen
from bench.stub_upstream import StubUpstream


def test_workload_is_seeded_and_within_ranges() -> None:
    a = loadgen.make_workload(50, (16, 512), (16, 256), seed=3)
    assert a == loadgen.make_workload(50, (16, 512), (16, 256), seed=3)
    assert all(16 <= s.prompt_words <= 512 and 16 <= s.max_tokens <= 256 for s in a)
    assert loadgen.parse_range("128") == (128, 128)


def test_level_report_counts_tokens_and_latencies(stub_upstream: StubUpstream) -> None:
    workload = [loadgen.RequestSpec(prompt_words=8, max_tokens=5) for _ in range(12)]
    report = asyncio.run(
        loadgen.run_level(stub_upstream.base_url, "m", None, workload, concurrency=4,
                          temperature=0.0, timeout_s=30, progress=False)  # fmt: skip
    )
    assert report.num_requests == 12 and report.num_errors == 0
    assert report.output_tokens > 0
    assert report.output_tokens_per_s > 0 and report.requests_per_s > 0
    assert 0 < report.ttft_p50_s <= report.latency_p50_s


def test_cli_writes_json_and_png(stub_upstream: StubUpstream, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.cli import main

    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["bench", "serving", "--base-url", stub_upstream.base_url, "--model", "m", "--concurrency", "1,2",
                 "--num-requests", "4", "--prompt-tokens", "4-8", "--output-tokens", "3", "--no-progress",
                 "--out", str(out), "--plot", str(plot)])  # fmt: skip
    assert code == 0
    levels = json.loads(out.read_text())["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
