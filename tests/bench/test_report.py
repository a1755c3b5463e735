"""One output flag across ``taxiway bench``: every subcommand takes ``--json [FILE]`` (without
FILE, or ``-``: stdout, the tables then on stderr); ``--out`` is its older name in some."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench.report import human, write_json
from gateway.cli import _Builtins, build_parser
from gateway.plugins import load_plugins


def _bench_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser(load_plugins(extra=[("gateway.cli", _Builtins())]).commands())
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bench = next(a for a in top.choices["bench"]._actions if isinstance(a, argparse._SubParsersAction))
    return dict(bench.choices)


def test_every_bench_command_takes_json_file_or_stdout() -> None:
    parsers = _bench_parsers()
    assert {"gateway", "serving", "engine", "batching", "tp", "swap", "embeddings", "gpu", "structured", "lora"} <= set(parsers)
    for name, sub in parsers.items():
        flag = next((a for a in sub._actions if "--json" in a.option_strings), None)
        assert flag is not None and flag.metavar == "FILE" and (flag.nargs, flag.const) == ("?", "-"), name
        assert getattr(sub.parse_known_args(["--json"])[0], flag.dest) == "-", name
        assert getattr(sub.parse_known_args(["--json", "r.json"])[0], flag.dest) == "r.json", name


def test_write_json_to_a_file_or_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_json(tmp_path / "r.json", {"tokens_per_s": 1.5})
    assert json.loads((tmp_path / "r.json").read_text()) == {"tokens_per_s": 1.5}
    write_json("-", [{"a": 1}])
    assert json.loads(capsys.readouterr().out) == [{"a": 1}]
    write_json(None, {"ignored": True})
    assert capsys.readouterr().out == ""
    import sys

    assert human("-") is sys.stderr and human("r.json") is sys.stdout and human(None) is sys.stdout
