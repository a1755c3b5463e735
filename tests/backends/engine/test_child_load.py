"""Loading in a child process (``child_load``): the engine built from the child's tensors is the
engine built in-process (same tokens, native kernels attached to the same modules, weights in
shared memory), and a load that fails in the child fails in the parent with the child's error."""

from __future__ import annotations

from pathlib import Path

import pytest
from backends.engine.builder import EngineOptions, build_engine
from bench.synthetic import write_random_llama
from gateway.interface import Delta, SamplingParams


def _generate(engine) -> list[int]:  # type: ignore[no-untyped-def]
    engine.add_request("r", list(range(30, 60)), SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += [t for item in out.items if isinstance(item, Delta) for t in item.token_ids]
    return tokens


def _with_kernels(engine) -> list[str]:  # type: ignore[no-untyped-def]
    model = engine.runner.model
    return [name for name, mod in model.named_modules() if getattr(mod, "kernels", None) is not None]


@pytest.mark.parametrize("quantization", ["int4", "int8"])
def test_child_load_builds_the_same_engine(tmp_path: Path, quantization: str) -> None:
    path = write_random_llama(tmp_path / "m", hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2,
                              vocab=512, seed=7, tokenizer=True)  # fmt: skip
    options = EngineOptions(model=str(path), quantization=quantization, kv_cache_tokens=512, max_num_seqs=2)
    here = build_engine(options)
    child = build_engine(options, in_child=True)
    assert _generate(child) == _generate(here)
    assert _with_kernels(child) == _with_kernels(here)
    weights = [b for b in child.runner.model.buffers() if b.numel() > 1024]
    assert weights and all(w.is_shared() for w in weights)  # mapped from the child, not copied


def test_child_load_failure_is_the_childs_error(tmp_path: Path) -> None:
    """The parent raises what an in-process load raises, with the child's traceback noted."""
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(Exception) as here:
        build_engine(EngineOptions(model=str(bad)))
    with pytest.raises(type(here.value)) as child:
        build_engine(EngineOptions(model=str(bad)), in_child=True)
    assert str(child.value) == str(here.value)
    assert any("in the load process" in note for note in getattr(child.value, "__notes__", []))


def test_child_runs_at_load_niceness_not_at_its_spawning_threads(tmp_path: Path) -> None:
    """A load beside serving is spawned from a load thread at nice 19 (``LOAD_NICENESS``); the child
    runs at ``load_niceness`` from its first instruction, or under full load it starves (importing
    torch alone at nice 19 took minutes while 16 streams were served on 2 cores)."""
    import os
    import threading
    import time

    import psutil
    from backends.engine.async_engine import LOAD_NICENESS

    path = write_random_llama(tmp_path / "m", hidden=64, intermediate=128, layers=1, heads=2, kv_heads=1,
                              vocab=256, seed=3, tokenizer=True)  # fmt: skip
    options = EngineOptions(model=str(path), kv_cache_tokens=64, max_num_seqs=1, load_niceness=7)
    seen: set[int] = set()

    def load() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOAD_NICENESS)
        build_engine(options, in_child=True)

    lowered: list[bool] = []

    def probe() -> None:  # lowering a niceness needs CAP_SYS_NICE
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, LOAD_NICENESS)
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 7)
            lowered.append(True)
        except OSError:
            pass

    prober = threading.Thread(target=probe)
    prober.start()
    prober.join()
    if not lowered:
        pytest.skip("no CAP_SYS_NICE here: a child starts at its spawner's niceness")
    loader = threading.Thread(target=load)
    loader.start()
    me = psutil.Process()
    while loader.is_alive():
        for child in me.children():
            try:
                if "--multiprocessing-fork" in child.cmdline():  # the load, not the resource tracker
                    seen.add(child.nice())
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.005)
    loader.join()
    assert seen == {7}
