"""What the loads of one layer share, and decide together: its sources and their health
(the failure policy of `lazyfs.layer.health`), its frame streams, the verified hash blocks
of its dm-verity tree, and the loads in flight, which unmount ends at once.

Each load of a run of chunks is a `lazyfs.layer.run_load.RunLoad`. What it may fetch and what
its failures mean are decided here, for all of them: no chunk is fetched while the mount goes
down, nor one that is bad or held off, nor from a source that is down, nor before a probe of
the source under way has told (`refusal`). A chunk that failed a check on every refetch is
remembered as bad (`mark_bad`); a fetch that failed on every source holds its chunks off
(`fetch_failed`), except those loading only because a read may want them soon, that no read
has asked for yet (`speculate`, `wanted`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Any

import trio

from lazyfs.cache.memory import ChunkCache
from lazyfs.fetch.base import BlobReader
from lazyfs.fetch.errors import FetchError
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.open_plan import chunk_hash_blocks
from lazyfs.layer.disk_tier import LayerDisk
from lazyfs.layer.errors import ImageReadError
from lazyfs.layer.frame_stream import FrameStream, LayerStreams
from lazyfs.layer.hash_blocks import HashBlockStore
from lazyfs.layer.health import LayerHealth
from lazyfs.layer.stats import ImageStats
from lazyfs.layer.tuning import ImageTuning

log = logging.getLogger(__name__)


class ChunkLoader:
    """The side of one layer that every load of its chunks into the shared cache (keys from
    `key_of`) shares, and the policy they follow (see the module docstring)."""

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
        self.key_of = key_of
        self.stats = stats
        self.tuning = tuning
        self.health = LayerHealth(name, tuning)
        self.cpu_limiter = cpu_limiter or trio.CapacityLimiter(2)
        self.record = record or (lambda **fields: None)
        self.disk = disk
        # The dm-verity tree's verified hash blocks, fetched as loads need them.
        self.hash_blocks = (
            HashBlockStore(readers[0], metadata, stats, self.cpu_limiter, cache)
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
        # Fetches at a time of the loads that bring no limiter of their own.
        self.fetch_limiter = trio.CapacityLimiter(tuning.parallel_fetches)
        # The cancel scopes of the loads in flight, so that unmount can end them at once.
        self._loads: set[trio.CancelScope] = set()
        self._closing = False
        self._probing: trio.Event | None = None  # set when a probe of the source has told
        # Chunks loading only because a read may want them soon (readahead, and those that
        # follow a miss): a failed fetch does not hold them off, nobody asked for them yet.
        # A read that waits for one takes it out (`wanted`): the kernel retries a failed read
        # at once, and that retry must fail at once, not wait for a new fetch.
        self._speculative: set[int] = set()

    # -- what reads ask of the layer's loads -----------------------------------------------

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

    def stream(self, chunk_index: int) -> FrameStream | None:
        """The stream a read of `chunk_index` waits on (its frame streaming in, or the chunk
        kept partial), or None."""
        return self.streams.get(chunk_index)

    def open_streams(self, run: list[int]) -> dict[int, FrameStream] | None:
        """Open the streams of `run`, claimed just now, for its readers to wait on until
        `load_run` feeds them; None for a layer that does not stream."""
        return self.streams.open(run) if self.streaming else None

    def streams_of(self, run: list[int]) -> dict[int, FrameStream] | None:
        """The streams `open_streams` opened for `run` (None for a layer that does not
        stream)."""
        return self.streams.of(run) if self.streaming else None

    def partial_chunks(self) -> list[int]:
        """The chunks kept partial: blocks under a bad hash block are holes."""
        return self.streams.partial_indices()

    def speculate(self, chunks: list[int]) -> None:
        """`chunks`, claimed now, load before any read asked for them: a failed fetch of them
        holds nothing off, unless a read waits for them by then (`wanted`)."""
        self._speculative.update(chunks)

    def wanted(self, chunk_index: int) -> None:
        """A read waits for `chunk_index`, loading already: a failed fetch of it holds it off
        like that of any chunk a read asked for."""
        self._speculative.discard(chunk_index)

    # -- the layer's sources ---------------------------------------------------------------

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

    async def probe_told(self) -> None:
        """Wait until a probe of the source under way has told (at once when none is)."""
        probing = self._probing
        if probing is not None:
            await probing.wait()

    def cancel(self) -> None:
        """End every load in flight now and refuse new ones (unmount)."""
        self._closing = True
        for scope in self._loads:
            scope.cancel()

    async def aclose(self) -> None:
        """End the loads in flight (`cancel`: none may go on with a closed reader, which
        would fail it with a RuntimeError, not a fetch error), then close the readers."""
        self.cancel()
        for reader in self.readers:
            await reader.aclose()

    # -- loads -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def load_scope(self, deadline: float) -> Iterator[trio.CancelScope]:
        """The cancel scope of one load: it ends at `deadline` (trio time), and at once at
        unmount (`cancel`), also for a load that starts after it."""
        scope = trio.CancelScope(deadline=deadline)
        self._loads.add(scope)
        try:
            with scope:
                if self._closing:
                    scope.cancel()
                yield scope
        finally:
            self._loads.discard(scope)

    @property
    def closing(self) -> bool:
        """Whether the mount is going down (`cancel`)."""
        return self._closing

    def load_ended(self, run: list[int]) -> None:
        """The load of `run` ended, however: its chunks are no longer loading speculatively
        (`speculate`)."""
        self._speculative.difference_update(run)

    def blocks_for(self, chunk_index: int) -> dict[int, bytes]:
        """A private copy of the verified hash blocks over one chunk (for worker threads)."""
        if self.hash_blocks is None:
            return {}
        return self.hash_blocks.known(chunk_hash_blocks(self.metadata, chunk_index))

    def fail(self, index: int, error: ImageReadError) -> None:
        """Fail chunk `index`'s waiters: its cache key, and its stream if one is open."""
        self.cache.fail(self.key_of(index), error)
        stream = self.streams.get(index)
        if stream is not None and not stream.done:
            stream.fail(error)
            self.streams.forget(stream)

    def mark_bad(self, index: int, reason: str) -> None:
        """A chunk failed a check on every refetch: remember it (for a while), log once, and
        fail its waiters."""
        if self.health.chunk_bad(index, reason, time.monotonic()):
            self.stats.verify_failures += 1
            start, _ = self.metadata.frame_range(index)
            log.error("layer %s: chunk %d (frame at blob offset %d): verification failed: %s",
                      self.name, index, start, reason)
            self.record(chunk=index, event="bad")
        self.fail(index, ImageReadError(f"chunk {index}: verification failed: {reason}"))

    def fetch_failed(self, chunks: list[int], message: str, *,
                     source_down: bool = False) -> None:
        """A fetch of `chunks` failed for good: hold them off (a source that is down holds
        off all of them already, and was logged once; chunks no read asked for yet are not
        held off), log, fail their waiters."""
        self.stats.fetch_failures += 1
        held = [index for index in chunks if index not in self._speculative]
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
