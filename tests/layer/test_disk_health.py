"""The disk cache with the failure policy and with any chunk size: a chunk held off after a
failed fetch is still served from the disk (a disk hit clears its failure); dm-verity blocks
that straddle chunks are read back from the disk when frame hashes check each frame alone,
and not kept when only dm-verity could check them (a block needs its neighbour's bytes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from lazyfs.cache.disk import DiskCache, DiskCacheOptions
from lazyfs.cache.memory import ChunkCache
from lazyfs.fetch.base import ReaderOptions
from lazyfs.format.chunk_table import HASH_NONE
from lazyfs.layer.errors import ImageReadError
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.open import LayerSource, open_layer
from tests.format import build_blob, make_superblock
from tests.layer.helpers import make_image_bytes, run_with_layer, write_blob
from tests.support.fault_server import Fault, FaultServer

CHUNK = 64 * 1024
IMAGE = make_image_bytes(8 * CHUNK + 777, seed=41)
NO_READAHEAD = ImageTuning(readahead_chunks=0)


@pytest.fixture
def disk(tmp_path: Path) -> DiskCacheOptions:
    return DiskCacheOptions(str(tmp_path / "cache"), 64 << 20)


def stored_frames(disk: DiskCacheOptions) -> list[Path]:
    return [path for path in (Path(disk.directory) / "data" / "frame").rglob("*")
            if path.is_file()]


async def read_all(image: RemoteImage, piece: int = 5000) -> bytes:
    out = bytearray()
    for offset in range(0, image.size, piece):
        out += await image.read(offset, piece)
    return bytes(out)


@pytest.mark.network
def test_a_chunk_held_off_after_a_failed_fetch_is_served_from_the_disk(
    tmp_path: Path, disk: DiskCacheOptions
) -> None:
    """Two mounts of one layer share the disk cache: the first one's fetch of chunk 4 fails
    (held off for a minute); the second one fetches it and writes it back; the first then
    reads it from the disk at once, and no longer lists it as failing."""
    served = tmp_path / "served"
    served.mkdir()
    write_blob(served, IMAGE, chunk_size=CHUNK)
    options = ReaderOptions(max_retries=0)
    tuning = ImageTuning(readahead_chunks=0, retry_after_s=60, retry_max_s=60)

    async def main(faulty: FaultServer, clean: FaultServer) -> tuple[object, ...]:
        store = DiskCache.open(disk)
        try:
            async with trio.open_nursery() as nursery:
                layers = [
                    await open_layer(LayerSource(server.url + "layer.blob",
                                                 reader_options=options),
                                     cache=ChunkCache(16 << 20), nursery=nursery,
                                     tuning=tuning, disk=store)
                    for server in (faulty, clean)
                ]
                first, second = layers
                start, end = first.metadata.frame_range(4)
                faulty.add(Fault("status", at=(start + end) // 2))
                with pytest.raises(ImageReadError, match="HTTP 503"):
                    await first.read(4 * CHUNK, 10)
                held = first.stats_snapshot()["failing_chunks"]
                with pytest.raises(ImageReadError, match="fetch failed"):
                    await first.read(4 * CHUNK, 10)  # held off: no request
                requests = len(faulty.range_requests())
                assert await second.read(4 * CHUNK, CHUNK) == IMAGE[4 * CHUNK:5 * CHUNK]
                assert second.disk is not None
                await second.disk.writes_done()
                data = await first.read(4 * CHUNK, CHUNK)
                stats = first.stats_snapshot()
                for layer in layers:
                    await layer.aclose()
                nursery.cancel_scope.cancel()
        finally:
            await store.aclose()
        return held, requests, len(faulty.range_requests()), data, stats

    with FaultServer(served) as faulty, FaultServer(served) as clean:
        held, before, after, data, stats = trio.run(main, faulty, clean)
    assert held == [4]
    assert after == before  # the disk served it; the faulty server was not asked again
    assert data == IMAGE[4 * CHUNK:5 * CHUNK]
    assert stats["chunks_from_disk"] == 1 and stats["failing_chunks"] == []


def test_straddling_blocks_with_frame_hashes_read_back_from_the_disk(
    tmp_path: Path, disk: DiskCacheOptions
) -> None:
    blob = write_blob(tmp_path, IMAGE, chunk_size=6000)[0]

    async def body(image: RemoteImage) -> object:
        return await read_all(image), image.stats_snapshot()

    cold_data, cold = run_with_layer(LayerSource(str(blob)), body, disk=disk,
                                     tuning=NO_READAHEAD)
    warm_data, warm = run_with_layer(LayerSource(str(blob)), body, disk=disk,
                                     tuning=NO_READAHEAD)
    assert cold_data == warm_data == IMAGE
    assert len(stored_frames(disk)) == cold["chunk_count"]
    assert warm["chunks_from_disk"] == warm["chunk_count"] and warm["requests"] == 0


def test_straddling_blocks_without_frame_hashes_are_not_kept_on_disk(
    tmp_path: Path, disk: DiskCacheOptions
) -> None:
    image = IMAGE[:3 * CHUNK]
    built = build_blob(image, chunk_size=6000, hash_algorithm=HASH_NONE,
                       verity=make_superblock(len(image)))
    path = tmp_path / "layer.blob"
    path.write_bytes(built.blob)
    a = built.annotations
    source = LayerSource(str(path), chunk_table_offset=a.chunk_table_offset,
                         chunk_digest=a.chunk_digest, verity_offset=a.verity_offset,
                         root_digest=a.root_digest)

    async def body(layer: RemoteImage) -> object:
        return await read_all(layer), layer.stats_snapshot()

    for _ in range(2):
        data, stats = run_with_layer(source, body, disk=disk, tuning=NO_READAHEAD)
        assert data == image
        assert stats["chunks_from_disk"] == 0 and stats["verify_failures"] == 0
    assert stored_frames(disk) == []
