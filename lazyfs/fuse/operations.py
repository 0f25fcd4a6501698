"""The FUSE file system: one read-only directory holding one block file per layer.

A thin wrapper around the images: the inode table is set when the daemon starts (a long-lived
service may add and remove layers later: `add_image`, `remove_image`), every read is
delegated to `RemoteImage.read`, and the only state kept here is the open handles of the
virtual stats file. Handlers raise only FUSEError; anything else is a bug and is left
to surface (pyfuse3 then stops the loop and the daemon tears the mount down).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import stat
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyfuse3

from lazyfs.cache.disk import DiskCache
from lazyfs.cache.memory import ChunkCache
from lazyfs.fuse.phases import StartupPhases
from lazyfs.layer.errors import ImageReadError
from lazyfs.layer.stats import LatencyRecorder

# The virtual file in the FUSE root that `lazyfs stats` reads (JSON).
STATS_FILE_NAME = ".lazyfs-stats.json"
STATS_INODE = pyfuse3.ROOT_INODE + 1
FIRST_LAYER_INODE = STATS_INODE + 1
BLOCK_SIZE = 4096
# The tree never changes while mounted: let the kernel cache names and attributes for long.
ENTRY_TIMEOUT_S = 3600.0
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class Image(Protocol):
    """What the file system needs of a layer (RemoteImage provides it)."""

    name: str

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, size: int) -> bytes: ...

    def stats_snapshot(self) -> dict[str, Any]: ...


@dataclass
class DaemonStats:
    """Daemon-level counters, shown next to the layers' own in the stats file."""

    started_at: float = field(default_factory=time.time)
    started_monotonic: float = field(default_factory=time.monotonic)
    ready_after_s: float | None = None
    first_read_after_s: float | None = None
    reads: int = 0
    read_bytes: int = 0
    read_errors: int = 0
    read_latency: LatencyRecorder = field(default_factory=LatencyRecorder)
    phases: StartupPhases = field(default_factory=StartupPhases)

    def mark_ready(self) -> None:
        self.ready_after_s = round(time.monotonic() - self.started_monotonic, 6)

    def record_read(self, started: float, size: int, ok: bool) -> None:
        now = time.monotonic()
        if self.first_read_after_s is None:
            self.first_read_after_s = round(started - self.started_monotonic, 6)
        self.reads += 1
        self.read_bytes += size
        self.read_errors += not ok
        self.read_latency.add(now - started)
        self.phases.record_read(started, now)

    def snapshot(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime_s": round(time.monotonic() - self.started_monotonic, 3),
            "ready_after_s": self.ready_after_s,
            "first_read_after_s": self.first_read_after_s,
            "reads": self.reads,
            "read_bytes": self.read_bytes,
            "read_errors": self.read_errors,
            "read_latency": self.read_latency.summary_ms(),
            "phases": self.phases.snapshot(),
        }


def _check_name(name: str) -> None:
    if not name or "/" in name or "\0" in name or name in (".", "..", STATS_FILE_NAME):
        raise ValueError(f"{name!r} cannot be a file name in the mount")


class LayerOperations(pyfuse3.Operations):
    """A read-only directory of block files, one per layer, plus `.lazyfs-stats.json`.

    Layer files are opened with keep_cache (the bytes never change, so the kernel's page cache
    stays valid across opens); the stats file with direct_io, since it is rendered afresh at
    every open and its size is not known in advance.
    """

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        images: Sequence[Image],
        daemon_stats: DaemonStats | None = None,
        uid: int | None = None,
        gid: int | None = None,
        *,
        cache: ChunkCache | None = None,
        disk: DiskCache | None = None,
    ) -> None:
        names = [image.name for image in images]
        for name in names:
            _check_name(name)
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be unique, got {names}")
        super().__init__()
        self.daemon_stats = daemon_stats or DaemonStats()
        self._cache = cache
        self._disk = disk
        self._layers: dict[int, Image] = {
            FIRST_LAYER_INODE + i: image for i, image in enumerate(images)
        }
        self._inode_by_name: dict[bytes, int] = {
            os.fsencode(image.name): inode for inode, image in self._layers.items()
        }
        self._inode_by_name[os.fsencode(STATS_FILE_NAME)] = STATS_INODE
        self._uid = os.getuid() if uid is None else uid
        self._gid = os.getgid() if gid is None else gid
        self._mtime_ns = time.time_ns()
        # Open stats files: their bytes, as rendered at open. Emptied by release.
        self._stats_handles: dict[int, bytes] = {}
        # Layer inodes and stats handles share one counter: a read's fh says which it is.
        self._next_stats_fh = itertools.count(FIRST_LAYER_INODE + len(images))

    def add_image(self, image: Image) -> None:
        """Serve one more layer file (the FUSE loop may be running). Raises ValueError for a
        bad or taken name."""
        _check_name(image.name)
        name = os.fsencode(image.name)
        if name in self._inode_by_name:
            raise ValueError(f"a layer named {image.name!r} is served already")
        inode = next(self._next_stats_fh)
        self._layers[inode] = image
        self._inode_by_name[name] = inode

    def remove_image(self, name: str) -> Image | None:
        """Stop serving the layer file `name` (its EROFS mount must be gone); the kernel's
        cached entry is dropped. Returns the image, or None if there was none."""
        inode = self._inode_by_name.get(os.fsencode(name))
        if inode is None or inode not in self._layers:
            return None
        del self._inode_by_name[os.fsencode(name)]
        image = self._layers.pop(inode)
        with contextlib.suppress(OSError):
            pyfuse3.invalidate_entry_async(pyfuse3.ROOT_INODE, os.fsencode(name))
        return image

    @property
    def images(self) -> Mapping[str, Image]:
        return {image.name: image for image in self._layers.values()}

    # -- attributes and names ----------------------------------------------------------------

    def _attributes(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.generation = 0
        attr.entry_timeout = ENTRY_TIMEOUT_S
        attr.attr_timeout = ENTRY_TIMEOUT_S
        attr.st_uid, attr.st_gid = self._uid, self._gid
        attr.st_blksize = BLOCK_SIZE
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = self._mtime_ns
        if inode == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
        elif inode == STATS_INODE:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = 0  # rendered at open and read with direct_io, like /proc files
            attr.attr_timeout = 0
        elif inode in self._layers:
            attr.st_mode = stat.S_IFREG | 0o444
            attr.st_nlink = 1
            attr.st_size = self._layers[inode].size
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr.st_blocks = -(-attr.st_size // 512)
        return attr

    async def getattr(
        self, inode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        if parent_inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR if self._exists(parent_inode) else errno.ENOENT)
        if name in (b".", b".."):
            return self._attributes(pyfuse3.ROOT_INODE)
        inode = self._inode_by_name.get(name)
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    def _exists(self, inode: int) -> bool:
        return inode in (pyfuse3.ROOT_INODE, STATS_INODE) or inode in self._layers

    def entries(self, start_id: int = 0) -> Iterator[tuple[bytes, pyfuse3.EntryAttributes, int]]:
        """Directory entries after `start_id`, each with the id to resume after it."""
        for index, (name, inode) in enumerate(sorted(self._inode_by_name.items())):
            if index >= start_id:
                yield name, self._attributes(inode), index + 1

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR if self._exists(inode) else errno.ENOENT)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, attr, next_id in self.entries(start_id):
            if not pyfuse3.readdir_reply(token, name, attr, next_id):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLOCK_SIZE
        data.f_blocks = sum(-(-image.size // BLOCK_SIZE) for image in self._layers.values())
        data.f_bfree = data.f_bavail = 0
        data.f_files = len(self._inode_by_name) + 1
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    async def access(
        self, inode: int, mode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> bool:
        if not self._exists(inode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        if mode & os.W_OK:
            raise pyfuse3.FUSEError(errno.EROFS)
        return True

    async def getxattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> bytes:
        if not self._exists(inode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext | None = None) -> list[bytes]:
        if not self._exists(inode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return []

    # -- files -------------------------------------------------------------------------------

    async def open(
        self, inode: int, flags: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.FileInfo:
        if inode == pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not self._exists(inode):
            raise pyfuse3.FUSEError(errno.ENOENT)
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        if inode == STATS_INODE:
            fh = next(self._next_stats_fh)
            self._stats_handles[fh] = self.render_stats()
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        image = self._layers.get(fh)
        if image is None:
            rendered = self._stats_handles.get(fh)
            if rendered is None:
                raise pyfuse3.FUSEError(errno.EBADF)
            return rendered[off : off + size]
        started = time.monotonic()
        try:
            data = await image.read(off, size)
        except ImageReadError:
            # The image logged the cause once; every read of the bad range fails alike.
            self.daemon_stats.record_read(started, 0, ok=False)
            raise pyfuse3.FUSEError(errno.EIO) from None
        self.daemon_stats.record_read(started, len(data), ok=True)
        return data

    async def release(self, fh: int) -> None:
        self._stats_handles.pop(fh, None)

    async def flush(self, fh: int) -> None:
        pass

    def render_stats(self) -> bytes:
        """The stats file: daemon counters, the layers' shared chunk cache and every layer's
        `stats_snapshot()`, as JSON."""
        snapshot = {
            "daemon": self.daemon_stats.snapshot(),
            "layers": {image.name: image.stats_snapshot() for image in self._layers.values()},
        }
        if self._cache is not None:
            snapshot["cache"] = self._cache.stats_snapshot()
        if self._disk is not None:
            snapshot["disk_cache"] = self._disk.stats_snapshot()
        return (json.dumps(snapshot, indent=2, sort_keys=True) + "\n").encode()

    # -- everything that would write ---------------------------------------------------------

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def create(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        flags: int,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mknod(
        self,
        parent_inode: int,
        name: bytes,
        mode: int,
        rdev: int,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext | None = None
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def symlink(
        self,
        parent_inode: int,
        name: bytes,
        target: bytes,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def link(
        self,
        inode: int,
        new_parent_inode: int,
        new_name: bytes,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def unlink(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rmdir(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext | None = None,
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)

    async def removexattr(
        self, inode: int, name: bytes, ctx: pyfuse3.RequestContext | None = None
    ) -> None:
        raise pyfuse3.FUSEError(errno.EROFS)
