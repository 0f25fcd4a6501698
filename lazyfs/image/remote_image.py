"""`RemoteImage.read(offset, size)`: the raw EROFS image of a remote layer, read at random.

A read maps to chunks; missing chunks are fetched by range (adjacent ones in one request up
to a cap). With dm-verity each frame streams in (`frame_stream.py`): every block is checked
against the tree as it is decoded, and a read is answered as soon as its blocks are; the
frame's SHA-512 is checked when it has all arrived. Without dm-verity a frame is checked
against its SHA-512 whole, then decoded to its exact size. Only then do bytes reach the cache
and the caller. Loads run in the mount's nursery, so a read that is interrupted does not
abandon a fetch other readers wait on, and unmount cancels them all. With a disk cache
(`disk_tier.LayerDisk`), a load looks there first: a frame read back is checked again
(`WholeFrameLoader.from_disk`), and a verified fetched frame is written back. Background
loads (`prefetch.py`) claim chunks in the same cache and streams: no chunk is fetched twice.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

import trio

from lazyfs.cache.memory import ChunkCache
from lazyfs.fetch.base import BlobReader, StreamingReader
from lazyfs.fetch.errors import FetchError
from lazyfs.format.layout import BlobMetadata
from lazyfs.image.demand import DemandGate
from lazyfs.image.disk_tier import LayerDisk
from lazyfs.image.errors import ImageReadError, LayerOpenError
from lazyfs.image.frame_stream import (
    FrameDone,
    FrameStream,
    LayerStreams,
    RunStreamer,
    StoppedEarly,
)
from lazyfs.image.hash_blocks import HashBlockStore, chunk_hash_blocks
from lazyfs.image.keys import content_key
from lazyfs.image.readahead import SequentialReads
from lazyfs.image.stats import BackgroundStats, ImageStats, TraceWriter
from lazyfs.image.tuning import ImageTuning
from lazyfs.image.whole_frames import WholeFrameLoader

log = logging.getLogger(__name__)

# Loads that reads wait for: background loads (lazyfs/image/prefetch.py) yield to them.
ON_DEMAND = ("read", "warm")


class RemoteImage:
    """One layer's raw EROFS image, backed by a blob reader, verified before it is returned."""

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
        disk: LayerDisk | None = None,
    ) -> None:
        self.name = name
        self.disk = disk
        self.reader = reader
        self.metadata = metadata
        self.cache = cache
        self._nursery = nursery
        self._cpu_limiter = cpu_limiter or trio.CapacityLimiter(2)
        self.tuning = tuning = tuning or ImageTuning()
        self._fetch_limiter = trio.CapacityLimiter(tuning.parallel_fetches)
        self._trace = trace
        self._bad_chunks: dict[int, str] = {}
        self._failing_until = 0.0
        self._last_fetch_error = ""
        table = metadata.table
        self._sequential = SequentialReads(table.chunk_size, table.chunk_count)
        self._content_key: Hashable = content_key(metadata, reader.source)
        self.stats = ImageStats(chunk_count=table.chunk_count)
        # The dm-verity tree's verified hash blocks, fetched as reads need them.
        self.hash_blocks = (
            HashBlockStore(reader, metadata, self.stats, self._cpu_limiter)
            if metadata.verity is not None and metadata.root is not None else None
        )
        # Frames streaming in (partial frames), and partial chunks kept, by chunk index.
        self._streams = LayerStreams(name)
        self._streamer = (
            RunStreamer(reader, metadata, self.hash_blocks, self._cpu_limiter,
                        tuning.stream_piece_bytes, tuning.finish_frames,
                        keep_frames=disk is not None)
            if self.hash_blocks is not None and tuning.partial_frames
            and isinstance(reader, StreamingReader) else None
        )
        self._whole = WholeFrameLoader(reader, metadata, self.hash_blocks, self._cpu_limiter)
        # Background loads wait while `demand` counts fetches that reads wait for; `on_read`
        # (a recorder's) sees the chunks of every read.
        self.demand = DemandGate()
        self.background = BackgroundStats()
        self.on_read: Callable[[range], None] | None = None
        geometry = metadata.verity
        if geometry is not None and table.chunk_size % geometry.superblock.data_block_size:
            raise LayerOpenError(
                f"{reader.source}: chunk size {table.chunk_size} is not a multiple of the "
                f"dm-verity block size {geometry.superblock.data_block_size}: blocks would "
                "straddle chunks, which lazy reads do not support (`lazyfs unpack` reads it)"
            )

    @property
    def size(self) -> int:
        return self.metadata.image_size

    async def read(self, offset: int, size: int) -> bytes:
        """Return verified image bytes `[offset, offset + size)`, clipped at the end of the image.

        Raises ImageReadError (already logged) when a chunk cannot be fetched or verified.
        """
        table = self.metadata.table
        indices = table.chunks_for_range(offset, size)
        if not indices:
            return b""
        if self.on_read is not None:
            self.on_read(indices)
        found = self._claim(indices, "read")
        end = min(offset + size, self.size)
        # Copy only the requested bytes of each chunk, not whole chunks.
        pieces = []
        for index in indices:
            base = index * table.chunk_size
            start, stop = max(offset - base, 0), min(end - base, table.decoded_size(index))
            pieces.append(await self._piece(index, start, stop, found.get(index)))
        self._schedule_readahead(offset, size, indices)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def warm(self, offset: int, size: int) -> None:
        """Start loading the chunks of `[offset, offset + size)` without waiting for them: the
        EROFS superblock, say, while the kernel mount that will read it is being set up."""
        with contextlib.suppress(ImageReadError):  # the read that needs it reports it
            self._claim(self.metadata.table.chunks_for_range(offset, size), "warm")

    def stats_snapshot(self) -> dict[str, Any]:
        fetch_stats = self.reader.stats
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
            "bytes_fetched": fetch_stats.bytes_fetched,
            "requests": fetch_stats.requests,
            "retries": fetch_stats.retries,
            "fetch_failures": self.stats.fetch_failures,
            "verify_failures": self.stats.verify_failures,
            "tree_blocks_fetched": self.stats.tree_blocks_fetched,
            "bad_chunks": sorted(self._bad_chunks),
            "partial_chunks": self._streams.partial_indices(),
            "fetch_latency": self.stats.fetch_latency.summary_ms(),
            "background": self.background.snapshot(),
        }

    async def aclose(self) -> None:
        await self.reader.aclose()

    # -- background loads (lazyfs/image/prefetch.py) -------------------------------------------

    def needs_fetch(self, index: int) -> bool:
        """Whether chunk `index` is neither cached, loading, streaming, known bad, nor failing
        to fetch."""
        key = self._key(index)
        return not (index in self._bad_chunks or index in self._streams or key in self.cache
                    or self.cache.is_loading(key) or trio.current_time() < self._failing_until)

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
        if self._streamer is not None:
            self._streams.open(claimed)
        return claimed

    async def load_claimed(self, run: list[int], reason: str,
                           limiter: trio.CapacityLimiter) -> None:
        """Load chunks claimed by `claim_for_background`, under the caller's `limiter`."""
        streams = self._streams.of(run) if self._streamer is not None else None
        await self._load_run(run, reason, streams, limiter)

    # -- loading -----------------------------------------------------------------------------

    def _key(self, chunk_index: int) -> Hashable:
        return (self._content_key, chunk_index)

    def _claim(self, indices: range, reason: str) -> dict[int, bytes]:
        """Start loading the chunks of `indices` that are neither cached, nor loading, nor
        streaming; return those that are cached. Raises ImageReadError for a chunk that
        failed before, or while the source is failing (the loads claimed so far start)."""
        found: dict[int, bytes] = {}
        claimed: list[int] = []
        try:
            for index in indices:
                if index in self._bad_chunks:
                    raise ImageReadError(f"chunk {index} failed verification earlier")
                if index in self._streams:
                    continue
                key = self._key(index)
                data = self.cache.get(key)
                if data is not None:
                    found[index] = data
                    self._record(chunk=index, event="hit")
                    continue
                if self.cache.claim(key):
                    claimed.append(index)
        finally:
            # Chunks claimed before a failure must still be loaded: others may wait for them.
            self._start_loads(claimed, reason)
        return found

    def _start_loads(self, claimed: list[int], reason: str) -> None:
        for run in self.metadata.frame_runs(claimed, self.tuning.coalesce_bytes):
            streams = self._streams.open(run) if self._streamer is not None else None
            if reason in ON_DEMAND:
                self.demand.begin()  # now, not when the task starts: background loads yield
            self._nursery.start_soon(self._load_run, run, reason, streams)

    async def _piece(self, index: int, start: int, stop: int, data: bytes | None) -> bytes:
        """Bytes `[start, stop)` of chunk `index`: from `data`, its stream or its load."""
        while data is None:
            stream = self._streams.get(index)
            if stream is not None:
                return await stream.read(start, stop)
            data = await self.cache.wait(self._key(index))
            if data is None:  # evicted between its load and this wait (a tiny cache)
                data = self._claim(range(index, index + 1), "read").get(index)
        return memoryview(data)[start:stop].tobytes()

    def _schedule_readahead(self, offset: int, size: int, indices: range) -> None:
        table = self.metadata.table
        ahead = self._sequential.ahead(offset, min(offset + size, self.size), indices,
                                       self.tuning.readahead_for(table.chunk_size))
        claimed = [index for index in ahead if index not in self._bad_chunks
                   and index not in self._streams and self.cache.claim(self._key(index))]
        self.stats.readahead_chunks += len(claimed)
        self._start_loads(claimed, "readahead")

    async def _load_run(self, run: list[int], reason: str,
                        streams: dict[int, FrameStream] | None = None,
                        limiter: trio.CapacityLimiter | None = None) -> None:
        """Load adjacent chunks: from the disk cache, else fetched, verified and decoded (as
        partial frames into `streams`, else whole); complete or fail every claimed key, and
        every stream of the run."""
        unresolved = set(run)

        def on_done(done: FrameDone) -> None:
            unresolved.discard(done.index)
            self._frame_done(done, reason, streams)

        try:
            problem = None
            if self.disk is not None:
                run = await self._load_from_disk(run, unresolved, streams)
                problem = await self.disk.source_problem() if run else None
            if run and trio.current_time() < self._failing_until:
                problem = f"source failing: {self._last_fetch_error}"
            if problem is not None:  # fail at once: the source is known not to answer
                self._fail_run(run, problem)
                unresolved.clear()
                return
            async with limiter or self._fetch_limiter:
                for part in self.metadata.frame_runs(run, self.tuning.coalesce_bytes):
                    began = time.monotonic()
                    try:
                        if streams is not None:
                            assert self._streamer is not None
                            await self._streamer.stream(part, streams, on_done)
                        else:
                            await self._whole.load(part, on_done)
                    except FetchError as exc:
                        self._fetch_failed(sorted(unresolved), str(exc))
                        unresolved.clear()
                        return
                    except StoppedEarly:
                        return
                    self.stats.fetch_latency.add(time.monotonic() - began)
                    self.stats.chunk_fetches += 1
        finally:
            if reason in ON_DEMAND:
                self.demand.end()
            # Whatever happened (cancellation at unmount included), no waiter is left hanging.
            # Only keys this run still holds: one it completed may be claimed anew by now.
            for index in sorted(unresolved):
                error = ImageReadError(f"chunk {index} not loaded")
                self.cache.fail(self._key(index), error)
                if streams is not None:
                    streams[index].fail(error)
                    self._streams.forget(streams[index])

    async def _load_from_disk(self, run: list[int], unresolved: set[int],
                              streams: dict[int, FrameStream] | None) -> list[int]:
        """Complete the chunks of `run` that the disk cache holds, each checked again; return
        the others. A copy that fails is dropped, to be fetched."""
        disk = self.disk
        assert disk is not None
        rest: list[int] = []

        async def load(index: int) -> None:
            found = await self._whole.from_disk(disk, index)
            if found is None:
                rest.append(index)
                return
            data, frame_bytes = found
            self.stats.chunks_from_disk += 1
            self.cache.complete(self._key(index), data)
            unresolved.discard(index)
            if streams is not None:  # its readers wait on the stream
                self._streams.finish(streams[index], data)
            self._record(chunk=index, event="disk", bytes=frame_bytes)

        async with trio.open_nursery() as nursery:  # the chunks of a run side by side
            for index in run:
                nursery.start_soon(load, index)
        return sorted(rest)

    def _frame_done(self, done: FrameDone, reason: str,
                    streams: dict[int, FrameStream] | None) -> None:
        """Take a frame's outcome: cache a verified chunk, remember a bad one, keep a chunk
        with holes for its layer alone."""
        index = done.index
        stream = streams[index] if streams is not None else None
        if done.reason is not None:
            if stream is not None:
                self._streams.forget(stream)
            self._mark_bad([index], done.reason)
            return
        self.stats.chunks_fetched.add(index)
        self._record(chunk=index, event="fetch", reason=reason, bytes=done.frame_bytes,
                     latency_ms=round(done.latency_s * 1000, 3))
        if stream is None or not stream.holes:
            data = done.data if stream is None else stream.complete()
            assert data is not None
            self.cache.complete(self._key(index), data)
            if stream is not None:
                self._streams.forget(stream)
            if self.disk is not None and done.frame is not None:
                needed = chunk_hash_blocks(self.metadata, index)
                known = self.hash_blocks.known(needed) if self.hash_blocks is not None else {}
                self.disk.save(index, done.frame, known)
            return
        stream.complete()
        self.stats.verify_failures += 1
        self.cache.fail(self._key(index), ImageReadError(f"chunk {index}: partly bad"))
        self._streams.keep_partial(stream)

    def _fetch_failed(self, run: list[int], message: str) -> None:
        """The one line for a failed fetch (the reader raises, it does not log): the message
        names the URL or file, the byte range and the last status or error."""
        self.stats.fetch_failures += 1
        self._failing_until = trio.current_time() + self.tuning.failure_holdoff_s
        self._last_fetch_error = message
        if run:
            log.warning("layer %s: chunks %d-%d: fetch failed: %s", self.name, run[0], run[-1],
                        message)
        self._fail_run(run, f"fetch failed: {message}")

    def _mark_bad(self, run: list[int], reason: str) -> None:
        """Remember chunks that failed a check, log once, and fail their waiters."""
        for index in run:
            if index not in self._bad_chunks:
                self._bad_chunks[index] = reason
                self.stats.verify_failures += 1
                start, _ = self.metadata.frame_range(index)
                log.error("layer %s: chunk %d (frame at blob offset %d): verification failed: "
                          "%s", self.name, index, start, reason)
                self._record(chunk=index, event="bad")
        self._fail_run(run, f"verification failed: {reason}")

    def _fail_run(self, run: list[int], reason: str) -> None:
        for index in run:
            error = ImageReadError(f"chunk {index}: {reason}")
            self.cache.fail(self._key(index), error)
            stream = self._streams.get(index)
            if stream is not None and not stream.done:
                stream.fail(error)
                self._streams.forget(stream)

    def _record(self, **fields: Any) -> None:
        if self._trace is not None:
            self._trace.record(layer=self.name, **fields)
