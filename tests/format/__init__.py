"""Helpers shared by the format tests: hand-built blobs and a veritysetup driver.

Blobs are assembled here from the format library's own pieces (frames, chunk table, verity
payload), so layout tests can build orders and defects that no encoder writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from lazyfs.format.chunk_table import (
    DEFAULT_CHUNK_SIZE,
    HASH_NONE,
    HASH_SHA512,
    ChunkTable,
    chunk_table_digest,
    frame_digest,
    serialize_chunk_table,
)
from lazyfs.format.descriptor import SeekableAnnotations
from lazyfs.format.frames import serialize_skippable_frame
from lazyfs.format.verity_superblock import (
    HASH_TYPE_NORMAL,
    VeritySuperblock,
    root_digest_annotation,
)
from lazyfs.format.verity_tree import VerityTreeBuilder, data_block_digests

FIXED_UUID = uuid.UUID("6c617a79-6673-4000-8000-746573747321")


def build_verity_payload(
    superblock: VeritySuperblock, data_chunks: Iterable[bytes]
) -> tuple[bytes, bytes]:
    """Hash `data_chunks` (block-aligned except the last) and build `(payload, root)`, as the
    converter's encoder does."""
    builder = VerityTreeBuilder(superblock)
    for chunk in data_chunks:
        builder.add_leaf_digests(data_block_digests(builder.geometry, chunk))
    return builder.finish()


def compress(data: bytes, level: int = 3, checksum: bool = True, content_size: bool = False
             ) -> bytes:
    """One standard zstd frame; containerd's defaults are a checksum and no content size."""
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=checksum,
                                    write_content_size=content_size)
    return cctx.compress(data)


def pattern(size: int, seed: int = 0) -> bytes:
    """Deterministic, moderately compressible bytes (text-like runs, not all zeros)."""
    words = [b"lazyfs ", b"erofs ", b"chunk ", b"verity ", b"\x00" * 13, bytes(range(seed % 7, 40))]
    out = bytearray()
    index = seed
    while len(out) < size:
        out += words[index % len(words)]
        index = (index * 1103515245 + 12345) & 0x7FFFFFFF
    return bytes(out[:size])


def make_superblock(
    image_size: int, block_size: int = 4096, hash_name: str = "sha512", salt: bytes = b"",
    hash_type: int = HASH_TYPE_NORMAL, hash_block_size: int | None = None,
    data_blocks: int | None = None,
) -> VeritySuperblock:
    if data_blocks is None:
        data_blocks = -(-image_size // block_size)
    return VeritySuperblock(
        hash_type=hash_type, uuid=FIXED_UUID.bytes, hash_name=hash_name,
        data_block_size=block_size, hash_block_size=hash_block_size or block_size,
        data_blocks=data_blocks, salt=salt,
    )


@dataclass(frozen=True)
class BuiltBlob:
    blob: bytes
    image: bytes
    annotations: SeekableAnnotations
    table: ChunkTable
    table_payload: bytes
    frames: tuple[bytes, ...]
    verity_payload: bytes | None
    root: bytes | None

    def __repr__(self) -> str:
        return (f"BuiltBlob({len(self.blob)} bytes, image {len(self.image)} bytes, "
                f"{self.annotations})")

    @property
    def table_frame(self) -> bytes:
        return self.blob[self.annotations.chunk_table_offset:]

    @property
    def verity_head(self) -> bytes | None:
        if self.annotations.verity_offset is None:
            return None
        return self.blob[self.annotations.verity_offset:]


def build_blob(
    image: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE, verity: VeritySuperblock | None = None,
    verity_first: bool = False, hash_algorithm: int = HASH_SHA512,
) -> BuiltBlob:
    """A seekable EROFS blob of `image`, as containerd lays it out (or verity first)."""
    frames = tuple(compress(image[start:start + chunk_size])
                   for start in range(0, len(image), chunk_size))
    offsets, position = [], 0
    for frame in frames:
        offsets.append(position)
        position += len(frame)
    digests = tuple(frame_digest(frame) if hash_algorithm != HASH_NONE else b""
                    for frame in frames)
    table = ChunkTable(len(image), chunk_size, hash_algorithm, tuple(offsets), digests)
    table_payload = serialize_chunk_table(table)
    table_frame = serialize_skippable_frame(table_payload)
    verity_payload = root = None
    metadata = [table_frame]
    if verity is not None:
        verity_payload, root = build_verity_payload(verity, [image])
        metadata.append(serialize_skippable_frame(verity_payload))
        if verity_first:
            metadata.reverse()
    data = b"".join(frames)
    first_offset, second_offset = len(data), len(data) + len(metadata[0])
    table_offset, verity_offset = first_offset, None
    if verity is not None:
        table_offset, verity_offset = ((second_offset, first_offset) if verity_first
                                       else (first_offset, second_offset))
    annotations = SeekableAnnotations(
        chunk_table_offset=table_offset,
        chunk_digest=chunk_table_digest(table_payload),
        verity_offset=verity_offset,
        root_digest=(root_digest_annotation(verity.hash_name, root)
                     if verity is not None and root is not None else None),
    )
    return BuiltBlob(data + b"".join(metadata), image, annotations, table, table_payload,
                     frames, verity_payload, root)


def flip(buf: bytes, offset: int, mask: int = 0x01) -> bytes:
    return buf[:offset] + bytes([buf[offset] ^ mask]) + buf[offset + 1:]


# --- veritysetup (cryptsetup), the reference implementation of the verity tree ---------------

def _find_veritysetup() -> str | None:
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which("veritysetup", path=search)


VERITYSETUP = _find_veritysetup()
needs_veritysetup = pytest.mark.skipif(VERITYSETUP is None, reason="needs veritysetup")


def pad_to_blocks(data: bytes, block_size: int) -> bytes:
    return data + bytes(-len(data) % block_size)


def veritysetup_format(tmp_path: Path, data: bytes, superblock: VeritySuperblock
                       ) -> tuple[bytes, bytes]:
    """Run `veritysetup format` on `data` (zero-padded); return (hash device bytes, root)."""
    assert VERITYSETUP is not None
    data_path, hash_path = tmp_path / "vs-data", tmp_path / "vs-hash"
    data_path.write_bytes(pad_to_blocks(data, superblock.data_block_size))
    hash_path.unlink(missing_ok=True)
    result = subprocess.run(
        [VERITYSETUP, "format", str(data_path), str(hash_path),
         f"--hash={superblock.hash_name}",
         f"--data-block-size={superblock.data_block_size}",
         f"--hash-block-size={superblock.hash_block_size}",
         f"--salt={superblock.salt.hex() or '-'}",
         f"--uuid={uuid.UUID(bytes=superblock.uuid)}",
         f"--format={superblock.hash_type}"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    roots = [line.split()[-1] for line in result.stdout.splitlines()
             if line.startswith("Root hash:")]
    assert len(roots) == 1, result.stdout
    return hash_path.read_bytes(), bytes.fromhex(roots[0])


def veritysetup_verify(tmp_path: Path, data: bytes, payload: bytes, root: bytes,
                       block_size: int) -> subprocess.CompletedProcess[str]:
    """Run `veritysetup verify` on padded `data` against `payload` as the hash device."""
    assert VERITYSETUP is not None
    data_path, hash_path = tmp_path / "vv-data", tmp_path / "vv-hash"
    data_path.write_bytes(pad_to_blocks(data, block_size))
    hash_path.write_bytes(payload)
    return subprocess.run([VERITYSETUP, "verify", str(data_path), str(hash_path), root.hex()],
                          capture_output=True, text=True, timeout=60)
