"""LoRA in the scheduler: at most ``max_loras`` distinct adapters run at once, a request whose
adapter finds no slot waits in its place (never refused) and runs once one frees; prefix-cache
blocks are shared only between requests with the same adapter."""

from __future__ import annotations

from backends.engine.sched.block_manager import BlockManager
from backends.engine.sched.scheduler import Scheduler
from backends.engine.sched.sequence import SequenceGroup
from gateway.interface import SamplingParams


class Adapter:  # what the scheduler reads of a LoRAAdapter
    def __init__(self, lora_id: int) -> None:
        self.lora_id = lora_id


def scheduler(max_loras: int = 2, prefix_caching: bool = False) -> Scheduler:
    return Scheduler(
        BlockManager(64, 4, enable_prefix_caching=prefix_caching), max_num_seqs=8, max_num_batched_tokens=64,
        max_model_len=64, max_loras=max_loras,
    )  # fmt: skip


def group(request_id: str, lora_id: int, prompt: list[int] | None = None, max_tokens: int = 3) -> SequenceGroup:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
    return SequenceGroup(request_id, prompt or [1, 2, 3], sampling, lora=Adapter(lora_id) if lora_id else None)


def running_loras(s: Scheduler) -> set[int]:
    return {seq.group.lora_id for seq in s.running} - {0}


def test_a_third_adapter_waits_for_a_slot_then_runs() -> None:
    s = scheduler(max_loras=2)
    for rid, lora in (("a", 1), ("b", 2), ("c", 3), ("base", 0), ("a2", 1)):
        s.add(group(rid, lora))
    out = s.schedule()
    # c (adapter 3) is passed over, keeping its place; base and a second adapter-1 request run
    assert [x.seq.group.request_id for x in out.scheduled] == ["a", "b", "base", "a2"]
    assert [seq.group.request_id for seq in s.waiting] == ["c"]
    s.update(out, {x.seq.seq_id: 5 for x in out.scheduled if x.do_sample})
    seen_c = False
    while s.has_unfinished():
        assert len(running_loras(s)) <= 2
        out = s.schedule()
        seen_c |= any(x.seq.group.request_id == "c" for x in out.scheduled)
        s.update(out, {x.seq.seq_id: 5 for x in out.scheduled if x.do_sample})
    assert seen_c


def test_prefix_cache_is_keyed_by_adapter() -> None:
    s = scheduler(max_loras=4, prefix_caching=True)
    prompt = list(range(1, 14))  # three full blocks of 4
    bm = s.block_manager
    first = group("first", 1, prompt, max_tokens=1)
    s.add(first)
    while s.has_unfinished():
        out = s.schedule()
        s.update(out, {x.seq.seq_id: 5 for x in out.scheduled if x.do_sample})
    for rid, lora, hits in (("same", 1, 3), ("other", 2, 0), ("base", 0, 0)):
        assert len(bm.match_prefix(group(rid, lora, prompt).leader)) == hits, rid
