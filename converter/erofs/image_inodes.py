"""An uncompressed EROFS image as a layer source of the EROFS writer: its tree and its files'
data, read with lazyfs's own reader (`converter.erofs_tree`), so that an image (mkfs.erofs's,
containerd's, an earlier conversion's) can be written anew in lazyfs's layout and start-up
order.

Everything an inode holds is kept: type and permission bits, owner, mtime (a compact inode's is
the build time), size, symlink target, device numbers, every xattr (inline and shared), and
hard links as one node. `blocks_of` tells which image block holds which file block, for a
start-up order recorded on this image. Compressed images raise ConvertError: their data is not
in blocks of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from converter.erofs.inode_tree import NS_PER_SECOND, Node, walk
from converter.erofs_tree import ErofsReader, ImageFile
from converter.errors import ConvertError
from lazyfs.erofs.reader import ErofsError, Inode, kind_of, parse_superblock

_MAX_SYMLINK_BYTES = 4096
_SIGNED = 1 << 63


class ErofsSource:
    """The image at `image_path`, read when made; close it (or use `with`) when done. Raises
    ConvertError for an image that is malformed or compressed, or cannot be read."""

    def __init__(self, image_path: Path) -> None:
        self._path = image_path
        try:
            self._file = open(image_path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise ConvertError(f"{image_path}: cannot read: {exc.strerror}") from None
        try:
            image = ImageFile(self._file)
            self._reader = ErofsReader(image, parse_superblock(image.read_up_to(0, 2048)))
            self.root = self._scan()
        except ErofsError as exc:
            self.close()
            raise ConvertError(f"{image_path}: {exc}") from None
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ErofsSource:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def _scan(self) -> Node:
        reader = self._reader
        root_inode = reader.inode(reader.sb.root_nid)
        root = self._node(root_inode)
        if not root.is_dir:
            raise ErofsError(f"root inode {root_inode.nid} is not a directory")
        links: dict[int, Node] = {}
        seen_dirs = {root_inode.nid}
        pending = [(root_inode, root)]
        while pending:
            inode, directory = pending.pop()
            assert directory.children is not None
            for name, nid in reader.entries(inode):
                node = links.get(nid)
                if node is None:
                    child = reader.inode(nid)
                    node = self._node(child)
                    if node.is_dir:
                        if nid in seen_dirs:
                            raise ErofsError(f"directory inode {nid} is reached twice: a loop")
                        seen_dirs.add(nid)
                        pending.append((child, node))
                    elif child.nlink > 1:
                        links[nid] = node
                directory.children[name] = node
        return root

    def _node(self, inode: Inode) -> Node:
        reader = self._reader
        kind = kind_of(inode.mode)
        if kind is None:
            raise ErofsError(f"inode {inode.nid}: unknown file type in mode {inode.mode:#o}")
        if inode.mtime is None:
            seconds, nanoseconds = reader.sb.build_time, reader.sb.build_time_nsec
        else:
            seconds, nanoseconds = inode.mtime, inode.mtime_nsec
        if seconds >= _SIGNED:
            seconds -= 2 * _SIGNED
        xattrs = {name.encode("utf-8", "surrogateescape"): value
                  for name, value in reader.xattrs(inode, all_names=True).items()}
        target = None
        if kind == "symlink":
            if not 0 < inode.size <= _MAX_SYMLINK_BYTES:
                raise ErofsError(f"inode {inode.nid}: symlink of {inode.size} bytes")
            target = b"".join(reader.data(inode))
        elif kind == "file":
            reader.extents(inode)  # a compressed file is refused here, not halfway through
        return Node(inode.mode, inode.uid, inode.gid, seconds * NS_PER_SECOND + nanoseconds,
                    size=inode.size if kind == "file" else 0, target=target,
                    rdev=inode.rdev if kind in ("chardev", "blockdev") else (0, 0),
                    xattrs=xattrs, source=inode.nid)

    def _inode(self, node: Node) -> Inode:
        assert isinstance(node.source, int)
        return self._reader.inode(node.source)

    def file_data(self) -> Iterator[tuple[Node, Iterator[bytes]]]:
        for node in _files(self.root):
            yield node, self._data(node)

    def _data(self, node: Node) -> Iterator[bytes]:
        try:
            yield from self._reader.data(self._inode(node))
        except ErofsError as exc:
            raise ConvertError(f"{self._path}: {exc}") from None

    def blocks_of(self, block_size: int) -> Iterator[tuple[int, Node, int]]:
        """(image block, node, file block) for every file block stored in a block of its own
        (not a hole, not an inline tail), files in the order `file_data` hands them over."""
        for node in _files(self.root):
            position = 0
            try:
                extents = self._reader.extents(self._inode(node))
            except ErofsError as exc:
                raise ConvertError(f"{self._path}: {exc}") from None
            for extent in extents:
                if extent.offset is not None and extent.offset % block_size == 0 \
                        and position % block_size == 0:
                    first = extent.offset // block_size
                    for number in range(-(-extent.length // block_size)):
                        yield first + number, node, position // block_size + number
                position += extent.length


def _files(root: Node) -> Iterator[Node]:
    """Every regular file with data once, depth first in name order."""
    done: set[Node] = set()
    for _, node in walk(root):
        if node.is_file and node.size and node not in done:
            done.add(node)
            yield node


__all__ = ["ErofsSource"]
