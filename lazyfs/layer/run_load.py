"""One load of a run of chunks of one layer: disk cache or fetch → verify → decode → cache.

A load takes adjacent chunks the caller claimed in the cache (`ChunkCache.claim`) and
resolves every one of them, whatever happens: complete with verified bytes, or fail. It takes
what the disk cache holds first (checked again; a disk hit is a success like a fetch), fails
at once the rest that must not be fetched now (`ChunkLoader.refusal`), and fetches the
others' frames in one request with the hash blocks that cover them: whole
(`lazyfs.layer.whole_frames`), or, with dm-verity and a source that can stream, as a stream
whose readers are answered as their blocks verify (`lazyfs.layer.frame_stream`). A chunk that
fails a check is fetched again, alone and whole, up to `refetches` times, cycling through the
sources (a mirror, then the registry), before it is reported bad; a failed fetch is tried on
the next source before the chunks are failed and held off. A load gives up after the read
timeout, and at once when unmount cancels it. Each frame fetched and verified is written back
to the disk cache.
"""

from __future__ import annotations

import logging
import time

import trio

from lazyfs.fetch.base import BlobReader, StreamingReader
from lazyfs.fetch.errors import FetchError, SourceUnreachableError
from lazyfs.format.open_plan import chunk_hash_blocks, contiguous
from lazyfs.layer.errors import FetchAttemptFailed, ImageReadError
from lazyfs.layer.frame_stream import FrameDone, FrameStream, RunStreamer, StoppedEarly
from lazyfs.layer.loader import ChunkLoader
from lazyfs.layer.whole_frames import TreeUnverified, WholeFrames

log = logging.getLogger(__name__)


class RunLoad:
    """One load of a run of adjacent claimed chunks (see the module docstring): the chunks
    it has yet to complete or fail (`unresolved`; once resolved, a key may belong to another
    load), the streams its readers wait on, and its steps from the disk cache to the
    sources. Each step removes from `unresolved` the chunks it completed or failed."""

    def __init__(self, loader: ChunkLoader, run: list[int], reason: str,
                 streams: dict[int, FrameStream] | None) -> None:
        self._loader = loader
        self.chunks = run
        self.reason = reason
        self.streams = streams
        self.unresolved = set(run)

    async def run(self, limiter: trio.CapacityLimiter | None = None,
                  deadline: float | None = None) -> None:
        """Fetch, verify and decode the chunks (as partial frames into `streams` when
        given); complete or fail every key by `deadline` (trio time; by default the read
        timeout from now: a read that starts a load passes its own), or at once when
        cancelled for unmount. At most `limiter`'s fetches at a time (by default the
        layer's; waiting for one counts against the deadline)."""
        loader = self._loader
        if deadline is None:
            deadline = trio.current_time() + loader.tuning.read_timeout_s
        try:
            with loader.load_scope(deadline) as scope:
                rest = await self._from_disk(self.chunks)
                rest = await self._refuse(rest)
                for part in contiguous(rest, 1):  # no wait behind fetches when none is needed
                    async with limiter or loader.fetch_limiter:
                        await self._fetch_and_verify(part)
            if scope.cancelled_caught and not loader.closing:
                self._time_out()
        finally:
            loader.load_ended(self.chunks)
            # Whatever happened (cancellation at unmount included), no waiter is left hanging.
            self._fail_unresolved()

    def _time_out(self) -> None:
        """The read timeout ended the load: its chunks not resolved failed to fetch."""
        if self.unresolved:
            message = (f"no complete answer within {self._loader.tuning.read_timeout_s:g} s "
                       "(the read timeout)")
            self._loader.fetch_failed(sorted(self.unresolved), message)
            self.unresolved.clear()

    def _fail_unresolved(self) -> None:
        """Fail the waiters of the chunks still unresolved (only keys this load holds: one it
        completed may be claimed anew by now)."""
        for index in sorted(self.unresolved):
            self._loader.fail(index, ImageReadError(f"chunk {index} not loaded"))

    async def _from_disk(self, run: list[int]) -> list[int]:
        """Complete the chunks of `run` that the disk cache holds, each checked again, side
        by side; return the others."""
        loader = self._loader
        disk = loader.disk
        if disk is None:
            return run
        rest: list[int] = []

        async def load(index: int) -> None:
            found = await disk.load_chunk(index, loader.blocks_for(index),
                                          chunk_hash_blocks(loader.metadata, index),
                                          loader.cpu_limiter)
            if found is None:
                rest.append(index)
                return
            data, frame_size, blocks = found
            if loader.hash_blocks is not None:
                loader.hash_blocks.adopt(blocks)
            loader.stats.chunks_from_disk += 1
            loader.cache.complete(loader.key_of(index), data)
            stream = loader.streams.get(index)
            if stream is not None:  # its readers wait on the stream
                loader.streams.finish(stream, data)
            self.unresolved.discard(index)
            loader.health.loaded([index])
            loader.record(chunk=index, event="disk", bytes=frame_size)

        async with trio.open_nursery() as nursery:
            for index in run:
                nursery.start_soon(load, index)
        return sorted(rest)

    async def _refuse(self, run: list[int]) -> list[int]:
        """Fail at once the chunks of `run` that must not be fetched now (`refusal`), once a
        probe of the source under way has told; return the others."""
        if run:
            await self._loader.probe_told()
        rest = []
        for index in run:
            refusal = self._loader.refusal(index)
            if refusal is None:
                rest.append(index)
            else:
                self._loader.fail(index, ImageReadError(f"chunk {index}: {refusal}"))
                self.unresolved.discard(index)
        return rest

    async def _fetch_and_verify(self, run: list[int]) -> None:
        """Load `run`; fetch each chunk that fails a check again, alone, up to `refetches`
        times (cycling through the sources), then report it bad."""
        loader = self._loader
        failures = await self._from_sources(run, 0)
        for attempt in range(1, loader.tuning.refetches + 1):
            if not failures:
                return
            loader.stats.refetches += len(failures)
            log.info("layer %s: chunks %s failed a check; fetching them again (%d of %d): %s",
                     loader.name, sorted(failures), attempt, loader.tuning.refetches,
                     "; ".join(sorted(set(failures.values()))))
            retried, failures = failures, {}
            for index in sorted(retried):
                failures.update(await self._from_sources([index], attempt, stream=False))
        for index, message in sorted(failures.items()):
            loader.mark_bad(index, message)
            self.unresolved.discard(index)

    async def _from_sources(self, group: list[int], position: int, *,
                            stream: bool = True) -> dict[int, str]:
        """Load adjacent chunks from the source at `position` (cycling), trying the next
        sources after a failed fetch; streamed if `stream` and the layer and source can.
        Returns the chunks that failed a check (index: reason); those whose fetch failed
        everywhere are failed and held off."""
        loader = self._loader
        usable = loader.health.usable([reader.source for reader in loader.readers],
                                      time.monotonic())
        readers = ([reader for reader in loader.readers if reader.source in usable]
                   or loader.readers)
        failed: FetchAttemptFailed | None = None
        for step in range(len(readers)):
            reader = readers[(position + step) % len(readers)]
            group = [index for index in group if index in self.unresolved]  # after a break
            try:
                if (stream and self.streams is not None and loader.streaming
                        and isinstance(reader, StreamingReader)):
                    return await self._stream(reader, group, self.streams)
                return await self._fetch_whole(reader, group)
            except FetchAttemptFailed as exc:
                failed = exc
                if exc.unreachable:
                    loader.health.source_unreachable(reader.source, exc.message,
                                                     time.monotonic())
                else:
                    loader.health.answered(reader.source)
                if step + 1 < len(readers):
                    log.info("layer %s: chunks %d-%d: %s; trying the next source", loader.name,
                             group[0], group[-1], exc.message)
        assert failed is not None
        if not group:
            return {}
        loader.fetch_failed(group, failed.message, source_down=failed.unreachable)
        self.unresolved.difference_update(group)
        return {}

    async def _fetch_whole(self, reader: BlobReader, group: list[int]) -> dict[int, str]:
        """One fetch of `group` from `reader` as whole frames (`WholeFrames`): complete each
        chunk that passes every check. Returns the chunks that failed one (index: reason).
        Raises FetchAttemptFailed."""
        loader = self._loader
        failures: dict[int, str] = {}
        loaded: list[int] = []

        def on_done(done: FrameDone) -> None:
            index = done.index
            if done.reason is not None:
                failures[index] = done.reason
                return
            assert done.data is not None
            loader.stats.chunks_fetched.add(index)
            loader.cache.complete(loader.key_of(index), done.data)
            self.unresolved.discard(index)
            loaded.append(index)
            if loader.disk is not None and done.frame is not None:
                loader.disk.save(index, done.frame, loader.blocks_for(index))
            loader.record(chunk=index, event="fetch", reason=self.reason,
                          bytes=done.frame_bytes, latency_ms=round(done.latency_s * 1000, 3))

        frames = WholeFrames(reader, loader.metadata, loader.cache, loader.key_of,
                             loader.hash_blocks, loader.cpu_limiter, loader.stats,
                             keep_frames=loader.disk is not None)
        try:
            await frames.fetch(group, on_done)
        except TreeUnverified as exc:
            return dict.fromkeys(group, f"dm-verity tree: {exc}")
        loader.health.loaded(loaded, reader.source)
        return failures

    async def _stream(self, reader: StreamingReader, group: list[int],
                      streams: dict[int, FrameStream]) -> dict[int, str]:
        """Stream `group` from `reader` (`RunStreamer`), feeding its readers' streams:
        complete each chunk that passes every check; a chunk with holes (a bad hash block) is
        kept by the layer alone. A stream this load opened is fed once: the rest goes whole.
        Returns the chunks that failed a check (index: reason). Raises FetchAttemptFailed."""
        loader = self._loader
        assert loader.hash_blocks is not None
        failures: dict[int, str] = {}
        loaded: list[int] = []

        def on_done(done: FrameDone) -> None:
            index = done.index
            stream = streams[index]
            if done.reason is not None:
                loader.streams.forget(stream)  # its readers wait for the refetch's key
                failures[index] = done.reason
                return
            loader.stats.chunks_fetched.add(index)
            loader.record(chunk=index, event="fetch", reason=self.reason,
                          bytes=done.frame_bytes, latency_ms=round(done.latency_s * 1000, 3))
            self.unresolved.discard(index)
            if not stream.holes:
                data = stream.complete()
                loader.cache.complete(loader.key_of(index), data)
                loader.streams.forget(stream)
                loaded.append(index)
                if loader.disk is not None and done.frame is not None:
                    loader.disk.save(index, done.frame, loader.blocks_for(index))
                return
            stream.complete()
            loader.stats.verify_failures += 1
            loader.cache.fail(loader.key_of(index), ImageReadError(f"chunk {index}: partly bad"))
            loader.streams.keep_partial(stream)

        streamer = RunStreamer(reader, loader.metadata, loader.hash_blocks, loader.cpu_limiter,
                               loader.tuning.stream_piece_bytes, loader.tuning.finish_frames,
                               keep_frames=loader.disk is not None)
        mine = {index: streams[index] for index in group
                if loader.streams.get(index) is streams[index] and not streams[index].verified}
        whole = [index for index in group if index not in mine]
        if whole:
            failures.update(await self._fetch_whole(reader, whole))
            group = [index for index in group if index in mine]
            if not group:
                return failures
        loader.hash_blocks.retry_bad([offset for index in group
                                      for offset in chunk_hash_blocks(loader.metadata, index)])
        began = time.monotonic()
        try:
            await streamer.stream(group, mine, on_done)
        except FetchError as exc:
            for index in group:
                if index in self.unresolved and index not in failures:
                    stream = mine[index]
                    stream.fail(ImageReadError(f"chunk {index}: fetch broke off: {exc}"))
                    loader.streams.forget(stream)
            raise FetchAttemptFailed(str(exc), isinstance(exc, SourceUnreachableError)) from None
        except StoppedEarly:
            return failures
        loader.stats.fetch_latency.add(time.monotonic() - began)
        loader.stats.chunk_fetches += 1
        loader.health.loaded(loaded, reader.source)
        return failures
