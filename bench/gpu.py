"""``taxiway bench gpu``: the engine on a CUDA device against HF transformers, one JSON line per figure.

    taxiway bench gpu [--batch 1,16,64] [--quantization int4,none] [--hf eager,compiled]

A device machine reaches no package index, so the real GGUF cannot travel there; speed depends on
shapes, not values, so a random model of SmolLM2-135M's exact shapes stands in (bfloat16
activations, weights int4 (group 32) or bfloat16 as ``--quantization`` says). Figures:

- ``prefill``: tokens/s of one 512-token prompt (the eager path: fused norm/rotary, SDPA);
- with int4 weights, the GPU path's figures once per ``--int4-kernels`` (torch's
  ``_weight_int4pack_mm``, our Triton ``int4_matmul``): the measurement that chooses between them;
- ``decode``: tokens/s at each batch size, every sequence at a 512-token context, greedy with one
  host sync per step for the token ids; ``mode`` ``graphs`` (``DecodeGraphs`` replay), ``eager``
  (the same kernels launched one by one) and ``plain`` (``CausalLM``'s torch ops, the path before
  the GPU forward, at batch 1);
- ``profile``: per batch with graphs (every mode at the first batch), what bounds the step:
  kernels per step, their summed time, the share of the step the GPU is idle (launch- or
  host-bound when high) and the heaviest kernels;
- ``hf``: ``LlamaForCausalLM`` on the same weights, ``eager`` (dynamic cache) and ``compiled``
  (static cache + ``torch.compile(mode="reduce-overhead")``, HF's documented recipe), decode
  step time from ``generate`` of N + 1 tokens less that of 1 token.

``--device cpu --shapes tiny`` is a dry run of every code path but the graphs' capture (steps run
eagerly through the graphs' static inputs, the kernels by their torch definitions): a test runs it,
so that the script a device call spends its minutes on does not first meet its bugs there.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from argparse import ArgumentParser, ArgumentTypeError, Namespace
from pathlib import Path
from typing import TextIO

from bench.report import add_json_flag, human, write_json

SMOLLM2_SHAPES = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152)
#: the same architecture, small: for dry runs on a CPU
TINY_SHAPES = dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)
SHAPES = {"smollm2": SMOLLM2_SHAPES, "tiny": TINY_SHAPES}


#: every record emitted this run (``--json FILE`` writes them as one list) and where the lines go
_records: list[dict[str, object]] = []
_lines: list[TextIO] = [sys.stdout]


def emit(**fields: object) -> None:
    _records.append(fields)
    print(json.dumps(fields), file=_lines[0], flush=True)


def write_model(path: Path, tokenizer_from: str | None = None, shapes: str = "smollm2") -> Path:
    """A random model of SmolLM2-135M's shapes (``shapes``) at ``path`` (with the tokenizer files
    of ``tokenizer_from``, a model directory, when given: for the serving benchmarks)."""
    import shutil

    from bench.synthetic import write_random_llama

    write_random_llama(path, **SHAPES[shapes], std=0.02, rope_theta=100000.0, max_positions=8192)
    if tokenizer_from:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tokenizer_from) / name, path / name)
    return path


def _int4_kernels(value: str) -> list[str]:
    kernels = [k for k in value.split(",") if k]
    wrong = [k for k in kernels if k not in ("torch", "triton")]
    if wrong or not kernels:
        raise ArgumentTypeError(f"a comma-separated list of torch and triton, not {value!r}")
    return kernels


def configure(parser: ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda; cpu for a dry run (with --shapes tiny)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2", help="the random model's shapes")
    parser.add_argument("--batch", default="1,16,64")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--int4-kernels", type=_int4_kernels, default="torch,triton",
                        help="with int4 weights, the GPU path once per kernel: torch's, ours (Triton)")
    parser.add_argument("--profile-steps", type=int, default=8,
                        help="decode steps profiled per batch and mode (0: none)")
    parser.add_argument("--quantization", default="int4,none")
    parser.add_argument("--hf", default="eager,compiled", help="HF transformers modes to measure ('' for none)")
    parser.add_argument("--hf-budget-s", type=float, default=240.0, help="stop starting HF runs after this long")
    parser.add_argument("--write-model", default=None, help="only write the random model here and exit")
    parser.add_argument("--tokenizer-from", default=None, help="with --write-model: copy this model dir's tokenizer")
    add_json_flag(parser)


def run(args: Namespace) -> int:
    """On a CUDA machine: the engine's GPU path vs HF transformers, prefill and decode by batch."""
    import torch

    if args.write_model:
        write_model(Path(args.write_model), args.tokenizer_from, args.shapes)
        return 0
    device = torch.device(args.device)
    _records.clear()
    _lines[0] = human(args.json)  # JSON lines as they come; with --json -, the list alone on stdout
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or device.type
    emit(device=name, torch=str(torch.__version__), shapes=args.shapes)
    batches = [int(b) for b in args.batch.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp) / "model", shapes=args.shapes)
        for quantization in [q for q in args.quantization.split(",") if q]:
            bench_engine(path, quantization, batches, args, device)
        started = time.perf_counter()
        for mode in [m for m in args.hf.split(",") if m]:
            for b in batches:
                if time.perf_counter() - started > args.hf_budget_s:
                    emit(figure="hf", mode=mode, batch=b, skipped="--hf-budget-s spent")
                    continue
                try:
                    bench_hf(path, mode, b, args, device)
                except Exception as exc:  # a transformers version without the recipe: say so, go on
                    emit(figure="hf", mode=mode, batch=b, error=f"{type(exc).__name__}: {exc}"[:500])
    write_json(args.json, _records)
    return 0


def synchronize(device) -> None:  # type: ignore[no-untyped-def]
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(step, num_steps: int, device) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """What bounds a decode step, from ``num_steps`` calls of ``step(i)`` under torch's profiler:
    kernels launched and their summed time per step (on a CPU, the profiler's top-level ops), the
    wall time per step (the profiler's overhead included) and the heaviest kernels."""
    from collections import defaultdict

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    synchronize(device)
    with torch_profile(activities=activities) as prof:
        started = time.perf_counter()
        for i in range(num_steps):
            step(i)
        synchronize(device)
        wall = time.perf_counter() - started
    if on_gpu:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    else:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    by_name: dict[str, list[float]] = defaultdict(list)
    for event in kernels:
        by_name[event.name].append(event.time_range.elapsed_us())
    busy_us = sum(sum(times) for times in by_name.values())
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:6]
    step_ms = wall / num_steps * 1e3
    return dict(
        activity="cuda" if on_gpu else "cpu", steps=num_steps, kernels_per_step=round(len(kernels) / num_steps, 1),
        kernel_ms_per_step=round(busy_us / num_steps / 1e3, 3), step_ms=round(step_ms, 3),
        idle_share=round(max(0.0, 1 - busy_us / num_steps / 1e3 / step_ms), 3),
        top=[dict(name=name[:80], per_step=round(len(times) / num_steps, 1),
                  us_per_step=round(sum(times) / num_steps, 1)) for name, times in top],
    )  # fmt: skip


def bench_engine(path: Path, quantization: str, batches: list[int], args: Namespace, device) -> None:  # type: ignore[no-untyped-def]
    import torch

    from backends.engine import cuda
    from backends.engine.cuda.graphs import DecodeGraphs
    from backends.engine.model.attention import AttentionMetadata, allocate_kv_cache
    from backends.engine.model.loader import load_model

    started = time.perf_counter()
    loaded = load_model(path, quantization=quantization, dtype=torch.bfloat16, device=device)
    plain, config = loaded.model, loaded.config
    prompt, steps, block = args.prompt_tokens, args.decode_steps, 16
    per_seq = -(-(prompt + steps + args.profile_steps + 16) // block)
    num_blocks = per_seq * max(batches)
    on_gpu = device.type == "cuda"
    kv = allocate_kv_cache(config, num_blocks + 1, block, torch.bfloat16, device)
    emit(figure="load", quantization=quantization, seconds=round(time.perf_counter() - started, 1))

    def tables(b: int) -> list[list[int]]:
        return [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]

    ids = torch.randint(0, config.vocab_size, (prompt,), device=device)
    pos = torch.arange(prompt, device=device)

    def prefill(m, table: list[int]) -> None:  # type: ignore[no-untyped-def]
        meta = AttentionMetadata.from_lists(query_lens=[prompt], seq_lens=[prompt], block_tables=[table],
                                            block_size=block, device=device)  # fmt: skip
        m.compute_logits(m(ids, pos, meta, kv)[-1:])

    def eager_step(m, tok, positions, lens, slots, tabs):  # type: ignore[no-untyped-def]
        t = torch.tensor
        if m is plain:
            meta = AttentionMetadata.from_lists(query_lens=[1] * len(tok), seq_lens=lens, block_tables=tabs,
                                                block_size=block, device=device)  # fmt: skip
            return m.compute_logits(m(t(tok, device=device), t(positions, device=device), meta, kv))
        hidden = m.decode(t(tok, device=device), t(positions, device=device), t(tabs, device=device),
                          t(lens, device=device), t(slots, device=device), kv)  # fmt: skip
        return m.compute_logits(hidden)

    # the plain path once; the GPU path once per int4 kernel measured (int4 weights only)
    int4_kernels = args.int4_kernels if quantization == "int4" else ["torch"]
    for variant, int4_kernel in enumerate(int4_kernels):
        model = cuda.prepare(plain, use_triton=None if on_gpu else False, max_positions=per_seq * block,
                             int4_kernel=int4_kernel)  # fmt: skip
        tag = dict(quantization=quantization, int4_kernel=int4_kernel)
        for name, m in (("fused", model), ("plain", plain))[: 1 if variant else 2]:
            for _ in range(3):
                prefill(m, tables(1)[0])
            synchronize(device)
            t = time.perf_counter()
            for _ in range(10):
                prefill(m, tables(1)[0])
            synchronize(device)
            emit(figure="prefill", **tag, path=name, tokens=prompt,
                 tokens_per_s=round(prompt * 10 / (time.perf_counter() - t), 1))  # fmt: skip

        graphs = DecodeGraphs(model, kv, max_batch=max(batches), max_blocks_per_seq=per_seq, pad_block=num_blocks)
        if on_gpu:  # uncaptured, ``run`` executes the step eagerly from the same static inputs
            graphs.capture()
        emit(figure="graphs", **tag, buckets=graphs.buckets, capture_s=round(graphs.capture_s, 2),
             mib=round(graphs.memory_bytes / 2**20, 1))  # fmt: skip

        for b in batches:
            tabs = tables(b)
            for table in tabs:
                prefill(model, table)
            modes = ["graphs", "eager"] + (["plain"] if b == 1 and not variant else [])
            for mode in modes:
                tok = torch.randint(0, config.vocab_size, (b,)).tolist()

                def step(p: int, tok: list[int]) -> list[int]:
                    positions, lens = [p] * b, [p + 1] * b
                    slots = [tb[p // block] * block + p % block for tb in tabs]
                    if mode == "graphs":
                        logits = graphs.run(tok, positions, lens, slots, tabs)
                    else:
                        logits = eager_step(model if mode == "eager" else plain, tok, positions, lens, slots, tabs)
                    return logits.argmax(-1).tolist()  # the one host sync of the step

                warm_up = 4
                for i in range(warm_up):
                    tok = step(prompt + i, tok)
                synchronize(device)
                t = time.perf_counter()
                for i in range(warm_up, warm_up + steps):
                    tok = step(prompt + i, tok)
                elapsed = time.perf_counter() - t
                emit(figure="decode", **tag, mode=mode, batch=b, context=prompt,
                     step_ms=round(elapsed / steps * 1e3, 3), tokens_per_s=round(b * steps / elapsed, 1))  # fmt: skip
                if args.profile_steps and (mode == "graphs" or b == batches[0]):  # the rest adds little
                    start = prompt + warm_up + steps
                    emit(figure="profile", **tag, mode=mode, batch=b,
                         **profile(lambda i: step(start + i, tok), args.profile_steps, device))  # fmt: skip
        del graphs, model
        if on_gpu:
            torch.cuda.empty_cache()
    del plain, kv
    if on_gpu:
        torch.cuda.empty_cache()


def bench_hf(path: Path, mode: str, batch: int, args: Namespace, device) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if mode == "compiled":
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, SHAPES[args.shapes]["vocab"], (batch, args.prompt_tokens), device=device)
    n = args.decode_steps

    def generate(tokens: int) -> float:
        synchronize(device)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False)  # fmt: skip
        synchronize(device)
        return time.perf_counter() - t

    started = time.perf_counter()
    generate(n + 1)
    generate(n + 1)  # compiles (first and second call) are not timed
    warm_s = time.perf_counter() - started
    full, one = min(generate(n + 1) for _ in range(2)), min(generate(1) for _ in range(2))
    step = (full - one) / n
    emit(figure="hf", mode=mode, batch=batch, context=args.prompt_tokens, step_ms=round(step * 1e3, 3),
         tokens_per_s=round(batch / step, 1), prefill_tokens_per_s=round(batch * args.prompt_tokens / one, 1),
         warm_up_s=round(warm_s, 1))  # fmt: skip
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":  # python -m bench.gpu: on a device machine without the package installed
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    sys.exit(run(parser.parse_args()))
