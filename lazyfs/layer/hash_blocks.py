"""The dm-verity hash blocks of one layer, verified, fetched when a read first needs them.

At open only the superblock and the top of the tree arrive, with the chunk table
(`add_window`). A lower hash block is fetched the first time a data block under it is read,
checked against its parent (verified first: a tree is checked from the root down) and kept.
Readers that need the same block at the same time share one fetch, as chunks do in the cache.

The protocol, all on the trio thread (no await between looking at the state and changing it):

- A block that matched its parent is verified: the levels above the lowest are kept for the
  mount's life (1/64 of level 0 with sha512 digests and 4 KiB blocks: 1/4096 of the image);
  level-0 blocks (1/64 of the image) live in the layer's chunk cache, counted in its cap
  with the chunks and evicted with them, keyed by the root digest that authenticates them.
  One evicted is fetched again (and checked against its parent) when a load needs it. The
  RECENT_BLOCKS verified last are also kept by the layer itself, so that the blocks a load
  just fetched are there when it checks its data, however small the cache.
- `_bad[offset]` says why a block did not match (or its parent did not). It is remembered: the
  data under it fails with EIO at once, and the other blocks of the tree are unaffected.
- `_loading[offset]` is the event of a block some task is fetching. Others wait for it and look
  again; the loader sets it in every outcome. A failed fetch is not remembered.
- The blocks a task loads are verified level by level, top first, and each level's events are
  set as soon as it is checked; a task waits only for blocks above the ones it checks, so two
  tasks loading parts of one path never wait for each other in a circle.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio

from lazyfs.cache.memory import ChunkCache
from lazyfs.exception_groups import leaf_errors
from lazyfs.fetch.base import BlobReader
from lazyfs.fetch.errors import FetchError
from lazyfs.format.errors import IntegrityError
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.open_plan import contiguous
from lazyfs.format.verity_tree import VerityGeometry, check_hash_blocks, hash_blocks_needed
from lazyfs.layer.stats import ImageStats

log = logging.getLogger(__name__)

# Level-0 blocks a layer keeps itself, the last verified (a 16 MiB run needs 64 with sha512).
RECENT_BLOCKS = 256
# A path's blocks are looked up again after a load another task started has failed; after
# this many rounds the read fails like any fetch that failed.
_MAX_ROUNDS = 3


@dataclass(frozen=True)
class Coverage:
    """What the tree says about a range of data blocks: the verified level-0 blocks to check
    them against (a private copy, safe to hand to a worker thread) and, by payload offset,
    the level-0 blocks that could not be verified, with why."""

    geometry: VerityGeometry
    blocks: Mapping[int, bytes]
    bad: Mapping[int, str]

    def failure(self, data_block: int) -> str | None:
        """Why `data_block` cannot be verified, or None when its hash block is verified."""
        if not self.bad or not self.geometry.levels:
            return None
        return self.bad.get(self.geometry.slot_for(0, data_block).payload_offset)

    def failure_in(self, first_block: int, count: int) -> str | None:
        """Why some data block of `[first_block, first_block + count)` cannot be verified
        (the first such), or None when all can."""
        if not self.bad or not self.geometry.levels or count <= 0:
            return None
        first = self.geometry.slot_for(0, first_block).payload_offset
        last = self.geometry.slot_for(0, first_block + count - 1).payload_offset
        step = self.geometry.superblock.hash_block_size
        for offset in range(first, last + 1, step):
            if offset in self.bad:
                return self.bad[offset]
        return None


class HashBlockStore:
    """Verified hash blocks of one layer's dm-verity tree, keyed by verity payload offset."""

    def __init__(self, reader: BlobReader, metadata: BlobMetadata, stats: ImageStats,
                 cpu_limiter: trio.CapacityLimiter, cache: ChunkCache | None = None) -> None:
        """`cache` keeps the verified level-0 blocks (by default one of their own, unbounded
        in effect)."""
        if metadata.verity is None or metadata.root is None:
            raise ValueError("the layer has no authenticated dm-verity tree")
        self.geometry: VerityGeometry = metadata.verity
        self._root = metadata.root
        self._payload_offset = metadata.verity_payload_offset
        self._reader = reader
        self._stats = stats
        self._cpu_limiter = cpu_limiter
        self._block_size = self.geometry.superblock.hash_block_size
        self._upper: dict[int, bytes] = {}  # verified blocks above level 0
        self._recent: OrderedDict[int, bytes] = OrderedDict()  # level 0, verified last
        self._cache = cache if cache is not None else ChunkCache(1 << 62)
        self._level0 = (self.geometry.levels[0].payload_offset if self.geometry.levels
                        else self.geometry.tree_offset + self.geometry.tree_size)
        self._namespace = ("dm-verity", metadata.root)
        self._bad: dict[int, str] = {}
        self._loading: dict[int, trio.Event] = {}

    @property
    def cache(self) -> ChunkCache:
        """The chunk cache the layer's level-0 blocks live in (its chunks' too, when given)."""
        return self._cache

    @property
    def verified_count(self) -> int:
        """Verified blocks held now (level 0: those the cache still holds)."""
        return len(self.known())

    def _get(self, offset: int) -> bytes | None:
        if offset < self._level0:
            return self._upper.get(offset)
        block = self._recent.get(offset)
        if block is not None:
            return block
        found = self._cache.peek((self._namespace, offset))
        return None if found is None else bytes(found)

    def _keep(self, offset: int, block: bytes) -> None:
        if offset < self._level0:
            self._upper[offset] = block
            return
        self._cache.keep((self._namespace, offset), block)
        self._recent[offset] = block
        self._recent.move_to_end(offset)
        if len(self._recent) > RECENT_BLOCKS:
            self._recent.popitem(last=False)

    def known(self, offsets: list[int] | None = None) -> dict[int, bytes]:
        """The verified blocks among `offsets` (by default all held now), a copy."""
        if offsets is None:
            held = [key[1] for key in self._cache.keys_in(self._namespace)]
            offsets = list(dict.fromkeys([*self._upper, *self._recent, *(
                offset for offset in held if isinstance(offset, int))]))
        found = {offset: self._get(offset) for offset in offsets}
        return {offset: block for offset, block in found.items() if block is not None}

    def adopt(self, blocks: Mapping[int, bytes]) -> None:
        """Take blocks verified elsewhere against this tree (read back from the disk cache and
        checked against the blocks above them, up to the root)."""
        for offset, block in blocks.items():
            if offset not in self._bad and self._get(offset) is None:
                self._keep(offset, block)

    def retry_bad(self, offsets: list[int]) -> None:
        """Forget that the blocks among `offsets` did not match: a load the layer's failure
        policy lets through tries them again (the source may serve the right bytes now)."""
        for offset in offsets:
            self._bad.pop(offset, None)

    def top_offset(self) -> int | None:
        """Payload offset of the top level's one block (None for a tree without levels)."""
        return self.geometry.levels[-1].payload_offset if self.geometry.levels else None

    async def add_window(self, window_offset: int, window: bytes) -> None:
        """Verify the whole hash blocks in `window` (payload bytes from `window_offset`, as
        fetched with the metadata) and fetch the top level if it was not among them.

        Raises IntegrityError when the top level does not match the root digest: then the tree
        vouches for nothing and the layer cannot be opened. A lower block that does not match
        is remembered as bad; only the data under it will fail.
        """
        top = self.top_offset()
        if top is None:
            return
        size = self._block_size
        first = max(top, window_offset + (-(window_offset - top) % size))
        end = min(self.geometry.tree_offset + self.geometry.tree_size, window_offset + len(window))
        blocks = {offset: window[offset - window_offset:offset - window_offset + size]
                  for offset in range(first, end - size + 1, size)}
        if blocks:
            await self._check(blocks)
        if self._get(top) is None and top not in self._bad:
            await self._ensure([top])
        if top in self._bad:
            raise IntegrityError(self._bad[top])

    async def cover(self, first_block: int, count: int,
                    reader: BlobReader | None = None) -> Coverage:
        """Make sure the hash blocks over data blocks `[first_block, first_block + count)` are
        verified, fetching what is missing (from `reader`, by default the layer's). Returns
        their Coverage (bad blocks included).

        Raises FetchError when a block cannot be fetched.
        """
        needed = hash_blocks_needed(self.geometry, first_block, count)
        if needed:
            await self._ensure(needed, reader)
        level0 = self.geometry.levels[0] if self.geometry.levels else None
        blocks: dict[int, bytes] = {}
        bad: dict[int, str] = {}
        for offset in needed:
            if level0 is None or offset < level0.payload_offset:
                continue
            block = self._get(offset)
            if block is not None:
                blocks[offset] = block
            else:
                bad[offset] = self._bad.get(offset) or self._ancestor_failure(offset)
        return Coverage(self.geometry, blocks, bad)

    # -- loading ---------------------------------------------------------------------------------

    async def _ensure(self, needed: list[int], reader: BlobReader | None = None) -> None:
        """Load `needed` (a path or paths: every block's ancestors listed too, top first)."""
        for _ in range(_MAX_ROUNDS):
            mine = [offset for offset in needed if self._claimable(offset)]
            for offset in mine:
                self._loading[offset] = trio.Event()
            try:
                fetched = await self._fetch(mine, reader or self._reader) if mine else {}
                await self._check(fetched, needed)
            finally:
                for offset in mine:
                    event = self._loading.pop(offset, None)
                    if event is not None:
                        event.set()
            if all(offset in self._bad or self._get(offset) is not None for offset in needed):
                return
        missing = [offset for offset in needed
                   if offset not in self._bad and self._get(offset) is None]
        raise FetchError(f"{self._reader.source}: dm-verity hash block at payload offset "
                         f"{missing[0]} could not be loaded (another read's fetch failed)")

    def _claimable(self, offset: int) -> bool:
        return (offset not in self._bad and offset not in self._loading
                and self._get(offset) is None)

    async def _fetch(self, offsets: list[int], reader: BlobReader) -> dict[int, bytes]:
        """Fetch blocks by payload offset, each run of adjacent ones in one request, the runs
        at the same time. Raises FetchError."""
        size = self._block_size
        fetched: dict[int, bytes] = {}

        async def fetch_run(run: list[int]) -> None:
            data = await reader.read(self._payload_offset + run[0], len(run) * size)
            self._stats.tree_blocks_fetched += len(run)
            for position, offset in enumerate(run):
                fetched[offset] = data[position * size:(position + 1) * size]

        runs = contiguous(offsets, size)
        if len(runs) == 1:
            await fetch_run(runs[0])
            return fetched
        try:
            async with trio.open_nursery() as nursery:
                for run in runs:
                    nursery.start_soon(fetch_run, run)
        except BaseExceptionGroup as group:
            errors = leaf_errors(group)
            if errors and all(isinstance(error, FetchError) for error in errors):
                raise errors[0] from None
            raise
        return fetched

    async def _check(self, fetched: dict[int, bytes], wait_for: Sequence[int] = ()) -> None:
        """Verify `fetched` level by level, top first. Before each level, wait for the loads of
        other tasks above it (among `wait_for`); after it, wake the tasks waiting for its
        blocks. A block whose parent another task failed to fetch stays unresolved."""
        levels = {self._level_of(offset) for offset in [*fetched, *wait_for]}
        for level in sorted(levels, reverse=True):
            for offset in wait_for:
                event = self._loading.get(offset)
                if event is not None and self._level_of(offset) > level:
                    await event.wait()
            batch = {offset: block for offset, block in fetched.items()
                     if self._level_of(offset) == level}
            checkable: dict[int, bytes] = {}
            parents: dict[int, bytes] = {}
            for offset, block in batch.items():
                parent = self._parent_of(offset)
                verified_parent = None if parent is None else self._get(parent)
                if parent is None or verified_parent is not None:
                    checkable[offset] = block
                    if parent is not None and verified_parent is not None:
                        parents[parent] = verified_parent
                elif parent in self._bad:
                    self._bad[offset] = self._bad[parent]
            if checkable:
                newly, failed = await trio.to_thread.run_sync(
                    check_hash_blocks, self.geometry, {**parents, **checkable}, self._root,
                    set(parents), limiter=self._cpu_limiter,
                )
                for offset in newly:
                    self._keep(offset, checkable[offset])
                for offset, reason in failed.items():
                    self._bad[offset] = reason
            for offset in batch:
                event = self._loading.pop(offset, None)
                if event is not None:
                    event.set()
        for offset in wait_for:
            event = self._loading.get(offset)
            if event is not None:
                await event.wait()

    def _parent_of(self, offset: int) -> int | None:
        """Payload offset of the block holding `offset`'s digest (None for the top level)."""
        level = self._level_of(offset)
        if level + 1 >= len(self.geometry.levels):
            return None
        index = (offset - self.geometry.levels[level].payload_offset) // self._block_size
        return self.geometry.slot_for(level + 1, index).payload_offset

    def _level_of(self, offset: int) -> int:
        for level in self.geometry.levels:
            if level.payload_offset <= offset < level.payload_offset + (
                    level.block_count * self._block_size):
                return level.level
        raise ValueError(f"payload offset {offset} is not in the dm-verity tree")

    def _ancestor_failure(self, offset: int) -> str:
        """Why a block is neither verified nor bad itself: the first bad block above it."""
        level = self._level_of(offset)
        index = (offset - self.geometry.levels[level].payload_offset) // self._block_size
        for above in range(level + 1, len(self.geometry.levels)):
            slot = self.geometry.slot_for(above, index)
            if slot.payload_offset in self._bad:
                return self._bad[slot.payload_offset]
            index = slot.block_index
        return f"dm-verity: hash block at payload offset {offset} is not verified"
