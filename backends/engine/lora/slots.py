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
- ``batch.columns[kind]``: each row's columns, what the native kernel reads (``lora_add_bf16``,
  fused layers: every row summed in one order, whatever the step's other rows);
- ``batch.terms[kind]`` (``KindTerms``) says how the step's rows get their term on torch's path
  (plain layers: the float32 reference, no native kernels): ``runs``, spans of
  at least ``MIN_RUN`` consecutive rows of one adapter (a prompt's chunk: rows of a sequence are
  contiguous in the flattened batch), each computed on its own columns only; the other rows through
  one masked matmul, ``mask`` ``[rows, K]`` 1 where column ``k`` belongs to the row's adapter, else
  0. Base rows are in neither, so their LoRA term is exactly 0 and their output bit-identical to the
  base model's.

Why a masked matmul over every resident adapter for short runs (decode rows) rather than a loop per
adapter: a loop costs ~4 torch ops per adapter per projection (16 adapters x 4 projections x 30
layers = ~7,700 dispatches a step on SmolLM2); the masked matmul costs 3 ops per projection whatever
the mix. Its wasted multiplications grow with rows x resident columns, though: for a 512-token
prompt chunk with 16 resident rank-16 adapters, one qkv projection took 105 ms masked against 13 ms
on the adapter's own columns, so long runs take their own two matmuls (views, no copies).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from itertools import groupby
from typing import NamedTuple

import torch
from torch import Tensor

from backends.engine.lora.adapter import KINDS, LoRAAdapter


#: the shortest run of one adapter's consecutive rows computed on its own columns (module doc): a run
#: costs three torch ops, a masked row rows x resident columns multiplications
MIN_RUN = 8


class KindTerms(NamedTuple):
    """How one kind's term is computed this step (module doc)."""

    #: ``(first row, end row, first column, rank)``: long runs of one adapter's rows
    runs: list[tuple[int, int, int, int]]
    #: int64 row indices of the masked product; None: every row of the step (no runs were taken out)
    rows: Tensor | None
    #: ``[len(rows) or T, K]``; None when no row is left for the masked product
    mask: Tensor | None


class LoRABatch:
    """This step's rows as the LoRA projections see them. ``active``: some row uses an adapter
    (otherwise the projections and the native one-call decode step run untouched)."""

    def __init__(self) -> None:
        self.active = False
        #: per kind some adapter of the step adapts; a kind not here adds nothing
        self.terms: dict[str, KindTerms] = {}
        #: per kind, each row's columns of the stacks: int32 ``start [T]`` and ``count [T]`` (0: a
        #: base row), what the native kernel reads instead of the masks (fused layers, every step)
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
            batch.terms = {}
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
        row_ids = [-1 if a is None else a.lora_id for a in row_adapters]
        ids = torch.tensor(row_ids, dtype=torch.int64, device=self.device)
        runs: list[tuple[int, int, int]] = []  # (first row, end row, lora_id) of long adapter runs
        row = 0
        for lora_id, group in groupby(row_ids):
            end = row + sum(1 for _ in group)
            if lora_id != -1 and end - row >= MIN_RUN:
                runs.append((row, end, lora_id))
            row = end
        # a kind no adapter of this step adapts gets no terms: its projections add nothing
        kinds = {kind for a in step.values() for kind in a.ranks}
        batch.terms = {kind: self._terms(kind, ids, runs) for kind in self.owners if kind in kinds}
        batch.columns = {}
        for kind in batch.terms:
            spans = self.spans[kind]
            ranges = [spans.get(a.lora_id, (0, 0)) if a is not None else (0, 0) for a in row_adapters]
            table = torch.tensor(ranges, dtype=torch.int32).t().contiguous()
            batch.columns[kind] = (table[0], table[1])
        batch.row_ids = ids
        batch.active = True

    def _terms(self, kind: str, ids: Tensor, runs: list[tuple[int, int, int]]) -> KindTerms:
        spans, owners = self.spans[kind], self.owners[kind]
        own = [(start, end, *spans[lora_id]) for start, end, lora_id in runs if lora_id in spans]
        if not own:
            return KindTerms([], None, (owners.unsqueeze(0) == ids.unsqueeze(1)).to(self.dtype))
        masked = ids != -1
        for start, end, _, _ in own:
            masked[start:end] = False
        rows = masked.nonzero().squeeze(1)
        if rows.numel() == 0:
            return KindTerms(own, None, None)
        return KindTerms(own, rows, (owners.unsqueeze(0) == ids[rows].unsqueeze(1)).to(self.dtype))

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
