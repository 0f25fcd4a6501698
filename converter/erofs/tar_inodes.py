"""A tar layer as a layer source of the EROFS writer: the tree `extract_layer` would write,
built in memory, and the files' data streamed from a second read of the layer.

The first read walks the headers only (`converter.source.iter_layer`, `converter.tar_members`)
and applies them as `converter.tar_extract` applies them to a directory, rule for rule: later
entries replace earlier ones (a directory over a directory updates its owner, mode and xattrs,
adding to earlier xattrs), whiteouts become 0:0 character devices and mark their directory
with `trusted.overlay.origin`, opaque markers `trusted.overlay.opaque=y`, aufs metadata is
ignored, missing parents (and the root without a `./` entry) are root-owned 0755 directories
with the layer's newest mtime, symlinks are 0777, `user.*` xattrs are dropped where Linux
refuses them, a hard link shares its target's node, and what extraction refuses (a path
through a symlink, a link to a missing target) is refused with the same error. Nothing is
written to disk, so no root is needed. The second read hands over the data of each member
whose file is still in the tree, in the layer's order: straight from the stream, at the
offsets the first read noted (parsing 200 000 headers again would double the time), unless
the layer has GNU sparse members, whose content only tarfile assembles.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import stat
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import BinaryIO

from converter.erofs.inode_tree import Node, directory, walk
from converter.errors import ConvertError, UnsafeTarError
from converter.source import CHUNK_SIZE, iter_layer, read_member
from converter.tar_extract import IMPLICIT_DIR_MODE, ExtractStats
from converter.tar_members import (
    OPAQUE_VALUE,
    OPAQUE_XATTR,
    ORIGIN_VALUE,
    ORIGIN_XATTR,
    ROOT,
    member_mtime_ns,
    member_xattrs,
    plan_member,
    xattr_allowed,
)
from lazyfs.erofs.build import MAX_NAME_BYTES, ErofsLimitError, split_xattr_name

log = logging.getLogger(__name__)

MAX_SYMLINK_BYTES = 4095
OpenStream = Callable[[], contextlib.AbstractContextManager[BinaryIO]]


class TarSource:
    """The layer `open_stream()` reads (uncompressed tar bytes; it is opened twice). Raises
    UnsafeTarError and ConvertError as `extract_layer` does, and ConvertError for what EROFS
    cannot store."""

    def __init__(self, open_stream: OpenStream) -> None:
        self._open = open_stream
        tree = _TarTree()
        with open_stream() as stream:
            for ordinal, (_, member) in enumerate(iter_layer(stream)):
                tree.apply(ordinal, member)
        self.root = tree.finish()
        self._data = tree.data
        self._sparse = tree.sparse
        self.stats = tree.stats()

    def file_data(self) -> Iterator[tuple[Node, Iterator[bytes]]]:
        with self._open() as stream:
            if self._sparse:
                for ordinal, (archive, member) in enumerate(iter_layer(stream)):
                    found = self._data.get(ordinal)
                    if found is not None:
                        yield found[0], read_member(archive, member)
                return
            cursor = _Cursor(stream)
            for node, offset in self._data.values():  # in the layer's order
                cursor.skip_to(offset)
                yield node, cursor.read(node.size)


class _Cursor:
    """Sequential reads of the uncompressed tar stream, by offset."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.position = 0

    def _piece(self, size: int) -> bytes:
        piece = self._stream.read(min(size, CHUNK_SIZE))
        if not piece:
            raise ConvertError(f"the layer ends at byte {self.position} of its tar on its "
                               "second read (did it change meanwhile?)")
        self.position += len(piece)
        return piece

    def skip_to(self, offset: int) -> None:
        while self.position < offset:
            self._piece(offset - self.position)

    def read(self, size: int) -> Iterator[bytes]:
        end = self.position + size
        while self.position < end:
            yield self._piece(end - self.position)


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class _TarTree:
    def __init__(self) -> None:
        self.root = directory(IMPLICIT_DIR_MODE)
        self.implicit: set[Node] = {self.root}  # their mtime: the layer's newest
        self.newest_ns = 0
        # member ordinal -> the file its data fills, and where its data starts in the tar
        self.data: dict[int, tuple[Node, int]] = {}
        self.sparse = False
        self.counts: Counter[str] = Counter()

    def apply(self, ordinal: int, member: tarfile.TarInfo) -> None:
        self.counts["entries"] += 1
        plan = plan_member(member)
        mtime_ns = member_mtime_ns(member)
        self.newest_ns = max(self.newest_ns, mtime_ns)
        op, path, entry = plan.op, plan.path, member.name
        if op == "ignore":
            log.debug("skipping aufs metadata entry %r", entry)
            self.counts["ignored"] += 1
            return
        if op == "opaque":
            self._ensure_dir(path, entry).set_xattr(_bytes(OPAQUE_XATTR), OPAQUE_VALUE)
            self.counts["opaque"] += 1
            return
        if op == "hardlink":
            self._link(entry, path, plan.link or "")
            return
        if op == "dir" and path == ROOT:
            self._update_dir(self.root, member, mtime_ns)
            return
        parent, name = self._parent(path, entry)
        assert parent.children is not None
        if op == "dir":
            existing = parent.children.get(name)
            if existing is None or not existing.is_dir:
                existing = parent.children[name] = directory()
            self._update_dir(existing, member, mtime_ns)
            return
        parent.children.pop(name, None)
        if op == "whiteout":
            node = Node(stat.S_IFCHR, member.uid, member.gid, mtime_ns)
            parent.set_xattr(_bytes(ORIGIN_XATTR), ORIGIN_VALUE)
            self.counts["whiteouts"] += 1
        else:
            node = self._node(op, member, plan.link, mtime_ns)
            self.counts[op + "s"] += 1
            if op == "file" and member.size:
                self.data[ordinal] = (node, member.offset_data)
                self.sparse = self.sparse or member.sparse is not None
                self.counts["file_bytes"] += member.size
        parent.children[name] = node

    def _update_dir(self, node: Node, member: tarfile.TarInfo, mtime_ns: int) -> None:
        """A directory entry over a directory: its owner, mode and mtime, xattrs added."""
        node.mode = stat.S_IFDIR | stat.S_IMODE(member.mode)
        node.uid, node.gid, node.mtime_ns = member.uid, member.gid, mtime_ns
        for key, value in self._xattrs(member, "dir").items():
            node.set_xattr(key, value)
        self.implicit.discard(node)
        self.counts["dirs"] += 1

    def _node(self, op: str, member: tarfile.TarInfo, link: str | None, mtime_ns: int) -> Node:
        mode = stat.S_IMODE(member.mode)
        xattrs = self._xattrs(member, op)
        if op == "file":
            return Node(stat.S_IFREG | mode, member.uid, member.gid, mtime_ns, size=member.size,
                        xattrs=xattrs)
        if op == "symlink":
            target = _bytes(link or "")
            if len(target) > MAX_SYMLINK_BYTES:
                raise ConvertError(f"tar entry {member.name!r}: symlink target of "
                                   f"{len(target)} bytes, Linux takes at most "
                                   f"{MAX_SYMLINK_BYTES}")
            return Node(stat.S_IFLNK | 0o777, member.uid, member.gid, mtime_ns, target=target,
                        xattrs=xattrs)
        kind = {"fifo": stat.S_IFIFO, "chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK}[op]
        rdev = (member.devmajor, member.devminor) if op != "fifo" else (0, 0)
        return Node(kind | mode, member.uid, member.gid, mtime_ns, rdev=rdev, xattrs=xattrs)

    def _xattrs(self, member: tarfile.TarInfo, op: str) -> dict[bytes, bytes]:
        kept: dict[bytes, bytes] = {}
        for name, value in sorted(member_xattrs(member).items()):
            if not xattr_allowed(name, op):
                log.warning("tar entry %r: dropping xattr %s (Linux allows user.* only on "
                            "files and directories)", member.name, name)
                continue
            try:
                split_xattr_name(_bytes(name))
            except ErofsLimitError as exc:
                raise ConvertError(f"tar entry {member.name!r}: {exc}") from None
            kept[_bytes(name)] = value
        return kept

    # --- paths, as `_Extractor` resolves them ---------------------------------------------

    def _parent(self, path: str, entry: str) -> tuple[Node, bytes]:
        """The directory that holds `path` (made as needed) and the name in it."""
        parent = self._ensure_dir(posixpath.dirname(path) or ROOT, entry)
        name = _bytes(posixpath.basename(path))
        if len(name) > MAX_NAME_BYTES:
            raise ConvertError(f"tar entry {entry!r}: name {posixpath.basename(path)!r} is "
                               f"longer than {MAX_NAME_BYTES} bytes")
        return parent, name

    def _ensure_dir(self, path: str, entry: str) -> Node:
        """Make `path` a real directory (with its parents), never through a symlink."""
        node = self.root
        if path == ROOT:
            return node
        walked = []
        for part in path.split("/"):
            walked.append(part)
            assert node.children is not None
            name = _bytes(part)
            child = node.children.get(name)
            if child is None:
                if len(name) > MAX_NAME_BYTES:
                    raise ConvertError(f"tar entry {entry!r}: name {part!r} is longer than "
                                       f"{MAX_NAME_BYTES} bytes")
                child = node.children[name] = directory(IMPLICIT_DIR_MODE)
                self.implicit.add(child)
            elif stat.S_ISLNK(child.mode):
                raise UnsafeTarError(f"tar entry {entry!r}: parent {'/'.join(walked)!r} is a "
                                     "symlink; writing through it could leave the layer")
            elif not child.is_dir:
                raise ConvertError(f"tar entry {entry!r}: parent {'/'.join(walked)!r} is not "
                                   "a directory")
            node = child
        return node

    def _existing(self, path: str, entry: str) -> Node | None:
        """The node at `path` when every parent is a real directory, else None; a path
        through a symlink is refused."""
        node = self.root
        parts = path.split("/")
        for number, part in enumerate(parts):
            assert node.children is not None
            child = node.children.get(_bytes(part))
            if child is None:
                return None
            if number == len(parts) - 1:
                return child
            if stat.S_ISLNK(child.mode):
                raise UnsafeTarError(f"tar entry {entry!r}: path {path!r} goes through "
                                     f"symlink {'/'.join(parts[:number + 1])!r}")
            if not child.is_dir:
                return None
            node = child
        return node

    def _link(self, entry: str, path: str, target: str) -> None:
        if target == path:
            return  # a link to itself changes nothing
        node = self._existing(target, entry)
        if node is None:
            raise UnsafeTarError(f"tar entry {entry!r}: hardlink target {target!r} is not in "
                                 "the layer (outside it, or not extracted yet)")
        if node.is_dir:
            raise ConvertError(f"tar entry {entry!r}: hardlink to directory {target!r}")
        parent, name = self._parent(path, entry)
        assert parent.children is not None
        parent.children.pop(name, None)
        if self._existing(target, entry) is None:
            raise ConvertError(f"tar entry {entry!r}: hardlink target {target!r} was removed "
                               "by replacing the link's own path")
        parent.children[name] = node
        self.counts["hardlinks"] += 1

    def finish(self) -> Node:
        for node in self.implicit:
            node.mtime_ns = self.newest_ns
        reachable = {node for _, node in walk(self.root) if node.is_file}
        self.data = {ordinal: found for ordinal, found in self.data.items()
                     if found[0] in reachable}
        return self.root

    def stats(self) -> ExtractStats:
        names = {field.name for field in fields(ExtractStats)}
        return ExtractStats(**{k: v for k, v in self.counts.items() if k in names})


__all__ = ["TarSource"]
