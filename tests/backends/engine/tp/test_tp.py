"""Tensor parallelism (CPU, gloo, 2 processes) against the single-process engine.

- sharding plans and slices of every linear kind, against dense references (no processes);
- tiny random models (dense, int4, int8; uneven KV-head split, bias, tied and untied output;
  gemma2 and gemma3 with sliding windows the prompts outgrow; two mixtures of experts, every expert
  sliced, the router replicated): tp=2 logits equal tp=1's within
  float32 tolerance through prefill, chunked prefill and decode, greedy tokens identical;
  each rank holds about half the weights;
- failure: a killed worker or a hung one makes the step raise (within the collective timeout),
  ``recover()`` brings a new world that serves, ``close()`` leaves no process behind;
- SmolLM2 Q4_1 (slow): logits within tolerance, greedy tokens identical on 10 prompts, memory per
  rank, and the whole thing served by ``taxiway serve`` to the ``openai`` client, a worker
  SIGKILLed mid-request (503), then recovery.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import msgspec
import pytest
import torch

from backends.engine.builder import EngineOptions, build_engine
from backends.engine.model.loader import load_model
from backends.engine.model.quant import ConcatLinear, DenseLinear, Int4Linear, Int8Linear, quantize_int4, quantize_int8
from bench.synthetic import write_byte_tokenizer
from backends.engine.tp.engine import TorchrunEnv, TPWorkerError, build_tp_engine
from backends.engine.tp.shard import (
    ShardPlan,
    column_slice,
    plan_heads,
    row_slice,
    split_evenly,
    weight_bytes,
)
from tests.backends.engine.engine_helpers import PagedRunner, make_hf_model, save_hf
from gateway.errors import ConfigError
from gateway.interface import SamplingParams

# float32 activations: only the all-reduce's summation order differs from tp=1
ATOL, RTOL = 1e-4, 1e-4

# uneven on 2 ranks: 3 KV heads of 2 q heads each, head_dim 32
TINY_TP = dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=3, vocab_size=320)

SEQS = {0: list(range(3, 10)), 1: [17, 200, 5, 9, 9, 31, 77, 120, 64, 1, 2, 250, 8], 2: [40, 41, 42, 43, 44]}
STEPS = [
    [(0, SEQS[0]), (1, SEQS[1][:8])],
    [(0, [11]), (1, SEQS[1][8:]), (2, SEQS[2])],
    [(2, [99]), (0, [12]), (1, [13])],
    [(1, [14]), (2, [100]), (0, [15])],
]


def _tiny_dir(tmp_path_factory: pytest.TempPathFactory, arch: str, **overrides: object) -> Path:
    path = save_hf(make_hf_model(arch, **{**TINY_TP, **overrides}), tmp_path_factory.mktemp(f"tiny-tp-{arch}"))
    write_byte_tokenizer(path)
    return path


def _options(path: Path, **kw: object) -> EngineOptions:
    base = dict(
        model=str(path), tensor_parallel=2, dtype="float32", threads=1, block_size=4, kv_cache_tokens=256,
        max_num_seqs=8, max_num_batched_tokens=64,
    )  # fmt: skip
    return EngineOptions(**{**base, **kw})  # type: ignore[arg-type]


def _run_steps(model, config, block_size=4, dtype=torch.float32) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    runner = PagedRunner(model, config, num_blocks=64, block_size=block_size, dtype=dtype, seed=1)
    return [torch.cat(runner.step(step)) for step in STEPS]


def _fresh_block_manager(engine, num_blocks: int | None = None) -> None:  # type: ignore[no-untyped-def]
    """An empty prefix cache (``_run_steps`` writes cache blocks behind the block manager's back),
    optionally with fewer blocks than the cache holds (to force preemption)."""
    from backends.engine.sched.block_manager import BlockManager

    bm = engine.scheduler.block_manager
    engine.scheduler.block_manager = BlockManager(num_blocks or bm.num_blocks, bm.block_size, bm.enable_prefix_caching)


def _assert_workers_gone(pids: list[int], timeout: float = 10.0) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    alive = pids
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.1)
    raise AssertionError(f"worker processes still alive: {alive}")


# --------------------------------------------------------------------------------------------
# plans and slices (no processes)


def test_split_evenly_gives_the_first_ranks_the_remainder() -> None:
    assert split_evenly(3, 2) == [(0, 2), (2, 3)]
    assert split_evenly(1536, 2, 32) == [(0, 768), (768, 1536)]
    assert split_evenly(96, 3, 32) == [(0, 32), (32, 64), (64, 96)]


def test_head_plans_keep_whole_gqa_groups() -> None:
    # SmolLM2: 9 q heads over 3 KV heads on 2 ranks -> 2 groups + 1 group
    assert plan_heads(9, 3, 2) == [((0, 6), (0, 2)), ((6, 9), (2, 3))]
    assert plan_heads(9, 3, 3) == [((0, 3), (0, 1)), ((3, 6), (1, 2)), ((6, 9), (2, 3))]
    # more ranks than KV heads: each KV head replicated, its q heads split
    assert plan_heads(8, 2, 4) == [((0, 2), (0, 1)), ((2, 4), (0, 1)), ((4, 6), (1, 2)), ((6, 8), (1, 2))]
    with pytest.raises(Exception, match="cannot split"):
        plan_heads(9, 3, 4)


def test_smollm2_shapes_split_on_int4_group_boundaries() -> None:
    from backends.engine.model.config import ModelConfig

    config = ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=8192,
        tie_word_embeddings=True,
    )  # fmt: skip
    plans = [ShardPlan.build(config, r, 2, ffn_unit=32) for r in range(2)]
    assert [p.q_heads for p in plans] == [(0, 6), (6, 9)]
    assert [(p.q_heads[1] - p.q_heads[0]) * 64 % 32 for p in plans] == [0, 0]  # o_proj input slices
    assert [p.ffn for p in plans] == [(0, 768), (768, 1536)]
    assert [p.vocab for p in plans] == [(0, 24576), (24576, 49152)]


def _linears() -> dict[str, torch.nn.Module]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(192, 128, generator=gen)
    bias = torch.randn(192, generator=gen)
    f32 = torch.float32
    return {
        "dense": DenseLinear.from_data(w, bias=bias, dtype=f32),
        "int4": Int4Linear.from_data(quantize_int4(w), bias=bias, dtype=f32),
        "int8-channel": Int8Linear.from_data(quantize_int8(w), dtype=f32),
        "int8-group": Int8Linear.from_data(quantize_int8(w, 32), dtype=f32),
        "concat": ConcatLinear(
            [
                Int4Linear.from_data(quantize_int4(w[:64]), dtype=f32),
                Int8Linear.from_data(quantize_int8(w[64:]), dtype=f32),
            ]
        ),
    }


@pytest.mark.parametrize("kind", ["dense", "int4", "int8-channel", "int8-group", "concat"])
def test_slices_compute_what_the_same_rows_and_columns_compute_whole(kind: str) -> None:
    module = _linears()[kind]
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    full = module(x)
    ranges = [(0, 32), (96, 160)]
    cols = column_slice(module, ranges, torch.device("cpu"))
    torch.testing.assert_close(cols(x), torch.cat([full[:, a:b] for a, b in ranges], dim=-1), atol=1e-5, rtol=1e-5)
    # row parallel: the partial products of two column ranges add up to the whole (bias once)
    parts = [row_slice(module, a, b, torch.device("cpu"), keep_bias=a == 0) for a, b in [(0, 64), (64, 128)]]
    total = parts[0](x[:, :64]) + parts[1](x[:, 64:])
    torch.testing.assert_close(total, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits, zeros", [(5, False), (5, True), (6, False)])
def test_native_five_and_six_bit_slices_compute_the_whole(bits: int, zeros: bool) -> None:
    """``Int5Linear`` / ``Int6Linear`` (GGUF Q5_0, Q5_1, Q6_K) sliced as tensor parallelism slices
    them: a column slice's rows are the whole's exactly (a row's sum does not depend on the
    others), the row slices' partial products add up to the whole within bfloat16 rounding."""
    from backends.engine.model.quant import Int5Linear, Int8Data, make_linear
    from tests.backends.engine.engine_helpers import default_kernels

    kernels = default_kernels()
    if kernels is None or not kernels.has_int5_matmul:
        pytest.skip("this machine builds no native int5/int6 kernel")
    gen = torch.Generator().manual_seed(bits + zeros)
    half = 1 << (bits - 1)
    data = Int8Data(
        q=torch.randint(-half, half, (192, 128), dtype=torch.int8, generator=gen),
        scales=torch.rand(192, 8, generator=gen) * 0.01, group_size=16,
        zeros=torch.randn(192, 8, generator=gen) * 0.01 if zeros else None,
    )  # fmt: skip
    module = make_linear(data, dtype=torch.bfloat16, kernels=kernels)
    assert isinstance(module, Int5Linear) and module.BITS == bits
    x = torch.randn(5, 128, generator=gen).bfloat16()
    full = module(x)
    ranges = [(0, 32), (96, 160)]
    cols = column_slice(module, ranges, torch.device("cpu"))
    assert isinstance(cols, type(module))
    assert torch.equal(cols(x), torch.cat([full[:, a:b] for a, b in ranges], dim=-1))
    parts = [row_slice(module, a, b, torch.device("cpu"), keep_bias=a == 0) for a, b in [(0, 64), (64, 128)]]
    total = parts[0](x[:, :64]).float() + parts[1](x[:, 64:]).float()
    torch.testing.assert_close(total, full.float(), atol=2e-2 * full.float().abs().max().item(), rtol=0)


def test_row_slice_inside_a_quantization_group_is_refused() -> None:
    with pytest.raises(Exception, match="quantization group"):
        row_slice(_linears()["int4"], 0, 48, torch.device("cpu"), keep_bias=True)


def test_torchrun_env_reads_the_variables_torchrun_sets() -> None:
    assert TorchrunEnv.from_environ({"PATH": "/bin"}) is None
    env = TorchrunEnv.from_environ(
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
         "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2"}
    )  # fmt: skip
    assert env is not None and (env.rank, env.world_size, env.master_port) == (1, 2, 29500)
    spec = env.spec(_options(Path("/m")), "/m", 30.0)
    assert spec.store_prefix == "taxiway-tp/attempt-2" and not spec.store_is_master and spec.loopback
    alone = TorchrunEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert alone is not None and (alone.local_rank, alone.use_agent_store, alone.restart_count) == (3, False, 0)
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        TorchrunEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "x"})


# --------------------------------------------------------------------------------------------
# tiny models over two processes


@pytest.fixture(
    scope="module",
    params=[("llama", None), ("qwen2", "int4"), ("llama", "int8"), ("gemma2", None), ("gemma3", None),
            ("mixtral", None), ("qwen3_moe", "int4")],
    ids=str,
)
def tiny_tp(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    arch, quantization = request.param
    path = _tiny_dir(tmp_path_factory, arch)
    engine = build_tp_engine(_options(path, quantization=quantization))
    try:
        reference = load_model(path, quantization=quantization, dtype=torch.float32)
        yield engine, reference
    finally:
        pids = engine.worker_pids
        engine.close()
        _assert_workers_gone(pids)


def test_tiny_tp2_logits_equal_tp1(tiny_tp) -> None:  # type: ignore[no-untyped-def]
    engine, reference = tiny_tp
    ours = _run_steps(engine.runner.model, engine.runner.config)
    ref = _run_steps(reference.model, reference.config)
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, s=step: f"step {s}: {m}")


def test_tiny_tp2_greedy_tokens_equal_tp1(tiny_tp) -> None:  # type: ignore[no-untyped-def]
    """The engine at tp=2 generates greedily what the tp=1 model does (gemma: a prompt of 9 and 8
    new tokens outgrow its sliding window of 4)."""
    engine, reference = tiny_tp
    _fresh_block_manager(engine)
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    tokens = _generate(engine, prompt, max_tokens=8)
    runner = PagedRunner(reference.model, reference.config, num_blocks=64, block_size=4, seed=1)
    expected, step = [], prompt
    for _ in range(len(tokens)):
        expected.append(int(runner.step([(0, step)])[0][-1].argmax()))
        step = [expected[-1]]
    assert tokens == expected


def test_tiny_each_rank_holds_about_half_the_weights(tiny_tp) -> None:  # type: ignore[no-untyped-def]
    engine, reference = tiny_tp
    total = weight_bytes(reference.model)
    per_rank = engine.rank_weight_bytes
    assert len(per_rank) == 2
    assert all(b < 0.62 * total for b in per_rank), (per_rank, total)
    assert sum(per_rank) == pytest.approx(total, rel=0.05)  # only norms and rotary tables are replicated


def test_tiny_bfloat16_tp2_tracks_tp1(tmp_path_factory) -> None:  # type: ignore[no-untyped-def]
    """The serving dtype: packed int4 kernels, float32 residual stream, logits refined in float32.
    Each partial sum is rounded to bfloat16 before the all-reduce, so: close, not equal."""
    path = _tiny_dir(tmp_path_factory, "qwen2")
    engine = build_tp_engine(_options(path, quantization="int4", dtype="bfloat16"))
    try:
        reference = load_model(path, quantization="int4", dtype=torch.bfloat16)
        ours = _run_steps(engine.runner.model, engine.runner.config, dtype=torch.bfloat16)
        ref = _run_steps(reference.model, reference.config, dtype=torch.bfloat16)
        for a, b in zip(ours, ref, strict=True):
            assert (a - b).abs().max() <= 0.05 * b.abs().max()
        _fresh_block_manager(engine)
        assert len(_generate(engine, [5, 6, 7, 8])) == 6
    finally:
        pids = engine.worker_pids
        engine.close()
        _assert_workers_gone(pids)


# --------------------------------------------------------------------------------------------
# failure and recovery


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return _tiny_dir(tmp_path_factory, "llama")


def _generate(engine, prompt: list[int], max_tokens: int = 6) -> list[int]:  # type: ignore[no-untyped-def]
    engine.add_request(f"r{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
    tokens: list[int] = []
    while engine.has_unfinished():
        for output in engine.step():
            tokens.extend(t for item in output.items for t in getattr(item, "token_ids", ()))
    return tokens


def test_killed_worker_fails_the_step_and_recover_restores_service(tiny_dir: Path) -> None:
    engine = build_tp_engine(_options(tiny_dir), collective_timeout_s=10)
    pids = list(engine.worker_pids)
    try:
        before = _generate(engine, [5, 6, 7, 8])
        # dead while idle: noticed by its exit before the step touches the network
        os.kill(pids[0], signal.SIGKILL)
        time.sleep(0.5)  # let it exit
        engine.add_request("doomed", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0))
        with pytest.raises(TPWorkerError, match="exited"):
            engine.step()
        engine.recover()
        assert engine.num_requests == 0 and not engine.has_unfinished()
        assert engine.worker_pids != pids
        pids += engine.worker_pids
        assert _generate(engine, [5, 6, 7, 8]) == before
        # dead mid-step (its exit not polled): gloo sees the closed sockets at once
        driver = engine.runner.model
        driver.check = lambda: None
        os.kill(engine.worker_pids[0], signal.SIGKILL)
        time.sleep(0.2)
        engine.add_request("doomed-2", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0))
        started = time.monotonic()
        with pytest.raises(TPWorkerError):
            engine.step()
        assert time.monotonic() - started < 5
        driver.check = engine.ranks.check
        engine.recover()
        pids += engine.worker_pids
        assert _generate(engine, [5, 6, 7, 8]) == before
    finally:
        engine.close()
        _assert_workers_gone(pids)


def test_hung_worker_times_out_within_the_collective_timeout(tiny_dir: Path) -> None:
    engine = build_tp_engine(_options(tiny_dir), collective_timeout_s=3)
    pids = list(engine.worker_pids)
    try:
        before = _generate(engine, [9, 10, 11])
        os.kill(pids[0], signal.SIGSTOP)
        engine.add_request("hung", [9, 10, 11], SamplingParams(max_tokens=4, temperature=0))
        started = time.monotonic()
        with pytest.raises(TPWorkerError, match="[Tt]imed out"):
            engine.step()
        assert time.monotonic() - started < 3 + 5
        engine.recover()  # kills the stopped worker
        pids += engine.worker_pids
        assert _generate(engine, [9, 10, 11]) == before
    finally:
        engine.close()
        _assert_workers_gone(pids)


# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct Q4_1 (slow)

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three colors.",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 11?",
    "Say hello in French.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "Tell me a fun fact about octopuses.",
    "Summarise the plot of Romeo and Juliet. " * 4,
]


@pytest.fixture(scope="module")
def smollm2_engines(smollm2_path: Path):  # type: ignore[no-untyped-def]
    options = EngineOptions(
        model=str(smollm2_path), tensor_parallel=2, dtype="float32", threads=1, kv_cache_tokens=4096,
        max_num_seqs=16, max_num_batched_tokens=512,
    )  # fmt: skip
    tp = build_tp_engine(options)
    try:
        single = build_engine(msgspec.structs.replace(options, tensor_parallel=1, threads=2))
        yield tp, single
    finally:
        pids = tp.worker_pids
        tp.close()
        _assert_workers_gone(pids)


def _chat_ids(engine, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    from backends.engine.text.chat_template import ChatTemplate
    from gateway.interface import ChatMessage

    prompt = ChatTemplate.from_tokenizer(engine.tokenizer).render([ChatMessage(role="user", content=text)])
    return engine.tokenizer.encode(prompt, add_special_tokens=False)


def _greedy_all(engine, prompts: list[str], max_tokens: int) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    for i, text in enumerate(prompts):  # all queued at once: continuous batching
        engine.add_request(f"p{i}", _chat_ids(engine, text), SamplingParams(max_tokens=max_tokens, temperature=0))
    tokens: dict[str, list[int]] = {f"p{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id].extend(t for item in output.items for t in getattr(item, "token_ids", ()))
    return tokens


@pytest.mark.slow
def test_smollm2_tp2_logits_equal_tp1(smollm2_engines) -> None:  # type: ignore[no-untyped-def]
    tp, single = smollm2_engines
    ours = _run_steps(tp.runner.model, tp.runner.config, block_size=16)
    ref = _run_steps(single.runner.model, single.runner.config, block_size=16)
    _fresh_block_manager(tp)
    _fresh_block_manager(single)
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL * 10, rtol=RTOL, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.slow
def test_smollm2_tp2_greedy_tokens_identical_on_10_prompts(smollm2_engines) -> None:  # type: ignore[no-untyped-def]
    tp, single = smollm2_engines
    ours = _greedy_all(tp, PROMPTS, max_tokens=20)
    assert ours == _greedy_all(single, PROMPTS, max_tokens=20)
    assert all(len(t) > 0 for t in ours.values())
    # prefix caching: the same prompts again reuse the KV blocks the workers kept
    assert _greedy_all(tp, PROMPTS[:3], max_tokens=8) == {k: ours[k][:8] for k in list(ours)[:3]}
    assert tp.scheduler.stats().blocks.prefix_cache_hit_rate > 0


@pytest.mark.slow
def test_smollm2_tp2_preemption_matches_tp1(smollm2_engines) -> None:  # type: ignore[no-untyped-def]
    tp, single = smollm2_engines
    outputs = []
    for engine in (tp, single):
        _fresh_block_manager(engine, num_blocks=12)  # 192 tokens for 6 requests of ~45: preemption
        before = engine.scheduler.stats().num_preemptions
        outputs.append(_greedy_all(engine, PROMPTS[:6], max_tokens=12))
        assert engine.scheduler.stats().num_preemptions > before
        _fresh_block_manager(engine, num_blocks=4096 // 16)
    assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_smollm2_each_rank_holds_about_half_the_weights(smollm2_engines) -> None:  # type: ignore[no-untyped-def]
    tp, single = smollm2_engines
    total = weight_bytes(single.runner.model)
    per_rank = tp.rank_weight_bytes
    # rank 0 has 2 of the 3 KV groups (6 of 9 q heads): a little more than half
    assert all(b < 0.58 * total for b in per_rank), (per_rank, total)
    assert sum(per_rank) == pytest.approx(total, rel=0.02)


# --------------------------------------------------------------------------------------------
# served through the gateway (slow)


def _worker_pids(server_pid: int) -> list[int]:
    import psutil

    return [
        p.pid for p in psutil.Process(server_pid).children()
        if any("spawn_main" in part for part in p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE
    ]  # fmt: skip


@pytest.mark.slow
def test_served_to_the_openai_client_and_recovers_from_a_killed_rank(  # type: ignore[no-untyped-def]
    taxiway_server, smollm2_path: Path, stub_upstream
) -> None:
    import openai

    server = taxiway_server(
        f"""
        [[models]]
        name = "smol-tp"
        backend = "engine"
        options = {{ model = "{smollm2_path}", tensor_parallel = 2, threads = 1, max_num_seqs = 8, kv_cache_tokens = 4096 }}

        [[models]]
        name = "other"
        backend = "openai"
        options = {{ base_url = "{stub_upstream.base_url}", upstream_model = "smollm2" }}
        """,
        startup_timeout=120,
    )
    server.wait_ready(timeout=240)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    (worker,) = _worker_pids(server.proc.pid)

    # continuous batching: four concurrent requests, two of them streamed
    def ask(i: int, results: dict[int, str]) -> None:
        messages = [{"role": "user", "content": f"Name {i + 2} fruits."}]
        if i % 2:
            stream = client.chat.completions.create(
                model="smol-tp", messages=messages, max_tokens=16, temperature=0, stream=True
            )
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            reply = client.chat.completions.create(model="smol-tp", messages=messages, max_tokens=16, temperature=0)
            results[i] = reply.choices[0].message.content or ""

    results: dict[int, str] = {}
    threads = [threading.Thread(target=ask, args=(i, results)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 4 and all(text.strip() for text in results.values()), results

    # a long request in flight when rank 1 is killed fails with 503
    failure: dict[str, BaseException] = {}

    def long_request() -> None:
        try:
            client.completions.create(
                model="smol-tp", prompt="Count: 1, 2, 3,", max_tokens=400, temperature=0,
                logit_bias={"0": -100, "2": -100},  # no end-of-text: it runs to max_tokens
            )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001
            failure["error"] = exc

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(1.5)
    os.kill(worker, signal.SIGKILL)
    thread.join(120)
    error = failure.get("error")
    assert isinstance(error, openai.APIStatusError) and error.status_code == 503, repr(error)

    # the other model serves while this one recovers; then this one serves again, on a new rank 1
    other = client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert other.choices[0].message.content
    server.wait_ready(timeout=240)
    reply = client.chat.completions.create(
        model="smol-tp", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert reply.choices[0].message.content
    (new_worker,) = _worker_pids(server.proc.pid)
    assert new_worker != worker

    server.stop()
    _assert_workers_gone([new_worker])


def test_torchrun_style_ranks_rank0_serves_rank1_works(tiny_dir: Path, tmp_path: Path) -> None:
    """Two ``taxiway serve`` processes with the variables torchrun sets (torchrun itself starts its
    own store on every interface, so the test plays its part): rank 1 becomes a worker before
    binding anything, rank 0 serves, and rank 1 exits cleanly when rank 0 stops."""
    import subprocess
    import sys

    import httpx

    from tests.conftest import REPO_ROOT, free_port

    config = tmp_path / "tp.toml"
    config.write_text(
        f'[[models]]\nname = "tiny"\nbackend = "engine"\n'
        f'options = {{ model = "{tiny_dir}", tensor_parallel = 2, threads = 1, kv_cache_tokens = 256 }}\n'
    )
    port, master = free_port(), free_port()
    command = [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port),
               "--log-format", "json"]  # fmt: skip
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master)}
    procs = []
    try:
        for rank in (1, 0):
            log = open(tmp_path / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(
                command, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log,
                stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            ))  # fmt: skip
        worker, server = procs
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and worker.poll() is None, (tmp_path / "rank0.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "rank0.log").read_text()
            time.sleep(0.25)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "tiny", "prompt": "hello", "max_tokens": 4, "temperature": 0}, timeout=60,
        )  # fmt: skip
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 4, reply.text
        assert "engine.tp.worker" in (tmp_path / "rank1.log").read_text()
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after shutting down
        assert worker.wait(30) == 0  # left its loop on rank 0's stop command
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
