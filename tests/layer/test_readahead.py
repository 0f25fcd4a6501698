"""Readahead by distance in bytes (smaller chunks do not shrink it), and readahead for a walk
that moves on chunk by chunk without reading bytes back to back."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from lazyfs.layer.readahead import SequentialReads
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.open import LayerSource
from tests.layer.helpers import make_image_bytes, run_with_layer, write_blob

CHUNK = 256 * 1024
IMAGE = make_image_bytes(16 * CHUNK)


@pytest.mark.parametrize(("tuning", "chunk_size", "chunks"), [
    (ImageTuning(), 4 << 20, 2),
    (ImageTuning(), 512 << 10, 16),
    (ImageTuning(readahead_bytes=1), 512 << 10, 1),
    (ImageTuning(readahead_chunks=3), 64 << 10, 3),
    (ImageTuning(readahead_chunks=0), 64 << 10, 0),
    (ImageTuning(readahead_bytes=0), 64 << 10, 0),
])
def test_readahead_distance_is_in_bytes_unless_chunks_are_given(
    tuning: ImageTuning, chunk_size: int, chunks: int
) -> None:
    assert tuning.readahead_for(chunk_size) == chunks


def test_negative_readahead_is_refused() -> None:
    with pytest.raises(ValueError, match="readahead"):
        ImageTuning(readahead_bytes=-1)


def _walk(offsets: list[int]) -> object:
    async def body(image: RemoteImage) -> object:
        for offset in offsets:
            await image.read(offset, 100)
        await trio.sleep(0.2)
        return image.stats_snapshot()

    return body


def test_a_walk_from_chunk_to_chunk_reads_ahead(tmp_path: Path) -> None:
    blob = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)[0]
    tuning = ImageTuning(readahead_bytes=2 * CHUNK, follow_miss_bytes=0)
    # 1 MiB of 256 KiB chunks: the fourth step from chunk to chunk starts the readahead.
    stats = run_with_layer(LayerSource(str(blob)),
                           _walk([k * CHUNK + 5000 for k in range(5)]),  # type: ignore[arg-type]
                           tuning=tuning)
    assert stats["readahead_chunks"] == 2
    assert stats["chunks_fetched"] == 7


def test_reads_that_jump_between_chunks_do_not_read_ahead(tmp_path: Path) -> None:
    blob = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)[0]
    tuning = ImageTuning(readahead_bytes=2 * CHUNK, follow_miss_bytes=0)
    # Forward steps broken by a jump back (a metadata read, another file) start again.
    offsets = [chunk * CHUNK + 5000 for chunk in (0, 1, 2, 9, 3, 4, 5, 12, 13)]
    stats = run_with_layer(LayerSource(str(blob)), _walk(offsets),  # type: ignore[arg-type]
                           tuning=tuning)
    assert stats["readahead_chunks"] == 0
    assert stats["chunks_fetched"] == len(offsets)


def test_a_long_read_in_order_loads_ahead_in_few_growing_requests(tmp_path: Path) -> None:
    """The window after a read in order doubles each time it is topped up, and what it lacks
    goes in one request: a whole layer read in order takes a handful of requests, not one a
    chunk."""
    chunk = 64 * 1024
    blob = write_blob(tmp_path, make_image_bytes(64 * chunk), chunk_size=chunk)[0]
    tuning = ImageTuning(readahead_bytes=4 * chunk, readahead_max_bytes=32 * chunk,
                         follow_miss_bytes=0)

    async def body(image: RemoteImage) -> object:
        for offset in range(0, 64 * chunk, chunk):
            await image.read(offset, chunk)
        await trio.sleep(0.2)
        return image.stats_snapshot()

    stats = run_with_layer(LayerSource(str(blob)), body, tuning=tuning)  # type: ignore[arg-type]
    assert stats["chunks_fetched"] == 64
    assert stats["readahead_chunks"] == 63
    # The first chunk, the window of 4 chunks topped up until 8 were read back to back (it
    # grows only then: a start-up's walk through small files must not), then windows of 8,
    # 16 and 32 chunks topped up at half.
    assert stats["chunk_fetches"] <= 10, stats


def test_readahead_grows_no_further_than_a_quarter_of_the_cache() -> None:
    tuning = ImageTuning(readahead_bytes=1 << 20, readahead_max_bytes=64 << 20)
    assert tuning.readahead_max_for(512 << 10, 256 << 20) == 128
    assert tuning.readahead_max_for(512 << 10, 16 << 20) == 8
    assert tuning.readahead_max_for(512 << 10, 1 << 20) == 2  # the distance at least
    assert ImageTuning(readahead_chunks=3).readahead_max_for(512 << 10, 256 << 20) == 3


def test_a_walk_through_small_files_streams_but_does_not_grow_the_window() -> None:
    """A start-up reads file after file laid out one after another: reads stream (the chunks
    after them are loaded) but never back to back, so the window stays at its distance."""
    chunk = 64 * 1024
    reads = SequentialReads(chunk, 1000)
    ahead = range(0)
    for n in range(40):
        offset = n * chunk + 100  # a small file in each chunk, with gaps between them
        ahead = reads.ahead(offset, offset + 4096, range(n, n + 1), 4)
        reads.grow(32)
    assert len(ahead) == 4
    # Read back to back, the same reads grow it.
    reads = SequentialReads(chunk, 1000)
    for n in range(40):
        ahead = reads.ahead(n * chunk, (n + 1) * chunk, range(n, n + 1), 4)
        reads.grow(32)
    assert len(ahead) == 32
