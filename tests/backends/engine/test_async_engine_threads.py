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


async def test_a_load_runs_at_the_lowest_cpu_priority_and_serving_keeps_its_own() -> None:
    import os
    import threading

    from backends.engine.async_engine import LOAD_NICENESS, run_in_own_thread

    def own_priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = own_priority()
    in_load = await run_in_own_thread(own_priority)
    assert in_load == max(before, LOAD_NICENESS) == 19  # a process may raise its niceness, never lower it
    assert own_priority() == before  # the event loop's thread (and threads it starts) keep theirs
