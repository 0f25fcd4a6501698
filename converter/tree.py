"""A file tree as lazyfs compares it: the end-to-end check of `lazyfs verify --against`.

Three producers meet here: a directory on disk (`scan_directory`, used on an extracted tree,
a mounted EROFS image or a lazyfs mount) and a tar layer (`scan_tar`, the tree the layer
means once its whiteouts are in the overlayfs form, as a converter writes it).
`compare_trees` lists every difference in words.

What is compared: type, permission bits (with setuid, setgid, sticky), numeric owner, file
size and SHA-256, symlink target, device numbers, xattrs and which paths are hardlinks of
one another. Not compared: timestamps (mkfs.erofs may clamp them and implicit directories
get one chosen at extraction), directory sizes and link counts (filesystem details), and the
xattr `security.selinux` (a label the host's policy puts on files, not part of the layer).
Sizes are 0 for everything but regular files. The root directory is the entry "." and is
compared like any other: its owner, mode and xattrs come from the layer's `./` entry. A
directory a whiteout was written into carries `trusted.overlay.origin` (empty).

Converters of tar layers agree on everything the tar says, and differ where it says nothing
(a `TarConvention`): `lazyfs convert` (`extract_layer`, then mkfs.erofs from the directory)
makes the root of a layer without a `./` entry root:root 0755, gives symlinks mode 0777
(Linux has no symlink modes) and ignores aufs metadata (`.wh..wh.NAME`); containerd's
converter, `mkfs.erofs --tar --aufs`, makes that root 0777, keeps a symlink's mode from its
header, and turns aufs metadata into a whiteout of `.wh.NAME`. `scan_tar_each` describes the
tree of every convention in one read of the layer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import stat
import tarfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from converter.errors import ConvertError, UnsafeTarError
from converter.source import CHUNK_SIZE, iter_layer, read_member
from converter.tar_extract import IMPLICIT_DIR_MODE
from converter.tar_members import (
    OPAQUE_VALUE,
    OPAQUE_XATTR,
    ORIGIN_VALUE,
    ORIGIN_XATTR,
    ROOT,
    WHITEOUT_PREFIX,
    MemberPlan,
    ancestors,
    member_xattrs,
    parent_of,
    plan_member,
    xattr_allowed,
)

IGNORED_XATTRS = frozenset({"security.selinux"})
# "setid" alone skips only the setuid and setgid bits of files (which some extractors, like
# `fsck.erofs --extract` of erofs-utils 1.5, lose); "symlink_mode" only the modes of symlinks
# (which no copy on Linux keeps: an EROFS image stores one, an extracted symlink is 0777);
# "mode" skips all permission bits.
COMPARED_ASPECTS = frozenset(
    {"mode", "setid", "symlink_mode", "owner", "size", "content", "link_target", "rdev",
     "xattrs", "hardlinks"}
)
_SETID_BITS = 0o6000
_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "chardev",
    stat.S_IFBLK: "blockdev",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


@dataclass(frozen=True)
class TreeEntry:
    """One path of a tree.

    kind: file, dir, symlink, chardev, blockdev, fifo or socket (a hardlinked file is a
    `file`; `inode_group` tells which paths share its inode: the smallest such path, or None
    when no other path in the tree does).
    """

    path: str
    kind: str
    mode: int
    uid: int
    gid: int
    size: int = 0
    sha256: str | None = None
    link_target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: Mapping[str, bytes] = field(default_factory=dict, hash=False)
    inode_group: str | None = None


# --- directories ------------------------------------------------------------------------------


def scan_directory(root: Path) -> dict[str, TreeEntry]:
    """Describe the tree under `root` (never following symlinks), keyed by relative path.

    Raises ConvertError naming the path that cannot be read.
    """
    base = os.fspath(root)
    entries: dict[str, TreeEntry] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    pending = [ROOT]
    while pending:
        path = pending.pop()
        full = base if path == ROOT else os.path.join(base, path)
        try:
            entry, st = _scan_one(path, full)
            if entry.kind == "dir":
                with os.scandir(full) as listing:
                    pending.extend(d.name if path == ROOT else f"{path}/{d.name}" for d in listing)
        except OSError as e:
            raise ConvertError(f"{full}: cannot scan: {e.strerror or e}") from None
        entries[path] = entry
        if entry.kind != "dir":
            inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
    return _with_groups(entries, inodes.values())


def _scan_one(path: str, full: str) -> tuple[TreeEntry, os.stat_result]:
    st = os.lstat(full)
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "unknown")
    size, digest, target, rdev = 0, None, None, None
    if kind == "file":
        size, digest = st.st_size, _hash_file(full)
    elif kind == "symlink":
        target = os.readlink(full)
    elif kind in ("chardev", "blockdev"):
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
    entry = TreeEntry(
        path=path,
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=size,
        sha256=digest,
        link_target=target,
        rdev=rdev,
        xattrs=_read_xattrs(full),
    )
    return entry, st


def _hash_file(full: str) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while count := os.readv(fd, [buffer]):
            digest.update(view[:count])
    finally:
        os.close(fd)
    return digest.hexdigest()


def _read_xattrs(full: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(full, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    return {
        name: os.getxattr(full, name, follow_symlinks=False)
        for name in sorted(names)
        if name not in IGNORED_XATTRS
    }


# --- tar layers -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TarConvention:
    """What a converter of tar layers makes where the tar says nothing.

    `root_mode`: the root's mode when the layer has no `./` entry (root:root, no xattrs);
    `symlink_mode`: every symlink's mode, or None for the mode in its header;
    `aufs_metadata_whiteouts`: whether `DIR/.wh..wh.NAME` (other than the opaque marker)
    becomes a whiteout of `DIR/.wh.NAME` (else it is ignored).
    """

    name: str
    root_mode: int
    symlink_mode: int | None
    aufs_metadata_whiteouts: bool


LAZYFS_CONVENTION = TarConvention("lazyfs convert", IMPLICIT_DIR_MODE, 0o777, False)
MKFS_EROFS_TAR_CONVENTION = TarConvention("mkfs.erofs --tar --aufs", 0o777, None, True)
TAR_CONVENTIONS = (LAZYFS_CONVENTION, MKFS_EROFS_TAR_CONVENTION)


@dataclass
class _Inode:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int = 0
    sha256: str | None = None
    link_target: str | None = None
    rdev: tuple[int, int] | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)


def scan_tar(stream: BinaryIO,
             convention: TarConvention = LAZYFS_CONVENTION) -> dict[str, TreeEntry]:
    """Describe the tree an uncompressed tar layer stands for, as a converter following
    `convention` writes it (by default `lazyfs convert`, exactly as `extract_layer` does).

    Later entries replace earlier ones; hardlinks share one inode. Raises UnsafeTarError and
    ConvertError for the same entries that `extract_layer` refuses.
    """
    return scan_tar_each(stream, (convention,))[convention]


def scan_tar_each(stream: BinaryIO, conventions: Collection[TarConvention] = TAR_CONVENTIONS
                  ) -> dict[TarConvention, dict[str, TreeEntry]]:
    """The tree of the layer under each of `conventions`, from one read of `stream`. Raises
    as `scan_tar`."""
    models = [_TarModel(convention) for convention in conventions]
    for archive, member in iter_layer(stream):
        plan = plan_member(member)
        content: tuple[int, str] | None = None
        if plan.op == "file":
            digest, size = hashlib.sha256(), 0
            for piece in read_member(archive, member):
                digest.update(piece)
                size += len(piece)
            content = (size, digest.hexdigest())
        for model in models:
            model.apply(member, plan, content)
    return {model.convention: _entries_of(model.tree) for model in models}


class _TarModel:
    """One convention's tree of a layer, built member by member."""

    def __init__(self, convention: TarConvention) -> None:
        self.convention = convention
        self.tree: dict[str, _Inode] = {ROOT: _Inode("dir", convention.root_mode, 0, 0)}

    def apply(self, member: tarfile.TarInfo, plan: MemberPlan,
              content: tuple[int, str] | None) -> None:
        tree, op, path, name = self.tree, plan.op, plan.path, member.name
        if op == "ignore" and self.convention.aufs_metadata_whiteouts:
            hidden = posixpath.basename(path)[len(WHITEOUT_PREFIX):]
            parent = parent_of(path)
            op, path = "whiteout", hidden if parent == ROOT else f"{parent}/{hidden}"
        if op == "ignore":
            return
        if op == "opaque":
            _ensure_dir(tree, path, name)
            tree[path].xattrs[OPAQUE_XATTR] = OPAQUE_VALUE
            return
        if op == "hardlink":
            _link(tree, path, plan.link or "", name)
            return
        _ensure_parents(tree, path, name)
        mode = stat.S_IMODE(member.mode)
        if op == "symlink" and self.convention.symlink_mode is not None:
            mode = self.convention.symlink_mode
        xattrs = {k: v for k, v in member_xattrs(member).items() if xattr_allowed(k, op)}
        existing = tree.get(path)
        if op == "dir" and existing is not None and existing.kind == "dir":
            existing.mode, existing.uid, existing.gid = mode, member.uid, member.gid
            existing.xattrs.update(xattrs)
            return
        _remove(tree, path)
        if op == "whiteout":
            tree[path] = _Inode("chardev", 0, member.uid, member.gid, rdev=(0, 0))
            tree[parent_of(path)].xattrs[ORIGIN_XATTR] = ORIGIN_VALUE
            return
        inode = _Inode(op, mode, member.uid, member.gid, xattrs=xattrs)
        if op == "file":
            assert content is not None
            inode.size, inode.sha256 = content
        elif op == "symlink":
            inode.link_target = plan.link
        elif op in ("chardev", "blockdev"):
            inode.rdev = (member.devmajor, member.devminor)
        tree[path] = inode


def _ensure_parents(tree: dict[str, _Inode], path: str, entry: str) -> None:
    parents = ancestors(path)
    if parents:
        _ensure_dir(tree, parents[-1], entry)


def _ensure_dir(tree: dict[str, _Inode], path: str, entry: str) -> None:
    for parent in [*ancestors(path), path]:
        inode = tree.get(parent)
        if inode is None:
            tree[parent] = _Inode("dir", IMPLICIT_DIR_MODE, 0, 0)
        elif inode.kind == "symlink":
            raise UnsafeTarError(
                f"tar entry {entry!r}: parent {parent!r} is a symlink; writing through it "
                "could leave the layer"
            )
        elif inode.kind != "dir":
            raise ConvertError(f"tar entry {entry!r}: parent {parent!r} is not a directory")


def _link(tree: dict[str, _Inode], path: str, target: str, entry: str) -> None:
    if target == path:
        return
    for parent in ancestors(target):
        inode = tree.get(parent)
        if inode is not None and inode.kind == "symlink":
            raise UnsafeTarError(
                f"tar entry {entry!r}: path {target!r} goes through symlink {parent!r}"
            )
    inode = tree.get(target)
    if inode is None:
        raise UnsafeTarError(
            f"tar entry {entry!r}: hardlink target {target!r} is not in the layer "
            "(outside it, or not extracted yet)"
        )
    if inode.kind == "dir":
        raise ConvertError(f"tar entry {entry!r}: hardlink to directory {target!r}")
    _ensure_parents(tree, path, entry)
    _remove(tree, path)
    if target not in tree:
        raise ConvertError(
            f"tar entry {entry!r}: hardlink target {target!r} was removed by replacing the "
            "link's own path"
        )
    tree[path] = inode


def _remove(tree: dict[str, _Inode], path: str) -> None:
    inode = tree.pop(path, None)
    if inode is not None and inode.kind == "dir":
        prefix = path + "/"
        for key in [k for k in tree if k.startswith(prefix)]:
            del tree[key]


def _entries_of(tree: dict[str, _Inode]) -> dict[str, TreeEntry]:
    entries: dict[str, TreeEntry] = {}
    inodes: dict[int, list[str]] = {}
    for path, inode in tree.items():
        entries[path] = TreeEntry(
            path=path,
            kind=inode.kind,
            mode=inode.mode,
            uid=inode.uid,
            gid=inode.gid,
            size=inode.size,
            sha256=inode.sha256,
            link_target=inode.link_target,
            rdev=inode.rdev,
            xattrs={k: v for k, v in sorted(inode.xattrs.items()) if k not in IGNORED_XATTRS},
        )
        if inode.kind != "dir":
            inodes.setdefault(id(inode), []).append(path)
    return _with_groups(entries, inodes.values())


def _with_groups(
    entries: dict[str, TreeEntry], groups: Collection[list[str]]
) -> dict[str, TreeEntry]:
    for paths in groups:
        if len(paths) > 1:
            label = min(paths)
            for path in paths:
                entries[path] = replace(entries[path], inode_group=label)
    return entries


# --- comparison -------------------------------------------------------------------------------


def compare_trees(
    expected: Mapping[str, TreeEntry],
    actual: Mapping[str, TreeEntry],
    *,
    ignore: Collection[str] = (),
) -> list[str]:
    """List the differences between two trees, one line each, ordered by path; [] if equal.

    `ignore` names aspects not to compare, from COMPARED_ASPECTS (e.g. "xattrs", "hardlinks"
    and "setid" against a tree that `fsck.erofs --extract` of erofs-utils 1.5 wrote, which
    restores none of them). Raises ValueError for an unknown aspect.
    """
    unknown = set(ignore) - COMPARED_ASPECTS
    if unknown:
        raise ValueError(f"unknown aspects to ignore: {sorted(unknown)}")
    skip = frozenset(ignore)
    groups_expected, groups_actual = _groups(expected), _groups(actual)
    problems: list[str] = []
    for path in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(path), actual.get(path)
        shown = _printable(path)
        if got is None:
            problems.append(f"missing: {shown} ({want.kind if want else '?'})")
            continue
        if want is None:
            problems.append(f"extra: {shown} ({got.kind})")
            continue
        if want.kind != got.kind:
            problems.append(f"{shown}: type: expected {want.kind}, found {got.kind}")
            continue
        problems.extend(f"{shown}: {p}" for p in _differences(want, got, skip))
        if "hardlinks" not in skip and want.inode_group != got.inode_group:
            problems.append(
                f"{shown}: hardlinks: expected "
                f"{_links(groups_expected, want.inode_group, path)}, "
                f"found {_links(groups_actual, got.inode_group, path)}"
            )
    return problems


def _differences(want: TreeEntry, got: TreeEntry, skip: frozenset[str]) -> list[str]:
    out: list[str] = []
    mask = ~_SETID_BITS if "setid" in skip and want.kind == "file" else ~0
    mode_skipped = "mode" in skip or ("symlink_mode" in skip and want.kind == "symlink")
    if not mode_skipped and want.mode & mask != got.mode & mask:
        out.append(f"mode: expected {want.mode:04o}, found {got.mode:04o}")
    if "owner" not in skip and (want.uid, want.gid) != (got.uid, got.gid):
        out.append(f"owner: expected {want.uid}:{want.gid}, found {got.uid}:{got.gid}")
    size_differs = "size" not in skip and want.size != got.size
    if size_differs:
        out.append(f"size: expected {want.size}, found {got.size}")
    if "content" not in skip and not size_differs and want.sha256 != got.sha256:
        out.append(f"content: expected sha256 {want.sha256}, found {got.sha256}")
    if "link_target" not in skip and want.link_target != got.link_target:
        out.append(f"symlink target: expected {want.link_target!r}, found {got.link_target!r}")
    if "rdev" not in skip and want.rdev != got.rdev:
        out.append(f"device: expected {_dev(want.rdev)}, found {_dev(got.rdev)}")
    if "xattrs" not in skip:
        for name in sorted(want.xattrs.keys() | got.xattrs.keys()):
            a, b = want.xattrs.get(name), got.xattrs.get(name)
            if a is None:
                out.append(f"xattr {name}: unexpected, found {b!r}")
            elif b is None:
                out.append(f"xattr {name}: missing, expected {a!r}")
            elif a != b:
                out.append(f"xattr {name}: expected {a!r}, found {b!r}")
    return out


def _groups(tree: Mapping[str, TreeEntry]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for path, entry in tree.items():
        if entry.inode_group is not None:
            groups.setdefault(entry.inode_group, []).append(path)
    return groups


def _links(groups: dict[str, list[str]], label: str | None, path: str) -> str:
    others = sorted(p for p in groups.get(label or "", []) if p != path)
    if not others:
        return "no other links"
    return "links with " + ", ".join(_printable(p) for p in others)


def _dev(rdev: tuple[int, int] | None) -> str:
    return "none" if rdev is None else f"{rdev[0]}:{rdev[1]}"


def _printable(path: str) -> str:
    """A path fit for one line of output, whatever bytes its name had."""
    text = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


__all__ = [
    "COMPARED_ASPECTS",
    "IGNORED_XATTRS",
    "LAZYFS_CONVENTION",
    "MKFS_EROFS_TAR_CONVENTION",
    "TAR_CONVENTIONS",
    "TarConvention",
    "TreeEntry",
    "compare_trees",
    "scan_directory",
    "scan_tar",
    "scan_tar_each",
]
