"""The host of remote layers: one FUSE file system serving a verified block file per layer,
and the kernel's EROFS mount of each, for whoever asked for them: a mount or `run` (the mount
daemon, `daemon.py`, which serves the layers of one command and stacks images on them) or
the snapshotter (`lazyfs.snapshotter.layers`, which adds and removes layers while it runs).
One set of knobs (`MountOptions`) and one of limits (`LayerLimits`) size every host alike.

A host lives on the trio thread of its process (pyfuse3 has one FUSE session per process)
and does everything its layers need:

- `open_layer`: a layer opened and authenticated, a few at a time, each of its readers held
  to the host's connection and low-speed limits, in the chunk cache, the decode threads and
  the disk cache all its layers share (the disk cache opened with `open_disk_cache`: one that
  cannot be used stops nothing, the host goes on without it, logged once); its first block
  (the EROFS superblock) is read through the verified path, so a layer whose superblock
  cannot be verified fails with what failed, not with the kernel's "can't read superblock";
- `serve` and `start_fuse`: the layer's block file in the FUSE file system, served by as many
  workers as its layers' readers need, and the kernel allowed as many requests in flight
  (`fuse_connection`: beyond its limit, reads wait in the kernel, outside the read timeout);
- `mount_erofs`: EROFS on the block file, file-backed else through a read-only loop device;
  or always through a loop device (`loop_devices`: a later process can then switch the
  device to its own file under whatever is mounted on it, `lazyfs.snapshotter.adopt`);
- `loads`: loads ahead of reads, in the owner's nursery (`background_loads`);
- `detach`: one layer taken down (fetches cancelled, EROFS unmounted, loop device detached or
  left while a superblock still reads it, file no longer served, layer closed);
- `stop_fuse`, `abort`, `close`: the FUSE loop ended, its connection aborted (whatever still
  waits for an answer fails at once), the FUSE mount detached unless the owner keeps it for
  a later process, every layer and the disk cache closed. Once the loop may have stopped,
  nothing here looks into the host's own FUSE file system (a stat of its directory or of a
  block file would wait forever for an answer): `detach` aborts the connection first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import pyfuse3
import trio

from lazyfs.cache.disk import (
    DEFAULT_PENDING_WRITE_BYTES,
    DiskCache,
    DiskCacheOptions,
    open_disk_cache,
)
from lazyfs.cache.memory import DEFAULT_CACHE_BYTES, ChunkCache
from lazyfs.fetch.base import ReaderOptions, SpeedLimit
from lazyfs.fuse.operations import DaemonStats, LayerOperations
from lazyfs.layer.errors import ImageReadError, LayerOpenError
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.stats import TraceWriter
from lazyfs.layer.tuning import ImageTuning, PrefetchOptions
from lazyfs.mount import fuse_connection, kernel
from lazyfs.mount.background_loads import BackgroundLoads
from lazyfs.mount.heap import bound_heap, keep_heap_trimmed
from lazyfs.mount.state import ErofsMountRecord
from lazyfs.startup.open import LayerSource, open_layer

log = logging.getLogger(__name__)

HTTP_CONNECTIONS_PER_LAYER = 8
PARALLEL_FETCHES_PER_LAYER = 4
# FUSE requests handled at a time, at least (see LayerLimits.fuse_workers).
MIN_FUSE_WORKERS = 256
# Layers opened at once (each a few round trips: size, chunk table, top of the verity tree).
PARALLEL_LAYER_OPENS = 8
# What is read of each layer before EROFS is mounted on it: its superblock (at offset 1024).
SUPERBLOCK_PROBE_BYTES = 4096


@dataclass(frozen=True)
class LayerLimits:
    """How much the layers of a host do at once, sized together (FUSE workers >= HTTP
    connections >= fetches in flight), so no stage queues work that the next cannot take:
    per layer, `http_connections` to its source and `parallel_fetches` requests in flight (no
    more than connections); for all of them, `decode_threads` that decompress and hash (None:
    one per CPU, at least 2), and `pending_disk_write_bytes` of verified frames waiting for
    the disk cache (beyond it a frame is not written: memory, not the disk, is the limit)."""

    http_connections: int = HTTP_CONNECTIONS_PER_LAYER
    parallel_fetches: int = PARALLEL_FETCHES_PER_LAYER
    decode_threads: int | None = None
    pending_disk_write_bytes: int = DEFAULT_PENDING_WRITE_BYTES

    def __post_init__(self) -> None:
        if (not 1 <= self.parallel_fetches <= self.http_connections
                or (self.decode_threads is not None and self.decode_threads < 1)
                or self.pending_disk_write_bytes < 0):
            raise ValueError("layer limits: need 1 <= parallel_fetches <= http_connections, "
                             "decode_threads >= 1 and pending_disk_write_bytes >= 0")

    def decode_thread_count(self) -> int:
        return self.decode_threads or max(2, os.cpu_count() or 1)

    def fuse_workers(self, layer_count: int) -> int:
        """FUSE requests handled at a time for `layer_count` layers.

        A request no worker has taken waits in the kernel, where its read timeout cannot run:
        it would start only when a read stalled before it gave up, and wait as long again.
        Workers are cheap (a task and a buffer) and the limits that matter are waited for
        inside a read's deadline, so there are enough for every reader of a busy start-up; at
        least one connection's worth per layer, and some for metadata-only requests (getattr,
        lookup, the stats file)."""
        return max(MIN_FUSE_WORKERS, self.http_connections * max(1, layer_count) + 4)


@dataclass(frozen=True)
class MountOptions:
    """How a host serves its layers: the decoded chunk cache (bytes, at least one chunk of
    every layer), how each layer reads (readahead, coalescing, the read timeout, failure
    retries; its parallel fetches are `limits.parallel_fetches`), a file to append a JSON
    line per chunk access (a mount's), the disk cache shared with every other process of the
    machine (None: none), the low-speed limit of every fetch, what is fetched in the
    background or recorded for later (prefetch lists), and how much is done at once."""

    cache_size_bytes: int = DEFAULT_CACHE_BYTES
    tuning: ImageTuning = field(default_factory=ImageTuning)
    trace_file: str | None = None
    disk_cache: DiskCacheOptions | None = field(default_factory=DiskCacheOptions)
    low_speed: SpeedLimit = field(default_factory=SpeedLimit)
    prefetch: PrefetchOptions = field(default_factory=PrefetchOptions)
    limits: LayerLimits = field(default_factory=LayerLimits)


def is_remote(blob: str) -> bool:
    """Whether `blob` is fetched over the network (a blob on this machine needs no copy in
    the disk cache)."""
    return "://" in blob and not blob.startswith("file://")


class LayerHost:
    """The FUSE file system at `fuse_dir` and the layers it serves (trio thread only). Make
    one with `LayerHost.open`; background work runs in `nursery`, the owner's. `layer_count`
    is how many layers it is sized for (its FUSE workers), `stats` the counters its stats
    file shows, `trace` is told of every chunk access."""

    def __init__(self, fuse_dir: str, options: MountOptions, nursery: trio.Nursery,
                 disk: DiskCache | None, *, layer_count: int = 1,
                 stats: DaemonStats | None = None, trace: TraceWriter | None = None,
                 allow_other: bool = True, loop_devices: bool = False) -> None:
        self.fuse_dir = fuse_dir
        self.options = options
        self.nursery = nursery
        self.disk = disk
        self.trace = trace
        self.limits = options.limits
        self.cache = ChunkCache(options.cache_size_bytes)
        self.cpu_limiter = trio.CapacityLimiter(self.limits.decode_thread_count())
        self.tuning = replace(options.tuning, parallel_fetches=self.limits.parallel_fetches)
        self.fuse_workers = self.limits.fuse_workers(layer_count)
        self.ops = LayerOperations([], stats, cache=self.cache, disk=disk)
        self.loads = BackgroundLoads(options.prefetch, disk, self.cache.capacity_bytes)
        self.images: list[RemoteImage] = []  # open; `close` closes those still open
        self.serving = False  # the FUSE loop runs
        self.fuse_done = trio.Event()  # set when it has ended
        self._allow_other = allow_other
        self._loop_devices = loop_devices
        self._opening = trio.CapacityLimiter(PARALLEL_LAYER_OPENS)
        self._session = False  # pyfuse3's session is open: the connection is alive
        self._fuse_mounted = False
        self._stopping = False

    @classmethod
    async def open(cls, fuse_dir: str, options: MountOptions, nursery: trio.Nursery, *,
                   disk_cache: bool = True, layer_count: int = 1,
                   stats: DaemonStats | None = None, trace: TraceWriter | None = None,
                   allow_other: bool = True, loop_devices: bool = False) -> LayerHost:
        """A host (see the class), with the disk cache of `options` unless not `disk_cache`.
        A disk cache that cannot be used stops nothing: the host goes on without one (logged
        once). Its index opens in the background: reading entries needs none (opening it
        took 4-6 ms of a warm start's critical path)."""
        # Every process that hosts layers (a mount's daemon, -f, the snapshotter) keeps its heap
        # within the chunk cache and a slack.
        if bound_heap():
            nursery.start_soon(keep_heap_trimmed, options.cache_size_bytes)
        disk = None
        if disk_cache and options.disk_cache is not None:
            disk = await trio.to_thread.run_sync(
                partial(open_disk_cache, options.disk_cache, index_in_background=True))
            if disk is not None:
                disk.pending_write_limit = options.limits.pending_disk_write_bytes
        return cls(fuse_dir, options, nursery, disk, layer_count=layer_count, stats=stats,
                   trace=trace, allow_other=allow_other, loop_devices=loop_devices)

    async def disk_cache_ready(self) -> bool:
        """Wait until the disk cache's index is open; returns whether the host has a disk
        cache that is on (one whose index cannot be opened is turned off instead, logged
        once)."""
        disk = self.disk
        if disk is None or not await disk.wait_index():
            return False
        log.info("disk cache %s, at most %d bytes", disk.directory, disk.store.capacity_bytes)
        return True

    # -- layers ------------------------------------------------------------------------------

    async def open_layer(self, source: LayerSource, *, probe: bool = True) -> RemoteImage:
        """Open and authenticate the layer `source` names, ready for reads; with `probe`,
        its first block is read through the verified path. It is closed by `close` unless
        `detach` or `discard` closed it before. Raises LayerOpenError (a superblock that
        cannot be read says why), FormatError (incl. IntegrityError), FetchError."""
        async with self._opening:
            image = await open_layer(
                self._with_limits(source),
                cache=self.cache,
                nursery=self.nursery,
                tuning=self.tuning,
                trace=self.trace,
                cpu_limiter=self.cpu_limiter,
                disk=self.disk if is_remote(source.blob) else None,
            )
            self.images.append(image)
            self.loads.layer_opened(image)
            if probe:
                await self.probe_superblock(image, source)
        return image

    async def probe_superblock(self, image: RemoteImage, source: LayerSource) -> None:
        """Read the layer's first block (its EROFS superblock) through the verified path, as
        the kernel's mount would. Raises LayerOpenError saying what failed (the chunk and
        the check, or the fetch), which the kernel's mount would not, after closing the
        layer."""
        try:
            await image.read(0, min(SUPERBLOCK_PROBE_BYTES, image.size))
        except ImageReadError as exc:
            await self.discard(image)
            raise LayerOpenError(
                f"{source.blob}: cannot read the layer's EROFS superblock: {exc}"
            ) from None
        except BaseException:
            await self.discard(image)
            raise

    def _with_limits(self, source: LayerSource) -> LayerSource:
        """`source` with the host's connection limit and low-speed limit on every reader."""
        def limited(options: ReaderOptions) -> ReaderOptions:
            return replace(options, max_connections=self.limits.http_connections,
                           low_speed=self.options.low_speed)

        return replace(
            source,
            reader_options=limited(source.reader_options),
            alternates=tuple(replace(alternate, reader_options=limited(alternate.reader_options))
                             for alternate in source.alternates),
        )

    def block_file(self, name: str) -> str:
        """Where the layer `name` is served."""
        return os.path.join(self.fuse_dir, name)

    def serve(self, image: RemoteImage) -> str:
        """Serve `image` as a file of the FUSE file system (before `start_fuse` too); returns
        its path. Raises ValueError for a name served already."""
        self.ops.add_image(image)
        return self.block_file(image.name)

    async def mount_erofs(self, image_file: str, mountpoint: str, *,
                          on_loop_attached: Callable[[str], None] | None = None
                          ) -> ErofsMountRecord:
        """Mount the block file `image_file` read-only as EROFS at `mountpoint`: file-backed,
        else through a loop device, or with `loop_devices` always through one.
        `on_loop_attached(device)` runs before the mount, so that the device can be recorded.
        Raises MountError."""
        if self._loop_devices:
            device = await kernel.mount_erofs_via_loop(image_file, mountpoint, on_loop_attached)
            return ErofsMountRecord(image_file, mountpoint, device)
        return await kernel.mount_erofs(image_file, mountpoint, on_loop_attached=on_loop_attached)

    async def detach(self, image: RemoteImage, erofs: ErofsMountRecord, *,
                     keep_busy: bool = False) -> bool:
        """Take the layer `image`, mounted as `erofs`, down: its fetches cancelled (no read
        may wait on a stalled server while it goes), its EROFS mount unmounted (lazily if
        busy), its loop device detached, or with `keep_busy` left while a superblock still
        reads it (a running container's, for the next process to take over), its file no
        longer served, what it read kept for its next warm start, the layer closed. The
        kernel's errors are logged. Returns whether the device was left."""
        image.cancel_fetches()
        kept = False
        with trio.CancelScope(shield=True):
            if not self.serving:
                self.abort()  # nothing may wait for an answer of a stopped loop
            try:
                await kernel.unmount(erofs.mountpoint, lazy_fallback=True)
                device = erofs.loop_device
                # Overlays keep private clones of their lower mounts: the unmount succeeds
                # under a running container, whose superblock still holds the device.
                if device is not None and keep_busy and kernel.device_in_use(device):
                    kept = True
                elif device is not None:
                    await kernel.detach_loop(device)
            except kernel.MountError as exc:
                log.error("%s", exc)
            await self.discard(image, save_reads=True)
        return kept

    async def discard(self, image: RemoteImage, *, save_reads: bool = False) -> None:
        """Stop serving the layer `image` (its EROFS mount must be gone) and close it; with
        `save_reads`, what it read is kept first, for its next warm start."""
        with trio.CancelScope(shield=True):
            if self.ops.images.get(image.name) is image:
                self.ops.remove_image(image.name)
            if image in self.images:
                self.images.remove(image)
            if save_reads and image.disk is not None:
                await image.disk.save_reads()
            await image.aclose()

    def cancel_fetches(self) -> None:
        """End every fetch in flight of every layer (a stop must not wait on a stalled
        server)."""
        for image in self.images:
            image.cancel_fetches()

    # -- the FUSE file system ----------------------------------------------------------------

    def start_fuse(self) -> None:
        """Mount the FUSE file system at `fuse_dir` (an existing directory) and serve it in
        the nursery; the kernel's limit of requests in flight is raised in the background.
        Raises MountError (libfuse printed its reason to stderr: the log)."""
        options = {"fsname=lazyfs", "subtype=lazyfs", "ro", "default_permissions"}
        if self._allow_other:
            # Only root may pass allow_other without user_allow_other in /etc/fuse.conf; it
            # lets other users read the block files, and the kernel read EROFS data on their
            # behalf.
            options.add("allow_other")
        try:
            pyfuse3.init(self.ops, self.fuse_dir, options)
        except RuntimeError as exc:
            raise kernel.MountError(
                f"cannot mount the FUSE file system at {self.fuse_dir}: {exc}"
            ) from None
        self._session = self._fuse_mounted = True
        self.serving = True
        self.nursery.start_soon(self._serve)
        self.nursery.start_soon(self._raise_request_limit)

    async def _serve(self) -> None:
        try:
            await pyfuse3.main(min_tasks=1, max_tasks=self.fuse_workers)
        finally:
            self.serving = False
            self.fuse_done.set()
        if not self._stopping:
            log.warning("%s: the FUSE file system was unmounted from outside", self.fuse_dir)

    async def _raise_request_limit(self) -> None:
        """Let the kernel send as many requests at a time as there are FUSE workers
        (`lazyfs.mount.fuse_connection`), in the background: the start does not wait."""
        workers = self.fuse_workers
        try:
            await trio.to_thread.run_sync(fuse_connection.raise_request_limit, self.fuse_dir,
                                          workers)
        except OSError as exc:
            log.info("%s: the kernel keeps its limit of FUSE requests in flight (%s): beyond "
                     "it, reads wait in the kernel, outside the read timeout",
                     self.fuse_dir, exc)
        else:
            log.debug("%s: up to %d FUSE requests in flight", self.fuse_dir, workers)

    def stop_fuse(self) -> None:
        """End the FUSE loop (the mounts on the block files should be gone: their reads
        fail from now on)."""
        self._stopping = True
        if self.serving:
            pyfuse3.terminate()

    def abort(self) -> None:
        """Abort the FUSE connection, once its loop has stopped (closing the session's
        /dev/fuse descriptor, which only this process holds, does): whatever still waits for
        an answer (FUSE's INIT, a mount(2) under way in a worker thread, a read through a
        loop device) fails at once instead of hanging whoever waits, and the host's teardown
        with it. The mount stays, dead, until `close` detaches it."""
        self._stopping = True
        if self._session:
            self._session = False
            # libfuse does not unmount an aborted connection: `close` detaches it.
            pyfuse3.close(unmount=False)

    async def close(self, *, keep_fuse_mount: bool = False) -> None:
        """Abort the FUSE connection, detach its mount unless `keep_fuse_mount` (a later
        process finds the layers it takes over by their files below it), close the layers
        still open and the disk cache. Call once the loop has stopped; keeps going past
        failures (logged)."""
        with trio.CancelScope(shield=True):
            self.abort()
            if self._fuse_mounted and not keep_fuse_mount:
                # Detached here, not left to the kernel reaping /dev/fuse, so that nothing is
                # left at the mountpoint.
                try:
                    await kernel.fuse_unmount_lazy(self.fuse_dir)
                except kernel.MountError as exc:
                    log.error("%s", exc)
            self._fuse_mounted = False
            while self.images:
                await self.images.pop().aclose()
            if self.disk is not None:
                await self.disk.aclose()
