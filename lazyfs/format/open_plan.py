"""What opening a layer reads, and where: pure arithmetic over the annotations and metadata.

The annotations give every offset, and the chunk table and the dm-verity frame sit next to
each other (in either order), the tree's top levels first in its payload. So one range, from
the first metadata offset to a window past the start of the tree, holds what opening needs
(`metadata_ranges`, cut apart again by `metadata_pieces`). After that a read of chunk `i`
needs its frame and the hash blocks over its data blocks (`chunk_hash_blocks`). The loader
and the head start of a mount (`lazyfs.startup.head_start`) both plan with these.
"""

from __future__ import annotations

from collections.abc import Mapping

from lazyfs.format.descriptor import SeekableAnnotations
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.verity_tree import hash_blocks_needed

MAX_CHUNK_TABLE_FRAME = 64 * 1024 * 1024
# Where the tree starts in the verity payload (the superblock padded to a hash block): 4 KiB in
# every tree containerd writes. A larger block only costs a second request for the top level.
ASSUMED_TREE_OFFSET = 4096
# How much to ask for a chunk table whose end nothing tells (it is last and the blob size is not
# known): the table of a 4 GiB image of 4 MiB chunks. A larger one is completed afterwards.
TABLE_GUESS_BYTES = 96 * 1024
# Metadata ranges closer than this are fetched as one.
MERGE_GAP_BYTES = 64 * 1024


def metadata_ranges(annotations: SeekableAnnotations, blob_size: int | None,
                    tree_window_bytes: int) -> list[tuple[int, int | None]]:
    """The blob ranges `[start, end)` opening reads, merged where they touch; `end` is None
    where only the blob's end would say (the blob size is not known)."""
    limit_of: dict[int, int | None] = {}
    for offset in annotations.metadata_offsets:
        later = [other for other in annotations.metadata_offsets if other > offset]
        limit_of[offset] = min(later) if later else blob_size
    table = annotations.chunk_table_offset
    ranges: list[tuple[int, int | None]] = []
    table_end = limit_of[table]
    if table_end is not None:
        table_end = min(table_end, table + MAX_CHUNK_TABLE_FRAME)
    ranges.append((table, table_end))
    if annotations.verity_offset is not None:
        verity = annotations.verity_offset
        verity_end = verity + SKIPPABLE_HEADER_SIZE + ASSUMED_TREE_OFFSET + tree_window_bytes
        limit = limit_of[verity]
        ranges.append((verity, verity_end if limit is None else min(verity_end, limit)))
    ranges.sort(key=lambda item: item[0])
    merged: list[tuple[int, int | None]] = []
    for start, end in ranges:
        if merged:
            last_start, last_end = merged[-1]
            if last_end is not None and start <= last_end + MERGE_GAP_BYTES:
                merged[-1] = (last_start, None if end is None else max(end, last_end))
                continue
        merged.append((start, end))
    return merged


def metadata_pieces(fetched: Mapping[int, bytes], annotations: SeekableAnnotations
                    ) -> tuple[bytes, bytes | None]:
    """From the ranges fetched (start: bytes), what they hold of the chunk table frame and of
    the dm-verity frame (None for a layer without one), each from its first byte; either may
    be short of what parsing needs."""

    def slice_from(offset: int) -> bytes:
        for start, data in fetched.items():
            if start <= offset < start + len(data):
                return data[offset - start:]
        return b""

    table = slice_from(annotations.chunk_table_offset)
    if annotations.verity_offset is None:
        return table, None
    return table, slice_from(annotations.verity_offset)


def data_blocks(metadata: BlobMetadata, run: list[int]) -> tuple[int, int]:
    """The dm-verity data blocks `(first, count)` of the adjacent chunks `run`."""
    geometry = metadata.verity
    assert geometry is not None
    table = metadata.table
    block_size = geometry.superblock.data_block_size
    first_block = run[0] * table.chunk_size // block_size
    last_byte = min((run[-1] + 1) * table.chunk_size, metadata.image_size)
    return first_block, -(-last_byte // block_size) - first_block


def chunk_hash_blocks(metadata: BlobMetadata, index: int) -> list[int]:
    """Payload offsets of the hash blocks (all levels, top first) over chunk `index`; none
    for a layer without an authenticated tree."""
    geometry = metadata.verity
    if geometry is None or metadata.root is None or not geometry.levels:
        return []
    return hash_blocks_needed(geometry, *data_blocks(metadata, [index]))


def contiguous(offsets: list[int], step: int) -> list[list[int]]:
    """`offsets` sorted, in groups where each is `step` after the one before."""
    groups: list[list[int]] = []
    for offset in sorted(offsets):
        if groups and groups[-1][-1] + step == offset:
            groups[-1].append(offset)
        else:
            groups.append([offset])
    return groups
