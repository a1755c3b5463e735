"""`taxiway bench plan`: ``taxiway plan``'s decode estimate against ``taxiway bench engine``'s
measured decode, in one run.

The plan's estimate on a CPU times the engine's own linear layers on random weights of the
model's shapes and reads the KV cache at the measured bandwidth (``backends/engine/plan.py``); the
bench runs the real model, one sequence, the same threads and context (prompt + decode). Each side
takes its best of ``--rounds``: another process on the machine only slows either down, and a ratio
is only as good as the quiet it was measured in (a timing, so a benchmark, not a unit test).
Target (issue 19): the estimate within 30 % of the measured decode.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import subprocess
import sys
import time
from argparse import ArgumentParser, Namespace

import msgspec

from bench.report import add_json_flag, human, write_json


class PlanCheck(msgspec.Struct):
    date: str
    machine: str
    model: str
    threads: int
    prompt_tokens: int
    decode_tokens: int
    plan_decode_tokens_per_s: list[float]
    bench_decode_tokens_per_s: list[float]
    ratio: float  # best estimate over best measurement
    within_30_percent: bool


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="catalogue name, .gguf file or HF directory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="each side's tries; the best counts")
    add_json_flag(parser)


def run(args: Namespace) -> int:
    """Compare `taxiway plan`'s decode estimate with `taxiway bench engine`'s measured decode (target: within 30 %)."""
    from backends.engine.builder import EngineOptions, resolve_model_path
    from gateway.cli import main

    model = str(resolve_model_path(EngineOptions(model=args.model), progress=True))
    bench = subprocess.run(
        [sys.executable, "-m", "gateway", "bench", "engine", "--model", model, "--no-hf", "--rounds", str(args.rounds),
         "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
         "--decode-tokens", str(args.decode_tokens), "--json", "-"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if bench.returncode != 0:
        print(bench.stderr[-3000:], file=sys.stderr)
        return 1
    measured = [m["decode_tokens_per_s"] for m in json.loads(bench.stdout)["taxiway"]]
    estimates = []
    for _ in range(args.rounds):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["plan", "--json", "--model", model, "--concurrency", "1",
                         "--context", str(args.prompt_tokens + args.decode_tokens), "--threads", str(args.threads)])  # fmt: skip
        if code != 0:
            return code
        estimates.append(json.loads(out.getvalue())["decode_tokens_per_s"])
    ratio = max(estimates) / max(measured)
    report = PlanCheck(
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}",
        model=model, threads=args.threads, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
        plan_decode_tokens_per_s=[round(x, 1) for x in estimates], bench_decode_tokens_per_s=[round(x, 1) for x in measured],
        ratio=round(ratio, 3), within_30_percent=0.7 <= ratio <= 1.3,
    )  # fmt: skip
    print(
        f"taxiway bench plan — {report.date} — {report.machine}\n"
        f"decode tok/s, one sequence, {args.threads} threads, {args.prompt_tokens} + {args.decode_tokens} tokens\n"
        f"  taxiway plan (estimate): {', '.join(f'{x:.1f}' for x in report.plan_decode_tokens_per_s)}\n"
        f"  taxiway bench engine:    {', '.join(f'{x:.1f}' for x in report.bench_decode_tokens_per_s)}\n"
        f"  best / best: {report.ratio:.2f}x ({'within' if report.within_30_percent else 'NOT within'} 30 %)",
        file=human(args.json),
    )
    write_json(args.json, report)
    return 0
