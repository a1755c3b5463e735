"""`taxiway bench lora`: multi-LoRA throughput against the base model alone, in one run.

One workload (the same prompts and exact output lengths, ``ignore_eos``) runs with continuous
batching at concurrency C four ways on one engine built with ``options.lora``: every request on
the base model, then requests spread round robin over 1, 4 and 16 distinct adapters. Reported:
output tokens/s of each and its ratio to the base alone, and each adapter's load time (reading
and checking its PEFT files: ``LoRARegistry.read``) and the slot swaps.

The adapters are random-weight PEFT directories of the model's shapes written here (no adapter can
be downloaded; speed depends on shapes and ranks, not on values): rank ``--rank`` on
``--targets`` (PEFT's default for Llama models: q_proj,v_proj).
"""

from __future__ import annotations

import json
import sys
import tempfile
from argparse import ArgumentParser, Namespace
from pathlib import Path

import msgspec

from bench.batching import StepTally, _params, make_jobs, run_continuous
from bench.report import add_json_flag, human, write_json


class LoRAResult(msgspec.Struct):
    adapters: int  # distinct adapters the requests spread over; 0: the base model alone
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    vs_base: float
    slot_swaps: int
    steps: StepTally


def write_random_adapter(path: Path, config, targets: list[str], rank: int, seed: int) -> Path:  # type: ignore[no-untyped-def]
    """A PEFT adapter directory with random weights of ``config``'s shapes."""
    import torch
    from safetensors.torch import save_file

    from backends.engine.lora.adapter import module_shapes

    shapes = module_shapes(config)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(config.num_layers):
        for module in targets:
            in_f, out_f = shapes[module]
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{block}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, in_f, generator=gen) * 0.02).to(torch.float16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out_f, rank, generator=gen) * 0.02).to(torch.float16)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config_json = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets, "bias": "none"}
    (path / "adapter_config.json").write_text(json.dumps(config_json))
    return path


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--prompt-tokens", default="16-256")
    parser.add_argument("--output-tokens", default="64-128")
    parser.add_argument("--adapters", default="1,4,16", help="distinct adapters per run, comma-separated")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,v_proj", help="adapted modules (all: every projection)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    add_json_flag(parser, dest="out")


def run(args: Namespace) -> int:
    """Output tokens/s at C=16 spread over 1, 4 and 16 LoRA adapters vs the base model alone."""
    from backends.engine.builder import EngineOptions, build_engine
    from backends.engine.lora.options import LoRAOptions
    from backends.engine.lora.registry import LoRARegistry
    from bench.loadgen import parse_range
    from gateway.logs import configure_logging

    configure_logging("warning", stream=sys.stderr)
    counts = [int(n) for n in args.adapters.split(",")]
    most = max(counts)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] if args.targets == "all" else args.targets.split(",")
    lora = LoRAOptions(max_loras=most, max_lora_rank=max(args.rank, 8), max_cpu_loras=most)
    options = EngineOptions(
        model=args.model, threads=args.threads, max_num_seqs=args.concurrency, max_num_batched_tokens=512,
        kv_cache_tokens=args.concurrency * 1024, enable_prefix_caching=False, lora=lora,
    )  # fmt: skip
    engine = build_engine(options, progress=True)
    config = engine.runner.config
    registry = LoRARegistry(config, lora)
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_random_adapter(Path(tmp) / f"a{i}", config, targets, args.rank, seed=i) for i in range(most)]
        adapters = [registry.read(f"a{i}", path) for i, path in enumerate(paths)]
    load_s = sorted(registry.load_times_s.values())
    jobs = make_jobs(engine.tokenizer, args.num_requests, parse_range(args.prompt_tokens),
                     parse_range(args.output_tokens), args.seed)  # fmt: skip
    useful = sum(j.max_tokens for j in jobs)
    for warm in (None, adapters[0]):  # both paths warm before timing
        engine.add_request(f"warm-up-{warm is not None}", jobs[0].prompt_ids, _params(4), lora=warm)
        while engine.has_unfinished():
            engine.step()

    slots = engine.runner.lora_slots
    results: list[LoRAResult] = []
    for n in [0, *counts]:
        tally = StepTally()
        swaps = slots.num_swaps
        wall = run_continuous(engine, jobs, args.concurrency, tally, adapters[:n])
        base = results[0].output_tokens_per_s if results else useful / wall
        results.append(LoRAResult(n, wall, useful, useful / wall, useful / wall / base, slots.num_swaps - swaps, tally))
        print(f"{n:>3} adapters: {wall:6.1f} s  {useful / wall:7.1f} output tok/s  {useful / wall / base:.2f}x base",
              file=sys.stderr)  # fmt: skip
    adapter_mib = adapters[0].num_bytes / 2**20
    print(report(results, args, targets, load_s, adapter_mib), file=human(args.out))
    write_json(args.out, {"results": results, "adapter_load_s": load_s, "adapter_mib": adapter_mib})
    return 0


def report(results: list[LoRAResult], args: Namespace, targets: list[str], load_s: list[float], mib: float) -> str:
    lines = [
        f"C={args.concurrency}, {args.num_requests} requests, prompts {args.prompt_tokens} tokens, outputs "
        f"{args.output_tokens} tokens; adapters rank {args.rank} on {','.join(targets)} ({mib:.1f} MiB each in float32)",
        "",
        "| requests over | wall (s) | output tok/s | vs base | slot swaps | ms per decode-only step |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r.steps
        per_step = t.decode_only_steps_s / t.num_decode_only_steps * 1e3 if t.num_decode_only_steps else float("nan")
        who = "base alone" if r.adapters == 0 else f"{r.adapters} adapter{'s' if r.adapters > 1 else ''}"
        lines.append(f"| {who} | {r.wall_s:.1f} | {r.output_tokens_per_s:.1f} | {r.vs_base:.2f}x | {r.slot_swaps} | {per_step:.1f} |")
    if load_s:
        lines += ["", f"adapter load (read + check): median {load_s[len(load_s) // 2] * 1e3:.0f} ms, max {load_s[-1] * 1e3:.0f} ms"]
    return "\n".join(lines)
