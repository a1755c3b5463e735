"""``estimate_memory``: what a model will hold, from its header alone, against what loading it
really holds — the bytes of the loaded tensors exactly (tiny models, every form the loader keeps),
and (slow) the resident memory of the real default model served in a fresh process.

Also the engine backend's ``stop``: the model's memory goes back to the OS, and ``start`` loads
it again to the same greedy output (slow, fresh processes: RSS is per process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from backends.engine.builder import EngineOptions
from backends.engine.memory import BASE_OVERHEAD, estimate_memory
from backends.engine.model.loader import load_model
from gateway.errors import ConfigError
from tests.backends.engine.engine_helpers import make_hf_model, save_hf, write_gguf
from tests.backends.engine.prequant_tools import write_awq, write_gptq

REPO = Path(__file__).resolve().parents[3]


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's distinct tensors (a tied head shares the embedding's storage)."""
    seen: dict[int, int] = {}
    for _, t in [*model.named_parameters(), *model.named_buffers()]:
        if t is not None:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    llama = make_hf_model("llama")
    mixtral = make_hf_model("mixtral")
    return {
        "hf-mixtral": save_hf(mixtral, root / "mixtral"),  # 4 experts a layer, each counted
        "gguf-mixtral-q8_0": write_gguf(mixtral, root / "mixtral.gguf", QT.Q8_0),  # experts stacked
        "hf-llama": save_hf(llama, root / "llama"),
        "hf-qwen2": save_hf(make_hf_model("qwen2"), root / "qwen2"),  # tied, q/k/v bias
        "gguf-q4_0": write_gguf(llama, root / "q4_0.gguf", QT.Q4_0),
        "gguf-q4_1-q8": write_gguf(llama, root / "q4_1.gguf", QT.Q4_1, embed_type=QT.Q8_0),
        "gguf-q8_0": write_gguf(llama, root / "q8_0.gguf", QT.Q8_0),
        "gguf-f16": write_gguf(llama, root / "f16.gguf", QT.F16),
        "gguf-q5_1": write_gguf(llama, root / "q5_1.gguf", QT.Q5_1, embed_type=QT.Q8_0),  # int8 + offsets
        "hf-awq": write_awq(llama, root / "awq")[0],  # int4 in groups of 128
        "hf-gptq-per-row": write_gptq(llama, root / "gptq", group_size=-1)[0],  # rows of 128 and 256: groups of 128
    }


@pytest.mark.parametrize(
    ("model", "quantization", "dtype"),
    [
        ("hf-llama", None, "bfloat16"),  # dense
        ("hf-llama", "int4", "bfloat16"),  # int4, the vocabulary int8 per channel
        ("hf-qwen2", "int8", "float32"),  # int8 per channel, tied, q/k/v bias
        ("gguf-q4_1-q8", None, "bfloat16"),  # int4 from Q4_1, per-group int8 from Q8_0
        ("gguf-q8_0", "int4", "float32"),  # per-group int8 kept
        ("gguf-f16", "int8", "bfloat16"),
        ("gguf-q4_0", "none", "bfloat16"),  # dequantised
        ("gguf-q5_1", None, "bfloat16"),  # per-group int8 with a float32 offset per group
        ("hf-awq", None, "bfloat16"),
        ("hf-gptq-per-row", None, "float32"),
        ("hf-mixtral", "int4", "bfloat16"),  # every expert int4, the router float32
        ("gguf-mixtral-q8_0", None, "float32"),  # stacked experts, one module each
    ],
)
def test_weights_match_the_loaded_tensors(tiny, model, quantization, dtype) -> None:
    """torch's layouts (no native kernels): every byte of the loaded model accounted for, within
    the few bytes a norm's float32 copy or padding may differ by (1 %)."""
    path = tiny[model]
    options = EngineOptions(model=str(path), quantization=quantization, dtype=dtype)
    estimate = estimate_memory(path, options)
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    loaded = load_model(path, quantization=quantization, dtype=torch_dtype)
    actual = held_bytes(loaded.model)
    assert abs(estimate.weights - actual) <= 0.01 * actual, (estimate.weights, actual)


def test_kv_cache_and_overhead_follow_the_options(tiny) -> None:
    path = tiny["hf-llama"]
    small = estimate_memory(path, EngineOptions(model=str(path), kv_cache_tokens=1024))
    big = estimate_memory(path, EngineOptions(model=str(path), kv_cache_tokens=4096, max_num_seqs=64))
    # 2 layers x (k, v) x 2 kv heads x head_dim 32 x bfloat16 per token
    assert small.kv_cache == 1024 * 2 * 2 * 2 * 32 * 2
    assert big.kv_cache == 4 * small.kv_cache
    by_budget = estimate_memory(path, EngineOptions(model=str(path), kv_cache_memory_mb=1.0))
    assert by_budget.kv_cache == 2**20
    assert BASE_OVERHEAD < small.overhead < big.overhead
    assert small.total == small.weights + small.kv_cache + small.overhead


def test_unreadable_and_unsupported_files_are_config_errors(tmp_path, tiny) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ConfigError, match="cannot read GGUF"):
        estimate_memory(bad, EngineOptions(model=str(bad)))
    import gguf
    import numpy as np

    tq2 = tmp_path / "tq2.gguf"  # a type the engine does not decode: ternary TQ2_0, 66 bytes per 256 weights
    writer = gguf.GGUFWriter(str(tq2), "llama")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((64, 66), dtype=np.uint8), raw_dtype=QT.TQ2_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="has type TQ2_0"):
        estimate_memory(tq2, EngineOptions(model=str(tq2)))


def test_backend_declares_before_loading(tiny) -> None:
    from backends.engine.backend import EngineBackend

    path = tiny["gguf-q4_1-q8"]
    backend = EngineBackend("m", EngineOptions(model=str(path)))
    started = time.perf_counter()
    required = backend.memory_required()
    assert time.perf_counter() - started < 0.5  # the header only
    assert required == estimate_memory(path, backend.options).total
    assert backend.memory_bytes() == 0  # not loaded


# -- the real default model, in fresh processes ----------------------------------------------------

SERVE = textwrap.dedent(
    """
    import json, sys
    import psutil, torch
    from backends.engine.builder import EngineOptions, build_engine, load_kernels, resolve_model_path
    from backends.engine.memory import estimate_memory
    from gateway.interface import SamplingParams
    options = EngineOptions(**json.loads(sys.argv[1]))
    load_kernels(options)  # the runtime (torch, the kernels' library) is not the model's
    torch.set_num_threads(2)
    estimate = estimate_memory(resolve_model_path(options), options)
    proc = psutil.Process()
    before = proc.memory_info().rss
    engine = build_engine(options)
    for i in range(options.max_num_seqs):  # one step with every sequence: the overhead's share
        prompt = engine.tokenizer.encode(f"Tell me a story about the number {i}. " * 4)
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=4, temperature=0))
    while engine.has_unfinished():
        engine.step()
    print(json.dumps({"estimate": estimate.total, "served": proc.memory_info().rss - before}))
    """
)


@pytest.mark.slow
def test_estimate_matches_the_served_default_model_with_a_small_cache(smollm2_path) -> None:
    """The resident memory a served model adds (RSS after a step of every sequence minus RSS
    before loading) is the estimate within 20 %: here with a small KV cache, where the weights and
    the overhead weigh most (measured: +2 to +3 %); the defaults are measured by the unload test below.
    Not float32 activations over quantized weights: their dequantised transients stay resident or
    not as glibc decides (448 to 553 MiB measured for one setting), and the estimate takes the most."""
    options = {"kv_cache_tokens": 2048, "max_num_seqs": 4}
    out = subprocess.run(
        [sys.executable, "-c", SERVE, json.dumps(options)], capture_output=True, text=True, cwd=REPO, check=True
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(m["estimate"] - m["served"]) <= 0.2 * m["served"], m


UNLOAD = textwrap.dedent(
    """
    import asyncio, json
    import psutil, torch  # imported before measuring: the runtime, like the kernels' library
    from backends.engine.backend import EngineBackend
    from backends.engine.builder import EngineOptions, load_kernels
    from gateway.interface import ChatMessage, Delta, GenerationRequest, SamplingParams

    options = EngineOptions(threads=2)
    load_kernels(options)
    proc = psutil.Process()
    request = GenerationRequest(
        request_id="r", model="m", messages=(ChatMessage(role="user", content="Name three colours."),),
        sampling=SamplingParams(max_tokens=16, temperature=0),
    )

    async def serve(backend):
        await backend.start()
        while not backend.ready().ready:
            assert not backend.ready().failed, backend.ready().detail
            await asyncio.sleep(0.05)
        return "".join([item.text async for item in backend.generate(request) if isinstance(item, Delta)])

    async def main():
        backend = EngineBackend("m", options)
        m = {"required": backend.memory_required(), "before": proc.memory_info().rss}
        m["first"] = await serve(backend)
        m["loaded"], m["held"] = proc.memory_info().rss, backend.memory_bytes()
        await backend.stop()
        m["unloaded"], m["held_after"], m["state"] = proc.memory_info().rss, backend.memory_bytes(), backend.ready().detail
        m["second"] = await serve(backend)
        m["reloaded"] = proc.memory_info().rss
        await backend.stop()
        print(json.dumps(m))

    asyncio.run(main())
    """
)


@pytest.mark.slow
def test_stop_frees_the_model_and_start_reloads_it(smollm2_path) -> None:
    """start → generate → stop → start → generate on the default model in a fresh process: the
    served model's RSS is its declared estimate within 20 % (measured 530 MB served, 540 MB
    declared); stop gives back at least 80 % of it (measured 94 %) and reports it unloaded;
    the reloaded model answers the same greedy text."""
    out = subprocess.run([sys.executable, "-c", UNLOAD], capture_output=True, text=True, cwd=REPO, check=True)
    m = json.loads(out.stdout.strip().splitlines()[-1])
    served = m["loaded"] - m["before"]
    assert abs(m["required"] - served) <= 0.2 * served, m
    assert m["held"] == m["required"] and m["held_after"] == 0 and m["state"] == "unloaded", m
    assert m["loaded"] - m["unloaded"] >= 0.8 * served, m
    assert m["first"] and m["second"] == m["first"], m
    assert abs(m["reloaded"] - m["loaded"]) <= 0.2 * served, m  # nothing left behind by the first load


async def test_stop_ends_a_running_stream_and_start_serves_again(tmp_path) -> None:
    """A tiny model in this process: a stream still running when the model is stopped ends with a
    503 (never hangs); the stopped model is unloaded, holds nothing, and a start serves again."""
    import asyncio

    from backends.engine.backend import EngineBackend
    from bench.synthetic import write_random_llama
    from gateway.errors import ServiceUnavailableError
    from gateway.interface import Delta, GenerationRequest, SamplingParams

    path = write_random_llama(tmp_path / "m", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=320,
                              tokenizer=True)  # fmt: skip
    backend = EngineBackend("m", EngineOptions(model=str(path), kv_cache_tokens=2048))

    async def started() -> None:
        await backend.start()
        while not backend.ready().ready:
            assert not backend.ready().failed, backend.ready().detail
            await asyncio.sleep(0.02)

    def request(max_tokens: int) -> GenerationRequest:
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return GenerationRequest(request_id="r", model="m", prompt="hello there", sampling=sampling)

    async def greedy() -> str:
        return "".join([item.text async for item in backend.generate(request(8)) if isinstance(item, Delta)])

    await started()
    first = await greedy()
    assert backend.memory_bytes() == backend.memory_required() > 0
    stream = backend.generate(request(1000))  # of the 1024-token context: still running when stopped
    await anext(stream)
    stopping = asyncio.create_task(backend.stop())
    with pytest.raises(ServiceUnavailableError, match="unloaded"):
        async for _ in stream:
            pass
    await stopping
    assert backend.ready().detail == "unloaded" and backend.memory_bytes() == 0
    with pytest.raises(ServiceUnavailableError, match="not ready"):
        await greedy()
    await started()
    assert await greedy() == first
    await backend.stop()
