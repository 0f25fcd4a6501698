"""A mount's loads ahead of reads, in the daemon's nursery (unmount cancels them): the prefetch
lists and the fill, what the disk cache holds of layers opened from it (in the order their
last mount read them), the chunks a command's warm start goes on loading in a process of its
own (`lazyfs.startup.warm_start`), and the recorder that writes a list of the mount's reads.

Loads from the disk wait for the kernel mounts: the disk answers at once, so started earlier
they would hold the interpreter while the kernel's first reads (its superblock, the root
directory) and the mount threads wait on it (the kernel mounts took 14-20 ms instead of 4 ms in
warm starts); reads meanwhile take the chunks they need from the disk themselves.
"""

from __future__ import annotations

import logging
import os

import trio

from lazyfs.cache.disk import DiskCache
from lazyfs.format.prefetch_list import LayerPrefetch
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import PrefetchOptions
from lazyfs.startup.prefetch import AccessRecorder, BackgroundLoader, plan_lists
from lazyfs.startup.warm_start import WarmFeed

log = logging.getLogger(__name__)


class BackgroundLoads:
    """The background loads of one mount's layers, as `options` asks; `disk` is the mount's
    disk cache (None: none), `cache_bytes` the size of its chunk cache."""

    def __init__(self, options: PrefetchOptions, disk: DiskCache | None,
                 cache_bytes: int) -> None:
        self.options = options
        self._disk = disk
        self._cache_bytes = cache_bytes
        self._kernel_mounted = trio.Event()
        self._warm_feed_done = trio.Event()
        self._recorder: AccessRecorder | None = None

    def follow_warm_feed(self, nursery: trio.Nursery, feed: WarmFeed | None) -> None:
        """Take the chunks a command's warm start goes on loading (`feed`; None: it has
        ended, or there was none) until it is done."""
        if feed is None:
            self._warm_feed_done.set()
        else:
            nursery.start_soon(self._follow, feed)

    def layer_opened(self, image: RemoteImage) -> None:
        """What the disk holds of a layer opened from it is loaded as a list is: it reads
        nothing ahead until that list is known (the chunks after its first reads may be ones
        the last mount never read)."""
        if image.opened_from_disk and self.options.from_disk:
            image.replaying_list = True

    def start(self, nursery: trio.Nursery, images: list[RemoteImage],
              carried: list[LayerPrefetch | None]) -> None:
        """Hook up the access recorder, and start the lists (`carried`: each layer's own,
        if any) and the fill. Raises PrefetchListError for a list the user gave that fits
        none of the layers."""
        if self.options.record_file is not None:
            self._recorder = AccessRecorder()
            for image in images:
                image.on_read = self._recorder.hook(image)
        plans = plan_lists(images, carried, self.options)
        if self.options.from_disk and any(image.opened_from_disk and not plan
                                          for image, plan in zip(images, plans, strict=True)):
            nursery.start_soon(self._from_disk, images, plans)
            return
        nursery.start_soon(self._run, BackgroundLoader(images, plans, self.options))

    def replay(self, nursery: trio.Nursery, image: RemoteImage,
               carried: LayerPrefetch | None) -> trio.CancelScope | None:
        """Replay the list `carried` of a layer added while its host runs (on-demand reads
        first, as `start` does), with background slots of its own; returns its scope, for
        the layer's detach to cancel, or None when there is nothing to replay."""
        plans = plan_lists([image], [carried], self.options)
        if not plans[0]:
            image.replaying_list = False
            return None
        loader = BackgroundLoader([image], plans, self.options)
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                await loader.run()

        nursery.start_soon(run)
        log.info("layer %s: prefetching %d chunks its image lists", image.name, len(plans[0]))
        return scope

    def kernel_mounted(self) -> None:
        """The kernel mounts are up: loads from the disk may start."""
        self._kernel_mounted.set()

    def write_record(self) -> None:
        """Write the list of the mount's reads, if asked to (at unmount)."""
        path = self.options.record_file
        if self._recorder is None or path is None:
            return
        try:
            self._recorder.write(path)
        except OSError as exc:
            log.error("cannot write the prefetch list %s: %s", path, exc.strerror)
            return
        log.info("prefetch list written to %s", path)

    async def _from_disk(self, images: list[RemoteImage], plans: list[tuple[int, ...]]) -> None:
        """Run the loads, a layer without a list loading what the disk cache holds of it
        first (up to half the chunk cache). Reads among those chunks read nothing ahead
        (`RemoteImage.planned_chunks`)."""
        budget = self._cache_bytes // 2
        for position, image in enumerate(images):
            if plans[position] or image.disk is None or not image.opened_from_disk:
                continue
            held: list[int] = []
            for index in await image.disk.held_chunks():
                size = image.metadata.table.decoded_size(index)
                if size > budget:
                    break
                budget -= size
                held.append(index)
            plans[position] = tuple(held)
            image.follow_plan(plans[position])
        await self._kernel_mounted.wait()
        await self._warm_feed_done.wait()  # what it loads need not be loaded again here
        await self._run(BackgroundLoader(images, plans, self.options))

    async def _follow(self, feed: WarmFeed) -> None:
        """Take the chunks the command's warm start goes on loading (on the other core, while
        the container starts) as they come; then it is told to stop (also at unmount)."""
        try:
            while True:
                await trio.lowlevel.wait_readable(feed.records)
                data = os.read(feed.records, 65536)
                if not data:
                    break
                if self._disk is not None:
                    self._disk.adopt_warm(feed.chunks_of(data))
        except OSError as exc:  # the daemon loads the rest itself
            log.info("warm start: its loader cannot be followed: %s", exc)
        finally:
            feed.close()
            self._warm_feed_done.set()

    async def _run(self, loader: BackgroundLoader) -> None:
        """Run `loader`; then drop the chunks of the command's warm start that no load took
        (those of a manifest that has moved on, or beyond the lists)."""
        try:
            if loader.has_work:
                await loader.run()
        finally:
            if self._disk is not None:
                self._disk.drop_warm()
