"""Last-resort cleanup for tests that mount: force-unmount a directory and everything below it,
detach the loop devices of a backing file, kill a process.

Independent of lazyfs's own code on purpose: it must work when lazyfs is what broke. Every
function tries everything it can and never raises, so a `finally:` can call it blindly.

    from tests.support.mounts import cleanup
    try:
        ...
    finally:
        cleanup(mountpoints=[mp], backing_prefixes=[state_dir], pids=[pid])
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

_TOOL_TIMEOUT_S = 30


def _unescape(field: str) -> str:
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts_below(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(mountpoint, fstype) of every mount at or below `path`, deepest and newest first."""
    target = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(target)
    target = os.path.join(os.path.realpath(parent), name)
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) < 5 or not rest:
            continue
        mountpoint = _unescape(fields[4])
        if mountpoint == target or mountpoint.startswith(target.rstrip("/") + "/"):
            found.append((mountpoint, rest[0]))
    found.reverse()  # newest first: a stacked mount goes before the one below it
    found.sort(key=lambda item: item[0].count("/"), reverse=True)
    return found


def _quiet(argv: list[str]) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=_TOOL_TIMEOUT_S,
            check=False,
        )


def force_unmount(path: str | os.PathLike[str]) -> None:
    """Detach everything mounted at or below `path` (FUSE with fusermount3, the rest with
    umount --lazy)."""
    for _ in range(3):  # a lazy detach can uncover a mount stacked below it
        mounts = mounts_below(path)
        if not mounts:
            return
        for mountpoint, fstype in mounts:
            if fstype.startswith("fuse"):
                _quiet(["fusermount3", "-u", "-z", mountpoint])
            _quiet(["umount", "--lazy", mountpoint])


def detach_loops(backing_prefix: str | os.PathLike[str]) -> None:
    """Detach every loop device whose backing file is `backing_prefix` or lies below it."""
    prefix = os.fspath(backing_prefix).rstrip("/")
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            name = backing.read_text().rstrip("\n").removesuffix(" (deleted)")
        except OSError:
            continue
        if name == prefix or name.startswith(prefix + "/"):
            _quiet(["losetup", "--detach", "/dev/" + backing.parent.parent.name])


def kill_pid(pid: int | None, timeout_s: float = 10.0) -> None:
    """SIGKILL `pid` and wait (reaping it if it is our child) until it is gone."""
    if not pid or pid <= 0:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0]:
                return
        try:
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rpartition(")")[2].split()[0] == "Z":
                    return  # a zombie of another parent holds no mounts
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.05)


def cleanup(
    mountpoints: Iterable[str | os.PathLike[str]] = (),
    backing_prefixes: Iterable[str | os.PathLike[str]] = (),
    pids: Iterable[int | None] = (),
) -> None:
    """Unmount, detach, then kill: what is mounted goes first so killed daemons leave no
    dead FUSE mounts behind that would hang the next test."""
    mountpoints, backing_prefixes = list(mountpoints), list(backing_prefixes)
    # Loop devices first (those still mounted go with their last unmount): once a FUSE mount
    # under a prefix is detached, its files no longer show below it.
    for prefix in backing_prefixes:
        detach_loops(prefix)
    for mountpoint in mountpoints:
        force_unmount(mountpoint)
    for prefix in backing_prefixes:
        force_unmount(prefix)
        detach_loops(prefix)
    for pid in pids:
        kill_pid(pid)
    for path in [*mountpoints, *backing_prefixes]:
        force_unmount(path)
