"""What a local blob holds and where, without decoding it: the layout of its frames, the chunk
table, the dm-verity parameters (`lazyfs inspect`). Only the metadata is read."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO, NotRequired, TypedDict

from lazyfs.eager.locate import read_metadata, scan_annotations
from lazyfs.format.chunk_table import chunk_table_digest
from lazyfs.format.descriptor import LABEL_UNCOMPRESSED, Descriptor
from lazyfs.format.errors import FormatError
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.verity_superblock import root_digest_annotation
from lazyfs.format.verity_tree import BlockHasher


class DescriptorMismatchError(FormatError):
    """The descriptor given for a blob describes another blob (its size differs)."""


class _Region(TypedDict):
    """One entry of the `layout` of `describe`, in blob order."""

    what: str
    offset: int
    size: int
    frames: NotRequired[int]  # data frames only


def describe(blob: Path, descriptor: Descriptor | None) -> dict[str, Any]:
    """Everything `lazyfs inspect` shows, as JSON-ready data. Raises FormatError (among them
    DescriptorMismatchError), OSError."""
    with open(blob, "rb") as f:
        blob_size = os.fstat(f.fileno()).st_size
        if descriptor is not None:
            if descriptor.size != blob_size:
                raise DescriptorMismatchError(f"{blob} is {blob_size} bytes but its descriptor "
                                              f"says {descriptor.size}: the descriptor is for "
                                              "another blob")
            annotations = descriptor.seekable(str(blob))
        else:
            annotations = scan_annotations(f, blob_size, str(blob))
        metadata = read_metadata(f, blob_size, annotations)
        verity = _verity(f, metadata) if metadata.verity is not None else None
    table = metadata.table
    frames = [
        {"chunk": index, "offset": start, "size": end - start,
         "decoded_size": table.decoded_size(index)}
        for index in range(table.chunk_count)
        for start, end in [metadata.frame_range(index)]
    ]
    sizes = [frame["size"] for frame in frames]
    regions: list[_Region] = [{"what": "data frames", "offset": 0, "size": metadata.data_end,
                "frames": table.chunk_count},
               {"what": "chunk table frame", "offset": annotations.chunk_table_offset,
                "size": SKIPPABLE_HEADER_SIZE + len(metadata.table_payload)}]
    if annotations.verity_offset is not None:
        regions.append({"what": "dm-verity frame", "offset": annotations.verity_offset,
                        "size": SKIPPABLE_HEADER_SIZE + metadata.verity_payload_size})
    regions.sort(key=lambda region: region["offset"])
    return {
        "blob": str(blob),
        "blob_size": blob_size,
        "authenticated": descriptor is not None and annotations.is_trusted,
        "digest": descriptor.digest if descriptor else None,
        "image_digest": descriptor.annotations.get(LABEL_UNCOMPRESSED) if descriptor else None,
        "layout": regions,
        "metadata_order": [r["what"].removesuffix(" frame") for r in regions[1:]],
        "image_size": table.uncompressed_size,
        "chunk_size": table.chunk_size,
        "chunk_count": table.chunk_count,
        "compressed_frame_size": {
            "min": min(sizes, default=0), "max": max(sizes, default=0),
            "avg": round(sum(sizes) / len(sizes)) if sizes else 0,
        },
        "ratio": round(table.uncompressed_size / metadata.data_end, 3) if metadata.data_end else 0,
        "frame_hash": "sha512" if table.hash_algorithm else "none",
        "chunk_digest": annotations.chunk_digest or chunk_table_digest(metadata.table_payload),
        "verity": verity,
        "frames": frames,
    }


def _verity(f: BinaryIO, metadata: BlobMetadata) -> dict[str, Any]:
    geometry = metadata.verity
    assert geometry is not None
    superblock = geometry.superblock
    root, root_source = metadata.root, "descriptor"
    if root is None and geometry.levels:
        top = geometry.levels[-1].payload_offset
        block = os.pread(f.fileno(), superblock.hash_block_size,
                         metadata.verity_payload_offset + top)
        root, root_source = BlockHasher(superblock).digest(block), "computed, not authenticated"
    elif root is None:
        root_source = "not stored: a single data block's digest is the root"
    return {
        "hash": superblock.hash_name,
        "hash_type": superblock.hash_type,
        "data_block_size": superblock.data_block_size,
        "hash_block_size": superblock.hash_block_size,
        "data_blocks": superblock.data_blocks,
        "salt": superblock.salt.hex(),
        "uuid": superblock.uuid_text,
        "levels": [{"level": level.level, "blocks": level.block_count,
                    "payload_offset": level.payload_offset} for level in geometry.levels],
        "root_digest": root_digest_annotation(superblock.hash_name, root) if root else None,
        "root_source": root_source,
    }
