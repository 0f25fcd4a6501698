"""One streamed fetch of a run of frames, inside the load pipeline of `lazyfs.layer.loader`.

With dm-verity (and no data block straddling two chunks) the loader fetches a run as one
stream (`frame_stream.RunStreamer`): readers are answered as their blocks verify. A frame
that arrives whole and verified completes its cache key (and is written to the disk cache);
a frame that fails a check is handed back to the loader, which fetches it again whole, or
reports it bad (`lazyfs.layer.health`); a chunk with holes (a bad hash block) is kept by its
layer alone. When the stream breaks, the streams of the frames not done are ended (their
readers then wait for the chunk's key) and the loader tries the next source.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any, Protocol

import trio

from lazyfs.cache.memory import ChunkCache
from lazyfs.fetch.base import StreamingReader
from lazyfs.fetch.errors import FetchError, SourceUnreachableError
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.open_plan import chunk_hash_blocks
from lazyfs.layer.disk_tier import LayerDisk
from lazyfs.layer.errors import FetchAttemptFailed, ImageReadError
from lazyfs.layer.frame_stream import (
    FrameDone,
    FrameStream,
    LayerStreams,
    RunStreamer,
    StoppedEarly,
)
from lazyfs.layer.hash_blocks import HashBlockStore
from lazyfs.layer.health import LayerHealth
from lazyfs.layer.stats import ImageStats
from lazyfs.layer.tuning import ImageTuning


class ChunkLoader(Protocol):
    """What a streamed fetch uses of `lazyfs.layer.loader.ChunkLoader` (not imported: that
    module calls this one)."""

    metadata: BlobMetadata
    cache: ChunkCache
    stats: ImageStats
    tuning: ImageTuning
    health: LayerHealth
    disk: LayerDisk | None
    streams: LayerStreams
    hash_blocks: HashBlockStore | None
    cpu_limiter: trio.CapacityLimiter
    key_of: Callable[[int], Hashable]
    record: Callable[..., None]

    def blocks_for(self, chunk_index: int) -> dict[int, bytes]: ...

    async def load_whole(self, reader: Any, group: list[int], reason: str,
                         unresolved: set[int]) -> dict[int, str]: ...


async def stream_once(loader: ChunkLoader, reader: StreamingReader, group: list[int],
                      reason: str, unresolved: set[int],
                      streams: dict[int, FrameStream]) -> dict[int, str]:
    """Stream `group` from `reader`: complete each chunk that passes every check. Returns
    the chunks that failed one (index: reason). Raises FetchAttemptFailed."""
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
        loader.record(chunk=index, event="fetch", reason=reason, bytes=done.frame_bytes,
                      latency_ms=round(done.latency_s * 1000, 3))
        unresolved.discard(index)
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
    # A stream the loader opened is fed once: a chunk fetched again goes whole.
    mine = {index: streams[index] for index in group
            if loader.streams.get(index) is streams[index] and not streams[index].verified}
    whole = [index for index in group if index not in mine]
    if whole:
        failures.update(await loader.load_whole(reader, whole, reason, unresolved))
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
            if index in unresolved and index not in failures:
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
