"""``taxiway bench batching``'s three modes on a tiny random model: each computes what it claims
(one request at a time; fixed batches padded to their longest output; a refilled window of C),
and the step tally accounts for every token the engine computed."""

from __future__ import annotations

import pytest

from bench.batching import Job, ModeResult, StepTally, report, run_continuous, run_none, run_static
from backends.engine.builder import EngineOptions, build_engine
from bench.synthetic import write_random_llama

# prompt lengths leave no one-token chunk under a 32-token budget when run alone
JOBS = [Job(list(range(3, 3 + n)), out) for n, out in [(5, 4), (40, 2), (12, 9), (3, 6), (20, 3), (34, 7), (8, 5)]]
CONCURRENCY = 3


@pytest.fixture(scope="module")
def engine(tmp_path_factory):  # type: ignore[no-untyped-def]
    path = write_random_llama(
        tmp_path_factory.mktemp("tiny"), hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=300,
        tokenizer=True,
    )  # fmt: skip
    options = EngineOptions(
        model=str(path), dtype="float32", threads=1, max_num_seqs=CONCURRENCY, max_num_batched_tokens=32,
        kv_cache_tokens=1024, enable_prefix_caching=False,
    )  # fmt: skip
    return build_engine(options)


def computed(tally: StepTally) -> int:
    return tally.num_prefill_tokens + tally.num_decode_rows


def test_none_runs_one_request_at_a_time(engine) -> None:  # type: ignore[no-untyped-def]
    tally = StepTally()
    run_none(engine, JOBS, tally)
    assert tally.num_prefill_tokens == sum(len(j.prompt_ids) for j in JOBS)
    # the first token of each request comes from its prompt's last chunk
    assert tally.num_decode_rows == sum(j.max_tokens - 1 for j in JOBS)
    assert tally.num_decode_only_rows == tally.num_decode_only_steps  # one sequence per step
    assert tally.num_steps == tally.num_decode_only_steps + sum(-(-len(j.prompt_ids) // 32) for j in JOBS)


def test_static_pads_each_batch_to_its_longest_output(engine) -> None:  # type: ignore[no-untyped-def]
    tally = StepTally()
    run_static(engine, JOBS, CONCURRENCY, tally)
    padded = 0
    for first in range(0, len(JOBS), CONCURRENCY):
        group = JOBS[first : first + CONCURRENCY]
        padded += len(group) * (max(j.max_tokens for j in group) - 1)
    assert computed(tally) == sum(len(j.prompt_ids) for j in JOBS) + padded


def test_continuous_refills_the_window_and_computes_only_useful_tokens(engine) -> None:  # type: ignore[no-untyped-def]
    none, continuous = StepTally(), StepTally()
    run_none(engine, JOBS, none)
    run_continuous(engine, JOBS, CONCURRENCY, continuous)
    assert computed(continuous) == computed(none)
    assert continuous.num_decode_only_rows / continuous.num_decode_only_steps > 1.5  # batched
    assert continuous.num_steps < none.num_steps
    assert not engine.has_unfinished()


def test_report_has_both_tables() -> None:
    tallies = {m: StepTally(num_steps=10, num_decode_rows=8, num_decode_only_steps=4, num_decode_only_rows=8,
                            decode_only_steps_s=0.2, prefill_steps_s=0.5) for m in ("none", "static", "continuous")}  # fmt: skip
    results = [ModeResult(m, w, 100, 100 / w, 50, tallies[m]) for m, w in [("none", 10.0), ("static", 5.0), ("continuous", 2.0)]]
    text = report(results, 7, 3)
    assert "| continuous | 2.0 | 50.0 | 5.00x | 2.50x |" in text
    assert "| static | 10 | 8 | 0.5 | 4 | 0.2 | 50.0 | 2.0 |" in text
    assert "7 requests, 50 prompt tokens, 100 output tokens, concurrency 3" in text
