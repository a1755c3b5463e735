"""Reports over the usage ledger: ``taxiway usage`` and ``GET /admin/usage``."""

from __future__ import annotations

import argparse
import re
import time
import urllib.parse
from typing import Any

import msgspec

from gateway.config import load_settings
from gateway.errors import InvalidRequestError
from plugins.db import Database, database_url

#: what a report may group by → its SQL expression
GROUPS = {
    "key": "COALESCE(key_name, key_id)",
    "model": "model",
    "backend": "backend",
    "endpoint": "endpoint",
    "status": "status",
}
_SINCE = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> float:
    """``"7d"``, ``"24h"``, ``"30m"``, ``"90s"`` or seconds → seconds; ``ValueError`` otherwise."""
    match = _SINCE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a duration such as 7d, 24h, 30m, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_by(text: str) -> list[str]:
    by = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in by if part not in GROUPS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)} (one of {', '.join(GROUPS)})")
    return by


def parse_query(query: str) -> tuple[float, list[str]]:
    """``since`` and ``by`` of ``GET /admin/usage``; a 400 naming the parameter."""
    params = urllib.parse.parse_qs(query)
    try:
        since_s = parse_since(params.get("since", ["7d"])[-1])
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="since") from exc
    try:
        by = parse_by(params.get("by", ["key,model"])[-1])
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="by") from exc
    return since_s, by


def report(url: str, since_s: float, by: list[str]) -> list[dict[str, Any]]:
    """Requests, tokens, errors and mean latency per group, over the last ``since_s`` seconds."""
    columns = [GROUPS[name] for name in by]
    select = ", ".join([*columns, "COUNT(*)", "SUM(prompt_tokens)", "SUM(completion_tokens)", "SUM(cached_tokens)",
                        "SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END)", "AVG(latency_ms)"])  # fmt: skip
    group = f" GROUP BY {', '.join(columns)} ORDER BY {', '.join(columns)}" if columns else ""
    db = Database(url)
    try:
        rows = db.execute(f"SELECT {select} FROM usage WHERE time >= ?{group}", (time.time() - since_s,))
    finally:
        db.close()
    out = []
    for row in rows:
        record: dict[str, Any] = dict(zip(by, row[: len(by)], strict=True))
        requests, prompt, completion, cached, errors, latency = row[len(by) :]
        record.update(
            requests=int(requests), prompt_tokens=int(prompt or 0), completion_tokens=int(completion or 0),
            cached_tokens=int(cached or 0), errors=int(errors or 0),
            mean_latency_ms=None if latency is None else round(float(latency), 3),
        )  # fmt: skip
        out.append(record)
    return out


def configure_command(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config ([usage] url; default the home's SQLite file)")
    parser.add_argument("--since", default="7d", help="how far back: 7d, 24h, 30m (default 7d)")
    parser.add_argument("--by", default="key,model", help=f"group by, comma-separated: {', '.join(GROUPS)}")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def run_command(args: argparse.Namespace) -> int:
    """Report the usage ledger: requests and tokens per key and model."""
    try:
        since_s, by = parse_since(args.since), parse_by(args.by)
    except ValueError as exc:
        print(f"taxiway usage: {exc}")
        return 2
    rows = report(database_url(load_settings(args.config)), since_s, by)
    if args.json:
        for row in rows:
            print(msgspec.json.encode(row).decode())
        return 0
    header = [*by, "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "errors", "mean_latency_ms"]
    table = [header] + [["-" if row[h] is None else str(row[h]) for h in header] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    return 0
