"""Chunk sizes that are not a multiple of the dm-verity block size (containerd's encoder
takes any): a data block that straddles chunks is verified with the bytes of all of them, on
every path: sequential and random reads, a tiny cache (neighbours fetched again) or a large
one (neighbours borrowed), chunks smaller than blocks, and a forged byte in a shared block."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lazyfs.layer.errors import ImageReadError
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.open import LayerSource
from tests.layer.helpers import make_image_bytes, run_with_layer, write_blob
from tests.support.forge import forge_layer

IMAGE = make_image_bytes(300_077, seed=21)
# (chunk size, dm-verity block size)
GEOMETRIES = [(6000, 4096), (1000, 4096), (4096 + 512, 4096), (100_003, 512), (7, 512)]


async def read_all(image: RemoteImage, piece: int = 5000) -> bytes:
    out = bytearray()
    for offset in range(0, image.size, piece):
        out += await image.read(offset, piece)
    return bytes(out)


@pytest.mark.parametrize("cache_bytes", [0, 64 << 20])
@pytest.mark.parametrize(("chunk_size", "block_size"), GEOMETRIES)
def test_any_chunk_size_reads_back(tmp_path: Path, chunk_size: int, block_size: int,
                                   cache_bytes: int) -> None:
    image = IMAGE[:20_000] if chunk_size < 100 else IMAGE
    blob = write_blob(tmp_path, image, chunk_size=chunk_size, verity_data_block_size=block_size,
                      verity_hash_block_size=block_size)[0]

    async def body(layer: RemoteImage) -> object:
        return await read_all(layer), layer.stats_snapshot()

    data, stats = run_with_layer(LayerSource(str(blob)), body, cache_bytes=cache_bytes)
    assert data == image
    assert stats["verify_failures"] == 0 and stats["refetches"] == 0


def test_neighbours_in_the_cache_are_borrowed_not_fetched(tmp_path: Path) -> None:
    blob = write_blob(tmp_path, IMAGE, chunk_size=6000)[0]

    async def body(layer: RemoteImage) -> object:
        await read_all(layer, 6000)  # chunk by chunk: each needs the next one's first bytes
        return layer.stats_snapshot(), layer.metadata.data_end

    stats, data_end = run_with_layer(LayerSource(str(blob)), body,
                                     tuning=ImageTuning(readahead_chunks=0))
    # Each frame fetched about once (the next one's with it), not three times.
    assert data_end <= stats["bytes_fetched"] < 2.2 * data_end, stats


@settings(max_examples=30, deadline=None)
@given(reads=st.lists(st.tuples(st.integers(0, len(IMAGE)), st.integers(1, 30_000)),
                      min_size=1, max_size=10))
def test_random_reads_with_straddling_blocks(tmp_path_factory: pytest.TempPathFactory,
                                             reads: list[tuple[int, int]]) -> None:
    directory = tmp_path_factory.mktemp("blob")
    blob = write_blob(directory, IMAGE, chunk_size=6000)[0]

    async def body(layer: RemoteImage) -> object:
        return [await layer.read(offset, size) for offset, size in reads]

    results = run_with_layer(LayerSource(str(blob)), body, cache_bytes=20_000)
    for (offset, size), data in zip(reads, results, strict=True):
        assert data == IMAGE[offset:offset + size]


def test_forged_byte_in_a_shared_block_fails_the_chunks_that_share_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The chunk table is forged too, so only dm-verity can catch it: the block holding the
    forged byte straddles chunks 3 and 4, and neither can be vouched for."""
    chunk = 6000
    noise = random.Random(5).randbytes(12 * chunk)  # stored raw by zstd: forgeable
    blob = write_blob(tmp_path, noise, chunk_size=chunk)[0]
    target = 4 * chunk - 10  # in chunk 3, in data block 5 (20480..24575), shared with chunk 4
    forgery = forge_layer(blob, blob.with_name("layer.descriptor.json"), target, table=True)
    assert forgery.chunk_index == 3

    async def body(layer: RemoteImage) -> object:
        outcome: dict[int, bytes | None] = {}
        for index in range(12):
            try:
                outcome[index] = await layer.read(index * chunk, chunk)
            except ImageReadError:
                outcome[index] = None
        return outcome, layer.stats_snapshot()

    with caplog.at_level(logging.ERROR):
        outcome, stats = run_with_layer(LayerSource(str(blob)), body,
                                        tuning=ImageTuning(readahead_chunks=0))
    assert [index for index, data in outcome.items() if data is None] == [3, 4]
    for index, data in outcome.items():
        if data is not None:
            assert data == noise[index * chunk:(index + 1) * chunk]
    assert stats["bad_chunks"] == [3, 4]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("chunk 3 " in e and "dm-verity: data block 5 " in e for e in errors), errors
