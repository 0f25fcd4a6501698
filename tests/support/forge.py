"""Forged frames: what a hostile server or mirror could send, for the integrity tests.

A forged frame has one byte changed inside a raw (stored, uncompressed) zstd block and the
frame's content checksum recomputed, so it has the same length and decodes cleanly, to wrong
bytes: zstd itself does not notice. Only lazyfs's own checks can stop it: the frame's SHA-512
in the chunk table, and every data block against the dm-verity tree. With `table=True` the
chunk table entry and `chunk_digest` are forged as well (and with `blob_digest=True` the
descriptor's sha256 of the whole blob), so that dm-verity alone stands between the forgery
and a reader.

zstd stores a block raw when compressing does not make it smaller, so a layer whose attacked
file holds random bytes has raw blocks there.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import xxhash
import zstandard

from lazyfs.format.chunk_table import chunk_table_digest, frame_digest, serialize_chunk_table
from lazyfs.format.descriptor import (
    ANNOTATION_CHUNK_DIGEST,
    SeekableAnnotations,
    parse_annotations,
    parse_descriptor,
)
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE, ZSTD_MAGIC
from lazyfs.format.layout import BlobMetadata, parse_metadata

_BLOCK_RAW, _BLOCK_RLE = 0, 1
_FCS_FIELD_SIZES = (0, 2, 4, 8)
_DICT_ID_FIELD_SIZES = (0, 1, 2, 4)


class NoRawBlockError(ValueError):
    """The frame has no raw block (at the wanted offset) to forge."""


@dataclass(frozen=True)
class RawBlock:
    """A raw zstd block: where its bytes start in the frame, how many there are."""

    content_offset: int
    size: int


def raw_blocks(frame: bytes) -> list[RawBlock]:
    """The raw blocks of the standard zstd frame `frame`, which must carry a checksum."""
    magic, descriptor = struct.unpack_from("<IB", frame, 0)
    assert magic == ZSTD_MAGIC, f"not a zstd frame: magic 0x{magic:08X}"
    assert descriptor & 0x04, "the frame carries no content checksum"
    single_segment = bool(descriptor & 0x20)
    fcs_flag = descriptor >> 6
    fcs_size = _FCS_FIELD_SIZES[fcs_flag] if (fcs_flag or not single_segment) else 1
    position = 5 + (0 if single_segment else 1) + _DICT_ID_FIELD_SIZES[descriptor & 0x03]
    position += fcs_size
    found = []
    while True:
        header = int.from_bytes(frame[position:position + 3], "little")
        block_type, block_size = (header >> 1) & 3, header >> 3
        if block_type == _BLOCK_RAW:
            found.append(RawBlock(position + 3, block_size))
        position += 3 + (1 if block_type == _BLOCK_RLE else block_size)
        if header & 1:
            break
    assert position + 4 == len(frame), "trailing bytes after the frame's checksum"
    return found


def decode_frame(frame: bytes) -> bytes:
    """Decode one zstd frame with zstandard, content checksum checked."""
    return zstandard.ZstdDecompressor().decompressobj().decompress(frame)


def content_checksum(decoded: bytes) -> bytes:
    """A zstd frame's content checksum: the low 32 bits of XXH64(content, seed 0)."""
    return struct.pack("<I", xxhash.xxh64_intdigest(decoded, 0) & 0xFFFFFFFF)


def forge_frame(frame: bytes, decoded_offset: int | None = None,
                mask: int = 0x01) -> tuple[bytes, int]:
    """XOR one byte of a raw block with `mask` and recompute the content checksum.

    The byte is the one that decodes to `decoded_offset`, else the middle of the first raw
    block. Returns (forged frame, decoded offset of the changed byte). Raises NoRawBlockError.
    """
    decoded = decode_frame(frame)
    for block in raw_blocks(frame):
        content = frame[block.content_offset:block.content_offset + block.size]
        start = decoded.find(content)
        if start < 0 or decoded.find(content, start + 1) >= 0:
            continue  # not placeable with certainty (repeated data): not worth the risk
        if decoded_offset is None:
            position = block.size // 2
        elif start <= decoded_offset < start + block.size:
            position = decoded_offset - start
        else:
            continue
        forged = bytearray(frame)
        forged[block.content_offset + position] ^= mask
        changed = bytearray(decoded)
        changed[start + position] ^= mask
        forged[-4:] = content_checksum(bytes(changed))
        return bytes(forged), start + position
    where = "" if decoded_offset is None else f" at decoded offset {decoded_offset}"
    raise NoRawBlockError(f"no raw block{where} in this frame of {len(frame)} bytes")


@dataclass(frozen=True)
class Forgery:
    """One forged frame in a blob, and what it decodes to before and after."""

    chunk_index: int
    chunk_size: int
    image_offset: int  # where the changed byte lies in the raw EROFS image
    frame_offset: int
    original_chunk: bytes
    forged_chunk: bytes
    blob: bytes  # the whole forged blob
    chunk_digest: str  # the chunk_digest that authenticates the blob's (maybe forged) table

    @property
    def blob_digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()

    @property
    def forged_window(self) -> bytes:
        """The forged byte with 31 bytes either side: what no reader may ever see."""
        offset = self.image_offset - self.chunk_index * self.chunk_size
        return self.forged_chunk[max(offset - 31, 0):offset + 32]


def blob_metadata(blob: bytes, annotations: SeekableAnnotations) -> BlobMetadata:
    """Parse the metadata of a whole blob held in memory (authenticated by `annotations`)."""
    verity_head = None
    if annotations.verity_offset is not None:
        verity_head = blob[annotations.verity_offset:]
    return parse_metadata(annotations, len(blob), blob[annotations.chunk_table_offset:],
                          verity_head)


def forge_blob(blob: bytes, annotations: SeekableAnnotations, image_offset: int | None = None,
               *, table: bool = False, mask: int = 0x01) -> Forgery:
    """Forge the frame holding image byte `image_offset` (else the first frame with a raw
    block); with `table`, also its chunk table entry. The blob keeps its length."""
    metadata = blob_metadata(blob, annotations)
    chunk_table = metadata.table
    if image_offset is None:
        candidates = list(range(chunk_table.chunk_count))
    else:
        candidates = [image_offset // chunk_table.chunk_size]
    for index in candidates:
        start, end = metadata.frame_range(index)
        frame = blob[start:end]
        wanted = None if image_offset is None else image_offset - index * chunk_table.chunk_size
        try:
            forged_frame, decoded_offset = forge_frame(frame, wanted, mask)
        except NoRawBlockError:
            if image_offset is not None:
                raise
            continue
        forged = bytearray(blob)
        forged[start:end] = forged_frame
        chunk_digest = annotations.chunk_digest or chunk_table_digest(metadata.table_payload)
        if table:
            digests = list(chunk_table.frame_digests)
            digests[index] = frame_digest(forged_frame)
            payload = serialize_chunk_table(replace(chunk_table, frame_digests=tuple(digests)))
            assert len(payload) == len(metadata.table_payload)
            at = annotations.chunk_table_offset + SKIPPABLE_HEADER_SIZE
            forged[at:at + len(payload)] = payload
            chunk_digest = chunk_table_digest(payload)
        return Forgery(index, chunk_table.chunk_size,
                       index * chunk_table.chunk_size + decoded_offset, start,
                       decode_frame(frame), decode_frame(forged_frame), bytes(forged),
                       chunk_digest)
    raise NoRawBlockError("no frame of the blob has a raw block")


def forge_layer(blob_path: Path, descriptor_path: Path, image_offset: int | None = None, *,
                table: bool = False, blob_digest: bool = False, mask: int = 0x01) -> Forgery:
    """Forge the blob file in place; rewrite its descriptor's `chunk_digest` (with `table`)
    and its blob digest (with `blob_digest`). The dm-verity root is never touched."""
    document = json.loads(descriptor_path.read_text())
    annotations = parse_descriptor(descriptor_path.read_text()).seekable(str(descriptor_path))
    forgery = forge_blob(blob_path.read_bytes(), annotations, image_offset, table=table,
                         mask=mask)
    blob_path.write_bytes(forgery.blob)
    if table:
        document["annotations"][ANNOTATION_CHUNK_DIGEST] = forgery.chunk_digest
    if blob_digest:
        document["digest"] = forgery.blob_digest
    if table or blob_digest:
        descriptor_path.write_text(json.dumps(document, indent=2))
    return forgery


def forge_annotations(annotations: dict[str, str], forgery: Forgery) -> dict[str, str]:
    """A layer descriptor's annotations that authenticate `forgery`'s (forged) chunk table."""
    parse_annotations(annotations)  # they must be seekable EROFS annotations to begin with
    return {**annotations, ANNOTATION_CHUNK_DIGEST: forgery.chunk_digest}


def image_offset_of(image: bytes, content: bytes) -> int:
    """Where `content` (unique, e.g. random bytes of a file) lies in the raw image."""
    offset = image.find(content)
    assert offset >= 0, "content not found in the image"
    assert image.find(content, offset + 1) < 0, "content found twice in the image"
    return offset


def read_pages(path: Path) -> dict[int, bytes | None]:
    """Each 4 KiB page of a file: its bytes, or None where the read failed with EIO."""
    pages: dict[int, bytes | None] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, os.fstat(fd).st_size, 4096):
            try:
                pages[offset] = os.pread(fd, 4096, offset)
            except OSError as exc:
                assert exc.errno == errno.EIO, exc
                pages[offset] = None
    finally:
        os.close(fd)
    return pages
