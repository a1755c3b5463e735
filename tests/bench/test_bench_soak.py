"""`taxiway bench soak` end to end, small: a real server on a tiny random llama, the whole mix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.synthetic import write_random_llama
from gateway.cli import main

_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
_CONFIG = """
[server]
idle_timeout_s = 1.0

[[models]]
name = "tiny"
aliases = ["default"]
backend = "engine"
options = {{ model = "{model}", dtype = "float32", threads = 1, native_kernels = false, max_num_seqs = 8, kv_cache_tokens = 2048, enable_prefix_caching = false }}

[usage]
url = "sqlite:///{tmp}/usage.sqlite3"
"""


def test_soak_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "tiny"
    write_random_llama(model, seed=1, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300, tokenizer=True)
    (model / "chat_template.jinja").write_text(_TEMPLATE)
    config = tmp_path / "config.toml"
    config.write_text(_CONFIG.format(model=model, tmp=tmp_path))
    out, plot = tmp_path / "soak.json", tmp_path / "soak.svg"
    code = main(["bench", "soak", "--config", str(config), "--requests", "140", "--concurrency", "8",
                 "--max-tokens", "4-8", "--sample-s", "0.5", "--settle-s", "2", "--plot", str(plot),
                 "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())

    assert sum(report["statuses"].values()) == 140
    by_kind = report["by_kind"]
    assert "embedding" not in by_kind and report["params"]["embedding_model"] is None  # not served: chat instead
    assert set(by_kind) == {"chat", "chat_stream", "completion", "compl_stream", "disconnect", "invalid"}
    assert all(status[0] == "4" for status in by_kind["invalid"])
    assert set(by_kind["disconnect"]) == {"200"}
    assert report["num_5xx"] == report["num_stream_errors"] == report["num_truncated"] == 0
    assert report["num_unexpected"] == report["num_transport_errors"] == 0
    assert report["kv_blocks_total"] > 0 and report["kv_blocks_used_end"] == 0  # disconnects freed theirs
    assert report["fds_end"] <= report["fds_start"]
    assert all(s[4] >= 0 for s in report["samples"])  # every sample read the engine's KV blocks (-1: no stats)
    assert report["samples"][-1][1] == 140
    assert report["server_exit_code"] == 0
    assert code == (1 if report["rss_growth_pct"] >= 5.0 else 0)
    assert "KV blocks in use at the end: 0" in printed and "| disconnect |" in printed
    assert plot.read_text().lstrip().startswith("<?xml") and "server RSS (MiB)" in plot.read_text()
