"""LoRA adapters under tensor parallelism: each rank stacks its own slice of every adapter, and
rank 0 tells the other ranks, with the steps, which adapters they hold and which row uses which.

Slicing (``shard_adapter``) follows the base weights' (``shard.py``), in the fused layout of
``lora.adapter`` (``a [R, in]``, ``bt [R, out]``, ``delta = (x @ a.T) @ bt``):

- ``qkv`` and ``gate_up`` are column parallel: a rank keeps ``a`` whole and the columns of ``bt``
  (B's output rows) of its own output rows (its q, k and v heads; its gate and up columns);
- ``o`` and ``down`` are row parallel: a rank keeps the columns of ``a`` of its own inputs and
  ``bt`` whole. Its partial term ``((x_r @ a_r.T) * mask) @ bt`` joins its partial product before
  the layer's one all-reduce (``apply_lora`` wraps the row-parallel layer's inner linear): the
  ranks' ``x_r @ a_r.T`` sum to ``x @ a.T``, and the mask and ``@ bt`` are linear, so the sum is
  the whole term.

Who holds what. Adapters live in rank 0's registry (``lora.registry``: read from their files,
loaded and unloaded at run time there). The other ranks never read adapter files (under torchrun
they may sit on machines without them): rank 0's ``LoRASlots`` decide which adapters are resident
for a step, and ``LoRASender`` makes every rank hold exactly those. An adapter loaded at run time
(``POST /v1/load_lora_adapter``) reaches the other ranks with the first step that uses it; one
unloaded (or pushed out by the LRU) leaves them when rank 0's slots drop it, after its requests in
flight finished on every rank. The messages go on the step thread's control broadcasts, in order
with the steps, so no load or unload can race a step.

Message (rank 0 -> all, on ``ctrl``, before a ``STEP`` that uses an adapter or after rank 0 drops
one): a header ``int64[4] = [LORA, D, A, T]``; an int64 payload ``drop ids[D] | add ids[A] |
add ranks[A * 4] (R per kind, in ``KINDS`` order, 0: not adapted) | row ids[T] (-1: base)``; when
``A > 0``, one float32 payload: per added adapter, per layer, per adapted kind, ``a`` then ``bt``
flattened. Whole adapters travel (each rank cuts its own slice): one broadcast instead of one send
per rank, at the cost of ``world_size`` times the bytes a rank keeps.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from backends.engine.lora.adapter import KINDS, LoRAAdapter, kind_shapes
from backends.engine.lora.slots import LoRASlots
from backends.engine.model.config import ModelConfig
from backends.engine.tp.comm import CMD_LORA, TPGroup
from backends.engine.tp.shard import ShardPlan

if TYPE_CHECKING:
    from backends.engine.lora.options import LoRAOptions


def shard_adapter(adapter: LoRAAdapter, *, plan: ShardPlan, config: ModelConfig) -> LoRAAdapter:
    """This rank's slice of ``adapter`` (module doc), cut where ``shard_model`` cuts the base."""
    out_cols = {"qkv": plan.qkv_rows(config), "gate_up": plan.gate_up_rows(config)}
    in_cols = {"o": plan.attn_cols(config), "down": plan.ffn}
    layers: list[dict[str, tuple[Tensor, Tensor]]] = []
    for fused in adapter.layers:
        mine: dict[str, tuple[Tensor, Tensor]] = {}
        for kind, (a, bt) in fused.items():
            if kind in out_cols:  # column parallel: A whole, this rank's output columns of B^T
                mine[kind] = (a, torch.cat([bt[:, start:stop] for start, stop in out_cols[kind]], dim=1))
            else:  # row parallel: this rank's input columns of A, B^T whole
                start, stop = in_cols[kind]
                mine[kind] = (a[:, start:stop].contiguous(), bt)
        layers.append(mine)
    return LoRAAdapter(adapter.name, adapter.path, adapter.lora_id, adapter.ranks, layers)


def rank_lora(
    model: torch.nn.Module, plan: ShardPlan, config: ModelConfig, options: LoRAOptions, device: torch.device
) -> LoRASlots:
    """``apply_lora`` on a rank's sharded (and fused) ``model`` with slots that stack this rank's
    slice of each adapter; ``config`` is the whole model's."""
    from backends.engine.lora.layers import apply_lora

    slots = LoRASlots(
        config.num_layers, max_loras=options.max_loras, dtype=torch.float32, device=device,
        shard=functools.partial(shard_adapter, plan=plan, config=config),
    )  # fmt: skip
    apply_lora(model, slots)
    return slots


def _flat_size(ranks: dict[str, int], config: ModelConfig) -> int:
    shapes = kind_shapes(config)
    return config.num_layers * sum(r * (shapes[kind][0] + shapes[kind][1]) for kind, r in ranks.items())


class LoRASender:
    """Rank 0: brings the other ranks up to date with rank 0's slots before each step.

    Invariant: after each message, the other ranks hold exactly the adapters resident in rank 0's
    slots (``held``, their ids), so they can build any step's rows, and hold no more than
    ``max_loras`` adapters.
    """

    def __init__(self, slots: LoRASlots, config: ModelConfig) -> None:
        self.slots = slots
        self.config = config
        self.held: set[int] = set()

    def forget(self) -> None:
        """A new world: the other ranks hold nothing (rank 0's slots keep theirs)."""
        self.held = set()

    def send(self, group: TPGroup) -> None:
        """The message for the step ``slots.prepare`` just set up, if it needs one."""
        batch, resident = self.slots.batch, self.slots.resident
        drops = [lora_id for lora_id in self.held if lora_id not in resident]
        if not batch.active and not drops:
            return  # a base-only step: the other ranks see no LORA message and run the base
        adds = [adapter for lora_id, adapter in resident.items() if lora_id not in self.held]
        rows = batch.row_ids.cpu() if batch.row_ids is not None else torch.empty(0, dtype=torch.int64)
        ranks = [[a.ranks.get(kind, 0) for kind in KINDS] for a in adds]
        payload = torch.cat([
            torch.tensor(drops, dtype=torch.int64), torch.tensor([a.lora_id for a in adds], dtype=torch.int64),
            torch.tensor(ranks, dtype=torch.int64).flatten(), rows,
        ])  # fmt: skip
        group.broadcast_ctrl(torch.tensor([CMD_LORA, len(drops), len(adds), rows.numel()], dtype=torch.int64))
        group.broadcast_ctrl(payload)
        if adds:
            # per adapter, per layer, per adapted kind (in KINDS order, as the ranks table): a, bt
            weights = [t.float().flatten() for a in adds for layer in a.layers for kind in KINDS if kind in layer
                       for t in layer[kind]]  # fmt: skip
            group.broadcast_ctrl(torch.cat(weights))
        self.held = set(resident)


class LoRAReceiver:
    """Ranks > 0: the adapters rank 0 says this rank holds (whole; its slots stack its slice), and
    the rows of the next step."""

    def __init__(self, slots: LoRASlots, config: ModelConfig) -> None:
        self.slots = slots
        self.config = config
        self.held: dict[int, LoRAAdapter] = {}
        self._rows: list[LoRAAdapter | None] | None = None  # the next step's, when rank 0 sent them

    def receive(self, group: TPGroup, header: Tensor) -> None:
        _, num_drops, num_adds, num_rows = header.tolist()
        k = len(KINDS)
        payload = group.broadcast_ctrl(torch.empty(num_drops + (1 + k) * num_adds + num_rows, dtype=torch.int64))
        drops, adds, ranks, rows = payload.split([num_drops, num_adds, k * num_adds, num_rows])
        for lora_id in drops.tolist():
            self.held.pop(lora_id, None)
        if num_adds:
            rows_of_ranks = ranks.view(num_adds, len(KINDS)).tolist()
            tables = [{kind: r for kind, r in zip(KINDS, row, strict=True) if r} for row in rows_of_ranks]
            sizes = [_flat_size(t, self.config) for t in tables]
            weights = group.broadcast_ctrl(torch.empty(sum(sizes), dtype=torch.float32))
            for lora_id, table, flat in zip(adds.tolist(), tables, weights.split(sizes), strict=True):
                self.held[lora_id] = self._unflatten(lora_id, table, flat)
        self._rows = [None if lora_id < 0 else self.held[lora_id] for lora_id in rows.tolist()]

    def prepare_step(self) -> None:
        """Before each step: its rows' adapters (all base when rank 0 sent no rows)."""
        self.slots.prepare(self._rows or ())
        self._rows = None

    def _unflatten(self, lora_id: int, ranks: dict[str, int], flat: Tensor) -> LoRAAdapter:
        shapes = [(r, *kind_shapes(self.config)[kind]) for kind, r in ranks.items()]  # (R, in, out) per kind
        sizes = [n for _ in range(self.config.num_layers) for r, i, o in shapes for n in (r * i, r * o)]
        parts = iter(flat.clone().split(sizes))  # its own storage: dropping the adapter frees it
        layers = [
            {kind: (next(parts).view(r, i), next(parts).view(r, o)) for kind, (r, i, o) in zip(ranks, shapes, strict=True)}
            for _ in range(self.config.num_layers)
        ]
        return LoRAAdapter(f"lora-{lora_id}", Path(), lora_id, ranks, layers)
