"""A layer's metadata in one round trip: the chunk table, the dm-verity superblock and the top
of the hash tree, in one range request.

The ranges come from `lazyfs.format.open_plan` (the chunk table and the top of the tree sit
next to each other); the rest of the tree is fetched when reads need it (`hash_blocks.py`). The
blob size
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
from lazyfs.format.open_plan import (
    MAX_CHUNK_TABLE_FRAME,
    TABLE_GUESS_BYTES,
    metadata_pieces,
    metadata_ranges,
)


@dataclass(frozen=True)
class LoadedMetadata:
    """The parsed metadata, and the start of the verity payload fetched with it (payload
    offset 0 onwards: the superblock, then as much of the tree as the window held)."""

    metadata: BlobMetadata
    verity_payload: bytes


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

    table_offset = annotations.chunk_table_offset
    table_frame, verity_head = metadata_pieces(fetched, annotations)
    if len(table_frame) >= SKIPPABLE_HEADER_SIZE:
        whole = SKIPPABLE_HEADER_SIZE + parse_skippable_header(table_frame, table_offset,
                                                               "chunk table frame")
        limit = min(metadata_frame_end(annotations, table_offset, blob_size) - table_offset,
                    MAX_CHUNK_TABLE_FRAME)
        if len(table_frame) < min(whole, limit):
            rest = await reader.read(table_offset + len(table_frame),
                                     min(whole, limit) - len(table_frame))
            table_frame += rest
    if verity_head is not None:
        assert annotations.verity_offset is not None
        wanted = min(VERITY_HEAD_SIZE, blob_size - annotations.verity_offset)
        if len(verity_head) < wanted:
            verity_head = await reader.read(annotations.verity_offset, wanted)
    metadata = await trio.to_thread.run_sync(
        parse_metadata, annotations, blob_size, table_frame, verity_head)
    payload = (verity_head or b"")[SKIPPABLE_HEADER_SIZE:]
    return LoadedMetadata(metadata, payload[:metadata.verity_payload_size])
