"""Kernel mounts on top of the FUSE block files: EROFS (file-backed or via a loop device),
overlayfs, and their teardown.

The kernel reads the EROFS superblock through the FUSE file while a mount is under way, so
the FUSE loop in this very process must keep serving meanwhile: a blocking mount(2) on the
event loop would deadlock the daemon against itself. mount(2) therefore runs in a worker
thread (no program to start: a few milliseconds less per mount), umount(8), losetup(8) and
fusermount3(1) as subprocesses under trio. A mount that hangs is given up after
COMMAND_TIMEOUT_S; its thread ends when the FUSE file system under it goes away.

How far the kernel reads a block file ahead sets the size of the FUSE requests that bulk
reads make: a FUSE file system's readahead starts at 128 KiB (and FUSE's INIT can only lower
it), so a file read in order came as 128 KiB requests, each a trip through the daemon. Before
EROFS is mounted on a block file of a FUSE file system, that file system's readahead is raised
to BLOCK_FILE_READAHEAD_KB (a file takes its readahead when it is opened: the mount's, or the
loop device's, open comes after), and a loop device's own is raised alike: sequential reads
then come as requests of up to 1 MiB (libfuse's largest), several in flight. A small read
still asks for little: the kernel starts its readahead small and grows it while reads go on
in order.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from lazyfs.errors import LazyfsError
from lazyfs.mount.state import ErofsMountRecord, MountRecord

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 60.0
# How far the kernel may read a block file (and a loop device over one) ahead: libfuse's
# largest request. Further costs start-ups: the kernel grows its readahead over a start's
# walk through files laid out in order (a pod's start through CRI fetched 21.7 MiB at 128 KiB,
# 24.7 MiB at 1 MiB, 36.9 MiB at 4 MiB; tools/bench_cri, 20 ms / 100 Mbit/s).
BLOCK_FILE_READAHEAD_KB = 1024
UNMOUNT_ATTEMPTS = 6
UNMOUNT_FIRST_DELAY_S = 0.1
# mount(2) copies at most one page of options; leave room for what mount(8) adds.
MAX_MOUNT_OPTIONS_BYTES = 3584
_ENV = {**os.environ, "LC_ALL": "C"}  # stable messages to match "busy" in


class MountError(LazyfsError):
    """A mount, unmount or loop operation failed; the message quotes the tool's stderr,
    `reason` is that quote alone."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class MountBusyError(MountError):
    """A mountpoint stayed busy (open files, a working directory) through every retry."""


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 2:
            continue
        mounts.append(MountInfo(_unescape(fields[4]), rest[0], _unescape(rest[1])))
    return mounts


def current_mounts() -> list[MountInfo]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def canonical(path: str | os.PathLike[str]) -> str:
    """Absolute path with symlinks of the parent resolved, without touching `path` itself:
    stat on a FUSE mountpoint whose daemon died fails with ENOTCONN."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    """True if something is mounted at `path` (works where os.path.ismount cannot, on a
    dead FUSE mount)."""
    target = canonical(path)
    return any(m.mountpoint == target for m in current_mounts())


def mounts_at_or_below(path: str | os.PathLike[str]) -> list[MountInfo]:
    """Mounts at `path` or below it, deepest first (the order to unmount them in)."""
    target = canonical(path)
    prefix = target.rstrip("/") + "/"
    found = [
        m for m in current_mounts() if m.mountpoint == target or m.mountpoint.startswith(prefix)
    ]
    return sorted(found, key=lambda m: m.mountpoint.count("/"), reverse=True)


def loops_backed_by(path_prefix: str) -> list[str]:
    """Loop devices whose backing file is `path_prefix` or lies below it (read from sysfs, so
    it works when the backing file itself can no longer be opened)."""
    prefix = path_prefix.rstrip("/")
    devices = []
    for backing in sorted(Path("/sys/block").glob("loop*/loop/backing_file")):
        try:
            name = backing.read_text().rstrip("\n").removesuffix(" (deleted)")
        except OSError:  # detached while we looked
            continue
        if name == prefix or name.startswith(prefix + "/"):
            devices.append("/dev/" + backing.parent.parent.name)
    return devices


async def _run(argv: Sequence[str], cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a mount tool; never raises for its exit status. Raises MountError on timeout."""
    try:
        with trio.fail_after(COMMAND_TIMEOUT_S):
            return await trio.run_process(
                list(argv),
                check=False,
                capture_stdout=True,
                capture_stderr=True,
                env=_ENV,
                stdin=subprocess.DEVNULL,
                cwd=cwd,
            )
    except trio.TooSlowError:
        raise MountError(
            f"`{' '.join(argv)}` did not finish within {COMMAND_TIMEOUT_S:.0f} s"
        ) from None
    except FileNotFoundError as exc:
        raise MountError(f"{argv[0]} not found: install it (util-linux, fuse3)") from exc


def _stderr(result: subprocess.CompletedProcess[bytes]) -> str:
    text = (result.stderr or b"").decode(errors="replace").strip()
    text = " ".join(line.strip() for line in text.splitlines() if "dmesg(1)" not in line)
    return text or f"exit status {result.returncode}"


def loop_backing_file(device: str) -> str | None:
    """The backing file of loop device `device` (from sysfs), or None if it has none."""
    try:
        name = Path(f"/sys/block/{os.path.basename(device)}/loop/backing_file").read_text()
    except OSError:
        return None
    return name.rstrip("\n").removesuffix(" (deleted)")


def device_in_use(device: str) -> bool:
    """True if a file system (a mount, or a superblock an overlay still holds after the
    mount went) has block device `device` open: an exclusive open then fails."""
    try:
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as exc:
        return exc.errno == errno.EBUSY
    return False


# A program of its own: a FUSE file of this process must never be open in it, since a
# program forked meanwhile (mount(8), losetup(8)) would close it before its exec, and wait
# for its FLUSH on this very event loop, blocked in that fork (and unkillable at exit).
_CHANGE_LOOP_FD = """
import fcntl, os, sys
device, image_file = sys.argv[1:]
try:
    fcntl.ioctl(os.open(device, os.O_RDONLY), 0x4C06, os.open(image_file, os.O_RDONLY))
except OSError as exc:
    sys.exit(f"LOOP_CHANGE_FD: {exc.strerror}")
"""


async def change_loop_file(device: str, image_file: str) -> None:
    """Make read-only loop device `device` read `image_file` instead of its backing file,
    under whatever is mounted on it (the kernel allows it when the device is read-only and
    both files have the same size). Raises MountError with the kernel's reason."""
    result = await _run([sys.executable, "-I", "-S", "-c", _CHANGE_LOOP_FD, device,
                         image_file])
    if result.returncode != 0:
        reason = _stderr(result)
        raise MountError(f"cannot switch {device} to {image_file}: {reason}", reason)
    log.info("switched %s to %s", device, image_file)


def raise_readahead(image_file: str, readahead_kb: int = BLOCK_FILE_READAHEAD_KB) -> bool:
    """Let the kernel read files of the FUSE file system holding `image_file` up to
    `readahead_kb` ahead (never lowered), for files opened from now on. Returns False, changing
    nothing, when `image_file` is on any other file system. Blocks (a stat of a FUSE file
    waits for its daemon to answer, INIT first): call it from a worker thread. Raises
    OSError."""
    device = os.stat(image_file).st_dev
    number = f"{os.major(device)}:{os.minor(device)}"
    with open("/proc/self/mountinfo") as stream:
        fuse = any(line.split()[2] == number and line.partition(" - ")[2].startswith("fuse")
                   for line in stream)
    if not fuse:
        return False
    _raise_readahead_file(Path("/sys/class/bdi", number, "read_ahead_kb"), readahead_kb)
    return True


def _raise_readahead_file(path: Path, readahead_kb: int) -> None:
    if int(path.read_text()) < readahead_kb:
        path.write_text(str(readahead_kb))


async def _raise_readahead(image_file: str, device: str | None = None) -> None:
    """`raise_readahead` of `image_file`, or with `device` (a loop device over it) of that
    device, in a worker thread; a failure is logged (the mount works, with smaller
    requests)."""
    def raise_it() -> None:
        if device is None:
            raise_readahead(image_file)
        else:
            _raise_readahead_file(
                Path("/sys/block", os.path.basename(device), "queue", "read_ahead_kb"),
                BLOCK_FILE_READAHEAD_KB)

    try:
        await trio.to_thread.run_sync(raise_it, abandon_on_cancel=True)
    except (OSError, ValueError) as exc:
        log.info("%s: the kernel keeps its readahead (%s): bulk reads come in smaller "
                 "requests", image_file, exc)


async def attach_loop(image_file: str) -> str:
    """Attach `image_file` to a free read-only loop device. Returns the device path."""
    result = await _run(["losetup", "--find", "--show", "--read-only", image_file])
    device = result.stdout.decode().strip()
    if result.returncode != 0 or not device.startswith("/dev/"):
        raise MountError(f"cannot attach {image_file} to a loop device: {_stderr(result)}")
    log.info("attached %s to %s", image_file, device)
    return device


async def detach_loop(device: str) -> None:
    """Detach a loop device; one already gone is fine. (A device still mounted is only marked
    to detach when its last user goes: the kernel's autoclear.)"""
    result = await _run(["losetup", "--detach", device])
    if result.returncode != 0:
        message = _stderr(result)
        if "No such device" in message or "No such file" in message:
            return
        raise MountError(f"cannot detach loop device {device}: {message}")
    log.info("detached %s", device)


MS_RDONLY = 1


def _mount_call(source: str, target: str, fstype: str, flags: int, data: str | None) -> None:
    """mount(2) itself. Raises OSError."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags,
                  None if data is None else data.encode()) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


async def _mount(source: str, target: str, fstype: str, flags: int = 0,
                 data: str | None = None) -> str | None:
    """mount(2) in a worker thread, so that the event loop (and the FUSE file system it
    serves) keeps running. Returns None when mounted, else the reason ("mount(2): ...").
    Raises MountError when the call does not return within COMMAND_TIMEOUT_S."""
    try:
        with trio.fail_after(COMMAND_TIMEOUT_S):
            await trio.to_thread.run_sync(_mount_call, source, target, fstype, flags, data,
                                          abandon_on_cancel=True)
    except trio.TooSlowError:
        raise MountError(
            f"mounting {source} ({fstype}) at {target} did not finish within "
            f"{COMMAND_TIMEOUT_S:.0f} s"
        ) from None
    except OSError as exc:
        return f"mount(2): {exc.strerror}"
    return None


async def mount_erofs_file_backed(image_file: str, mountpoint: str) -> None:
    """Mount `image_file` itself as EROFS (Linux >= 6.12). Raises MountError.

    mount(8) of util-linux would turn a regular file into a loop device by itself whenever
    blkid knows the file system type, so this calls mount(2) directly."""
    await _raise_readahead(image_file)
    reason = await _mount(image_file, mountpoint, "erofs", MS_RDONLY)
    if reason is not None:
        raise MountError(f"cannot mount {image_file} as EROFS at {mountpoint}: {reason}", reason)
    log.info("mounted %s at %s (file-backed EROFS)", image_file, mountpoint)


async def mount_erofs_via_loop(
    image_file: str, mountpoint: str, on_loop_attached: Callable[[str], None] | None = None
) -> str:
    """Mount `image_file` as EROFS through a read-only loop device; returns the device.
    `on_loop_attached(device)` runs before the mount so the device can be recorded. Raises
    MountError (after detaching the device again)."""
    await _raise_readahead(image_file)
    device = await attach_loop(image_file)
    if on_loop_attached is not None:
        on_loop_attached(device)
    await _raise_readahead(image_file, device)
    result = await _run(["mount", "-t", "erofs", "-o", "ro", device, mountpoint])
    if result.returncode != 0:
        with trio.CancelScope(shield=True):
            await detach_loop(device)
        raise MountError(
            f"cannot mount {image_file} as EROFS at {mountpoint} via {device}: {_stderr(result)}"
        )
    log.info("mounted %s at %s (EROFS on %s)", image_file, mountpoint, device)
    return device


async def mount_erofs_device(device: str, mountpoint: str) -> None:
    """Mount block device `device` read-only as EROFS at `mountpoint` (a superblock already
    reading it is shared). Raises MountError."""
    result = await _run(["mount", "-t", "erofs", "-o", "ro", device, mountpoint])
    if result.returncode != 0:
        raise MountError(f"cannot mount {device} as EROFS at {mountpoint}: {_stderr(result)}")
    log.info("mounted %s at %s (EROFS)", device, mountpoint)


async def mount_erofs(
    image_file: str,
    mountpoint: str,
    *,
    on_loop_attached: Callable[[str], None] | None = None,
) -> ErofsMountRecord:
    """Mount `image_file` read-only as EROFS at `mountpoint`: file-backed first, else through
    a loop device. Raises MountError quoting both attempts."""
    try:
        await mount_erofs_file_backed(image_file, mountpoint)
        return ErofsMountRecord(image_file, mountpoint)
    except MountError as exc:
        file_backed_error = exc.reason
        log.info("%s; trying a loop device", exc)
    try:
        device = await mount_erofs_via_loop(image_file, mountpoint, on_loop_attached)
    except MountError as exc:
        raise MountError(f"{exc} (file-backed: {file_backed_error})") from None
    return ErofsMountRecord(image_file, mountpoint, device)


def overlay_options(
    lowerdirs: Sequence[str], upperdir: str | None = None, workdir: str | None = None
) -> str:
    """The overlayfs option string; `lowerdirs[0]` is the top-most layer. Raises ValueError
    for no lower dirs, upper without work dir (or the reverse), or a path that cannot be
    written into the option string."""
    if not lowerdirs:
        raise ValueError("an overlay needs at least one lower directory")
    if (upperdir is None) != (workdir is None):
        raise ValueError("an overlay upper directory needs a work directory, and vice versa")
    paths = [*lowerdirs, *(p for p in (upperdir, workdir) if p is not None)]
    for path in paths:
        if any(c in path for c in ",:\\\n"):
            raise ValueError(f"{path}: overlay directories cannot contain ',', ':' or '\\'")
    options = "lowerdir=" + ":".join(lowerdirs)
    if upperdir is not None:
        options += f",upperdir={upperdir},workdir={workdir}"
    return options


async def mount_overlay(
    lowerdirs: Sequence[str],
    mountpoint: str,
    *,
    upperdir: str | None = None,
    workdir: str | None = None,
) -> None:
    """Stack `lowerdirs` (top-most first) at `mountpoint`, read-only without an upper dir.

    Mount options must fit in one page: when absolute paths of many layers would not, and the
    lower directories share a parent, they are named relative to it and mount(8) runs there
    (the kernel resolves them against the caller's working directory, as containerd does).
    Raises MountError with the kernel's (or mount(8)'s) reason, ValueError for bad arguments.
    """
    options = overlay_options(lowerdirs, upperdir, workdir)
    cwd = None
    parents = {os.path.dirname(path) for path in lowerdirs}
    if len(options) > MAX_MOUNT_OPTIONS_BYTES and len(parents) == 1:
        cwd = parents.pop()
        options = overlay_options([os.path.basename(p) for p in lowerdirs], upperdir, workdir)
    if len(options) > MAX_MOUNT_OPTIONS_BYTES:
        raise MountError(
            f"cannot mount overlay at {mountpoint}: {len(lowerdirs)} layers make "
            f"{len(options)} bytes of mount options, more than the kernel takes"
        )
    if cwd is None:  # mount(2) itself: no mount(8) to start
        reason = await _mount("overlay", mountpoint, "overlay",
                              MS_RDONLY if upperdir is None else 0, options)
    else:  # relative names: mount(8) in that directory (a thread shares the process's)
        result = await _run(["mount", "-t", "overlay", "overlay", "-o",
                             options if upperdir is not None else "ro," + options,
                             mountpoint], cwd)
        reason = None if result.returncode == 0 else _stderr(result)
    if reason is not None:
        raise MountError(f"cannot mount overlay at {mountpoint}: {reason}")
    log.info("mounted overlay at %s (%s%s)", mountpoint,
             "ro," if upperdir is None else "", options)


async def unmount(
    mountpoint: str, *, attempts: int = UNMOUNT_ATTEMPTS, lazy_fallback: bool = False
) -> None:
    """Unmount `mountpoint`, retrying while it is busy; nothing mounted there is fine.

    When it stays busy: detach it lazily if `lazy_fallback`, else raise MountBusyError.
    Raises MountError quoting umount(8) for any other failure.
    """
    delay = UNMOUNT_FIRST_DELAY_S
    message = ""
    for attempt in range(attempts):
        if not is_mountpoint(mountpoint):
            return
        result = await _run(["umount", mountpoint])
        if result.returncode == 0:
            log.info("unmounted %s", mountpoint)
            return
        message = _stderr(result)
        if not is_mountpoint(mountpoint):
            return
        if "busy" not in message:
            raise MountError(f"cannot unmount {mountpoint}: {message}")
        if attempt + 1 < attempts:
            await trio.sleep(delay)
            delay *= 2
    if not lazy_fallback:
        raise MountBusyError(
            f"cannot unmount {mountpoint}: {message} (close the files and "
            "working directories under it, or use `lazyfs umount --lazy`)"
        )
    log.warning(
        "%s is still busy; detaching it lazily (it goes away when no longer used)", mountpoint
    )
    result = await _run(["umount", "--lazy", mountpoint])
    if result.returncode != 0 and is_mountpoint(mountpoint):
        raise MountError(f"cannot detach {mountpoint}: {_stderr(result)}")


async def fuse_unmount_lazy(mountpoint: str) -> None:
    """Detach a FUSE mount whose daemon may be gone (`fusermount3 -u -z`)."""
    if not is_mountpoint(mountpoint):
        return
    result = await _run(["fusermount3", "-u", "-z", mountpoint])
    if result.returncode != 0 and is_mountpoint(mountpoint):
        raise MountError(f"cannot unmount FUSE file system at {mountpoint}: {_stderr(result)}")
    log.info("detached FUSE file system at %s", mountpoint)


def erofs_mounts_of(record: MountRecord) -> list[str]:
    """Mountpoints of EROFS mounts reading the record's block files, directly or through a
    loop device: recorded ones, and one a killed mount(8) may have finished unrecorded."""
    loops = set(loops_backed_by(record.fuse_dir))
    if record.temp_dir is not None:
        loops.update(loops_backed_by(record.temp_dir))
    block_files = {_canonical_below(path, record.fuse_dir) for path in record.block_files}
    found = [erofs.mountpoint for erofs in reversed(record.erofs_mounts)]
    for directory in (record.mountpoint, record.layers_dir):
        if directory is None:
            continue
        for mount in mounts_at_or_below(directory):
            if mount.fstype == "erofs" and (mount.source in loops or mount.source in block_files):
                found.append(mount.mountpoint)
    return list(dict.fromkeys(found))


def _canonical_below(path: str, fuse_dir: str) -> str:
    """`canonical(path)` without a look into `fuse_dir` when `path` lies in it: that is the
    FUSE file system, whose daemon may no longer answer (a stat would wait forever)."""
    relative = os.path.relpath(path, fuse_dir)
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return canonical(path)
    return os.path.join(canonical(fuse_dir), relative)


def overlays_of(record: MountRecord) -> list[str]:
    """Overlay mountpoints of the record, last stacked first: each image's (whether or not
    recording it finished) and the single-layer `overlay`."""
    wanted = [image.mountpoint for image in reversed(record.images)]
    if record.overlay is not None:
        wanted.append(record.overlay)
    mounted = {m.mountpoint for m in current_mounts() if m.fstype == "overlay"}
    return [path for path in dict.fromkeys(wanted) if canonical(path) in mounted]


async def unmount_kernel_mounts(record: MountRecord, *, lazy_fallback: bool,
                                attempts: int = UNMOUNT_ATTEMPTS) -> None:
    """Take down what the record lists above the FUSE mount, top first: overlays, EROFS
    mounts (newest first), then the loop devices still backed by a block file or a file of
    `temp_dir` (only those: a recorded device may since have been reused by someone else).
    Each mount is tried `attempts` times while busy. Raises MountError (MountBusyError) and
    leaves the rest in place if one fails."""
    for mountpoint in overlays_of(record):
        await unmount(mountpoint, attempts=attempts, lazy_fallback=lazy_fallback)
    for mountpoint in erofs_mounts_of(record):
        await unmount(mountpoint, attempts=attempts, lazy_fallback=lazy_fallback)
    for directory in (record.fuse_dir, record.temp_dir):
        if directory is not None:
            for device in loops_backed_by(directory):
                await detach_loop(device)
