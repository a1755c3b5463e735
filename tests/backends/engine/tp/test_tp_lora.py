"""LoRA adapters under tensor parallelism (CPU, gloo, 2 processes) against the single process.

- slicing: each rank's slice of an adapter, summed as the ranks sum (column-parallel outputs
  side by side, row-parallel partial terms added), is the whole adapter's term (no processes);
- a tiny random llama (uneven KV-head split) in float32 with three random adapters (all seven
  modules; q/v/down only; o/gate/up only at another rank), ``max_loras = 2`` so that steps swap
  adapters in and out of every rank: tp=2 logits equal tp=1's within float32 tolerance on steps
  mixing base rows and two adapters, and the engine's greedy tokens are tp=1's;
- served by ``EngineBackend`` with tp=2: an adapter loaded at run time answers as at tp=1, and
  one unloaded with a request in flight lets it finish with tp=1's tokens.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from backends.engine.builder import EngineOptions, build_engine
from backends.engine.lora.adapter import kind_shapes, module_shapes
from backends.engine.lora.options import LoRAOptions
from backends.engine.model.config import ModelConfig
from backends.engine.model.loader import load_model
from backends.engine.tp.engine import build_tp_engine
from backends.engine.tp.lora import shard_adapter
from backends.engine.tp.shard import ShardPlan
from gateway.errors import ModelNotFoundError
from gateway.interface import Delta, GenerationRequest, SamplingParams
from tests.backends.engine.lora.lora_helpers import LoRARunner, load_adapter, with_lora, write_adapter_files
from tests.backends.engine.tp.test_tp import ATOL, RTOL, _assert_workers_gone, _fresh_block_manager, _options, _tiny_dir

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {  # name: (targets, rank, seed)
    "all": (ALL, 8, 1),
    "qvd": (("q_proj", "v_proj", "down_proj"), 4, 2),
    "ogu": (("o_proj", "gate_proj", "up_proj"), 6, 3),
}
PROMPTS = {0: list(range(3, 10)), 1: [17, 200, 5, 9, 9, 31, 77, 120], 2: [40, 41, 42, 43, 44], 3: [250, 8, 64, 1],
           4: [90, 91, 92, 93, 94, 95]}  # fmt: skip
# each sequence's adapter; with max_loras = 2 the steps below swap "all" out and in again
SEQ_ADAPTER = {0: "all", 1: None, 2: "qvd", 3: "ogu", 4: "all"}
STEPS = [
    [(0, PROMPTS[0]), (1, PROMPTS[1]), (2, PROMPTS[2])],  # all + qvd + base
    [(2, [11]), (3, PROMPTS[3]), (1, [12])],  # qvd + ogu + base: "all" leaves every rank
    [(0, [13]), (3, [14])],  # all + ogu: "all" comes back, "qvd" leaves
    [(4, PROMPTS[4]), (1, [15]), (0, [16])],  # all + base
]


def _adapter_dir(root: Path, config: ModelConfig, name: str) -> Path:
    targets, r, seed = ADAPTERS[name]
    # std: far enough from the base that greedy tokens change (checked below)
    return write_adapter_files(root / name, module_shapes(config), config.num_layers, targets=targets, r=r, seed=seed,
                               alpha=2 * r, std=0.15)  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = _tiny_dir(tmp_path_factory, "llama")
    reference = load_model(path, dtype=torch.float32)
    root = tmp_path_factory.mktemp("adapters")
    dirs = {name: _adapter_dir(root, reference.config, name) for name in ADAPTERS}
    return path, reference, dirs, with_lora(reference, max_loras=2)


@pytest.fixture(scope="module")
def tp_engine(tiny):  # type: ignore[no-untyped-def]
    path = tiny[0]
    engine = build_tp_engine(_options(path, lora=LoRAOptions(max_loras=2)))
    try:
        yield engine
    finally:
        pids = engine.worker_pids
        engine.close()
        _assert_workers_gone(pids)


def _adapters(config: ModelConfig, dirs: dict[str, Path]) -> dict[str, object]:
    return {name: load_adapter(dirs[name], config, lora_id=100 + i, dtype=torch.float32) for i, name in enumerate(ADAPTERS)}


# --------------------------------------------------------------------------------------------
# slicing (no processes)


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_slices_sum_to_the_whole_adapter(tiny, world_size: int) -> None:
    _, reference, dirs, _ = tiny
    config = reference.config
    adapter = load_adapter(dirs["all"], config, lora_id=1, dtype=torch.float32)
    plans = [ShardPlan.build(config, r, world_size) for r in range(world_size)]
    slices = [shard_adapter(adapter, plan=p, config=config) for p in plans]
    gen = torch.Generator().manual_seed(0)
    for kind, (in_f, _) in kind_shapes(config).items():
        a, bt = adapter.layers[1][kind]
        x = torch.randn(5, in_f, generator=gen)
        whole = x @ a.t() @ bt
        if kind in ("qkv", "gate_up"):  # column parallel: each rank's output columns
            rows = {"qkv": ShardPlan.qkv_rows, "gate_up": ShardPlan.gate_up_rows}[kind]
            for plan, s in zip(plans, slices, strict=True):
                sa, sbt = s.layers[1][kind]
                expect = torch.cat([whole[:, start:stop] for start, stop in rows(plan, config)], dim=1)
                torch.testing.assert_close(x @ sa.t() @ sbt, expect, atol=1e-5, rtol=1e-5)
        else:  # row parallel: the ranks' partial terms on their input columns add up
            cols = [p.attn_cols(config) if kind == "o" else p.ffn for p in plans]
            total = sum(x[:, start:stop] @ s.layers[1][kind][0].t() @ s.layers[1][kind][1]
                        for (start, stop), s in zip(cols, slices, strict=True))  # fmt: skip
            torch.testing.assert_close(total, whole, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# two processes


def _runner(model, config, slots, adapters) -> LoRARunner:  # type: ignore[no-untyped-def]
    runner = LoRARunner(SimpleNamespace(model=model, config=config, dtype=torch.float32), slots, num_blocks=64, block_size=4, seed=1)
    runner.adapters.update({i: None if name is None else adapters[name] for i, name in SEQ_ADAPTER.items()})
    return runner


def test_tp2_logits_equal_tp1_on_steps_mixing_base_and_adapters(tiny, tp_engine) -> None:  # type: ignore[no-untyped-def]
    _, reference, dirs, ref_slots = tiny
    adapters = _adapters(reference.config, dirs)
    ref_runner = _runner(reference.model, reference.config, ref_slots, adapters)
    ref = [torch.cat(ref_runner.step(step)) for step in STEPS]
    sender = tp_engine.runner.model.lora
    tp_runner = _runner(tp_engine.runner.model, tp_engine.runner.config, tp_engine.runner.lora_slots, adapters)
    ours, held = [], []
    for step in STEPS:
        ours.append(torch.cat(tp_runner.step(step)))
        held.append({a.name for a in adapters.values() if a.lora_id in sender.held})
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, s=step: f"step {s}: {m}")
    # the other rank held what rank 0's slots held: adapters went out of it and back in
    assert held == [{"all", "qvd"}, {"qvd", "ogu"}, {"all", "ogu"}, {"all", "ogu"}]
    # the adapters matter: the base model's logits are far from the adapted rows'
    base_runner = _runner(reference.model, reference.config, ref_slots, dict.fromkeys(ADAPTERS))
    base = torch.cat(base_runner.step(STEPS[0]))
    assert (base - ref[0]).abs().max() > 100 * ATOL


def _greedy(engine, requests: dict[str, tuple[list[int], object]], max_tokens: int = 8) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    for request_id, (prompt, adapter) in requests.items():
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        engine.add_request(request_id, prompt, sampling, lora=adapter)
    tokens: dict[str, list[int]] = {request_id: [] for request_id in requests}
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id].extend(t for item in output.items for t in getattr(item, "token_ids", ()))
    return tokens


def test_tp2_engine_greedy_tokens_equal_tp1(tiny, tp_engine) -> None:  # type: ignore[no-untyped-def]
    path, _, dirs, _ = tiny
    _fresh_block_manager(tp_engine)  # the logits test wrote cache blocks behind its back
    single = build_engine(_options(path, tensor_parallel=1, lora=LoRAOptions(max_loras=2)))
    results = []
    for engine in (single, tp_engine):
        adapters = _adapters(engine.model_config, dirs)
        # two adapters and base rows in one batch (max_loras = 2: "ogu" waits for a slot)
        requests = {f"r{i}": (PROMPTS[i], None if name is None else adapters[name]) for i, name in SEQ_ADAPTER.items()}
        requests["r5"] = (PROMPTS[1], adapters["ogu"])
        results.append(_greedy(engine, requests))
    assert results[1] == results[0]
    assert results[0]["r1"] != results[0]["r5"]  # same prompt, base vs adapter: the adapter changes the answer


# --------------------------------------------------------------------------------------------
# served: adapters loaded and unloaded at run time


def _request(model: str, adapter: str | None, max_tokens: int = 10) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return GenerationRequest(request_id=f"r{time.monotonic_ns()}", model=model, prompt="hello there", sampling=sampling,
                             adapter=adapter)  # fmt: skip


async def _text(stream) -> str:  # type: ignore[no-untyped-def]
    return "".join([item.text async for item in stream if isinstance(item, Delta)])


async def test_tp2_backend_loads_and_unloads_adapters_at_run_time(tiny) -> None:  # type: ignore[no-untyped-def]
    from backends.engine.backend import EngineBackend

    path, _, dirs, _ = tiny

    async def started(tp: int) -> EngineBackend:
        lora = LoRAOptions(max_loras=1, adapters={"all": str(dirs["all"])})
        backend = EngineBackend("m", _options(path, tensor_parallel=tp, lora=lora))
        await backend.start()
        while not backend.ready().ready:
            assert not backend.ready().failed, backend.ready().detail
            await asyncio.sleep(0.05)
        await backend.load_adapter("qvd", str(dirs["qvd"]))
        return backend

    answers = []
    for tp in (1, 2):
        backend = await started(tp)
        try:
            got = {name: await _text(backend.generate(_request("m", name))) for name in (None, "all", "qvd")}
            # "all" unloaded with a request in flight: the request finishes as it would have
            stream = backend.generate(_request("m", "all", max_tokens=12))
            first = await anext(stream)
            await backend.unload_adapter("all")
            assert backend.adapters() == ("qvd",)
            got["all-in-flight"] = first.text + await _text(stream)
            with pytest.raises(ModelNotFoundError):
                await _text(backend.generate(_request("m", "all")))
            got["qvd-again"] = await _text(backend.generate(_request("m", "qvd")))
            answers.append(got)
        finally:
            await backend.stop()
    assert answers[1] == answers[0]
    assert len({answers[0][k] for k in (None, "all", "qvd")}) == 3  # each adapter answers its own way
