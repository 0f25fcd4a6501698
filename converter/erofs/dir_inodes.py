"""A directory on disk as a layer source of the EROFS writer: what mkfs.erofs takes from a tree.

Everything is read with lstat, never following a symlink: type, permission bits, owner, mtime
(to the nanosecond), size, symlink target, device numbers and every xattr (as mkfs.erofs 1.5
keeps them); files that share an inode in the tree are hard links of one node. Names and
paths stay bytes, whatever their encoding. The data is read afterwards, file by file in the
tree's order (depth first, names sorted): a file whose size changed in between is an error.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from converter.erofs.inode_tree import Node, walk
from converter.errors import ConvertError
from lazyfs.erofs.build import ErofsLimitError, split_xattr_name

READ_BYTES = 1 << 20


class DirectorySource:
    """The tree under `root_dir` (read when made). Raises ConvertError naming a path that
    cannot be read or stored."""

    def __init__(self, root_dir: Path) -> None:
        self._base = os.fsencode(root_dir)
        self.root = self._scan()

    def _full(self, path: bytes) -> bytes:
        return self._base + b"/" + path if path else self._base

    def _scan(self) -> Node:
        try:
            st = os.lstat(self._base)
        except OSError as exc:
            raise ConvertError(f"{os.fsdecode(self._base)}: cannot read: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConvertError(f"{os.fsdecode(self._base)}: not a directory")
        root = self._node(self._base, st)
        links: dict[tuple[int, int], Node] = {}
        pending = [(self._base, root)]
        while pending:
            path, directory = pending.pop()
            assert directory.children is not None
            try:
                with os.scandir(path) as listing:
                    for entry in listing:
                        st = entry.stat(follow_symlinks=False)
                        key = (st.st_dev, st.st_ino)
                        node = links.get(key) if st.st_nlink > 1 else None
                        if node is None:
                            node = self._node(entry.path, st)
                            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                                links[key] = node
                        directory.children[entry.name] = node
                        if node.is_dir:
                            pending.append((entry.path, node))
            except OSError as exc:
                raise ConvertError(f"{os.fsdecode(exc.filename or path)}: cannot read: "
                                   f"{exc.strerror}") from None
        return root

    def _node(self, full: bytes, st: os.stat_result) -> Node:
        mode = st.st_mode
        target = os.readlink(full) if stat.S_ISLNK(mode) else None
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if stat.S_ISCHR(mode) or \
            stat.S_ISBLK(mode) else (0, 0)
        return Node(mode, st.st_uid, st.st_gid, st.st_mtime_ns,
                    size=st.st_size if stat.S_ISREG(mode) else 0, target=target, rdev=rdev,
                    xattrs=_xattrs(full))

    def file_data(self) -> Iterator[tuple[Node, Iterator[bytes]]]:
        done: set[Node] = set()
        for path, node in walk(self.root):
            if not node.is_file or not node.size or node in done:
                continue
            if node.nlink > 1:
                done.add(node)
            yield node, self._read(self._full(path), node.size)

    def _read(self, full: bytes, size: int) -> Iterator[bytes]:
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise ConvertError(f"{os.fsdecode(full)}: cannot read: {exc.strerror}") from None
        try:
            done = 0
            while True:
                try:
                    piece = os.read(fd, READ_BYTES)
                except OSError as exc:
                    raise ConvertError(f"{os.fsdecode(full)}: cannot read: "
                                       f"{exc.strerror}") from None
                if not piece:
                    break
                done += len(piece)
                if done > size:
                    break
                yield piece
            if done != size:
                raise ConvertError(f"{os.fsdecode(full)}: changed while it was converted "
                                   f"({size} bytes, then {done})")
        finally:
            os.close(fd)


def _xattrs(full: bytes) -> dict[bytes, bytes] | None:
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise ConvertError(f"{os.fsdecode(full)}: cannot list xattrs: {exc.strerror}") from None
    found: dict[bytes, bytes] = {}
    for name in names:
        key = name.encode("utf-8", "surrogateescape")
        try:
            split_xattr_name(key)
            found[key] = os.getxattr(full, name, follow_symlinks=False)
        except ErofsLimitError as exc:
            raise ConvertError(f"{os.fsdecode(full)}: {exc}") from None
        except OSError as exc:
            raise ConvertError(f"{os.fsdecode(full)}: cannot read xattr {name}: "
                               f"{exc.strerror}") from None
    return found or None


__all__ = ["DirectorySource"]
