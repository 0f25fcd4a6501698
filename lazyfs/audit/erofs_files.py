"""The file tree of a raw EROFS image, whoever runs the check.

lazyfs's own reader (`converter.erofs_tree`) reads every uncompressed image without root and
shows everything (owners, xattrs, hardlinks, whiteout devices). An image it does not decode
(compressed with `mkfs.erofs -z`) is mounted read-only by the kernel instead, which needs
root; without root such a layer's files cannot be compared, and the error says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from converter.erofs_tree import scan_erofs
from converter.tree import TreeEntry, scan_directory
from lazyfs.erofs.reader import ErofsUnsupportedError
from lazyfs.errors import LazyfsError

_MOUNT_TIMEOUT_SECONDS = 60


class TreeUnavailableError(LazyfsError):
    """The tree of an EROFS image cannot be read here (what it needs is in the message)."""


def can_mount_erofs() -> bool:
    """Whether this process may mount EROFS images: root, mount(8) and the kernel's erofs."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    try:
        with open("/proc/filesystems", encoding="ascii") as f:
            return any(line.split()[-1:] == ["erofs"] for line in f)
    except OSError:
        return False


def erofs_tree(image: Path, work: Path) -> tuple[dict[str, TreeEntry], str]:
    """The tree inside the raw EROFS image at `image`, and how it was read ("read by lazyfs"
    or "mounted read-only"); `work` is a private directory for a mount point. Raises
    ErofsError (from lazyfs.erofs.reader) for a malformed image, ConvertError when a mounted
    tree cannot be scanned, TreeUnavailableError when the image can be read neither way."""
    try:
        return scan_erofs(image), "read by lazyfs"
    except ErofsUnsupportedError as exc:
        if not can_mount_erofs():
            raise TreeUnavailableError(f"{exc}: lazyfs does not decode it, and only root can "
                                       "mount it to read its files") from None
    mount_point = work / f"mnt-{image.name}"
    mount_point.mkdir()
    try:
        mounted = _run(["mount", "-t", "erofs", "-o", "ro,loop,nodev,nosuid,noexec",
                        os.fspath(image), os.fspath(mount_point)])
        if mounted.returncode != 0:
            raise TreeUnavailableError(f"lazyfs does not decode it, and mounting it failed: "
                                       f"{_one_line(mounted)}")
        try:
            return scan_directory(mount_point), "mounted read-only"
        finally:
            if _run(["umount", os.fspath(mount_point)]).returncode != 0:
                _run(["umount", "-l", os.fspath(mount_point)])
    finally:
        with contextlib.suppress(OSError):  # still busy after a lazy unmount: leave it
            mount_point.rmdir()


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(args, capture_output=True, text=True, errors="replace",
                              timeout=_MOUNT_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(args, -1, "", f"timed out after "
                                                         f"{_MOUNT_TIMEOUT_SECONDS} s")
    except OSError as exc:
        return subprocess.CompletedProcess(args, -1, "", f"cannot run {args[0]}: {exc}")


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    text = result.stderr.strip() or result.stdout.strip() or "no output"
    return text.replace("\n", " | ")[-500:]


__all__ = ["TreeUnavailableError", "can_mount_erofs", "erofs_tree"]
