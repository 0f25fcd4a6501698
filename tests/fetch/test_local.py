"""LocalFileReader and the choice of reader by source."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import trio

from lazyfs.fetch.base import BlobReader, ReaderOptions
from lazyfs.fetch.errors import BlobChangedError, FetchError
from lazyfs.fetch.http import HttpRangeReader
from lazyfs.fetch.local import LocalFileReader, open_blob_reader

BLOB = random.Random(3).randbytes(200_000)


@pytest.fixture
def blob_path(tmp_path: Path) -> Path:
    path = tmp_path / "layer.blob"
    path.write_bytes(BLOB)
    return path


def test_reads_exact_ranges(blob_path: Path) -> None:
    async def main() -> None:
        async with LocalFileReader(blob_path) as reader:
            assert isinstance(reader, BlobReader)
            assert reader.size == len(BLOB)
            assert await reader.read(0, 10) == BLOB[:10]
            assert await reader.read(150_000, 50_000) == BLOB[150_000:]
            assert await reader.read(7, 0) == b""
            assert reader.stats.requests == 2
            assert reader.stats.bytes_fetched == 50_010

    trio.run(main)


def test_concurrent_reads(blob_path: Path) -> None:
    rng = random.Random(5)
    ranges = [(rng.randrange(150_000), rng.randrange(1, 50_000)) for _ in range(50)]

    async def main() -> None:
        results: dict[int, bytes] = {}
        async with LocalFileReader(blob_path, max_threads=2) as reader:

            async def fetch(index: int, offset: int, size: int) -> None:
                results[index] = await reader.read(offset, size)

            async with trio.open_nursery() as nursery:
                for index, (offset, size) in enumerate(ranges):
                    nursery.start_soon(fetch, index, offset, size)
        for index, (offset, size) in enumerate(ranges):
            assert results[index] == BLOB[offset : offset + size]

    trio.run(main)


def test_missing_file(tmp_path: Path) -> None:
    async def main() -> None:
        await LocalFileReader(tmp_path / "absent.blob").open()

    with pytest.raises(FetchError, match=r"absent.blob: cannot open: No such file"):
        trio.run(main)


def test_directory_refused(tmp_path: Path) -> None:
    async def main() -> None:
        await LocalFileReader(tmp_path).open()

    with pytest.raises(FetchError, match="not a regular file"):
        trio.run(main)


def test_expected_size_checked(blob_path: Path) -> None:
    async def main() -> None:
        await LocalFileReader(blob_path, expected_size=5).open()

    with pytest.raises(BlobChangedError, match=r"200000 bytes, expected 5"):
        trio.run(main)


def test_read_past_end_and_bad_arguments(blob_path: Path) -> None:
    async def main() -> None:
        async with LocalFileReader(blob_path) as reader:
            with pytest.raises(FetchError, match=r"bytes=199990-200009: range ends past the end"):
                await reader.read(199_990, 20)
            with pytest.raises(ValueError, match="negative"):
                await reader.read(0, -1)

    trio.run(main)


def test_truncated_file_detected(blob_path: Path) -> None:
    async def main() -> None:
        async with LocalFileReader(blob_path) as reader:
            os.truncate(blob_path, 1000)
            assert await reader.read(0, 1000) == BLOB[:1000]
            with pytest.raises(BlobChangedError, match=r"got 0 bytes; the file is now 1000"):
                await reader.read(5000, 10)
            assert reader.stats.failures == 1

    trio.run(main)


def test_replaced_file_keeps_serving_opened_bytes(blob_path: Path) -> None:
    async def main() -> None:
        async with LocalFileReader(blob_path) as reader:
            replacement = blob_path.with_suffix(".new")
            replacement.write_bytes(b"\0" * len(BLOB))
            replacement.replace(blob_path)
            assert await reader.read(0, 100) == BLOB[:100]

    trio.run(main)


def test_closed_reader_refuses(blob_path: Path) -> None:
    async def main() -> None:
        reader = LocalFileReader(blob_path)
        await reader.open()
        await reader.aclose()
        with pytest.raises(FetchError, match="closed"):
            await reader.read(0, 1)

    trio.run(main)


def test_open_blob_reader_dispatch(blob_path: Path) -> None:
    local = open_blob_reader(str(blob_path), ReaderOptions(expected_size=len(BLOB),
                                                           max_retries=2))
    assert isinstance(local, LocalFileReader)
    by_url = open_blob_reader(blob_path.as_uri())
    assert isinstance(by_url, LocalFileReader) and by_url.source == str(blob_path)
    remote = open_blob_reader("https://registry.test/blob", ReaderOptions(max_connections=2))
    assert isinstance(remote, HttpRangeReader)
    assert remote.options.max_connections == 2
    with pytest.raises(TypeError, match="max_retry"):
        ReaderOptions(max_retry=2)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="max_connections >= 1"):
        ReaderOptions(max_connections=0)
    with pytest.raises(ValueError, match="unsupported source"):
        open_blob_reader("s3://bucket/blob")

    async def main() -> None:
        assert await local.read(10, 10) == BLOB[10:20]
        await local.aclose()
        await remote.aclose()

    trio.run(main)


def test_file_url_with_escapes(tmp_path: Path) -> None:
    path = tmp_path / "a layer%.blob"
    path.write_bytes(b"xyz")
    reader = open_blob_reader(path.as_uri())
    assert reader.source == str(path)
