"""Loading chunks of one layer: disk cache or fetch → verify → decode → cache, with the
failure policy of `lazyfs.layer.health`.

A load takes adjacent chunks the caller claimed in the cache (`ChunkCache.claim`) and
resolves every one of them, whatever happens: complete with verified bytes, or fail. It
takes what the disk cache holds first (checked again; a disk hit is a success like a
fetch), fails at once the rest that must not be fetched now (`refusal`), and fetches the
others' frames in one request (with the neighbours whose bytes straddling dm-verity
blocks need, unless they are cached) and the hash blocks that cover them, checks each
frame's digest, decodes it and checks its data blocks. A chunk that fails a check is fetched
again, alone, up to `refetches` times, cycling through the sources (a mirror, then the
registry), before it is reported bad; a failed fetch is tried on the next source before the
chunks are failed and held off. A load gives up after the read timeout, and at once when
unmount cancels it. Each frame fetched and verified is written back to the disk cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from typing import Any

import trio

from lazyfs.cache.memory import ChunkCache
from lazyfs.exception_groups import leaf_errors
from lazyfs.fetch.base import BlobReader, StreamingReader
from lazyfs.fetch.errors import FetchError, SourceUnreachableError
from lazyfs.format.errors import FormatError, IntegrityError
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.open_plan import chunk_hash_blocks, contiguous, data_blocks
from lazyfs.layer.disk_tier import LayerDisk
from lazyfs.layer.errors import FetchAttemptFailed, ImageReadError
from lazyfs.layer.frame_stream import FrameStream, LayerStreams
from lazyfs.layer.hash_blocks import HashBlockStore
from lazyfs.layer.health import LayerHealth
from lazyfs.layer.stats import ImageStats
from lazyfs.layer.streamed import stream_once
from lazyfs.layer.tuning import ImageTuning
from lazyfs.layer.verify import block_context, check_blocks, decode_frame

log = logging.getLogger(__name__)


class ChunkLoader:
    """Loads the chunks of one layer into the shared cache (keys from `key_of`)."""

    def __init__(
        self,
        name: str,
        readers: list[BlobReader],
        metadata: BlobMetadata,
        cache: ChunkCache,
        key_of: Callable[[int], Hashable],
        stats: ImageStats,
        tuning: ImageTuning,
        *,
        cpu_limiter: trio.CapacityLimiter | None = None,
        record: Callable[..., None] | None = None,
        disk: LayerDisk | None = None,
    ) -> None:
        self.name = name
        self.readers = readers
        self.metadata = metadata
        self.cache = cache
        self.stats = stats
        self.tuning = tuning
        self.health = LayerHealth(name, tuning)
        self._key = self.key_of = key_of
        self._cpu_limiter = cpu_limiter or trio.CapacityLimiter(2)
        # The dm-verity tree's verified hash blocks, fetched as loads need them.
        self.hash_blocks = (
            HashBlockStore(readers[0], metadata, stats, self._cpu_limiter, cache)
            if metadata.verity is not None and metadata.root is not None else None
        )
        # Frames streaming in (partial frames), and partial chunks kept, by chunk index:
        # with dm-verity, when no data block straddles two chunks.
        self.streams = LayerStreams(name)
        self.streaming = (
            self.hash_blocks is not None and tuning.partial_frames
            and metadata.table.chunk_size % self.hash_blocks.geometry.superblock.data_block_size
            == 0
        )
        self._fetch_limiter = trio.CapacityLimiter(tuning.parallel_fetches)
        self._record = self.record = record or (lambda **fields: None)
        self.cpu_limiter = self._cpu_limiter
        # The cancel scopes of the loads in flight, so that unmount can end them at once.
        self._loads: set[trio.CancelScope] = set()
        self._closing = False
        self.disk = disk
        self._probing: trio.Event | None = None  # set when a probe of the source has told
        # Chunks loading only because a read may want them soon (readahead, and those that
        # follow a miss): a failed fetch does not hold them off, nobody asked for them yet.
        # A read that waits for one takes it out (RemoteImage._claim): the kernel retries a
        # failed read at once, and that retry must fail at once, not wait for a new fetch.
        self.speculative: set[int] = set()

    def refusal(self, chunk_index: int) -> str | None:
        """Why a load of `chunk_index` must not be tried now (unmounting, bad, held off,
        source down), or None."""
        if self._closing:
            return "the mount is going down"
        sources = [reader.source for reader in self.readers]
        return self.health.refusal(chunk_index, sources, time.monotonic())

    def early_refusal(self, chunk_index: int) -> str | None:
        """`refusal`, for a read about to claim the chunk: None while the disk cache may hold
        it (a load asks the disk first, then refuses what it lacks), except at unmount."""
        if self.disk is not None and not self._closing and self.disk.may_hold(chunk_index):
            return None
        return self.refusal(chunk_index)

    def probe_source(self, nursery: trio.Nursery, probe: Callable[[], Awaitable[None]],
                     delay_s: float = 0.0) -> None:
        """Ask the first source once, in the background, `delay_s` from now, whether it
        answers (for a layer opened from the disk cache alone, which has not asked it yet).
        Loads that would fetch while the probe is under way wait for its answer; a source
        that does not answer is down (`health`)."""
        nursery.start_soon(self._run_probe, probe, delay_s)

    async def _run_probe(self, probe: Callable[[], Awaitable[None]], delay_s: float) -> None:
        await trio.sleep(delay_s)
        self._probing = done = trio.Event()
        source = self.readers[0].source
        try:
            await probe()
        except FetchError as exc:
            self.health.source_unreachable(source, str(exc), time.monotonic())
        else:
            self.health.answered(source)
        finally:
            self._probing = None
            done.set()

    def cancel(self) -> None:
        """End every load in flight now and refuse new ones (unmount)."""
        self._closing = True
        for scope in self._loads:
            scope.cancel()

    def blocks_for(self, chunk_index: int) -> dict[int, bytes]:
        """A private copy of the verified hash blocks over one chunk (for worker threads)."""
        if self.hash_blocks is None:
            return {}
        return self.hash_blocks.known(chunk_hash_blocks(self.metadata, chunk_index))

    def fail(self, index: int, error: ImageReadError) -> None:
        """Fail chunk `index`'s waiters: its cache key, and its stream if one is open."""
        self.cache.fail(self._key(index), error)
        stream = self.streams.get(index)
        if stream is not None and not stream.done:
            stream.fail(error)
            self.streams.forget(stream)

    async def load_run(self, run: list[int], reason: str,
                       streams: dict[int, FrameStream] | None = None,
                       limiter: trio.CapacityLimiter | None = None,
                       deadline: float | None = None) -> None:
        """Fetch, verify and decode adjacent claimed chunks (as partial frames into
        `streams` when given); complete or fail every key by `deadline` (trio time; by
        default the read timeout from now: a read that starts a load passes its own), or at
        once when cancelled for unmount. At most `limiter`'s fetches at a time (waiting for
        one counts against the deadline)."""
        unresolved = set(run)
        if deadline is None:
            deadline = trio.current_time() + self.tuning.read_timeout_s
        scope = trio.CancelScope(deadline=deadline)
        self._loads.add(scope)
        try:
            with scope:
                if self._closing:
                    scope.cancel()
                rest = await self._load_from_disk(run, unresolved)
                rest = await self._refuse(rest, unresolved)
                for part in contiguous(rest, 1):  # no wait behind fetches when none is needed
                    async with limiter or self._fetch_limiter:
                        await self._fetch_and_verify(part, reason, unresolved, streams)
            if scope.cancelled_caught and unresolved and not self._closing:
                message = (f"no complete answer within {self.tuning.read_timeout_s:g} s "
                           "(the read timeout)")
                self._fetch_failed(sorted(unresolved), message)
                unresolved.clear()
        finally:
            self._loads.discard(scope)
            self.speculative.difference_update(run)
            # Whatever happened (cancellation at unmount included), no waiter is left hanging.
            # Only keys this run still holds: one it completed may be claimed anew by now.
            for index in sorted(unresolved):
                self.fail(index, ImageReadError(f"chunk {index} not loaded"))

    async def _load_from_disk(self, run: list[int], unresolved: set[int]) -> list[int]:
        """Complete the chunks of `run` that the disk cache holds, each checked again, side
        by side; return the others."""
        disk = self.disk
        if disk is None:
            return run
        rest: list[int] = []

        async def load(index: int) -> None:
            found = await disk.load_chunk(index, self.blocks_for(index),
                                          chunk_hash_blocks(self.metadata, index),
                                          self._cpu_limiter)
            if found is None:
                rest.append(index)
                return
            data, frame_size, blocks = found
            if self.hash_blocks is not None:
                self.hash_blocks.adopt(blocks)
            self.stats.chunks_from_disk += 1
            self.cache.complete(self._key(index), data)
            stream = self.streams.get(index)
            if stream is not None:  # its readers wait on the stream
                self.streams.finish(stream, data)
            unresolved.discard(index)
            self.health.loaded([index])
            self._record(chunk=index, event="disk", bytes=frame_size)

        async with trio.open_nursery() as nursery:
            for index in run:
                nursery.start_soon(load, index)
        return sorted(rest)

    async def _refuse(self, run: list[int], unresolved: set[int]) -> list[int]:
        """Fail at once the chunks of `run` that must not be fetched now (`refusal`), once a
        probe of the source under way has told; return the others."""
        if run and self._probing is not None:
            await self._probing.wait()
        rest = []
        for index in run:
            refusal = self.refusal(index)
            if refusal is None:
                rest.append(index)
            else:
                self.fail(index, ImageReadError(f"chunk {index}: {refusal}"))
                unresolved.discard(index)
        return rest

    async def _fetch_and_verify(self, run: list[int], reason: str, unresolved: set[int],
                                streams: dict[int, FrameStream] | None = None) -> None:
        """Load `run`; fetch each chunk that fails a check again, alone, up to `refetches`
        times (cycling through the sources), then report it bad. Removes from `unresolved`
        each index whose key was completed or failed (after that, the key may belong to
        another loader)."""
        failures = await self._load_from_sources(run, reason, unresolved, 0, streams)
        for attempt in range(1, self.tuning.refetches + 1):
            if not failures:
                return
            self.stats.refetches += len(failures)
            log.info("layer %s: chunks %s failed a check; fetching them again (%d of %d): %s",
                     self.name, sorted(failures), attempt, self.tuning.refetches,
                     "; ".join(sorted(set(failures.values()))))
            retried, failures = failures, {}
            for index in sorted(retried):
                failures.update(await self._load_from_sources([index], reason, unresolved,
                                                              attempt))
        for index, message in sorted(failures.items()):
            self._mark_bad(index, message)
            unresolved.discard(index)

    async def _load_from_sources(self, group: list[int], reason: str, unresolved: set[int],
                                 position: int,
                                 streams: dict[int, FrameStream] | None = None
                                 ) -> dict[int, str]:
        """Load adjacent chunks from the source at `position` (cycling), trying the next
        sources after a failed fetch. Returns the chunks that failed a check (index: reason);
        those whose fetch failed everywhere are failed and held off."""
        usable = self.health.usable([reader.source for reader in self.readers],
                                    time.monotonic())
        readers = [reader for reader in self.readers if reader.source in usable] or self.readers
        failed: FetchAttemptFailed | None = None
        for step in range(len(readers)):
            reader = readers[(position + step) % len(readers)]
            group = [index for index in group if index in unresolved]  # after a broken stream
            try:
                if (streams is not None and self.streaming
                        and isinstance(reader, StreamingReader)):
                    return await stream_once(self, reader, group, reason, unresolved,
                                             streams)
                return await self.load_whole(reader, group, reason, unresolved)
            except FetchAttemptFailed as exc:
                failed = exc
                if exc.unreachable:
                    self.health.source_unreachable(reader.source, exc.message,
                                                   time.monotonic())
                else:
                    self.health.answered(reader.source)
                if step + 1 < len(readers):
                    log.info("layer %s: chunks %d-%d: %s; trying the next source", self.name,
                             group[0], group[-1], exc.message)
        assert failed is not None
        if not group:
            return {}
        self._fetch_failed(group, failed.message, source_down=failed.unreachable)
        unresolved.difference_update(group)
        return {}

    async def load_whole(self, reader: BlobReader, group: list[int], reason: str,
                         unresolved: set[int]) -> dict[int, str]:
        """One fetch of `group` (with what its straddling dm-verity blocks need) from
        `reader`: complete each chunk that passes every check. Returns the chunks that failed
        one (index: reason). Raises FetchAttemptFailed."""
        metadata = self.metadata
        first, last, known = self._fetch_span(group)
        start = metadata.frame_range(first)[0]
        end = metadata.frame_range(last)[1]
        began = time.monotonic()
        blob = b""
        tree_failures: dict[int, str] = {}

        async def fetch_frames() -> None:
            nonlocal blob
            blob = await reader.read(start, end - start)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch_frames)
                nursery.start_soon(self._ensure_tree, reader, group, tree_failures)
        except BaseExceptionGroup as error_group:
            errors = leaf_errors(error_group)
            if not errors or not all(isinstance(e, FetchError | FormatError) for e in errors):
                raise
            fetch_errors = [error for error in errors if isinstance(error, FetchError)]
            if fetch_errors:
                # The reader raises without logging: the message names the URL or file, the
                # byte range and the last status or error.
                raise FetchAttemptFailed(
                    "; ".join(str(error) for error in fetch_errors),
                    all(isinstance(error, SourceUnreachableError) for error in fetch_errors),
                ) from None
            return dict.fromkeys(group, "dm-verity tree: " + "; ".join(map(str, errors)))
        latency = time.monotonic() - began
        self.stats.fetch_latency.add(latency)
        self.stats.chunk_fetches += 1
        failures = {index: f"dm-verity tree: {why}" for index, why in tree_failures.items()}
        decoded = dict(known)
        loaded: list[int] = []
        waiting = list(group)
        # Past `last` only cached neighbours: they are in `decoded` already.
        for index in range(first, block_context(metadata, group[-1]).stop):
            if index not in decoded and index not in failures:
                frame_start, frame_end = metadata.frame_range(index)
                try:
                    decoded[index] = await trio.to_thread.run_sync(
                        decode_frame, metadata, index,
                        blob[frame_start - start:frame_end - start], frame_start,
                        limiter=self._cpu_limiter)
                except FormatError as exc:
                    failures[index] = str(exc)
            # Each chunk is checked and completed as soon as the chunks its blocks share
            # bytes with are decoded (at once when chunks are whole blocks).
            while waiting and block_context(metadata, waiting[0]).stop <= index + 1:
                chunk = waiting.pop(0)
                if chunk not in failures:
                    await self._check_and_complete(chunk, decoded, failures, unresolved)
                if chunk not in failures:
                    loaded.append(chunk)
                    if self.disk is not None:
                        frame_start, frame_end = metadata.frame_range(chunk)
                        self.disk.save(chunk, blob[frame_start - start:frame_end - start],
                                       self.blocks_for(chunk))
                    self._record(chunk=chunk, event="fetch", reason=reason,
                                 bytes=_frame_size(metadata, chunk),
                                 latency_ms=round(latency * 1000, 3))
        self.health.loaded(loaded, reader.source)
        return {index: failures[index] for index in group if index in failures}

    async def _check_and_complete(self, index: int, decoded: Mapping[int, bytes],
                                  failures: dict[int, str], unresolved: set[int]) -> None:
        """Check the data blocks of a decoded chunk; complete its key, or add it to
        `failures`."""
        try:
            before, after = self._context(index, decoded, failures)
            await trio.to_thread.run_sync(
                check_blocks, self.metadata, self.blocks_for(index), index, decoded[index],
                before, after, limiter=self._cpu_limiter)
        except FormatError as exc:
            failures[index] = str(exc)
            return
        self.stats.chunks_fetched.add(index)
        self.cache.complete(self._key(index), decoded[index])
        unresolved.discard(index)

    async def _ensure_tree(self, reader: BlobReader, group: list[int],
                           failures: dict[int, str]) -> None:
        """Fetch and authenticate the hash blocks over `group` not yet verified; put the
        chunks under a block that does not verify in `failures`. Raises FetchError."""
        if self.hash_blocks is None:
            return
        self.hash_blocks.retry_bad([offset for index in group
                                    for offset in chunk_hash_blocks(self.metadata, index)])
        coverage = await self.hash_blocks.cover(*data_blocks(self.metadata, group),
                                                reader=reader)
        for index in group:
            failure = coverage.failure_in(*data_blocks(self.metadata, [index]))
            if failure is not None:
                failures[index] = failure

    def _fetch_span(self, group: list[int]) -> tuple[int, int, dict[int, bytes]]:
        """The chunks to fetch for `group`: (first, last, neighbours' bytes borrowed from
        the cache instead of fetched). Neighbours count where a dm-verity block straddles."""
        first = block_context(self.metadata, group[0]).start
        last = block_context(self.metadata, group[-1]).stop - 1
        known: dict[int, bytes] = {}
        while first < group[0] and (data := self.cache.peek(self._key(first))) is not None:
            known[first] = bytes(data)
            first += 1
        while last > group[-1] and (data := self.cache.peek(self._key(last))) is not None:
            known[last] = bytes(data)
            last -= 1
        return first, last, known

    def _context(self, index: int, decoded: Mapping[int, bytes],
                 failures: Mapping[int, str]) -> tuple[bytes, bytes]:
        """The bytes before and after chunk `index` that its straddling blocks share.
        Raises IntegrityError when a neighbour failed its own check."""
        context = block_context(self.metadata, index)
        for neighbour in context:
            if neighbour != index and neighbour in failures:
                raise IntegrityError(f"a dm-verity block it shares with chunk {neighbour} "
                                     f"cannot be checked: {failures[neighbour]}")
        before = b"".join(decoded[n] for n in range(context.start, index))
        after = b"".join(decoded[n] for n in range(index + 1, context.stop))
        return before, after

    def _mark_bad(self, index: int, reason: str) -> None:
        """A chunk failed a check on every refetch: remember it (for a while), log once, and
        fail its waiters."""
        if self.health.chunk_bad(index, reason, time.monotonic()):
            self.stats.verify_failures += 1
            start, _ = self.metadata.frame_range(index)
            log.error("layer %s: chunk %d (frame at blob offset %d): verification failed: %s",
                      self.name, index, start, reason)
            self._record(chunk=index, event="bad")
        self.fail(index, ImageReadError(f"chunk {index}: verification failed: {reason}"))

    def _fetch_failed(self, chunks: list[int], message: str, *,
                      source_down: bool = False) -> None:
        """A fetch of `chunks` failed for good: hold them off (a source that is down holds
        off all of them already, and was logged once), log, fail their waiters."""
        self.stats.fetch_failures += 1
        held = [index for index in chunks if index not in self.speculative]
        if not source_down and held:
            self.health.fetch_failed(held, message, time.monotonic())
            log.warning("layer %s: chunks %d-%d: fetch failed: %s", self.name, chunks[0],
                        chunks[-1], message)
        for index in chunks:
            self.fail(index, ImageReadError(f"chunk {index}: fetch failed: {message}"))

    def snapshot(self) -> dict[str, Any]:
        """The loader's part of the layer's statistics (from any thread, in trio or not)."""
        now = time.monotonic()
        return {
            "bytes_fetched": sum(reader.stats.bytes_fetched for reader in self.readers),
            "requests": sum(reader.stats.requests for reader in self.readers),
            "retries": sum(reader.stats.retries for reader in self.readers),
            "bad_chunks": self.health.bad_chunks(now),
            "failing_chunks": self.health.failing_chunks(now),
            "unreachable_sources": self.health.down_sources(now),
        }


def _frame_size(metadata: BlobMetadata, chunk_index: int) -> int:
    start, end = metadata.frame_range(chunk_index)
    return end - start

