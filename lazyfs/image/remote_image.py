"""`RemoteImage.read(offset, size)`: the raw EROFS image of a remote layer, read at random.

A read maps to chunks; missing chunks are fetched by range (adjacent ones in one request up
to a cap), each frame is checked against its SHA-512 before it is decoded, the decoded size
must be exact, and every data block is checked against the authenticated dm-verity tree. Only
then do bytes reach the cache and the caller. Loads run in the mount's nursery, so a read that
is interrupted does not abandon a fetch other readers wait on, and unmount cancels them all.
With a disk cache (`disk_tier.LayerDisk`), a load looks there first: a frame read back is
checked again (`disk_tier.check_frame`), and a verified fetched frame is written back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import trio

from lazyfs.cache.memory import ChunkCache
from lazyfs.exception_groups import leaf_errors
from lazyfs.fetch.base import BlobReader
from lazyfs.fetch.errors import FetchError
from lazyfs.format.chunk_table import verify_frame
from lazyfs.format.errors import FormatError
from lazyfs.format.frames import decode_chunk_frame
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.verity_tree import (
    hash_blocks_needed,
    verify_data_blocks,
    verify_hash_blocks,
)
from lazyfs.image.demand import DemandGate
from lazyfs.image.disk_tier import LayerDisk, check_frame
from lazyfs.image.errors import ImageReadError, LayerOpenError
from lazyfs.image.keys import content_key
from lazyfs.image.readahead import SequentialReads
from lazyfs.image.stats import BackgroundStats, ImageStats, TraceWriter
from lazyfs.image.tuning import ImageTuning

log = logging.getLogger(__name__)


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
        tree_blocks: Mapping[int, bytes] | None = None,
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
        # Verified hash blocks, keyed by verity payload offset: bounded by the tree's size.
        self._tree_blocks: dict[int, bytes] = dict(tree_blocks or {})
        self._cpu_limiter = cpu_limiter or trio.CapacityLimiter(2)
        self.tuning = tuning = tuning or ImageTuning()
        self._fetch_limiter = trio.CapacityLimiter(tuning.parallel_fetches)
        self._trace = trace
        self._bad_chunks: dict[int, str] = {}
        self._failing_until = 0.0
        self._last_fetch_error = ""
        self._sequential = SequentialReads(metadata.table.chunk_size)
        self._content_key: Hashable = content_key(metadata, reader.source)
        self.stats = ImageStats(chunk_count=metadata.table.chunk_count)
        # Background loads (lazyfs/image/prefetch.py) wait while `demand` counts fetches;
        # `on_read` (a recorder's) sees the chunks of every read.
        self.demand = DemandGate()
        self.background = BackgroundStats()
        self.on_read: Callable[[range], None] | None = None
        table = metadata.table
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
        chunks = await self._get_chunks(indices)
        self._schedule_readahead(offset, size, indices)
        end = min(offset + size, self.size)
        # Copy only the requested bytes of each chunk, not whole chunks.
        pieces = []
        for index in indices:
            base = index * table.chunk_size
            view = memoryview(chunks[index])
            pieces.append(view[max(offset - base, 0):min(end - base, len(view))])
        return pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)

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
            "fetch_latency": self.stats.fetch_latency.summary_ms(),
            "background": self.background.snapshot(),
        }

    async def aclose(self) -> None:
        await self.reader.aclose()

    # -- background loads (lazyfs/image/prefetch.py) -------------------------------------------

    def needs_fetch(self, index: int) -> bool:
        """Whether chunk `index` is neither cached, loading, known bad, nor failing to fetch."""
        key = self._key(index)
        return not (index in self._bad_chunks or key in self.cache or self.cache.is_loading(key)
                    or trio.current_time() < self._failing_until)

    def has_chunk(self, index: int) -> bool:
        """Whether chunk `index` is in the memory cache."""
        return self._key(index) in self.cache

    def claim_for_background(self, run: list[int]) -> list[int]:
        """Claim the chunks of `run` (adjacent) from the first that needs a fetch to the next
        that does not; the caller must `load_claimed` them."""
        claimed: list[int] = []
        for index in run:
            if self.needs_fetch(index) and self.cache.claim(self._key(index)):
                claimed.append(index)
            elif claimed:
                break
        return claimed

    async def load_claimed(self, run: list[int], reason: str,
                           limiter: trio.CapacityLimiter) -> None:
        """Load chunks claimed by `claim_for_background`, under the caller's `limiter`."""
        await self._load_run(run, reason, limiter)

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
                if index in self._bad_chunks:
                    # Chunks claimed before this one must still be loaded: others may wait.
                    self._start_reads(claimed)
                    raise ImageReadError(f"chunk {index} failed verification earlier")
                data = self.cache.get(self._key(index))
                if data is not None:
                    found[index] = data
                    self._record(chunk=index, event="hit")
                    continue
                if self.cache.claim(self._key(index)):
                    claimed.append(index)
            self._start_reads(claimed)
            for index in indices:
                if index in found:
                    continue
                data = await self.cache.wait(self._key(index))
                if data is not None:
                    found[index] = data
            if len(found) == len(indices):
                return found
            # Evicted between its load and our wait (a tiny cache): go round again.

    def _start_reads(self, claimed: list[int]) -> None:
        for run in self._runs(claimed):
            self.demand.begin()  # now, not when the task starts: background loads yield at once
            self._nursery.start_soon(self._load_run, run, "read")

    def _schedule_readahead(self, offset: int, size: int, indices: range) -> None:
        end = min(offset + size, self.size)
        readahead = self.tuning.readahead_for(self.metadata.table.chunk_size)
        if not self._sequential.observe(offset, end, indices) or not readahead:
            return
        last = min(indices[-1] + readahead, self.metadata.table.chunk_count - 1)
        claimed = [
            index for index in range(indices[-1] + 1, last + 1)
            if index not in self._bad_chunks and self.cache.claim(self._key(index))
        ]
        for run in self._runs(claimed):
            self.stats.readahead_chunks += len(run)
            self._nursery.start_soon(self._load_run, run, "readahead")

    def _runs(self, indices: list[int]) -> list[list[int]]:
        """Group chunk indices into runs of adjacent frames, each at most the coalesce cap."""
        runs: list[list[int]] = []
        run_start = 0
        for index in indices:
            start, end = self.metadata.frame_range(index)
            cap = self.tuning.coalesce_bytes
            if runs and runs[-1][-1] + 1 == index and end - run_start <= cap:
                runs[-1].append(index)
            else:
                runs.append([index])
                run_start = start
        return runs

    async def _load_run(self, run: list[int], reason: str,
                        limiter: trio.CapacityLimiter | None = None) -> None:
        """Fetch, verify and decode adjacent chunks; complete or fail every claimed key."""
        unresolved = set(run)
        try:
            problem = None
            if self.disk is not None:
                run = await self._load_from_disk(run, unresolved)
                problem = await self.disk.source_problem() if run else None
            if run and trio.current_time() < self._failing_until:
                problem = f"source failing: {self._last_fetch_error}"
            if problem is not None:  # fail at once: the source is known not to answer
                self._fail_run(run, problem)
                unresolved.clear()
                return
            async with limiter or self._fetch_limiter:
                for part in self._runs(run):
                    await self._fetch_and_verify(part, reason, unresolved)
        finally:
            if reason == "read":
                self.demand.end()
            # Whatever happened (cancellation at unmount included), no waiter is left hanging.
            # Only keys this run still holds: one it completed may be claimed anew by now.
            for index in sorted(unresolved):
                self.cache.fail(self._key(index), ImageReadError(f"chunk {index} not loaded"))

    async def _fetch_and_verify(self, run: list[int], reason: str,
                                unresolved: set[int]) -> None:
        """Load `run`, removing from `unresolved` each index whose key was completed or
        failed (after that, the key may belong to another loader)."""
        start = self.metadata.frame_range(run[0])[0]
        end = self.metadata.frame_range(run[-1])[1]
        began = time.monotonic()
        blob = b""
        tree_failures: dict[int, str] = {}

        async def fetch_frames() -> None:
            nonlocal blob
            blob = await self.reader.read(start, end - start)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch_frames)
                nursery.start_soon(self._ensure_tree_blocks, run, tree_failures)
        except BaseExceptionGroup as group:
            errors = leaf_errors(group)
            if not errors or not all(isinstance(e, FetchError | FormatError) for e in errors):
                raise
            bad = [str(error) for error in errors if isinstance(error, FormatError)]
            if bad:
                self._mark_bad(run, f"dm-verity tree: {'; '.join(bad)}")
            else:
                self.stats.fetch_failures += 1
                # The one line for this failure (the reader raises, it does not log): the
                # message names the URL or file, the byte range and the last status or error.
                message = "; ".join(str(error) for error in errors)
                self._failing_until = trio.current_time() + self.tuning.failure_holdoff_s
                self._last_fetch_error = message
                log.warning("layer %s: chunks %d-%d: fetch failed: %s", self.name, run[0],
                            run[-1], message)
                self._fail_run(run, f"fetch failed: {message}")
            return
        latency = time.monotonic() - began
        self.stats.fetch_latency.add(latency)
        self.stats.chunk_fetches += 1
        for index, message in sorted(tree_failures.items()):
            self._mark_bad([index], f"dm-verity tree: {message}")
            unresolved.discard(index)
        for index in run:
            if index in tree_failures:
                continue
            frame_start, frame_end = self.metadata.frame_range(index)
            frame = blob[frame_start - start:frame_end - start]
            try:
                data = await trio.to_thread.run_sync(
                    _verify_and_decode, self.metadata, self._level0_blocks(index), index, frame,
                    frame_start,
                    limiter=self._cpu_limiter,
                )
            except FormatError as exc:
                self._mark_bad([index], str(exc))
                unresolved.discard(index)
                continue
            self.stats.chunks_fetched.add(index)
            self.cache.complete(self._key(index), data)
            unresolved.discard(index)
            if self.disk is not None:
                self.disk.save(index, frame, self._level0_blocks(index))
            self._record(chunk=index, event="fetch", reason=reason, bytes=len(frame),
                         latency_ms=round(latency * 1000, 3))

    async def _load_from_disk(self, run: list[int], unresolved: set[int]) -> list[int]:
        """Complete the chunks of `run` that the disk cache holds, each checked again; return
        the others. A copy that fails is dropped, to be fetched."""
        disk = self.disk
        assert disk is not None
        rest: list[int] = []

        async def load(index: int) -> None:
            found = await disk.load(index, self._tree_blocks, self._hash_blocks_for([index]),
                                    self._cpu_limiter)
            if found is None:
                rest.append(index)
                return
            frame, blocks = found
            try:
                data = await trio.to_thread.run_sync(
                    check_frame, self.metadata, blocks, index, frame,
                    self.metadata.frame_range(index)[0], limiter=self._cpu_limiter,
                )
            except FormatError as exc:
                await disk.forget(index, str(exc))
                rest.append(index)
                return
            self._tree_blocks.update(blocks)
            self.stats.chunks_from_disk += 1
            self.cache.complete(self._key(index), data)
            unresolved.discard(index)
            self._record(chunk=index, event="disk", bytes=len(frame))

        async with trio.open_nursery() as nursery:  # the chunks of a run side by side
            for index in run:
                nursery.start_soon(load, index)
        return sorted(rest)

    def _hash_blocks_for(self, run: list[int]) -> list[int]:
        """Payload offsets of the hash blocks (all levels, top first) that cover `run`."""
        geometry = self.metadata.verity
        if geometry is None or self.metadata.root is None or not geometry.levels:
            return []
        table = self.metadata.table
        block_size = geometry.superblock.data_block_size
        first_block = run[0] * table.chunk_size // block_size
        last_byte = min((run[-1] + 1) * table.chunk_size, self.size)
        count = -(-last_byte // block_size) - first_block
        return hash_blocks_needed(geometry, first_block, count)

    def _level0_blocks(self, chunk_index: int) -> dict[int, bytes]:
        """A private copy of the verified blocks for one chunk: worker threads share no state."""
        return {offset: self._tree_blocks[offset]
                for offset in self._hash_blocks_for([chunk_index])
                if offset in self._tree_blocks}

    async def _ensure_tree_blocks(self, run: list[int], failures: dict[int, str]) -> None:
        """Fetch and authenticate the hash blocks covering `run` that are not yet verified.

        For a run of several chunks, those whose blocks do not verify are put in `failures`
        (index: reason) and the others stay usable; for a single chunk, raises IntegrityError.
        """
        needed = self._hash_blocks_for(run)
        missing = [offset for offset in needed if offset not in self._tree_blocks]
        if not missing:
            return
        geometry = self.metadata.verity
        assert geometry is not None and self.metadata.root is not None
        hash_block_size = geometry.superblock.hash_block_size
        fetched: dict[int, bytes] = {}
        for group in _contiguous(missing, hash_block_size):
            span = await self.reader.read(self.metadata.verity_payload_offset + group[0],
                                          len(group) * hash_block_size)
            self.stats.tree_blocks_fetched += len(group)
            for position, offset in enumerate(group):
                fetched[offset] = span[position * hash_block_size:
                                       (position + 1) * hash_block_size]
        known = {offset: self._tree_blocks[offset] for offset in needed
                 if offset in self._tree_blocks}
        candidates = {**known, **fetched}
        root = self.metadata.root
        try:
            newly = await trio.to_thread.run_sync(
                verify_hash_blocks, geometry, candidates, root, set(known),
                limiter=self._cpu_limiter,
            )
        except FormatError:
            if len(run) == 1:
                raise
            # One bad block must not condemn the chunks of the run it does not cover.
            newly = set()
            for index in run:
                own = {offset: candidates[offset] for offset in self._hash_blocks_for([index])}
                try:
                    newly |= await trio.to_thread.run_sync(
                        verify_hash_blocks, geometry, own, root, set(known),
                        limiter=self._cpu_limiter,
                    )
                except FormatError as exc:
                    failures[index] = str(exc)
        for offset in newly:
            self._tree_blocks[offset] = candidates[offset]

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
            self.cache.fail(self._key(index), ImageReadError(f"chunk {index}: {reason}"))

    def _record(self, **fields: Any) -> None:
        if self._trace is not None:
            self._trace.record(layer=self.name, **fields)


def _contiguous(offsets: list[int], step: int) -> list[list[int]]:
    groups: list[list[int]] = []
    for offset in sorted(offsets):
        if groups and groups[-1][-1] + step == offset:
            groups[-1].append(offset)
        else:
            groups.append([offset])
    return groups


def _verify_and_decode(metadata: BlobMetadata, tree_blocks: Mapping[int, bytes],
                       chunk_index: int, frame: bytes, frame_offset: int) -> bytes:
    """Runs in a worker thread: frame SHA-512, exact decode, every data block against the tree.

    Raises IntegrityError / FrameDecodeError naming the chunk and offsets.
    """
    table = metadata.table
    verify_frame(table, chunk_index, frame, frame_offset)
    data = decode_chunk_frame(frame, table.decoded_size(chunk_index), chunk_index, frame_offset)
    geometry = metadata.verity
    if geometry is not None and metadata.root is not None:
        first_block = chunk_index * table.chunk_size // geometry.superblock.data_block_size
        verify_data_blocks(geometry, first_block, data, tree_blocks, metadata.root)
    return data
