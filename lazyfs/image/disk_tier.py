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

Writes run in the mount's nursery, bounded: a read never waits for the disk to take a copy.
A layer opened from the disk does not know whether its source answers: the loader asks it
once in the background (`ChunkLoader.probe_source`), and the layer's failure policy
(`lazyfs.image.health`) treats a source that does not answer as down, as for any fetch.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from lazyfs.cache.disk import DiskCache
from lazyfs.format.chunk_table import HASH_NONE, verify_frame
from lazyfs.format.descriptor import SeekableAnnotations
from lazyfs.format.errors import FormatError
from lazyfs.format.frames import (
    SKIPPABLE_MAGIC_MIN,
    decode_chunk_frame,
    serialize_skippable_frame,
)
from lazyfs.format.layout import BlobMetadata, parse_metadata
from lazyfs.format.verity_superblock import serialize_verity_superblock
from lazyfs.format.verity_tree import verify_data_blocks, verify_hash_blocks
from lazyfs.image.keys import descriptor_key, frame_key, layer_key, tree_key

log = logging.getLogger(__name__)

MAX_PENDING_WRITE_BYTES = 64 << 20
_META_MAGIC = b"LZFSMETA\x01"
_TREE_MAGIC = b"LZFSTREE\x01"


class RecordError(ValueError):
    """A cache entry that is not what this module writes (torn, flipped, foreign)."""


# -- entry formats (pure) ---------------------------------------------------------------------


def pack_blocks(magic: bytes, blocks: Mapping[int, bytes]) -> bytes:
    offsets = sorted(blocks)
    head = struct.pack(f"<I{len(offsets)}Q", len(offsets), *offsets)
    return magic + head + b"".join(struct.pack("<I", len(blocks[o])) + blocks[o]
                                   for o in offsets)


def unpack_blocks(magic: bytes, data: bytes, position: int = 0) -> dict[int, bytes]:
    """Blocks packed by `pack_blocks` at `position`. Raises RecordError."""
    try:
        if data[position:position + len(magic)] != magic:
            raise RecordError("wrong magic")
        position += len(magic)
        (count,) = struct.unpack_from("<I", data, position)
        offsets = struct.unpack_from(f"<{count}Q", data, position + 4)
        position += 4 + 8 * count
        blocks = {}
        for offset in offsets:
            (size,) = struct.unpack_from("<I", data, position)
            blocks[offset] = data[position + 4:position + 4 + size]
            if len(blocks[offset]) != size:
                raise RecordError("truncated")
            position += 4 + size
    except struct.error as exc:
        raise RecordError(str(exc)) from None
    if position != len(data):
        raise RecordError("trailing bytes")
    return blocks


def pack_metadata(metadata: BlobMetadata, tree_blocks: Mapping[int, bytes]) -> bytes:
    """The metadata entry of a layer: its chunk table frame and dm-verity head rebuilt from
    what they parsed to (the digests cover the table payload and the tree, not the framing),
    the blob size, and verified hash blocks."""
    table_frame = serialize_skippable_frame(metadata.table_payload)
    head = b""
    if metadata.verity is not None:
        head = struct.pack("<II", SKIPPABLE_MAGIC_MIN, metadata.verity_payload_size)
        head += serialize_verity_superblock(metadata.verity.superblock)
    return (_META_MAGIC + struct.pack("<QII", metadata.blob_size, len(table_frame), len(head))
            + table_frame + head + pack_blocks(_TREE_MAGIC, tree_blocks))


def unpack_metadata(data: bytes) -> tuple[int, bytes, bytes | None, dict[int, bytes]]:
    """(blob size, chunk table frame, verity head or None, hash blocks). Raises RecordError."""
    if not data.startswith(_META_MAGIC):
        raise RecordError("wrong magic")
    position = len(_META_MAGIC)
    try:
        blob_size, table_size, head_size = struct.unpack_from("<QII", data, position)
    except struct.error as exc:
        raise RecordError(str(exc)) from None
    position += 16
    table_frame = data[position:position + table_size]
    head = data[position + table_size:position + table_size + head_size]
    if len(table_frame) != table_size or len(head) != head_size:
        raise RecordError("truncated")
    blocks = unpack_blocks(_TREE_MAGIC, data, position + table_size + head_size)
    return blob_size, table_frame, head or None, blocks


def _check_cached_metadata(annotations: SeekableAnnotations, data: bytes,
                           expected_size: int | None) -> tuple[BlobMetadata, dict[int, bytes]]:
    """Runs in a worker thread: parse and authenticate a metadata entry. Raises RecordError,
    FormatError."""
    blob_size, table_frame, verity_head, blocks = unpack_metadata(data)
    if expected_size is not None and blob_size != expected_size:
        raise RecordError(f"kept for a blob of {blob_size} bytes, expected {expected_size}")
    metadata = parse_metadata(annotations, blob_size, table_frame, verity_head)
    if metadata.verity is not None and metadata.root is not None and blocks:
        verify_hash_blocks(metadata.verity, blocks, metadata.root, set())
    return metadata, blocks


def check_frame(metadata: BlobMetadata, tree_blocks: Mapping[int, bytes], chunk_index: int,
                frame: bytes, frame_offset: int) -> bytes:
    """Runs in a worker thread: check a frame read back from the disk cache (its SHA-512 when
    the table lists frame hashes, else each data block against the dm-verity tree, with the
    hash blocks `tree_blocks`) and decode it to exactly its size. Returns the chunk. Raises
    IntegrityError / FrameDecodeError naming the chunk and offsets."""
    table = metadata.table
    if table.hash_algorithm != HASH_NONE:
        verify_frame(table, chunk_index, frame, frame_offset)
    data = decode_chunk_frame(frame, table.decoded_size(chunk_index), chunk_index, frame_offset)
    if table.hash_algorithm == HASH_NONE:
        geometry, root = metadata.verity, metadata.root
        assert geometry is not None and root is not None  # else never kept (`frame_key`)
        first_block = chunk_index * table.chunk_size // geometry.superblock.data_block_size
        verify_data_blocks(geometry, first_block, data, tree_blocks, root)
    return data


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
            _check_cached_metadata, annotations, data, expected_size, limiter=cpu_limiter)
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
        self._pending_write_bytes = 0
        self._writes_done = trio.Event()
        self._writes_done.set()
        self._dropped: set[int] = set()

    # -- frames ---------------------------------------------------------------------------

    async def held_chunks(self) -> list[int]:
        """The chunks of this layer the disk holds, in the order its last mount read them."""
        return await self.disk.layer_chunks(self.layer)

    def may_hold(self, chunk_index: int) -> bool:
        """Whether the disk may hold the chunk (a copy it could check when read back)."""
        return frame_key(self.metadata, chunk_index) is not None

    async def load_chunk(self, chunk_index: int, known_blocks: Mapping[int, bytes],
                         needed_blocks: list[int], cpu_limiter: trio.CapacityLimiter,
                         ) -> tuple[bytes, int, dict[int, bytes]] | None:
        """The chunk from the disk, checked again (`check_frame`): (its bytes, its frame's
        size, the hash blocks it was checked with); None when the disk lacks it or its copy
        fails the check (the copy is then dropped, to be fetched)."""
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
        while too much is waiting to be written."""
        key = frame_key(self.metadata, chunk_index)
        extra = {offset: block for offset, block in blocks.items()
                 if offset not in self._kept_blocks}
        if self.metadata.table.hash_algorithm != HASH_NONE:
            extra = {}
        size = len(frame) + sum(len(block) for block in extra.values())
        if key is None or self._pending_write_bytes + size > MAX_PENDING_WRITE_BYTES:
            return
        if not self._pending_write_bytes:
            self._writes_done = trio.Event()
        self._pending_write_bytes += size
        self._nursery.start_soon(self._write, chunk_index, key, frame, extra, size)

    async def _write(self, chunk_index: int, key: str, frame: bytes,
                     extra: dict[int, bytes], size: int) -> None:
        try:
            if extra:  # first: a frame on disk without its hash blocks cannot be used
                await self.disk.put(tree_key(self.layer, chunk_index),
                                    pack_blocks(_TREE_MAGIC, extra))
            await self.disk.put(key, frame, (self.layer, chunk_index))
        finally:
            self._pending_write_bytes -= size
            if not self._pending_write_bytes:
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
            blocks = unpack_blocks(_TREE_MAGIC, data)
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
