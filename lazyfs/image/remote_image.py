"""`RemoteImage.read(offset, size)`: the raw EROFS image of a remote layer, read at random.

A read maps to chunks; missing chunks are claimed in the cache and loaded by the layer's
ChunkLoader (`lazyfs.image.loader`: fetch by range, adjacent ones in one request up to a cap;
each frame checked against its SHA-512, decoded to its exact size, every data block checked
against the authenticated dm-verity tree). Only then do bytes reach the cache and the caller.
Loads run in the mount's nursery, so a read that is interrupted does not abandon a fetch
other readers wait on, and unmount cancels them all.

A read returns or fails within the read timeout, whatever loads its chunks. A chunk that
failed recently fails at once (`lazyfs.image.health`: per chunk, for a while, not per layer),
unless the disk cache (`lazyfs.image.disk_tier`) may hold it: a load asks the disk first.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any

import trio

from lazyfs.cache.memory import ChunkCache
from lazyfs.fetch.base import BlobReader
from lazyfs.format.layout import BlobMetadata
from lazyfs.image.disk_tier import LayerDisk
from lazyfs.image.errors import ImageReadError
from lazyfs.image.keys import content_key
from lazyfs.image.loader import ChunkLoader
from lazyfs.image.stats import ImageStats, TraceWriter
from lazyfs.image.tuning import ImageTuning

log = logging.getLogger(__name__)

READAHEAD_TRIGGER_BYTES = 1024 * 1024


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
        tree_blocks: Mapping[int, bytes] | None = None,
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
        # Readahead starts once this many bytes were read back to back: a file streamed
        # in order, not two small files that happen to share a chunk.
        self._readahead_trigger_bytes = min(metadata.table.chunk_size, READAHEAD_TRIGGER_BYTES)
        self._last_read_end = -1
        self._sequential_bytes = 0
        self._content_key: Hashable = content_key(metadata, reader.source)
        self.stats = ImageStats(chunk_count=metadata.table.chunk_count)
        self.loader = ChunkLoader(
            name, [reader, *alternates], metadata, cache, self._key, self.stats, tuning,
            tree_blocks=tree_blocks, cpu_limiter=cpu_limiter, record=self._record, disk=disk,
        )
        if source_probe is not None:
            self.loader.probe_source(nursery, source_probe)

    @property
    def size(self) -> int:
        return self.metadata.image_size

    async def read(self, offset: int, size: int) -> bytes:
        """Return verified image bytes `[offset, offset + size)`, clipped at the end of the image.

        Raises ImageReadError (its cause logged once) when a chunk cannot be fetched or
        verified, or not within the read timeout.
        """
        table = self.metadata.table
        indices = table.chunks_for_range(offset, size)
        if not indices:
            return b""
        chunks: dict[int, bytes] | None = None
        # The one bound on a read, whatever loads its chunks and however.
        with trio.move_on_after(self.tuning.read_timeout_s):
            chunks = await self._get_chunks(indices)
        if chunks is None:
            log.debug("layer %s: a read of chunks %d-%d gave up after %g s", self.name,
                      indices[0], indices[-1], self.tuning.read_timeout_s)
            raise ImageReadError(f"chunks {indices[0]}-{indices[-1]}: not loaded within "
                                 f"{self.tuning.read_timeout_s:g} s")
        self._schedule_readahead(offset, size, indices)
        end = min(offset + size, self.size)
        # Copy only the requested bytes of each chunk, not whole chunks.
        pieces = []
        for index in indices:
            base = index * table.chunk_size
            view = memoryview(chunks[index])
            pieces.append(view[max(offset - base, 0):min(end - base, len(view))])
        return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)

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
            "fetch_latency": self.stats.fetch_latency.summary_ms(),
            **self.loader.snapshot(),
        }

    async def aclose(self) -> None:
        for reader in self.loader.readers:
            await reader.aclose()

    # -- loading -----------------------------------------------------------------------------

    def _key(self, chunk_index: int) -> Hashable:
        return (self._content_key, chunk_index)

    async def _get_chunks(self, indices: range) -> dict[int, bytes]:
        found: dict[int, bytes] = {}
        while True:
            claimed: list[int] = []
            for index in indices:
                if index in found:
                    continue
                data = self.cache.get(self._key(index))
                if data is not None:
                    found[index] = data
                    self._record(chunk=index, event="hit")
                    continue
                if self.cache.is_loading(self._key(index)):
                    continue
                refusal = self.loader.early_refusal(index)
                if refusal is not None:
                    # Chunks claimed before this one must still be loaded: others may wait.
                    self._start_loads(claimed, "read")
                    raise ImageReadError(f"chunk {index}: {refusal}")
                if self.cache.claim(self._key(index)):
                    claimed.append(index)
            self._start_loads(claimed, "read")
            for index in indices:
                if index in found:
                    continue
                data = await self.cache.wait(self._key(index))
                if data is not None:
                    found[index] = data
            if len(found) == len(indices):
                return found
            # Evicted between its load and our wait (a tiny cache): go round again.

    def _schedule_readahead(self, offset: int, size: int, indices: range) -> None:
        end = min(offset + size, self.size)
        if offset == self._last_read_end:
            self._sequential_bytes += end - offset
        else:
            self._sequential_bytes = end - offset
        self._last_read_end = end
        readahead = self.tuning.readahead_chunks
        if self._sequential_bytes < self._readahead_trigger_bytes or not readahead:
            return
        last = min(indices[-1] + readahead, self.metadata.table.chunk_count - 1)
        claimed = [
            index for index in range(indices[-1] + 1, last + 1)
            if self.loader.early_refusal(index) is None and self.cache.claim(self._key(index))
        ]
        self.stats.readahead_chunks += len(claimed)
        self._start_loads(claimed, "readahead")

    def _start_loads(self, claimed: list[int], reason: str) -> None:
        """Load claimed chunks in the mount's nursery, in runs of adjacent frames, each at
        most the coalesce cap."""
        runs: list[list[int]] = []
        run_start = 0
        for index in claimed:
            start, end = self.metadata.frame_range(index)
            if runs and runs[-1][-1] + 1 == index and end - run_start <= self.tuning.coalesce_bytes:
                runs[-1].append(index)
            else:
                runs.append([index])
                run_start = start
        for run in runs:
            self._nursery.start_soon(self.loader.load_run, run, reason)

    def _record(self, **fields: Any) -> None:
        if self._trace is not None:
            self._trace.record(layer=self.name, **fields)

