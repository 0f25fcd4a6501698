"""The disk cache against forged data (tests/support/forge.py: frames that decode cleanly to
wrong bytes) put where a read finds it: a frame, the hash blocks kept for a chunk, a layer's
metadata entry. What is read back is checked again (a frame by its SHA-512 from the chunk
table, or where the table lists none by dm-verity), so a forgery there is dropped, logged,
and the true bytes fetched from the source: a reader never sees it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio

from lazyfs.cache.disk import DiskCache, DiskCacheOptions
from lazyfs.cache.keys import frame_key, layer_key, tree_key
from lazyfs.format.chunk_table import HASH_NONE
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.verity_tree import VerityGeometry, data_block_digests, hash_blocks_needed
from lazyfs.layer.disk_entries import pack_blocks, pack_metadata
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.open import LayerSource
from tests.format import build_blob, make_superblock
from tests.layer.helpers import open_with_level0_on_demand, run_with_layer, write_blob
from tests.layer.test_forged_frames import CHUNK, IMAGE, TARGET, read_pieces
from tests.support.forge import Forgery, blob_metadata, forge_blob

NO_READAHEAD = ImageTuning(readahead_chunks=0)
BAD = TARGET // CHUNK

# case: (dm-verity in the blob, frame hashes in the chunk table, what catches it read back)
CASES = {
    "frame-hash": (True, True, "SHA-512 mismatch"),
    "frame-hash-alone": (False, True, "SHA-512 mismatch"),
    "verity-alone": (True, False, "dm-verity: data block"),
}


def layer(directory: Path, case: str) -> tuple[LayerSource, Forgery, BlobMetadata]:
    """A true layer as the source serves it; a forgery of its frame holding TARGET (not
    written anywhere yet); the layer's metadata."""
    verity, hashes, _ = CASES[case]
    if hashes:
        blob, result = write_blob(directory, IMAGE, chunk_size=CHUNK, verity=verity)
        source, annotations = LayerSource(str(blob)), result.annotations
    else:
        built = build_blob(IMAGE, chunk_size=CHUNK, verity=make_superblock(len(IMAGE)),
                           hash_algorithm=HASH_NONE)
        blob = directory / "layer.blob"
        blob.write_bytes(built.blob)
        annotations = built.annotations
        source = LayerSource(str(blob), chunk_table_offset=annotations.chunk_table_offset,
                             chunk_digest=annotations.chunk_digest,
                             verity_offset=annotations.verity_offset,
                             root_digest=annotations.root_digest)
    metadata = blob_metadata(blob.read_bytes(), annotations)
    assert (metadata.table.hash_algorithm != HASH_NONE) == hashes
    return source, forge_blob(blob.read_bytes(), annotations, TARGET), metadata


def forged_frame(forgery: Forgery, metadata: BlobMetadata) -> bytes:
    start, end = metadata.frame_range(forgery.chunk_index)
    return forgery.blob[start:end]


def put(disk: DiskCacheOptions, key: str, data: bytes) -> None:
    store = DiskCache.open(disk).store
    store.put(key, data)
    store.close()


def assert_never_forged(pieces: Mapping[int, bytes | None], forgery: Forgery) -> None:
    """Every piece read is the image's own (the source has the true bytes: none fails)."""
    for offset, data in pieces.items():
        assert data is not None, offset
        assert data == IMAGE[offset:offset + len(data)], offset
        assert forgery.forged_window not in data


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_forged_frame_in_the_disk_cache_is_never_served(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    source, forgery, metadata = layer(tmp_path, case)
    disk = DiskCacheOptions(str(tmp_path / "cache"), 64 << 20)
    put(disk, frame_key(metadata, BAD) or "", forged_frame(forgery, metadata))

    async def body(image: RemoteImage) -> object:
        return await read_pieces(image, 4096), image.stats_snapshot()

    with caplog.at_level(logging.WARNING):
        pieces, stats = run_with_layer(source, body, disk=disk, tuning=NO_READAHEAD)
    assert_never_forged(pieces, forgery)
    (warning,) = warnings_of(caplog)
    assert f"chunk {BAD}: the disk cache's copy failed" in warning and CASES[case][2] in warning
    assert stats["chunks_fetched"] == stats["chunk_count"] and stats["bad_chunks"] == []


def forged_level0(geometry: VerityGeometry, blocks: Mapping[int, bytes],
                  forgery: Forgery) -> dict[int, bytes]:
    """The level-0 blocks `blocks` with the digests of the forged chunk's data blocks."""
    first = forgery.chunk_index * CHUNK // geometry.superblock.data_block_size
    digests = data_block_digests(geometry, forgery.forged_chunk)
    forged = {offset: bytearray(block) for offset, block in blocks.items()}
    for number in range(len(digests) // geometry.digest_size):
        slot = geometry.slot_for(0, first + number)
        digest = digests[number * geometry.digest_size:(number + 1) * geometry.digest_size]
        forged[slot.payload_offset][slot.slot_offset:slot.slot_offset + len(digest)] = digest
    return {offset: bytes(block) for offset, block in forged.items()}


def tree_blocks(metadata: BlobMetadata, blob: bytes, *, level0_of_bad_only: bool
                ) -> dict[int, bytes]:
    """The blob's hash blocks by payload offset: the level-0 ones covering the bad chunk, or
    the whole tree."""
    geometry = metadata.verity
    assert geometry is not None
    size, base = geometry.superblock.hash_block_size, metadata.verity_payload_offset
    if level0_of_bad_only:
        first = BAD * CHUNK // geometry.superblock.data_block_size
        level0 = geometry.levels[0].payload_offset
        offsets = [offset for offset in hash_blocks_needed(geometry, first, CHUNK // 4096)
                   if offset >= level0]
    else:
        count = sum(level.block_count for level in geometry.levels)
        offsets = list(range(geometry.tree_offset, geometry.tree_offset + count * size, size))
    return {offset: blob[base + offset:base + offset + size] for offset in offsets}


def test_forged_hash_blocks_kept_for_a_chunk_are_never_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A layer checked by dm-verity when read back, whose level-0 blocks are loaded on demand:
    a forged frame and level-0 blocks forged to match it, both on disk. Only the check of
    kept hash blocks against the levels above stops them."""
    source, forgery, metadata = layer(tmp_path, "verity-alone")
    disk = DiskCacheOptions(str(tmp_path / "cache"), 64 << 20)
    assert metadata.verity is not None
    true_blocks = tree_blocks(metadata, forgery.blob, level0_of_bad_only=True)
    forged = forged_level0(metadata.verity, true_blocks, forgery)
    assert forged != true_blocks
    put(disk, frame_key(metadata, BAD) or "", forged_frame(forgery, metadata))
    put(disk, tree_key(layer_key(metadata.annotations) or "", BAD),
        pack_blocks(b"LZFSTREE\x01", forged))

    async def run() -> dict[int, bytes | None]:
        store = DiskCache.open(disk)
        async with trio.open_nursery() as nursery:
            image = await open_with_level0_on_demand(source, store, nursery, NO_READAHEAD)
            pieces = await read_pieces(image, 4096)
            await image.aclose()
        await store.aclose()
        return pieces

    with caplog.at_level(logging.WARNING):
        pieces = trio.run(run)
    assert_never_forged(pieces, forgery)
    (warning,) = warnings_of(caplog)
    assert f"chunk {BAD}: the disk cache's copy failed" in warning and "hash blocks" in warning


def test_a_metadata_entry_with_a_forged_tree_is_never_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A metadata entry whose level-0 blocks are forged to match a forged frame kept on disk:
    the entry is checked against the root and dropped; then the frame fails too."""
    source, forgery, metadata = layer(tmp_path, "verity-alone")
    disk = DiskCacheOptions(str(tmp_path / "cache"), 64 << 20)
    assert metadata.verity is not None
    whole = tree_blocks(metadata, forgery.blob, level0_of_bad_only=False)
    forged = {**whole, **forged_level0(
        metadata.verity, tree_blocks(metadata, forgery.blob, level0_of_bad_only=True), forgery)}
    put(disk, layer_key(metadata.annotations) or "", pack_metadata(metadata, forged))
    put(disk, frame_key(metadata, BAD) or "", forged_frame(forgery, metadata))

    async def body(image: RemoteImage) -> object:
        return await read_pieces(image, 4096)

    with caplog.at_level(logging.WARNING):
        pieces = run_with_layer(source, body, disk=disk, tuning=NO_READAHEAD)
    assert_never_forged(pieces, forgery)
    first, second = warnings_of(caplog)
    assert "metadata entry" in first and "dm-verity" in first
    assert f"chunk {BAD}: the disk cache's copy failed" in second
