"""The EROFS structures as lazyfs writes them: the superblock, inodes, inline xattrs, directory
blocks and the block maps of chunk-based files. The writer's half of `lazyfs.erofs.reader`,
whose structures and constants it packs; pure: values in, bytes out.

What the kernel (Linux >= 5.15, `fs/erofs`) and fsck.erofs 1.5 expect, and so what is written:

- the superblock at byte 1024 with no checksum feature (nothing to get wrong), the compat bit
  "mtime" as mkfs.erofs 1.5 sets it, `meta_blkaddr` 0 (inodes may follow the superblock in
  block 0, as mkfs.erofs places them) and no shared xattr area;
- compact inodes (32 bytes) only where nothing is lost: uid, gid and nlink below 2^16, a size
  below 4 GiB and the mtime equal to the build time (a compact inode has no mtime of its own
  before Linux 6.15, which reads one relative to the build time; writing 0 there means the
  build time to every kernel); else extended inodes (64 bytes);
- xattrs inline after the inode, each name as one of the six short prefixes plus its suffix
  (a name under no prefix cannot be stored: ErofsLimitError);
- directories: blocks of 12-byte dirents and then the names, no terminators (the last name
  of a block ends at the block's end or at the first NUL), every entry including "." and ".."
  sorted bytewise across the whole directory, as the kernel's binary search needs; a block
  holds as many entries as fit, in order, and the directory's size counts the last block's
  used bytes only;
- chunk-based files with 4-byte block maps (EROFS_NULL_ADDR for a hole), the form mkfs.erofs
  1.5 writes for a single device, or 8-byte chunk indexes; the kernel has read both since 5.15.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lazyfs.erofs.reader import (
    CHUNK_FORMAT_INDEXES,
    CHUNK_INDEX_STRUCT,
    COMPACT_INODE_SIZE,
    COMPACT_INODE_STRUCT,
    DIRENT_SIZE,
    DIRENT_STRUCT,
    EROFS_MAGIC,
    EXTENDED_INODE_SIZE,
    EXTENDED_INODE_STRUCT,
    NULL_ADDR,
    SUPERBLOCK_OFFSET,
    SUPERBLOCK_SIZE,
    SUPERBLOCK_STRUCT,
    XATTR_BODY_HEADER_SIZE,
    XATTR_ENTRY_STRUCT,
    XATTR_PREFIXES,
    ErofsError,
)

MAX_NAME_BYTES = 255
MAX_XATTR_NAME_BYTES = 255
MAX_XATTR_VALUE_BYTES = 65535
MAX_XATTR_COUNT = 0xFFFF  # i_xattr_icount: 12-byte header + 4 * (count - 1) bytes
MAX_BLOCK_ADDRESS = NULL_ADDR - 1
BLOCK_MAP_ENTRY_SIZE = 4
_U16 = 0xFFFF
_U32 = 0xFFFFFFFF

FILE_TYPES = {stat.S_IFREG: 1, stat.S_IFDIR: 2, stat.S_IFCHR: 3, stat.S_IFBLK: 4,
              stat.S_IFIFO: 5, stat.S_IFSOCK: 6, stat.S_IFLNK: 7}
# Namespaces ("user.") take a suffix; the ACL prefixes are whole names.
_XATTR_MATCH = [(prefix.encode(), index) for index, prefix in XATTR_PREFIXES.items()]


class ErofsLimitError(ErofsError):
    """A value EROFS cannot hold: a name too long, an xattr outside the prefixes it stores,
    too many xattrs, an image beyond 2^32 blocks."""


@dataclass(frozen=True)
class SuperblockFields:
    """What the writer puts in the superblock."""

    block_size_bits: int
    root_nid: int
    inode_count: int
    build_time: int
    build_time_nsec: int
    blocks: int
    uuid: bytes = bytes(16)
    feature_compat: int = 0
    feature_incompat: int = 0
    meta_blkaddr: int = 0


def serialize_superblock(fields: SuperblockFields) -> bytes:
    """The 128 superblock bytes (they go at byte SUPERBLOCK_OFFSET of the image). Raises
    ErofsLimitError for a root nid beyond 16 bits or a block count beyond 32."""
    if not 0 <= fields.root_nid <= _U16:
        raise ErofsLimitError(f"root directory nid {fields.root_nid} does not fit 16 bits")
    if not 0 <= fields.blocks <= _U32:
        raise ErofsLimitError(f"{fields.blocks} blocks: EROFS addresses at most 2^32")
    if len(fields.uuid) != 16:
        raise ValueError("a UUID is 16 bytes")
    body = SUPERBLOCK_STRUCT.pack(
        EROFS_MAGIC, 0, fields.feature_compat, fields.block_size_bits, 0, fields.root_nid,
        fields.inode_count, fields.build_time, fields.build_time_nsec, fields.blocks,
        fields.meta_blkaddr, 0, fields.uuid, b"", fields.feature_incompat, 0, 0, 0, 0, 0, 0, 0)
    return body.ljust(SUPERBLOCK_SIZE, b"\0")


def superblock_head(fields: SuperblockFields) -> bytes:
    """The image's first SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE bytes: zeros, then the
    superblock."""
    return bytes(SUPERBLOCK_OFFSET) + serialize_superblock(fields)


# --- inodes --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InodeFields:
    """One inode as written. `raw` is i_u: the first block (flat layouts), the encoded device
    number, or the chunk format; `xattr_icount` comes from `xattr_icount()`."""

    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    mtime: int
    mtime_nsec: int
    layout: int
    raw: int
    ino: int
    xattr_icount: int
    extended: bool


def needs_extended(*, uid: int, gid: int, nlink: int, size: int, mtime: int, mtime_nsec: int,
                   build_time: int, build_time_nsec: int) -> bool:
    """Whether an inode must be extended to keep all of this (see the module docstring)."""
    return (uid > _U16 or gid > _U16 or nlink > _U16 or size > _U32
            or (mtime, mtime_nsec) != (build_time, build_time_nsec))


def inode_size(extended: bool) -> int:
    return EXTENDED_INODE_SIZE if extended else COMPACT_INODE_SIZE


def serialize_inode(fields: InodeFields) -> bytes:
    """The 32 or 64 bytes of an inode. Raises ErofsLimitError for a value its form cannot
    hold (a caller chooses the form with `needs_extended`)."""
    i_format = (fields.layout << 1) | int(fields.extended)
    if fields.extended:
        if not (0 <= fields.uid <= _U32 and 0 <= fields.gid <= _U32
                and 0 <= fields.nlink <= _U32):
            raise ErofsLimitError(f"inode {fields.ino}: uid, gid or nlink beyond 32 bits")
        return EXTENDED_INODE_STRUCT.pack(
            i_format, fields.xattr_icount, fields.mode, 0, fields.size, fields.raw & _U32,
            fields.ino & _U32, fields.uid, fields.gid, fields.mtime, fields.mtime_nsec,
            fields.nlink, b"")
    if max(fields.uid, fields.gid, fields.nlink) > _U16 or fields.size > _U32:
        raise ErofsLimitError(f"inode {fields.ino}: does not fit a compact inode")
    return COMPACT_INODE_STRUCT.pack(
        i_format, fields.xattr_icount, fields.mode, fields.nlink, fields.size, 0,
        fields.raw & _U32, fields.ino & _U32, fields.uid, fields.gid, 0)


def encode_device(major: int, minor: int) -> int:
    """A device number as the kernel's new_encode_dev stores it in i_u."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def file_type(mode: int) -> int:
    """The dirent file type of an inode mode (0: unknown)."""
    return FILE_TYPES.get(stat.S_IFMT(mode), 0)


# --- xattrs --------------------------------------------------------------------------------------


def split_xattr_name(name: bytes) -> tuple[int, bytes]:
    """(prefix index, suffix) of an xattr name. Raises ErofsLimitError for a name under no
    prefix EROFS stores, or too long."""
    for prefix, index in _XATTR_MATCH:
        namespace = prefix.endswith(b".")
        if (namespace and name.startswith(prefix) and len(name) > len(prefix)) or (
                not namespace and name == prefix):
            suffix = name[len(prefix):]
            if len(suffix) > MAX_XATTR_NAME_BYTES:
                raise ErofsLimitError(f"xattr {name!r}: name longer than "
                                      f"{MAX_XATTR_NAME_BYTES} bytes")
            return index, suffix
    raise ErofsLimitError(f"xattr {name!r}: EROFS stores only user., trusted., security., "
                          "lustre. and POSIX ACL xattrs")


def _entry_size(suffix_size: int, value_size: int) -> int:
    return (XATTR_ENTRY_STRUCT.size + suffix_size + value_size + 3) & ~3


def xattr_body_size(xattrs: Iterable[tuple[bytes, bytes]]) -> int:
    """Bytes of the inline xattr body of these (name, value) pairs; 0 for none. Raises
    ErofsLimitError as `serialize_xattr_body`."""
    entries = [_entry_size(len(split_xattr_name(name)[1]), len(value))
               for name, value in xattrs]
    if not entries:
        return 0
    size = XATTR_BODY_HEADER_SIZE + sum(entries)
    if xattr_icount(size) > MAX_XATTR_COUNT:
        raise ErofsLimitError(f"{size} bytes of xattrs: an inode holds at most "
                              f"{XATTR_BODY_HEADER_SIZE + 4 * (MAX_XATTR_COUNT - 1)}")
    return size


def xattr_icount(body_size: int) -> int:
    """i_xattr_icount for an xattr body of `body_size` bytes (0: none)."""
    return 0 if body_size == 0 else (body_size - XATTR_BODY_HEADER_SIZE) // 4 + 1


def serialize_xattr_body(xattrs: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The inline xattr body: a header without shared xattrs, then each entry 4-aligned, in
    the order given. Raises ErofsLimitError for a name EROFS cannot store or a value over
    64 KiB."""
    if not xattrs:
        return b""
    parts = [bytes(XATTR_BODY_HEADER_SIZE)]
    for name, value in xattrs:
        index, suffix = split_xattr_name(name)
        if len(value) > MAX_XATTR_VALUE_BYTES:
            raise ErofsLimitError(f"xattr {name!r}: value of {len(value)} bytes, at most "
                                  f"{MAX_XATTR_VALUE_BYTES}")
        entry = XATTR_ENTRY_STRUCT.pack(len(suffix), index, len(value)) + suffix + value
        parts.append(entry.ljust(_entry_size(len(suffix), len(value)), b"\0"))
    body = b"".join(parts)
    xattr_body_size(xattrs)  # the count limit
    return body


# --- directories ---------------------------------------------------------------------------------


def pack_directory(names: Sequence[bytes], block_size: int) -> list[int]:
    """How many of the sorted `names` (with "." and "..") each directory block holds, in
    order. Raises ErofsLimitError for a name of more than MAX_NAME_BYTES."""
    counts: list[int] = []
    used = block_size  # start a block at the first name
    for name in names:
        if not 0 < len(name) <= MAX_NAME_BYTES:
            raise ErofsLimitError(f"name {name!r}: 1 to {MAX_NAME_BYTES} bytes allowed")
        size = DIRENT_SIZE + len(name)
        if used + size > block_size:
            counts.append(0)
            used = 0
        counts[-1] += 1
        used += size
    return counts


def directory_size(names: Sequence[bytes], block_size: int) -> int:
    """The i_size of a directory of these sorted names: whole blocks, then the last block's
    used bytes."""
    counts = pack_directory(names, block_size)
    last = names[len(names) - counts[-1]:]
    return (len(counts) - 1) * block_size + sum(DIRENT_SIZE + len(name) for name in last)


def serialize_directory(entries: Sequence[tuple[bytes, int, int]], block_size: int) -> bytes:
    """The data of a directory of (name, nid, file type) entries, sorted by name with "." and
    ".." among them: every block but the last padded with zeros to `block_size`, the last one
    as long as its entries (`directory_size` bytes in all)."""
    counts = pack_directory([name for name, _, _ in entries], block_size)
    blocks: list[bytes] = []
    start = 0
    for count in counts:
        group = entries[start:start + count]
        start += count
        nameoff = DIRENT_SIZE * count
        dirents: list[bytes] = []
        for name, nid, kind in group:
            dirents.append(DIRENT_STRUCT.pack(nid, nameoff, kind, 0))
            nameoff += len(name)
        blocks.append(b"".join(dirents) + b"".join(name for name, _, _ in group))
    body = b"".join(block.ljust(block_size, b"\0") for block in blocks[:-1])
    return body + blocks[-1]


# --- chunk-based files ---------------------------------------------------------------------------


def chunk_format(chunk_bits: int, *, indexes: bool = False) -> int:
    """i_u of a chunk-based inode whose chunks are 2^chunk_bits blocks."""
    return chunk_bits | (CHUNK_FORMAT_INDEXES if indexes else 0)


def chunk_map_entry_size(indexes: bool) -> int:
    return CHUNK_INDEX_STRUCT.size if indexes else BLOCK_MAP_ENTRY_SIZE


def serialize_chunk_map(addresses: Sequence[int], *, indexes: bool = False) -> bytes:
    """The chunk map of these block addresses (NULL_ADDR: a hole): 4 bytes each, or 8-byte
    chunk indexes on device 0."""
    if indexes:
        return b"".join(CHUNK_INDEX_STRUCT.pack(0, 0, address) for address in addresses)
    return struct.pack(f"<{len(addresses)}I", *addresses)


__all__ = [
    "BLOCK_MAP_ENTRY_SIZE",
    "FILE_TYPES",
    "MAX_BLOCK_ADDRESS",
    "MAX_NAME_BYTES",
    "ErofsLimitError",
    "InodeFields",
    "SuperblockFields",
    "chunk_format",
    "chunk_map_entry_size",
    "directory_size",
    "encode_device",
    "file_type",
    "inode_size",
    "needs_extended",
    "pack_directory",
    "serialize_chunk_map",
    "serialize_directory",
    "serialize_inode",
    "serialize_superblock",
    "serialize_xattr_body",
    "split_xattr_name",
    "superblock_head",
    "xattr_body_size",
    "xattr_icount",
]
