"""``LoRARegistry``: the named adapters an engine serves, and which of them are in memory.

Runs on the event loop (the backend's side); the step thread sees adapters only through the
requests that carry them (``SequenceGroup.lora``), so the two never share mutable state:

- ``add(name, path)`` reads and checks the adapter (on a worker thread), gives it a fresh
  ``lora_id`` and keeps it; ``remove(name)`` forgets the name at once (new requests get a 404),
  while requests in flight keep their ``LoRAAdapter`` object and finish with it;
- at most ``max_cpu_loras`` adapters stay in memory: ``acquire(name)`` moves one to the most
  recently used end, and reads it from its file again (same ``lora_id``: the same registration)
  when it was dropped.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from pathlib import Path

import structlog
import torch

from backends.engine.lora.adapter import LoRAAdapter, load_adapter
from backends.engine.lora.options import LoRAOptions
from backends.engine.model.config import ModelConfig

log = structlog.get_logger(__name__)

#: one id sequence per process: ids stay unique across engines and reloads
_lora_ids = itertools.count(1)


class LoRARegistry:
    def __init__(self, config: ModelConfig, options: LoRAOptions) -> None:
        self.config = config
        self.options = options
        self._paths: dict[str, tuple[Path, int]] = {}  # name -> (path, lora_id)
        self._loaded: OrderedDict[str, LoRAAdapter] = OrderedDict()  # least recently used first
        self.load_times_s: dict[str, float] = {}  # name -> seconds its last read took

    def names(self) -> tuple[str, ...]:
        return tuple(self._paths)

    def read(self, name: str, path: str | Path, lora_id: int | None = None) -> LoRAAdapter:
        """Read and check an adapter (blocking: call on a worker thread). ``AdapterError`` names
        the file and tensor that are wrong."""
        started = time.perf_counter()
        adapter = load_adapter(
            path, self.config, name=name, lora_id=next(_lora_ids) if lora_id is None else lora_id,
            max_rank=self.options.max_lora_rank, dtype=torch.float32,
        )  # fmt: skip
        self.load_times_s[name] = time.perf_counter() - started
        return adapter

    def keep(self, adapter: LoRAAdapter) -> None:
        """Serve ``adapter`` under its name (replacing an adapter of that name)."""
        self._paths[adapter.name] = (adapter.path, adapter.lora_id)
        self._remember(adapter)
        log.info("lora.loaded", lora_name=adapter.name, path=str(adapter.path), ranks=adapter.ranks,
                 mib=round(adapter.num_bytes / 2**20, 2), load_s=round(self.load_times_s[adapter.name], 3))  # fmt: skip

    async def add(self, name: str, path: str | Path) -> LoRAAdapter:
        adapter = await asyncio.to_thread(self.read, name, path)
        self.keep(adapter)
        return adapter

    def remove(self, name: str) -> bool:
        self._loaded.pop(name, None)
        return self._paths.pop(name, None) is not None

    async def acquire(self, name: str) -> LoRAAdapter | None:
        """The adapter named ``name`` for a new request (None when no such adapter is served)."""
        adapter = self._loaded.get(name)
        if adapter is not None:
            self._loaded.move_to_end(name)
            return adapter
        entry = self._paths.get(name)
        if entry is None:
            return None
        path, lora_id = entry
        adapter = await asyncio.to_thread(self.read, name, path, lora_id)
        if self._paths.get(name) != entry:  # unloaded (or replaced) while it was read
            return None
        self._remember(adapter)
        return adapter

    def _remember(self, adapter: LoRAAdapter) -> None:
        self._loaded[adapter.name] = adapter
        self._loaded.move_to_end(adapter.name)
        while len(self._loaded) > self.options.max_cpu_loras:
            self._loaded.popitem(last=False)
