"""`taxiway bench edge`: both protocols answer every request they are fed; the report says so."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.cli import main


def test_edge_report(tmp_path: Path) -> None:
    out = tmp_path / "edge.json"
    assert main(["bench", "edge", "--requests", "300", "--rounds", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_responses"] == 2 * 2 * 300  # every request answered 200 by both protocols
    assert len(report["uvicorn_us"]) == len(report["edge_us"]) == 2
    assert report["edge_median_us"] > 0 and report["uvicorn_median_us"] > 0
