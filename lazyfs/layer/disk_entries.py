"""What the disk cache's entries of a layer hold, and the checks they pass when read back:
pure functions (no I/O, no event loop), shared by the daemon (`disk_tier`) and by a command
that loads a warm layer while it starts up (`warm_start`).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from lazyfs.format.chunk_table import HASH_NONE, verify_frame
from lazyfs.format.descriptor import SeekableAnnotations
from lazyfs.format.frames import (
    SKIPPABLE_MAGIC_MIN,
    decode_chunk_frame,
    serialize_skippable_frame,
)
from lazyfs.format.layout import BlobMetadata, parse_metadata
from lazyfs.format.verity_superblock import serialize_verity_superblock
from lazyfs.format.verity_tree import verify_data_blocks, verify_hash_blocks

META_MAGIC = b"LZFSMETA\x01"
TREE_MAGIC = b"LZFSTREE\x01"


class RecordError(ValueError):
    """A cache entry that is not what this module writes (torn, flipped, foreign)."""


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
    return (META_MAGIC + struct.pack("<QII", metadata.blob_size, len(table_frame), len(head))
            + table_frame + head + pack_blocks(TREE_MAGIC, tree_blocks))


def unpack_metadata(data: bytes) -> tuple[int, bytes, bytes | None, dict[int, bytes]]:
    """(blob size, chunk table frame, verity head or None, hash blocks). Raises RecordError."""
    if not data.startswith(META_MAGIC):
        raise RecordError("wrong magic")
    position = len(META_MAGIC)
    try:
        blob_size, table_size, head_size = struct.unpack_from("<QII", data, position)
    except struct.error as exc:
        raise RecordError(str(exc)) from None
    position += 16
    table_frame = data[position:position + table_size]
    head = data[position + table_size:position + table_size + head_size]
    if len(table_frame) != table_size or len(head) != head_size:
        raise RecordError("truncated")
    blocks = unpack_blocks(TREE_MAGIC, data, position + table_size + head_size)
    return blob_size, table_frame, head or None, blocks


def check_cached_metadata(annotations: SeekableAnnotations, data: bytes,
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
