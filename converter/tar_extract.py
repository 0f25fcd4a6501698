"""Extract an OCI tar layer into a directory that `mkfs.erofs` can build from.

The layer is read as a stream (never seeked, never held in memory) and written with the
overlayfs form of OCI whiteouts, so the EROFS image works as an overlay lower layer:
`dir/.wh.NAME` becomes a 0:0 character device at `dir/NAME` and marks `dir` with the xattr
`trusted.overlay.origin` (empty), `dir/.wh..wh..opq` becomes the xattr
`trusted.overlay.opaque=y` on `dir`. The mark is what `mkfs.erofs --tar --aufs` writes, and
what makes overlayfs hide the whiteouts of a directory no other layer has (see
`converter.tar_members`).

Safety: symlinks are never followed while writing. Every parent of an entry must be a real
directory inside the destination; a path that is absolute or climbs out with `..`, a parent
that is a symlink, or a hardlink to something outside (or not yet extracted) is refused with
UnsafeTarError naming the entry. Ownership, modes (setuid, sticky), xattrs and device nodes
are kept, so extraction runs as root, into a directory that other users cannot reach.

Tar semantics: a later entry replaces an earlier one at the same path (a directory entry over
an existing directory only updates its owner, mode and xattrs, adding to earlier xattrs).
Missing parents are created as root-owned 0755 directories; they, and the root when the layer
has no `./` entry, get the newest mtime of the layer so that the result is reproducible.
A hardlink entry shares its target's inode; its own header attributes are not applied (as GNU
tar does). The header reading (`converter.source.iter_layer`) and interpretation
(`converter.tar_members.plan_member`) are shared with `converter.tree.scan_tar`, so the model
of a layer and its extraction agree; the interpretation's names are importable from here too.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tarfile
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO

from converter.errors import ConvertError, UnsafeTarError
from converter.source import iter_layer, read_member
from converter.tar_members import (
    OPAQUE_MARKER,
    OPAQUE_VALUE,
    OPAQUE_XATTR,
    ORIGIN_VALUE,
    ORIGIN_XATTR,
    ROOT,
    WHITEOUT_META_PREFIX,
    WHITEOUT_PREFIX,
    MemberPlan,
    ancestors,
    member_mtime_ns,
    member_xattrs,
    normalize_path,
    parent_of,
    plan_member,
    xattr_allowed,
)

log = logging.getLogger(__name__)

IMPLICIT_DIR_MODE = 0o755


# --- writing the tree -------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractStats:
    """Counts of what `extract_layer` wrote (entries = tar members read)."""

    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    chardevs: int = 0
    blockdevs: int = 0
    fifos: int = 0
    whiteouts: int = 0
    opaque: int = 0
    ignored: int = 0
    file_bytes: int = 0


def extract_layer(tar_stream: BinaryIO, dest: Path) -> ExtractStats:
    """Extract the uncompressed tar layer `tar_stream` into the empty directory `dest`.

    `dest` must sit in a directory only its owner can enter (e.g. a subdirectory of a
    `tempfile.TemporaryDirectory()`): the tree may hold setuid files and device nodes.
    Needs root. Raises UnsafeTarError for entries that would escape `dest`, ConvertError for
    any other unusable input or a failed write, naming the entry.
    """
    _check_destination(dest)
    return _Extractor(dest).run(tar_stream)


def _check_destination(dest: Path) -> None:
    if os.geteuid() != 0:
        raise ConvertError("extracting a layer needs root (owners, device nodes, xattrs)")
    try:
        st = os.lstat(dest)
        parent = os.stat(dest.resolve().parent)
        empty = stat.S_ISDIR(st.st_mode) and next(os.scandir(dest), None) is None
    except OSError as e:
        raise ConvertError(f"{dest}: cannot use as extraction directory: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConvertError(f"{dest}: extraction target is not a directory")
    if not empty:
        raise ConvertError(f"{dest}: extraction directory is not empty")
    if parent.st_mode & 0o077 or parent.st_uid != os.geteuid():
        raise ConvertError(
            f"{dest}: other users can reach it (its parent has mode "
            f"{stat.S_IMODE(parent.st_mode):o}); extract inside a private directory such as "
            "a tempfile.TemporaryDirectory()"
        )


class _Extractor:
    def __init__(self, dest: Path) -> None:
        self.dest = os.fspath(dest)
        self.counts: Counter[str] = Counter()
        self.known_dirs: set[str] = {ROOT}
        self.dir_mtimes: dict[str, int | None] = {ROOT: None}  # None: created implicitly
        self.newest_mtime_ns = 0

    def run(self, stream: BinaryIO) -> ExtractStats:
        os.chown(self.dest, 0, 0)
        os.chmod(self.dest, IMPLICIT_DIR_MODE)
        for archive, member in iter_layer(stream):
            self.counts["entries"] += 1
            plan = plan_member(member)
            mtime_ns = member_mtime_ns(member)
            self.newest_mtime_ns = max(self.newest_mtime_ns, mtime_ns)
            try:
                self._apply(archive, member, plan, mtime_ns)
            except OSError as e:
                raise ConvertError(
                    f"tar entry {member.name!r}: cannot write {plan.path!r}: {e}"
                ) from None
        self._set_dir_mtimes()
        names = {f.name for f in fields(ExtractStats)}
        return ExtractStats(**{k: v for k, v in self.counts.items() if k in names})

    def _full(self, path: str) -> str:
        return self.dest if path == ROOT else os.path.join(self.dest, path)

    def _apply(
        self, archive: tarfile.TarFile, member: tarfile.TarInfo, plan: MemberPlan, mtime_ns: int
    ) -> None:
        op, path = plan.op, plan.path
        if op == "ignore":
            log.debug("skipping aufs metadata entry %r", member.name)
            self.counts["ignored"] += 1
            return
        if op == "opaque":
            self._ensure_dir(path, member.name)
            os.setxattr(self._full(path), OPAQUE_XATTR, OPAQUE_VALUE, follow_symlinks=False)
            self.counts["opaque"] += 1
            return
        if op == "hardlink":
            self._link(member, path, plan.link or "")
            return
        self._ensure_parents(path, member.name)
        if op == "dir":
            if not self._clear(path, keep_dir=True):
                os.mkdir(self._full(path), 0o700)
                self.known_dirs.add(path)
            self._set_owner_mode_xattrs(path, member, op)
            self.dir_mtimes[path] = mtime_ns
            self.counts["dirs"] += 1
            return
        self._clear(path, keep_dir=False)
        full = self._full(path)
        if op == "file":
            self._write_file(archive, member, full, mtime_ns)
            return
        if op == "symlink":
            os.symlink(plan.link or "", full)
        elif op == "whiteout":
            os.mknod(full, stat.S_IFCHR, os.makedev(0, 0))
            os.chown(full, member.uid, member.gid, follow_symlinks=False)
            os.chmod(full, 0)
            os.utime(full, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
            os.setxattr(self._full(parent_of(path)), ORIGIN_XATTR, ORIGIN_VALUE,
                        follow_symlinks=False)
            self.counts["whiteouts"] += 1
            return
        elif op == "fifo":
            os.mkfifo(full, 0o600)
        else:
            kind = stat.S_IFCHR if op == "chardev" else stat.S_IFBLK
            os.mknod(full, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        self._set_owner_mode_xattrs(path, member, op)
        os.utime(full, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        self.counts[op + "s"] += 1

    def _write_file(
        self, archive: tarfile.TarFile, member: tarfile.TarInfo, full: str, mtime_ns: int
    ) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with open(os.open(full, flags, 0o600), "wb") as out:
            for piece in read_member(archive, member):
                out.write(piece)
                self.counts["file_bytes"] += len(piece)
            out.flush()
            fd = out.fileno()
            # chown clears setuid/setgid and file capabilities: mode and xattrs come after.
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, stat.S_IMODE(member.mode))
            self._set_xattrs(fd, member, "file")
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        self.counts["files"] += 1

    def _set_owner_mode_xattrs(self, path: str, member: tarfile.TarInfo, op: str) -> None:
        full = self._full(path)
        os.chown(full, member.uid, member.gid, follow_symlinks=False)
        if op != "symlink":  # Linux symlinks have no mode of their own; `full` is not one
            os.chmod(full, stat.S_IMODE(member.mode))
        self._set_xattrs(full, member, op)

    def _set_xattrs(self, target: str | int, member: tarfile.TarInfo, op: str) -> None:
        for name, value in sorted(member_xattrs(member).items()):
            if not xattr_allowed(name, op):
                log.warning(
                    "tar entry %r: dropping xattr %s (Linux allows user.* only on files and "
                    "directories)",
                    member.name,
                    name,
                )
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as e:
                raise ConvertError(
                    f"tar entry {member.name!r}: cannot set xattr {name}: {e.strerror}"
                ) from None

    def _link(self, member: tarfile.TarInfo, path: str, target: str) -> None:
        if target == path:
            return  # a link to itself changes nothing
        target_st = self._existing(target, member.name)
        if target_st is None:
            raise UnsafeTarError(
                f"tar entry {member.name!r}: hardlink target {target!r} is not in the layer "
                "(outside it, or not extracted yet)"
            )
        if stat.S_ISDIR(target_st.st_mode):
            raise ConvertError(f"tar entry {member.name!r}: hardlink to directory {target!r}")
        self._ensure_parents(path, member.name)
        self._clear(path, keep_dir=False)
        if self._existing(target, member.name) is None:
            raise ConvertError(
                f"tar entry {member.name!r}: hardlink target {target!r} was removed by "
                "replacing the link's own path"
            )
        os.link(self._full(target), self._full(path), follow_symlinks=False)
        self.counts["hardlinks"] += 1

    def _existing(self, path: str, entry: str) -> os.stat_result | None:
        """lstat of an existing path whose parents are all real directories, else None."""
        for parent in ancestors(path):
            try:
                st = os.lstat(self._full(parent))
            except FileNotFoundError:
                return None
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeTarError(
                    f"tar entry {entry!r}: path {path!r} goes through symlink {parent!r}"
                )
            if not stat.S_ISDIR(st.st_mode):
                return None
        try:
            return os.lstat(self._full(path))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _ensure_parents(self, path: str, entry: str) -> None:
        for parent in ancestors(path):
            self._ensure_dir(parent, entry)

    def _ensure_dir(self, path: str, entry: str) -> None:
        """Make `path` a real directory (creating it and its parents), never via a symlink."""
        if path in self.known_dirs:
            return
        self._ensure_parents(path, entry)
        full = self._full(path)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            os.mkdir(full, 0o700)
            os.chown(full, 0, 0)
            os.chmod(full, IMPLICIT_DIR_MODE)
            self.dir_mtimes[path] = None
        else:
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeTarError(
                    f"tar entry {entry!r}: parent {path!r} is a symlink; writing through it "
                    "could leave the layer"
                )
            if not stat.S_ISDIR(st.st_mode):
                raise ConvertError(f"tar entry {entry!r}: parent {path!r} is not a directory")
        self.known_dirs.add(path)

    def _clear(self, path: str, *, keep_dir: bool) -> bool:
        """Remove whatever is at `path` (a whole tree for a directory) unless it is a directory
        and `keep_dir`. Return whether a directory was kept."""
        full = self._full(path)
        try:
            st = os.lstat(full)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(full)
            return False
        if keep_dir:
            self.known_dirs.add(path)
            return True
        shutil.rmtree(full)  # does not follow symlinks
        prefix = path + "/"
        self.known_dirs = {d for d in self.known_dirs if d != path and not d.startswith(prefix)}
        self.dir_mtimes = {
            d: t for d, t in self.dir_mtimes.items() if d != path and not d.startswith(prefix)
        }
        return False

    def _set_dir_mtimes(self) -> None:
        # Last, because creating entries changes their directories' mtimes.
        for path, mtime_ns in self.dir_mtimes.items():
            ns = self.newest_mtime_ns if mtime_ns is None else mtime_ns
            try:
                os.utime(self._full(path), ns=(ns, ns), follow_symlinks=False)
            except OSError as e:
                raise ConvertError(f"cannot set the mtime of {path!r}: {e}") from None


__all__ = [
    "IMPLICIT_DIR_MODE",
    "OPAQUE_MARKER",
    "OPAQUE_VALUE",
    "OPAQUE_XATTR",
    "ORIGIN_VALUE",
    "ORIGIN_XATTR",
    "ROOT",
    "WHITEOUT_META_PREFIX",
    "WHITEOUT_PREFIX",
    "ExtractStats",
    "MemberPlan",
    "ancestors",
    "extract_layer",
    "iter_layer",
    "member_mtime_ns",
    "member_xattrs",
    "normalize_path",
    "parent_of",
    "plan_member",
    "read_member",
    "xattr_allowed",
]
