"""Loading chunks of one layer: fetch → verify → decode → cache, with the failure policy of
`lazyfs.image.health`.

A load takes adjacent chunks the caller claimed in the cache (`ChunkCache.claim`) and
resolves every one of them, whatever happens: complete with verified bytes, or fail. It
fetches the frames in one request (with the neighbours whose bytes straddling dm-verity
blocks need, unless they are cached) and the hash blocks that cover them, checks each
frame's digest, decodes it and checks its data blocks. A chunk that fails a check is fetched
again, alone, up to `refetches` times, cycling through the sources (a mirror, then the
registry), before it is reported bad; a failed fetch is tried on the next source before the
chunks are failed and held off. A load gives up after the read timeout, and at once when
unmount cancels it.
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
from lazyfs.fetch.errors import FetchError, SourceUnreachableError
from lazyfs.format.errors import FormatError, IntegrityError
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.verity_tree import hash_blocks_needed, verify_hash_blocks
from lazyfs.image.errors import ImageReadError
from lazyfs.image.health import LayerHealth
from lazyfs.image.stats import ImageStats
from lazyfs.image.tuning import ImageTuning
from lazyfs.image.verify import block_context, check_blocks, decode_frame

log = logging.getLogger(__name__)


class _FetchFailed(Exception):
    """A fetch failed after the reader's retries; `unreachable`: no attempt connected."""

    def __init__(self, message: str, unreachable: bool) -> None:
        super().__init__(message)
        self.message = message
        self.unreachable = unreachable


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
        tree_blocks: Mapping[int, bytes] | None = None,
        cpu_limiter: trio.CapacityLimiter | None = None,
        record: Callable[..., None] | None = None,
    ) -> None:
        self.name = name
        self.readers = readers
        self.metadata = metadata
        self.cache = cache
        self.stats = stats
        self.tuning = tuning
        self.health = LayerHealth(name, tuning)
        self._key = key_of
        # Verified hash blocks, keyed by verity payload offset: bounded by the tree's size.
        self._tree_blocks: dict[int, bytes] = dict(tree_blocks or {})
        self._cpu_limiter = cpu_limiter or trio.CapacityLimiter(2)
        self._fetch_limiter = trio.CapacityLimiter(tuning.parallel_fetches)
        self._record = record or (lambda **fields: None)
        # The cancel scopes of the loads in flight, so that unmount can end them at once.
        self._loads: set[trio.CancelScope] = set()
        self._closing = False

    def refusal(self, chunk_index: int) -> str | None:
        """Why a load of `chunk_index` must not be tried now (unmounting, bad, held off,
        source down), or None."""
        if self._closing:
            return "the mount is going down"
        sources = [reader.source for reader in self.readers]
        return self.health.refusal(chunk_index, sources, time.monotonic())

    def cancel(self) -> None:
        """End every load in flight now and refuse new ones (unmount)."""
        self._closing = True
        for scope in self._loads:
            scope.cancel()

    async def load_run(self, run: list[int], reason: str) -> None:
        """Fetch, verify and decode adjacent claimed chunks; complete or fail every key,
        within the read timeout (or at once when cancelled for unmount)."""
        unresolved = set(run)
        scope = trio.CancelScope(deadline=trio.current_time() + self.tuning.read_timeout_s)
        self._loads.add(scope)
        try:
            with scope:
                if self._closing:
                    scope.cancel()
                async with self._fetch_limiter:
                    await self._fetch_and_verify(run, reason, unresolved)
            if scope.cancelled_caught and unresolved and not self._closing:
                message = (f"no complete answer within {self.tuning.read_timeout_s:g} s "
                           "(the read timeout)")
                self._fetch_failed(sorted(unresolved), message)
                unresolved.clear()
        finally:
            self._loads.discard(scope)
            # Whatever happened (cancellation at unmount included), no waiter is left hanging.
            # Only keys this run still holds: one it completed may be claimed anew by now.
            for index in sorted(unresolved):
                self.cache.fail(self._key(index), ImageReadError(f"chunk {index} not loaded"))

    async def _fetch_and_verify(self, run: list[int], reason: str,
                                unresolved: set[int]) -> None:
        """Load `run`; fetch each chunk that fails a check again, alone, up to `refetches`
        times (cycling through the sources), then report it bad. Removes from `unresolved`
        each index whose key was completed or failed (after that, the key may belong to
        another loader)."""
        failures = await self._load_from_sources(run, reason, unresolved, 0)
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
                                 position: int) -> dict[int, str]:
        """Load adjacent chunks from the source at `position` (cycling), trying the next
        sources after a failed fetch. Returns the chunks that failed a check (index: reason);
        those whose fetch failed everywhere are failed and held off."""
        usable = self.health.usable([reader.source for reader in self.readers],
                                    time.monotonic())
        readers = [reader for reader in self.readers if reader.source in usable] or self.readers
        failed: _FetchFailed | None = None
        for step in range(len(readers)):
            reader = readers[(position + step) % len(readers)]
            try:
                return await self._load_once(reader, group, reason, unresolved)
            except _FetchFailed as exc:
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
        self._fetch_failed(group, failed.message, source_down=failed.unreachable)
        unresolved.difference_update(group)
        return {}

    async def _load_once(self, reader: BlobReader, group: list[int], reason: str,
                         unresolved: set[int]) -> dict[int, str]:
        """One fetch of `group` (with what its straddling dm-verity blocks need) from
        `reader`: complete each chunk that passes every check. Returns the chunks that failed
        one (index: reason). Raises _FetchFailed."""
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
                nursery.start_soon(self._ensure_tree_blocks, reader, group, tree_failures)
        except BaseExceptionGroup as error_group:
            errors = leaf_errors(error_group)
            if not errors or not all(isinstance(e, FetchError | FormatError) for e in errors):
                raise
            fetch_errors = [error for error in errors if isinstance(error, FetchError)]
            if fetch_errors:
                # The reader raises without logging: the message names the URL or file, the
                # byte range and the last status or error.
                raise _FetchFailed(
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
                check_blocks, self.metadata, self._level0_blocks(index), index, decoded[index],
                before, after, limiter=self._cpu_limiter)
        except FormatError as exc:
            failures[index] = str(exc)
            return
        self.stats.chunks_fetched.add(index)
        self.cache.complete(self._key(index), decoded[index])
        unresolved.discard(index)

    def _fetch_span(self, group: list[int]) -> tuple[int, int, dict[int, bytes]]:
        """The chunks to fetch for `group`: (first, last, neighbours' bytes borrowed from
        the cache instead of fetched). Neighbours count where a dm-verity block straddles."""
        first = block_context(self.metadata, group[0]).start
        last = block_context(self.metadata, group[-1]).stop - 1
        known: dict[int, bytes] = {}
        while first < group[0] and (data := self.cache.peek(self._key(first))) is not None:
            known[first] = data
            first += 1
        while last > group[-1] and (data := self.cache.peek(self._key(last))) is not None:
            known[last] = data
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

    def _hash_blocks_for(self, run: list[int]) -> list[int]:
        """Payload offsets of the hash blocks (all levels, top first) that cover `run`."""
        geometry = self.metadata.verity
        if geometry is None or self.metadata.root is None or not geometry.levels:
            return []
        table = self.metadata.table
        block_size = geometry.superblock.data_block_size
        first_block = run[0] * table.chunk_size // block_size
        last_byte = min((run[-1] + 1) * table.chunk_size, self.metadata.image_size)
        count = -(-last_byte // block_size) - first_block
        return hash_blocks_needed(geometry, first_block, count)

    def _level0_blocks(self, chunk_index: int) -> dict[int, bytes]:
        """A private copy of the verified blocks for one chunk: worker threads share no state."""
        return {offset: self._tree_blocks[offset]
                for offset in self._hash_blocks_for([chunk_index])
                if offset in self._tree_blocks}

    async def _ensure_tree_blocks(self, reader: BlobReader, run: list[int],
                                  failures: dict[int, str]) -> None:
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
            span = await reader.read(self.metadata.verity_payload_offset + group[0],
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

    def _mark_bad(self, index: int, reason: str) -> None:
        """A chunk failed a check on every refetch: remember it (for a while), log once, and
        fail its waiters."""
        if self.health.chunk_bad(index, reason, time.monotonic()):
            self.stats.verify_failures += 1
            start, _ = self.metadata.frame_range(index)
            log.error("layer %s: chunk %d (frame at blob offset %d): verification failed: %s",
                      self.name, index, start, reason)
            self._record(chunk=index, event="bad")
        self.cache.fail(self._key(index),
                        ImageReadError(f"chunk {index}: verification failed: {reason}"))

    def _fetch_failed(self, chunks: list[int], message: str, *,
                      source_down: bool = False) -> None:
        """A fetch of `chunks` failed for good: hold them off (a source that is down holds
        off all of them already, and was logged once), log, fail their waiters."""
        self.stats.fetch_failures += 1
        if not source_down:
            self.health.fetch_failed(chunks, message, time.monotonic())
            log.warning("layer %s: chunks %d-%d: fetch failed: %s", self.name, chunks[0],
                        chunks[-1], message)
        for index in chunks:
            self.cache.fail(self._key(index),
                            ImageReadError(f"chunk {index}: fetch failed: {message}"))

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


def _contiguous(offsets: list[int], step: int) -> list[list[int]]:
    groups: list[list[int]] = []
    for offset in sorted(offsets):
        if groups and groups[-1][-1] + step == offset:
            groups[-1].append(offset)
        else:
            groups.append([offset])
    return groups
