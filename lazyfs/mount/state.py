"""The record of an active mount: one JSON file per mountpoint in the state directory.

The daemon writes the record as each piece comes up (FUSE mount, loop device, EROFS mount),
so `lazyfs umount` can take down whatever exists even after the daemon died half-way, and
`lazyfs stats` / `lazyfs mounts` find the mount. Writes are atomic (temporary file, rename): a
reader never sees half a record, and a daemon that dies leaves its last record whole. They
are not fsynced: a record describes kernel mounts, which a reboot (the one thing an fsync
would guard against) takes away with it, and a start writes it five times or more.

A background daemon logs to a file beside its record. `lazyfs umount` deletes the log of a
daemon that stopped cleanly and logged nothing at WARNING or above; the others are kept for
the user, the most recent `KEPT_LOGS` of them (`retire_log`, `prune_logs`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lazyfs.errors import LazyfsError
from lazyfs.fuse.operations import STATS_FILE_NAME

DEFAULT_STATE_DIR = "/run/lazyfs"
STATE_DIR_ENV = "LAZYFS_STATE_DIR"
RECORD_SUFFIX = ".json"
LOG_SUFFIX = ".log"
# Logs kept for the user (warnings, errors, a daemon that died) of mounts that are gone:
# enough to look back at the last few days of a busy machine, few enough not to pile up.
KEPT_LOGS = 50
# A daemon's log line at INFO or below, as `background` formats them:
# "2024-05-01 12:00:00,123 lazyfs[4242] INFO lazyfs.mount.daemon: message".
_QUIET_LINE = re.compile(r"\S+ \S+ lazyfs\[\d+\] (?:DEBUG|INFO) ")
# What `lazyfs run` passes on to its user from a daemon's log: such a log is never quiet.
_LOUD_MARKS = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")


class StateError(LazyfsError):
    """A state record exists but cannot be read."""


def state_dir() -> Path:
    """Where records, logs and private FUSE mountpoints live (`$LAZYFS_STATE_DIR` or
    /run/lazyfs)."""
    return Path(os.path.abspath(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR))


def mount_key(mountpoint: str | os.PathLike[str]) -> str:
    """A file-name-safe key for a mountpoint: its basename for humans plus a hash of the
    absolute path so that two mountpoints never share a record."""
    path = os.path.abspath(os.fspath(mountpoint))
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(path))
    return f"{base.strip('.')[:40] or 'root'}-{digest}"


@dataclass
class ErofsMountRecord:
    """One EROFS mount: the block file it reads, the loop device if one was needed."""

    image_file: str
    mountpoint: str
    loop_device: str | None = None


@dataclass
class ImageRecord:
    """One image stacked with overlayfs: what it is (the manifest digest pins every layer) and
    where its layers are. `layers` names block files in manifest order, bottom layer first."""

    reference: str
    manifest_digest: str
    platform: str
    mountpoint: str
    layers: list[str] = field(default_factory=list)
    upperdir: str | None = None
    workdir: str | None = None


@dataclass
class MountRecord:
    """Everything one `lazyfs mount` set up, in the order it was set up.

    An image mount also has `images` (one overlay each; the first is at `mountpoint`) and
    `layers_dir`, the private directory holding one EROFS mountpoint per layer. `temp_dir` is
    scratch space that `lazyfs run` made for the mount and that goes with it.
    """

    mountpoint: str
    pid: int
    fuse_dir: str
    pid_start_ticks: int | None = None
    sources: list[str] = field(default_factory=list)
    block_files: list[str] = field(default_factory=list)
    block_only: bool = False
    loop_devices: list[str] = field(default_factory=list)
    erofs_mounts: list[ErofsMountRecord] = field(default_factory=list)
    overlay: str | None = None
    log_file: str | None = None
    started_at: float = 0.0
    ready: bool = False
    images: list[ImageRecord] = field(default_factory=list)
    layers_dir: str | None = None
    temp_dir: str | None = None

    @property
    def key(self) -> str:
        return mount_key(self.mountpoint)

    @property
    def stats_file(self) -> str:
        return os.path.join(self.fuse_dir, STATS_FILE_NAME)

    @property
    def mountpoints(self) -> list[str]:
        """Every user-visible mountpoint: `mountpoint`, then those of further images."""
        found = [self.mountpoint, *(image.mountpoint for image in self.images)]
        return list(dict.fromkeys(found))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> MountRecord:
        """Parse a record. Raises StateError naming the file and what is wrong."""
        try:
            obj: Any = json.loads(text)
            erofs = [ErofsMountRecord(**item) for item in obj.pop("erofs_mounts", [])]
            images = [ImageRecord(**item) for item in obj.pop("images", [])]
            return cls(**obj, erofs_mounts=erofs, images=images)
        except (json.JSONDecodeError, TypeError, AttributeError) as exc:
            raise StateError(
                f"{source}: not a lazyfs mount record ({exc}); "
                "remove it if no lazyfs daemon uses it"
            ) from None


def record_path(mountpoint: str | os.PathLike[str]) -> Path:
    return state_dir() / (mount_key(mountpoint) + RECORD_SUFFIX)


def private_dir(mountpoint: str | os.PathLike[str], suffix: str) -> Path:
    """A per-mount path in the state directory: `.fuse` (private FUSE mountpoint), `.log`."""
    return state_dir() / (mount_key(mountpoint) + suffix)


def ensure_state_dir() -> Path:
    """Create the state directory, readable by root only: it holds the private FUSE mounts."""
    path = state_dir()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def write_record(record: MountRecord) -> Path:
    """Atomically replace the record of `record.mountpoint`. Returns its path."""
    ensure_state_dir()
    path = record_path(record.mountpoint)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = record.to_json().encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def load_record(mountpoint: str | os.PathLike[str]) -> MountRecord | None:
    """The record of `mountpoint`, or None if there is none. Raises StateError if unreadable."""
    path = record_path(mountpoint)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except PermissionError:
        raise StateError(f"{path}: permission denied (lazyfs mounts belong to root)") from None
    return MountRecord.from_json(text, str(path))


def find_record(mountpoint: str | os.PathLike[str]) -> MountRecord | None:
    """The record that `mountpoint` belongs to: its own, or that of the mount that stacked an
    image there together with others. None if there is none. Raises StateError."""
    record = load_record(mountpoint)
    if record is not None:
        return record
    target = os.path.abspath(os.fspath(mountpoint))
    for item in iter_records():
        if isinstance(item, MountRecord) and target in item.mountpoints:
            return item
    return None


def remove_record(mountpoint: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(mountpoint).unlink()


def iter_records() -> Iterator[MountRecord | StateError]:
    """Every record in the state directory, sorted by mountpoint; an unreadable one is
    yielded as its StateError so a listing can show it instead of failing."""
    directory = state_dir()
    if not directory.is_dir():
        return
    if not os.access(directory, os.R_OK | os.X_OK):
        raise StateError(f"{directory}: permission denied (lazyfs mounts belong to root)")
    found: list[MountRecord | StateError] = []
    for path in sorted(directory.glob("*" + RECORD_SUFFIX)):
        if path.name.startswith("."):
            continue
        try:
            found.append(MountRecord.from_json(path.read_text(), str(path)))
        except FileNotFoundError:  # removed by a daemon while we listed
            continue
        except StateError as exc:
            found.append(exc)
    found.sort(key=lambda item: item.mountpoint if isinstance(item, MountRecord) else str(item))
    yield from found


def _proc_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (field 3 onwards), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            return stat.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot: with the pid it names one process,
    so a recycled pid is never mistaken for the daemon."""
    fields = _proc_stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def daemon_alive(record: MountRecord) -> bool:
    """True if the record's daemon is still running (not a zombie, not a recycled pid)."""
    if record.pid <= 0:
        return False
    fields = _proc_stat_fields(record.pid)
    if not fields or fields[0] in ("Z", "X"):
        return False
    return record.pid_start_ticks is None or int(fields[19]) == record.pid_start_ticks


def own_log(record: MountRecord) -> Path | None:
    """The record's log if it is the mount's own file in the state directory (the one
    `lazyfs mount` gives its daemon), else None: a log named by anyone else is theirs."""
    if record.log_file is None:
        return None
    own = private_dir(record.mountpoint, LOG_SUFFIX)
    return own if os.path.abspath(record.log_file) == str(own) else None


def log_is_quiet(path: Path) -> bool:
    """True if every line of the log is a record at INFO or below that mentions no warning,
    error or traceback: nothing in it the user needs. Anything else (a crash's traceback, the
    interpreter's own complaints) or a log that cannot be read is not quiet."""
    try:
        with path.open(encoding="utf-8", errors="replace") as stream:
            return all(
                _QUIET_LINE.match(line) and not any(mark in line for mark in _LOUD_MARKS)
                for line in stream
            )
    except OSError:
        return False


def retire_log(record: MountRecord, *, stopped_cleanly: bool) -> Path | None:
    """After the mount of `record` is taken down and its record removed: delete its own log
    if its daemon `stopped_cleanly` (it ran until told to stop, and has exited, so nothing
    writes to the log any more) and the log is quiet; then `prune_logs`. Returns the log
    kept for the user, if any (None for a log named by someone else: not ours to judge)."""
    log_file = own_log(record)
    if log_file is None:
        return None
    try:
        present = stat.S_ISREG(os.lstat(log_file).st_mode)
    except OSError:
        present = False
    # A record again means a new mount at the same place: its daemon appends to this log.
    if (present and stopped_cleanly and not daemon_alive(record)
            and not record_path(record.mountpoint).exists() and log_is_quiet(log_file)):
        with contextlib.suppress(OSError):  # the mount is down: a stray log is no failure
            log_file.unlink()
        present = False
    prune_logs()
    return log_file if present else None


def prune_logs(keep: int = KEPT_LOGS) -> list[Path]:
    """Delete all but the `keep` most recently written logs of mounts that are gone, so that
    the logs kept for the user do not pile up in the state directory (`lazyfs umount` calls
    this). The log of a recorded mount, whose daemon may still write, is never touched, nor
    anything but a regular file named like a log. Returns what was deleted; best effort."""
    directory = state_dir()
    try:
        entries = list(os.scandir(directory))
        records = list(iter_records())
    except (OSError, StateError):
        return []
    in_use = {entry.name.removesuffix(RECORD_SUFFIX) + LOG_SUFFIX
              for entry in entries if entry.name.endswith(RECORD_SUFFIX)}
    in_use.update(os.path.basename(item.log_file) for item in records
                  if isinstance(item, MountRecord) and item.log_file is not None
                  and os.path.dirname(os.path.abspath(item.log_file)) == str(directory))
    written: list[tuple[float, Path]] = []
    for entry in entries:
        if (not entry.name.endswith(LOG_SUFFIX) or entry.name.startswith(".")
                or entry.name in in_use):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISREG(info.st_mode):
            written.append((info.st_mtime, Path(entry.path)))
    written.sort(reverse=True)
    removed = []
    for _, path in written[keep:]:
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path)
    return removed
