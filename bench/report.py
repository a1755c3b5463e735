"""The one output flag of every ``taxiway bench`` command: ``--json FILE`` writes the command's
results as JSON to FILE; ``--json`` alone (or ``--json -``) to stdout, the table then on stderr."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import msgspec


def add_json_flag(parser: argparse.ArgumentParser, dest: str = "json") -> None:
    """``--json [FILE]`` (none or ``-``: stdout); ``--out`` is the same flag's older name. ``dest``
    keeps the attribute the command already reads."""
    parser.add_argument(
        "--json", "--out", dest=dest, metavar="FILE", nargs="?", const="-", default=None,
        help="write the results as JSON to FILE; without FILE, JSON alone on stdout (the table on stderr)",
    )  # fmt: skip


def to_stdout(target: str | Path | None) -> bool:
    """Whether the JSON goes to stdout: the command's human output then goes to stderr."""
    return str(target) == "-"


def human(target: str | Path | None):  # type: ignore[no-untyped-def]
    """Where the command's tables go: stdout, or stderr when the JSON takes stdout."""
    return sys.stderr if to_stdout(target) else sys.stdout


def write_json(target: str | Path | None, results: Any) -> None:
    """``results`` (msgspec-encodable) as indented JSON to ``target``; nothing when None."""
    if target is None:
        return
    body = msgspec.json.format(msgspec.json.encode(results)) + b"\n"
    if to_stdout(target):
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
    else:
        Path(target).write_bytes(body)
