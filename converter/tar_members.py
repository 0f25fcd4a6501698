"""What one member of an OCI tar layer means: its path, its whiteout role, its xattrs, its mtime.

Pure interpretation of tar headers, no file system access; shared by extraction
(`converter.tar_extract`) and the model of a layer (`converter.tree.scan_tar`), so the two
agree. Paths are normalized to relative in-layer paths (`ROOT` is the layer root); a path that
is absolute, contains a NUL byte or climbs out with `..` is refused with UnsafeTarError naming
the entry. OCI whiteouts are translated to the overlayfs form: `dir/.wh.NAME` becomes a
whiteout of `dir/NAME`, `dir/.wh..wh..opq` marks `dir` opaque (the xattr
`trusted.overlay.opaque=y`), other `.wh..wh.` entries are aufs metadata and ignored. Ids and
device numbers that Linux would store as something else are refused.

A directory that a whiteout was written into also gets the xattr `trusted.overlay.origin`
with an empty value, as `mkfs.erofs --tar --aufs` (containerd's tar converter) marks it.
overlayfs hides whiteouts from a directory listing only where it knows the directory may
hold them: a directory merged from several layers, or one with that xattr. A directory that
exists in one layer only (a new directory, under an opaque one, or in the only layer of a
stack, whatever the layer's place) is otherwise read as it is, and lists its whiteouts as
unreadable entries.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from converter.errors import ConvertError, UnsafeTarError

log = logging.getLogger(__name__)

ROOT = "."
WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
OPAQUE_VALUE = b"y"
ORIGIN_XATTR = "trusted.overlay.origin"
ORIGIN_VALUE = b""  # "copied up, origin unknown": enough for overlayfs to filter whiteouts
_PAX_XATTR = "SCHILY.xattr."
_MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "unchanged" to chown
_MAX_MAJOR = (1 << 12) - 1  # the kernel's 32-bit dev_t: 12 bits major, 20 bits minor
_MAX_MINOR = (1 << 20) - 1


def normalize_path(name: str, entry: str, what: str = "path") -> str:
    """The in-layer relative path of a tar name (`ROOT` for the root), or UnsafeTarError."""
    if "\0" in name:
        raise UnsafeTarError(f"tar entry {entry!r}: {what} contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeTarError(f"tar entry {entry!r}: {what} {name!r} is absolute")
    parts: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UnsafeTarError(f"tar entry {entry!r}: {what} {name!r} escapes the layer")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts) if parts else ROOT


def parent_of(path: str) -> str:
    return posixpath.dirname(path) or ROOT


def ancestors(path: str) -> list[str]:
    """The directories above `path`, outermost first, without the root."""
    if path == ROOT:
        return []
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


@dataclass(frozen=True)
class MemberPlan:
    """What one tar member asks for, once whiteouts are translated to the overlayfs form.

    op is one of: file, dir, symlink, hardlink, chardev, blockdev, fifo, whiteout (a 0:0
    character device at `path`), opaque (mark directory `path`), ignore (aufs metadata).
    `link` is the symlink target as written, or the normalized hardlink target path.
    """

    op: str
    path: str
    link: str | None = None


def plan_member(member: tarfile.TarInfo) -> MemberPlan:
    """Interpret one member. Raises UnsafeTarError or ConvertError for entries we refuse."""
    path = normalize_path(member.name, member.name)
    _check_numbers(member)
    base = posixpath.basename(path)
    if base == OPAQUE_MARKER:
        return MemberPlan("opaque", parent_of(path))
    if base.startswith(WHITEOUT_META_PREFIX):
        return MemberPlan("ignore", path)
    if base.startswith(WHITEOUT_PREFIX):
        hidden = base[len(WHITEOUT_PREFIX) :]
        if not hidden or hidden in (".", ".."):
            raise ConvertError(f"tar entry {member.name!r}: whiteout names no file")
        parent = parent_of(path)
        return MemberPlan("whiteout", hidden if parent == ROOT else f"{parent}/{hidden}")
    if path == ROOT and not member.isdir():
        raise ConvertError(f"tar entry {member.name!r}: only a directory can be the layer root")
    if member.isdir():
        return MemberPlan("dir", path)
    if member.issym():
        if not member.linkname:
            raise ConvertError(f"tar entry {member.name!r}: symlink with an empty target")
        return MemberPlan("symlink", path, member.linkname)
    if member.islnk():
        target = normalize_path(member.linkname, member.name, "hardlink target")
        if target == ROOT:
            raise ConvertError(f"tar entry {member.name!r}: hardlink to the layer root")
        return MemberPlan("hardlink", path, target)
    if member.ischr():
        return MemberPlan("chardev", path)
    if member.isblk():
        return MemberPlan("blockdev", path)
    if member.isfifo():
        return MemberPlan("fifo", path)
    if member.type in tarfile.REGULAR_TYPES:
        return MemberPlan("file", path)
    raise ConvertError(
        f"tar entry {member.name!r}: unsupported entry type {member.type!r} at offset "
        f"{member.offset}"
    )


def _check_numbers(member: tarfile.TarInfo) -> None:
    """Refuse ids and device numbers that Linux (and EROFS) would store as something else."""
    for label, value, limit in (
        ("uid", member.uid, _MAX_ID),
        ("gid", member.gid, _MAX_ID),
        ("device major", member.devmajor, _MAX_MAJOR),
        ("device minor", member.devminor, _MAX_MINOR),
    ):
        if not 0 <= value <= limit:
            raise ConvertError(f"tar entry {member.name!r}: {label} {value} is out of range")


def member_xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    """The xattrs a member carries in `SCHILY.xattr.*` pax records, values as bytes."""
    # tarfile decodes pax values as UTF-8 with surrogateescape: encoding back is lossless.
    return {
        key[len(_PAX_XATTR) :]: value.encode("utf-8", "surrogateescape")
        for key, value in member.pax_headers.items()
        if key.startswith(_PAX_XATTR) and len(key) > len(_PAX_XATTR)
    }


def xattr_allowed(name: str, op: str) -> bool:
    """Whether Linux lets the xattr exist on this kind of inode: `user.*` only on regular
    files and directories (the kernel refuses it elsewhere), so it is dropped there."""
    return not name.startswith("user.") or op in ("file", "dir")


def member_mtime_ns(member: tarfile.TarInfo) -> int:
    """The member's mtime in nanoseconds, exact when a pax record carries fractions."""
    text = member.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except (InvalidOperation, ValueError):
            log.warning("tar member %s: its pax mtime %r is not a number; using %d",
                        member.name, text, int(member.mtime))
    return int(member.mtime) * 1_000_000_000
