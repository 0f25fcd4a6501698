"""The record of an active mount: one JSON file per mountpoint in the state directory.

The daemon writes the record as each piece comes up (FUSE mount, loop device, EROFS mount),
so `lazyfs umount` can take down whatever exists even after the daemon died half-way, and
`lazyfs stats` / `lazyfs mounts` find the mount. Writes are atomic (temporary file, fsync,
rename): a reader never sees half a record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lazyfs.errors import LazyfsError
from lazyfs.fuse.operations import STATS_FILE_NAME

DEFAULT_STATE_DIR = "/run/lazyfs"
STATE_DIR_ENV = "LAZYFS_STATE_DIR"
RECORD_SUFFIX = ".json"


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
        os.fsync(fd)
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
