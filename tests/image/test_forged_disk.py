"""The disk cache against forged data (tests/support/forge.py: frames that decode cleanly to
wrong bytes) put where a read finds it: a frame, the hash blocks kept for a chunk, a layer's
metadata entry. Everything read back is checked as fetched data is, so a forgery there is
dropped and never served; where the source has the true bytes, the read gets them."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio

from lazyfs.cache.disk import DiskCache, DiskCacheOptions
from lazyfs.format.descriptor import parse_descriptor
from lazyfs.format.layout import BlobMetadata
from lazyfs.format.verity_tree import VerityGeometry, data_block_digests, hash_blocks_needed
from lazyfs.image.disk_tier import pack_blocks, pack_metadata
from lazyfs.image.errors import ImageReadError
from lazyfs.image.keys import frame_key, layer_key, tree_key
from lazyfs.image.open import LayerSource
from lazyfs.image.remote_image import RemoteImage
from lazyfs.image.tuning import ImageTuning
from tests.image.helpers import open_with_level0_on_demand, run_with_layer, write_blob
from tests.image.test_forged_frames import CHUNK, IMAGE, TARGET, read_pieces
from tests.support.forge import Forgery, blob_metadata, forge_blob, forge_layer

NO_READAHEAD = ImageTuning(readahead_chunks=0)
BAD = TARGET // CHUNK

# case: (dm-verity in the blob, chunk table and chunk_digest forged too)
CASES = {
    "frame-hash": (True, False),
    "frame-hash-alone": (False, False),
    "verity-alone": (True, True),
}


def forged_setup(directory: Path, case: str) -> tuple[Path, Forgery, BlobMetadata]:
    """The layer as the source serves it, the forgery, and the metadata the descriptor
    authenticates. With a forged table the source serves the forged blob (so only the
    dm-verity root is left to catch it); else the source's blob is true."""
    verity, table = CASES[case]
    blob, _ = write_blob(directory, IMAGE, chunk_size=CHUNK, verity=verity)
    descriptor = blob.with_name("layer.descriptor.json")
    if table:
        forgery = forge_layer(blob, descriptor, TARGET, table=True)
    else:
        annotations = parse_descriptor(descriptor.read_text()).seekable(str(descriptor))
        forgery = forge_blob(blob.read_bytes(), annotations, TARGET)
    annotations = parse_descriptor(descriptor.read_text()).seekable(str(descriptor))
    return blob, forgery, blob_metadata(forgery.blob, annotations)


def forged_frame(forgery: Forgery, metadata: BlobMetadata) -> bytes:
    start, end = metadata.frame_range(forgery.chunk_index)
    return forgery.blob[start:end]


def put(disk: DiskCacheOptions, key: str, data: bytes) -> None:
    store = DiskCache.open(disk).store
    store.delete(key)
    store.put(key, data)
    store.close()


def never_forged(pieces: Mapping[int, bytes | None], forgery: Forgery) -> list[int]:
    """The offsets whose reads failed; every other piece is the image's own."""
    for offset, data in pieces.items():
        if data is not None:
            assert data == IMAGE[offset:offset + len(data)], offset
            assert forgery.forged_window not in data
    return [offset for offset, data in pieces.items() if data is None]


def bad_chunk_pages() -> list[int]:
    return list(range(BAD * CHUNK, (BAD + 1) * CHUNK, 4096))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_forged_frame_in_the_disk_cache_is_never_served(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    blob, forgery, metadata = forged_setup(tmp_path, case)
    disk = DiskCacheOptions(str(tmp_path / "cache"), 64 << 20)
    put(disk, frame_key(metadata, BAD) or "", forged_frame(forgery, metadata))

    async def body(image: RemoteImage) -> object:
        return await read_pieces(image, 4096), image.stats_snapshot()

    with caplog.at_level(logging.WARNING):
        pieces, stats = run_with_layer(LayerSource(str(blob)), body, disk=disk,
                                       tuning=NO_READAHEAD)
    failed = never_forged(pieces, forgery)
    source_forged = CASES[case][1]
    assert failed == (bad_chunk_pages() if source_forged else [])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"chunk {BAD}: the disk cache's copy failed" in warnings[0]
    assert stats["bad_chunks"] == ([BAD] if source_forged else [])
    assert stats["chunks_from_disk"] == 0


def _forged_level0(geometry: VerityGeometry, blocks: Mapping[int, bytes],
                   forgery: Forgery) -> dict[int, bytes]:
    """The level-0 blocks covering the forged chunk, rewritten to match its forged data."""
    first = forgery.chunk_index * CHUNK // geometry.superblock.data_block_size
    digests = data_block_digests(geometry, forgery.forged_chunk)
    forged = {offset: bytearray(block) for offset, block in blocks.items()}
    for number in range(len(digests) // geometry.digest_size):
        slot = geometry.slot_for(0, first + number)
        digest = digests[number * geometry.digest_size:(number + 1) * geometry.digest_size]
        forged[slot.payload_offset][slot.slot_offset:slot.slot_offset + len(digest)] = digest
    return {offset: bytes(block) for offset, block in forged.items()}


def _level0_of_chunk(metadata: BlobMetadata, blob: bytes) -> dict[int, bytes]:
    geometry = metadata.verity
    assert geometry is not None
    first = BAD * CHUNK // geometry.superblock.data_block_size
    size = geometry.superblock.hash_block_size
    base = metadata.verity_payload_offset
    level0 = geometry.levels[0].payload_offset
    return {offset: blob[base + offset:base + offset + size]
            for offset in hash_blocks_needed(geometry, first, CHUNK // 4096) if offset >= level0}


def test_forged_hash_blocks_kept_for_a_chunk_are_never_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A forged frame and, for the chunk, level-0 hash blocks forged to match it (the table
    forged too): only the check of kept hash blocks against the levels above stops them."""
    blob, forgery, metadata = forged_setup(tmp_path, "verity-alone")
    disk = DiskCacheOptions(str(tmp_path / "cache"), 64 << 20)
    assert metadata.verity is not None
    level0 = _level0_of_chunk(metadata, forgery.blob)
    forged = _forged_level0(metadata.verity, level0, forgery)
    assert forged != level0
    put(disk, frame_key(metadata, BAD) or "", forged_frame(forgery, metadata))
    put(disk, tree_key(layer_key(metadata.annotations) or "", BAD),
        pack_blocks(b"LZFSTREE\x01", forged))

    async def run() -> tuple[dict[int, bytes | None], dict]:  # type: ignore[type-arg]
        store = DiskCache.open(disk)
        async with trio.open_nursery() as nursery:
            image = await open_with_level0_on_demand(LayerSource(str(blob)), store, nursery,
                                                     NO_READAHEAD)
            pieces = await read_pieces(image, 4096)
            await image.aclose()
        await store.aclose()
        return pieces, image.stats_snapshot()

    with caplog.at_level(logging.WARNING):
        pieces, stats = trio.run(run)
    assert never_forged(pieces, forgery) == bad_chunk_pages()
    assert stats["bad_chunks"] == [BAD] and stats["chunks_from_disk"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("disk cache's copy failed" in w and "hash blocks" in w for w in warnings)


def test_a_metadata_entry_with_a_forged_tree_is_never_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A metadata entry whose level-0 blocks are forged to match a forged frame kept on disk
    (the table forged too): the entry is checked against the root and dropped."""
    blob, forgery, metadata = forged_setup(tmp_path, "verity-alone")
    disk = DiskCacheOptions(str(tmp_path / "cache"), 64 << 20)
    geometry = metadata.verity
    assert geometry is not None
    size, base = geometry.superblock.hash_block_size, metadata.verity_payload_offset
    whole = {offset: forgery.blob[base + offset:base + offset + size]
             for offset in range(geometry.tree_offset, geometry.tree_offset
                                 + sum(level.block_count for level in geometry.levels) * size,
                                 size)}
    forged = {**whole, **_forged_level0(geometry, _level0_of_chunk(metadata, forgery.blob),
                                        forgery)}
    put(disk, layer_key(metadata.annotations) or "", pack_metadata(metadata, forged))
    put(disk, frame_key(metadata, BAD) or "", forged_frame(forgery, metadata))

    async def body(image: RemoteImage) -> object:
        with pytest.raises(ImageReadError):
            await image.read(TARGET, 1)
        return await read_pieces(image, 4096)

    with caplog.at_level(logging.WARNING):
        pieces = run_with_layer(LayerSource(str(blob)), body, disk=disk, tuning=NO_READAHEAD)
    assert never_forged(pieces, forgery) == bad_chunk_pages()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("metadata entry" in w and "dm-verity" in w for w in warnings), warnings
