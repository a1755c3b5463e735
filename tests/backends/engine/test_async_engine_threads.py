"""``run_in_own_thread``: the model loads on a thread that ends with the load, so the step thread
is the only one left holding an OpenMP team (see ``backends/engine/async_engine.py``)."""

from __future__ import annotations

import threading

import pytest

from backends.engine.async_engine import run_in_own_thread


async def test_runs_on_a_fresh_thread_that_ends() -> None:
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    assert await run_in_own_thread(work, name="load-under-test") == 42
    (thread,) = seen
    assert thread is not threading.main_thread()
    assert thread.name == "load-under-test"
    thread.join(timeout=5)
    assert not thread.is_alive()


async def test_exceptions_reach_the_awaiting_task() -> None:
    def fail() -> None:
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        await run_in_own_thread(fail)
