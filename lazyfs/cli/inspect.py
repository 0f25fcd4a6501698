"""`lazyfs inspect BLOB`: what a seekable EROFS blob holds and where, without decoding it.

Only the metadata is read (chunk table, verity superblock, the top hash block). With a
descriptor (given, or found beside the blob) the metadata is authenticated by its digests;
without one it is found by walking the frames and the output says it is not authenticated.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lazyfs.cli import UserError
from lazyfs.cli.convert import write_stdout
from lazyfs.eager.describe import describe
from lazyfs.eager.locate import find_descriptor
from lazyfs.format.verity_superblock import HASH_TYPE_NORMAL
from lazyfs.sizes import human_size


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
