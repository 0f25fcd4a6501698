"""The mount daemon: one trio nursery owns the FUSE loop, the layers' background work and
the kernel mounts, from start-up to an orderly teardown on SIGTERM, SIGINT or SIGHUP.

Start-up order: open and authenticate every layer (all at once, a few in flight), mount FUSE
on a private directory (or the user's block-only directory), start serving, then mount EROFS
from the block files while the loop serves the kernel's reads, and for images stack them with
overlayfs. Teardown runs the other way round and also after a failure half-way: each step is
recorded in the mount record first, so whatever came up goes down. A stop first cancels every
fetch in flight, so that no read waits on a stalled server while the mount goes down.

Before EROFS is mounted on a layer, its first block (the superblock) is read through the
verified path: when that fails, the error names what failed (chunk, tree level and block, or
the fetch), not the kernel's "can't read superblock".

Loads ahead of reads (prefetch lists, the fill, a warm start's chunks) run in the same
nursery (`lazyfs.mount.background_loads`).

One daemon serves every layer of the images one command mounts: a layer they share is opened,
fetched and cached once (the chunk cache is keyed by content). Separate commands run separate
daemons, which share only the disk cache (`lazyfs.cache.disk`), unless it is turned off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from functools import partial

import pyfuse3
import trio

from lazyfs.cache.disk import DiskCache, DiskCacheOptions, open_disk_cache
from lazyfs.cache.memory import DEFAULT_CACHE_BYTES, ChunkCache
from lazyfs.errors import LazyfsError
from lazyfs.exception_groups import sole_error
from lazyfs.fetch.base import ReaderOptions, SpeedLimit
from lazyfs.fuse.operations import DaemonStats, LayerOperations
from lazyfs.image.errors import ImageReadError, LayerOpenError
from lazyfs.image.open import LayerSource, open_layer
from lazyfs.image.remote_image import RemoteImage
from lazyfs.image.stats import TraceWriter
from lazyfs.image.tuning import ImageTuning, PrefetchOptions
from lazyfs.image.warm_start import WarmFeed
from lazyfs.mount import fuse_connection, kernel, stack
from lazyfs.mount.background_loads import BackgroundLoads
from lazyfs.mount.state import (
    ImageRecord,
    MountRecord,
    private_dir,
    process_start_ticks,
    remove_record,
    write_record,
)

log = logging.getLogger(__name__)

# SIGHUP: a foreground mount whose terminal goes away unmounts instead of dying mid-mount.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Layers opened at once (each a few round trips: size, chunk table, top of the verity tree).
PARALLEL_LAYER_OPENS = 8
# The EROFS superblock lies at image offset 1024; mounting reads its block first.
EROFS_SUPERBLOCK_END = 4096
# At unmount, frames still being written to the disk cache get this long to finish.
DISK_WRITES_GRACE_S = 10.0
# How often the trace file is flushed, so that a live mount can be watched.
TRACE_FLUSH_INTERVAL_S = 1.0
# What is read of each layer before EROFS is mounted on it: its superblock.
SUPERBLOCK_PROBE_BYTES = 4096


class DaemonStartError(LazyfsError):
    """The daemon did not come up; the message says why (one line)."""


# FUSE requests handled at a time, at least (see WorkerLimits.for_layers).
MIN_FUSE_WORKERS = 256


@dataclass(frozen=True)
class WorkerLimits:
    """Concurrency limits sized together (FUSE workers >= HTTP connections >= decode threads),
    so no stage queues work that the next cannot take."""

    decode_threads: int
    http_connections: int
    parallel_fetches: int
    fuse_workers: int

    @classmethod
    def for_layers(cls, layer_count: int, cpu_count: int | None = None) -> WorkerLimits:
        decode_threads = max(2, cpu_count or os.cpu_count() or 1)
        http_connections = max(8, decode_threads)
        parallel_fetches = max(1, http_connections // 2)
        # A request no worker has taken waits in the kernel, where its read timeout cannot
        # run: it would start only when a read stalled before it gave up, and wait as long
        # again. Workers are cheap (a task and a buffer) and the limits that matter are waited
        # for inside a read's deadline, so there are enough for every reader of a busy
        # start-up; at least one connection's worth per layer, and some for metadata-only
        # requests (getattr, lookup, the stats file).
        fuse_workers = max(MIN_FUSE_WORKERS, http_connections * max(1, layer_count) + 4)
        return cls(decode_threads, http_connections, parallel_fetches, fuse_workers)


@dataclass
class DaemonConfig:
    """What to mount, and where. `mountpoint` is the EROFS mountpoint, or with `block_only`
    the directory where the block files appear. `temp_dir` is scratch space of the caller
    that `lazyfs umount` removes with the mount (after a caller that died).

    With `images`, `sources` are their distinct layers (named as the images list them) and
    each image is stacked at its own mountpoint, the first at `mountpoint`. `tuning` applies
    to every layer (its `parallel_fetches` is sized by the daemon, with its other limits),
    `low_speed` to every fetch of every source. `disk_cache` None: no disk cache.
    """

    sources: list[LayerSource]
    mountpoint: str
    images: list[ImageRecord] = field(default_factory=list)
    block_only: bool = False
    cache_size_bytes: int = DEFAULT_CACHE_BYTES
    tuning: ImageTuning = field(default_factory=ImageTuning)
    disk_cache: DiskCacheOptions | None = field(default_factory=DiskCacheOptions)
    trace_file: str | None = None
    low_speed: SpeedLimit = field(default_factory=SpeedLimit)
    prefetch: PrefetchOptions = field(default_factory=PrefetchOptions)
    log_file: str | None = None
    temp_dir: str | None = None
    allow_other: bool = field(default_factory=lambda: os.geteuid() == 0)
    # Monotonic times of the command's start and of the fork, for the start-up phases.
    command_started: float | None = None
    forked_at: float | None = None
    # Chunks the command loaded from the disk cache while it started (`image.warm_start`).
    warm_chunks: dict[str, memoryview] = field(default_factory=dict, repr=False)
    warm_feed: WarmFeed | None = field(default=None, repr=False)  # the rest, as it comes
    # Disk cache entries the command resolved the images from without noting their use, and
    # what it learned of the images for the disk cache ((key, bytes), or None: drop the key).
    disk_keys: tuple[str, ...] = ()
    disk_writes: tuple[tuple[str, bytes | None], ...] = field(default=(), repr=False)


def fuse_options(config: DaemonConfig) -> set[str]:
    options = {"fsname=lazyfs", "subtype=lazyfs", "ro", "default_permissions"}
    if config.allow_other:
        # Only root may pass allow_other without user_allow_other in /etc/fuse.conf; it lets
        # other users read the block-only files, and the kernel read EROFS data on their behalf.
        options.add("allow_other")
    return options


class Daemon:
    """One mount's lifetime. `run(on_ready)` returns after teardown; it raises what made
    start-up fail (after undoing what had come up)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.limits = WorkerLimits.for_layers(len(config.sources))
        self.stats = DaemonStats()
        mountpoint = kernel.canonical(config.mountpoint)
        fuse_dir = mountpoint if config.block_only else str(private_dir(mountpoint, ".fuse"))
        self.record = MountRecord(
            mountpoint=mountpoint,
            pid=os.getpid(),
            pid_start_ticks=process_start_ticks(os.getpid()),
            fuse_dir=fuse_dir,
            sources=[s.blob for s in config.sources],
            block_only=config.block_only,
            log_file=config.log_file,
            started_at=time.time(),
        )
        if config.images and not config.block_only:
            self.record.layers_dir = str(private_dir(mountpoint, ".layers"))
        self.record.temp_dir = config.temp_dir
        self.images: list[RemoteImage] = []
        self.cache = ChunkCache(config.cache_size_bytes)
        self.disk: DiskCache | None = None
        self._fuse_mounted = False
        self._fuse_serving = False
        self._fuse_done = trio.Event()
        self._images_remembered = trio.Event()
        self._stopping = False
        self._created_fuse_dir = False
        self.loads: BackgroundLoads | None = None  # made once the disk cache is open

    def run(self, on_ready: Callable[[], None]) -> None:
        trio.run(self._main, on_ready)

    async def _main(self, on_ready: Callable[[], None]) -> None:
        phases = self.stats.phases
        for name, at in (("command", self.config.command_started),
                         ("forked", self.config.forked_at)):
            if at is not None:
                phases.mark(name, at)
        phases.mark("daemon")
        trace = TraceWriter.open(self.config.trace_file) if self.config.trace_file else None
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, signals, nursery.cancel_scope)
                    if trace is not None:
                        nursery.start_soon(trace.flush_periodically, TRACE_FLUSH_INTERVAL_S)
                    await self._start(nursery, trace)
                    on_ready()
                    await self._fuse_done.wait()
                    with trio.move_on_after(DISK_WRITES_GRACE_S):
                        await self._images_remembered.wait()
                        for image in self.images:  # worth keeping for the next mount
                            if image.disk is not None:
                                await image.disk.writes_done()
                                await image.disk.save_reads()
                    nursery.cancel_scope.cancel()  # background fetches, the signal watcher
            except BaseExceptionGroup as group:
                raise sole_error(group) from None
            finally:
                with trio.CancelScope(shield=True):
                    await self._teardown()
                if trace is not None:
                    trace.close()
                if self.loads is not None:
                    self.loads.write_record()
        if not self.record.ready:
            raise DaemonStartError("stopped by a signal before the mount was ready")
        log.info("%s: unmounted", self.record.mountpoint)

    async def _start(self, nursery: trio.Nursery, trace: TraceWriter | None) -> None:
        config, record = self.config, self.record
        write_record(record)  # `lazyfs mounts` shows it starting, `umount` can stop it
        if config.disk_cache is not None and any(_is_remote(s.blob) for s in config.sources):
            # Its index opens in the background while the layers open: reading entries needs
            # none (opening it took 4-6 ms of a warm start's critical path). A cache that
            # cannot be used stops no mount: it goes on without one (logged once).
            self.disk = await trio.to_thread.run_sync(
                partial(open_disk_cache, config.disk_cache, index_in_background=True))
        if self.disk is not None:
            self.disk.note_used(config.disk_keys)
            self.disk.adopt_warm(config.warm_chunks)
        config.warm_chunks = {}  # the disk cache holds them now (or nothing does)
        self.loads = loads = BackgroundLoads(config.prefetch, self.disk, self.cache.capacity_bytes)
        loads.follow_warm_feed(nursery, config.warm_feed)
        await self._open_layers(nursery, trace, loads)
        self._check_cache_size()
        self.stats.phases.mark("metadata")
        # Raises PrefetchListError for a list the user gave that fits none of the layers.
        loads.start(nursery, self.images, [source.prefetch for source in config.sources])
        ops = LayerOperations(self.images, self.stats, cache=self.cache, disk=self.disk)
        record.block_files = [os.path.join(record.fuse_dir, image.name) for image in self.images]

        if not config.block_only:
            os.makedirs(os.path.dirname(record.fuse_dir), mode=0o700, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(record.fuse_dir, 0o700)
                self._created_fuse_dir = True
        write_record(record)  # before mounting: a crash from here on leaves a trail
        try:
            pyfuse3.init(ops, record.fuse_dir, fuse_options(config))
        except RuntimeError as exc:  # libfuse printed its reason to stderr (the daemon log)
            raise kernel.MountError(
                f"cannot mount the FUSE file system at {record.fuse_dir}: {exc}"
            ) from None
        self._fuse_mounted = True
        nursery.start_soon(self._serve_fuse)
        nursery.start_soon(self._raise_request_limit)
        self.stats.phases.mark("fuse")
        log.info("serving %s at %s", ", ".join(record.block_files), record.fuse_dir)

        if config.images and not config.block_only:
            block_files = dict(
                zip((image.name for image in self.images), record.block_files, strict=True)
            )
            layer_dirs = await stack.mount_layers(
                record, block_files, on_loop_attached=self._loop_attached
            )
            await stack.mount_overlays(record, config.images, layer_dirs)
        elif not config.block_only:
            for block_file in record.block_files:
                erofs = await kernel.mount_erofs(
                    block_file, record.mountpoint, on_loop_attached=self._loop_attached
                )
                record.erofs_mounts.append(erofs)
                write_record(record)
        self.stats.phases.mark("kernel")
        if self.disk is not None and await self.disk.wait_index():  # else off, logged once
            log.info("disk cache %s, at most %d bytes", self.disk.directory,
                     self.disk.store.capacity_bytes)
            nursery.start_soon(self._remember_images, self.disk)
        else:
            self._images_remembered.set()
        loads.kernel_mounted()
        record.ready = True
        write_record(record)
        self.stats.mark_ready()
        log.info("%s: ready after %.3f s", record.mountpoint, self.stats.ready_after_s or 0)

    async def _open_layers(self, nursery: trio.Nursery, trace: TraceWriter | None,
                           loads: BackgroundLoads) -> None:
        """Open and authenticate every source, a few at once; `self.images` keeps the order of
        the sources. Background fetches of each layer run in `nursery` (the daemon's)."""
        config = self.config
        cpu_limiter = trio.CapacityLimiter(self.limits.decode_threads)
        tuning = replace(config.tuning, parallel_fetches=self.limits.parallel_fetches)
        limiter = trio.CapacityLimiter(PARALLEL_LAYER_OPENS)
        opened: dict[int, RemoteImage] = {}

        async def open_one(index: int, source: LayerSource) -> None:
            async with limiter:
                image = await open_layer(
                    self._with_limits(source),
                    cache=self.cache,
                    nursery=nursery,
                    tuning=tuning,
                    trace=trace,
                    cpu_limiter=cpu_limiter,
                    # A blob on this machine needs no copy in the disk cache.
                    disk=self.disk if _is_remote(source.blob) else None,
                )
                self.images.append(image)  # closed at teardown, whatever happens next
                loads.layer_opened(image)
                if not config.block_only:
                    await _probe_superblock(image, source)
            opened[index] = image
            if not config.block_only:
                # The kernel mount reads the EROFS superblock first: fetch it meanwhile.
                image.warm(0, EROFS_SUPERBLOCK_END)
            log.info(
                "%s: %d bytes in %d chunks",
                source.blob,
                image.size,
                image.metadata.table.chunk_count,
            )

        try:
            async with trio.open_nursery() as opening:
                for index, source in enumerate(config.sources):
                    opening.start_soon(open_one, index, source)
        except BaseExceptionGroup as group:
            raise sole_error(group) from None
        self.images = [opened[index] for index in range(len(config.sources))]

    def _with_limits(self, source: LayerSource) -> LayerSource:
        """`source` with the daemon's connection limit and low-speed limit on every reader."""
        def limited(options: ReaderOptions) -> ReaderOptions:
            return replace(options, max_connections=self.limits.http_connections,
                           low_speed=self.config.low_speed)

        return replace(
            source,
            reader_options=limited(source.reader_options),
            alternates=tuple(replace(alternate, reader_options=limited(alternate.reader_options))
                             for alternate in source.alternates),
        )

    def _check_cache_size(self) -> None:
        """A cache smaller than a chunk keeps nothing: every read would fetch again. Raises
        DaemonStartError naming the layer and the size needed."""
        sizes = {image.name: min(image.metadata.table.chunk_size, image.size)
                 for image in self.images}
        if not sizes:
            return
        name = max(sizes, key=lambda layer: sizes[layer])
        chunk_size = sizes[name]
        if self.cache.capacity_bytes < chunk_size:
            raise DaemonStartError(
                f"the chunk cache of {self.cache.capacity_bytes} bytes (--cache-size) is "
                f"smaller than one chunk of layer {name} ({chunk_size} bytes): it "
                f"could keep nothing; give at least {chunk_size} bytes (better several chunks)"
            )

    async def _remember_images(self, disk: DiskCache) -> None:
        """Write what the command learned of the images (`DaemonConfig.disk_writes`: their
        manifests, configs and the tags' pointers), now that the mount is up: not on the
        start's critical path. A failure is logged once by the disk cache."""
        try:
            for key, data in self.config.disk_writes:
                if data is None:
                    await disk.delete(key)
                else:
                    await disk.put(key, data)
        finally:
            self._images_remembered.set()

    def _loop_attached(self, device: str) -> None:
        self.record.loop_devices.append(device)
        write_record(self.record)

    async def _raise_request_limit(self) -> None:
        """Let the kernel send as many requests at a time as there are FUSE workers
        (`lazyfs.mount.fuse_connection`), in the background: the mount does not wait."""
        workers = self.limits.fuse_workers
        try:
            await trio.to_thread.run_sync(fuse_connection.raise_request_limit,
                                          self.record.fuse_dir, workers)
        except OSError as exc:
            log.info("%s: the kernel keeps its limit of FUSE requests in flight (%s): beyond "
                     "it, reads wait in the kernel, outside the read timeout",
                     self.record.fuse_dir, exc)
        else:
            log.debug("%s: up to %d FUSE requests in flight", self.record.fuse_dir, workers)

    async def _serve_fuse(self) -> None:
        self._fuse_serving = True
        try:
            await pyfuse3.main(min_tasks=1, max_tasks=self.limits.fuse_workers)
        finally:
            self._fuse_serving = False
            self._fuse_done.set()
        if not self._stopping:
            log.warning(
                "%s: the FUSE file system was unmounted from outside; stopping",
                self.record.fuse_dir,
            )

    async def _watch_signals(
        self, signals: AsyncIterator[int], cancel_scope: trio.CancelScope
    ) -> None:
        async for signum in signals:
            log.info(
                "%s: %s received; unmounting", self.record.mountpoint, signal.Signals(signum).name
            )
            self._stopping = True
            # No read may wait on a stalled server now: end the fetches in flight first.
            for image in self.images:
                image.cancel_fetches()
            if not self.record.ready or not self._fuse_serving:
                # Still starting up: cancel it (a mount(8) waiting on FUSE is killed with it)
                # and let the teardown undo what came up.
                cancel_scope.cancel()
                return
            # Kernel mounts go first, while FUSE still serves the reads of files open on
            # them; only then may the loop stop.
            try:
                await kernel.unmount_kernel_mounts(self.record, lazy_fallback=True)
            except kernel.MountError as exc:
                log.error("%s", exc)
            pyfuse3.terminate()
            return

    async def _teardown(self) -> None:
        """Undo whatever came up, in reverse order; keep going past failures. Nothing here
        looks into the FUSE file system: its loop has stopped, so a request to it (a stat of
        its directory or of a block file) would wait forever for an answer."""
        record = self.record
        if self._fuse_mounted:
            # Abort the FUSE connection first (closing the session's /dev/fuse descriptor,
            # which only this process holds, does): whatever still waits for an answer of
            # the stopped loop (FUSE's INIT, a mount(2) under way in a worker thread) fails
            # at once instead of hanging the teardown, and the daemon with it. The mounts on
            # top lose nothing they could still read.
            pyfuse3.close(unmount=False)
        try:
            await kernel.unmount_kernel_mounts(record, lazy_fallback=True)
        except kernel.MountError as exc:
            log.error("%s", exc)
        if self._fuse_mounted:
            # Detached here, not left to the kernel reaping /dev/fuse, so that nothing is
            # left at the mountpoint (libfuse does not unmount an aborted connection).
            try:
                await kernel.fuse_unmount_lazy(record.fuse_dir)
            except kernel.MountError as exc:
                log.error("%s", exc)
            self._fuse_mounted = False
        for image in self.images:
            await image.aclose()
        if self.disk is not None:
            await self.disk.aclose()
        if self._created_fuse_dir:
            with contextlib.suppress(OSError):
                os.rmdir(record.fuse_dir)
        stack.remove_layer_dirs(record)
        remove_record(record.mountpoint)


def _is_remote(blob: str) -> bool:
    return "://" in blob and not blob.startswith("file://")


async def _probe_superblock(image: RemoteImage, source: LayerSource) -> None:
    """Read the layer's first block through the verified path. Raises LayerOpenError saying
    what failed (the chunk and the check, or the fetch), which the kernel's mount would not."""
    try:
        await image.read(0, min(SUPERBLOCK_PROBE_BYTES, image.size))
    except ImageReadError as exc:
        raise LayerOpenError(
            f"{source.blob}: cannot read the layer's EROFS superblock: {exc}"
        ) from None


def run_daemon(config: DaemonConfig, on_ready: Callable[[], None]) -> None:
    """Serve the mount until SIGTERM/SIGINT or an outside unmount; `on_ready` is called once
    everything is mounted. Raises what made start-up fail, after undoing it."""
    Daemon(config).run(on_ready)
