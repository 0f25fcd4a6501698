"""A blob's metadata as a whole: chunk table and verity superblock located by the annotations,
authenticated by their digests, and checked to fit together and inside the blob."""

from __future__ import annotations

from dataclasses import dataclass

from lazyfs.format.chunk_table import (
    ChunkTable,
    parse_chunk_table,
    validate_chunk_layout,
    verify_chunk_table_digest,
)
from lazyfs.format.descriptor import SeekableAnnotations
from lazyfs.format.errors import LayoutError
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE, parse_skippable_header
from lazyfs.format.verity_superblock import (
    SUPERBLOCK_SIZE,
    parse_root_digest,
    parse_verity_superblock,
)
from lazyfs.format.verity_tree import VerityGeometry, check_payload_size, verity_geometry

VERITY_HEAD_SIZE = SKIPPABLE_HEADER_SIZE + SUPERBLOCK_SIZE


@dataclass(frozen=True)
class BlobMetadata:
    """Everything a reader needs to locate, authenticate and decode any byte of the image."""

    annotations: SeekableAnnotations
    blob_size: int
    table: ChunkTable
    table_payload: bytes
    verity: VerityGeometry | None
    root: bytes | None
    verity_payload_size: int

    @property
    def data_end(self) -> int:
        return self.annotations.data_end

    @property
    def image_size(self) -> int:
        return self.table.uncompressed_size

    @property
    def verity_payload_offset(self) -> int:
        """Blob offset of the verity payload (after the skippable header)."""
        if self.annotations.verity_offset is None:
            raise ValueError("blob has no dm-verity frame")
        return self.annotations.verity_offset + SKIPPABLE_HEADER_SIZE

    def frame_range(self, chunk_index: int) -> tuple[int, int]:
        return self.table.frame_range(chunk_index, self.data_end)

    def frame_runs(self, indices: list[int], cap_bytes: int) -> list[list[int]]:
        """Group chunk indices into runs of adjacent frames (one range request each), each
        spanning at most `cap_bytes` (a single frame may exceed it)."""
        runs: list[list[int]] = []
        run_start = 0
        for index in indices:
            start, end = self.frame_range(index)
            if runs and runs[-1][-1] + 1 == index and end - run_start <= cap_bytes:
                runs[-1].append(index)
            else:
                runs.append([index])
                run_start = start
        return runs


def metadata_frame_end(annotations: SeekableAnnotations, frame_offset: int, blob_size: int) -> int:
    """Where a metadata frame starting at `frame_offset` must end at the latest: the next
    metadata frame, or the end of the blob."""
    later = [offset for offset in annotations.metadata_offsets if offset > frame_offset]
    return min(later) if later else blob_size


def check_annotations_fit(annotations: SeekableAnnotations, blob_size: int) -> None:
    """Raise LayoutError if an annotated offset leaves no room for its frame in the blob."""
    for name, offset in (("chunk table", annotations.chunk_table_offset),
                         ("dm-verity", annotations.verity_offset)):
        if offset is not None and offset + SKIPPABLE_HEADER_SIZE > blob_size:
            raise LayoutError(f"{name} frame offset {offset} is beyond the blob "
                              f"({blob_size} bytes)")


def parse_metadata(
    annotations: SeekableAnnotations,
    blob_size: int,
    table_frame: bytes,
    verity_head: bytes | None,
) -> BlobMetadata:
    """Parse and cross-check a blob's metadata.

    `table_frame` holds the blob bytes from the chunk table offset (at least the whole frame);
    `verity_head` the bytes from the verity offset (at least `VERITY_HEAD_SIZE`), or None when
    the blob has no verity frame. Authenticates the chunk table by `chunk_digest` when present.
    Raises a FormatError subclass naming the structure, offset, expected and found values.
    """
    check_annotations_fit(annotations, blob_size)
    table_offset = annotations.chunk_table_offset
    table_payload_size = parse_skippable_header(table_frame, table_offset, "chunk table frame")
    table_end = table_offset + SKIPPABLE_HEADER_SIZE + table_payload_size
    limit = metadata_frame_end(annotations, table_offset, blob_size)
    if table_end > limit:
        raise LayoutError(f"chunk table frame at offset {table_offset} claims "
                          f"{table_payload_size} payload bytes, running to {table_end}, past "
                          f"{limit} (next frame or end of blob)")
    if len(table_frame) < table_end - table_offset:
        raise LayoutError(f"chunk table frame at offset {table_offset}: got "
                          f"{len(table_frame)} bytes, need {table_end - table_offset}")
    payload = bytes(table_frame[SKIPPABLE_HEADER_SIZE:table_end - table_offset])
    if annotations.chunk_digest is not None:
        verify_chunk_table_digest(payload, annotations.chunk_digest)
    table = parse_chunk_table(payload, table_offset + SKIPPABLE_HEADER_SIZE)
    validate_chunk_layout(table, annotations.data_end)

    geometry: VerityGeometry | None = None
    root: bytes | None = None
    verity_payload_size = 0
    if annotations.verity_offset is not None:
        if verity_head is None:
            raise ValueError("the blob has a dm-verity frame: its head bytes are required")
        verity_offset = annotations.verity_offset
        verity_payload_size = parse_skippable_header(verity_head, verity_offset,
                                                     "dm-verity frame")
        verity_end = verity_offset + SKIPPABLE_HEADER_SIZE + verity_payload_size
        limit = metadata_frame_end(annotations, verity_offset, blob_size)
        if verity_end > limit:
            raise LayoutError(f"dm-verity frame at offset {verity_offset} claims "
                              f"{verity_payload_size} payload bytes, running to {verity_end}, "
                              f"past {limit} (next frame or end of blob)")
        superblock = parse_verity_superblock(verity_head[SKIPPABLE_HEADER_SIZE:],
                                             verity_offset + SKIPPABLE_HEADER_SIZE)
        wanted_blocks = -(-table.uncompressed_size // superblock.data_block_size)
        if superblock.data_blocks != wanted_blocks:
            raise LayoutError(
                f"dm-verity superblock at offset {verity_offset + SKIPPABLE_HEADER_SIZE}: "
                f"{superblock.data_blocks} data blocks, but the image of "
                f"{table.uncompressed_size} bytes has {wanted_blocks} blocks of "
                f"{superblock.data_block_size}"
            )
        geometry = verity_geometry(superblock)
        check_payload_size(geometry, verity_payload_size, verity_offset + SKIPPABLE_HEADER_SIZE)
        if annotations.root_digest is not None:
            algorithm, root = parse_root_digest(annotations.root_digest)
            if algorithm != superblock.hash_name:
                raise LayoutError(f"root digest is {algorithm} but the dm-verity superblock "
                                  f"says {superblock.hash_name}")
    return BlobMetadata(annotations, blob_size, table, payload, geometry, root,
                        verity_payload_size)
