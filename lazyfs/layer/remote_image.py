"""`RemoteImage.read(offset, size)`: the raw EROFS image of a remote layer, read at random.

A read maps to chunks; missing chunks are claimed in the cache and loaded, a run of them at a
time (`lazyfs.layer.run_load`: fetch by range, adjacent ones in one request up to a cap; each
frame checked against its SHA-512, decoded to its exact size, every data block checked
against the dm-verity tree, whose hash blocks are fetched as reads need them), under the
policy of the layer's ChunkLoader (`lazyfs.layer.loader`). With dm-verity frames stream in
(`frame_stream.py`) and a read is answered as soon as its blocks verify.
Only verified bytes reach the cache and the caller. Loads run in the mount's nursery, so a
read that is interrupted does not abandon a fetch other readers wait on, and unmount cancels
them all.

A read returns or fails within the read timeout, counted from when the FUSE handler called it,
whatever loads its chunks and however many readers wait for them: the loads a read starts end
by its deadline, and a read that waits for a chunk someone else's load brings makes a failure
of that load hold the chunk off, so that the reads the kernel retries for the same read(2)
fail at once instead of waiting as long again. A chunk that failed recently fails at once
(`lazyfs.layer.health`: per chunk, for a while, not per layer), unless the disk cache
(`lazyfs.layer.disk_tier`) may hold it: a load asks the disk first.
Background loads (`prefetch.py`) claim chunks in the same cache and streams: no chunk is
fetched twice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any

import trio

from lazyfs.cache.keys import content_key
from lazyfs.cache.memory import ChunkCache, ChunkData
from lazyfs.fetch.base import BlobReader
from lazyfs.format.layout import BlobMetadata
from lazyfs.layer.demand import DemandGate
from lazyfs.layer.disk_tier import LayerDisk
from lazyfs.layer.errors import ImageReadError
from lazyfs.layer.frame_stream import FrameStream
from lazyfs.layer.loader import ChunkLoader
from lazyfs.layer.readahead import SequentialReads
from lazyfs.layer.run_load import RunLoad
from lazyfs.layer.stats import BackgroundStats, ImageStats, TraceWriter
from lazyfs.layer.tuning import ImageTuning

log = logging.getLogger(__name__)

# Loads that reads wait for: background loads (lazyfs/startup/prefetch.py) yield to them.
ON_DEMAND = ("read", "warm")


class RemoteImage:
    """One layer's raw EROFS image, backed by blob readers (the first, then `alternates`:
    other sources of the same blob) and the disk cache (`disk`), verified before it is
    returned. `source_probe`, for a layer opened from the disk cache alone, asks the first
    source once, in the background, whether it answers (raising FetchError if not)."""

    def __init__(
        self,
        name: str,
        reader: BlobReader,
        metadata: BlobMetadata,
        cache: ChunkCache,
        nursery: trio.Nursery,
        *,
        cpu_limiter: trio.CapacityLimiter | None = None,
        trace: TraceWriter | None = None,
        tuning: ImageTuning | None = None,
        alternates: Sequence[BlobReader] = (),
        disk: LayerDisk | None = None,
        source_probe: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.disk = disk
        self.reader = reader
        self.metadata = metadata
        self.cache = cache
        self._nursery = nursery
        self.tuning = tuning = tuning or ImageTuning()
        self._trace = trace
        table = metadata.table
        self._sequential = SequentialReads(table.chunk_size, table.chunk_count)
        self._content_key: Hashable = content_key(metadata, reader.source)
        self.stats = ImageStats(chunk_count=table.chunk_count)
        self.loader = ChunkLoader(
            name, [reader, *alternates], metadata, cache, self._key, self.stats, tuning,
            cpu_limiter=cpu_limiter, record=self._record, disk=disk,
        )
        self.hash_blocks = self.loader.hash_blocks
        # Opened from the metadata a disk cache kept: an earlier mount read the layer.
        self.opened_from_disk = source_probe is not None
        if source_probe is not None:
            self.loader.probe_source(nursery, source_probe, tuning.source_probe_delay_s)
        # Background loads wait while `demand` counts fetches that reads wait for; `on_read`
        # (a recorder's) sees (offset, size) of every read.
        self.demand = DemandGate()
        self.background = BackgroundStats()
        self.on_read: Callable[[int, int], None] | None = None
        # While a prefetch list is replayed it says what comes next (better than the layout
        # does): no readahead, no chunks follow a miss; they would only compete with it.
        self.replaying_list = False
        # The chunks a list (or the order an earlier mount read them in) says reads will want:
        # a read among them follows it, and reads nothing ahead (the chunks after it that the
        # list leaves out were not read last time either), even once the list is loaded.
        self.planned_chunks: frozenset[int] = frozenset()

    @property
    def size(self) -> int:
        return self.metadata.image_size

    def follow_plan(self, chunks: tuple[int, ...]) -> None:
        """Reads are about to follow `chunks` (a list, or the order the last mount read them
        in), loaded in the background: nothing is read ahead while they are replayed, nor for
        reads among them afterwards (none: reads follow no plan)."""
        self.replaying_list = bool(chunks)
        self.planned_chunks = frozenset(chunks)

    async def read(self, offset: int, size: int) -> bytes:
        """Return verified image bytes `[offset, offset + size)`, clipped at the end of the image.

        Raises ImageReadError (its cause logged once) when a chunk cannot be fetched or
        verified, or not within the read timeout from this call.
        """
        # Taken before anything that could wait: the handler calls this as the request comes.
        deadline = trio.current_time() + self.tuning.read_timeout_s
        table = self.metadata.table
        indices = table.chunks_for_range(offset, size)
        if not indices:
            return b""
        if self.on_read is not None:
            self.on_read(offset, size)
        if self.disk is not None:
            self.disk.note_reads(indices)
        end = min(offset + size, self.size)
        pieces: list[bytes | memoryview] = []
        # The one bound on a read, whatever loads its chunks and however.
        with trio.move_on_at(deadline):
            found = self._claim(indices, "read", deadline)
            # Copy only the requested bytes of each chunk, not whole chunks.
            for index in indices:
                base = index * table.chunk_size
                start, stop = max(offset - base, 0), min(end - base, table.decoded_size(index))
                pieces.append(await self._piece(index, start, stop, found.get(index), deadline))
        if len(pieces) < len(indices):
            log.debug("layer %s: a read of chunks %d-%d gave up after %g s", self.name,
                      indices[0], indices[-1], self.tuning.read_timeout_s)
            raise ImageReadError(f"chunks {indices[0]}-{indices[-1]}: not loaded within "
                                 f"{self.tuning.read_timeout_s:g} s")
        self._schedule_readahead(offset, size, indices)
        # One copy of the bytes: views of cached chunks joined (or taken) at once.
        return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)

    def warm(self, offset: int, size: int) -> None:
        """Start loading the chunks of `[offset, offset + size)` without waiting for them: the
        EROFS superblock, say, while the kernel mount that will read it is being set up."""
        with contextlib.suppress(ImageReadError):  # the read that needs it reports it
            self._claim(self.metadata.table.chunks_for_range(offset, size), "warm")

    def cancel_fetches(self) -> None:
        """For unmount: end every load in flight now (its readers get EIO) and refuse new
        ones, so that no read waits on a stalled server while the mount goes down."""
        self.loader.cancel()

    def stats_snapshot(self) -> dict[str, Any]:
        cache_hits, cache_misses = self.cache.counts(self._content_key)
        return {
            "name": self.name,
            "source": self.reader.source,
            "image_size": self.size,
            "blob_size": self.metadata.blob_size,
            "chunk_count": self.stats.chunk_count,
            "chunks_fetched": len(self.stats.chunks_fetched),
            "chunk_fetches": self.stats.chunk_fetches,
            "chunks_from_disk": self.stats.chunks_from_disk,
            "readahead_chunks": self.stats.readahead_chunks,
            "cache_hits": cache_hits,
            "cache_misses": cache_misses,
            "fetch_failures": self.stats.fetch_failures,
            "verify_failures": self.stats.verify_failures,
            "refetches": self.stats.refetches,
            "tree_blocks_fetched": self.stats.tree_blocks_fetched,
            "partial_chunks": self.loader.partial_chunks(),
            "fetch_latency": self.stats.fetch_latency.summary_ms(),
            "background": self.background.snapshot(),
            **self.loader.snapshot(),
        }

    async def aclose(self) -> None:
        await self.loader.aclose()

    # -- background loads (lazyfs/startup/prefetch.py) -------------------------------------------

    def needs_fetch(self, index: int) -> bool:
        """Whether chunk `index` is neither cached, loading, streaming, nor refused now (bad,
        held off, its source down)."""
        key = self._key(index)
        return not (self.loader.stream(index) is not None or key in self.cache
                    or self.cache.is_loading(key) or self.loader.early_refusal(index) is not None)

    def has_chunk(self, index: int) -> bool:
        """Whether chunk `index` is in the memory cache."""
        return self._key(index) in self.cache

    def claim_for_background(self, run: list[int]) -> list[int]:
        """Claim the chunks of `run` (adjacent) from the first that needs a fetch to the next
        that does not (their streams opened: reads meanwhile wait on them, not on a second
        request); the caller must `load_claimed` them."""
        claimed: list[int] = []
        for index in run:
            if self.needs_fetch(index) and self.cache.claim(self._key(index)):
                claimed.append(index)
            elif claimed:
                break
        self.loader.open_streams(claimed)
        return claimed

    async def load_claimed(self, run: list[int], reason: str,
                           limiter: trio.CapacityLimiter) -> None:
        """Load chunks claimed by `claim_for_background`, under the caller's `limiter`."""
        await self._load_run(run, reason, self.loader.streams_of(run), limiter)

    # -- loading -----------------------------------------------------------------------------

    def _key(self, chunk_index: int) -> Hashable:
        return (self._content_key, chunk_index)

    def _claim(self, indices: range, reason: str,
                deadline: float | None = None) -> dict[int, ChunkData]:
        """Start loading the chunks of `indices` that are neither cached, nor loading, nor
        streaming (the loads end by `deadline`, by default the read timeout from now); return
        those that are cached. Raises ImageReadError for a chunk refused now
        (`ChunkLoader.early_refusal`; the loads claimed so far start).

        A read wants its first chunk; the chunks after it are as good as read ahead (the
        kernel's readahead asks for up to a MiB at a time, as far as it reads ahead): if
        their load fails they are not held off (`ChunkLoader.speculate`), so one bad range
        fails the reads that need it, not those of its neighbours in a large request. A
        first chunk loading already, claimed before anyone asked for it, is wanted now: if
        its load fails, it is held off like any chunk a read wanted."""
        found: dict[int, ChunkData] = {}
        claimed: list[int] = []
        try:
            for index in indices:
                if self.loader.stream(index) is not None:
                    if index == indices[0]:
                        self.loader.wanted(index)
                    continue
                key = self._key(index)
                data = self.cache.get(key)
                if data is not None:
                    found[index] = data
                    self._record(chunk=index, event="hit")
                    continue
                if self.cache.is_loading(key):
                    if index == indices[0]:
                        self.loader.wanted(index)
                    continue
                refusal = self.loader.early_refusal(index)
                if refusal is not None:
                    raise ImageReadError(f"chunk {index}: {refusal}")
                if self.cache.claim(key):
                    claimed.append(index)
                    if index != indices[0]:
                        self.loader.speculate([index])
            if reason == "read" and claimed and claimed[-1] == indices[-1]:
                claimed += self._followers(indices[-1] + 1)
        finally:
            # Chunks claimed before a failure must still be loaded: others may wait for them.
            self._start_loads(claimed, reason, deadline)
        return found

    def _followers(self, index: int) -> list[int]:
        """The chunks from `index` on, claimed, whose frames fit in
        `ImageTuning.follow_miss_bytes` together and may ride along with the miss before
        them: each needs a fetch (not cached, loading or refused), the layer streams and has
        no prefetch list being replayed (`replaying_list`)."""
        table = self.metadata.table
        if (self.replaying_list or not self.loader.streaming
                or not self.tuning.readahead_for(table.chunk_size)):
            return []
        followers: list[int] = []
        budget = self.tuning.follow_miss_bytes
        while index < table.chunk_count:
            start, end = self.metadata.frame_range(index)
            budget -= end - start
            if (budget < 0 or not self.needs_fetch(index)
                    or not self.cache.claim(self._key(index))):
                break
            followers.append(index)
            index += 1
        self._speculate(followers)
        return followers

    def _start_loads(self, claimed: list[int], reason: str,
                     deadline: float | None = None) -> None:
        """Load claimed chunks in the mount's nursery, in runs of adjacent frames, each at
        most the coalesce cap; each load ends by `deadline` (default: the read timeout from
        when it starts)."""
        for run in self.metadata.frame_runs(claimed, self.tuning.coalesce_bytes):
            streams = self.loader.open_streams(run)
            if reason in ON_DEMAND:
                self.demand.begin()  # now, not when the task starts: background loads yield
            self._nursery.start_soon(self._load_run, run, reason, streams, None, deadline)

    async def _load_run(self, run: list[int], reason: str,
                        streams: dict[int, FrameStream] | None = None,
                        limiter: trio.CapacityLimiter | None = None,
                        deadline: float | None = None) -> None:
        try:
            await RunLoad(self.loader, run, reason, streams).run(limiter, deadline)
        finally:
            if reason in ON_DEMAND:
                self.demand.end()

    async def _piece(self, index: int, start: int, stop: int, data: ChunkData | None,
                     deadline: float) -> bytes | memoryview:
        """Bytes `[start, stop)` of chunk `index` (a view of the cached chunk, not a copy):
        from `data`, its stream or its load (one this read starts again ends by the read's
        `deadline`)."""
        key = self._key(index)
        while data is None:
            stream = self.loader.stream(index)
            if stream is not None:
                try:
                    return await stream.read(start, stop)
                except ImageReadError:
                    if not self.cache.is_loading(key):
                        raise
                    # The frame is fetched again, whole: wait for its key.
            data = await self.cache.wait(key)
            if data is None:  # evicted between its load and this wait (a tiny cache)
                data = self._claim(range(index, index + 1), "read", deadline).get(index)
        return memoryview(data)[start:stop]

    def _schedule_readahead(self, offset: int, size: int, indices: range) -> None:
        """While reads stream, load the window after them (`SequentialReads`), topped up
        only once less than half of it is loaded or loading: then all that it lacks goes at
        once (in requests of up to the coalesce cap), and the window grows."""
        if self.replaying_list or all(index in self.planned_chunks for index in indices):
            return
        table = self.metadata.table
        ahead = self._sequential.ahead(offset, min(offset + size, self.size), indices,
                                       self.tuning.readahead_for(table.chunk_size))
        ready = 0
        for index in ahead:
            if self.needs_fetch(index):
                break
            ready += 1
        if not ahead or ready >= max(1, len(ahead) // 2) or ready == len(ahead):
            return
        claimed = [index for index in ahead[ready:] if self.loader.stream(index) is None
                   and self.loader.early_refusal(index) is None
                   and self.cache.claim(self._key(index))]
        self._speculate(claimed)
        self._start_loads(claimed, "readahead")
        self._sequential.grow(self.tuning.readahead_max_for(table.chunk_size,
                                                            self.cache.capacity_bytes))

    def _speculate(self, chunks: list[int]) -> None:
        """Count `chunks`, claimed before any read asked for them, as read ahead (a failed
        fetch of them holds nothing off unless a read waits for them by then:
        `ChunkLoader.speculate`)."""
        self.stats.readahead_chunks += len(chunks)
        self.loader.speculate(chunks)

    def _record(self, **fields: Any) -> None:
        if self._trace is not None:
            self._trace.record(layer=self.name, **fields)
