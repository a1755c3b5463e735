"""``LoRASlots``: the adapters a step can use (at most ``max_loras``), stacked per layer and
projection, and ``LoRABatch``: which of them each row of the current step uses.

Invariants:
- ``resident`` holds at most ``max_loras`` adapters, least recently used first. ``prepare`` makes
  every adapter of the step resident, evicting the least recently used ones the step does not use;
  the scheduler admits no more than ``max_loras`` distinct adapters among running sequences, so a
  step never needs more (a violation is a scheduler bug and raises).
- ``stacks[layer][kind]`` is ``(a [K, in], bt [K, out])``: the resident adapters' fused weights
  (under tensor parallelism this rank's slice of each, ``shard``) concatenated along the rank, in
  ``resident`` order; ``owners[kind]`` ``[K]`` is the ``lora_id``
  owning each of the ``K`` columns. Rebuilt whenever ``resident`` changes, never during a step.
- ``batch.masks[kind]`` ``[T, K]`` is 1 where column ``k`` belongs to row ``t``'s adapter, else 0;
  a base row's mask is all zeros, so its LoRA term is exactly 0 and its output bit-identical to
  the base model's.

Why one dense matmul over every resident adapter rather than a loop per adapter: a loop costs ~4
torch ops per adapter per projection (16 adapters x 4 projections x 30 layers = ~7,700 dispatches
a step on SmolLM2); the masked matmul costs 3 ops per projection whatever the mix, and its wasted
multiplications (rows x other adapters' ranks) are small beside the base projection.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from backends.engine.lora.adapter import KINDS, LoRAAdapter


class LoRABatch:
    """This step's rows as the LoRA projections see them. ``active``: some row uses an adapter
    (otherwise the projections and the native one-call decode step run untouched)."""

    def __init__(self) -> None:
        self.active = False
        self.masks: dict[str, Tensor] = {}
        #: per kind, each row's columns of the stacks: int32 ``start [T]`` and ``count [T]`` (0: a
        #: base row), what the native one-call decode step reads instead of the masks
        self.columns: dict[str, tuple[Tensor, Tensor]] = {}
        #: int64 ``[T]``: each row's ``lora_id``, -1 for a base row (what tensor parallelism sends
        #: the other ranks); None when not ``active``
        self.row_ids: Tensor | None = None


class LoRASlots:
    """``shard``: what of an adapter this process stacks (tensor parallelism: this rank's slice,
    ``tp.lora.shard_adapter``); by default the whole adapter. ``resident`` keeps the adapters as
    given, each shard is made once, when its adapter moves in."""

    def __init__(
        self, num_layers: int, *, max_loras: int, dtype: torch.dtype, device: torch.device | str = "cpu",
        shard: Callable[[LoRAAdapter], LoRAAdapter] | None = None,
    ) -> None:  # fmt: skip
        if max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        self.num_layers = num_layers
        self.max_loras = max_loras
        self.dtype = dtype
        self.device = torch.device(device)
        self.resident: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._shard = shard
        self._stacked: dict[int, LoRAAdapter] = {}  # lora_id -> what is stacked of a resident adapter
        self.stacks: list[dict[str, tuple[Tensor, Tensor]]] = [{} for _ in range(num_layers)]
        self.owners: dict[str, Tensor] = {}
        self.spans: dict[str, dict[int, tuple[int, int]]] = {}  # kind -> lora_id -> (first column, count)
        self.batch = LoRABatch()
        self.num_swaps = 0  # adapters moved into the slots since start (a figure for stats)

    def prepare(self, row_adapters: Sequence[LoRAAdapter | None]) -> None:
        """Set the step's rows (one entry per token of the flattened batch, None = base)."""
        batch = self.batch
        step = {a.lora_id: a for a in row_adapters if a is not None}
        if not step:
            batch.active = False
            batch.masks = {}
            batch.columns = {}
            batch.row_ids = None
            return
        missing = [a for lora_id, a in step.items() if lora_id not in self.resident]
        for lora_id in step:
            if lora_id in self.resident:
                self.resident.move_to_end(lora_id)
        if missing:
            self._make_room(len(missing), keep=step.keys())
            for adapter in missing:
                self.resident[adapter.lora_id] = adapter
                self._stacked[adapter.lora_id] = adapter if self._shard is None else self._shard(adapter)
            self.num_swaps += len(missing)
            self._rebuild()
        ids = torch.tensor([-1 if a is None else a.lora_id for a in row_adapters], dtype=torch.int64, device=self.device)
        # a kind no adapter of this step adapts gets no mask: its projections add nothing
        kinds = {kind for a in step.values() for kind in a.ranks}
        batch.masks = {
            kind: (owners.unsqueeze(0) == ids.unsqueeze(1)).to(self.dtype) for kind, owners in self.owners.items() if kind in kinds
        }
        batch.columns = {}
        for kind in batch.masks:
            spans = self.spans[kind]
            ranges = [spans.get(a.lora_id, (0, 0)) if a is not None else (0, 0) for a in row_adapters]
            table = torch.tensor(ranges, dtype=torch.int32).t().contiguous()
            batch.columns[kind] = (table[0], table[1])
        batch.row_ids = ids
        batch.active = True

    def evict(self, lora_id: int) -> None:
        """Drop an adapter from the slots (its requests are done; it was unloaded)."""
        if self.resident.pop(lora_id, None) is not None:
            del self._stacked[lora_id]
            self._rebuild()

    def _make_room(self, needed: int, keep: object) -> None:
        for lora_id in list(self.resident):
            if len(self.resident) + needed <= self.max_loras:
                return
            if lora_id not in keep:  # type: ignore[operator]
                del self.resident[lora_id]
                del self._stacked[lora_id]
        if len(self.resident) + needed > self.max_loras:
            raise RuntimeError(f"a step uses more than max_loras = {self.max_loras} adapters (a scheduler bug)")

    def _rebuild(self) -> None:
        adapters = [self._stacked[lora_id] for lora_id in self.resident]
        dev, dtype = self.device, self.dtype
        self.owners = {}
        self.spans = {}
        for kind in KINDS:
            having = [a for a in adapters if kind in a.ranks]
            if not having:
                for stack in self.stacks:
                    stack.pop(kind, None)
                continue
            self.owners[kind] = torch.cat([torch.full((a.ranks[kind],), a.lora_id, dtype=torch.int64) for a in having]).to(dev)
            starts = [0]
            for a in having:
                starts.append(starts[-1] + a.ranks[kind])
            self.spans[kind] = {a.lora_id: (start, a.ranks[kind]) for a, start in zip(having, starts, strict=False)}
            for layer, stack in enumerate(self.stacks):
                a_cat = torch.cat([a.layers[layer][kind][0] for a in having]).to(device=dev, dtype=dtype)
                bt_cat = torch.cat([a.layers[layer][kind][1] for a in having]).to(device=dev, dtype=dtype)
                stack[kind] = (a_cat, bt_cat)
