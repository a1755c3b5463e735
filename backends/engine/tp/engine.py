"""Tensor parallelism: ``build_tp_engine(options)`` runs one model over ``tensor_parallel`` ranks.

Rank 0 is the serving process's engine: it schedules, broadcasts each step's inputs, runs its own
slice and samples. Ranks 1..N-1 run the same step on their slices (``worker.serve_steps``).
They are started either

- by the engine itself (the usual case): ``torch.multiprocessing`` spawn on this machine, a world
  over loopback with a fresh ``TCPStore`` per world, gloo on CPU and NCCL on CUDA (``cuda:rank``);
- or by ``torchrun`` (across machines): every process runs ``taxiway serve``; rank 0 serves HTTP,
  the others notice their ``RANK`` in ``plugin_configure`` and become workers
  (``serve_torchrun_worker``).

How the weights are split is in ``shard.py``, the wire protocol in ``comm.py``, a rank's
life in ``worker.py``, and how rank 0 starts and watches the others in ``ranks.py``.

Failure: a worker that exits is noticed before the next step; one that dies mid-step closes its
sockets (gloo raises at once); one that hangs makes the step's next collective time out. The step
raises, ``AsyncEngine`` fails the requests in flight with 503 and calls ``recover()``: the
surviving workers are killed, a new world is spawned on a fresh port and loads its slices, the
scheduler starts over with an empty prefix cache (the workers' KV blocks are gone). Rank 0 keeps
its slice. Under torchrun the ranks belong to torchrun: ``recover()`` raises and the model stays
not ready; torchrun's own restart policy replaces the job.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import structlog
import torch

from backends.engine.builder import EngineOptions, resolve_model_path
from backends.engine.builder import make_scheduler as builder_make_scheduler
from backends.engine.engine import LLMEngine
from backends.engine.tp.comm import (
    CMD_STOP,
    COLLECTIVE_TIMEOUT_S,
    TPGroup,
    TPWorkerError,
    send_command,
    send_hidden,
    send_step,
)
from backends.engine.tp.lora import LoRASender
from backends.engine.tp.ranks import SpawnedRanks, TorchrunRanks, rank_device
from backends.engine.tp.worker import RankInfo, RankModel, RankSpec, connect, load_rank, run_worker, wait_for_ranks
from gateway.errors import ConfigError

log = structlog.get_logger(__name__)

__all__ = ["TPEngine", "TPWorkerError", "TorchrunEnv", "build_tp_engine", "serve_torchrun_worker", "torchrun_env"]

RECOVERY_ATTEMPTS = 3


class TorchrunEnv(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    rename={
        "rank": "RANK",
        "world_size": "WORLD_SIZE",
        "local_rank": "LOCAL_RANK",
        "master_addr": "MASTER_ADDR",
        "master_port": "MASTER_PORT",
        "use_agent_store": "TORCHELASTIC_USE_AGENT_STORE",
        "restart_count": "TORCHELASTIC_RESTART_COUNT",
        "gloo_interface": "GLOO_SOCKET_IFNAME",
    },
):
    """The variables ``torchrun`` sets for each process it starts (each field's variable: ``rename``)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    use_agent_store: bool = False  # torchrun's agent hosts the store: every rank is a client
    restart_count: int = 0
    gloo_interface: str = ""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> TorchrunEnv | None:
        """The torchrun world ``environ`` describes, or None when it was not started by torchrun."""
        if not all(k in environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            return None
        try:  # strings to numbers and booleans as torchrun spells them ("True", "29500")
            return msgspec.convert({"LOCAL_RANK": environ["RANK"], **environ}, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"torchrun's environment variables: {exc}") from exc

    def spec(self, options: EngineOptions, model_path: str, collective_timeout_s: float) -> RankSpec:
        loopback = self.master_addr in ("127.0.0.1", "localhost", "::1")
        return RankSpec(
            rank=self.rank, world_size=self.world_size, options=options, model_path=model_path,
            device=rank_device(options.device, self.local_rank), store_host=self.master_addr,
            store_port=self.master_port, store_prefix=f"taxiway-tp/attempt-{self.restart_count}",
            store_is_master=self.rank == 0 and not self.use_agent_store, loopback=loopback,
            interface=self.gloo_interface, collective_timeout_s=collective_timeout_s,
        )  # fmt: skip


def torchrun_env() -> TorchrunEnv | None:
    """This process's torchrun world, or None when torchrun did not start it.

    The engine's one read of the process environment outside config loading: torchrun hands each
    process its rank and its world's address in environment variables (torch's launch protocol,
    not our configuration). Called at the two torchrun entry points only: rank 0's
    ``build_tp_engine`` and ranks > 0's ``serve_torchrun_worker``.
    """
    return TorchrunEnv.from_environ(os.environ)


# --------------------------------------------------------------------------------------------
# rank 0


class TPDriver:
    """Rank 0's model: announces each step to the other ranks, then runs its own slice.

    Has the ``CausalLM`` interface that ``ModelRunner`` uses (call, ``compute_logits``).
    """

    def __init__(self, model: Any, group: TPGroup, check: Callable[[], None], lora: LoRASender | None = None) -> None:
        self.model = model
        self.group = group
        self.check = check
        self.lora = lora  # an engine serving adapters: their rows and weights go out before each step
        self.broken = False  # a step failed: the other ranks may be stuck in a collective

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: Any, kv_caches: Any) -> torch.Tensor:
        self.check()
        try:
            if self.lora is not None:
                self.lora.send(self.group)
            send_step(self.group, input_ids, positions, attn)
            return self.model(input_ids, positions, attn, kv_caches)
        except RuntimeError as exc:  # gloo: a peer closed its sockets, or a collective timed out
            self.broken = True
            raise TPWorkerError(f"tensor-parallel step failed: {exc}") from exc

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        try:
            with torch.inference_mode():
                hidden = send_hidden(self.group, hidden)
            return self.model.compute_logits(hidden)
        except RuntimeError as exc:
            self.broken = True
            raise TPWorkerError(f"tensor-parallel logits failed: {exc}") from exc


class TPEngine(LLMEngine):
    """An ``LLMEngine`` whose runner drives ``tensor_parallel`` ranks; adds ``recover`` and ``close``."""

    def __init__(
        self, runner: Any, tokenizer: Any, *, make_scheduler: Callable[[], Any], ranks: Any, group: TPGroup,
        rank0: RankModel, infos: list[RankInfo],
    ) -> None:  # fmt: skip
        super().__init__(make_scheduler(), runner, tokenizer)
        self._make_scheduler = make_scheduler
        self.ranks = ranks
        self.group = group
        self.rank0 = rank0
        self.infos = infos

    @property
    def model_config(self) -> Any:
        """The whole model's ``ModelConfig`` (the runner's is rank 0's slice: its heads)."""
        return self.rank0.config

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of ranks 1..N-1 (on other machines under torchrun)."""
        return [info.pid for info in self.infos]

    @property
    def rank_weight_bytes(self) -> list[int]:
        """Bytes of parameters + buffers held by each rank, rank 0 first."""
        return [self.rank0.weight_bytes, *(info.weight_bytes for info in self.infos)]

    def recover(self) -> None:
        """Replace a broken world by a new one; every request in flight must already be aborted."""
        self.abort_all()
        if not self.ranks.recoverable:
            raise TPWorkerError("a torchrun rank failed; torchrun restarts the job, this rank cannot")
        for attempt in range(1, RECOVERY_ATTEMPTS + 1):
            self._teardown(grace_s=0)
            try:
                self.infos, _ = _start_world(self.ranks, self.group, lambda: self.rank0)
                break
            except Exception as exc:
                log.error("engine.tp.restart_failed", attempt=attempt, error=repr(exc))
                if attempt == RECOVERY_ATTEMPTS:
                    self._teardown(grace_s=0)
                    raise
        for k, v in self.runner.kv_caches:  # stale, and meaningless without the other ranks' heads
            k.zero_()
            v.zero_()
        self.runner.model.broken = False
        if self.runner.model.lora is not None:  # the new ranks hold no adapters yet
            self.runner.model.lora.forget()
        self.scheduler = self._make_scheduler()  # no blocks in use, no prefix cache, nothing in flight
        log.info("engine.tp.recovered", worker_pids=self.worker_pids)

    def close(self) -> None:
        """Stop the workers (a stop command, then kill) and drop the world."""
        if self.group.is_connected and not self.runner.model.broken:
            try:
                self.ranks.check()
                send_command(self.group, CMD_STOP)
            except Exception as exc:  # noqa: BLE001 - already broken: killing is all that is left
                log.warning("engine.tp.stop_failed", error=repr(exc))
        self._teardown(grace_s=10.0)

    def _teardown(self, grace_s: float) -> None:
        self.ranks.stop(grace_s)
        self.group.close()


def _start_world(ranks: Any, group: TPGroup, load_rank0: Callable[[], RankModel]) -> tuple[list[RankInfo], RankModel]:
    """Start ranks 1..N-1, get rank 0's slice meanwhile (loading it the first time), connect everyone."""
    store, spec = ranks.spawn()
    try:
        rank0 = load_rank0()
        infos = wait_for_ranks(store, spec.world_size, ranks.check)
        bad = [i.rank for i in infos if i.num_blocks != rank0.layout.num_blocks]
        if bad:
            raise TPWorkerError(f"ranks {bad} sized a different KV cache than rank 0")
        connect(group, store, spec)
    except BaseException:
        ranks.stop(grace_s=0)
        group.close()
        raise
    log.info("engine.tp.world", world_size=spec.world_size, worker_pids=[i.pid for i in infos])
    return infos, rank0


def build_tp_engine(
    options: EngineOptions, *, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S, progress: bool = False
) -> TPEngine:
    """Rank 0 of a ``options.tensor_parallel``-rank engine: spawned workers, or torchrun's when this
    process was started by torchrun (``torchrun_env``)."""
    from backends.engine.lora.runner import LoRAModelRunner
    from backends.engine.runner.model_runner import ModelRunner
    from backends.engine.sched.scheduler import Scheduler
    from backends.engine.text.tokenizer import Tokenizer

    env = torchrun_env()
    path = resolve_model_path(options, progress=progress)
    if env is not None:
        if env.world_size != options.tensor_parallel:
            raise ConfigError(
                f"tensor_parallel = {options.tensor_parallel}, but torchrun started {env.world_size} ranks",
                path="options.tensor_parallel",
            )
        ranks: Any = TorchrunRanks(env, options, str(path), collective_timeout_s)
    else:
        ranks = SpawnedRanks(options, str(path), collective_timeout_s)
    device = torch.device(rank_device(options.device, env.local_rank if env else 0))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = TPGroup(0, options.tensor_parallel, device)
    infos, rank0 = _start_world(ranks, group, lambda: load_rank(path, options, group))
    tokenizer = Tokenizer.load(path)
    layout = rank0.layout

    def make_scheduler() -> Scheduler:
        return builder_make_scheduler(options, layout, tokenizer.eos_token_ids)

    runner_class: Any = ModelRunner
    sender = None
    if rank0.lora is not None:  # each step's rows carry their adapters, on every rank
        runner_class = functools.partial(LoRAModelRunner, slots=rank0.lora)
        sender = LoRASender(rank0.lora, rank0.config)
    runner = runner_class(
        TPDriver(rank0.model, group, ranks.check, sender), rank0.local_config,
        num_blocks=layout.num_blocks, block_size=layout.block_size, dtype=rank0.dtype, device=device, seed=options.seed,
    )  # fmt: skip
    log.info(
        "engine.tp.ready", model=path.name, tensor_parallel=options.tensor_parallel, kv_blocks=layout.num_blocks,
        weight_bytes=[rank0.weight_bytes, *(i.weight_bytes for i in infos)],
    )  # fmt: skip
    return TPEngine(
        runner, tokenizer, make_scheduler=make_scheduler, ranks=ranks, group=group, rank0=rank0, infos=infos
    )


# --------------------------------------------------------------------------------------------
# torchrun: ranks > 0 of `torchrun ... -m gateway serve`


def serve_torchrun_worker(settings: Any) -> None:
    """Return at once unless this process is a torchrun rank > 0 (``torchrun_env``); then be that
    rank of the config's tensor-parallel engine model until rank 0 stops, and exit the process (it
    must not serve HTTP).
    """
    env = torchrun_env()
    if env is None or env.rank == 0:
        return
    from gateway.config import convert_table

    for i, entry in enumerate(settings.models):
        if entry.backend != "engine":
            continue
        options = convert_table(entry.options, EngineOptions, f"models[{i}].options")
        if options.tensor_parallel > 1:
            break
    else:
        raise ConfigError(f"torchrun started {env.world_size} ranks, but no engine model has tensor_parallel > 1")
    if options.tensor_parallel != env.world_size:
        raise ConfigError(
            f"tensor_parallel = {options.tensor_parallel}, but torchrun started {env.world_size} ranks",
            path=f"models[{i}].options.tensor_parallel",
        )
    path = resolve_model_path(options)
    log.info("engine.tp.worker", rank=env.rank, world_size=env.world_size, model=entry.name)
    run_worker(env.spec(options, str(path), COLLECTIVE_TIMEOUT_S))
    raise SystemExit(0)

