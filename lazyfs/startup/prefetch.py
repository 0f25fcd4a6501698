"""Background fetching for a mount: a recorded prefetch list replayed in order, and `--fill`
(the whole layer at a capped rate); and the recorder that writes such a list.

On-demand reads always go first. Background loads have their own slots (`parallel_requests`
for the whole mount, so they never take the connections or fetch slots of reads), and while
an on-demand fetch of any layer is waiting or in flight (`lazyfs/layer/demand.py`) no
background request starts beyond `requests_during_reads` in flight (a few keep the link busy
during a read's round trip: what the list asks for next is what the start-up reads next).
A chunk is claimed in the cache only when its request starts, so a read never waits on a
background load that has not begun; a read that wants a chunk of a request in flight waits
for that request, which is at most `request_bytes` of frames.
Without a disk cache, background loads stop when the chunk cache is full rather than evict
what reads brought in (with one, they go on: what is evicted from memory stays on disk).
Everything runs in the mount's nursery and is cancelled on unmount.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from lazyfs.format.prefetch_list import (
    BLOCK_SIZE,
    MAX_RECORDED_BLOCKS,
    LayerPrefetch,
    PrefetchList,
    PrefetchListError,
    serialize_prefetch_list,
)
from lazyfs.layer.tuning import PrefetchOptions

if TYPE_CHECKING:
    from lazyfs.layer.remote_image import RemoteImage

log = logging.getLogger(__name__)

def plan_lists(images: Sequence[RemoteImage], carried: Sequence[LayerPrefetch | None],
               options: PrefetchOptions) -> list[tuple[int, ...]]:
    """The chunks to prefetch for each image, in order (empty: none).

    An explicit list applies to the layers whose chunk digest it names; when it names none of
    them it is refused (PrefetchListError): the user asked for it, and a list silently
    ignored would pass for one that did not help. A list an image carries is only a hint of
    the image's author: when its digest is not the layer's it is ignored with a warning and
    the layer mounts as usual.
    """
    plans: list[tuple[int, ...]] = []
    explicit = options.prefetch_list
    for image, hint in zip(images, carried, strict=True):
        digest = image.metadata.annotations.chunk_digest
        count = image.metadata.table.chunk_count
        if explicit is not None:
            entry = explicit.for_digest(digest)
            if entry is not None and entry.chunk_count != count:
                raise PrefetchListError(
                    f"{options.list_source}: layer {image.name}: the list has {entry.chunk_count} "
                    f"chunks, the layer {count}")
            plans.append(entry.chunks if entry is not None else ())
            continue
        if hint is None or not options.use_image_lists:
            plans.append(())
        elif hint.chunk_digest != digest or hint.chunk_count != count:
            log.warning("layer %s: its prefetch annotation was recorded for the chunk table "
                        "%s (%d chunks), not this layer's %s (%d chunks): ignored",
                        image.name, hint.chunk_digest, hint.chunk_count, digest, count)
            plans.append(())
        else:
            plans.append(hint.chunks)
    if explicit is not None and not any(plans):
        recorded = ", ".join(layer.name or layer.chunk_digest[:23] for layer in explicit.layers)
        raise PrefetchListError(
            f"{options.list_source}: recorded for other layers ({recorded or 'none'}) than "
            f"those mounted ({', '.join(image.name for image in images)}): a list applies "
            "only to the layers it was recorded from; record it again with --record")
    return plans


class Pacer:
    """Spaces out `take(size)` calls to `rate` bytes a second (the fill's cap)."""

    def __init__(self, rate_bytes: float) -> None:
        self.rate = rate_bytes
        self._next = -math.inf

    async def take(self, size: int) -> None:
        now = trio.current_time()
        start = max(now, self._next)
        self._next = start + size / self.rate
        await trio.sleep_until(start)


class BackgroundLoader:
    """Replays each layer's list, then fills if asked; one instance per mount."""

    def __init__(self, images: Sequence[RemoteImage], plans: Sequence[tuple[int, ...]],
                 options: PrefetchOptions) -> None:
        self.images = list(images)
        self.plans = list(plans)
        self.options = options
        self._slots = trio.Semaphore(options.parallel_requests)
        self._limiter = trio.CapacityLimiter(options.parallel_requests)
        self._pacer = Pacer(options.fill_rate_bytes)
        self._reserved_bytes = 0  # decoded bytes of background loads in flight
        for image, plan in zip(self.images, self.plans, strict=True):
            image.background.listed_chunks = len(plan)
            if plan:  # it says what comes next: no readahead meanwhile
                image.follow_plan(plan)

    @property
    def has_work(self) -> bool:
        return self.options.fill or any(self.plans)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for image, plan in zip(self.images, self.plans, strict=True):
                if plan or self.options.fill:
                    nursery.start_soon(self._layer, image, plan)

    async def _layer(self, image: RemoteImage, plan: tuple[int, ...]) -> None:
        stats = image.background
        phases = [("prefetching", "prefetch", plan)] if plan else []
        if self.options.fill:
            phases.append(("filling", "fill", tuple(range(image.metadata.table.chunk_count))))
        try:
            for state, reason, chunks in phases:
                stats.state = state
                async with trio.open_nursery() as loads:
                    if not await self._replay(image, chunks, reason, loads):
                        return
            stats.state = "done"
        finally:
            image.replaying_list = False
            if stats.state not in ("done", "stopped: cache full"):
                stats.state = "cancelled"

    async def _replay(self, image: RemoteImage, chunks: tuple[int, ...], reason: str,
                      loads: trio.Nursery) -> bool:
        """Load `chunks` in order; False when the cache filled up first."""
        position = 0
        while position < len(chunks):
            run, position = self._next_run(image, chunks, position)
            if not run:
                continue
            if reason == "fill":
                await self._pacer.take(sum(_frame_size(image, index) for index in run))
            await self._slots.acquire()
            try:
                await self._demand_idle()
                decoded = sum(image.metadata.table.decoded_size(index) for index in run)
                cache = image.cache
                room = cache.capacity_bytes - cache.size_bytes - self._reserved_bytes
                if image.disk is None and room < decoded:
                    image.background.state = "stopped: cache full"
                    log.info("layer %s: %s stopped at chunk %d: the chunk cache is full",
                             image.name, reason, run[0])
                    self._slots.release()
                    return False
                claimed = image.claim_for_background(run)
            except BaseException:
                self._slots.release()
                raise
            if not claimed:
                self._slots.release()
                continue
            reserved = sum(image.metadata.table.decoded_size(index) for index in claimed)
            self._reserved_bytes += reserved
            loads.start_soon(self._load, image, claimed, reason, reserved)
        return True

    def _next_run(self, image: RemoteImage, chunks: tuple[int, ...],
                  position: int) -> tuple[list[int], int]:
        """The next chunks from `position` that need a fetch, adjacent in the blob and listed
        one after the other, up to `request_bytes`; and the position after them."""
        run: list[int] = []
        size = 0
        while position < len(chunks):
            index = chunks[position]
            if not image.needs_fetch(index):
                image.background.skipped_chunks += 1
                position += 1
                if run:
                    break
                continue
            frame = _frame_size(image, index)
            if run and (index != run[-1] + 1 or size + frame > self.options.request_bytes):
                break
            run.append(index)
            size += frame
            position += 1
        return run, position

    async def _demand_idle(self) -> None:
        """Wait, unless the request about to start is within `requests_during_reads` of those
        in flight, until no layer of the mount has an on-demand fetch waiting or in flight."""
        in_flight = self.options.parallel_requests - self._slots.value  # this one included
        if in_flight <= self.options.requests_during_reads:
            return
        while True:
            busy = next((image.demand for image in self.images if image.demand.active), None)
            if busy is None:
                return
            await busy.wait_idle()

    async def _load(self, image: RemoteImage, run: list[int], reason: str,
                    reserved: int) -> None:
        stats = image.background
        try:
            await image.load_claimed(run, reason, self._limiter)
        finally:
            self._reserved_bytes -= reserved
            self._slots.release()
        loaded = sum(1 for index in run if image.has_chunk(index))
        size = sum(_frame_size(image, index) for index in run)
        if reason == "fill":
            stats.fill_requests += 1
            stats.fill_bytes += size
            stats.filled_chunks += loaded
        else:
            stats.prefetch_requests += 1
            stats.prefetch_bytes += size
            stats.prefetched_chunks += loaded


def _frame_size(image: RemoteImage, index: int) -> int:
    start, end = image.metadata.frame_range(index)
    return end - start


@dataclass
class _LayerAccesses:
    chunk_digest: str
    chunk_count: int
    image_size: int
    layout: str  # the layer's layout fingerprint ("": none)
    chunks: dict[int, None] = field(default_factory=dict)  # first reads, in order
    blocks: dict[int, None] = field(default_factory=dict)  # the same, by EROFS block


def layout_of(image: RemoteImage) -> str:
    """The layout fingerprint the layer's descriptor gave (`dev.lazyfs.layout`, set by lazyfs's
    writer), as its parsed annotations carry it as `layout`; "" when they carry none."""
    return image.metadata.annotations.layout or ""


class AccessRecorder:
    """Remembers, per layer, the chunks reads touched in the order they first did, and the
    4 KiB blocks of the raw image too (for `lazyfs convert --startup-order`); written as a
    prefetch list when the mount ends, with each layer's layout fingerprint (`layout_of`), by
    which the converter checks it maps the blocks to the files they were. Bounded by the
    layers' chunk counts, and blocks by MAX_RECORDED_BLOCKS (a start-up reads far less)."""

    def __init__(self) -> None:
        self._layers: dict[str, _LayerAccesses] = {}

    def hook(self, image: RemoteImage) -> Callable[[int, int], None] | None:
        """The read hook for `image`, called with (offset, size) of each read; None for a
        layer without a chunk digest (a list could not name it)."""
        digest = image.metadata.annotations.chunk_digest
        if digest is None:
            return None
        table = image.metadata.table
        accesses = self._layers.setdefault(
            image.name, _LayerAccesses(digest, table.chunk_count, image.size, layout_of(image)))

        def note(offset: int, size: int) -> None:
            for index in table.chunks_for_range(offset, size):
                if index not in accesses.chunks:
                    accesses.chunks[index] = None
            end = min(offset + size, accesses.image_size)
            blocks = accesses.blocks
            for block in range(offset // BLOCK_SIZE, -(-end // BLOCK_SIZE)):
                if block not in blocks and len(blocks) < MAX_RECORDED_BLOCKS:
                    blocks[block] = None

        return note

    def prefetch_list(self) -> PrefetchList:
        return PrefetchList(tuple(
            LayerPrefetch(layer.chunk_digest, layer.chunk_count, tuple(layer.chunks), name,
                          tuple(layer.blocks), BLOCK_SIZE, layer.image_size, layer.layout)
            for name, layer in self._layers.items() if layer.chunks))

    def write(self, path: str) -> None:
        """Write the list to `path` (through a temporary file, so a reader sees all or
        nothing). Raises OSError."""
        partial = f"{path}.partial-{os.getpid()}"
        with open(partial, "wb") as stream:
            stream.write(serialize_prefetch_list(self.prefetch_list()))
        os.replace(partial, path)
