"""RemoteImage with the disk cache: warm opens and reads without requests, frames shared by
layers stored once, bad copies dropped and fetched again, layers opened while their server is
unreachable."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import pytest
import trio

from lazyfs.cache.disk import DiskCache, DiskCacheOptions
from lazyfs.cache.keys import frame_key, layer_key, tree_key
from lazyfs.format.chunk_table import HASH_NONE
from lazyfs.layer.errors import ImageReadError
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.metadata import load_metadata
from lazyfs.startup.open import LayerSource
from tests.format import build_blob, make_superblock
from tests.layer.helpers import (
    flip_byte,
    make_image_bytes,
    open_with_level0_on_demand,
    run_with_layer,
    write_blob,
)
from tests.layer.test_remote_image import _hashless_blob
from tests.support.nginx import serve_directory

CHUNK = 64 * 1024
IMAGE = make_image_bytes(10 * CHUNK + 12345, seed=21)
NO_READAHEAD = ImageTuning(readahead_chunks=0)


@pytest.fixture
def disk(tmp_path: Path) -> DiskCacheOptions:
    return DiskCacheOptions(str(tmp_path / "cache"), 64 << 20)


async def read_all(image: RemoteImage) -> bytes:
    return await image.read(0, image.size)


def read_and_report(source: LayerSource, disk: DiskCacheOptions,
                    reads: list[tuple[int, int]] | None = None) -> tuple[list[bytes], dict]:
    async def body(image: RemoteImage) -> object:
        wanted = reads or [(0, image.size)]
        return [await image.read(offset, size) for offset, size in wanted], image.stats_snapshot()

    return run_with_layer(source, body, disk=disk, tuning=NO_READAHEAD)  # type: ignore[no-any-return]


def stored_frames(disk: DiskCacheOptions) -> list[Path]:
    return sorted(path for path in (Path(disk.directory) / "data" / "frame").rglob("*")
                  if path.is_file())


def test_a_layer_opened_again_reads_everything_from_the_disk(tmp_path: Path,
                                                             disk: DiskCacheOptions) -> None:
    blob = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)[0]
    (data,), cold = read_and_report(LayerSource(str(blob)), disk)
    assert data == IMAGE and cold["chunks_from_disk"] == 0
    assert len(stored_frames(disk)) == cold["chunk_count"] == 11
    (data,), warm = read_and_report(LayerSource(str(blob)), disk)
    assert data == IMAGE
    assert (warm["requests"], warm["bytes_fetched"], warm["chunks_fetched"]) == (0, 0, 0)
    assert warm["chunks_from_disk"] == 11


def test_frames_two_layers_share_are_stored_once(tmp_path: Path,
                                                 disk: DiskCacheOptions) -> None:
    """Two layers whose first five chunks are equal: those frames are stored once, and the
    second layer reads them instead of fetching them."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    other = IMAGE[:5 * CHUNK] + make_image_bytes(len(IMAGE) - 5 * CHUNK, seed=22)
    first = write_blob(tmp_path / "a", IMAGE, chunk_size=CHUNK)[0]
    second = write_blob(tmp_path / "b", other, chunk_size=CHUNK)[0]
    read_and_report(LayerSource(str(first)), disk)
    (data,), stats = read_and_report(LayerSource(str(second)), disk)
    assert data == other and stats["chunks_from_disk"] == 5 and stats["chunks_fetched"] == 6
    assert len(stored_frames(disk)) == 11 + 6
    metadata = [p for p in (Path(disk.directory) / "data" / "meta").rglob("*") if p.is_file()]
    assert len(metadata) == 2


def test_hashless_layers_keep_their_frames_apart(tmp_path: Path,
                                                 disk: DiskCacheOptions) -> None:
    """Tables without frame hashes (equal for equal frame sizes) key frames by the layer's
    digests and the chunk index: one layer's frames are never read for another's."""
    size = 3 * 4096
    first, second = random.Random(1).randbytes(size), random.Random(2).randbytes(size)
    source_a = _hashless_blob(tmp_path, first, "a", verity=True)
    source_b = _hashless_blob(tmp_path, second, "b", verity=True)
    assert source_a.chunk_digest == source_b.chunk_digest
    for source, expected in ((source_a, first), (source_b, second)):
        (data,), _ = read_and_report(source, disk)
        assert data == expected
    for source, expected in ((source_a, first), (source_b, second)):
        (data,), stats = read_and_report(source, disk)
        assert data == expected and stats["chunks_from_disk"] == 3 and stats["requests"] == 0


def test_a_flipped_byte_on_disk_is_dropped_logged_once_and_fetched_again(
    tmp_path: Path, disk: DiskCacheOptions, caplog: pytest.LogCaptureFixture
) -> None:
    blob = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)[0]
    read_and_report(LayerSource(str(blob)), disk)
    store = DiskCache.open(disk).store
    metadata = trio.run(_metadata, LayerSource(str(blob)))
    path = store.path(frame_key(metadata, 4) or "")
    store.close()
    flip_byte(path, path.stat().st_size // 2)
    with caplog.at_level(logging.WARNING):
        (first, second), stats = read_and_report(
            LayerSource(str(blob)), disk, [(4 * CHUNK, CHUNK), (4 * CHUNK + 10, 100)])
    assert first == IMAGE[4 * CHUNK:5 * CHUNK] and second == IMAGE[4 * CHUNK + 10:4 * CHUNK + 110]
    assert stats["chunks_fetched"] == 1 and stats["bad_chunks"] == [] and (
        stats["verify_failures"] == 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "chunk 4: the disk cache's copy failed" in warnings[0]
    assert "SHA-512 mismatch" in warnings[0]
    (data,), warm = read_and_report(LayerSource(str(blob)), disk)  # the copy is whole again
    assert data == IMAGE and warm["chunks_from_disk"] == 11


def test_a_damaged_metadata_entry_is_dropped_and_fetched(
    tmp_path: Path, disk: DiskCacheOptions, caplog: pytest.LogCaptureFixture
) -> None:
    blob = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)[0]
    read_and_report(LayerSource(str(blob)), disk)
    (entry,) = [p for p in (Path(disk.directory) / "data" / "meta").rglob("*") if p.is_file()]
    flip_byte(entry, entry.stat().st_size - 100)  # in the hash blocks kept with it
    with caplog.at_level(logging.WARNING):
        (data,), stats = read_and_report(LayerSource(str(blob)), disk)
    assert data == IMAGE and stats["chunks_from_disk"] == 11 and stats["requests"] > 0
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "metadata entry" in warning and "dm-verity" in warning


async def _metadata(source: LayerSource):  # type: ignore[no-untyped-def]
    from lazyfs.fetch.local import LocalFileReader
    from lazyfs.startup.open import resolve_annotations

    annotations, _ = await resolve_annotations(source)
    async with LocalFileReader(source.blob) as reader:
        return (await load_metadata(reader, annotations, 0)).metadata


def test_hash_blocks_of_large_trees_are_kept_per_chunk(tmp_path: Path,
                                                       disk: DiskCacheOptions) -> None:
    """A layer checked by dm-verity when read back (no frame hashes) whose tree is not kept
    whole with its metadata (only the levels above level 0 are): the level-0 blocks a chunk
    needs are kept with its frame and verified when read back, so that the warm read needs
    no request at all."""
    built = build_blob(IMAGE, chunk_size=CHUNK, verity=make_superblock(len(IMAGE)),
                       hash_algorithm=HASH_NONE)
    blob = tmp_path / "hashless.blob"
    blob.write_bytes(built.blob)
    a = built.annotations
    source = LayerSource(str(blob), chunk_table_offset=a.chunk_table_offset,
                         chunk_digest=a.chunk_digest, verity_offset=a.verity_offset,
                         root_digest=a.root_digest)

    async def run() -> tuple[bytes, dict]:  # type: ignore[type-arg]
        store = DiskCache.open(disk)
        async with trio.open_nursery() as nursery:
            image = await open_with_level0_on_demand(source, store, nursery, NO_READAHEAD)
            data = await read_all(image)
            await image.aclose()
        await store.aclose()
        return data, image.stats_snapshot()

    data, cold = trio.run(run)
    assert data == IMAGE and cold["tree_blocks_fetched"] > 0
    key = layer_key(a) or ""
    trees = [Path(disk.directory) / "data" / "tree" / tree_key(key, i)[5:7] / tree_key(key, i)[5:]
             for i in range(11)]
    assert all(path.is_file() for path in trees)
    data, warm = trio.run(run)
    assert data == IMAGE and warm["tree_blocks_fetched"] == 0 and warm["requests"] == 0
    assert warm["chunks_from_disk"] == 11


def test_frames_checked_by_their_hash_need_no_hash_blocks_on_disk(
    tmp_path: Path, disk: DiskCacheOptions
) -> None:
    blob = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)[0]

    async def run() -> dict:  # type: ignore[type-arg]
        store = DiskCache.open(disk)
        async with trio.open_nursery() as nursery:
            image = await open_with_level0_on_demand(LayerSource(str(blob)), store, nursery,
                                                     NO_READAHEAD)
            assert await read_all(image) == IMAGE
            await image.aclose()
        await store.aclose()
        return image.stats_snapshot()

    trio.run(run)
    assert not (Path(disk.directory) / "data" / "tree").exists()
    warm = trio.run(run)
    assert warm["chunks_from_disk"] == 11 and warm["requests"] == 0


@pytest.mark.network
def test_a_layer_mounts_again_while_its_server_is_unreachable(
    tmp_path: Path, disk: DiskCacheOptions, caplog: pytest.LogCaptureFixture
) -> None:
    """The descriptor beside the blob and the metadata come from the disk cache; chunks read
    before are served; others fail at once, the log saying that the source is unreachable."""
    served = tmp_path / "served"
    served.mkdir()
    write_blob(served, IMAGE, chunk_size=CHUNK)
    with serve_directory(served) as server:
        source = LayerSource(server.url + "layer.blob")
        (part,), _ = read_and_report(source, disk, [(0, 3 * CHUNK)])
        assert part == IMAGE[:3 * CHUNK]

    async def body(image: RemoteImage) -> object:
        cached = await image.read(CHUNK, 2 * CHUNK)
        failures = []
        for _ in range(3):
            began = time.monotonic()
            with pytest.raises(ImageReadError):
                await image.read(7 * CHUNK, 10)
            failures.append(time.monotonic() - began)
        return cached, failures, image.stats_snapshot()

    with caplog.at_level(logging.WARNING):
        cached, failures, stats = run_with_layer(source, body, disk=disk, tuning=NO_READAHEAD)
    assert cached == IMAGE[CHUNK:3 * CHUNK]
    assert stats["chunks_from_disk"] == 2 and stats["chunks_fetched"] == 0
    assert max(failures) < 2.0, failures
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("using the descriptor the disk cache kept" in line for line in warnings)
    unreachable = [line for line in warnings if "source unreachable" in line]
    assert len(unreachable) == 1, warnings


@pytest.mark.network
def test_a_layer_opened_from_the_disk_fetches_what_the_disk_lacks(
    tmp_path: Path, disk: DiskCacheOptions
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    write_blob(served, IMAGE, chunk_size=CHUNK)
    with serve_directory(served) as server:
        source = LayerSource(server.url + "layer.blob")
        read_and_report(source, disk, [(0, CHUNK)])
        (data,), stats = read_and_report(source, disk)
    assert data == IMAGE
    assert stats["chunks_from_disk"] == 1 and stats["chunks_fetched"] == 10


def test_no_disk_entries_for_a_layer_nothing_authenticates(tmp_path: Path,
                                                           disk: DiskCacheOptions) -> None:
    blob, result = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    (tmp_path / "layer.descriptor.json").unlink()
    source = LayerSource(str(blob), chunk_table_offset=result.annotations.chunk_table_offset,
                         insecure=True)
    (data,), _ = read_and_report(source, disk)
    assert data == IMAGE
    assert not (Path(disk.directory) / "data" / "frame").exists()

