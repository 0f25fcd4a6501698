"""The file tree inside a raw EROFS image, read by lazyfs itself: a third producer of
`converter.tree` trees, beside directories and tar layers.

No mount and no root: every inode, directory, xattr and every byte of file data is read from
the image file with `lazyfs.erofs.reader` and bounds-checked, so the tree has what an
extraction by fsck.erofs 1.5 loses (xattrs such as the overlayfs opaque mark, hardlinks,
owners, whiteout devices) and equals `scan_directory` of a read-only kernel mount of the image.
Compressed images raise ErofsUnsupportedError: mount those instead.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from converter.tree import IGNORED_XATTRS, TreeEntry
from lazyfs.erofs.reader import (
    ErofsError,
    Extent,
    Inode,
    Superblock,
    chunk_map_range,
    data_extents,
    kind_of,
    parse_dir_block,
    parse_inode,
    parse_superblock,
    parse_xattr_body,
    parse_xattr_entry,
)

_READ_BYTES = 1 << 20
_MAX_SYMLINK_BYTES = 4096
_MAX_SHARED_XATTR_BYTES = 4 + 255 + 65536


class ImageFile:
    """Positioned reads of an image file, never past its end unnoticed."""

    def __init__(self, f: BinaryIO) -> None:
        self.fd = f.fileno()
        self.size = os.fstat(self.fd).st_size

    def read(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or offset + size > self.size:
            raise ErofsError(f"{what}: {size} bytes at offset {offset} are outside the "
                             f"{self.size}-byte image")
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise ErofsError(f"{what}: short read at offset {offset}")
        return data

    def read_up_to(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, max(0, min(size, self.size - offset)), offset)


class ErofsReader:
    """Inodes, data, xattrs and directory entries of an uncompressed EROFS image (also
    `converter.erofs.image_inodes`, which writes an image anew from one)."""

    def __init__(self, image: ImageFile, superblock: Superblock) -> None:
        self.image, self.sb = image, superblock

    def inode(self, nid: int) -> Inode:
        offset = self.sb.inode_offset(nid)
        if offset >= self.image.size:
            raise ErofsError(f"inode {nid}: offset {offset} is outside the {self.image.size}-byte "
                             "image")
        return parse_inode(self.image.read_up_to(offset, 64), nid, offset)

    def extents(self, inode: Inode) -> list[Extent]:
        chunk_map = b""
        if inode.layout == 4 and inode.size:
            offset, size = chunk_map_range(self.sb, inode)
            chunk_map = self.image.read(offset, size, f"inode {inode.nid}: chunk map")
        return data_extents(self.sb, inode, self.image.size, chunk_map)

    def data(self, inode: Inode) -> Iterator[bytes]:
        """The inode's data in pieces of at most a MiB, holes as zeros."""
        for extent in self.extents(inode):
            done = 0
            while done < extent.length:
                size = min(_READ_BYTES, extent.length - done)
                if extent.offset is None:
                    yield bytes(size)
                else:
                    yield self.image.read(extent.offset + done, size, f"inode {inode.nid}: data")
                done += size

    def xattrs(self, inode: Inode, *, all_names: bool = False) -> dict[str, bytes]:
        """The inode's xattrs by name; those a tree leaves out (IGNORED_XATTRS) only with
        `all_names`."""
        where = f"inode {inode.nid}"
        body = self.image.read(inode.offset + inode.inode_size, inode.xattr_size,
                               f"{where}: xattrs") if inode.xattr_size else b""
        shared, pairs = parse_xattr_body(body, where)
        for xattr_id in shared:
            offset = self.sb.shared_xattr_offset(xattr_id)
            area = self.image.read_up_to(offset, _MAX_SHARED_XATTR_BYTES)
            name, value, _ = parse_xattr_entry(area, 0, f"{where}: shared xattr {xattr_id}")
            pairs.append((name, value))
        return {name: value for name, value in sorted(pairs)
                if all_names or name not in IGNORED_XATTRS}

    def entries(self, inode: Inode) -> Iterator[tuple[bytes, int]]:
        """(name, nid) of a directory's entries, "." and ".." left out."""
        if inode.size > self.image.size:  # held in memory: only as much as the image has
            raise ErofsError(f"directory inode {inode.nid}: {inode.size} bytes, more than the "
                             f"{self.image.size}-byte image")
        data = b"".join(self.data(inode))
        block_size = self.sb.block_size
        for start in range(0, len(data), block_size):
            where = f"directory inode {inode.nid}, block {start // block_size}"
            for dirent in parse_dir_block(data[start:start + block_size], where):
                if dirent.name not in (b".", b".."):
                    yield dirent.name, dirent.nid


def scan_erofs(image_path: Path) -> dict[str, TreeEntry]:
    """Describe the tree inside the raw EROFS image at `image_path`, keyed by relative path
    ("." the root), as `converter.tree.scan_directory` describes a mount of it.

    Raises ErofsUnsupportedError for what this reader does not decode (compressed files),
    ErofsError for a malformed image (naming the inode and offset), OSError.
    """
    with open(image_path, "rb") as f:
        image = ImageFile(f)
        reader = ErofsReader(image, parse_superblock(image.read_up_to(0, 2048)))
        entries: dict[str, TreeEntry] = {}
        links: dict[int, list[str]] = {}
        seen_dirs: set[int] = set()
        pending = [(".", reader.sb.root_nid)]
        while pending:
            path, nid = pending.pop()
            inode = reader.inode(nid)
            entry = _entry(reader, path, inode)
            entries[path] = entry
            if entry.kind != "dir":
                links.setdefault(nid, []).append(path)
                continue
            if nid in seen_dirs:
                raise ErofsError(f"directory inode {nid} is reached twice (at {path!r}): a loop")
            seen_dirs.add(nid)
            for name, child in reader.entries(inode):
                text = os.fsdecode(name)
                pending.append((text if path == "." else f"{path}/{text}", child))
    for paths in links.values():
        if len(paths) > 1:
            for path in paths:
                entries[path] = replace(entries[path], inode_group=min(paths))
    return entries


def _entry(reader: ErofsReader, path: str, inode: Inode) -> TreeEntry:
    kind = kind_of(inode.mode)
    if kind is None:
        raise ErofsError(f"inode {inode.nid} ({path!r}): unknown file type in mode "
                         f"{inode.mode:#o}")
    size, digest, target, rdev = 0, None, None, None
    if kind == "file":
        hasher = hashlib.sha256()
        for piece in reader.data(inode):
            hasher.update(piece)
        size, digest = inode.size, hasher.hexdigest()
    elif kind == "symlink":
        if not 0 < inode.size <= _MAX_SYMLINK_BYTES:
            raise ErofsError(f"inode {inode.nid} ({path!r}): symlink of {inode.size} bytes")
        target = os.fsdecode(b"".join(reader.data(inode)))
    elif kind in ("chardev", "blockdev"):
        rdev = inode.rdev
    return TreeEntry(path=path, kind=kind, mode=stat.S_IMODE(inode.mode), uid=inode.uid,
                     gid=inode.gid, size=size, sha256=digest, link_target=target, rdev=rdev,
                     xattrs=reader.xattrs(inode))


__all__ = ["ErofsReader", "ImageFile", "scan_erofs"]
