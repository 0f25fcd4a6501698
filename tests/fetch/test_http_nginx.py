"""HttpRangeReader against a real nginx: ranges, size probe, replaced blobs, concurrency."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from lazyfs.fetch.base import ReaderOptions
from lazyfs.fetch.errors import BlobChangedError, FetchError, SourceUnreachableError
from lazyfs.fetch.http import HttpRangeReader
from lazyfs.fetch.local import open_blob_reader
from tests.support import nginx
from tests.support.nginx import NginxServer

pytestmark = pytest.mark.network
nginx_server = nginx.nginx_server

StartServer = Callable[[Path], NginxServer]


@pytest.fixture
def blob(tmp_path: Path) -> bytes:
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 123)
    (tmp_path / "layer.blob").write_bytes(data)
    return data


def test_ranges_and_size_probe(nginx_server: StartServer, tmp_path: Path, blob: bytes) -> None:
    server = nginx_server(tmp_path)

    async def main() -> None:
        async with HttpRangeReader(server.url + "layer.blob") as reader:
            assert reader.size == len(blob)
            for offset, size in [(0, 1), (1, 4096), (1_000_000, 1_048_576), (len(blob) - 9, 9)]:
                assert await reader.read(offset, size) == blob[offset : offset + size]
            assert reader.stats.requests == 5
            assert reader.stats.retries == 0

    trio.run(main)
    lines = server.access_lines()
    assert len(lines) == 5
    assert all(" 206 " in line for line in lines)
    assert '"bytes=1000000-2048575" 206 1048576' in lines[3]


def test_open_blob_reader_picks_http(
    nginx_server: StartServer, tmp_path: Path, blob: bytes
) -> None:
    server = nginx_server(tmp_path)

    async def main() -> None:
        reader = open_blob_reader(server.url + "layer.blob", ReaderOptions(max_connections=2))
        assert isinstance(reader, HttpRangeReader)
        assert await reader.open() == len(blob)
        assert await reader.read(77, 77) == blob[77:154]
        await reader.aclose()

    trio.run(main)


def test_missing_blob_fails_with_status(nginx_server: StartServer, tmp_path: Path) -> None:
    server = nginx_server(tmp_path)

    async def main() -> None:
        async with HttpRangeReader(server.url + "absent.blob") as reader:
            await reader.read(0, 1)

    with pytest.raises(FetchError, match=r"absent.blob bytes=0-0: HTTP 404"):
        trio.run(main)


def test_blob_replaced_under_server(nginx_server: StartServer, tmp_path: Path, blob: bytes) -> None:
    server = nginx_server(tmp_path)
    path = tmp_path / "layer.blob"

    async def main() -> None:
        async with HttpRangeReader(server.url + "layer.blob") as reader:
            assert await reader.read(0, 100) == blob[:100]
            # Same size, another mtime (so another ETag): not an error of the reader, which
            # returns what is served; the image layer checks every frame against its digest.
            replacement = tmp_path / "layer.blob.new"
            replacement.write_bytes(bytes(len(blob)))
            stat = path.stat()
            os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
            replacement.replace(path)
            assert await reader.read(0, 100) == bytes(100)
            # A different size is caught.
            path.write_bytes(blob[:1000])
            with pytest.raises(BlobChangedError, match="now 1000 bytes"):
                await reader.read(0, 100)
            assert reader.stats.failures == 1

    trio.run(main)


def test_concurrent_reads_correct(nginx_server: StartServer, tmp_path: Path, blob: bytes) -> None:
    server = nginx_server(tmp_path)
    rng = random.Random(11)
    ranges = [(rng.randrange(len(blob) - 70_000), rng.randrange(1, 70_000)) for _ in range(64)]

    async def main() -> None:
        results: dict[int, bytes] = {}
        options = ReaderOptions(max_connections=4)
        async with HttpRangeReader(server.url + "layer.blob", options) as reader:

            async def fetch(index: int, offset: int, size: int) -> None:
                results[index] = await reader.read(offset, size)

            async with trio.open_nursery() as nursery:
                for index, (offset, size) in enumerate(ranges):
                    nursery.start_soon(fetch, index, offset, size)
        for index, (offset, size) in enumerate(ranges):
            assert results[index] == blob[offset : offset + size], index

    trio.run(main)
    assert len(server.access_lines()) == 1 + len(ranges)


def test_stopped_server_is_unreachable_without_the_whole_backoff(
    nginx_server: StartServer, tmp_path: Path, blob: bytes
) -> None:
    server = nginx_server(tmp_path)

    async def main() -> None:
        reader = HttpRangeReader(
            server.url + "layer.blob",
            ReaderOptions(max_retries=4, backoff_base_s=0.01, connect_timeout_s=2),
        )
        async with reader:
            server.stop()
            with pytest.raises(SourceUnreachableError,
                               match=r"no connection in 2 attempts; last: ConnectError"):
                await reader.read(0, 10)
            assert reader.stats.retries == 1

    trio.run(main)


def test_a_body_that_arrives_faster_than_it_is_taken_comes_in_large_pieces(
    nginx_server: StartServer, tmp_path: Path, blob: bytes
) -> None:
    """The reader's connections read up to lazyfs.fetch.large_reads.READ_BYTES a time: a
    streamed body whose consumer lags (here it pauses once) comes in pieces of more than
    httpcore's own 64 KiB, with every byte in order."""
    server = nginx_server(tmp_path)
    pieces: list[bytes] = []

    async def sink(piece: bytes) -> None:
        if not pieces:
            await trio.sleep(0.2)  # the rest of the body waits in the socket meanwhile
        pieces.append(piece)

    async def main() -> None:
        async with HttpRangeReader(server.url + "layer.blob") as reader:
            await reader.read_stream(0, len(blob), sink)

    trio.run(main)
    assert b"".join(pieces) == blob
    assert max(len(piece) for piece in pieces) > 64 * 1024, [len(p) for p in pieces]
