"""dm-verity hash blocks on demand (lazyfs/layer/hash_blocks.py): each checked against its
parent when first fetched, a bad one failing only what lies under it, one fetch per block
however many readers need it, a failed fetch not remembered."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from lazyfs.fetch.errors import FetchError
from lazyfs.format.errors import IntegrityError
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.layer.errors import ImageReadError
from lazyfs.layer.hash_blocks import HashBlockStore
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.open import LayerSource
from tests.layer.helpers import flip_byte, make_image_bytes, run_with_layer, write_blob

CHUNK = 64 * 1024
# 1 KiB hash blocks of 16 sha512 digests: 512 data blocks make levels of 32, 2 and 1 blocks;
# a level-0 block covers 16 data blocks (one chunk), a level-1 block 256 (16 chunks).
IMAGE = make_image_bytes(2 * 1024 * 1024, seed=31)
HASH_BLOCK = 1024
ON_DEMAND = ImageTuning(readahead_chunks=0, verity_window_bytes=0)
# Payload offsets of the levels: the superblock padded to a block, then the levels top first.
TOP, LEVEL1, LEVEL0 = 1024, 2048, 4096


def layer(directory: Path) -> tuple[Path, int]:
    """The blob, and the blob offset of its verity payload."""
    blob, result = write_blob(directory, IMAGE, chunk_size=CHUNK,
                              verity_hash_block_size=HASH_BLOCK)
    assert result.annotations.verity_offset is not None
    return blob, result.annotations.verity_offset + SKIPPABLE_HEADER_SIZE


def store(image: RemoteImage) -> HashBlockStore:
    assert image.hash_blocks is not None
    return image.hash_blocks


def test_geometry_of_the_test_tree(tmp_path: Path) -> None:
    blob, _ = layer(tmp_path)

    async def body(image: RemoteImage) -> list[tuple[int, int]]:
        return [(level.block_count, level.payload_offset) for level in store(image).geometry.levels]

    assert run_with_layer(LayerSource(str(blob)), body) == [(32, LEVEL0), (2, LEVEL1), (1, TOP)]


@pytest.mark.parametrize("partial", [True, False], ids=["partial-frames", "whole-frames"])
def test_a_bad_level0_block_fails_only_the_data_under_it(tmp_path: Path, partial: bool) -> None:
    blob, payload = layer(tmp_path)
    flip_byte(blob, payload + LEVEL0 + 5 * HASH_BLOCK + 700)  # level-0 block 5: chunk 5

    async def body(image: RemoteImage) -> object:
        coverage = await store(image).cover(0, 512)
        with pytest.raises(ImageReadError):
            await image.read(5 * CHUNK + 4000, 10)
        before, after = await image.read(4 * CHUNK, CHUNK), await image.read(6 * CHUNK, CHUNK)
        return coverage, (before, after), image.stats_snapshot()

    tuning = ImageTuning(readahead_chunks=0, verity_window_bytes=0, partial_frames=partial)
    coverage, (before, after), stats = run_with_layer(LayerSource(str(blob)), body,
                                                      tuning=tuning)
    assert set(coverage.bad) == {LEVEL0 + 5 * HASH_BLOCK}
    assert "does not match its parent" in coverage.bad[LEVEL0 + 5 * HASH_BLOCK]
    assert coverage.failure(5 * 16) and coverage.failure(5 * 16 + 15)
    assert coverage.failure(4 * 16 + 15) is None and coverage.failure(6 * 16) is None
    assert before == IMAGE[4 * CHUNK:5 * CHUNK] and after == IMAGE[6 * CHUNK:7 * CHUNK]
    # Whole frames fail the chunk; a partial frame keeps it, every block under the bad hash
    # block (here all of the chunk) failing.
    assert (stats["bad_chunks"], stats["partial_chunks"]) == (([], [5]) if partial else ([5], []))


def test_a_bad_level1_block_fails_its_subtree_and_nothing_else(tmp_path: Path) -> None:
    blob, payload = layer(tmp_path)
    flip_byte(blob, payload + LEVEL1 + HASH_BLOCK + 3)  # level-1 block 1: data blocks 256-511

    async def body(image: RemoteImage) -> object:
        coverage = await store(image).cover(0, 512)
        return coverage, await image.read(15 * CHUNK, CHUNK)

    coverage, data = run_with_layer(LayerSource(str(blob)), body, tuning=ON_DEMAND)
    assert set(coverage.bad) == {LEVEL0 + index * HASH_BLOCK for index in range(16, 32)}
    assert all("level 1" in reason for reason in coverage.bad.values())
    assert data == IMAGE[15 * CHUNK:16 * CHUNK]


@pytest.mark.parametrize("window", [0, 64 * 1024])
def test_a_bad_top_level_refuses_the_layer(tmp_path: Path, window: int) -> None:
    blob, payload = layer(tmp_path)
    flip_byte(blob, payload + TOP + 17)
    async def open_only(image: RemoteImage) -> None:
        pass

    with pytest.raises(IntegrityError, match="root digest"):
        run_with_layer(LayerSource(str(blob)), open_only,
                       tuning=ImageTuning(verity_window_bytes=window))


def test_readers_of_one_block_share_one_fetch(tmp_path: Path) -> None:
    blob, _ = layer(tmp_path)

    async def body(image: RemoteImage) -> tuple[int, int, int]:
        hashes = store(image)
        before = image.reader.stats.requests
        async with trio.open_nursery() as nursery:
            for _ in range(10):  # data blocks 16-31: level-0 block 1 under level-1 block 0
                nursery.start_soon(hashes.cover, 16, 16)
        during = image.reader.stats.requests - before
        await hashes.cover(20, 3)
        return during, image.reader.stats.requests - before, hashes.verified_count

    # One request, not ten (the open's request reached payload offset 4096, so the top and
    # level 1 were verified already): level-0 block 1, then nothing for blocks it verified.
    assert run_with_layer(LayerSource(str(blob)), body, tuning=ON_DEMAND) == (1, 1, 4)


def test_a_failed_fetch_is_not_remembered(tmp_path: Path) -> None:
    blob, _ = layer(tmp_path)

    async def body(image: RemoteImage) -> bool:
        real = image.reader.read
        calls = 0

        async def failing_once(offset: int, size: int) -> bytes:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise FetchError("test: refused")
            return await real(offset, size)

        image.reader.read = failing_once  # type: ignore[method-assign]
        with pytest.raises(FetchError):
            await store(image).cover(100, 1)
        coverage = await store(image).cover(100, 1)
        return not coverage.bad and len(coverage.blocks) == 1

    assert run_with_layer(LayerSource(str(blob)), body, tuning=ON_DEMAND)
