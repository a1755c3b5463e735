"""One tensor-parallel rank: load and shard the model, join the world, and (ranks > 0) run the
steps that rank 0 sends until it says stop.

Joining goes in two phases so that rank 0 never blocks on a rank that died while loading:
each rank loads and shards its slice, then announces itself in the world's store
(``rank/{r}``: pid, weight bytes, KV blocks); rank 0 polls the announcements, checking the
worker processes' liveness meanwhile, and only then do all ranks build the process groups.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from backends.engine.model.attention import KVCache, allocate_kv_cache
from backends.engine.builder import EngineOptions, KVCacheLayout, kv_cache_layout, load_kernels
from backends.engine.model.config import ModelConfig
from backends.engine.tp.comm import (
    CMD_LOGITS,
    CMD_LORA,
    CMD_STEP,
    CMD_STOP,
    COLLECTIVE_TIMEOUT_S,
    STORE_TIMEOUT,
    LoopbackStore,
    TPGroup,
    TPWorkerError,
    recv_header,
    recv_hidden,
    recv_step,
)
from backends.engine.tp.shard import ShardPlan, plan_heads, shard_model, weight_bytes

LOAD_TIMEOUT_S = 900.0


class RankSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a rank needs to join a world; picklable (it crosses into spawned processes)."""

    rank: int
    world_size: int
    options: EngineOptions
    model_path: str
    device: str  # this rank's device: "cpu" or "cuda:N"
    store_host: str
    store_port: int
    store_prefix: str  # one per world: a recovered world never reads a dead one's keys
    store_is_master: bool = False
    loopback: bool = True  # gloo on 127.0.0.1 (one machine); else ``interface`` or the host name
    interface: str = ""
    collective_timeout_s: float = COLLECTIVE_TIMEOUT_S
    parent_pid: int | None = None  # exit as soon as this process is no longer our parent


class RankInfo(msgspec.Struct, frozen=True):
    """What a rank announces once its slice is loaded."""

    rank: int
    pid: int
    weight_bytes: int  # parameters + buffers of its slice
    num_blocks: int


class RankModel(msgspec.Struct, kw_only=True):
    """A rank's loaded slice."""

    model: Any  # CausalLM, sharded
    config: ModelConfig  # the whole model's
    plan: ShardPlan
    layout: KVCacheLayout
    dtype: Any  # torch.dtype
    weight_bytes: int
    lora: Any = None  # lora.slots.LoRASlots of an engine serving adapters (``tp.lora.rank_lora``)

    @property
    def local_config(self) -> ModelConfig:
        return self.plan.local_config(self.config)


def activation_dtype(options: EngineOptions) -> torch.dtype:
    return torch.bfloat16 if options.dtype == "bfloat16" else torch.float32


def load_rank(model_path: str | Path, options: EngineOptions, group: TPGroup) -> RankModel:
    """Load the whole model on the CPU, keep this rank's slice (moved to ``group.device``)."""
    from backends.engine.model.loader import load_model
    from backends.engine.native.fuse import fuse

    dtype = activation_dtype(options)
    threads = options.threads
    if threads is None and group.device.type == "cpu":  # the ranks share the machine's cores
        threads = max(1, (os.cpu_count() or 1) // group.world_size)
    kernels = load_kernels(options) if group.device.type == "cpu" else None
    loaded = load_model(
        model_path, quantization=options.quantization, dtype=dtype, device="cpu", threads=threads, kernels=kernels
    )
    model = loaded.model
    plan = shard_model(model, group, group.device)
    fuse(model, kernels)  # after sharding, as in a single process after loading
    config = loaded.config
    lora = None
    if options.lora is not None:  # after fusing, as in a single process
        from backends.engine.tp.lora import rank_lora

        lora = rank_lora(model, plan, config, options.lora, group.device)
    # Every rank sizes its cache for the widest rank's KV heads: the block ids are shared.
    widest = max(kv[1] - kv[0] for _, kv in plan_heads(config.num_heads, config.num_kv_heads, group.world_size))
    layout = kv_cache_layout(
        msgspec.structs.replace(config, num_kv_heads=widest), options, torch.finfo(dtype).bits // 8
    )
    return RankModel(
        model=model, config=config, plan=plan, layout=layout, dtype=dtype, weight_bytes=weight_bytes(model), lora=lora
    )


def allocate_rank_cache(rank: RankModel, device: torch.device) -> KVCache:
    return allocate_kv_cache(rank.local_config, rank.layout.num_blocks, rank.layout.block_size, rank.dtype, device)


# --------------------------------------------------------------------------------------------
# joining a world


def announce(store: dist.Store, info: RankInfo) -> None:
    store.set(f"rank/{info.rank}", msgspec.json.encode(info))


def wait_for_ranks(
    store: dist.Store, world_size: int, alive: Callable[[], None], timeout_s: float = LOAD_TIMEOUT_S
) -> list[RankInfo]:
    """Rank 0: the announcements of ranks ``1..world_size-1``; ``alive()`` raises if one died."""
    keys = [f"rank/{r}" for r in range(1, world_size)]
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        alive()
        if time.monotonic() > deadline:
            raise TPWorkerError(f"tensor-parallel ranks did not load within {timeout_s:.0f}s")
        time.sleep(0.02)
    return [msgspec.json.decode(store.get(k), type=RankInfo) for k in keys]


def world_store(spec: RankSpec) -> dist.Store:
    """The world's store (this rank's view, under the world's prefix); a loopback master listens
    on 127.0.0.1 only."""
    if spec.store_is_master and spec.loopback:
        store = LoopbackStore(spec.world_size, spec.store_port).store
    else:
        store = dist.TCPStore(
            spec.store_host, spec.store_port, spec.world_size, spec.store_is_master, STORE_TIMEOUT,
            wait_for_workers=False,
        )  # fmt: skip
    return dist.PrefixStore(spec.store_prefix, store)


def connect(group: TPGroup, store: dist.Store, spec: RankSpec) -> None:
    group.connect(
        store, loopback=spec.loopback, interface=spec.interface, collective_timeout_s=spec.collective_timeout_s
    )


# --------------------------------------------------------------------------------------------
# ranks > 0


def run_worker(spec: RankSpec) -> None:
    """Be rank ``spec.rank`` until rank 0 sends stop (returns) or the world breaks (raises)."""
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = world_store(spec)
    group = TPGroup(spec.rank, spec.world_size, device)
    rank = load_rank(spec.model_path, spec.options, group)
    kv_caches = allocate_rank_cache(rank, device)
    announce(store, RankInfo(spec.rank, os.getpid(), rank.weight_bytes, rank.layout.num_blocks))
    connect(group, store, spec)
    try:
        serve_steps(rank, group, kv_caches)
    finally:
        group.close()


def serve_steps(rank: RankModel, group: TPGroup, kv_caches: KVCache) -> None:
    """Run the steps rank 0 broadcasts, in order, until ``CMD_STOP``."""
    from backends.engine.tp.lora import LoRAReceiver

    model = rank.model
    lora = None if rank.lora is None else LoRAReceiver(rank.lora, rank.config)
    while True:
        header = recv_header(group)
        cmd = int(header[0])
        if cmd == CMD_STEP:
            input_ids, positions, attn = recv_step(group, header)
            if lora is not None:
                lora.prepare_step()
            model(input_ids, positions, attn, kv_caches)
        elif cmd == CMD_LORA and lora is not None:
            lora.receive(group, header)
        elif cmd == CMD_LOGITS:
            model.compute_logits(recv_hidden(group, header))
        elif cmd == CMD_STOP:
            return
        else:
            raise TPWorkerError(f"unknown tensor-parallel command {cmd}")


def worker_main(spec: RankSpec) -> None:
    """Entry point of a spawned rank process."""
    if spec.parent_pid is not None:
        _exit_with_parent(spec.parent_pid)
    run_worker(spec)


def _exit_with_parent(parent_pid: int) -> None:
    """A worker must not outlive the serving process, even one killed with SIGKILL."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="taxiway-tp-parent-watch", daemon=True).start()
