"""containerd-written blobs, read with the format library alone, and corrupted region by region.

Each `<name>.blob` comes with `<name>.descriptor.json` (its OCI descriptor) and
`<name>.files.json` (the raw EROFS image's size and sha256). The vectors are used in place.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from lazyfs.format.chunk_table import verify_frame
from lazyfs.format.descriptor import Descriptor, parse_descriptor
from lazyfs.format.errors import FormatError, IntegrityError
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE, decode_chunk_frame
from lazyfs.format.layout import BlobMetadata, parse_metadata
from lazyfs.format.verity_tree import (
    split_tree,
    verify_data_blocks,
    verify_hash_blocks,
)
from tests.format import build_verity_payload, flip, needs_veritysetup, veritysetup_verify


@dataclass(frozen=True)
class Vector:
    name: str
    blob: bytes
    descriptor: Descriptor
    files: dict[str, object]

    def __repr__(self) -> str:
        return f"Vector({self.name})"


@pytest.fixture(scope="module")
def vectors(vectors_dir: Path) -> list[Vector]:
    found = []
    for blob_path in sorted(vectors_dir.glob("*.blob")):
        name = blob_path.name.removesuffix(".blob")
        descriptor_path = vectors_dir / f"{name}.descriptor.json"
        found.append(Vector(
            name, blob_path.read_bytes(),
            parse_descriptor(descriptor_path.read_bytes(), descriptor_path.name),
            json.loads((vectors_dir / f"{name}.files.json").read_text()),
        ))
    assert found, f"no *.blob in {vectors_dir}"
    return found


def _metadata(vector: Vector, blob: bytes | None = None) -> BlobMetadata:
    blob = vector.blob if blob is None else blob
    annotations = vector.descriptor.seekable(vector.name)
    verity_head = None
    if annotations.verity_offset is not None:
        verity_head = blob[annotations.verity_offset:]
    return parse_metadata(annotations, len(blob), blob[annotations.chunk_table_offset:],
                          verity_head)


def _image(vector: Vector, metadata: BlobMetadata) -> bytes:
    chunks = []
    for index in range(metadata.table.chunk_count):
        start, end = metadata.frame_range(index)
        frame = vector.blob[start:end]
        verify_frame(metadata.table, index, frame, start)
        chunks.append(decode_chunk_frame(frame, metadata.table.decoded_size(index), index, start))
    return b"".join(chunks)


def _verity_payload(vector: Vector, metadata: BlobMetadata) -> bytes:
    start = metadata.verity_payload_offset
    return vector.blob[start:start + metadata.verity_payload_size]


def _with_verity(vectors: list[Vector]) -> list[Vector]:
    return [vector for vector in vectors if vector.descriptor.seekable().verity_offset is not None]


def test_descriptor_digest_and_size_match_the_blob(vectors):
    for vector in vectors:
        assert vector.descriptor.size == len(vector.blob), vector.name
        digest = "sha256:" + hashlib.sha256(vector.blob).hexdigest()
        assert vector.descriptor.digest == digest, vector.name


def test_metadata_parses_and_is_pinned_by_the_descriptor(vectors):
    for vector in vectors:
        metadata = _metadata(vector)
        assert metadata.annotations.is_trusted, vector.name
        assert metadata.image_size == vector.files["raw_erofs_size"], vector.name
        assert metadata.table.chunk_count >= 1, vector.name
        if metadata.verity is not None:
            assert metadata.root is not None
            assert metadata.verity.superblock.data_block_size == 4096, vector.name


def test_every_frame_verifies_and_decodes_to_the_image(vectors):
    for vector in vectors:
        image = _image(vector, _metadata(vector))
        assert len(image) == vector.files["raw_erofs_size"], vector.name
        assert hashlib.sha256(image).hexdigest() == vector.files["raw_erofs_sha256"], vector.name


def test_the_whole_blob_is_one_zstd_stream_of_the_image(vectors):
    # SPEC §1: `zstd -d` of the blob yields the raw image; the metadata frames are skipped.
    for vector in vectors:
        reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(vector.blob),
                                                            read_across_frames=True)
        image = reader.read()
        assert hashlib.sha256(image).hexdigest() == vector.files["raw_erofs_sha256"], vector.name


def test_the_verity_tree_verifies_against_the_root(vectors):
    for vector in _with_verity(vectors):
        metadata = _metadata(vector)
        assert metadata.verity is not None and metadata.root is not None
        payload = _verity_payload(vector, metadata)
        blocks = split_tree(metadata.verity, payload)
        assert verify_hash_blocks(metadata.verity, blocks, metadata.root, set()) == set(blocks)
        verify_data_blocks(metadata.verity, 0, _image(vector, metadata), blocks, metadata.root)


def test_our_builder_writes_the_same_verity_payload(vectors):
    for vector in _with_verity(vectors):
        metadata = _metadata(vector)
        assert metadata.verity is not None
        payload, root = build_verity_payload(metadata.verity.superblock,
                                             [_image(vector, metadata)])
        assert root == metadata.root, vector.name
        assert payload == _verity_payload(vector, metadata), vector.name


@needs_veritysetup
def test_veritysetup_verify_agrees(vectors, tmp_path):
    for vector in _with_verity(vectors):
        metadata = _metadata(vector)
        assert metadata.verity is not None and metadata.root is not None
        image, payload = _image(vector, metadata), _verity_payload(vector, metadata)
        block_size = metadata.verity.superblock.data_block_size
        accepted = veritysetup_verify(tmp_path, image, payload, metadata.root, block_size)
        assert accepted.returncode == 0, (vector.name, accepted.stderr)
        rejected = veritysetup_verify(tmp_path, image, payload, flip(metadata.root, 5),
                                      block_size)
        assert rejected.returncode != 0, vector.name


# --- a flipped byte in every region is detected ------------------------------------------------

def _spread(start: int, end: int) -> list[int]:
    """First, middle and last byte of `[start, end)`."""
    return sorted({start, (start + end) // 2, end - 1})


def test_a_flipped_byte_in_a_data_frame_is_detected(vectors):
    for vector in vectors:
        metadata = _metadata(vector)
        count = metadata.table.chunk_count
        for index in sorted({0, count // 2, count - 1}):
            start, end = metadata.frame_range(index)
            frame = vector.blob[start:end]
            for position in _spread(0, len(frame)):
                with pytest.raises(IntegrityError, match=f"chunk {index} "):
                    verify_frame(metadata.table, index, flip(frame, position, 0xFF), start)


def test_a_flipped_byte_in_the_chunk_table_is_detected(vectors):
    for vector in vectors:
        annotations = vector.descriptor.seekable()
        start = annotations.chunk_table_offset
        payload_size = len(_metadata(vector).table_payload)
        positions = [start + 4, *(_spread(start + SKIPPABLE_HEADER_SIZE,
                                          start + SKIPPABLE_HEADER_SIZE + payload_size)),
                     start + SKIPPABLE_HEADER_SIZE + 16, start + SKIPPABLE_HEADER_SIZE + 23]
        for position in positions:
            with pytest.raises(FormatError):
                _metadata(vector, flip(vector.blob, position, 0xFF))
        for position in _spread(start + SKIPPABLE_HEADER_SIZE,
                                start + SKIPPABLE_HEADER_SIZE + payload_size):
            with pytest.raises(IntegrityError, match="chunk table digest mismatch"):
                _metadata(vector, flip(vector.blob, position, 0x01))


# Superblock fields the reader depends on (SPEC §4): signature, version, hash name, block
# sizes, data block count, salt size. The uuid and padding are not covered by any digest.
SUPERBLOCK_FIELDS = {"signature": 0, "version": 8, "hash algorithm": 32,
                     "data block size": 64, "hash block size": 68, "data blocks": 72,
                     "data blocks (high)": 79, "salt size": 80}


def _read_all_or_fail(vector: Vector, blob: bytes) -> None:
    """Parse the metadata and verify the whole tree and image; raises FormatError if bad."""
    metadata = _metadata(vector, blob)
    assert metadata.verity is not None and metadata.root is not None
    start = metadata.verity_payload_offset
    payload = blob[start:start + metadata.verity_payload_size]
    blocks = split_tree(metadata.verity, payload)
    verify_hash_blocks(metadata.verity, blocks, metadata.root, set())
    verify_data_blocks(metadata.verity, 0, _image(vector, metadata), blocks, metadata.root)


def test_a_flipped_byte_in_the_verity_superblock_is_detected(vectors):
    for vector in _with_verity(vectors):
        superblock_at = (vector.descriptor.seekable().verity_offset or 0) + SKIPPABLE_HEADER_SIZE
        _read_all_or_fail(vector, vector.blob)
        for field, offset in SUPERBLOCK_FIELDS.items():
            for mask in (0x01, 0x80):
                with pytest.raises(FormatError):
                    _read_all_or_fail(vector, flip(vector.blob, superblock_at + offset, mask))
                    pytest.fail(f"{vector.name}: superblock {field} ^ {mask:#x} not detected")


def test_a_flipped_byte_in_a_tree_block_is_detected(vectors):
    for vector in _with_verity(vectors):
        metadata = _metadata(vector)
        assert metadata.verity is not None and metadata.root is not None
        payload = _verity_payload(vector, metadata)
        block_size = metadata.verity.superblock.hash_block_size
        for level in metadata.verity.levels:
            for index in range(level.block_count):
                offset = level.payload_offset + index * block_size
                for position in _spread(offset, offset + block_size):
                    blocks = split_tree(metadata.verity, flip(payload, position, 0xFF))
                    with pytest.raises(IntegrityError, match=(
                            f"hash block {index} of level {level.level} "
                            f"\\(payload offset {offset}\\)")):
                        verify_hash_blocks(metadata.verity, blocks, metadata.root, set())


def test_a_flipped_byte_in_the_image_is_caught_by_the_tree(vectors):
    for vector in _with_verity(vectors):
        metadata = _metadata(vector)
        assert metadata.verity is not None and metadata.root is not None
        image = _image(vector, metadata)
        blocks = split_tree(metadata.verity, _verity_payload(vector, metadata))
        block_size = metadata.verity.superblock.data_block_size
        for position in _spread(0, len(image)):
            block = position // block_size
            with pytest.raises(IntegrityError, match=f"data block {block} "):
                verify_data_blocks(metadata.verity, 0, flip(image, position), blocks,
                                   metadata.root)
