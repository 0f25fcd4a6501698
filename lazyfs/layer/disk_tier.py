"""A layer's use of the shared disk cache (`lazyfs.cache.disk`): its metadata at open, its
frames and hash blocks on reads.

What is kept (only for layers whose chunk table a digest authenticates):
- **metadata**, keyed by every annotation that locates or authenticates it: the chunk table
  frame, the head of the dm-verity frame, the blob size and the hash blocks verified at open.
  Read back, it is parsed and authenticated again (chunk_digest, every hash block against the
  root) before use; an entry that fails is dropped and the metadata fetched.
- **frames**, keyed by content (`keys.frame_key`), written once fetched and passed every
  check. Read back, a frame passes the cheaper of the two again (`check_frame`): its
  SHA-512 from the chunk table when the table lists frame hashes (that hashes the compressed
  bytes, a third or so of what dm-verity hashes, and needs no tree), else every decoded data
  block against the dm-verity tree. So what the disk returns is trusted exactly as far as
  the table its digest authenticates. One that fails is dropped, logged once, fetched again.
- **hash blocks** for layers checked by dm-verity when read back: those a chunk needs that the
  metadata entry does not hold (large trees), one entry per chunk, verified against the
  blocks above them before use.
- **descriptors** fetched from a URL, to open a layer again while the URL is unreachable.

Writes run in the mount's nursery, batched and bounded for the whole process
(`DiskCache.put_later`): a read never waits for the disk to take a copy.
A layer opened from the disk does not know whether its source answers: the loader asks it
once in the background (`ChunkLoader.probe_source`), and the layer's failure policy
(`lazyfs.layer.health`) treats a source that does not answer as down, as for any fetch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from lazyfs.cache.disk import DiskCache
from lazyfs.cache.keys import descriptor_key, frame_key, layer_key, tree_key
from lazyfs.cache.memory import ChunkData
from lazyfs.format.chunk_table import HASH_NONE
from lazyfs.format.descriptor import SeekableAnnotations
from lazyfs.format.errors import FormatError
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.verity_tree import verify_hash_blocks
from lazyfs.layer.disk_entries import (
    TREE_MAGIC,
    RecordError,
    check_cached_metadata,
    check_frame,
    pack_blocks,
    pack_metadata,
    unpack_blocks,
)

log = logging.getLogger(__name__)


# -- metadata and descriptors at open ------------------------------------------------------------


@dataclass(frozen=True)
class CachedLayer:
    """A layer's metadata and the hash blocks verified with it, as the disk cache had them."""

    metadata: BlobMetadata
    tree_blocks: dict[int, bytes]


async def load_metadata(disk: DiskCache, annotations: SeekableAnnotations,
                        expected_size: int | None, cpu_limiter: trio.CapacityLimiter,
                        ) -> CachedLayer | None:
    """The layer's metadata from the disk cache, authenticated anew; None if absent or bad
    (a bad entry is dropped)."""
    key = layer_key(annotations)
    if key is None:
        return None
    data = await disk.get(key)
    if data is None:
        return None
    try:
        metadata, blocks = await trio.to_thread.run_sync(
            check_cached_metadata, annotations, data, expected_size, limiter=cpu_limiter)
    except (RecordError, FormatError) as exc:
        log.warning("disk cache: metadata entry %s failed its check (%s); dropped, fetching "
                    "the metadata", key, exc)
        disk.note_bad_entry()
        await disk.delete(key)
        return None
    return CachedLayer(metadata, blocks)


async def remembered_descriptor(disk: DiskCache, location: str) -> bytes | None:
    """The descriptor last fetched from `location`, if the disk cache has it."""
    return await disk.get(descriptor_key(location))


async def remember_descriptor(disk: DiskCache, location: str, text: bytes) -> None:
    """Keep the descriptor fetched from `location` (unless the same is kept already)."""
    key = descriptor_key(location)
    if await disk.get(key) != text:
        await disk.delete(key)
        await disk.put(key, text)


# -- a layer's frames, hash blocks and source ---------------------------------------------------


class LayerDisk:
    """One open layer's disk entries."""

    def __init__(self, disk: DiskCache, metadata: BlobMetadata, name: str,
                 nursery: trio.Nursery, *, kept_blocks: set[int]) -> None:
        key = layer_key(metadata.annotations)
        if key is None:
            raise ValueError("a layer without a chunk digest is not kept on disk")
        self.disk = disk
        self.metadata = metadata
        self.name = name
        self.layer = key
        self._nursery = nursery
        self._kept_blocks = kept_blocks  # hash blocks the metadata entry holds
        self._pending_writes = 0  # saves of this layer not yet written
        self._writes_done = trio.Event()
        self._writes_done.set()
        self._dropped: set[int] = set()
        self._reads: dict[int, None] = {}  # chunks in the order reads first touched them

    # -- the order of reads -----------------------------------------------------------------

    def note_reads(self, indices: range) -> None:
        """Count chunks a read touches, for `save_reads`."""
        for index in indices:
            if index not in self._reads:
                self._reads[index] = None

    async def save_reads(self) -> None:
        """Leave the order in which this mount first read its chunks to the next mount of the
        layer (at unmount): its warm start loads those chunks, in that order, and no others.
        A mount that read nothing leaves the last one's."""
        if self._reads:
            await self.disk.remember_reads(self.layer, list(self._reads))

    # -- frames ---------------------------------------------------------------------------

    async def held_chunks(self) -> list[int]:
        """The chunks of this layer the disk holds that its last mount read, in the order it
        did (all it holds, least recently used first, when no mount left that order)."""
        return await self.disk.layer_chunks(self.layer)

    def may_hold(self, chunk_index: int) -> bool:
        """Whether the disk may hold the chunk (a copy it could check when read back)."""
        return frame_key(self.metadata, chunk_index) is not None

    async def load_chunk(self, chunk_index: int, known_blocks: Mapping[int, bytes],
                         needed_blocks: list[int], cpu_limiter: trio.CapacityLimiter,
                         ) -> tuple[ChunkData, int, dict[int, bytes]] | None:
        """The chunk from the disk, checked again (`check_frame`): (its bytes, its frame's
        size, the hash blocks it was checked with); None when the disk lacks it or its copy
        fails the check (the copy is then dropped, to be fetched)."""
        warm = self._take_warm(chunk_index)
        if warm is not None:
            return warm
        found = await self.load(chunk_index, known_blocks, needed_blocks, cpu_limiter)
        if found is None:
            return None
        frame, blocks = found
        try:
            data = await trio.to_thread.run_sync(
                check_frame, self.metadata, blocks, chunk_index, frame,
                self.metadata.frame_range(chunk_index)[0], limiter=cpu_limiter,
            )
        except FormatError as exc:
            await self.forget(chunk_index, str(exc))
            return None
        return data, len(frame), blocks

    def _take_warm(self, chunk_index: int) -> tuple[ChunkData, int, dict[int, bytes]] | None:
        """The chunk as the command's warm start loaded it, if it did: taken only under the
        frame key this layer's authenticated table gives (the frame's SHA-512, which the warm
        start checked the frame against) and at the size the table gives."""
        table = self.metadata.table
        key = frame_key(self.metadata, chunk_index)
        if key is None or table.hash_algorithm == HASH_NONE:
            return None
        data = self.disk.take_warm(key, (self.layer, chunk_index))
        if data is None or len(data) != table.decoded_size(chunk_index):
            return None
        start, end = self.metadata.frame_range(chunk_index)
        return data, end - start, {}

    async def load(self, chunk_index: int, known_blocks: Mapping[int, bytes],
                   needed_blocks: list[int], cpu_limiter: trio.CapacityLimiter,
                   ) -> tuple[bytes, dict[int, bytes]] | None:
        """The chunk's frame from the disk (NOT verified: the caller runs `check_frame`) and,
        for a layer checked by dm-verity, the hash blocks `needed_blocks` (verified); None when
        the disk lacks either."""
        key = frame_key(self.metadata, chunk_index)
        if key is None:
            return None
        if self.metadata.table.hash_algorithm != HASH_NONE:
            needed_blocks = []  # the frame's SHA-512 is its check
        blocks = {offset: known_blocks[offset] for offset in needed_blocks
                  if offset in known_blocks}
        missing = [offset for offset in needed_blocks if offset not in blocks]
        if missing:
            found = await self._load_tree(chunk_index, blocks, cpu_limiter)
            if found is None or any(offset not in found for offset in missing):
                return None
            blocks.update(found)
        frame = await self.disk.get(key, (self.layer, chunk_index))
        if frame is None:
            return None
        return frame, blocks

    async def forget(self, chunk_index: int, reason: str) -> None:
        """Drop the chunk's entries after its frame failed a check when read back."""
        key = frame_key(self.metadata, chunk_index)
        self.disk.note_bad_entry()
        if chunk_index not in self._dropped:
            self._dropped.add(chunk_index)
            log.warning("layer %s: chunk %d: the disk cache's copy failed verification (%s); "
                        "dropped, fetching it again", self.name, chunk_index, reason)
        if key is not None:
            await self.disk.delete(key)
        await self.disk.delete(tree_key(self.layer, chunk_index))

    def save(self, chunk_index: int, frame: bytes, blocks: Mapping[int, bytes]) -> None:
        """Keep a verified frame (and for a layer checked by dm-verity when read back, the hash
        blocks it was verified with that the metadata entry lacks), in the background; skipped
        while too much waits to be written, for all layers of the process together
        (`DiskCache.put_later`)."""
        key = frame_key(self.metadata, chunk_index)
        if key is None:
            return
        entries: list[tuple[str, bytes, tuple[str, int] | None]] = []
        extra = {offset: block for offset, block in blocks.items()
                 if offset not in self._kept_blocks}
        if extra and self.metadata.table.hash_algorithm == HASH_NONE:
            # First: a frame on disk without its hash blocks cannot be used.
            entries.append((tree_key(self.layer, chunk_index), pack_blocks(TREE_MAGIC, extra),
                            None))
        entries.append((key, frame, (self.layer, chunk_index)))
        if self.disk.put_later(self._nursery, entries, self._written):
            if not self._pending_writes:
                self._writes_done = trio.Event()
            self._pending_writes += 1

    def _written(self) -> None:
        self._pending_writes -= 1
        if not self._pending_writes:
            self._writes_done.set()

    async def writes_done(self) -> None:
        """Return once no frame waits to be written (at unmount: they are worth keeping)."""
        await self._writes_done.wait()

    async def _load_tree(self, chunk_index: int, known: Mapping[int, bytes],
                         cpu_limiter: trio.CapacityLimiter) -> dict[int, bytes] | None:
        key = tree_key(self.layer, chunk_index)
        data = await self.disk.get(key)
        geometry, root = self.metadata.verity, self.metadata.root
        if data is None or geometry is None or root is None:
            return None
        try:
            blocks = unpack_blocks(TREE_MAGIC, data)
            candidates = {**known, **blocks}
            await trio.to_thread.run_sync(verify_hash_blocks, geometry, candidates, root,
                                          set(known), limiter=cpu_limiter)
        except (RecordError, FormatError) as exc:
            await self.forget(chunk_index, f"hash blocks: {exc}")
            return None
        return blocks

    # -- metadata ---------------------------------------------------------------------------

    def save_metadata(self, tree_blocks: Mapping[int, bytes], label: str) -> None:
        """Keep the layer's metadata, fetched and authenticated just now, in the background."""
        record = pack_metadata(self.metadata, tree_blocks)
        self._nursery.start_soon(self.disk.put, self.layer, record)
        self.register(label)

    def register(self, label: str) -> None:
        self._nursery.start_soon(self.disk.register_layer, self.layer, label,
                                 self.metadata.table.chunk_count)
