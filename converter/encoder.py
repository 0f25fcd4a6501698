"""Encode a raw EROFS image into a seekable EROFS blob, streaming, on all cores.

The image is read chunk by chunk; a thread pool compresses each chunk into one zstd frame and
hashes it (zstandard and hashlib release the GIL), while this thread writes frames in order and
feeds the verity tree. Memory is bounded by the in-flight window plus the verity tree, never the
image or the blob.
"""

from __future__ import annotations

import hashlib
import os
import threading
import uuid as uuid_module
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from converter.source import read_up_to
from lazyfs.format.chunk_table import (
    DEFAULT_CHUNK_SIZE,
    HASH_SHA512,
    ChunkTable,
    chunk_table_digest,
    serialize_chunk_table,
)
from lazyfs.format.descriptor import MEDIA_TYPE_EROFS_ZSTD, SeekableAnnotations
from lazyfs.format.frames import serialize_skippable_frame
from lazyfs.format.verity_superblock import (
    HASH_TYPE_NORMAL,
    VeritySuperblock,
    root_digest_annotation,
)
from lazyfs.format.verity_tree import VerityTreeBuilder, data_block_digests

DEFAULT_ZSTD_LEVEL = 3
DEFAULT_VERITY_BLOCK_SIZE = 4096


@dataclass(frozen=True)
class EncodeOptions:
    """How to write the blob; the defaults are containerd's (SPEC §7)."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    zstd_level: int = DEFAULT_ZSTD_LEVEL
    verity: bool = True
    verity_data_block_size: int = DEFAULT_VERITY_BLOCK_SIZE
    verity_hash_block_size: int = DEFAULT_VERITY_BLOCK_SIZE
    verity_hash: str = "sha512"
    verity_hash_type: int = HASH_TYPE_NORMAL
    verity_salt: bytes = b""
    verity_uuid: bytes | None = None  # None: a random UUID, as containerd writes
    threads: int = 0  # 0: one per core

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.chunk_size > 0xFFFFFFFF:
            raise ValueError(f"chunk size must be 1..4294967295 bytes, got {self.chunk_size}")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError(f"zstd level must be 1..22, got {self.zstd_level}")


@dataclass(frozen=True)
class EncodeResult:
    """What was written, with everything a descriptor needs."""

    blob_size: int
    blob_digest: str  # sha256:<hex> of the whole blob
    image_size: int
    image_digest: str  # sha256:<hex> of the raw EROFS image (containerd.io/uncompressed)
    chunk_count: int
    annotations: SeekableAnnotations
    media_type: str = MEDIA_TYPE_EROFS_ZSTD


_thread_state = threading.local()


def _compress_chunk(chunk: bytes, level: int, verity_superblock: VeritySuperblock | None,
                    geometry_hint: object) -> tuple[bytes, bytes, bytes]:
    """Compress one chunk into one frame; return (frame, frame SHA-512, leaf digests)."""
    compressor = getattr(_thread_state, "compressor", None)
    if compressor is None or _thread_state.level != level:
        compressor = zstandard.ZstdCompressor(level=level, write_checksum=True,
                                              write_content_size=False)
        _thread_state.compressor, _thread_state.level = compressor, level
    frame = compressor.compress(chunk)
    leaves = b""
    if verity_superblock is not None:
        leaves = data_block_digests(geometry_hint, chunk)  # type: ignore[arg-type]
    return frame, hashlib.sha512(frame).digest(), leaves


def encode_image(
    image: BinaryIO,
    image_size: int,
    out: BinaryIO,
    options: EncodeOptions | None = None,
    progress: Callable[[int], None] | None = None,
) -> EncodeResult:
    """Write the seekable blob of the `image_size`-byte raw image read from `image` to `out`.

    `progress` is called with the number of image bytes done. Raises ValueError for options
    that cannot apply (dm-verity of an empty image) and OSError from the streams.
    """
    options = options or EncodeOptions()
    superblock: VeritySuperblock | None = None
    builder: VerityTreeBuilder | None = None
    if options.verity:
        data_blocks = -(-image_size // options.verity_data_block_size)
        if data_blocks == 0:
            raise ValueError("the image is empty: dm-verity needs at least one data block "
                             "(convert without dm-verity)")
        superblock = VeritySuperblock(
            hash_type=options.verity_hash_type,
            uuid=options.verity_uuid or uuid_module.uuid4().bytes,
            hash_name=options.verity_hash,
            data_block_size=options.verity_data_block_size,
            hash_block_size=options.verity_hash_block_size,
            data_blocks=data_blocks,
            salt=options.verity_salt,
        )
        builder = VerityTreeBuilder(superblock)
    # Leaf digests can be computed per chunk only when chunks hold whole data blocks.
    parallel_leaves = superblock is not None and (
        options.chunk_size % superblock.data_block_size == 0
    )
    carry = b""

    blob_hash = hashlib.sha256()
    image_hash = hashlib.sha256()
    offsets: list[int] = []
    digests: list[bytes] = []
    position = 0

    def write(data: bytes) -> None:
        nonlocal position
        out.write(data)
        blob_hash.update(data)
        position += len(data)

    threads = options.threads or os.cpu_count() or 1
    window: deque[Future[tuple[bytes, bytes, bytes]]] = deque()
    done_bytes = 0
    chunk_count = -(-image_size // options.chunk_size)

    def drain_one() -> None:
        nonlocal carry
        frame, frame_hash, leaves = window.popleft().result()
        offsets.append(position)
        digests.append(frame_hash)
        write(frame)
        if builder is not None and parallel_leaves:
            builder.add_leaf_digests(leaves)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lazyfs-encode") as pool:
        for chunk_index in range(chunk_count):
            want = min(options.chunk_size, image_size - chunk_index * options.chunk_size)
            chunk = read_up_to(image, want)
            if len(chunk) != want:
                raise ValueError(f"image ended at byte {done_bytes + len(chunk)}, "
                                 f"expected {image_size} bytes")
            image_hash.update(chunk)
            if builder is not None and not parallel_leaves:
                block_size = builder.geometry.superblock.data_block_size
                carry += chunk
                whole = len(carry) - len(carry) % block_size
                builder.add_leaf_digests(data_block_digests(builder.geometry, carry[:whole]))
                carry = carry[whole:]
            window.append(pool.submit(
                _compress_chunk, chunk, options.zstd_level,
                superblock if parallel_leaves else None,
                builder.geometry if builder is not None else None,
            ))
            done_bytes += len(chunk)
            while len(window) > threads * 2:
                drain_one()
            if progress is not None:
                progress(done_bytes)
        while window:
            drain_one()
    if image.read(1):
        raise ValueError(f"image is longer than the {image_size} bytes expected")
    if builder is not None and carry:
        builder.add_leaf_digests(data_block_digests(builder.geometry, carry))

    table = ChunkTable(image_size, options.chunk_size, HASH_SHA512, tuple(offsets),
                       tuple(digests))
    table_payload = serialize_chunk_table(table)
    chunk_table_offset = position
    write(serialize_skippable_frame(table_payload))
    verity_offset: int | None = None
    root_digest: str | None = None
    if builder is not None and superblock is not None:
        verity_payload, root = builder.finish()
        verity_offset = position
        write(serialize_skippable_frame(verity_payload))
        root_digest = root_digest_annotation(superblock.hash_name, root)
    annotations = SeekableAnnotations(
        chunk_table_offset=chunk_table_offset,
        chunk_digest=chunk_table_digest(table_payload),
        verity_offset=verity_offset,
        root_digest=root_digest,
    )
    return EncodeResult(
        blob_size=position,
        blob_digest="sha256:" + blob_hash.hexdigest(),
        image_size=image_size,
        image_digest="sha256:" + image_hash.hexdigest(),
        chunk_count=chunk_count,
        annotations=annotations,
    )
