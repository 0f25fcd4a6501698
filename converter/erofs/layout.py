"""Where everything of lazyfs's EROFS image goes: metadata first, then the file data.

```
block 0            | superblock (byte 1024), inodes from byte 1152 on (the root first)
                   | ... every inode, each directory's entries' inodes side by side ...
next block         | directory blocks (and the targets of symlinks too long to inline)
data_start         | start-up blocks: file blocks a start read, in the order it read them
startup_end        | the files nearly every start reads (`converter.erofs.likely_start`), then
                   | what a language runtime reads at start (`converter.erofs.runtime_start`),
                   | each file whole
likely_end         | every other file block, in the order the source hands them over
```

An inode record is the inode (compact where nothing is lost, see `lazyfs.erofs.build`),
its inline xattrs, then either a directory's or symlink's tail (inline) or a regular file's
block map (chunk-based, one 4 KiB chunk per block, so that identical blocks are stored once
and a start-up's blocks can go anywhere). Records are 32-byte aligned; a record that fits in
a block never crosses one (the kernel reads an inline tail only from the block of its inode);
a block map may. Inodes are placed as a lookup meets them: the root, then the entries of
each directory side by side, directories depth first in name order, so a directory listing
and the stat of its entries read neighbouring bytes. Pure: it only computes and marks the
nodes (`nid`, `blkaddr`, a directory's `size`).
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from converter.erofs.inode_tree import NS_PER_SECOND, Node, count_links, walk
from lazyfs.erofs.build import (
    MAX_BLOCK_ADDRESS,
    ErofsLimitError,
    chunk_map_entry_size,
    directory_size,
    encode_device,
    inode_size,
    xattr_body_size,
)
from lazyfs.erofs.reader import (
    COMPACT_INODE_SIZE,
    EXTENDED_INODE_SIZE,
    LAYOUT_CHUNK_BASED,
    LAYOUT_FLAT_INLINE,
    LAYOUT_FLAT_PLAIN,
    NULL_ADDR,
    SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
)

BLOCK_SIZE_BITS = 12
BLOCK_SIZE = 1 << BLOCK_SIZE_BITS
INODE_SLOT = 32
FIRST_INODE_OFFSET = SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE  # nid 36, as mkfs.erofs places it
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF


class Shape(NamedTuple):
    """How one inode is stored: its form, its xattr bytes, its data layout and i_u, and how
    many bytes follow the inode and xattrs in its record (`inline`: a tail; `block_map`: the
    chunk map, after `map_padding` bytes) and how many blocks it has elsewhere."""

    extended: bool
    xattr_size: int
    layout: int
    inline: int = 0
    map_padding: int = 0
    block_map: int = 0
    blocks: int = 0

    @property
    def head(self) -> int:
        """Bytes of the record that must stay in one block when they fit one."""
        return inode_size(self.extended) + self.xattr_size + self.inline

    @property
    def record(self) -> int:
        return self.head + self.map_padding + self.block_map


def file_blocks(size: int) -> int:
    return -(-size // BLOCK_SIZE)


def xattr_pairs(node: Node) -> list[tuple[bytes, bytes]]:
    """A node's xattrs in the order they are written (by name)."""
    return sorted(node.xattrs.items()) if node.xattrs else []


def shape_of(node: Node, build_time_ns: int, *, chunk_indexes: bool = False) -> Shape:
    """The Shape of `node` (a directory's `size` must be set: `plan_layout` does)."""
    # needs_extended(), with the times in nanoseconds: this runs a few times per inode.
    extended = (node.mtime_ns != build_time_ns or node.uid > _U16 or node.gid > _U16
                or node.nlink > _U16 or node.size > _U32)
    xattrs = xattr_body_size(xattr_pairs(node)) if node.xattrs else 0
    head = (EXTENDED_INODE_SIZE if extended else COMPACT_INODE_SIZE) + xattrs
    kind = stat.S_IFMT(node.mode)
    if kind in (stat.S_IFDIR, stat.S_IFLNK):
        size = node.size
        tail = size % BLOCK_SIZE
        if kind == stat.S_IFLNK and size < BLOCK_SIZE:
            tail = size
        if tail and head + tail <= BLOCK_SIZE:
            return Shape(extended, xattrs, LAYOUT_FLAT_INLINE, inline=tail,
                         blocks=(size - tail) // BLOCK_SIZE)
        return Shape(extended, xattrs, LAYOUT_FLAT_PLAIN, blocks=file_blocks(size))
    if kind == stat.S_IFREG and node.size:
        unit = chunk_map_entry_size(chunk_indexes)
        padding = -head % unit
        return Shape(extended, xattrs, LAYOUT_CHUNK_BASED, map_padding=padding,
                     block_map=file_blocks(node.size) * unit)
    return Shape(extended, xattrs, LAYOUT_FLAT_PLAIN)


def raw_field(node: Node, shape: Shape, chunk_format: int) -> int:
    """The inode's i_u: the chunk format, the device number, a first block or NULL_ADDR."""
    kind = stat.S_IFMT(node.mode)
    if shape.layout == LAYOUT_CHUNK_BASED:
        return chunk_format
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        return encode_device(*node.rdev)
    if shape.blocks:
        return node.blkaddr
    return NULL_ADDR if shape.layout == LAYOUT_FLAT_INLINE else 0


@dataclass
class Layout:
    """The plan of one image. `order` holds every inode in nid order; block numbers are
    image blocks; `startup` maps a file node to {file block: image block} for the blocks
    of the start-up region; `likely` maps a file node to the first image block of its
    blocks, side by side, from `startup_end` to `likely_end`."""

    build_time_ns: int
    chunk_indexes: bool
    order: list[Node]
    inode_count: int
    metadata_end: int
    directory_start: int
    data_start: int
    startup_end: int
    startup: dict[Node, dict[int, int]] = field(default_factory=dict)
    likely: dict[Node, int] = field(default_factory=dict)
    likely_end: int = 0

    @property
    def build_time(self) -> tuple[int, int]:
        seconds, nanoseconds = divmod(self.build_time_ns, NS_PER_SECOND)
        return seconds, nanoseconds

    def shape(self, node: Node) -> Shape:
        return shape_of(node, self.build_time_ns, chunk_indexes=self.chunk_indexes)

    def map_offset(self, node: Node) -> int:
        """Where a chunk-based node's block map starts in the image."""
        assert node.nid is not None
        shape = self.shape(node)
        return node.nid * INODE_SLOT + shape.head + shape.map_padding


def build_time_for(root: Node, timestamp: int | None) -> int:
    """The build time (nanoseconds) of the image of `root`: `timestamp` (seconds), to which
    newer mtimes are then clamped (nodes change), or else the most common mtime of the tree,
    so that as many inodes as may be are compact (the newest among equals)."""
    if timestamp is not None:
        limit = timestamp * NS_PER_SECOND
        for _, node in walk(root):
            node.mtime_ns = min(node.mtime_ns, limit)
        return limit
    counts = Counter(node.mtime_ns for _, node in walk(root))
    return max(counts.items(), key=lambda item: (item[1], item[0]))[0]


def plan_layout(root: Node, build_time_ns: int, *, chunk_indexes: bool = False,
                startup: Iterable[tuple[Node, int]] = (),
                likely: Iterable[Node] = ()) -> Layout:
    """Lay out the image of `root` (see the module docstring); `startup` lists (file node,
    file block) in the order a start-up read them (blocks beyond a file's end and repeats
    are left out); `likely` lists the file nodes whose blocks follow them, each file's side
    by side (those `startup` names are left out). Raises ErofsLimitError for what EROFS
    cannot hold."""
    inode_count = count_links(root)
    _size_directories(root)
    order: list[Node] = []
    position = FIRST_INODE_OFFSET

    def place(node: Node) -> None:
        nonlocal position
        shape = shape_of(node, build_time_ns, chunk_indexes=chunk_indexes)
        position += -position % INODE_SLOT
        if shape.head <= BLOCK_SIZE and position % BLOCK_SIZE + shape.head > BLOCK_SIZE:
            position += -position % BLOCK_SIZE
        node.nid = position // INODE_SLOT
        order.append(node)
        position += shape.record

    for _, node in walk(root):
        node.nid = None
    place(root)
    pending = [root]
    while pending:
        directory = pending.pop()
        assert directory.children is not None
        subdirectories = []
        for child in directory.children.values():
            if child.nid is None:
                place(child)
            if child.is_dir:
                subdirectories.append(child)
        pending.extend(reversed(subdirectories))
    metadata_end = position
    block = file_blocks(metadata_end)
    directory_start = block
    for node in order:
        blocks = shape_of(node, build_time_ns, chunk_indexes=chunk_indexes).blocks
        if blocks:
            node.blkaddr = block
            block += blocks
    data_start = block
    slots: dict[Node, dict[int, int]] = {}
    for node, index in startup:
        if node.is_file and index < file_blocks(node.size):
            blocks_of = slots.setdefault(node, {})
            if index not in blocks_of:
                blocks_of[index] = block
                block += 1
    startup_end = block
    firsts: dict[Node, int] = {}
    for node in likely:
        if node.is_file and node.size and node not in slots and node not in firsts:
            firsts[node] = block
            block += file_blocks(node.size)
    _check_address(block)
    return Layout(build_time_ns, chunk_indexes, order, inode_count, metadata_end,
                  directory_start, data_start, startup_end, slots, firsts, block)


def _size_directories(root: Node) -> None:
    """Put every directory's entries in name order and set its size."""
    for _, node in walk(root):
        if node.children is not None:
            node.children = dict(sorted(node.children.items()))
            node.size = directory_size(directory_names(node), BLOCK_SIZE)


def directory_names(node: Node) -> Sequence[bytes]:
    """A directory's names as EROFS stores them: with "." and "..", sorted bytewise."""
    assert node.children is not None
    return sorted([b".", b"..", *node.children])


def _check_address(block: int) -> None:
    if block > MAX_BLOCK_ADDRESS:
        raise ErofsLimitError(f"{block} blocks: EROFS addresses at most {MAX_BLOCK_ADDRESS}")


__all__ = [
    "BLOCK_SIZE",
    "BLOCK_SIZE_BITS",
    "FIRST_INODE_OFFSET",
    "INODE_SLOT",
    "Layout",
    "Shape",
    "build_time_for",
    "directory_names",
    "file_blocks",
    "plan_layout",
    "raw_field",
    "shape_of",
    "xattr_pairs",
]
