"""The kernel's side of the mount's FUSE connection: how many requests it has out at a time.

The kernel sends a FUSE daemon at most `max_background` asynchronous requests at a time (the
readahead of the block files, and the reads a file-backed EROFS mount makes of them): 12,
unless the daemon asks for more when the connection starts, which pyfuse3 cannot. The others
wait in the kernel, where no read timeout runs: behind 12 reads of a stalled source, a read
of anything waits for them to give up, and then as long again. The limit of a live
connection is a file of the FUSE control file system (fusectl, usually mounted at
/sys/fs/fuse/connections); where it is not mounted, it is mounted for a moment in a private
directory. Only root may raise the limit beyond the kernel's `max_user_bgreq`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import tempfile
from pathlib import Path

from lazyfs.mount.kernel import canonical

CONTROL_DIR = "/sys/fs/fuse/connections"
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 0x2, 0x4, 0x8
_MNT_DETACH = 0x2


def connection_id(mountpoint: str, mountinfo: str | None = None) -> int | None:
    """The kernel's number of the FUSE connection mounted at `mountpoint` (its directory in
    fusectl), from /proc/self/mountinfo (or `mountinfo`): no request to the file system.
    None if nothing is mounted there."""
    target = canonical(mountpoint)
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    found = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 5 or _unescape(fields[4]) != target:
            continue
        major, _, minor = fields[2].partition(":")
        found = (int(major) << 20) | int(minor)  # the kernel's dev_t, as fusectl names it
    return found


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\ooo (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def raise_request_limit(mountpoint: str, max_background: int) -> None:
    """Let the kernel have `max_background` asynchronous requests out to the FUSE file system
    at `mountpoint` (a quarter fewer before it calls the connection congested). Blocks (it
    may mount fusectl): call it from a worker thread. Raises OSError."""
    number = connection_id(mountpoint)
    if number is None:
        raise FileNotFoundError(f"no FUSE file system is mounted at {mountpoint}")
    connection = Path(CONTROL_DIR, str(number))
    if connection.is_dir():
        _write_limits(connection, max_background)
        return
    private = tempfile.mkdtemp(prefix="lazyfs-fusectl-")
    try:
        _mount_fusectl(private)
        try:
            _write_limits(Path(private, str(number)), max_background)
        finally:
            _umount(private)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(private)


def _write_limits(connection: Path, max_background: int) -> None:
    (connection / "max_background").write_text(str(max_background))
    (connection / "congestion_threshold").write_text(str(max(1, max_background * 3 // 4)))


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mount_fusectl(target: str) -> None:
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if _libc().mount(b"fusectl", os.fsencode(target), b"fusectl", flags, None) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"mount fusectl: {os.strerror(number)}")


def _umount(target: str) -> None:
    if _libc().umount2(os.fsencode(target), _MNT_DETACH) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"umount {target}: {os.strerror(number)}")
