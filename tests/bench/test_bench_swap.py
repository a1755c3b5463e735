"""`taxiway bench swap` end to end: a real server, two tiny random llamas, a SIGHUP under load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.synthetic import write_random_llama
from gateway.cli import main

# no chat template in a random model's tokenizer: one line per message is enough to chat
_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
_OPTIONS = (
    'dtype = "float32", threads = 1, native_kernels = false, max_num_seqs = 8, kv_cache_tokens = 2048, '
    "enable_prefix_caching = false"
)


def _tiny(path: Path, seed: int) -> Path:
    write_random_llama(path, seed=seed, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300,
                       tokenizer=True)  # fmt: skip
    (path / "chat_template.jinja").write_text(_TEMPLATE)
    return path


def test_swap_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_a, model_b = _tiny(tmp_path / "a", 1), _tiny(tmp_path / "b", 2)
    out = tmp_path / "swap.json"
    code = main(["bench", "swap", "--model-a", str(model_a), "--model-b", str(model_b), "--options", _OPTIONS,
                 "--concurrency", "8", "--duration-s", "7", "--swap-at-s", "3", "--warmup-s", "0.5",
                 "--margin-s", "1", "--max-tokens", "8", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert code == 0, printed
    assert report["num_failed"] == report["num_truncated"] == report["num_mixed"] == 0
    assert report["num_a_after_first_b"] == 0
    assert (report["model_a"], report["model_b"]) == ("model-a", "model-b")
    assert 0 < report["signal_to_first_b_s"] < 4
    events = report["server_events_s"]  # from the server's log
    assert events["backend.starting"] <= events["engine.ready"] <= events["config.reloaded"] <= events["backend.retired"]
    assert events["config.reloaded"] <= report["signal_to_first_b_s"] + 0.1  # log stamps vs this process's clock
    assert len(report["slowest"]) == 5 and report["slowest"][0][2] == max(row[2] for row in report["slowest"])
    steady, swap, after = report["steady"], report["swap"], report["after"]
    assert set(steady["answered_by"]) == {"model-a"} and steady["num_requests"] > 0
    assert set(after["answered_by"]) == {"model-b"}
    assert "model-b" in swap["answered_by"]
    assert steady["end_s"] == swap["start_s"] == pytest.approx(3, abs=0.5)
    for window in (steady, swap, after):
        assert window["num_failed"] == window["num_truncated"] == 0
        assert 0 < window["ttft_p50_s"] <= window["latency_p50_s"] <= window["latency_p99_s"]
    assert report["latency_p99_ratio"] == pytest.approx(swap["latency_p99_s"] / steady["latency_p99_s"])
    assert "| steady |" in printed and "| swap |" in printed and "p99 swap / steady" in printed


def test_a_and_b_must_differ(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "swap", "--model-a", "m", "--model-b", "m"]) == 2
    assert "same options" in capsys.readouterr().err
