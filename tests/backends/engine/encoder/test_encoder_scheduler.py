"""The encoder's scheduler (plain Python): budget, grouping by length, the oldest input always
in, large requests split, cancellation."""

from __future__ import annotations

import random

from backends.engine.encoder.scheduler import EncoderScheduler


def _ids(n: int) -> list[int]:
    return [1] * n


def _drain(s: EncoderScheduler) -> list[list[tuple[str, int, int]]]:
    steps = []
    while group := s.schedule():
        steps.append([(item.job, item.index, item.length) for item in group])
    return steps


def test_every_step_fits_the_budget_and_every_input_runs_once() -> None:
    rng = random.Random(0)
    s = EncoderScheduler(max_batch_tokens=1024, max_batch_size=16)
    expected = set()
    for job in "abcdefgh":
        lengths = [rng.randint(3, 256) for _ in range(rng.randint(1, 40))]
        s.add(job, [_ids(n) for n in lengths])
        expected |= {(job, i, n) for i, n in enumerate(lengths)}
    steps = _drain(s)
    seen = [x for step in steps for x in step]
    assert sorted(seen) == sorted(expected) and len(seen) == len(set(seen))
    for step in steps:
        assert len(step) <= 16 and len(step) * max(n for _, _, n in step) <= 1024
    # grouped by length: little padding over the whole run
    padded = sum(len(step) * max(n for _, _, n in step) for step in steps)
    assert padded <= 1.25 * sum(n for _, _, n in seen)


def test_the_oldest_input_is_in_every_step_so_nothing_starves() -> None:
    s = EncoderScheduler(max_batch_tokens=64, max_batch_size=8)
    s.add("long", [_ids(60)])
    for i in range(20):
        s.add(f"short{i}", [_ids(4)] * 4)
    first = s.schedule()
    assert [item.job for item in first] == ["long"]  # alone: nothing else fits beside it
    second = s.schedule()
    assert second[0].job == "short0" or "short0" in {item.job for item in second}


def test_an_input_over_the_budget_runs_alone() -> None:
    s = EncoderScheduler(max_batch_tokens=100, max_batch_size=8)
    s.add("a", [_ids(300), _ids(5)])
    assert [item.length for item in s.schedule()] == [300]
    assert [item.length for item in s.schedule()] == [5]


def test_a_large_request_is_split_across_steps() -> None:
    s = EncoderScheduler(max_batch_tokens=256, max_batch_size=8)
    s.add("big", [_ids(32)] * 40)
    s.add("small", [_ids(32)])
    steps = _drain(s)
    assert [len(step) for step in steps] == [8, 8, 8, 8, 8, 1]
    assert [job for job, _, _ in steps[-1]] == ["small"]  # same length: first come, first served
    assert sorted(i for step in steps for job, i, _ in step if job == "big") == list(range(40))


def test_grouping_prefers_inputs_of_the_same_length() -> None:
    s = EncoderScheduler(max_batch_tokens=512, max_batch_size=64)
    s.add("big", [_ids(128)] * 8)
    s.add("small", [_ids(8)])
    first = s.schedule()
    assert {item.job for item in first} == {"big"} and len(first) == 4  # 4 x 128 fills the budget
    assert len(s.schedule()) == 4
    assert [item.job for item in s.schedule()] == ["small"]


def test_cancel_drops_a_jobs_waiting_inputs() -> None:
    s = EncoderScheduler(max_batch_tokens=4096, max_batch_size=2)
    s.add("a", [_ids(5)] * 4)
    s.add("b", [_ids(5)] * 2)
    s.schedule()
    s.cancel("a")
    assert {item.job for step in [s.schedule(), s.schedule()] for item in step} == {"b"}
    assert s.num_waiting == 0
