"""``taxiway plan``: its memory is the fleet's estimate plus the runtime, split over ranks; the
served default model's peak RSS is within 15 % of it (a real server)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest

from backends.engine.builder import EngineOptions
from backends.engine.memory import estimate_memory
from backends.engine.plan import RUNTIME_BYTES, lora_bytes
from gateway.cli import main
from tests.conftest import serve_process


def _plan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    code = main(["plan", "--json", "--bandwidth-gbs", "10", *argv])
    return code, json.loads(capsys.readouterr().out)


def test_plan_is_the_fleet_estimate_plus_the_runtime(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, plan = _plan(capsys, "--model", str(smollm2_path), "--concurrency", "4", "--context", "2048")
    assert code == 0 and plan["fits"] is None
    est = estimate_memory(smollm2_path, EngineOptions(model=str(smollm2_path), max_num_seqs=4, max_model_len=2048,
                                                      kv_cache_tokens=4 * 2048))  # fmt: skip
    dev = plan["per_device"]
    assert (dev["weights"], dev["kv_cache"], dev["activations"]) == (est.weights, est.kv_cache, est.overhead)
    assert dev["runtime"] == RUNTIME_BYTES and dev["lora"] == 0
    # decode: every weight and each sequence's cache read once a step, at the given 10 GB/s
    assert plan["bytes_per_step"] == est.weights + est.kv_cache
    assert plan["decode_tokens_per_s"] == pytest.approx(4 * 10e9 / plan["bytes_per_step"])

    code, two = _plan(capsys, "--model", str(smollm2_path), "--concurrency", "4", "--context", "2048", "--tp", "2",
                      "--lora", "3", "--lora-rank", "8")  # fmt: skip
    assert two["per_device"]["weights"] == est.weights // 2 and two["per_device"]["kv_cache"] == est.kv_cache // 2
    config = __import__("backends.engine.memory", fromlist=["read_config"]).read_config(smollm2_path)
    assert two["per_device"]["lora"] == 3 * lora_bytes(config, 8) // 2
    assert code == 0

    code, small = _plan(capsys, "--model", str(smollm2_path), "--memory-gb", "0.1")
    assert code == 1 and small["fits"] is False
    code, big = _plan(capsys, "--model", str(smollm2_path), "--memory-gb", "64")
    assert code == 0 and big["fits"] is True


def test_lora_bytes_count_a_and_b_on_every_projection() -> None:
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=8, intermediate_size=16, num_layers=2, q_size=8, kv_size=4)
    # q: 8->8, k,v: 8->4, o: 8->8, gate,up: 8->16, down: 16->8; rank 2, bfloat16, 2 layers
    per_layer = 2 * ((8 + 8) + (8 + 4) * 2 + (8 + 8) + (8 + 16) * 2 + (16 + 8))
    assert lora_bytes(cfg, 2) == 2 * per_layer * 2


@pytest.mark.slow
def test_plan_predicts_the_served_peak_rss(smollm2_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default model at the default serving options: plan's total vs the server's peak RSS
    (VmHWM) after 16 concurrent requests."""
    code, plan = _plan(capsys, "--model", str(smollm2_path))
    assert code == 0
    config = textwrap.dedent(f"""
        [[models]]
        name = "default"
        backend = "engine"
        [models.options]
        model = "{smollm2_path}"
    """)
    with serve_process(config, tmp_path, startup_timeout=120) as server:
        server.wait_ready(180)
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            import concurrent.futures

            def ask(i: int) -> int:
                body = {"model": "default", "messages": [{"role": "user", "content": f"Count to {i + 5}."}],
                        "max_tokens": 32, "temperature": 0}  # fmt: skip
                return client.post("/chat/completions", json=body).status_code

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                assert set(pool.map(ask, range(16))) == {200}
        peak = _peak_rss(psutil.Process(server.proc.pid))
    ratio = plan["total_bytes"] / peak
    print(json.dumps({"plan_bytes": plan["total_bytes"], "peak_rss": peak, "ratio": round(ratio, 3)}))
    assert 0.85 <= ratio <= 1.15


def _peak_rss(proc: psutil.Process) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return proc.memory_info().rss
