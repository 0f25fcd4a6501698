"""Random access to a blob in a local file, and the choice between local and HTTP readers.

The file is opened once and read with pread in worker threads: the descriptor pins the blob
that was opened, so a file replaced by rename keeps serving the old bytes, and one truncated
in place is reported instead of returning short data.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import url2pathname

import trio

from lazyfs.fetch.base import FetchStats, ReaderOptions, byte_range, check_read_args
from lazyfs.fetch.errors import BlobChangedError, FetchError
from lazyfs.fetch.http import HttpRangeReader

if TYPE_CHECKING:
    from lazyfs.fetch.primed import PrimedAnswers

# read_stream hands a file on in pieces of this size, as a network answer would arrive.
STREAM_PIECE_BYTES = 256 * 1024


class LocalFileReader:
    """A BlobReader over a local file; reads run in threads so they never block the loop."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        expected_size: int | None = None,
        max_threads: int = 4,
    ) -> None:
        self.source = os.fspath(path)
        self.stats = FetchStats()
        self._expected_size = expected_size
        self._limiter = trio.CapacityLimiter(max_threads)
        self._open_lock = trio.Lock()
        self._fd: int | None = None
        self._size: int | None = None
        self._closed = False
        # aclose waits for reads in threads, so their descriptor is never closed (and reused)
        # under them.
        self._reads_in_flight = 0
        self._idle = trio.Event()

    @property
    def size(self) -> int | None:
        """The file size seen by `open`, or None before it."""
        return self._size

    async def __aenter__(self) -> LocalFileReader:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> int:
        """Open the file and return its size. Raises FetchError (BlobChangedError if the size
        differs from `expected_size`)."""
        async with self._open_lock:
            if self._closed:
                raise FetchError(f"{self.source}: reader is closed")
            if self._size is not None:
                return self._size
            try:
                fd, size = await trio.to_thread.run_sync(_open_regular_file, self.source)
            except OSError as exc:
                self.stats.failures += 1
                raise FetchError(f"{self.source}: cannot open: {exc.strerror}") from exc
            if self._expected_size is not None and size != self._expected_size:
                os.close(fd)
                self.stats.failures += 1
                raise BlobChangedError(
                    f"{self.source}: file is {size} bytes, expected {self._expected_size}"
                )
            self._fd, self._size = fd, size
            return size

    def expect_size(self, size: int) -> None:
        """The file must be `size` bytes (checked at open). Raises BlobChangedError if it
        was opened already with another size."""
        if self._size is not None and self._size != size:
            raise BlobChangedError(f"{self.source}: file is {self._size} bytes, expected {size}")
        self._expected_size = size

    async def read_clipped(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes at `offset`, fewer where the file ends. Raises FetchError."""
        blob_size = await self.open() if self._size is None else self._size
        return await self.read(offset, max(0, min(size, blob_size - offset)))

    async def read_stream(self, offset: int, size: int,
                          sink: Callable[[bytes], Awaitable[None]]) -> None:
        """Hand the `size` bytes at `offset` to `sink` in order, in pieces. Raises what
        `read` raises, and what `sink` raises."""
        blob_size = await self.open() if self._size is None else self._size
        check_read_args(self.source, offset, size, blob_size)
        for start in range(offset, offset + size, STREAM_PIECE_BYTES):
            await sink(await self.read(start, min(STREAM_PIECE_BYTES, offset + size - start)))

    async def read(self, offset: int, size: int) -> bytes:
        """Return exactly `size` bytes at `offset` (opening first if needed).

        Raises BlobChangedError if the file shrank since `open`, FetchError otherwise.
        """
        blob_size = await self.open() if self._size is None else self._size
        check_read_args(self.source, offset, size, blob_size)
        if size == 0:
            return b""
        if self._closed or self._fd is None:
            raise FetchError(f"{self.source} {byte_range(offset, size)}: reader is closed")
        self._reads_in_flight += 1
        try:
            self.stats.requests += 1
            data, now_size = await trio.to_thread.run_sync(
                _pread_exactly, self._fd, offset, size, limiter=self._limiter
            )
        except OSError as exc:
            self.stats.failures += 1
            raise FetchError(
                f"{self.source} {byte_range(offset, size)}: read failed: {exc.strerror}"
            ) from exc
        finally:
            self._reads_in_flight -= 1
            if self._reads_in_flight == 0:
                self._idle.set()
        self.stats.bytes_fetched += len(data)
        if len(data) != size:
            self.stats.failures += 1
            raise BlobChangedError(
                f"{self.source} {byte_range(offset, size)}: got {len(data)} bytes; the file is "
                f"now {now_size} bytes, was {blob_size} at open"
            )
        return data

    async def aclose(self) -> None:
        self._closed = True
        while self._reads_in_flight:
            self._idle = trio.Event()
            await self._idle.wait()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_regular_file(path: str) -> tuple[int, int]:
    """Open read-only and return (descriptor, size); refuse anything but a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IsADirectoryError(0, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size


def _pread_exactly(fd: int, offset: int, size: int) -> tuple[bytes, int | None]:
    """pread until `size` bytes or EOF; on a short read also return the file's size now."""
    parts: list[bytes] = []
    done = 0
    while done < size:
        part = os.pread(fd, size - done, offset + done)
        if not part:
            return b"".join(parts), os.fstat(fd).st_size
        parts.append(part)
        done += len(part)
    return b"".join(parts), None


def open_blob_reader(
    source: str, options: ReaderOptions | None = None, primed: PrimedAnswers | None = None
) -> HttpRangeReader | LocalFileReader:
    """Return a reader for an http(s) URL, a file:// URL or a local path (not yet opened);
    one for a URL answers its first requests from what a head start `primed`.

    For a local file only `options.expected_size` applies. Raises ValueError for another
    scheme.
    """
    options = options or ReaderOptions()
    if "://" not in source:
        return LocalFileReader(source, expected_size=options.expected_size)
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return HttpRangeReader(source, options, primed=primed)
    if scheme == "file" and parts.netloc in ("", "localhost"):
        path = url2pathname(parts.path)
        return LocalFileReader(path, expected_size=options.expected_size)
    raise ValueError(f"{source}: unsupported source; use an http(s):// or file:// URL or a path")
