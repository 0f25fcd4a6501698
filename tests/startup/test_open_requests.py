"""What opening a layer and its first reads cost against a real nginx: one range request for
the metadata (no size probe), only the top of the dm-verity tree at open, and each lower hash
block fetched once, when a read first needs it, however many readers need it at once."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from lazyfs.cache.memory import ChunkCache
from lazyfs.fetch.base import ReaderOptions
from lazyfs.fetch.errors import FetchError
from lazyfs.format.frames import SKIPPABLE_HEADER_SIZE
from lazyfs.format.open_plan import TABLE_GUESS_BYTES
from lazyfs.layer.remote_image import RemoteImage
from lazyfs.layer.tuning import ImageTuning
from lazyfs.startup.open import LayerSource, open_layer
from tests.format import build_blob, make_superblock
from tests.layer.helpers import make_image_bytes, run_with_layer, write_blob
from tests.support import nginx

nginx_server = nginx.nginx_server
StartNginx = Callable[[Path], nginx.NginxServer]
pytestmark = pytest.mark.network

CHUNK = 64 * 1024
# 512 data blocks: 8 level-0 hash blocks of 64 digests (4 chunks each) under one top block.
IMAGE = make_image_bytes(2 * 1024 * 1024, seed=21)
_LINE = re.compile(r'GET (\S+) "bytes=(\d+)-(\d+)" 206 (\d+)$')


def blob_ranges(server: nginx.NginxServer, name: str = "/layer.blob") -> list[tuple[int, int]]:
    """The ranges `[start, end)` nginx served of the blob, in order; any other answer of it
    (a 200, an error) fails the test."""
    ranges = []
    for line in server.access_lines():
        if line.split()[1] != name:
            continue
        match = _LINE.search(line)
        assert match, line
        ranges.append((int(match.group(2)), int(match.group(3)) + 1))
    return ranges


async def opened(image: RemoteImage) -> tuple[int, int]:
    return image.reader.stats.requests, image.reader.stats.bytes_fetched


def test_open_is_one_range_request_when_the_descriptor_gives_the_size(
    tmp_path: Path, nginx_server: StartNginx
) -> None:
    blob, result = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    server = nginx_server(tmp_path)
    window = 16 * 1024
    requests, fetched = run_with_layer(LayerSource(server.url + "layer.blob"), opened,
                                       tuning=ImageTuning(verity_window_bytes=window))
    annotations = result.annotations
    assert annotations.verity_offset is not None
    (only,) = blob_ranges(server)
    assert requests == 1 and only[0] == annotations.chunk_table_offset
    # The chunk table, the verity superblock (padded to a block) and the window of the tree:
    # not the whole tree (9 blocks here), and no one-byte probe.
    assert only[1] == annotations.verity_offset + SKIPPABLE_HEADER_SIZE + 4096 + window
    assert fetched == only[1] - only[0] < blob.stat().st_size - annotations.chunk_table_offset
    descriptor_lines = [line for line in server.access_lines() if "descriptor" in line]
    assert len(descriptor_lines) == 1


def test_without_a_size_the_one_request_learns_it_from_content_range(
    tmp_path: Path, nginx_server: StartNginx
) -> None:
    blob, result = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    server = nginx_server(tmp_path)
    a = result.annotations
    source = LayerSource(server.url + "layer.blob", chunk_table_offset=a.chunk_table_offset,
                         chunk_digest=a.chunk_digest, verity_offset=a.verity_offset,
                         root_digest=a.root_digest)

    async def body(image: RemoteImage) -> tuple[int, int | None, bytes]:
        requests = image.reader.stats.requests
        return requests, image.metadata.blob_size, await image.read(5 * CHUNK + 3, 9000)

    requests, blob_size, data = run_with_layer(source, body)
    assert requests == 1 and blob_size == blob.stat().st_size
    assert data == IMAGE[5 * CHUNK + 3:5 * CHUNK + 9003]
    assert blob_ranges(server)[0][0] == a.chunk_table_offset


def test_verity_first_and_a_large_table_of_unknown_size(
    tmp_path: Path, nginx_server: StartNginx
) -> None:
    """The proposed layout (dm-verity before the chunk table): the two are not adjacent, so two
    requests; the table's end is only known from the blob's, and a table larger than the first
    guess is completed by a third."""
    image = make_image_bytes(1536 * 1024, seed=5)
    built = build_blob(image, chunk_size=512, verity=make_superblock(len(image), block_size=512),
                       verity_first=True)
    assert len(built.blob) - built.annotations.chunk_table_offset > TABLE_GUESS_BYTES
    (tmp_path / "layer.blob").write_bytes(built.blob)
    server = nginx_server(tmp_path)
    a = built.annotations
    source = LayerSource(server.url + "layer.blob", chunk_table_offset=a.chunk_table_offset,
                         chunk_digest=a.chunk_digest, verity_offset=a.verity_offset,
                         root_digest=a.root_digest)

    async def body(image: RemoteImage) -> tuple[int, bytes]:
        return image.reader.stats.requests, await image.read(700_000, 5000)

    requests, data = run_with_layer(source, body, tuning=ImageTuning(readahead_chunks=0))
    assert requests == 3 and data == image[700_000:705_000]
    ranges = blob_ranges(server)
    assert sorted(start for start, _ in ranges[:2]) == [a.verity_offset, a.chunk_table_offset]
    assert ranges[2][1] == len(built.blob)


def test_hash_blocks_are_fetched_when_reads_need_them_once_each(
    tmp_path: Path, nginx_server: StartNginx
) -> None:
    _, result = write_blob(tmp_path, IMAGE, chunk_size=CHUNK)
    server = nginx_server(tmp_path)
    payload = result.annotations.verity_offset + SKIPPABLE_HEADER_SIZE  # type: ignore[operator]
    level0 = payload + 2 * 4096  # after the superblock block and the top level

    async def body(image: RemoteImage) -> tuple[int, list[bytes]]:
        at_open = image.stats.tree_blocks_fetched
        results: list[bytes] = []

        async def read(offset: int) -> None:
            results.append(await image.read(offset, 4096))

        # Chunks 8-11 lie under level-0 block 2: four readers at once, one fetch of it.
        async with trio.open_nursery() as nursery:
            for index in (8, 9, 10, 11):
                nursery.start_soon(read, index * CHUNK + 100)
        await read(11 * CHUNK + 200)  # verified already: no fetch at all
        return at_open, results

    tuning = ImageTuning(readahead_chunks=0, verity_window_bytes=0)
    at_open, results = run_with_layer(LayerSource(server.url + "layer.blob"), body,
                                      tuning=tuning)
    assert at_open == 1  # the top level only
    assert sorted(results[:4]) == sorted(IMAGE[i * CHUNK + 100:i * CHUNK + 4196]
                                         for i in (8, 9, 10, 11))
    tree_ranges = [item for item in blob_ranges(server) if item[0] >= level0]
    assert tree_ranges == [(level0 + 2 * 4096, level0 + 3 * 4096)]


def test_a_failed_metadata_fetch_raises_the_fetch_error_itself(
    tmp_path: Path, nginx_server: StartNginx
) -> None:
    """Two metadata ranges are fetched at once; a failure comes out as the FetchError a
    caller catches (a mount's retry loop, the CLI's one-line error), not wrapped in a group."""
    image = make_image_bytes(300_000, seed=6)
    built = build_blob(image, chunk_size=4096, verity=make_superblock(len(image)),
                       verity_first=True)
    a = built.annotations
    server = nginx_server(tmp_path)  # serving nothing: every range is a 404
    source = LayerSource(server.url + "layer.blob", chunk_table_offset=a.chunk_table_offset,
                         chunk_digest=a.chunk_digest, verity_offset=a.verity_offset,
                         root_digest=a.root_digest,
                         reader_options=ReaderOptions(expected_size=len(built.blob)))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await open_layer(source, cache=ChunkCache(1 << 20), nursery=nursery)

    with pytest.raises(BaseExceptionGroup) as raised:
        trio.run(main)
    (error,) = raised.value.exceptions  # the nursery of `main` only
    assert isinstance(error, FetchError) and "404" in str(error)
