"""The EROFS on-disk format, as far as reading the file tree of an uncompressed image needs it.

The layouts mkfs.erofs writes for container layers without `-z`: files stored flat (with their
tail inlined after the inode, or not) or chunk-based (`--chunksize`, lazyfs's metadata-first
layout), directories of 12-byte dirents, inline and shared xattrs. Structures and values
follow the kernel's `fs/erofs/erofs_fs.h`:

- superblock at byte 1024 (128 bytes): magic 0xE0F5E1E2, block size bits, root nid, metadata
  and shared xattr block addresses, incompatible feature bits;
- an inode at `meta_blkaddr * block_size + nid * 32`: compact (32 bytes) or extended (64),
  then its xattr body (a 12-byte header, shared xattr ids, entries, every entry 4-aligned),
  then inline data or the chunk map;
- a directory's data: blocks that each start with dirents `nid (8) | nameoff (2) | type (1) |
  reserved (1)`, the first one's `nameoff` giving the count, the names after them.

Compressed files, several devices and long xattr name prefixes raise ErofsUnsupportedError
(the kernel reads those images; this module does not). Everything else that does not fit raises
ErofsError naming the structure, where it is and what was found. Pure: bytes in, values out.
The structures and constants are public: the writer (`lazyfs.erofs.build`) packs what
this module unpacks.
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass

from lazyfs.format.errors import FormatError

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 128
EROFS_MAGIC = 0xE0F5E1E2
INODE_SLOT_SIZE = 32
COMPACT_INODE_SIZE = 32
EXTENDED_INODE_SIZE = 64
XATTR_BODY_HEADER_SIZE = 12
DIRENT_SIZE = 12
NULL_ADDR = 0xFFFFFFFF

LAYOUT_FLAT_PLAIN = 0
LAYOUT_COMPRESSED_FULL = 1
LAYOUT_FLAT_INLINE = 2
LAYOUT_COMPRESSED_COMPACT = 3
LAYOUT_CHUNK_BASED = 4
_LAYOUT_NAMES = {LAYOUT_COMPRESSED_FULL: "compressed (full indexes)",
                 LAYOUT_COMPRESSED_COMPACT: "compressed (compact indexes)"}

FEATURE_COMPAT_MTIME = 0x02  # inodes keep their own mtimes (mkfs.erofs sets it)
FEATURE_INCOMPAT_CHUNKED_FILE = 0x04
_FEATURE_DEVICE_TABLE = 0x08
_FEATURE_XATTR_PREFIXES = 0x40
# Bits this reader knows: compression features (0x01, 0x02, 0x10, 0x20) matter only to
# compressed inodes, which are refused one by one; chunk-based files (0x04) are read; the
# device table (0x08) only with no extra device; long xattr name prefixes (0x40) only when an
# entry uses one.
_KNOWN_INCOMPAT = 0x7F
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
_LONG_PREFIX = 0x80

SUPERBLOCK_STRUCT = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQ")
COMPACT_INODE_STRUCT = struct.Struct("<HHHHIIIIHHI")
EXTENDED_INODE_STRUCT = struct.Struct("<HHHHQIIIIQII16s")
DIRENT_STRUCT = struct.Struct("<QHBB")
XATTR_ENTRY_STRUCT = struct.Struct("<BBH")
CHUNK_INDEX_STRUCT = struct.Struct("<HHI")

XATTR_PREFIXES = {
    1: "user.",
    2: "system.posix_acl_access",
    3: "system.posix_acl_default",
    4: "trusted.",
    5: "lustre.",
    6: "security.",
}


class ErofsError(FormatError):
    """An EROFS image is malformed: a structure is truncated, out of range or inconsistent."""


class ErofsUnsupportedError(ErofsError):
    """A valid EROFS feature this reader does not decode (compressed files, extra devices,
    long xattr name prefixes); the kernel can still mount the image."""


@dataclass(frozen=True)
class Superblock:
    """What locating inodes, xattrs and data needs."""

    block_size: int
    root_nid: int
    meta_blkaddr: int
    xattr_blkaddr: int
    feature_incompat: int
    extra_devices: int
    build_time: int = 0  # the mtime of every compact inode (seconds, and nanoseconds)
    build_time_nsec: int = 0

    def inode_offset(self, nid: int) -> int:
        return self.meta_blkaddr * self.block_size + nid * INODE_SLOT_SIZE

    def shared_xattr_offset(self, xattr_id: int) -> int:
        return self.xattr_blkaddr * self.block_size + xattr_id * 4


@dataclass(frozen=True)
class Inode:
    """One on-disk inode. `raw` is the i_u field: a block address, a device number or the
    chunk format, by layout and type."""

    nid: int
    offset: int
    mode: int
    uid: int
    gid: int
    size: int
    layout: int
    raw: int
    inode_size: int
    xattr_count: int
    nlink: int = 1
    mtime: int | None = None  # None: a compact inode, whose mtime is the build time
    mtime_nsec: int = 0

    @property
    def xattr_size(self) -> int:
        """Bytes of the xattr body after the inode (0 without xattrs)."""
        return 0 if not self.xattr_count else XATTR_BODY_HEADER_SIZE + 4 * (self.xattr_count - 1)

    @property
    def after_xattrs(self) -> int:
        """Where inline data or the chunk map starts (before alignment)."""
        return self.offset + self.inode_size + self.xattr_size

    @property
    def rdev(self) -> tuple[int, int]:
        """(major, minor) of a device inode, from the kernel's new_encode_dev form."""
        return (self.raw & 0xFFF00) >> 8, (self.raw & 0xFF) | ((self.raw >> 12) & 0xFFF00)

    @property
    def compressed(self) -> bool:
        return self.layout in _LAYOUT_NAMES


@dataclass(frozen=True)
class Extent:
    """`length` bytes of a file's data: at `offset` in the image, or zeros (a hole) for None."""

    offset: int | None
    length: int


@dataclass(frozen=True)
class Dirent:
    name: bytes
    nid: int
    file_type: int


def _need(buf: bytes, size: int, what: str, offset: int) -> None:
    if len(buf) < size:
        raise ErofsError(f"{what} at offset {offset} is truncated: needs {size} bytes, only "
                         f"{len(buf)} present")


def parse_superblock(buf: bytes) -> Superblock:
    """The superblock of an image whose first bytes are `buf` (at least 1152 of them)."""
    _need(buf, SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE, "EROFS superblock", 0)
    fields = SUPERBLOCK_STRUCT.unpack_from(buf, SUPERBLOCK_OFFSET)
    (magic, _checksum, _compat, blkszbits, _extslots, root_nid, _inos, build_time,
     build_time_nsec, _blocks,
     meta_blkaddr, xattr_blkaddr, _uuid, _name, incompat, _u1, extra_devices, _slotoff,
     dirblkbits, _prefix_count, _prefix_start, _packed_nid) = fields
    where = f"EROFS superblock at offset {SUPERBLOCK_OFFSET}"
    if magic != EROFS_MAGIC:
        raise ErofsError(f"{where}: magic {magic:#010x}, expected {EROFS_MAGIC:#010x}: not an "
                         "EROFS image")
    if not 9 <= blkszbits <= 16:
        raise ErofsError(f"{where}: block size 2^{blkszbits}, expected 512 bytes to 64 KiB")
    unknown = incompat & ~_KNOWN_INCOMPAT
    if unknown:
        raise ErofsUnsupportedError(f"{where}: incompatible features {unknown:#x} unknown to "
                                    "this reader")
    if dirblkbits:
        raise ErofsUnsupportedError(f"{where}: directory blocks of 2^{dirblkbits} blocks")
    if incompat & _FEATURE_DEVICE_TABLE and extra_devices:
        raise ErofsUnsupportedError(f"{where}: data on {extra_devices} extra devices")
    return Superblock(1 << blkszbits, root_nid, meta_blkaddr, xattr_blkaddr, incompat,
                      extra_devices, build_time, build_time_nsec)


def parse_inode(buf: bytes, nid: int, offset: int) -> Inode:
    """The inode `nid`, whose bytes at image offset `offset` start `buf` (64 bytes, fewer only
    at the end of the image)."""
    what = f"inode {nid}"
    _need(buf, COMPACT_INODE_SIZE, what, offset)
    i_format = int.from_bytes(buf[:2], "little")
    layout = (i_format >> 1) & 0x7
    mtime: int | None = None
    mtime_nsec = 0
    if i_format & 1:
        _need(buf, EXTENDED_INODE_SIZE, what, offset)
        (_, xattr_count, mode, _, size, raw, _, uid, gid, mtime, mtime_nsec, nlink,
         _) = EXTENDED_INODE_STRUCT.unpack_from(buf)
        inode_size = EXTENDED_INODE_SIZE
    else:
        (_, xattr_count, mode, nlink, size, _, raw, _, uid, gid,
         _) = COMPACT_INODE_STRUCT.unpack_from(buf)
        inode_size = COMPACT_INODE_SIZE
    if layout > LAYOUT_CHUNK_BASED:
        raise ErofsError(f"{what} at offset {offset}: data layout {layout}, expected 0 to 4")
    if i_format >> 4:
        raise ErofsUnsupportedError(f"{what} at offset {offset}: i_format {i_format:#x} has "
                                    "bits unknown to this reader")
    return Inode(nid, offset, mode, uid, gid, size, layout, raw, inode_size, xattr_count, nlink,
                 mtime, mtime_nsec)


# --- xattrs -------------------------------------------------------------------------------------


def parse_xattr_entry(buf: bytes, pos: int, where: str) -> tuple[str, bytes, int]:
    """(name, value, position after the 4-aligned entry) of the entry at `pos` of `buf`."""
    if pos + XATTR_ENTRY_STRUCT.size > len(buf):
        raise ErofsError(f"{where}: xattr entry at {pos} runs past the end of its area")
    name_len, index, value_size = XATTR_ENTRY_STRUCT.unpack_from(buf, pos)
    start = pos + XATTR_ENTRY_STRUCT.size
    end = start + name_len + value_size
    if end > len(buf):
        raise ErofsError(f"{where}: xattr entry at {pos} ({name_len} name and {value_size} "
                         "value bytes) runs past the end of its area")
    if index & _LONG_PREFIX:
        raise ErofsUnsupportedError(f"{where}: xattr with a long name prefix")
    prefix = XATTR_PREFIXES.get(index)
    if prefix is None:
        raise ErofsError(f"{where}: xattr name index {index}, expected 1 to 6")
    suffix = buf[start:start + name_len].decode("utf-8", "surrogateescape")
    return prefix + suffix, bytes(buf[start + name_len:end]), (end + 3) & ~3


def parse_xattr_body(buf: bytes, where: str) -> tuple[list[int], list[tuple[str, bytes]]]:
    """The shared xattr ids and the inline (name, value) pairs of an inode's xattr body
    (`buf`, exactly `Inode.xattr_size` bytes)."""
    if not buf:
        return [], []
    _need(buf, XATTR_BODY_HEADER_SIZE, f"{where}: xattr body", 0)
    shared_count = buf[4]
    pos = XATTR_BODY_HEADER_SIZE + 4 * shared_count
    if pos > len(buf):
        raise ErofsError(f"{where}: {shared_count} shared xattrs do not fit its xattr body of "
                         f"{len(buf)} bytes")
    shared = [int.from_bytes(buf[i:i + 4], "little")
              for i in range(XATTR_BODY_HEADER_SIZE, pos, 4)]
    inline = []
    while pos < len(buf):
        name, value, pos = parse_xattr_entry(buf, pos, where)
        inline.append((name, value))
    return shared, inline


# --- data ---------------------------------------------------------------------------------------


def chunk_map_range(superblock: Superblock, inode: Inode) -> tuple[int, int]:
    """(offset, size) of a chunk-based inode's chunk map in the image."""
    unit = CHUNK_INDEX_STRUCT.size if inode.raw & CHUNK_FORMAT_INDEXES else 4
    chunks = -(-inode.size // _chunk_size(superblock, inode))
    return -(-inode.after_xattrs // unit) * unit, chunks * unit


def _chunk_size(superblock: Superblock, inode: Inode) -> int:
    bits = inode.raw & CHUNK_FORMAT_BLKBITS_MASK
    if inode.raw & 0xFFFF & ~(CHUNK_FORMAT_BLKBITS_MASK | CHUNK_FORMAT_INDEXES) or bits > 30:
        raise ErofsUnsupportedError(f"inode {inode.nid}: chunk format {inode.raw & 0xFFFF:#x}")
    return superblock.block_size << bits


def data_extents(superblock: Superblock, inode: Inode, image_size: int,
                 chunk_map: bytes = b"") -> list[Extent]:
    """Where the `inode.size` bytes of an inode's data are, in order, adjacent pieces merged.
    A chunk-based inode needs its `chunk_map` (the bytes at `chunk_map_range`). Raises
    ErofsUnsupportedError for compressed data, ErofsError for data outside the image."""
    what = f"inode {inode.nid}"
    if inode.compressed:
        raise ErofsUnsupportedError(f"{what}: {_LAYOUT_NAMES[inode.layout]} data")
    size, block = inode.size, superblock.block_size
    extents: list[Extent] = []
    if size == 0:
        return extents
    if inode.layout == LAYOUT_CHUNK_BASED:
        extents = _chunk_extents(superblock, inode, chunk_map)
    else:
        inline = inode.layout == LAYOUT_FLAT_INLINE
        blocks = -(-size // block) - int(inline)
        flat = min(blocks * block, size)
        if flat:
            extents.append(Extent(inode.raw * block, flat))
        if size > flat:
            tail = Extent(inode.after_xattrs, size - flat)
            if tail.offset is not None and tail.offset % block + tail.length > block:
                raise ErofsError(f"{what}: inline data of {tail.length} bytes at offset "
                                 f"{tail.offset} crosses a block boundary")
            extents.append(tail)
    for extent in extents:
        if extent.offset is not None and extent.offset + extent.length > image_size:
            raise ErofsError(f"{what}: {extent.length} bytes of data at offset {extent.offset} "
                             f"run past the end of the {image_size}-byte image")
    return extents


def _chunk_extents(superblock: Superblock, inode: Inode, chunk_map: bytes) -> list[Extent]:
    chunk = _chunk_size(superblock, inode)
    indexes = bool(inode.raw & CHUNK_FORMAT_INDEXES)
    unit = CHUNK_INDEX_STRUCT.size if indexes else 4
    count = -(-inode.size // chunk)
    _need(chunk_map, count * unit, f"inode {inode.nid}: chunk map", inode.after_xattrs)
    extents: list[Extent] = []
    for number in range(count):
        if indexes:
            advise, device, address = CHUNK_INDEX_STRUCT.unpack_from(chunk_map, number * unit)
            if device or advise:
                raise ErofsUnsupportedError(f"inode {inode.nid}: chunk {number} on device "
                                            f"{device} (advise {advise:#x})")
        else:
            address = int.from_bytes(chunk_map[number * unit:number * unit + 4], "little")
        length = min(chunk, inode.size - number * chunk)
        offset = None if address == NULL_ADDR else address * superblock.block_size
        last = extents[-1] if extents else None
        holes = last is not None and last.offset is None and offset is None
        follows = (last is not None and last.offset is not None and offset is not None
                   and last.offset + last.length == offset)
        if last is not None and (holes or follows):
            extents[-1] = Extent(last.offset, last.length + length)
        else:
            extents.append(Extent(offset, length))
    return extents


# --- directories --------------------------------------------------------------------------------


def parse_dir_block(block: bytes, where: str) -> list[Dirent]:
    """The entries of one directory block (`block`: its bytes within the directory's size;
    the names run up to the next name, the last one up to the block's end or a NUL)."""
    _need(block, DIRENT_SIZE, f"{where}: directory block", 0)
    first = DIRENT_STRUCT.unpack_from(block)[1]
    if first < DIRENT_SIZE or first % DIRENT_SIZE or first > len(block):
        raise ErofsError(f"{where}: first name offset {first} in a directory block of "
                         f"{len(block)} bytes")
    count = first // DIRENT_SIZE
    raw = [DIRENT_STRUCT.unpack_from(block, i * DIRENT_SIZE) for i in range(count)]
    entries = []
    for i, (nid, nameoff, file_type, _) in enumerate(raw):
        end = raw[i + 1][1] if i + 1 < count else len(block)
        if not first <= nameoff < end <= len(block):
            raise ErofsError(f"{where}: dirent {i}: name at {nameoff}..{end} is out of order "
                             "or outside the block")
        name = block[nameoff:end]
        if i + 1 == count:
            name = name.split(b"\0", 1)[0]
        if not name or b"/" in name:
            raise ErofsError(f"{where}: dirent {i}: invalid name {name!r}")
        entries.append(Dirent(bytes(name), nid, file_type))
    return entries


def kind_of(mode: int) -> str | None:
    """The tree kind (file, dir, symlink, chardev, blockdev, fifo, socket) of an inode mode."""
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
            stat.S_IFCHR: "chardev", stat.S_IFBLK: "blockdev", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket"}.get(stat.S_IFMT(mode))


__all__ = [
    "CHUNK_FORMAT_BLKBITS_MASK",
    "CHUNK_FORMAT_INDEXES",
    "CHUNK_INDEX_STRUCT",
    "COMPACT_INODE_STRUCT",
    "DIRENT_STRUCT",
    "EROFS_MAGIC",
    "EXTENDED_INODE_STRUCT",
    "FEATURE_COMPAT_MTIME",
    "FEATURE_INCOMPAT_CHUNKED_FILE",
    "SUPERBLOCK_STRUCT",
    "XATTR_ENTRY_STRUCT",
    "Dirent",
    "ErofsError",
    "ErofsUnsupportedError",
    "Extent",
    "Inode",
    "Superblock",
    "chunk_map_range",
    "data_extents",
    "kind_of",
    "parse_dir_block",
    "parse_inode",
    "parse_superblock",
    "parse_xattr_body",
    "parse_xattr_entry",
]
