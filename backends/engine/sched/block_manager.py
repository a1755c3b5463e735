"""Paged KV-cache block allocation with reference counts and prefix caching.

Plain Python, no torch: the cache tensors live in the model runner; this module only decides which
block ids each sequence's tokens go to.

Every block is in exactly one of three places:

* *free*: refcount 0, no hash; handed out first.
* *used*: refcount > 0; listed in that many block tables.
* *evictable*: refcount 0 but holding a prefix-cache hash, so its keys/values can still be reused
  by a later sequence with the same prefix. When no free block is left the least recently
  released evictable block loses its hash and is handed out.

Prefix caching: a *full*, *computed* block is identified by a hash chain,
``hash_block(hash of the previous block, token ids of this block)``, so equal hashes mean equal
whole prefixes and the block's keys/values can be reused as they are. Blocks enter the cache only
after the step that computed them (``cache_full_blocks``), never while being written. The hash is
SHA-256: the cache is shared by every request, so a colliding hash would hand one user's keys and
values to another, and Python's built-in ``hash`` of int tuples can be collided on purpose.

Only full blocks are ever shared, and a sequence only writes at positions at or past its
``num_computed_tokens``, which lie in blocks it owns alone; so no block is ever written while shared.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence as SequenceABC

import msgspec

from backends.engine.sched.sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    """An allocation was attempted without checking ``can_allocate`` first (a scheduler bug)."""


def hash_block(prev_hash: bytes | None, token_ids: SequenceABC[int]) -> bytes:
    """Chain hash of a full block: identifies the whole prefix up to and including this block."""
    h = hashlib.sha256(prev_hash or b"")
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def lora_seed(seq: Sequence) -> bytes | None:
    """The hash chain's seed: None for the base model, else the adapter's id, so a prefix computed
    with one adapter (or none) is never served to a request with another."""
    lora_id = seq.group.lora_id if seq.group is not None else 0
    return None if lora_id == 0 else b"lora:%d" % lora_id


class BlockManagerStats(msgspec.Struct, frozen=True, kw_only=True):
    num_blocks: int
    block_size: int
    num_used_blocks: int  # referenced by at least one sequence
    num_free_blocks: int  # allocatable now: never-cached free blocks plus evictable cached ones
    num_evictable_blocks: int  # unreferenced but still holding a cached prefix
    num_cached_blocks: int  # holding a prefix hash, referenced or not
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        if self.prefix_cache_queried_tokens == 0:
            return 0.0
        return self.prefix_cache_hit_tokens / self.prefix_cache_queried_tokens


class BlockManager:
    """Allocates KV-cache blocks to sequences.

    Not thread-safe; owned by the scheduler. A sequence's ``block_table`` is written only here.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        # refcount-0 cached blocks, least recently released first
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}  # hash -> block id
        self._queried_tokens = 0
        self._hit_tokens = 0

    # -- queries ------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (free, plus evictable cached blocks)."""
        return len(self._free) + len(self._evictable)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        return self._block_hash[block_id] is not None

    def blocks_for(self, num_tokens: int) -> int:
        """Number of blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks ``seq`` must gain so that its table covers its first ``num_tokens`` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached block ids holding ``seq``'s leading full blocks; changes nothing.

        Stops at the first miss, and always leaves at least the last token uncomputed: its logits
        are needed to sample.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self._cached.get(self._seq_block_hash(seq, i))
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def num_blocks_to_admit(self, seq: Sequence, cached_blocks: SequenceABC[int], num_tokens: int) -> int:
        """Free blocks consumed by admitting ``seq`` with ``cached_blocks`` to cover ``num_tokens``.

        Reusing an evictable cached block takes it out of the free count; reusing a used one is free.
        """
        num_revived = sum(1 for b in cached_blocks if self._ref_counts[b] == 0)
        return num_revived + max(0, self.blocks_for(num_tokens) - len(cached_blocks))

    # -- changes ------------------------------------------------------------------------------

    def allocate_cached(self, seq: Sequence, cached_blocks: SequenceABC[int]) -> int:
        """Start ``seq``'s (empty) block table with the ``match_prefix`` hits; returns hit tokens.

        Counts the lookup in the hit-rate statistics. The caller sets ``num_computed_tokens``.
        """
        assert not seq.block_table, "allocate_cached needs an empty block table"
        for block_id in cached_blocks:
            self._take_ref(block_id)
        seq.block_table = list(cached_blocks)
        num_hit_tokens = len(cached_blocks) * self.block_size
        if self.enable_prefix_caching:
            self._queried_tokens += seq.num_tokens
            self._hit_tokens += num_hit_tokens
        return num_hit_tokens

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq``'s block table with fresh blocks to cover its first ``num_tokens`` tokens."""
        num_new = self.num_new_blocks(seq, num_tokens)
        if num_new > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {num_new} blocks, {self.num_free_blocks} free")
        for _ in range(num_new):
            seq.block_table.append(self._pop_free())

    def fork(self, parent: Sequence, child: Sequence, num_blocks: int) -> None:
        """Give ``child`` (with an empty table) references to ``parent``'s first ``num_blocks`` blocks.

        Only share full, computed blocks: the child's later tokens go to blocks of its own.
        """
        assert not child.block_table, "fork needs an empty child block table"
        assert num_blocks * self.block_size <= parent.num_computed_tokens
        child.block_table = parent.block_table[:num_blocks]
        for block_id in child.block_table:
            self._take_ref(block_id)
        child.block_hashes = parent.block_hashes[:num_blocks]

    def cache_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Publish the blocks that became full and computed since ``num_computed_before``.

        Called after a step's forward pass, once ``seq.num_computed_tokens`` has advanced. A block
        whose prefix is already cached in another block stays private (and is simply freed later).
        """
        if not self.enable_prefix_caching:
            return
        first = num_computed_before // self.block_size
        last = seq.num_computed_tokens // self.block_size
        for i in range(first, last):
            block_id = seq.block_table[i]
            # computed this step, so written this step: private and not yet cached
            assert self._block_hash[block_id] is None and self._ref_counts[block_id] == 1
            block_hash = self._seq_block_hash(seq, i)
            if block_hash not in self._cached:
                self._cached[block_hash] = block_id
                self._block_hash[block_id] = block_hash

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references and empty its table.

        Released in reverse so a sequence's tail blocks are evicted before its head: the head is
        the prefix most likely to be asked for again.
        """
        for block_id in reversed(seq.block_table):
            self._ref_counts[block_id] -= 1
            assert self._ref_counts[block_id] >= 0
            if self._ref_counts[block_id] == 0:
                if self._block_hash[block_id] is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)
        seq.block_table = []

    def stats(self) -> BlockManagerStats:
        num_free = self.num_free_blocks
        return BlockManagerStats(
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            num_used_blocks=self.num_blocks - num_free,
            num_free_blocks=num_free,
            num_evictable_blocks=len(self._evictable),
            num_cached_blocks=len(self._cached),
            prefix_cache_queried_tokens=self._queried_tokens,
            prefix_cache_hit_tokens=self._hit_tokens,
        )

    # -- internals ----------------------------------------------------------------------------

    def _take_ref(self, block_id: int) -> None:
        if self._ref_counts[block_id] == 0:
            # a refcount-0 block handed out by match_prefix is cached, hence evictable
            del self._evictable[block_id]
        self._ref_counts[block_id] += 1

    def _pop_free(self) -> int:
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            del self._cached[self._block_hash[block_id]]  # type: ignore[arg-type]
            self._block_hash[block_id] = None
        assert self._ref_counts[block_id] == 0
        self._ref_counts[block_id] = 1
        return block_id

    def _seq_block_hash(self, seq: Sequence, i: int) -> bytes:
        """Hash of ``seq``'s full block ``i``, extending the sequence's memo as needed."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) <= i:
            j = len(hashes)
            prev = hashes[j - 1] if j else lora_seed(seq)
            hashes.append(hash_block(prev, seq.token_ids[j * bs : (j + 1) * bs]))
        return hashes[i]

    def check_invariants(self, block_tables: Iterable[SequenceABC[int]]) -> None:
        """Assert the books balance against every live block table (tests and debugging).

        Each block is exactly one of free, evictable or used; each refcount is the number of
        tables listing the block; the hash index and the blocks agree.
        """
        listed = [0] * self.num_blocks
        for table in block_tables:
            assert len(set(table)) == len(table), f"block listed twice in one table: {table}"
            for block_id in table:
                listed[block_id] += 1
        free = set(self._free)
        assert len(free) == len(self._free), "free pool holds a block twice"
        for block_id in range(self.num_blocks):
            ref = self._ref_counts[block_id]
            assert ref == listed[block_id], f"block {block_id}: refcount {ref}, in {listed[block_id]} tables"
            in_free, in_evictable = block_id in free, block_id in self._evictable
            cached = self._block_hash[block_id] is not None
            assert in_free + in_evictable + (ref > 0) == 1, f"block {block_id} in several places"
            assert not (in_free and cached), f"free block {block_id} still has a hash"
            assert not in_evictable or cached, f"evictable block {block_id} has no hash"
        assert len(self._cached) == sum(h is not None for h in self._block_hash)
        for block_hash, block_id in self._cached.items():
            assert self._block_hash[block_id] == block_hash
