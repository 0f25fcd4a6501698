"""Whole frames: a run of adjacent frames of one layer fetched in one request, then checked
and decoded frame by frame. The counterpart of `frame_stream` (which answers reads before a
frame has all come) for layers without dm-verity, sources that cannot stream, and frames
fetched again.

Each frame is checked against its SHA-512 and decoded to its exact size (`verify`); with
dm-verity every data block of its chunk is checked against the tree, whose hash blocks over
the run are fetched alongside the frames. A data block may straddle two chunks: its check
needs the neighbour's bytes, taken from the cache when it holds them, else fetched with the
run. A chunk is reported as soon as the chunks its blocks share bytes with are decoded, so
its readers need not wait for the rest of the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass

import trio

from lazyfs.cache.memory import ChunkCache
from lazyfs.exception_groups import leaf_errors
from lazyfs.fetch.base import BlobReader
from lazyfs.fetch.errors import FetchError, SourceUnreachableError
from lazyfs.format.errors import FormatError, IntegrityError
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.open_plan import chunk_hash_blocks, data_blocks
from lazyfs.layer.errors import FetchAttemptFailed
from lazyfs.layer.frame_stream import FrameDone
from lazyfs.layer.hash_blocks import HashBlockStore
from lazyfs.layer.stats import ImageStats
from lazyfs.layer.verify import block_context, check_blocks, decode_frame


class TreeUnverified(Exception):
    """The hash blocks over a run could not be authenticated: no chunk of it can be checked
    (the message says why)."""


@dataclass
class WholeFrames:
    """Fetches, decodes and checks a run of whole frames of one layer (see the module
    docstring)."""

    reader: BlobReader
    metadata: BlobMetadata
    cache: ChunkCache  # neighbours' bytes, instead of fetching them again
    key_of: Callable[[int], Hashable]
    hash_blocks: HashBlockStore | None
    cpu_limiter: trio.CapacityLimiter
    stats: ImageStats
    keep_frames: bool = False  # hand each verified frame on (for the disk cache)

    async def fetch(self, group: list[int], on_done: Callable[[FrameDone], None]) -> None:
        """One fetch of `group` (with what its straddling dm-verity blocks need) and of the
        hash blocks over it; report each chunk of `group` to `on_done` as it is checked: its
        bytes in `data`, or why it failed (`reason`). Raises FetchAttemptFailed, or
        TreeUnverified (then nothing was reported)."""
        metadata = self.metadata
        first, last, known = self._fetch_span(group)
        start = metadata.frame_range(first)[0]
        end = metadata.frame_range(last)[1]
        began = time.monotonic()
        blob = b""
        tree_failures: dict[int, str] = {}

        async def fetch_frames() -> None:
            nonlocal blob
            blob = await self.reader.read(start, end - start)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch_frames)
                nursery.start_soon(self._ensure_tree, group, tree_failures)
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
            raise TreeUnverified("; ".join(map(str, errors))) from None
        latency = time.monotonic() - began
        self.stats.fetch_latency.add(latency)
        self.stats.chunk_fetches += 1
        failures = {index: f"dm-verity tree: {why}" for index, why in tree_failures.items()}
        decoded = dict(known)
        waiting = list(group)
        # Past `last` only cached neighbours: they are in `decoded` already.
        for index in range(first, block_context(metadata, group[-1]).stop):
            if index not in decoded and index not in failures:
                frame_start, frame_end = metadata.frame_range(index)
                try:
                    decoded[index] = await trio.to_thread.run_sync(
                        decode_frame, metadata, index,
                        blob[frame_start - start:frame_end - start], frame_start,
                        limiter=self.cpu_limiter)
                except FormatError as exc:
                    failures[index] = str(exc)
            # Each chunk is checked and reported as soon as the chunks its blocks share
            # bytes with are decoded (at once when chunks are whole blocks).
            while waiting and block_context(metadata, waiting[0]).stop <= index + 1:
                chunk = waiting.pop(0)
                if chunk not in failures:
                    await self._check(chunk, decoded, failures)
                if chunk in failures:
                    on_done(FrameDone(chunk, reason=failures[chunk]))
                    continue
                frame_start, frame_end = metadata.frame_range(chunk)
                frame = blob[frame_start - start:frame_end - start] if self.keep_frames else None
                on_done(FrameDone(chunk, frame_bytes=frame_end - frame_start, latency_s=latency,
                                  data=decoded[chunk], frame=frame))

    def _blocks_for(self, chunk_index: int) -> dict[int, bytes]:
        """A private copy of the verified hash blocks over one chunk (for a worker thread)."""
        if self.hash_blocks is None:
            return {}
        return self.hash_blocks.known(chunk_hash_blocks(self.metadata, chunk_index))

    async def _check(self, index: int, decoded: Mapping[int, bytes],
                     failures: dict[int, str]) -> None:
        """Check the data blocks of a decoded chunk; add it to `failures` if one fails."""
        try:
            before, after = self._context(index, decoded, failures)
            await trio.to_thread.run_sync(
                check_blocks, self.metadata, self._blocks_for(index), index, decoded[index],
                before, after, limiter=self.cpu_limiter)
        except FormatError as exc:
            failures[index] = str(exc)

    async def _ensure_tree(self, group: list[int], failures: dict[int, str]) -> None:
        """Fetch and authenticate the hash blocks over `group` not yet verified; put the
        chunks under a block that does not verify in `failures`. Raises FetchError."""
        if self.hash_blocks is None:
            return
        self.hash_blocks.retry_bad([offset for index in group
                                    for offset in chunk_hash_blocks(self.metadata, index)])
        coverage = await self.hash_blocks.cover(*data_blocks(self.metadata, group),
                                                reader=self.reader)
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
        while first < group[0] and (data := self.cache.peek(self.key_of(first))) is not None:
            known[first] = bytes(data)
            first += 1
        while last > group[-1] and (data := self.cache.peek(self.key_of(last))) is not None:
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
