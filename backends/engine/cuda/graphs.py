"""``DecodeGraphs``: decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is hundreds of launches of microsecond kernels; replaying a
captured graph issues them all with one call. Each bucket (1, 2, 4, 8, 16, 32, 64, … up to
``max_batch``) is captured once, at start, from ``GpuCausalLM.decode`` + ``compute_logits``
over static inputs (``capture``; uncaptured, ``run`` executes the same step eagerly); a step of ``n`` sequences fills the inputs of the smallest bucket that holds
it, pads the rest, and replays. All graphs share one memory pool (they never run at once).

The static inputs are one int64 buffer, filled on the host (pinned) and copied in one transfer:
``ids | positions | seq_lens | slots | block tables [max_batch, width]``. Only the prefix a
bucket reads is copied, and only the blocks a row's context needs are written: entries past a
row's context are never read. Padding rows decode token 0 at position 0 with a context of one
token in ``pad_block``, a cache block set aside for them (the runner allocates one block more
than the scheduler hands out), so they write nothing any sequence reads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import structlog
import torch
from torch import Tensor

from backends.engine.cuda.model import GpuCausalLM
from backends.engine.model.attention import KVCache

log = structlog.get_logger(__name__)


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(
        self, model: GpuCausalLM, kv_caches: KVCache, *, max_batch: int, max_blocks_per_seq: int, pad_block: int
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.max_batch = max_batch
        self.width = max_blocks_per_seq
        self.pad_block = pad_block
        self.block_size = kv_caches[0][0].shape[1]
        self.buckets = bucket_sizes(max_batch)
        b, w = max_batch, max_blocks_per_seq
        self._host = torch.zeros(4 * b + b * w, dtype=torch.int64)
        if model.device.type == "cuda":
            self._host = self._host.pin_memory()
        self._np = self._host.numpy()
        self._device = torch.empty_like(self._host, device=model.device)
        self._fill_padding(0, b)
        self._device.copy_(self._host)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.memory_bytes = 0
        self.capture_s = 0.0
        self.replays = 0  # decode steps run through ``run``

    def _views(self, buf: Tensor | np.ndarray, n: int):  # type: ignore[no-untyped-def]
        b = self.max_batch
        tables = buf[4 * b : 4 * b + n * self.width].reshape(n, self.width)
        return buf[0:n], buf[b : b + n], buf[2 * b : 2 * b + n], buf[3 * b : 3 * b + n], tables

    def _fill_padding(self, start: int, stop: int) -> None:
        ids, pos, lens, slots, _ = self._views(self._np, self.max_batch)
        ids[start:stop] = 0
        pos[start:stop] = 0
        lens[start:stop] = 1
        slots[start:stop] = self.pad_block * self.block_size
        tables = self._np[4 * self.max_batch :].reshape(self.max_batch, self.width)
        tables[start:stop, 0] = self.pad_block

    def _step(self, n: int) -> Tensor:
        ids, pos, lens, slots, tables = self._views(self._device, n)
        hidden = self.model.decode(ids, pos, tables, lens, slots, self.kv_caches)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (the pool grows to the largest once)."""
        start = time.perf_counter()
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        for n in sorted(self.buckets, reverse=True):
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # first runs pick kernels and workspaces outside the graph
                for _ in range(2):
                    self._step(n)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._step(n)
            self.graphs[n] = (graph, out)
        torch.cuda.synchronize()
        self.memory_bytes = torch.cuda.memory_reserved() - before
        self.capture_s = time.perf_counter() - start
        log.info("engine.cuda_graphs", buckets=self.buckets, mib=round(self.memory_bytes / 2**20, 1),
                 seconds=round(self.capture_s, 2))  # fmt: skip

    def bucket(self, n: int) -> int:
        for size in self.buckets:
            if size >= n:
                return size
        raise ValueError(f"{n} sequences exceed the largest graph ({self.max_batch})")

    def run(
        self, input_ids: Sequence[int], positions: Sequence[int], seq_lens: Sequence[int], slots: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> Tensor:  # fmt: skip
        """Float32 logits ``[n, vocab]`` of one decode step of ``n`` sequences. The tensor is the
        graph's output buffer: read it before the next ``run``."""
        n = len(input_ids)
        size = self.bucket(n)
        self.replays += 1
        ids, pos, lens, slot, tables = self._views(self._np, size)
        ids[:n] = input_ids
        pos[:n] = positions
        lens[:n] = seq_lens
        slot[:n] = slots
        for row, table in zip(tables, block_tables, strict=False):
            row[: len(table)] = table
        if n < size:
            self._fill_padding(n, size)
        used = 4 * self.max_batch + size * self.width
        self._device[:used].copy_(self._host[:used], non_blocking=True)
        if size not in self.graphs:  # not captured (a CPU test of the static inputs): run it eagerly
            return self._step(size)[:n]
        graph, out = self.graphs[size]
        graph.replay()
        return out[:n]
