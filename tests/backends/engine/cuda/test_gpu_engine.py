"""The engine wired for a GPU (``GpuCausalLM`` + ``ModelRunner(decode_graphs=...)``) generates what
the CPU engine generates. On the CPU the GPU forward's torch definitions run in float32 through the
graphs' static inputs (uncaptured), so the runner's choice between graph steps and eager steps,
bucket padding and the pad block are exercised on every machine."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from backends.engine import cuda
from backends.engine.builder import EngineOptions, build_engine, kv_cache_layout, make_scheduler
from backends.engine.engine import LLMEngine
from backends.engine.model.loader import load_model
from backends.engine.runner.model_runner import ModelRunner
from backends.engine.text.tokenizer import Tokenizer
from bench.synthetic import write_random_llama
from gateway.interface import Delta, SamplingParams

REQUESTS = {f"r{i}": (list(range(20 + i, 20 + i + n)), m) for i, (n, m) in enumerate(
    [(3, 12), (17, 5), (40, 20), (1, 9), (9, 16), (25, 3), (6, 14)]
)}  # fmt: skip


def run(engine: LLMEngine) -> tuple[dict[str, list[int]], int]:
    for rid, (ids, max_tokens) in REQUESTS.items():
        engine.add_request(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    tokens: dict[str, list[int]] = {rid: [] for rid in REQUESTS}
    graph_steps = 0
    while engine.has_unfinished():
        before = engine.runner.graphs.replays if getattr(engine.runner, "graphs", None) else 0
        for out in engine.step():
            for item in out.items:
                if isinstance(item, Delta):
                    tokens[out.request_id].extend(item.token_ids)
        if getattr(engine.runner, "graphs", None):
            graph_steps += engine.runner.graphs.replays - before
    return tokens, graph_steps


def test_gpu_wired_engine_on_cpu_generates_what_the_cpu_engine_does() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_llama(Path(tmp) / "m", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                                  vocab=300, seed=5, tokenizer=True)  # fmt: skip
        options = EngineOptions(model=str(path), dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
                                kv_cache_tokens=512, native_kernels=False, enable_prefix_caching=False)  # fmt: skip
        expected, _ = run(build_engine(options))
        loaded = load_model(path, quantization=options.quantization, dtype=torch.float32)
        tokenizer = Tokenizer.load(path)
    layout = kv_cache_layout(loaded.config, options, 4)
    runner = ModelRunner(
        cuda.prepare(loaded.model, use_triton=False), loaded.config, num_blocks=layout.num_blocks,
        block_size=layout.block_size, dtype=torch.float32, decode_graphs=options.max_num_seqs,
        max_model_len=layout.max_model_len,
    )  # fmt: skip
    engine = LLMEngine(make_scheduler(options, layout, tokenizer.eos_token_ids), runner, tokenizer)
    got, graph_steps = run(engine)
    assert got == expected
    assert all(len(got[rid]) == m for rid, (_, m) in REQUESTS.items())
    assert graph_steps > 10  # most steps were decode-only and went through the graphs' inputs
