"""The chunk table: where each 4 MiB chunk's zstd frame starts, and the SHA-512 of that frame.

Layout (SPEC §3): a 23-byte header `magic | version | uncompressed size | chunk size | hash
algorithm | reserved`, then one entry per chunk: an 8-byte absolute blob offset followed by the
digest of the whole compressed frame (64 bytes for SHA-512, none for algorithm 0).
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from dataclasses import dataclass

from lazyfs.format.errors import (
    BadMagicError,
    FieldError,
    IntegrityError,
    LayoutError,
    TruncatedError,
)

CHUNK_TABLE_MAGIC = 0xCDE4EC67
CHUNK_TABLE_VERSION = 1
HEADER_SIZE = 23
_HEADER = struct.Struct("<IIQIBH")
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024

HASH_NONE = 0
HASH_SHA512 = 1
HASH_DIGEST_SIZES = {HASH_NONE: 0, HASH_SHA512: 64}
_WHAT = "chunk table"


@dataclass(frozen=True)
class ChunkTable:
    """A parsed chunk table. `frame_offsets[i]` is where chunk i's frame starts in the blob."""

    uncompressed_size: int
    chunk_size: int
    hash_algorithm: int
    frame_offsets: tuple[int, ...]
    frame_digests: tuple[bytes, ...]

    @property
    def chunk_count(self) -> int:
        return len(self.frame_offsets)

    @property
    def digest_size(self) -> int:
        return HASH_DIGEST_SIZES[self.hash_algorithm]

    def decoded_size(self, chunk_index: int) -> int:
        """Bytes chunk `chunk_index` decodes to: `chunk_size`, the last one the remainder."""
        start = chunk_index * self.chunk_size
        return min(self.chunk_size, self.uncompressed_size - start)

    def frame_range(self, chunk_index: int, data_end: int) -> tuple[int, int]:
        """Return `(start, end)` blob offsets of chunk `chunk_index`'s frame.

        `data_end` is where the data region ends (the smallest metadata offset).
        """
        start = self.frame_offsets[chunk_index]
        if chunk_index + 1 < self.chunk_count:
            return start, self.frame_offsets[chunk_index + 1]
        return start, data_end

    def chunks_for_range(self, offset: int, size: int) -> range:
        """Chunk indices touched by image bytes `[offset, offset + size)`, clipped to EOF."""
        end = min(offset + size, self.uncompressed_size)
        if size <= 0 or offset >= end:
            return range(0)
        return range(offset // self.chunk_size, (end - 1) // self.chunk_size + 1)


def expected_chunk_count(uncompressed_size: int, chunk_size: int) -> int:
    return -(-uncompressed_size // chunk_size)


def parse_chunk_table(payload: bytes, payload_offset: int = 0) -> ChunkTable:
    """Parse and validate a chunk table payload (without its 8-byte skippable header).

    `payload_offset` is the payload's blob offset, used in messages. Checks magic, version,
    reserved, chunk size, hash algorithm, exact payload length and non-decreasing offsets.
    Raises TruncatedError, BadMagicError, FieldError or LayoutError.
    """
    if len(payload) < HEADER_SIZE:
        raise TruncatedError(f"{_WHAT} header", payload_offset, HEADER_SIZE, len(payload))
    magic, version, uncompressed_size, chunk_size, algorithm, reserved = _HEADER.unpack_from(
        payload, 0
    )
    at = payload_offset
    if magic != CHUNK_TABLE_MAGIC:
        raise BadMagicError(_WHAT, "magic", at, f"0x{CHUNK_TABLE_MAGIC:08X}", f"0x{magic:08X}")
    if version != CHUNK_TABLE_VERSION:
        raise FieldError(_WHAT, "version", at + 4, str(CHUNK_TABLE_VERSION), version)
    if chunk_size == 0:
        raise FieldError(_WHAT, "chunk size", at + 16, "> 0", chunk_size)
    if algorithm not in HASH_DIGEST_SIZES:
        raise FieldError(_WHAT, "hash algorithm", at + 20, "0 (none) or 1 (SHA-512)", algorithm)
    if reserved != 0:
        raise FieldError(_WHAT, "reserved", at + 21, "0", reserved)
    count = expected_chunk_count(uncompressed_size, chunk_size)
    digest_size = HASH_DIGEST_SIZES[algorithm]
    entry_size = 8 + digest_size
    expected_length = HEADER_SIZE + count * entry_size
    if len(payload) != expected_length:
        raise FieldError(
            _WHAT, "payload length", at - 4,
            f"{expected_length} (23 + {count} entries x {entry_size} bytes for "
            f"{uncompressed_size} bytes in chunks of {chunk_size})",
            len(payload),
        )
    offsets: list[int] = []
    digests: list[bytes] = []
    for index in range(count):
        entry_at = HEADER_SIZE + index * entry_size
        (frame_offset,) = struct.unpack_from("<Q", payload, entry_at)
        if offsets and frame_offset < offsets[-1]:
            raise LayoutError(
                f"{_WHAT}: entry {index} at offset {at + entry_at}: frame offset {frame_offset} "
                f"is below the previous entry's {offsets[-1]} (offsets must not decrease)"
            )
        offsets.append(frame_offset)
        digests.append(bytes(payload[entry_at + 8:entry_at + entry_size]))
    return ChunkTable(uncompressed_size, chunk_size, algorithm, tuple(offsets), tuple(digests))


def validate_chunk_layout(table: ChunkTable, data_end: int) -> None:
    """Check the frames tile the data region `[first offset, data_end)`: each non-empty, inside.

    Raises LayoutError naming the chunk and offsets.
    """
    for index, start in enumerate(table.frame_offsets):
        frame_start, frame_end = table.frame_range(index, data_end)
        if start >= data_end:
            raise LayoutError(
                f"{_WHAT}: chunk {index} frame offset {start} is outside the data region "
                f"(which ends at {data_end})"
            )
        if frame_end <= frame_start:
            raise LayoutError(
                f"{_WHAT}: chunk {index} frame at offset {frame_start} is empty "
                f"(next frame starts at {frame_end})"
            )
    if table.chunk_count and table.frame_offsets[0] != 0:
        raise LayoutError(
            f"{_WHAT}: chunk 0 frame starts at offset {table.frame_offsets[0]}, expected 0"
        )
    if not table.chunk_count and data_end != 0:
        raise LayoutError(
            f"{_WHAT}: no chunks, but the data region is {data_end} bytes (expected empty)"
        )


def serialize_chunk_table(table: ChunkTable) -> bytes:
    """The payload bytes of `table` (wrap with `serialize_skippable_frame` for the blob).

    Raises ValueError for a table no reader would accept, so an encoder bug fails at write time.
    """
    _check_serializable(table)
    header = _HEADER.pack(
        CHUNK_TABLE_MAGIC, CHUNK_TABLE_VERSION, table.uncompressed_size, table.chunk_size,
        table.hash_algorithm, 0,
    )
    digest_size = HASH_DIGEST_SIZES[table.hash_algorithm]
    parts = [header]
    for frame_offset, digest in zip(table.frame_offsets, table.frame_digests, strict=True):
        if len(digest) != digest_size:
            raise ValueError(f"digest of {len(digest)} bytes, algorithm wants {digest_size}")
        parts.append(struct.pack("<Q", frame_offset))
        parts.append(digest)
    return b"".join(parts)


def _check_serializable(table: ChunkTable) -> None:
    if table.hash_algorithm not in HASH_DIGEST_SIZES:
        raise ValueError(f"unknown chunk table hash algorithm {table.hash_algorithm}")
    if not 0 < table.chunk_size < 1 << 32:
        raise ValueError(f"chunk size {table.chunk_size} is not in 1..2^32-1")
    if not 0 <= table.uncompressed_size < 1 << 64:
        raise ValueError(f"uncompressed size {table.uncompressed_size} does not fit 64 bits")
    count = expected_chunk_count(table.uncompressed_size, table.chunk_size)
    if table.chunk_count != count or len(table.frame_digests) != count:
        raise ValueError(
            f"{table.chunk_count} frame offsets and {len(table.frame_digests)} digests for "
            f"{count} chunks of {table.chunk_size} in {table.uncompressed_size} bytes"
        )
    if any(not 0 <= offset < 1 << 64 for offset in table.frame_offsets):
        raise ValueError("a frame offset does not fit 64 bits")
    if any(b < a for a, b in itertools.pairwise(table.frame_offsets)):
        raise ValueError("frame offsets decrease")


def frame_digest(frame: bytes | memoryview) -> bytes:
    return hashlib.sha512(frame).digest()


def chunk_table_digest(payload: bytes) -> str:
    """The `chunk_digest` annotation value: `sha512:` + hex of the payload's SHA-512."""
    return "sha512:" + hashlib.sha512(payload).hexdigest()


def verify_chunk_table_digest(payload: bytes, expected: str) -> None:
    """Raise IntegrityError unless `payload` hashes to the `chunk_digest` annotation value."""
    found = chunk_table_digest(payload)
    if found != expected.lower():
        raise IntegrityError(f"{_WHAT} digest mismatch: expected {expected}, found {found}")


def verify_frame(table: ChunkTable, chunk_index: int, frame: bytes, frame_offset: int) -> None:
    """Raise IntegrityError unless `frame` hashes to chunk `chunk_index`'s table entry."""
    if table.hash_algorithm == HASH_NONE:
        return
    check_frame_digest(table, chunk_index, frame_digest(frame), frame_offset, len(frame))


def check_frame_digest(table: ChunkTable, chunk_index: int, found: bytes, frame_offset: int,
                       frame_size: int) -> None:
    """Raise IntegrityError unless `found`, the SHA-512 of a frame (computed as it arrived),
    is chunk `chunk_index`'s table entry. A table without frame hashes checks nothing."""
    if table.hash_algorithm == HASH_NONE:
        return
    expected = table.frame_digests[chunk_index]
    if found != expected:
        raise IntegrityError(
            f"chunk {chunk_index} (frame at offset {frame_offset}, {frame_size} bytes): SHA-512 "
            f"mismatch: expected {expected.hex()[:16]}…, found {found.hex()[:16]}…"
        )
