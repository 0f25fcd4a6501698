"""`lazyfs inspect BLOB`: what a seekable EROFS blob holds and where, without decoding it.

Only the metadata is read (chunk table, verity superblock, the top hash block). With a
descriptor (given, or found beside the blob) the metadata is authenticated by its digests;
without one it is found by walking the frames and the output says it is not authenticated.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, NotRequired, TypedDict

from lazyfs.blob_locate import find_descriptor, read_metadata, scan_annotations
from lazyfs.cli import UserError
from lazyfs.cli.convert import human_size, write_stdout
from lazyfs.format.chunk_table import chunk_table_digest
from lazyfs.format.descriptor import LABEL_UNCOMPRESSED, Descriptor
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.verity_superblock import HASH_TYPE_NORMAL, root_digest_annotation
from lazyfs.format.verity_tree import BlockHasher


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show the layout, chunks and dm-verity parameters of a blob",
        description="Show where the frames and metadata of a seekable EROFS blob are, its "
        "chunk sizes and compression, and its dm-verity parameters. Frames are not decoded "
        "(see `lazyfs verify`).",
    )
    parser.add_argument("blob", type=Path, metavar="BLOB")
    parser.add_argument("--descriptor", type=Path, metavar="D",
                        help="the blob's OCI descriptor JSON (default: the one beside BLOB)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--chunks", action="store_true", help="list every chunk's frame")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        descriptor, descriptor_path = find_descriptor(args.blob, args.descriptor)
        info = describe(args.blob, descriptor)
    except OSError as exc:
        raise UserError(f"{exc.filename or args.blob}: {exc.strerror or exc}") from None
    info["descriptor"] = str(descriptor_path) if descriptor_path else None
    if args.json:
        write_stdout(json.dumps(info, indent=2) + "\n")
    else:
        write_stdout(render(info, with_chunks=args.chunks))
    return 0


class _Region(TypedDict):
    """One entry of the `layout` of `describe`, in blob order."""

    what: str
    offset: int
    size: int
    frames: NotRequired[int]  # data frames only


def describe(blob: Path, descriptor: Descriptor | None) -> dict[str, Any]:
    """Everything `inspect` shows, as JSON-ready data. Raises FormatError, OSError."""
    with open(blob, "rb") as f:
        blob_size = os.fstat(f.fileno()).st_size
        if descriptor is not None:
            if descriptor.size != blob_size:
                raise UserError(f"{blob} is {blob_size} bytes but its descriptor says "
                                f"{descriptor.size}: the descriptor is for another blob")
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


def render(info: dict[str, Any], with_chunks: bool = False) -> str:
    """The text form of `describe`'s data."""
    lines = [f"blob          {info['blob']} ({info['blob_size']} bytes)"]
    if info["authenticated"]:
        lines.append(f"descriptor    {info['descriptor']}: metadata authenticated by its "
                     "digests (frames not checked: run `lazyfs verify`)")
    else:
        reason = "found by walking the frames" if not info["descriptor"] else "not all pinned"
        lines.append(f"descriptor    {info['descriptor'] or 'none'}: metadata {reason}, "
                     "NOT AUTHENTICATED")
    lines.append("layout        offset      size        what")
    for region in info["layout"]:
        what = region["what"]
        if "frames" in region:
            what = f"{region['frames']} zstd data frames"
        lines.append(f"              {region['offset']:<11} {region['size']:<11} {what}")
    order = ", then ".join(info["metadata_order"])
    lines.append(f"metadata      {order}")
    size = info["compressed_frame_size"]
    lines += [
        f"image         {info['image_size']} bytes ({human_size(info['image_size'])}) in "
        f"{info['chunk_count']} chunks of {human_size(info['chunk_size'])}",
        f"frames        min {size['min']}, avg {size['avg']}, max {size['max']} bytes; "
        f"ratio {info['ratio']} (image / data frames)",
        f"chunk table   {info['chunk_digest']}, {info['frame_hash']} per frame",
    ]
    if info["image_digest"]:
        lines.append(f"image digest  {info['image_digest']}")
    verity = info["verity"]
    if verity is None:
        lines.append("dm-verity     none")
    else:
        kind = "normal" if verity["hash_type"] == HASH_TYPE_NORMAL else "Chrome OS"
        levels = ", ".join(f"level {level['level']}: {level['blocks']} blocks at payload "
                           f"offset {level['payload_offset']}" for level in verity["levels"])
        lines += [
            f"dm-verity     {verity['hash']}, hash type {verity['hash_type']} ({kind}), "
            f"{verity['data_blocks']} data blocks of {verity['data_block_size']}, hash blocks "
            f"of {verity['hash_block_size']}",
            f"              salt {verity['salt'] or 'none'}, uuid {verity['uuid']}",
            f"              levels: {levels or 'none (a single data block)'}",
            f"              root {verity['root_digest'] or '-'} ({verity['root_source']})",
        ]
    if with_chunks:
        lines.append("chunks        index  offset      size        decoded")
        lines += [f"              {frame['chunk']:<6} {frame['offset']:<11} {frame['size']:<11} "
                  f"{frame['decoded_size']}" for frame in info["frames"]]
    return "\n".join(lines) + "\n"
