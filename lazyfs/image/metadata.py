"""A layer's metadata in one round trip: the chunk table, the dm-verity superblock and the top
of the hash tree, in one range request.

The annotations give every offset, and the chunk table and the dm-verity frame sit next to
each other (in either order), the tree's top levels first in its payload. So one range, from
the first metadata offset to `tree_window_bytes` past the start of the tree, holds what opening
needs; the rest of the tree is fetched when reads need it (`hash_blocks.py`). The blob size
comes from the descriptor or manifest; where nobody promised one, the answer's Content-Range
gives it (a clipped read), so there is no probe either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from lazyfs.errors import LazyfsError
from lazyfs.exception_groups import leaf_errors
from lazyfs.fetch.base import BlobReader, ClippingReader
from lazyfs.format.descriptor import SeekableAnnotations
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE, parse_skippable_header
from lazyfs.format.layout import (
    VERITY_HEAD_SIZE,
    BlobMetadata,
    check_annotations_fit,
    metadata_frame_end,
    parse_metadata,
)

MAX_CHUNK_TABLE_FRAME = 64 * 1024 * 1024
# Where the tree starts in the verity payload (the superblock padded to a hash block): 4 KiB in
# every tree containerd writes. A larger block only costs a second request for the top level.
ASSUMED_TREE_OFFSET = 4096
# How much to ask for a chunk table whose end nothing tells (it is last and the blob size is not
# known): the table of a 4 GiB image of 4 MiB chunks. A larger one is completed afterwards.
TABLE_GUESS_BYTES = 96 * 1024
# Metadata ranges closer than this are fetched as one.
MERGE_GAP_BYTES = 64 * 1024


@dataclass(frozen=True)
class LoadedMetadata:
    """The parsed metadata, and the start of the verity payload fetched with it (payload
    offset 0 onwards: the superblock, then as much of the tree as the window held)."""

    metadata: BlobMetadata
    verity_payload: bytes


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


async def load_metadata(reader: BlobReader, annotations: SeekableAnnotations,
                        tree_window_bytes: int) -> LoadedMetadata:
    """Fetch and authenticate the metadata (one request in the usual layout), with the top of
    the tree. Raises FormatError (IntegrityError for a wrong chunk digest), FetchError."""
    clipping = reader if isinstance(reader, ClippingReader) else None
    blob_size = clipping.size if clipping is not None else await reader.open()
    if blob_size is not None:
        check_annotations_fit(annotations, blob_size)
    fetched: dict[int, bytes] = {}

    async def fetch(start: int, end: int | None) -> None:
        if end is None:
            end = start + TABLE_GUESS_BYTES
        if blob_size is None:
            assert clipping is not None
            fetched[start] = await clipping.read_clipped(start, end - start)
        else:
            fetched[start] = await reader.read(start, min(end, blob_size) - start)

    ranges = metadata_ranges(annotations, blob_size, tree_window_bytes)
    if len(ranges) == 1:
        await fetch(*ranges[0])
    else:
        try:
            async with trio.open_nursery() as nursery:
                for start, end in ranges:
                    nursery.start_soon(fetch, start, end)
        except BaseExceptionGroup as group:
            # Callers catch the error itself, as a single request would raise it.
            errors = leaf_errors(group)
            if errors and all(isinstance(error, LazyfsError) for error in errors):
                raise errors[0] from None
            raise
    blob_size = await reader.open()  # known by now: promised, probed or from Content-Range
    check_annotations_fit(annotations, blob_size)

    def slice_from(offset: int) -> bytes:
        for start, data in fetched.items():
            if start <= offset < start + len(data):
                return data[offset - start:]
        return b""

    table_offset = annotations.chunk_table_offset
    table_frame = slice_from(table_offset)
    if len(table_frame) >= SKIPPABLE_HEADER_SIZE:
        whole = SKIPPABLE_HEADER_SIZE + parse_skippable_header(table_frame, table_offset,
                                                               "chunk table frame")
        limit = min(metadata_frame_end(annotations, table_offset, blob_size) - table_offset,
                    MAX_CHUNK_TABLE_FRAME)
        if len(table_frame) < min(whole, limit):
            rest = await reader.read(table_offset + len(table_frame),
                                     min(whole, limit) - len(table_frame))
            table_frame += rest
    verity_head = None
    if annotations.verity_offset is not None:
        verity_head = slice_from(annotations.verity_offset)
        wanted = min(VERITY_HEAD_SIZE, blob_size - annotations.verity_offset)
        if len(verity_head) < wanted:
            verity_head = await reader.read(annotations.verity_offset, wanted)
    metadata = await trio.to_thread.run_sync(
        parse_metadata, annotations, blob_size, table_frame, verity_head)
    payload = (verity_head or b"")[SKIPPABLE_HEADER_SIZE:]
    return LoadedMetadata(metadata, payload[:metadata.verity_payload_size])
