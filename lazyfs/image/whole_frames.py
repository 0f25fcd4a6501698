"""Whole frames: a run of adjacent frames fetched in one request, each checked against its
SHA-512 before it is decoded, decoded to its exact size and, with dm-verity, every data block
checked against the tree; only then handed on, whole. The read path of layers without
dm-verity (a frame's SHA-512 is then all that authenticates it, so nothing of a frame can be
used before all of it has come), and of every layer with `ImageTuning.partial_frames` off;
and of frames read back from the disk cache, checked again as if they had been fetched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from lazyfs.exception_groups import leaf_errors
from lazyfs.fetch.base import BlobReader
from lazyfs.fetch.errors import FetchError
from lazyfs.format.chunk_table import verify_frame
from lazyfs.format.errors import FormatError
from lazyfs.format.frames import decode_chunk_frame
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.verity_tree import verify_data_blocks
from lazyfs.image.disk_tier import LayerDisk, check_frame
from lazyfs.image.frame_stream import FrameDone
from lazyfs.image.hash_blocks import Coverage, HashBlockStore, chunk_hash_blocks, data_blocks


@dataclass
class WholeFrameLoader:
    """Loads runs of whole frames of one layer (see the module docstring)."""

    reader: BlobReader
    metadata: BlobMetadata
    hash_blocks: HashBlockStore | None
    cpu_limiter: trio.CapacityLimiter

    async def load(self, run: list[int], on_done: Callable[[FrameDone], None]) -> None:
        """Fetch the frames of `run` and the hash blocks over them at once, then check and
        decode each frame, reporting it to `on_done` (`data`, or the `reason` it failed).
        Raises FetchError (no frame reported)."""
        start = self.metadata.frame_range(run[0])[0]
        end = self.metadata.frame_range(run[-1])[1]
        began = time.monotonic()
        blob = b""
        coverage: Coverage | None = None

        async def fetch_frames() -> None:
            nonlocal blob
            blob = await self.reader.read(start, end - start)

        async def fetch_tree() -> None:
            nonlocal coverage
            if self.hash_blocks is not None:
                coverage = await self.hash_blocks.cover(*data_blocks(self.metadata, run))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(fetch_frames)
                nursery.start_soon(fetch_tree)
        except BaseExceptionGroup as group:
            errors = leaf_errors(group)
            if not errors or not all(isinstance(error, FetchError) for error in errors):
                raise
            raise FetchError("; ".join(str(error) for error in errors)) from None
        latency_s = time.monotonic() - began
        for index in run:
            failure = (coverage.failure_in(*data_blocks(self.metadata, [index])) if coverage
                       else None)
            if failure is not None:
                on_done(FrameDone(index, reason=f"dm-verity tree: {failure}"))
                continue
            frame_start, frame_end = self.metadata.frame_range(index)
            frame = blob[frame_start - start:frame_end - start]
            try:
                data = await trio.to_thread.run_sync(
                    _verify_and_decode, self.metadata, coverage.blocks if coverage else {},
                    index, frame, frame_start,
                    limiter=self.cpu_limiter,
                )
            except FormatError as exc:
                on_done(FrameDone(index, reason=str(exc)))
                continue
            on_done(FrameDone(index, frame_bytes=len(frame), latency_s=latency_s, data=data,
                              frame=frame))

    async def from_disk(self, disk: LayerDisk, index: int) -> tuple[bytes, int] | None:
        """Chunk `index` from the disk cache, its frame and hash blocks checked again: its
        bytes and the frame's size; None when the cache lacks it or its copy fails a check
        (then dropped, to be fetched)."""
        needed = chunk_hash_blocks(self.metadata, index)
        known = self.hash_blocks.known(needed) if self.hash_blocks is not None else {}
        found = await disk.load(index, known, needed, self.cpu_limiter)
        if found is None:
            return None
        frame, blocks = found
        try:
            data = await trio.to_thread.run_sync(
                check_frame, self.metadata, blocks, index, frame,
                self.metadata.frame_range(index)[0], limiter=self.cpu_limiter,
            )
        except FormatError as exc:
            await disk.forget(index, str(exc))
            return None
        if self.hash_blocks is not None:
            self.hash_blocks.adopt(blocks)
        return data, len(frame)


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
