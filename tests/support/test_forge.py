"""The forging helper itself: a forged frame is as long as the original, decodes cleanly with
zstandard (content checksum included) and to different bytes, in exactly one place."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import zstandard

from lazyfs.format.chunk_table import verify_frame
from lazyfs.format.descriptor import parse_descriptor
from lazyfs.format.errors import IntegrityError
from lazyfs.format.verity_tree import split_tree, verify_data_blocks, verify_hash_blocks
from tests.layer.helpers import write_blob
from tests.support.forge import (
    NoRawBlockError,
    blob_metadata,
    decode_frame,
    forge_frame,
    forge_layer,
    raw_blocks,
)

NOISE = random.Random(7).randbytes(300_000)


def test_forged_frame_decodes_cleanly_to_other_bytes() -> None:
    frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(NOISE)
    assert raw_blocks(frame), "random data must be stored in raw blocks"
    forged, offset = forge_frame(frame, 200_000)
    assert offset == 200_000 and len(forged) == len(frame) and forged != frame
    decoded = zstandard.ZstdDecompressor().decompress(forged)  # checksum verified here
    assert len(decoded) == len(NOISE) and decoded != NOISE
    assert [i for i in range(len(NOISE)) if decoded[i] != NOISE[i]] == [200_000]
    # Without the recomputed checksum zstd itself would refuse it: the checksum is the point.
    unchecked = bytearray(forged)
    unchecked[-4:] = frame[-4:]
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(bytes(unchecked))


def test_compressible_frame_has_nothing_to_forge() -> None:
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(b"abc" * 100_000)
    assert raw_blocks(frame) == []
    with pytest.raises(NoRawBlockError):
        forge_frame(frame)


@pytest.mark.parametrize("table", [False, True])
def test_forged_layer_passes_zstd_and_what_is_forged(tmp_path: Path, table: bool) -> None:
    image = b"\0" * 70_000 + NOISE + b"\0" * 50_000
    blob_path, _ = write_blob(tmp_path, image, chunk_size=128 * 1024)
    descriptor_path = tmp_path / "layer.descriptor.json"
    authentic = parse_descriptor(descriptor_path.read_text())
    original_blob = blob_path.read_bytes()

    forgery = forge_layer(blob_path, descriptor_path, 200_000, table=table, blob_digest=table)
    forged_blob = blob_path.read_bytes()
    assert len(forged_blob) == len(original_blob) and forged_blob == forgery.blob
    assert forgery.image_offset == 200_000 and forgery.chunk_index == 1
    assert forgery.forged_chunk != forgery.original_chunk
    assert forgery.original_chunk == image[128 * 1024:256 * 1024]
    reader = zstandard.ZstdDecompressor().stream_reader(forged_blob, read_across_frames=True)
    assert reader.read() == (  # the whole blob decodes as a zstd stream, every checksum ok
        image[:200_000] + bytes([image[200_000] ^ 1]) + image[200_001:]
    )
    descriptor = parse_descriptor(descriptor_path.read_text())
    annotations = descriptor.seekable()
    assert annotations.root_digest == authentic.seekable().root_digest  # never forged
    metadata = blob_metadata(forged_blob, annotations)  # the table digest holds
    start, end = metadata.frame_range(1)
    frame = forged_blob[start:end]
    assert decode_frame(frame) == forgery.forged_chunk
    if table:
        assert descriptor.digest == forgery.blob_digest != authentic.digest
        verify_frame(metadata.table, 1, frame, start)  # the forged table vouches for it
    else:
        assert descriptor == authentic
        with pytest.raises(IntegrityError, match="SHA-512 mismatch"):
            verify_frame(metadata.table, 1, frame, start)
    # dm-verity is never fooled.
    geometry, root = metadata.verity, metadata.root
    assert geometry is not None and root is not None
    payload_at = metadata.verity_payload_offset
    blocks = split_tree(geometry, forged_blob[payload_at:payload_at + metadata.verity_payload_size])
    verify_hash_blocks(geometry, blocks, root, set())
    with pytest.raises(IntegrityError, match=r"data block 48 \(image offset 196608\)"):
        verify_data_blocks(geometry, 32, forgery.forged_chunk, blocks, root)
