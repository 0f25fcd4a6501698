"""The mount daemon: one trio nursery owns the FUSE loop, the layers' background work and
the kernel mounts, from start-up to an orderly teardown on SIGTERM, SIGINT or SIGHUP.

The layers, their FUSE file system and EROFS mounts are those of a `LayerHost` (`host.py`),
as the snapshotter's are. Start-up order: open and authenticate every layer (all at once, a
few in flight), mount FUSE on a private directory (or the user's block-only directory), start
serving, then mount EROFS from the block files while the loop serves the kernel's reads, and
for images stack them with overlayfs. Teardown runs the other way round and also after a
failure half-way: each step is recorded in the mount record first, so whatever came up goes
down. A stop first cancels every fetch in flight, so that no read waits on a stalled server
while the mount goes down.

Before EROFS is mounted on a layer, its first block (the superblock) is read through the
verified path: when that fails, the error names what failed (chunk, tree level and block, or
the fetch), not the kernel's "can't read superblock".

Loads ahead of reads (prefetch lists, the fill, a warm start's chunks) run in the same
nursery (the host's `lazyfs.mount.background_loads`).

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
from dataclasses import dataclass, field
from functools import partial

import trio

from lazyfs.cache.disk import DiskCache
from lazyfs.errors import LazyfsError
from lazyfs.exception_groups import sole_error
from lazyfs.fuse.operations import DaemonStats
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.stats import TraceWriter
from lazyfs.mount import kernel, stack
from lazyfs.mount.host import LayerHost, MountOptions, is_remote
from lazyfs.mount.state import (
    ImageRecord,
    MountRecord,
    private_dir,
    process_start_ticks,
    remove_record,
    write_record,
)
from lazyfs.startup.open import LayerSource
from lazyfs.startup.warm_start import WarmFeed

log = logging.getLogger(__name__)

# SIGHUP: a foreground mount whose terminal goes away unmounts instead of dying mid-mount.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# At unmount, frames still being written to the disk cache get this long to finish.
DISK_WRITES_GRACE_S = 10.0
# How often the trace file is flushed, so that a live mount can be watched.
TRACE_FLUSH_INTERVAL_S = 1.0


class DaemonStartError(LazyfsError):
    """The daemon did not come up; the message says why (one line)."""


@dataclass
class DaemonConfig:
    """What to mount, and where, and how (`options`: every layer's). `mountpoint` is the EROFS
    mountpoint, or with `block_only` the directory where the block files appear. `temp_dir`
    is scratch space of the caller that `lazyfs umount` removes with the mount (after a
    caller that died).

    With `images`, `sources` are their distinct layers (named as the images list them) and
    each image is stacked at its own mountpoint, the first at `mountpoint`.
    """

    sources: list[LayerSource]
    mountpoint: str
    images: list[ImageRecord] = field(default_factory=list)
    block_only: bool = False
    options: MountOptions = field(default_factory=MountOptions)
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


class Daemon:
    """One mount's lifetime. `run(on_ready)` returns after teardown; it raises what made
    start-up fail (after undoing what had come up)."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
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
        self.host: LayerHost | None = None  # made once the record is written
        self._images_remembered = trio.Event()
        self._created_fuse_dir = False

    def run(self, on_ready: Callable[[], None]) -> None:
        trio.run(self._main, on_ready)

    async def _main(self, on_ready: Callable[[], None]) -> None:
        phases = self.stats.phases
        for name, at in (("command", self.config.command_started),
                         ("forked", self.config.forked_at)):
            if at is not None:
                phases.mark(name, at)
        phases.mark("daemon")
        trace_file = self.config.options.trace_file
        trace = TraceWriter.open(trace_file) if trace_file else None
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_signals, signals, nursery.cancel_scope)
                    if trace is not None:
                        nursery.start_soon(trace.flush_periodically, TRACE_FLUSH_INTERVAL_S)
                    host = await self._start(nursery, trace)
                    on_ready()
                    await host.fuse_done.wait()
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
                if self.host is not None:
                    self.host.loads.write_record()
        if not self.record.ready:
            raise DaemonStartError("stopped by a signal before the mount was ready")
        log.info("%s: unmounted", self.record.mountpoint)

    async def _start(self, nursery: trio.Nursery, trace: TraceWriter | None) -> LayerHost:
        """Bring the mount up; returns its host, serving."""
        config, record = self.config, self.record
        write_record(record)  # `lazyfs mounts` shows it starting, `umount` can stop it
        # The disk cache opens while the layers open; a blob on this machine needs none.
        self.host = host = await LayerHost.open(
            record.fuse_dir, config.options, nursery,
            disk_cache=any(is_remote(source.blob) for source in config.sources),
            layer_count=len(config.sources), stats=self.stats, trace=trace,
            allow_other=config.allow_other)
        if host.disk is not None:
            host.disk.note_used(config.disk_keys)
            host.disk.adopt_warm(config.warm_chunks)
        config.warm_chunks = {}  # the disk cache holds them now (or nothing does)
        host.loads.follow_warm_feed(nursery, config.warm_feed)
        await self._open_layers(host)
        self._check_cache_size(host)
        self.stats.phases.mark("metadata")
        # Raises PrefetchListError for a list the user gave that fits none of the layers.
        host.loads.start(nursery, self.images, [source.prefetch for source in config.sources])
        record.block_files = [host.serve(image) for image in self.images]

        if not config.block_only:
            os.makedirs(os.path.dirname(record.fuse_dir), mode=0o700, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkdir(record.fuse_dir, 0o700)
                self._created_fuse_dir = True
        write_record(record)  # before mounting: a crash from here on leaves a trail
        host.start_fuse()
        self.stats.phases.mark("fuse")
        log.info("serving %s at %s", ", ".join(record.block_files), record.fuse_dir)

        if config.images and not config.block_only:
            block_files = dict(
                zip((image.name for image in self.images), record.block_files, strict=True)
            )
            layer_dirs = await stack.mount_layers(
                record, block_files, mount=partial(host.mount_erofs,
                                                   on_loop_attached=self._loop_attached)
            )
            await stack.mount_overlays(record, config.images, layer_dirs)
        elif not config.block_only:
            for block_file in record.block_files:
                erofs = await host.mount_erofs(
                    block_file, record.mountpoint, on_loop_attached=self._loop_attached
                )
                record.erofs_mounts.append(erofs)
                write_record(record)
        self.stats.phases.mark("kernel")
        if host.disk is not None and await host.disk_cache_ready():
            nursery.start_soon(self._remember_images, host.disk)
        else:
            self._images_remembered.set()
        host.loads.kernel_mounted()
        record.ready = True
        write_record(record)
        self.stats.mark_ready()
        log.info("%s: ready after %.3f s", record.mountpoint, self.stats.ready_after_s or 0)
        return host

    async def _open_layers(self, host: LayerHost) -> None:
        """Open and authenticate every source, a few at once (the host's limit), each
        superblock read unless only block files are served; `self.images` keeps the order of
        the sources."""
        config = self.config
        opened: dict[int, RemoteImage] = {}

        async def open_one(index: int, source: LayerSource) -> None:
            image = await host.open_layer(source, probe=not config.block_only)
            opened[index] = image
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

    def _check_cache_size(self, host: LayerHost) -> None:
        """A cache smaller than a chunk keeps nothing: every read would fetch again. Raises
        DaemonStartError naming the layer and the size needed."""
        sizes = {image.name: min(image.metadata.table.chunk_size, image.size)
                 for image in self.images}
        if not sizes:
            return
        name = max(sizes, key=lambda layer: sizes[layer])
        chunk_size = sizes[name]
        if host.cache.capacity_bytes < chunk_size:
            raise DaemonStartError(
                f"the chunk cache of {host.cache.capacity_bytes} bytes (--cache-size) is "
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

    async def _watch_signals(
        self, signals: AsyncIterator[int], cancel_scope: trio.CancelScope
    ) -> None:
        async for signum in signals:
            log.info(
                "%s: %s received; unmounting", self.record.mountpoint, signal.Signals(signum).name
            )
            host = self.host
            # No read may wait on a stalled server now: end the fetches in flight first.
            if host is not None:
                host.cancel_fetches()
            if host is None or not self.record.ready or not host.serving:
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
            host.stop_fuse()
            return

    async def _teardown(self) -> None:
        """Undo whatever came up, in reverse order; keep going past failures. Nothing here
        looks into the FUSE file system: its loop has stopped, so a request to it (a stat of
        its directory or of a block file) would wait forever for an answer."""
        record = self.record
        if self.host is not None:
            # The FUSE connection is aborted first: whatever still waits for an answer of the
            # stopped loop fails at once instead of hanging the teardown, and the daemon with
            # it. The mounts on top lose nothing they could still read.
            self.host.abort()
        try:
            await kernel.unmount_kernel_mounts(record, lazy_fallback=True)
        except kernel.MountError as exc:
            log.error("%s", exc)
        if self.host is not None:
            await self.host.close()
        if self._created_fuse_dir:
            with contextlib.suppress(OSError):
                os.rmdir(record.fuse_dir)
        stack.remove_layer_dirs(record)
        remove_record(record.mountpoint)


def run_daemon(config: DaemonConfig, on_ready: Callable[[], None]) -> None:
    """Serve the mount until SIGTERM/SIGINT or an outside unmount; `on_ready` is called once
    everything is mounted. Raises what made start-up fail, after undoing it."""
    Daemon(config).run(on_ready)
