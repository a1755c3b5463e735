"""Ranks 1..N-1 of a tensor-parallel world as rank 0 sees them: processes it spawns on this machine
(``SpawnedRanks``), or processes torchrun started (``TorchrunRanks``). Both hand rank 0 the world's
store and its own ``RankSpec`` (``spawn``), report dead workers (``check``) and let them go (``stop``).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from backends.engine.builder import EngineOptions
from backends.engine.tp.comm import LoopbackStore, TPWorkerError
from backends.engine.tp.worker import RankSpec, worker_main, world_store

if TYPE_CHECKING:
    from backends.engine.tp.engine import TorchrunEnv


def rank_device(device: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if torch.device(device).type == "cuda" else "cpu"


class SpawnedRanks:
    """Ranks 1..N-1 as child processes of this one (daemonic, and watching their parent)."""

    recoverable = True

    def __init__(self, options: EngineOptions, model_path: str, collective_timeout_s: float) -> None:
        self.options = options
        self.model_path = model_path
        self.collective_timeout_s = collective_timeout_s
        self.world_size = options.tensor_parallel
        self._procs: list[Any] = []
        self._store: LoopbackStore | None = None
        self._world = 0

    def spawn(self) -> tuple[dist.Store, RankSpec]:
        """A new world: a store on a fresh loopback port, and the worker processes."""
        self._world += 1
        self._store = LoopbackStore(self.world_size)
        ctx = torch.multiprocessing.get_context("spawn")
        specs = [
            RankSpec(
                rank=rank, world_size=self.world_size, options=self.options, model_path=self.model_path,
                device=rank_device(self.options.device, rank), store_host="127.0.0.1", store_port=self._store.port,
                store_prefix=f"taxiway-tp/world-{self._world}", collective_timeout_s=self.collective_timeout_s,
                parent_pid=os.getpid(),
            )  # fmt: skip
            for rank in range(self.world_size)
        ]
        self._procs = []
        for spec in specs[1:]:
            proc = ctx.Process(target=worker_main, args=(spec,), name=f"taxiway-tp-rank{spec.rank}", daemon=True)
            proc.start()
            self._procs.append(proc)
        assert self._store.store is not None
        return dist.PrefixStore(specs[0].store_prefix, self._store.store), specs[0]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def check(self) -> None:
        """Raise ``TPWorkerError`` if a worker process has exited."""
        for rank, proc in enumerate(self._procs, start=1):
            if proc.exitcode is not None:
                raise TPWorkerError(f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")

    def stop(self, grace_s: float = 10.0) -> None:
        """Wait ``grace_s`` for the workers to exit (after a stop command), then kill what is left."""
        for proc in self._procs:
            proc.join(grace_s)
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)
        self._procs = []
        if self._store is not None:
            self._store.close()
            self._store = None


class TorchrunRanks:
    """Ranks 1..N-1 started by torchrun, each in its own ``taxiway serve`` process."""

    recoverable = False

    def __init__(self, env: TorchrunEnv, options: EngineOptions, model_path: str, collective_timeout_s: float) -> None:
        self.env = env
        self.options = options
        self.model_path = model_path
        self.collective_timeout_s = collective_timeout_s

    def spawn(self) -> tuple[dist.Store, RankSpec]:
        spec = self.env.spec(self.options, self.model_path, self.collective_timeout_s)
        return world_store(spec), spec

    def check(self) -> None:
        pass  # other machines' processes: their failures arrive as gloo errors

    def stop(self, grace_s: float = 10.0) -> None:
        pass
