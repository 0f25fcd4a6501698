"""Partial frames: a layer with dm-verity answers a read as soon as the blocks it needs have
arrived, been decoded and been verified, not when their whole 4 MiB frame has.

dm-verity authenticates every 4 KiB block on its own, so a read in the middle of a frame needs
only the frame's compressed prefix up to it. A run of adjacent frames is fetched as one stream;
each frame is decoded as its bytes come (FrameStreamDecoder: whole zstd blocks, bounded), each
decoded block is checked against its verified level-0 hash block, and only then published in
the chunk's FrameStream, where readers wait for the bytes they need. Decoding and hashing run
in worker threads, a piece at a time. The frame's SHA-512 is checked when its last byte has come
(before that piece is decoded); a frame failing any check is dropped: it is not cached, readers
still waiting fail, and the chunk is remembered as bad. Blocks under a hash block that does not
verify are published as a hole: reads that touch it fail, the others succeed, and the chunk is
kept by its layer alone, never in the shared cache, which holds only wholly verified chunks.

The rest of a frame keeps streaming into the cache after the reads that started it are
answered (`ImageTuning.finish_frames`): a frame is decoded from its start, so a frame cut
short would have to be fetched again from its first byte by the next read in it, and the
next read is usually near (file systems keep a file's blocks and its metadata together).

Protocol: a FrameStream is created, with the chunk's cache key claimed, before its load
starts, and its loader resolves it exactly once (`complete`, `fail`, or `advance` over the
last bytes with holes); `read` waits only for `advance`, `complete` or `fail`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from lazyfs.cache.memory import ChunkData
from lazyfs.exception_groups import leaf_errors
from lazyfs.fetch.base import StreamingReader
from lazyfs.fetch.errors import FetchError
from lazyfs.format.chunk_table import HASH_NONE, check_frame_digest
from lazyfs.format.errors import FormatError
from lazyfs.format.frames import FrameStreamDecoder
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.open_plan import data_blocks
from lazyfs.format.verity_tree import verify_data_blocks
from lazyfs.layer.errors import ImageReadError
from lazyfs.layer.hash_blocks import Coverage, HashBlockStore

log = logging.getLogger(__name__)

# Bytes of a run received ahead of its processing at most: then the transfer waits.
MAX_INBOX_BYTES = 1024 * 1024
# The most one worker-thread call takes: what came meanwhile is published in pieces this size,
# so a read waits for the piece that holds its blocks, not for all that had arrived.
MAX_PIECE_BYTES = 256 * 1024
# Chunks kept by their layer alone because some of their blocks cannot be verified (a bad hash
# block): reads of their other blocks are served from them without fetching the frame again.
MAX_PARTIAL_CHUNKS = 8


class FrameStream:
    """One chunk as its frame arrives: the verified prefix grows; readers wait for theirs.

    Its bytes grow in one buffer of the chunk's size, made by a decoding thread and handed
    over with `adopt`, and the completed chunk is that very buffer (read-only): a chunk is
    never held twice."""

    def __init__(self, index: int) -> None:
        self.index = index
        self._data: bytearray | ChunkData = bytearray()
        self._filled = 0  # bytes of `_data` verified (or holes)
        self.holes: list[tuple[int, int, str]] = []  # (start, end, why) within the chunk
        self.error: ImageReadError | None = None
        self.done = False
        self.waiting = 0
        self._progress = trio.Event()

    @property
    def verified(self) -> int:
        """Bytes of the chunk decoded and verified (or known to be a hole), from its start."""
        return self._filled

    def adopt(self, buffer: bytearray) -> None:
        """Take `buffer`, of the whole chunk's size, before anything is published: the
        decoding threads write verified bytes into it, `advance` makes them readable."""
        assert isinstance(self._data, bytearray) and not self._filled
        self._data = buffer

    def advance(self, size: int, holes: Sequence[tuple[int, int, str]] = ()) -> None:
        """The next `size` bytes of the adopted buffer are verified (holes zero-filled): wake
        the readers."""
        assert isinstance(self._data, bytearray) and self._filled + size <= len(self._data)
        self._filled += size
        self.holes.extend(holes)
        self._wake()

    async def read(self, start: int, end: int) -> bytes:
        """The chunk's bytes `[start, end)` once verified. Raises ImageReadError when the frame
        failed before they were, or when they touch a hole."""
        self.waiting += 1
        try:
            while self.verified < end and self.error is None and not self.done:
                await self._progress.wait()
        finally:
            self.waiting -= 1
        if self.verified < end:
            raise self.error or ImageReadError(f"chunk {self.index}: shorter than expected")
        for hole_start, hole_end, why in self.holes:
            if hole_start < end and start < hole_end:
                raise ImageReadError(f"chunk {self.index}: {why}")
        with memoryview(self._data) as view:
            return bytes(view[start:end])

    def complete(self) -> ChunkData:
        """The whole chunk has arrived and verified: its bytes, kept as one immutable copy
        (the buffer itself, read-only, when it holds exactly the chunk)."""
        buffer = self._data
        assert isinstance(buffer, bytearray)
        if len(buffer) != self._filled:
            del buffer[self._filled:]
        self._data = memoryview(buffer).toreadonly()
        self.done = True
        self._wake()
        return self._data

    def complete_with(self, data: ChunkData) -> None:
        """The whole chunk, verified by other means (the disk cache's copy, checked as a
        whole): it replaces what had streamed in, holes included, without a copy."""
        self._data = data
        self._filled = len(data)
        self.holes.clear()
        self.done = True
        self._wake()

    def fail(self, error: ImageReadError) -> None:
        """End the stream with `error` for the readers still waiting (the first error
        stays)."""
        if self.error is None and not self.done:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        event, self._progress = self._progress, trio.Event()
        event.set()


class LayerStreams:
    """A layer's frames streaming in, and its partial chunks kept, by chunk index."""

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self._streams: dict[int, FrameStream] = {}
        self._partial: deque[FrameStream] = deque()

    def __contains__(self, index: int) -> bool:
        return index in self._streams

    def get(self, index: int) -> FrameStream | None:
        return self._streams.get(index)

    def open(self, run: list[int]) -> dict[int, FrameStream]:
        """New streams for the chunks of `run` (their cache keys claimed by the caller)."""
        streams = {index: FrameStream(index) for index in run}
        self._streams.update(streams)
        return streams

    def of(self, run: list[int]) -> dict[int, FrameStream]:
        """The streams `open` made for the chunks of `run`."""
        return {index: self._streams[index] for index in run}

    def keep_partial(self, stream: FrameStream) -> None:
        """Keep a completed chunk with holes (the oldest beyond MAX_PARTIAL_CHUNKS go)."""
        log.error("layer %s: chunk %d: %d bytes cannot be verified, the rest is served: %s",
                  self.layer, stream.index, sum(end - start for start, end, _ in stream.holes),
                  stream.holes[0][2])
        self._partial.append(stream)
        if len(self._partial) > MAX_PARTIAL_CHUNKS:
            self.forget(self._partial.popleft())

    def finish(self, stream: FrameStream, data: ChunkData) -> None:
        """Complete `stream` with the whole chunk `data` (from the disk cache) and drop it."""
        stream.complete_with(data)
        self.forget(stream)

    def partial_indices(self) -> list[int]:
        return sorted(stream.index for stream in self._partial)

    def forget(self, stream: FrameStream) -> None:
        """Drop `stream` (if it is still the one of its chunk)."""
        if self._streams.get(stream.index) is stream:
            del self._streams[stream.index]
        if stream in self._partial:
            self._partial.remove(stream)


@dataclass
class _Frame:
    """One frame of a run, and what its worker threads carry from piece to piece. Its decoder
    (zstd's state and window, most of a chunk) exists only while the frame streams in: a run
    holds one or two, not one per frame."""

    index: int
    offset: int
    size: int
    first_block: int
    decoded_size: int
    hashed: bool
    decoder: FrameStreamDecoder | None = None
    sha: hashlib._Hash | None = None
    received: int = 0
    position: int = 0  # chunk bytes published so far
    kept: list[bytes] | None = None  # the frame's pieces, when kept for the disk cache
    carry: bytearray = field(default_factory=bytearray)  # decoded, not yet a whole block
    failed: bool = False
    held: int = 0  # bytes counted in the cache's cap while the chunk streams in
    buffer: bytearray | None = None  # the chunk, made and filled by the worker threads


@dataclass(frozen=True)
class _Step:
    size: int  # bytes verified (or holes) written to the frame's buffer
    holes: list[tuple[int, int, str]]


@dataclass(frozen=True)
class FrameDone:
    """What a loader says of a frame as it ends: all arrived and verified (its chunk is in
    `data`, or, streamed, in its FrameStream with any holes), or it failed a check (`reason`).
    """

    index: int
    reason: str | None = None
    frame_bytes: int = 0
    latency_s: float = 0.0
    data: bytes | None = None
    frame: bytes | None = None  # the verified frame itself, when the loader keeps it


class StoppedEarly(Exception):
    """The stream was stopped once no reader waited (`finish_frames` off): not a failure."""


@dataclass
class RunStreamer:
    """Streams a run of adjacent frames of one layer (see the module docstring)."""

    reader: StreamingReader
    metadata: BlobMetadata
    hash_blocks: HashBlockStore
    cpu_limiter: trio.CapacityLimiter
    piece_bytes: int
    finish_frames: bool = True
    keep_frames: bool = False  # hand each verified frame on (for the disk cache)

    async def stream(self, run: list[int], streams: dict[int, FrameStream],
                     on_done: Callable[[FrameDone], None]) -> None:
        """Fetch, decode and verify the frames of `run`, publishing into `streams` and
        reporting each frame to `on_done` as it ends. Raises FetchError (the frames not
        reported yet are the caller's to fail) or StoppedEarly."""
        table = self.metadata.table
        frames = []
        for index in run:
            start, end = self.metadata.frame_range(index)
            frames.append(_Frame(
                index, start, end - start, data_blocks(self.metadata, [index])[0],
                table.decoded_size(index), table.hash_algorithm != HASH_NONE,
                kept=[] if self.keep_frames else None,
            ))
        began = time.monotonic()
        # The first frame's hash blocks, then the rest of the run's: a read waits on the
        # first frame, whose blocks may be known (or come with a head start's answer) while
        # those of the frames after it must be fetched.
        coverage: dict[int, Coverage] = {}
        covered = (trio.Event(), trio.Event())
        # Bytes received and not yet processed: the network fills it, the processor empties
        # it, a piece of all that has come at a time (small pieces while a read waits on a
        # slow link, the first answer comes sooner; large ones on a fast link or while no
        # read waits, fewer thread hops).
        inbox: deque[bytes | memoryview] = deque()
        inbox_bytes = 0
        changed = trio.Event()

        async def load_coverage() -> None:
            coverage[0] = await self.hash_blocks.cover(*data_blocks(self.metadata, run[:1]))
            covered[0].set()
            coverage[1] = (coverage[0] if len(run) == 1 else
                           await self.hash_blocks.cover(*data_blocks(self.metadata, run)))
            covered[1].set()

        def release(frame: _Frame) -> None:
            """The frame has ended: what it held goes."""
            self.hash_blocks.cache.release(frame.held)
            frame.held = 0
            frame.decoder = frame.sha = frame.buffer = None
            frame.carry = bytearray()

        async def process(frame: _Frame, piece: bytes, last: bool) -> None:
            which = 0 if frame is frames[0] else 1
            await covered[which].wait()
            if frame.decoder is None:  # its first piece
                frame.decoder = FrameStreamDecoder(frame.decoded_size, frame.index,
                                                   frame.offset, frame.size)
                frame.sha = hashlib.sha512() if frame.hashed else None
            try:
                step = await trio.to_thread.run_sync(
                    _decode_and_verify, self.metadata, frame, piece, last, coverage[which],
                    limiter=self.cpu_limiter,
                )
            except FormatError as exc:
                frame.failed = True
                release(frame)
                streams[frame.index].fail(ImageReadError(f"chunk {frame.index}: {exc}"))
                on_done(FrameDone(frame.index, reason=str(exc)))
                return
            stream = streams[frame.index]
            if not frame.held and frame.buffer is not None:  # the frame's first bytes
                # Counted in the cache's cap while it streams in: room is made for it now.
                frame.held = frame.decoded_size
                self.hash_blocks.cache.hold(frame.held)
                stream.adopt(frame.buffer)
            if step.size or step.holes:
                stream.advance(step.size, step.holes)
            if frame.kept is not None:
                frame.kept.append(piece)
            if last:
                release(frame)
                kept = b"".join(frame.kept) if frame.kept is not None else None
                frame.kept = None
                on_done(FrameDone(frame.index, frame_bytes=frame.size,
                                  latency_s=time.monotonic() - began, frame=kept))
            elif not self.finish_frames and not any(s.waiting for s in streams.values()):
                raise StoppedEarly

        async def wait_for_change() -> None:
            """Wait until bytes arrive or are taken for processing."""
            await changed.wait()

        def note_change() -> None:
            nonlocal changed
            changed, done = trio.Event(), changed
            done.set()

        async def sink(piece: bytes) -> None:
            nonlocal inbox_bytes
            while inbox_bytes > MAX_INBOX_BYTES:  # the processor is behind: let it catch up
                await wait_for_change()
            inbox.append(piece)
            inbox_bytes += len(piece)
            note_change()

        def take_from_inbox(size: int) -> bytes:
            """The first `size` bytes received (one copy, or none)."""
            nonlocal inbox_bytes
            parts: list[bytes | memoryview] = []
            left = size
            while left:
                part = inbox.popleft()
                if len(part) > left:
                    inbox.appendleft(memoryview(part)[left:])
                    part = memoryview(part)[:left]
                parts.append(part)
                left -= len(part)
            inbox_bytes -= size
            if len(parts) == 1 and isinstance(parts[0], bytes):
                return parts[0]
            return b"".join(parts)

        def piece_size(frame: _Frame) -> int:
            """Bytes to gather before a piece of `frame` is decoded: few while a read waits
            for it (its blocks come sooner), else a large piece (fewer thread hops)."""
            piece = self.piece_bytes if streams[frame.index].waiting else MAX_PIECE_BYTES
            return min(piece, frame.size - frame.received)

        async def processor() -> None:
            for frame in frames:
                while frame.received < frame.size:
                    while inbox_bytes < piece_size(frame):
                        await wait_for_change()
                    take = min(inbox_bytes, frame.size - frame.received, MAX_PIECE_BYTES)
                    piece = take_from_inbox(take)
                    note_change()
                    frame.received += take
                    if not frame.failed:
                        await process(frame, piece, frame.received == frame.size)

        async def body() -> None:
            start = frames[0].offset
            await self.reader.read_stream(start, frames[-1].offset + frames[-1].size - start,
                                          sink)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(load_coverage)
                nursery.start_soon(body)
                nursery.start_soon(processor)
        except BaseExceptionGroup as group:
            errors = leaf_errors(group)
            for wanted in (StoppedEarly, FetchError):
                found = [error for error in errors if isinstance(error, wanted)]
                if found and len(found) == len(errors):
                    raise found[0] from None
            raise
        finally:
            for frame in frames:
                release(frame)


def _decode_and_verify(metadata: BlobMetadata, frame: _Frame, piece: bytes, last: bool,
                       coverage: Coverage) -> _Step:
    """Runs in a worker thread: hash and decode the next piece of `frame`, check every whole
    block it completes against the tree (all of it for the last piece). The SHA-512 is checked
    before the last piece is decoded. Raises IntegrityError / FrameDecodeError."""
    if frame.sha is not None:
        frame.sha.update(piece)
        if last:
            check_frame_digest(metadata.table, frame.index, frame.sha.digest(), frame.offset,
                               frame.size)
    assert frame.decoder is not None
    frame.carry += frame.decoder.feed(piece)
    if last:
        frame.decoder.finish()
    geometry = metadata.verity
    assert geometry is not None and metadata.root is not None
    block_size = geometry.superblock.data_block_size
    whole = len(frame.carry) if last else len(frame.carry) // block_size * block_size
    if whole == len(frame.carry):
        data, frame.carry = frame.carry, bytearray()
    else:
        data = frame.carry[:whole]
        del frame.carry[:whole]
    holes: list[tuple[int, int, str]] = []
    first = frame.first_block + frame.position // block_size
    checked = 0  # data before this offset is verified, or a hole
    for position in range(0, len(data), block_size):
        why = coverage.failure(first + position // block_size)
        if why is None:
            continue
        _verify(metadata, coverage, first, data, checked, position)
        end = min(position + block_size, len(data))
        data[position:end] = bytes(end - position)  # never published: zeros, not its bytes
        holes.append((frame.position + position, frame.position + end,
                      f"data block {first + position // block_size} cannot be verified: {why}"))
        checked = end
    _verify(metadata, coverage, first, data, checked, len(data))
    if frame.buffer is None:  # made here, not on the event loop: zeroing it takes a while
        frame.buffer = bytearray(frame.decoded_size)
    frame.buffer[frame.position:frame.position + len(data)] = data
    frame.position += len(data)
    return _Step(len(data), holes)


def _verify(metadata: BlobMetadata, coverage: Coverage, first: int, data: bytearray,
            start: int, end: int) -> None:
    """Check the data blocks in `data[start:end]` (block `first` at offset 0)."""
    geometry = metadata.verity
    assert geometry is not None and metadata.root is not None
    if end > start:
        block_size = geometry.superblock.data_block_size
        verify_data_blocks(geometry, first + start // block_size, memoryview(data)[start:end],
                           coverage.blocks, metadata.root)
