"""The process groups of one tensor-parallel world, and the step messages rank 0 sends on them.

Each world (one per served model, and a fresh one after every recovery) builds its own groups
from its own ``TCPStore``, without ``torch.distributed``'s process-global default group, so that
several models can be tensor parallel in one gateway and a failed world can be thrown away.

Two groups per world:
- ``ctrl`` (gloo, CPU): step headers and the step's integer inputs. A worker waits here between
  steps for as long as the gateway is idle, so its timeout is practically unbounded; rank 0's
  sends (which wait until a receiver is ready) time out like the compute group.
- ``compute`` (gloo on CPU, NCCL on CUDA): the activations (two all-reduces per layer, the
  embedding's all-reduce, the logits' all-gather). Its timeout bounds how long rank 0 waits
  for a hung rank: a step that cannot complete raises within ``collective_timeout_s``.

A dead peer's closed sockets make gloo raise at once ("Connection closed by peer").

Step protocol (rank 0 -> all, on ``ctrl``): a header ``int64[4] = [cmd, T, S, W]``, then for
``STEP`` one int64 payload ``input_ids[T] | positions[T] | slot_mapping[T] | query_start_loc[S+1]
| seq_lens[S] | block_tables[S*W]``; for ``LOGITS`` (``T`` rows) the hidden rows follow on
``compute`` (the header says ``[LOGITS, rows, width, dtype]``); ``STOP`` ends the worker loop.
An engine serving LoRA adapters sends ``LORA`` before a step that uses an adapter (the step's
rows' adapters, and the adapters' weights a rank does not hold yet: ``tp/lora.py``).
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist
from torch import Tensor

from backends.engine.model.attention import AttentionMetadata

COLLECTIVE_TIMEOUT_S = 60.0
IDLE_TIMEOUT = datetime.timedelta(days=365)  # gloo adds it to a steady_clock: keep it finite
STORE_TIMEOUT = datetime.timedelta(seconds=300)

CMD_STEP, CMD_LOGITS, CMD_STOP, CMD_LORA = 1, 2, 3, 4
HEADER_LEN = 4


class TPWorkerError(RuntimeError):
    """A tensor-parallel rank died, hung or failed: the step cannot complete."""


class TPGroup:
    """Rank ``rank`` of ``world_size`` on ``device``; usable once ``connect`` has run.

    Sharded modules keep a reference to this object, so ``close`` + ``connect`` (a new world after
    a failure) rewires them without touching the model.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device | str = "cpu") -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self._ctrl: dist.ProcessGroupGloo | None = None
        self._compute: dist.ProcessGroup | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def connect(
        self,
        store: dist.Store,
        *,
        loopback: bool,
        interface: str = "",
        collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
    ) -> None:
        """Build both groups (blocks until every rank has called it). ``loopback``: bind gloo to
        127.0.0.1 (one machine); otherwise gloo picks ``interface`` or the host name's address."""
        timeout = datetime.timedelta(seconds=collective_timeout_s)
        # A gloo timeout is each rank's own: rank 0's sends wait for the receiver to post its
        # receive (gloo's rendezvous), so they must time out; the workers' receives must not.
        ctrl_timeout = timeout if self.rank == 0 else IDLE_TIMEOUT
        rank, size = self.rank, self.world_size
        self._ctrl = _gloo(dist.PrefixStore("ctrl", store), rank, size, ctrl_timeout, loopback, interface)
        if self.device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self._compute = dist.ProcessGroupNCCL(dist.PrefixStore("compute", store), rank, size, opts)
        else:
            self._compute = _gloo(dist.PrefixStore("compute", store), rank, size, timeout, loopback, interface)

    def close(self) -> None:
        """Drop both groups; pending collectives of a broken world are abandoned."""
        for pg in (self._compute, self._ctrl):
            if pg is not None:
                try:
                    pg.abort()
                except Exception:  # noqa: BLE001 - a broken world may refuse even this
                    pass
        self._ctrl = self._compute = None

    @property
    def is_connected(self) -> bool:
        return self._ctrl is not None

    # -- collectives on activations (compute) -----------------------------------------------------

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum ``x`` over ranks, in place (one call per row-parallel layer)."""
        x = x.contiguous()
        self._compute_group().allreduce([x]).wait()
        return x

    def all_gather(self, x: Tensor) -> list[Tensor]:
        outs = [torch.empty_like(x) for _ in range(self.world_size)]
        self._compute_group().allgather([outs], [x]).wait()
        return outs

    def broadcast(self, x: Tensor) -> Tensor:
        """``x`` from rank 0 to every rank, in place."""
        self._compute_group().broadcast([x], _root()).wait()
        return x

    # -- control (CPU) --------------------------------------------------------------------------

    def broadcast_ctrl(self, x: Tensor) -> Tensor:
        """A CPU tensor (int64: headers and step inputs; float32: adapter weights) from rank 0 to
        every rank, in place."""
        self._ctrl_group().broadcast([x], _root()).wait()
        return x

    def _ctrl_group(self) -> dist.ProcessGroupGloo:
        if self._ctrl is None:
            raise TPWorkerError("the tensor-parallel group is not connected")
        return self._ctrl

    def _compute_group(self) -> dist.ProcessGroup:
        if self._compute is None:
            raise TPWorkerError("the tensor-parallel group is not connected")
        return self._compute


class LoopbackStore:
    """A ``TCPStore`` server listening on 127.0.0.1 only, on ``port`` (0: a free one).

    ``TCPStore`` binds its own server socket to every interface; handing it a socket already bound
    to loopback (``master_listen_fd``) keeps a one-machine world off the network.
    """

    def __init__(self, world_size: int, port: int = 0) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        self.port: int = listener.getsockname()[1]
        self.store: dist.TCPStore | None = dist.TCPStore(
            "127.0.0.1", self.port, world_size, True, STORE_TIMEOUT,
            wait_for_workers=False, master_listen_fd=listener.detach(),  # the store closes it
        )  # fmt: skip

    def close(self) -> None:
        self.store = None


def _root() -> dist.BroadcastOptions:
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return opts


def _gloo(
    store: dist.Store, rank: int, size: int, timeout: datetime.timedelta, loopback: bool, interface: str
) -> dist.ProcessGroupGloo:
    opts = dist.ProcessGroupGloo._Options()
    if loopback:
        device = dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")
    elif interface:
        device = dist.ProcessGroupGloo.create_device(interface=interface)
    else:
        device = dist.ProcessGroupGloo.create_default_device()
    opts._devices = [device]
    opts._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, size, opts)


# --------------------------------------------------------------------------------------------
# step messages


def send_step(group: TPGroup, input_ids: Tensor, positions: Tensor, attn: AttentionMetadata) -> None:
    """Rank 0: the step's inputs to every other rank (two small CPU broadcasts)."""
    num_seqs, width = attn.block_tables.shape
    header = torch.tensor([CMD_STEP, input_ids.numel(), num_seqs, width], dtype=torch.int64)
    payload = torch.cat(
        [
            input_ids.to(torch.int64), positions.to(torch.int64), attn.slot_mapping.to(torch.int64),
            attn.query_start_loc.to(torch.int64), attn.seq_lens.to(torch.int64),
            attn.block_tables.to(torch.int64).flatten(),
        ]  # fmt: skip
    ).cpu()
    group.broadcast_ctrl(header)
    group.broadcast_ctrl(payload)


def recv_step(group: TPGroup, header: Tensor) -> tuple[Tensor, Tensor, AttentionMetadata]:
    """Other ranks: the inputs announced by ``header``, on this rank's device."""
    _, num_tokens, num_seqs, width = header.tolist()
    payload = group.broadcast_ctrl(torch.empty(3 * num_tokens + 2 * num_seqs + 1 + num_seqs * width, dtype=torch.int64))
    payload = payload.to(group.device)
    ids, pos, slots, starts, lens, tables = payload.split(
        [num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, num_seqs * width]
    )
    attn = AttentionMetadata(
        query_start_loc=starts.to(torch.int32),
        seq_lens=lens.to(torch.int32),
        block_tables=tables.to(torch.int32).view(num_seqs, width),
        slot_mapping=slots.contiguous(),
    )
    return ids.contiguous(), pos.contiguous(), attn


def send_command(group: TPGroup, cmd: int) -> None:
    group.broadcast_ctrl(torch.tensor([cmd, 0, 0, 0], dtype=torch.int64))


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def send_hidden(group: TPGroup, hidden: Tensor) -> Tensor:
    """Rank 0: the hidden rows that sample, announced (shape and dtype) and broadcast."""
    rows, width = hidden.shape
    group.broadcast_ctrl(torch.tensor([CMD_LOGITS, rows, width, _DTYPES.index(hidden.dtype)], dtype=torch.int64))
    return group.broadcast(hidden.contiguous())


def recv_hidden(group: TPGroup, header: Tensor) -> Tensor:
    """Other ranks: the hidden rows announced by ``header``."""
    _, rows, width, dtype = header.tolist()
    return group.broadcast(torch.empty(rows, width, dtype=_DTYPES[dtype], device=group.device))


def recv_header(group: TPGroup) -> Tensor:
    return group.broadcast_ctrl(torch.empty(HEADER_LEN, dtype=torch.int64))
