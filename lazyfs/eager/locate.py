"""Where a local blob's metadata is: its descriptor beside it, or its frames found by a scan.

With a descriptor (given, or the one `lazyfs convert` wrote beside the blob) the annotations
say where the chunk table and dm-verity frames are and carry the digests that authenticate
them. Without one, the data frames are walked from the start of the blob to find the
metadata frames, which then authenticate nothing. Either way `read_metadata` reads and
parses the metadata frames. Used by the eager checks (`lazyfs.eager.check`) and `lazyfs inspect`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from lazyfs.format.chunk_table import CHUNK_TABLE_MAGIC
from lazyfs.format.descriptor import (
    Descriptor,
    SeekableAnnotations,
    descriptor_path_for,
    parse_descriptor,
)
from lazyfs.format.errors import FormatError, LayoutError, TruncatedError
from lazyfs.format.frames import (
    SKIPPABLE_HEADER_SIZE,
    is_skippable_magic,
    parse_skippable_header,
    walk_zstd_frame,
)
from lazyfs.format.layout import (
    VERITY_HEAD_SIZE,
    BlobMetadata,
    metadata_frame_end,
    parse_metadata,
)
from lazyfs.format.verity_superblock import VERITY_SIGNATURE

# --- descriptors beside blobs ------------------------------------------------------------------


def sibling_descriptor_path(blob_path: Path) -> Path:
    """Where `lazyfs convert` writes a blob's descriptor: `X.blob` -> `X.descriptor.json`,
    anything else -> `NAME.descriptor.json` (see `descriptor_path_for`)."""
    return blob_path.with_name(descriptor_path_for(blob_path.name))


def load_descriptor(path: Path) -> Descriptor:
    """Read a descriptor JSON file. Raises DescriptorError, or OSError when unreadable."""
    return parse_descriptor(path.read_bytes(), str(path))


def find_descriptor(blob_path: Path, explicit: Path | None) -> tuple[Descriptor | None,
                                                                     Path | None]:
    """The descriptor given, else the one beside the blob if there is one, else (None, None)."""
    if explicit is not None:
        return load_descriptor(explicit), explicit
    beside = sibling_descriptor_path(blob_path)
    if beside.is_file():
        return load_descriptor(beside), beside
    return None, None


# --- the metadata frames --------------------------------------------------------------------


def read_at(f: BinaryIO, offset: int, size: int) -> bytes:
    """`size` bytes of `f` at `offset` (fewer at its end); the file position is not used."""
    return os.pread(f.fileno(), size, offset)


def scan_annotations(f: BinaryIO, blob_size: int, source: str = "blob") -> SeekableAnnotations:
    """Find the metadata frames of a blob that came without a descriptor.

    Walks the data frames from offset 0 by their headers up to the first skippable frame,
    then identifies it and the one after it by their magic. The result carries no digests:
    nothing it points at is authenticated. Raises FormatError when the blob has no chunk table.
    """
    offset = 0
    guess = 1 << 18
    while offset < blob_size:
        head = read_at(f, offset, 4)
        if len(head) == 4 and is_skippable_magic(int.from_bytes(head, "little")):
            break
        size = min(guess, blob_size - offset)
        while True:
            try:
                info = walk_zstd_frame(read_at(f, offset, size), offset)
                break
            except TruncatedError as exc:
                if size >= blob_size - offset:
                    raise LayoutError(f"{source}: not a seekable EROFS blob: {exc}") from None
                size = min(size * 4, blob_size - offset)  # the frame is longer: read more
            except FormatError as exc:
                raise LayoutError(f"{source}: not a seekable EROFS blob: {exc}") from None
        offset += info.compressed_size
        guess = max(info.compressed_size * 2, 1 << 16)
    table_offset: int | None = None
    verity_offset: int | None = None
    for _ in range(2):
        if offset + SKIPPABLE_HEADER_SIZE > blob_size:
            break
        header = read_at(f, offset, SKIPPABLE_HEADER_SIZE + len(VERITY_SIGNATURE))
        payload_size = parse_skippable_header(header, offset, "metadata frame")
        payload_head = header[SKIPPABLE_HEADER_SIZE:]
        if payload_head[:4] == CHUNK_TABLE_MAGIC.to_bytes(4, "little") and table_offset is None:
            table_offset = offset
        elif payload_head == VERITY_SIGNATURE and verity_offset is None:
            verity_offset = offset
        else:
            break
        offset += SKIPPABLE_HEADER_SIZE + payload_size
    if table_offset is None:
        raise LayoutError(f"{source}: no chunk table frame after the data frames (at offset "
                          f"{offset}): not a seekable EROFS blob")
    return SeekableAnnotations(chunk_table_offset=table_offset, verity_offset=verity_offset)


def read_metadata(f: BinaryIO, blob_size: int, annotations: SeekableAnnotations) -> BlobMetadata:
    """Read and parse a blob's metadata frames (authenticated by the digests it carries)."""
    table_offset = annotations.chunk_table_offset
    header = read_at(f, table_offset, SKIPPABLE_HEADER_SIZE)
    table_size = SKIPPABLE_HEADER_SIZE + parse_skippable_header(header, table_offset,
                                                                "chunk table frame")
    limit = metadata_frame_end(annotations, table_offset, blob_size) - table_offset
    table_frame = read_at(f, table_offset, min(table_size, max(limit, 0)))
    verity_head = None
    if annotations.verity_offset is not None:
        verity_head = read_at(f, annotations.verity_offset, VERITY_HEAD_SIZE)
    return parse_metadata(annotations, blob_size, table_frame, verity_head)
