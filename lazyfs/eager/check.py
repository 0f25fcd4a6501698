"""Eager checking of a whole local blob: every digest, every frame, every dm-verity block.

`lazyfs verify` lists every problem it finds; `lazyfs unpack` stops at the first one and
leaves no partial output. The blob is read once, in order, one frame at a time, and the hash
tree once; frames are hashed and decoded on a small thread pool (zstandard and hashlib release
the GIL) with a bounded window in flight, so memory is a few chunks plus the tree, never the
image. This is batch work on a local file, so plain threads, not trio.

Finding the descriptor and the metadata frames is `lazyfs.eager.locate`; its public names are
importable from here too.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

from lazyfs.eager.locate import (
    find_descriptor,
    load_descriptor,
    read_at,
    read_metadata,
    scan_annotations,
    sibling_descriptor_path,
)
from lazyfs.format.chunk_table import verify_chunk_table_digest, verify_frame
from lazyfs.format.descriptor import (
    LABEL_UNCOMPRESSED,
    MEDIA_TYPE_EROFS_ZSTD,
    Descriptor,
    SeekableAnnotations,
)
from lazyfs.format.errors import FormatError, IntegrityError
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE, decode_chunk_frame
from lazyfs.format.layout import BlobMetadata, metadata_frame_end
from lazyfs.format.verity_superblock import SUPERBLOCK_SIZE, root_digest_annotation
from lazyfs.format.verity_tree import (
    BlockHasher,
    VerityGeometry,
    split_tree,
    verify_data_blocks,
    verify_hash_blocks,
)

Progress = Callable[[int, int], None]
"""Called with (blob bytes checked, blob size)."""

_READ_SIZE = 1 << 20
_WINDOW_BYTES = 256 << 20
_MAX_TREE_PROBLEMS = 20


class BlobCheckError(FormatError):
    """The first problem of a check that stops at the first one (`unpack`)."""


@dataclass
class BlobReport:
    """What a check found. `problems` is empty when every check passed."""

    path: str
    blob_size: int
    descriptor: Descriptor | None
    annotations: SeekableAnnotations
    metadata: BlobMetadata | None = None
    problems: list[str] = field(default_factory=list)
    blob_digest: str | None = None  # sha256 of the whole blob, once read
    image_digest: str | None = None  # sha256 of the decoded image, when every chunk decoded
    root_digest: str | None = None  # from the descriptor, or computed from the tree
    chunks_checked: int = 0
    verity_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def authenticated(self) -> bool:
        """True when the descriptor pinned every metadata structure the blob has."""
        return self.descriptor is not None and self.annotations.is_trusted


# --- the check ---------------------------------------------------------------------------------


class _Problems:
    def __init__(self, report: BlobReport, stop_at_first: bool) -> None:
        self.report = report
        self.stop = stop_at_first

    def add(self, message: str) -> None:
        self.report.problems.append(message)
        if self.stop:
            raise BlobCheckError(message)


def check_blob(
    path: Path,
    descriptor: Descriptor | None = None,
    *,
    output: BinaryIO | None = None,
    stop_at_first: bool = False,
    threads: int = 0,
    progress: Progress | None = None,
) -> BlobReport:
    """Check every byte of the blob at `path`; write the decoded image to `output` if given.

    Without a descriptor the metadata is found by scanning and only checked for consistency
    (the report says it is not authenticated). A chunk that fails is written as zeros, so
    `output` is only meaningful when the report is ok. With `stop_at_first`, raises
    BlobCheckError at the first problem; otherwise every problem lands in the report.
    Raises DescriptorError for an unusable descriptor and OSError when the file is unreadable.
    """
    source = str(path)
    with open(path, "rb") as f:
        blob_size = os.fstat(f.fileno()).st_size
        if descriptor is not None:
            annotations = descriptor.seekable(source)
        else:
            annotations = scan_annotations(f, blob_size, source)
        report = BlobReport(source, blob_size, descriptor, annotations)
        problems = _Problems(report, stop_at_first)
        if descriptor is not None:
            _check_descriptor(descriptor, blob_size, problems)
        metadata = _check_metadata(f, report, problems)
        blob_hash = hashlib.sha256()
        if metadata is None:
            _hash_range(f, 0, blob_size, blob_hash, progress, blob_size)
        else:
            tree = _check_tree(f, report, metadata, problems)
            _check_frames(f, report, metadata, tree, problems, output, threads, blob_hash,
                          progress)
            _hash_range(f, metadata.data_end, blob_size, blob_hash, progress, blob_size)
        report.blob_digest = "sha256:" + blob_hash.hexdigest()
    if descriptor is not None:
        if report.blob_digest != descriptor.digest:
            problems.add(f"blob digest mismatch: the descriptor says {descriptor.digest}, the "
                         f"blob hashes to {report.blob_digest}")
        uncompressed = descriptor.annotations.get(LABEL_UNCOMPRESSED)
        if uncompressed and report.image_digest and uncompressed != report.image_digest:
            problems.add(f"image digest mismatch: {LABEL_UNCOMPRESSED} says {uncompressed}, "
                         f"the decoded image hashes to {report.image_digest}")
    return report


def _check_descriptor(descriptor: Descriptor, blob_size: int, problems: _Problems) -> None:
    if descriptor.media_type != MEDIA_TYPE_EROFS_ZSTD:
        problems.add(f"descriptor media type is {descriptor.media_type}, expected "
                     f"{MEDIA_TYPE_EROFS_ZSTD}")
    if descriptor.size != blob_size:
        problems.add(f"blob size mismatch: the descriptor says {descriptor.size} bytes, the "
                     f"file has {blob_size}")


def _check_metadata(f: BinaryIO, report: BlobReport, problems: _Problems) -> BlobMetadata | None:
    """Parse the metadata structurally, then check its digest, so that a bad chunk table
    digest is reported without hiding what else is wrong."""
    annotations = report.annotations
    try:
        metadata = read_metadata(f, report.blob_size, replace(annotations, chunk_digest=None))
    except FormatError as exc:
        problems.add(str(exc))
        return None
    report.metadata = metadata
    if annotations.chunk_digest is not None:
        try:
            verify_chunk_table_digest(metadata.table_payload, annotations.chunk_digest)
        except IntegrityError as exc:
            problems.add(str(exc))
    table_end = annotations.chunk_table_offset + SKIPPABLE_HEADER_SIZE + len(
        metadata.table_payload)
    _check_frame_end(annotations, "chunk table", annotations.chunk_table_offset, table_end,
                     report.blob_size, problems)
    if annotations.verity_offset is not None:
        verity_end = metadata.verity_payload_offset + metadata.verity_payload_size
        _check_frame_end(annotations, "dm-verity", annotations.verity_offset, verity_end,
                         report.blob_size, problems)
    return metadata


def _check_frame_end(annotations: SeekableAnnotations, what: str, offset: int, end: int,
                     blob_size: int, problems: _Problems) -> None:
    """Metadata frames must tile the end of the blob: no bytes hide between or after them."""
    limit = metadata_frame_end(annotations, offset, blob_size)
    if end < limit:
        problems.add(f"{what} frame at offset {offset} ends at {end}, but the next frame or "
                     f"the end of the blob is at {limit}: {limit - end} unaccounted bytes")


@dataclass(frozen=True)
class _Tree:
    geometry: VerityGeometry
    blocks: dict[int, bytes]
    root: bytes | None


def _check_tree(f: BinaryIO, report: BlobReport, metadata: BlobMetadata,
                problems: _Problems) -> _Tree | None:
    """Read the verity payload once; check its zero padding and every hash block."""
    geometry = metadata.verity
    if geometry is None:
        return None
    payload = read_at(f, metadata.verity_payload_offset, metadata.verity_payload_size)
    at = metadata.verity_payload_offset
    salt_end = 88 + len(geometry.superblock.salt)
    tree_end = geometry.payload_size
    for start, end, what in ((82, 88, "superblock padding"), (salt_end, 344, "unused salt"),
                             (344, SUPERBLOCK_SIZE, "superblock padding"),
                             (SUPERBLOCK_SIZE, min(geometry.tree_offset, tree_end),
                              "padding after the superblock"),
                             (tree_end, len(payload), "bytes after the hash tree")):
        stray = _first_nonzero(payload, start, end)
        if stray is not None:
            problems.add(f"dm-verity payload: {what} at offset {at + stray} is not zero "
                         f"(0x{payload[stray]:02x})")
    blocks = split_tree(geometry, payload)
    root = metadata.root
    if root is None and geometry.levels:
        top = geometry.levels[-1].payload_offset
        root = BlockHasher(geometry.superblock).digest(blocks[top])
    if root is not None:
        report.root_digest = root_digest_annotation(geometry.superblock.hash_name, root)
        report.verity_checked = True
        try:
            verify_hash_blocks(geometry, blocks, root, set())
        except IntegrityError:
            for message in _diagnose_tree(geometry, blocks, root):
                problems.add(message)
    return _Tree(geometry, blocks, root)


def _first_nonzero(buf: bytes, start: int, end: int) -> int | None:
    segment = buf[start:end]
    stripped = segment.lstrip(b"\0")
    return end - len(stripped) if stripped else None


def _diagnose_tree(geometry: VerityGeometry, blocks: dict[int, bytes],
                   root: bytes) -> Iterator[str]:
    """Every hash block that does not match its parent (or the root), after a failed check.

    verify_hash_blocks stops at the first mismatch; this lists them all, each block against
    its parent's stored digest, up to a cap.
    """
    hasher = BlockHasher(geometry.superblock)
    block_size = geometry.superblock.hash_block_size
    top = len(geometry.levels) - 1
    found_count = 0
    for level in reversed(range(len(geometry.levels))):
        for index in range(geometry.levels[level].block_count):
            offset = geometry.levels[level].payload_offset + index * block_size
            if level == top:
                expected = root
            else:
                slot = geometry.slot_for(level + 1, index)
                parent = blocks[slot.payload_offset]
                expected = parent[slot.slot_offset:slot.slot_offset + geometry.digest_size]
            if hasher.digest(blocks[offset]) != expected:
                found_count += 1
                if found_count > _MAX_TREE_PROBLEMS:
                    yield "dm-verity: more hash blocks do not match (not listed)"
                    return
                parent_name = "the root digest" if level == top else "its parent"
                yield (f"dm-verity: hash block {index} of level {level} (payload offset "
                       f"{offset}) does not match {parent_name}")


def _hash_range(f: BinaryIO, start: int, end: int, blob_hash: hashlib._Hash,
                progress: Progress | None, blob_size: int) -> None:
    offset = start
    while offset < end:
        piece = read_at(f, offset, min(_READ_SIZE, end - offset))
        if not piece:
            raise OSError(f"{f.name}: file shrank while being read (at offset {offset})")
        blob_hash.update(piece)
        offset += len(piece)
        if progress is not None:
            progress(offset, blob_size)


def _max_frame_size(decoded_size: int) -> int:
    """More than any zstd frame of `decoded_size` bytes needs, however it was compressed."""
    return decoded_size + decoded_size // 64 + (64 << 10)


def _check_chunk(metadata: BlobMetadata, index: int, frame: bytes,
                 offset: int) -> tuple[bytes | None, str | None]:
    """Worker: check one frame's SHA-512 and decode it to exactly its chunk's size."""
    table = metadata.table
    try:
        verify_frame(table, index, frame, offset)
        return decode_chunk_frame(frame, table.decoded_size(index), index, offset), None
    except FormatError as exc:
        return None, str(exc)


class _VerityStream:
    """Checks decoded chunks, in order, against the tree's level 0. Chunks need not hold
    whole data blocks: blocks are reassembled across chunk boundaries. Blocks touching a
    chunk that failed to decode are skipped (that chunk is already reported)."""

    def __init__(self, tree: _Tree, image_size: int, problems: _Problems) -> None:
        self.tree = tree
        self.block_size = tree.geometry.superblock.data_block_size
        self.image_size = image_size
        self.problems = problems
        self.pending = bytearray()
        self.pending_start = 0  # image offset of pending[0], always block-aligned

    def feed(self, image_offset: int, data: bytes | None) -> None:
        if data is None:
            self.pending.clear()
            return
        if image_offset != self.pending_start + len(self.pending):
            skip = -image_offset % self.block_size
            data = data[skip:]
            self.pending = bytearray()
            self.pending_start = image_offset + skip
        self.pending += data
        end = self.pending_start + len(self.pending)
        whole = len(self.pending) - len(self.pending) % self.block_size
        if end == self.image_size:
            whole = len(self.pending)
        if whole:
            self._verify(bytes(self.pending[:whole]))
            del self.pending[:whole]
            self.pending_start += whole

    def _verify(self, data: bytes) -> None:
        assert self.tree.root is not None
        try:
            verify_data_blocks(self.tree.geometry, self.pending_start // self.block_size, data,
                               self.tree.blocks, self.tree.root)
        except IntegrityError as exc:
            self.problems.add(str(exc))


def _check_frames(f: BinaryIO, report: BlobReport, metadata: BlobMetadata, tree: _Tree | None,
                  problems: _Problems, output: BinaryIO | None, threads: int,
                  blob_hash: hashlib._Hash, progress: Progress | None) -> None:
    """Read the data frames in order; check them on a pool, consume the results in order."""
    table = metadata.table
    stream = None
    if tree is not None and tree.root is not None:
        stream = _VerityStream(tree, table.uncompressed_size, problems)
    image_hash = hashlib.sha256()
    image_complete = True
    threads = threads or os.cpu_count() or 1
    window_size = max(1, min(threads * 2, _WINDOW_BYTES // max(table.chunk_size, 1)))
    window: deque[tuple[int, Future[tuple[bytes | None, str | None]]]] = deque()
    f.seek(0)

    def drain_one() -> None:
        nonlocal image_complete
        index, future = window.popleft()
        data, problem = future.result()
        if problem is not None:
            problems.add(problem)
        report.chunks_checked += 1
        if data is None:
            image_complete = False
        else:
            image_hash.update(data)
        if stream is not None:
            stream.feed(index * table.chunk_size, data)
        if output is not None:
            output.write(data if data is not None else bytes(table.decoded_size(index)))

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lazyfs-check") as pool:
        for index in range(table.chunk_count):
            start, end = metadata.frame_range(index)
            if end - start > _max_frame_size(table.decoded_size(index)):
                problems.add(f"chunk {index} (frame at offset {start}): {end - start} bytes, "
                             f"more than a zstd frame of {table.decoded_size(index)} bytes "
                             f"can take")
                _hash_range(f, start, end, blob_hash, progress, report.blob_size)
                window.append((index, _failed()))
            else:
                frame = read_at(f, start, end - start)
                blob_hash.update(frame)
                window.append((index, pool.submit(_check_chunk, metadata, index, frame, start)))
            if progress is not None:
                progress(end, report.blob_size)
            while len(window) > window_size:
                drain_one()
        while window:
            drain_one()
    if image_complete:
        report.image_digest = "sha256:" + image_hash.hexdigest()


def _failed() -> Future[tuple[bytes | None, str | None]]:
    future: Future[tuple[bytes | None, str | None]] = Future()
    future.set_result((None, None))
    return future


# --- unpack ------------------------------------------------------------------------------------


def unpack_blob(
    path: Path,
    out_path: Path,
    descriptor: Descriptor | None = None,
    *,
    force: bool = False,
    threads: int = 0,
    progress: Progress | None = None,
) -> BlobReport:
    """Decode the blob at `path` into the raw image `out_path`, checking everything first.

    The image is written to a temporary file beside `out_path` and renamed into place only
    when every check passed; on any failure (or Ctrl-C) nothing is left behind. Raises
    BlobCheckError at the first problem, FileExistsError when `out_path` exists and not
    `force`.
    """
    if out_path.exists() and not force:
        raise FileExistsError(f"{out_path} exists (use --force to overwrite it)")
    temp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "xb") as out:
            report = check_blob(path, descriptor, output=out, stop_at_first=True,
                                threads=threads, progress=progress)
            out.flush()
            os.fsync(out.fileno())
        if force:
            os.replace(temp, out_path)
        else:
            os.link(temp, out_path)  # fails if out_path appeared meanwhile: never clobber
            os.unlink(temp)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return report


__all__ = [
    "BlobCheckError",
    "BlobReport",
    "Progress",
    "check_blob",
    "find_descriptor",
    "load_descriptor",
    "read_metadata",
    "scan_annotations",
    "sibling_descriptor_path",
    "unpack_blob",
]
