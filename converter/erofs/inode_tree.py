"""The inodes and names of a layer as lazyfs's EROFS writer lays them out: a tree in memory,
built by a source (`dir_inodes`, `tar_inodes`, `image_inodes` of `converter.erofs`),
with no file data: a source hands each file's data over later, once the image's metadata is
laid out (`LayerSource.file_data`).

A `Node` is one inode: hard links are one node under several names. It is kept small (slots,
names as bytes only as keys of their directory): a layer of 200 000 files holds some 60 MiB
of them. The layout (`converter.erofs.layout`) fills in `nid` and, for directories and long
symlinks, `blkaddr`.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator
from typing import Protocol

NS_PER_SECOND = 1_000_000_000


class Node:
    """One inode. `mode` has the type bits; `mtime_ns` is the mtime in nanoseconds; `size` is
    a regular file's data size (its data comes from `source`, whatever the source makes of
    it) or a symlink's target length; `children` maps names to nodes in a directory (None
    elsewhere); `rdev` is (major, minor) of a device; `xattrs` maps names to values (None:
    none)."""

    __slots__ = ("blkaddr", "children", "gid", "mode", "mtime_ns", "nid", "nlink", "rdev",
                 "size", "source", "target", "uid", "xattrs")

    def __init__(self, mode: int, uid: int = 0, gid: int = 0, mtime_ns: int = 0, *,
                 size: int = 0, target: bytes | None = None, rdev: tuple[int, int] = (0, 0),
                 xattrs: dict[bytes, bytes] | None = None, source: object = None) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime_ns = mtime_ns
        self.size = len(target) if target is not None else size
        self.target = target
        self.rdev = rdev
        self.xattrs = xattrs or None
        self.source = source
        self.children: dict[bytes, Node] | None = {} if stat.S_ISDIR(mode) else None
        self.nlink = 0
        self.nid: int | None = None
        self.blkaddr = 0

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    def set_xattr(self, name: bytes, value: bytes) -> None:
        if self.xattrs is None:
            self.xattrs = {}
        self.xattrs[name] = value

    def __repr__(self) -> str:
        return f"Node(mode={self.mode:o}, size={self.size}, nid={self.nid})"


def directory(mode: int = 0o755, uid: int = 0, gid: int = 0, mtime_ns: int = 0) -> Node:
    """A new, empty directory node (`mode`: the permission bits)."""
    return Node(stat.S_IFDIR | stat.S_IMODE(mode), uid, gid, mtime_ns)


def walk(root: Node) -> Iterator[tuple[bytes, Node]]:
    """(path, node) of every name under `root` depth first, each directory's entries in name
    order, the root first as b"". A hard-linked node comes once per name."""
    yield b"", root
    stack: list[tuple[bytes, Iterator[tuple[bytes, Node]]]] = [
        (b"", iter(sorted((root.children or {}).items())))]
    while stack:
        prefix, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name, node = entry
        path = prefix + name
        yield path, node
        if node.children is not None:
            stack.append((path + b"/", iter(sorted(node.children.items()))))


def count_links(root: Node) -> int:
    """Set every node's `nlink` (names in the tree; 2 + subdirectories for a directory) and
    return the number of inodes."""
    for _, node in walk(root):
        node.nlink = 0
    inodes = 0
    for _, node in walk(root):
        if node.children is not None:
            node.nlink = 2 + sum(1 for child in node.children.values() if child.is_dir)
            inodes += 1
        else:
            inodes += node.nlink == 0
            node.nlink += 1
    return inodes


class LayerSource(Protocol):
    """Where a layer's tree and file data come from."""

    @property
    def root(self) -> Node:
        """The root directory, complete."""
        ...

    def file_data(self) -> Iterator[tuple[Node, Iterator[bytes]]]:
        """Every regular file with data once (each hard-linked node once), and its data in
        pieces, in the order the source reads them best. Raises ConvertError when a file's
        data cannot be read."""
        ...


def first_within(groups: Iterable[Iterable[Node]], max_bytes: int) -> list[Node]:
    """The nodes of `groups`, in order and each once, as long as their sizes add up to at most
    `max_bytes` (one too large is passed over, a later smaller one may still fit): the bound
    of a layout's picks, so that an unusual tree cannot push its other data far back."""
    picked: list[Node] = []
    seen: set[Node] = set()
    total = 0
    for nodes in groups:
        for node in nodes:
            if node not in seen and total + node.size <= max_bytes:
                seen.add(node)
                picked.append(node)
                total += node.size
    return picked


__all__ = ["NS_PER_SECOND", "LayerSource", "Node", "count_links", "directory", "first_within",
           "walk"]
