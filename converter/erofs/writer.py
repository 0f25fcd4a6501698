"""lazyfs's own EROFS writer: the raw image of a layer written straight from its source (a
directory, a tar layer, an EROFS image), metadata first (`converter.erofs.layout`).

The tree is read first (names, inodes, xattrs: no data), laid out, then the source hands over
each file's data once, streamed: each 4 KiB block becomes a hole when it is all zeros, the
block that already holds the same bytes when there is one (`converter.erofs.block_index`, read back
before it is shared), else the next block of the data area; the file's block map goes into its
inode record as its data goes by. The inodes and directories are written last, into the space
the layout left for them. Nothing of the data is staged anywhere but in the image, and there is
no size limit but EROFS's (2^32 blocks). Memory holds the tree (a few hundred bytes a file),
the block index and a few MiB of buffers, whatever the files' sizes.

The same placement runs without writing (`place_blocks`): it tells which file block an image
written before from the same source holds at each block, for a start-up order
(`converter.erofs.startup_order`).

The image is reproducible: nothing in it depends on the time or the machine (the build time is
the tree's most common mtime, or `timestamp`), and the UUID is the caller's.
"""

from __future__ import annotations

import enum
import os
import stat
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from converter.erofs.block_index import BlockIndex, block_key
from converter.erofs.inode_tree import LayerSource, Node
from converter.erofs.layout import (
    BLOCK_SIZE,
    BLOCK_SIZE_BITS,
    INODE_SLOT,
    Layout,
    build_time_for,
    directory_names,
    file_blocks,
    plan_layout,
    raw_field,
    xattr_pairs,
)
from converter.erofs.layout_fingerprint import LayoutFingerprint
from converter.erofs.likely_start import likely_start_files
from converter.erofs.runtime_start import runtime_start_files
from converter.errors import ConvertError
from lazyfs.erofs.build import (
    ErofsLimitError,
    InodeFields,
    SuperblockFields,
    chunk_format,
    file_type,
    serialize_chunk_map,
    serialize_directory,
    serialize_inode,
    serialize_xattr_body,
    superblock_head,
    xattr_icount,
)
from lazyfs.erofs.reader import (
    FEATURE_COMPAT_MTIME,
    FEATURE_INCOMPAT_CHUNKED_FILE,
    LAYOUT_FLAT_INLINE,
    NULL_ADDR,
)

_ZERO_BLOCK = bytes(BLOCK_SIZE)
_FLUSH_BYTES = 4 << 20
_MAP_FLUSH_ENTRIES = 1 << 16
# Metadata up to this size is gathered in memory and written at once (a layer of 200 000
# files has some 27 MiB of it); beyond, each piece is written where it goes.
METADATA_BUFFER_BYTES = 64 << 20

WriteProgress = Callable[[int, int], None]
"""Called with (file data bytes done, total)."""


class ErofsWriter(enum.Enum):
    """Which program builds an uncompressed image."""

    LAZYFS = "lazyfs"  # this module: streamed, metadata first, start-up order
    MKFS = "mkfs"  # mkfs.erofs (converter.mkfs): also compressed and interleaved images


@dataclass(frozen=True)
class ImageOptions:
    """`timestamp`: the build time (UNIX seconds), newer mtimes clamped to it (None: the most
    common mtime, nothing clamped); `uuid`: the superblock's; `chunk_indexes`: 8-byte chunk
    indexes instead of 4-byte block maps (both read by Linux >= 5.15)."""

    timestamp: int | None = None
    uuid: bytes = bytes(16)
    chunk_indexes: bool = False


@dataclass(frozen=True)
class ImageResult:
    """What was written: sizes in bytes; block counts of the file data."""

    image_size: int
    inode_count: int
    metadata_size: int  # everything before the file data
    startup_end: int  # the end of the start-up blocks (= metadata_size without them)
    data_blocks: int  # blocks of file data stored
    shared_blocks: int  # file blocks that point at a block stored for another
    hole_blocks: int  # file blocks of zeros, not stored
    layout: str = ""  # the placement's fingerprint (`converter.erofs.layout_fingerprint`)


def write_image(source: LayerSource, out: Path, options: ImageOptions | None = None, *,
                startup: Iterable[tuple[Node, int]] = (),
                progress: WriteProgress | None = None) -> ImageResult:
    """Write the raw EROFS image of `source` to `out` (created or truncated), the file blocks
    `startup` lists first after the metadata, in that order. Raises ConvertError (the
    source's, or a value EROFS cannot hold) and OSError."""
    options = options or ImageOptions()
    layout = _plan(source.root, options, startup)
    with open(out, "w+b") as stream:  # read back: identical blocks are compared
        fd = stream.fileno()
        metadata = _Metadata(fd, layout.data_start * BLOCK_SIZE)
        fingerprint = LayoutFingerprint(chunk_indexes=options.chunk_indexes)
        area = _DataArea(fd, layout, fingerprint.stored)
        _place_files(source, layout, area, metadata, progress)
        area.flush()
        blocks = area.next_block
        _check_blocks(blocks)
        _write_metadata(metadata, layout, source.root)
        metadata.write(0, superblock_head(_superblock(layout, blocks, options.uuid)))
        metadata.flush()
        os.ftruncate(fd, blocks * BLOCK_SIZE)
    return ImageResult(blocks * BLOCK_SIZE, layout.inode_count, layout.data_start * BLOCK_SIZE,
                       layout.startup_end * BLOCK_SIZE, area.stored, area.shared, area.holes,
                       fingerprint.finish(blocks * BLOCK_SIZE))


def place_blocks(source: LayerSource, options: ImageOptions | None = None,
                 on_stored: Callable[[int, Node, int], None] | None = None) -> int:
    """Lay out the image `write_image` would write of `source` (no start-up order) without
    writing it: call `on_stored(image block, node, file block)` for every block of file data
    it would store, and return the image's size. Identical blocks are told apart by their
    64-bit keys alone here."""
    layout = _plan(source.root, options or ImageOptions(), ())
    area = _DataArea(None, layout, on_stored)
    _place_files(source, layout, area, None, None)
    return area.next_block * BLOCK_SIZE


def _plan(root: Node, options: ImageOptions, startup: Iterable[tuple[Node, int]]) -> Layout:
    runtime = runtime_start_files(root)  # the libraries it picks leave likely_start's
    try:
        return plan_layout(root, build_time_for(root, options.timestamp),
                           chunk_indexes=options.chunk_indexes, startup=startup,
                           likely=[*likely_start_files(root, frozenset(runtime)), *runtime])
    except ErofsLimitError as exc:
        raise ConvertError(f"cannot be stored in EROFS: {exc}") from None


def _check_blocks(blocks: int) -> None:
    if blocks > NULL_ADDR:
        raise ConvertError(f"the image needs {blocks} blocks: EROFS addresses at most "
                           f"{NULL_ADDR}")


# --- file data -----------------------------------------------------------------------------------


class _DataArea:
    """Where file blocks go: the start-up slots and the likely start's places, else appended
    from `layout.likely_end` on (buffered); without `fd`, only counted."""

    def __init__(self, fd: int | None, layout: Layout,
                 on_stored: Callable[[int, Node, int], None] | None = None) -> None:
        self.fd = fd
        self.index = BlockIndex()
        self.next_block = layout.likely_end
        self.on_stored = on_stored
        self._pending = bytearray()
        self._pending_start = layout.likely_end
        self.stored = self.shared = self.holes = 0

    def place(self, block: bytes, node: Node, number: int, slot: int | None) -> int:
        """The image block that holds `block` (BLOCK_SIZE bytes), written if need be."""
        if block == _ZERO_BLOCK:
            self.holes += 1
            return NULL_ADDR
        key = block_key(block)
        if slot is not None:
            if self.fd is not None:
                os.pwrite(self.fd, block, slot * BLOCK_SIZE)
            self.index.add(key, slot)
            self.stored += 1
            if self.on_stored is not None:
                self.on_stored(slot, node, number)
            return slot
        found = self.index.find(key)
        if found is not None and self._holds(found, block):
            self.shared += 1
            return found
        address = self.next_block
        self.next_block += 1
        self.stored += 1
        if self.fd is not None:
            self._pending += block
            if len(self._pending) >= _FLUSH_BYTES:
                self.flush()
        if self.on_stored is not None:
            self.on_stored(address, node, number)
        if found is None:
            self.index.add(key, address)
        return address

    def _holds(self, address: int, block: bytes) -> bool:
        if self.fd is None:
            return True
        if address >= self._pending_start:
            start = (address - self._pending_start) * BLOCK_SIZE
            return self._pending[start:start + BLOCK_SIZE] == block
        return os.pread(self.fd, BLOCK_SIZE, address * BLOCK_SIZE) == block

    def flush(self) -> None:
        if self.fd is not None and self._pending:
            os.pwrite(self.fd, self._pending, self._pending_start * BLOCK_SIZE)
        self._pending_start = self.next_block
        self._pending.clear()


def _place_files(source: LayerSource, layout: Layout, area: _DataArea,
                 metadata: _Metadata | None, progress: WriteProgress | None) -> None:
    total = sum(node.size for node in layout.order if node.is_file)
    done = 0
    expected = sum(1 for node in layout.order if node.is_file and node.size)
    seen = 0
    for node, pieces in source.file_data():
        seen += 1
        done += _place_file(layout, area, metadata, node, pieces)
        if progress is not None:
            progress(done, total)
    if seen != expected:
        raise ConvertError(f"the source handed over the data of {seen} files, its tree has "
                           f"{expected}")


def _place_file(layout: Layout, area: _DataArea, metadata: _Metadata | None, node: Node,
                pieces: Iterator[bytes]) -> int:
    """Store one file's blocks and write its block map; return its size."""
    slots = layout.startup.get(node, {})
    first = layout.likely.get(node)
    map_offset = layout.map_offset(node) if metadata is not None else 0
    addresses = array("I")
    carry = bytearray()
    number = size = 0

    def put(block: bytes) -> None:
        nonlocal number, map_offset
        slot = slots.get(number) if first is None else first + number
        addresses.append(area.place(block, node, number, slot))
        number += 1
        if len(addresses) >= _MAP_FLUSH_ENTRIES:
            map_offset = _write_map(metadata, map_offset, addresses, layout.chunk_indexes)

    for piece in pieces:
        size += len(piece)
        if size > node.size:
            break
        view = memoryview(piece)
        start = 0
        if carry:
            start = min(BLOCK_SIZE - len(carry), len(view))
            carry += view[:start]
            if len(carry) < BLOCK_SIZE:
                continue
            put(bytes(carry))
            carry.clear()
        end = start + (len(view) - start) // BLOCK_SIZE * BLOCK_SIZE
        for offset in range(start, end, BLOCK_SIZE):
            put(bytes(view[offset:offset + BLOCK_SIZE]))
        carry += view[end:]
    if size != node.size:
        raise ConvertError(f"a file's data came to {size} bytes, its entry says {node.size} "
                           "(did the source change while it was converted?)")
    if carry:
        put(bytes(carry.ljust(BLOCK_SIZE, b"\0")))
    assert number == file_blocks(node.size)
    _write_map(metadata, map_offset, addresses, layout.chunk_indexes)
    return size


def _write_map(metadata: _Metadata | None, offset: int, addresses: array[int],
               indexes: bool) -> int:
    """Write the block map entries gathered so far at `offset`; return where the next go."""
    data = serialize_chunk_map(addresses, indexes=indexes)
    if metadata is not None:
        metadata.write(offset, data)
    del addresses[:]
    return offset + len(data)


# --- metadata ------------------------------------------------------------------------------------


class _Metadata:
    """Writes into the `size` bytes before the data: into memory, written at once by `flush`,
    when they are at most METADATA_BUFFER_BYTES; else each where it goes, adjacent ones
    joined."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self._buffer = bytearray(size) if size <= METADATA_BUFFER_BYTES else None
        self._start = 0
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, offset: int, data: bytes) -> None:
        if self._buffer is not None:
            self._buffer[offset:offset + len(data)] = data
            return
        if self._parts and (offset != self._start + self._size or self._size > _FLUSH_BYTES):
            self._flush_parts()
        if not self._parts:
            self._start = offset
        self._parts.append(data)
        self._size += len(data)

    def _flush_parts(self) -> None:
        if self._parts:
            os.pwrite(self.fd, b"".join(self._parts), self._start)
        self._parts, self._size = [], 0

    def flush(self) -> None:
        if self._buffer is not None:
            os.pwrite(self.fd, self._buffer, 0)
        self._flush_parts()


def _write_metadata(writes: _Metadata, layout: Layout, root: Node) -> None:
    assert root.nid is not None
    parents: dict[Node, int] = {root: root.nid}
    for node in layout.order:
        assert node.nid is not None
        shape = layout.shape(node)
        seconds, nanoseconds = divmod(node.mtime_ns, 1_000_000_000)
        fields = InodeFields(
            mode=node.mode, uid=node.uid, gid=node.gid, size=node.size, nlink=node.nlink,
            mtime=seconds & 0xFFFFFFFFFFFFFFFF, mtime_nsec=nanoseconds, layout=shape.layout,
            raw=raw_field(node, shape, chunk_format(0, indexes=layout.chunk_indexes)),
            ino=node.nid, xattr_icount=xattr_icount(shape.xattr_size), extended=shape.extended)
        record = serialize_inode(fields) + serialize_xattr_body(xattr_pairs(node))
        data = b""
        if node.children is not None:
            for child in node.children.values():
                if child.is_dir:
                    parents[child] = node.nid
            data = serialize_directory(_dirents(node, parents[node]), BLOCK_SIZE)
        elif stat.S_ISLNK(node.mode):
            data = node.target or b""
        if data:
            whole = shape.blocks * BLOCK_SIZE
            if shape.layout == LAYOUT_FLAT_INLINE:
                whole = len(data) - shape.inline
                record += data[whole:]
            if shape.blocks:
                writes.write(node.blkaddr * BLOCK_SIZE, data[:whole])
        writes.write(node.nid * INODE_SLOT, record)


def _dirents(node: Node, parent_nid: int) -> list[tuple[bytes, int, int]]:
    assert node.children is not None and node.nid is not None
    special = {b".": (node.nid, node.mode), b"..": (parent_nid, stat.S_IFDIR)}
    entries = []
    for name in directory_names(node):
        if name in special:
            nid, mode = special[name]
        else:
            child = node.children[name]
            assert child.nid is not None
            nid, mode = child.nid, child.mode
        entries.append((name, nid, file_type(mode)))
    return entries


def _superblock(layout: Layout, blocks: int, uuid: bytes) -> SuperblockFields:
    root = layout.order[0]
    assert root.nid is not None
    seconds, nanoseconds = layout.build_time
    chunked = any(node.is_file and node.size for node in layout.order)
    return SuperblockFields(
        block_size_bits=BLOCK_SIZE_BITS, root_nid=root.nid, inode_count=layout.inode_count,
        build_time=seconds, build_time_nsec=nanoseconds, blocks=blocks, uuid=uuid,
        feature_compat=FEATURE_COMPAT_MTIME,
        feature_incompat=FEATURE_INCOMPAT_CHUNKED_FILE if chunked else 0)


__all__ = ["ErofsWriter", "ImageOptions", "ImageResult", "place_blocks", "write_image"]

