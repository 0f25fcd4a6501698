"""Random access to a remote blob with HTTP Range requests (how each request is attempted,
retried and given up on is `http_attempts.py`).

One pooled keep-alive client per blob. Every attempt runs under a trio deadline and a
low-speed limit (too few bytes for too long, headers included, ends it); transient faults
(connection and read errors, timeouts, slow or stalled answers, 5xx, 429, short bodies) are
retried a bounded number of times with jittered exponential backoff, anything else fails at
once. When the first attempts find nobody to connect to, the error says at once that the
source is unreachable, without the rest of the backoff. A redirect
target (object storage, a CDN) is remembered and asked directly, without the credentials meant
for the origin; when it stops accepting (an expired signed URL) the origin is asked again.

Only the blob's size is held against it: an ETag or Last-Modified that changes with the bytes
unchanged (origins behind a load balancer, a file touched or copied again) is no error, since
the image layer checks every frame against its digest. A blob whose size a descriptor or
manifest promises is not probed: the promise is checked against the Content-Range of every
answer. `read_clipped` learns an unknown size from its answer instead of a probe of its own;
`read_stream` hands the body on as it arrives and resumes where a broken attempt stopped.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import trio

from lazyfs.fetch.base import (
    FetchStats,
    ReaderOptions,
    byte_range,
    check_read_args,
)
from lazyfs.fetch.errors import (
    BlobChangedError,
    FetchError,
    RangeNotSupportedError,
)
from lazyfs.fetch.http_attempts import (
    EXPIRED_STATUSES,
    MAX_REDIRECTS,
    REDIRECT_STATUSES,
    Transient,
    drain,
    pooled_client,
    read_body,
    redacted,
    retry_after_s,
    same_origin,
    start_tls,
    status_text,
    with_retries,
)
from lazyfs.fetch.http_attempts import get_small as get_small

if TYPE_CHECKING:
    from lazyfs.fetch.primed import ArrivingRest, PrimedAnswers

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
# A head start's answer still arriving is handed on in pieces of up to this much.
STREAM_PIECE_BYTES = 64 * 1024


@dataclass
class _Transfer:
    """One range as asked for: `clip` accepts an answer cut at the end of the blob; `sink`
    takes the body piece by piece (then `delivered` counts what it has taken)."""

    clip: bool = False
    sink: Callable[[bytes], Awaitable[None]] | None = None
    delivered: int = 0


class HttpRangeReader:
    """A BlobReader over an http(s) URL; the server must honour Range requests."""

    def __init__(
        self,
        url: str,
        options: ReaderOptions | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        primed: PrimedAnswers | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url}: not an http(s) URL")
        # Credentials in the URL must not end up in log lines.
        self.source = redacted(parts)
        self.stats = FetchStats()
        self.options = options = options or ReaderOptions()
        self._url = httpx.URL(url)
        self._limiter = trio.CapacityLimiter(options.max_connections)
        self._open_lock = trio.Lock()
        # The size a descriptor or manifest promised, until an answer confirms it (then
        # `_size_confirmed`), or the size seen.
        self._size: int | None = options.expected_size
        self._size_confirmed = False
        # Where the origin last redirected to; asked directly until it refuses.
        self._resolved_url: httpx.URL | None = None
        self._transport = transport
        self._https = parts.scheme == "https"
        # Made at the first request: building one imports httpx's transport (httpcore,
        # ~10 ms), and a layer the disk cache holds may send none.
        self._http: httpx.AsyncClient | None = None
        start_tls(options, https=self._https)
        # Answers a head start fetched before this reader existed (each serves one request;
        # counted in the stats when it does).
        self._primed = primed

    @property
    def size(self) -> int | None:
        """The blob size promised (`expected_size`, `expect_size`) or seen; None while
        unknown."""
        return self._size

    async def __aenter__(self) -> HttpRangeReader:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def expect_size(self, size: int) -> None:
        """The blob must be `size` bytes (a descriptor found after the reader was made says
        so): checked against every answer, as `ReaderOptions.expected_size` is. Raises
        BlobChangedError if an answer already showed another size."""
        if self._size is not None and self._size != size:
            seen = "promised" if not self._size_confirmed else "seen"
            raise BlobChangedError(f"{self.source}: blob is {size} bytes by its descriptor, "
                                   f"{self._size} {seen} before")
        self._size = size

    async def open(self) -> int:
        """Return the blob size: the one `expected_size` promises (checked by every later
        answer, no request now), or else probed with a one-byte range; remember the ETag.

        Raises RangeNotSupportedError if the server ignores Range, BlobChangedError if the
        size differs from `expected_size`, FetchError for anything else.
        """
        async with self._open_lock:
            if self._size is not None:
                return self._size
            try:
                _, total = await self._fetch(0, 0, probe=True)
                expected = self.options.expected_size
                if expected is not None and total != expected:
                    raise BlobChangedError(
                        f"{self.source}: blob is {total} bytes, expected {expected}"
                    )
            except FetchError as exc:
                self._fail(exc)
                raise
            self._size = total
            self._size_confirmed = True
            return total

    async def read(self, offset: int, size: int) -> bytes:
        """Return exactly `size` bytes at `offset` (opening first if needed).

        Raises BlobChangedError if the blob's size changed since `open`,
        RangeNotSupportedError, SourceUnreachableError when no attempt could connect, or
        FetchError naming URL, range and the last status or error.
        """
        blob_size = await self.open() if self._size is None else self._size
        check_read_args(self.source, offset, size, blob_size)
        if size == 0:
            return b""
        try:
            body, _ = await self._fetch(offset, offset + size - 1, probe=False)
        except FetchError as exc:
            self._fail(exc)
            raise
        return body

    async def read_clipped(self, offset: int, size: int) -> bytes:
        """Return up to `size` bytes at `offset`, fewer where the blob ends first. An unknown
        blob size is learnt from the answer's Content-Range: no probe of its own.

        Raises FetchError (for an `offset` at or past the end too), BlobChangedError.
        """
        if self._size is not None:
            size = max(0, min(size, self._size - offset))
            check_read_args(self.source, offset, size, self._size)
            return await self.read(offset, size)
        if offset < 0 or size <= 0:
            raise ValueError(f"{self.source}: bad clipped read (offset={offset}, size={size})")
        try:
            body, total = await self._fetch(offset, offset + size - 1, probe=False,
                                            transfer=_Transfer(clip=True))
        except FetchError as exc:
            self._fail(exc)
            raise
        if self._size is None:
            self._size = total
        return body

    async def read_stream(self, offset: int, size: int,
                          sink: Callable[[bytes], Awaitable[None]]) -> None:
        """Hand the `size` bytes at `offset` to `sink` in order, piece by piece as they
        arrive (`sink` is awaited before the next piece is read: it sets the pace). A broken
        attempt is retried from the first byte not yet handed on.

        Raises what `read` raises, and what `sink` raises (the transfer stops).
        """
        blob_size = await self.open() if self._size is None else self._size
        check_read_args(self.source, offset, size, blob_size)
        if size == 0:
            return
        try:
            await self._fetch(offset, offset + size - 1, probe=False,
                              transfer=_Transfer(sink=sink))
        except FetchError as exc:
            self._fail(exc)
            raise

    async def get_small(self, url: str, max_bytes: int) -> bytes | None:
        """`get_small` through this reader's connections: a descriptor beside the blob then
        costs no connection of its own."""
        if self._primed is not None:
            found, body = self._primed.take_document(url)
            if found and (body is None or len(body) <= max_bytes):
                return body
        return await get_small(url, max_bytes, self.options, shared_client=self._client)

    @property
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = pooled_client(self.options, self._transport,
                                       self.options.max_connections, https=self._https)
        return self._http

    async def aclose(self) -> None:
        if self._primed is not None:
            self._primed.close_rests()
        if self._http is not None:
            await self._http.aclose()

    def _fail(self, exc: FetchError) -> None:
        # Counted, not logged: the caller reports the error (once) with what it was for.
        self.stats.failures += 1

    async def _fetch(self, start: int, end: int, *, probe: bool,
                     transfer: _Transfer | None = None) -> tuple[bytes, int]:
        """Fetch bytes start..end (inclusive) with bounded retries: (body, blob size).
        With a sink, the body goes there instead and each attempt resumes after what it took."""
        what = f"{self.source} {byte_range(start, end - start + 1)}"
        transfer = transfer or _Transfer()
        early = None if probe else self._primed
        primed = None if early is None else early.take_range(start, end,
                                                             whole=transfer.sink is None)
        while early is not None and primed is not None:
            # A head start's answer, checked as a network answer is; for a stream, the bytes
            # its answers hold go first, one after another, and the rest is fetched from
            # where they end.
            body, total, transferred = primed
            self._check_total(total, what)
            self._size_confirmed = True  # the server named it, a moment ago
            self.stats.requests += 1
            self.stats.bytes_fetched += transferred
            if transfer.sink is None:
                return body, total
            await transfer.sink(body)
            transfer.delivered += len(body)
            if start + transfer.delivered > end:
                return b"", total
            primed = early.take_range(start + transfer.delivered, end, whole=False)
        rest = None if early is None or transfer.sink is None else early.take_rest(
            start + transfer.delivered)
        if rest is not None and await self._stream_rest(rest, start, end, what, transfer):
            return b"", rest.blob_size

        async def attempt() -> tuple[bytes, int]:
            return await self._attempt(start + transfer.delivered, end, probe, what, transfer)

        return await with_retries(what, self.options, end - start + 1, attempt,
                                   self._limiter, self.stats)

    async def _stream_rest(self, rest: ArrivingRest, start: int, end: int, what: str,
                           transfer: _Transfer) -> bool:
        """Hand the stream `transfer` of bytes start..end what arrives of a head start's
        answer still arriving (`rest`), each piece in a worker thread within the low-speed
        time. Returns whether that was all of it; else (the answer ended first, or was slow)
        the caller fetches the rest from where it got to."""
        sink = transfer.sink
        try:
            self._check_total(rest.blob_size, what)
            while sink is not None and start + transfer.delivered <= end and rest.length > 0:
                wanted = min(STREAM_PIECE_BYTES, rest.length, end + 1 - start - transfer.delivered)
                piece = b""
                with trio.move_on_after(self.options.low_speed.time_s):
                    piece = await trio.to_thread.run_sync(rest.read, wanted,
                                                          abandon_on_cancel=True)
                if not piece:  # cut short, or too slow
                    return False
                rest.length -= len(piece)
                self.stats.bytes_fetched += len(piece)
                await sink(piece)
                transfer.delivered += len(piece)
            return start + transfer.delivered > end
        except OSError:
            return False
        finally:
            rest.close()

    async def _attempt(
        self, start: int, end: int, probe: bool, what: str, transfer: _Transfer
    ) -> tuple[bytes, int]:
        """One attempt: try the remembered redirect target, else resolve through the origin."""
        remembered = self._resolved_url
        if remembered is not None:
            trusted = same_origin(remembered, self._url)
            response = await self._get(remembered, start, end, trusted=trusted)
            if response.status_code not in EXPIRED_STATUSES | REDIRECT_STATUSES:
                return await self._accept(response, start, end, probe, what, transfer)
            # An expired signed URL: not a failure, the origin hands out a fresh one.
            log.debug(
                "%s: %s answered %d, asking the origin again",
                what,
                remembered.host,
                response.status_code,
            )
            await drain(response)
            if self._resolved_url == remembered:
                self._resolved_url = None
        url = self._url
        for _ in range(MAX_REDIRECTS + 1):
            response = await self._get(url, start, end, trusted=same_origin(url, self._url))
            location = response.headers.get("Location")
            if response.status_code not in REDIRECT_STATUSES or location is None:
                result = await self._accept(response, start, end, probe, what, transfer)
                self._resolved_url = None if url == self._url else url
                return result
            await drain(response)
            url = response.url.join(location)
        raise FetchError(f"{what}: more than {MAX_REDIRECTS} redirects")

    async def _get(self, url: httpx.URL, start: int, end: int, *, trusted: bool) -> httpx.Response:
        """Send one GET; headers and auth only to the origin, never to another host. No
        answer within the low-speed time is a transient fault."""
        headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
        if trusted:
            headers = {**self.options.headers, **headers}
        request = self._client.build_request("GET", url, headers=headers)
        self.stats.requests += 1
        with trio.move_on_after(self.options.low_speed.time_s):
            return await self._client.send(
                request, auth=self.options.auth if trusted else None, stream=True,
                follow_redirects=False,
            )
        raise Transient(f"no answer within {self.options.low_speed.time_s:g} s")

    async def _accept(
        self, response: httpx.Response, start: int, end: int, probe: bool, what: str,
        transfer: _Transfer,
    ) -> tuple[bytes, int]:
        """Check a response against the request and the blob seen at open; read its body."""
        status = response.status_code
        if status == 200:
            # The whole blob would follow: refuse it before a single body byte is read.
            await response.aclose()
            raise RangeNotSupportedError(
                f"{what}: server answered 200 with the whole blob instead of 206 Partial Content;"
                " it does not support Range requests"
            )
        if status != 206:
            await drain(response)
            if status == 429 or status >= 500:
                raise Transient(status_text(response), retry_after_s(response))
            empty = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if probe and status == 416 and empty and int(empty.group(1)) == 0:
                return b"", 0
            if status in EXPIRED_STATUSES and response.url != self._url:
                raise FetchError(f"{what}: {status_text(response)} from {response.url.host}")
            raise FetchError(f"{what}: {status_text(response)}")
        try:
            total, end = self._check_content_range(response, start, end, what, transfer.clip)
            encoding = response.headers.get("Content-Encoding", "identity").lower()
            if encoding != "identity":
                raise FetchError(f"{what}: body is {encoding}-encoded; expected raw bytes")
            if transfer.sink is not None:
                await self._stream_body(response, end - start + 1, what, transfer)
                return b"", total
            body = await read_body(response, end - start + 1, what, self.options.low_speed)
        finally:
            await response.aclose()
        self.stats.bytes_fetched += len(body)
        return body, total

    async def _stream_body(self, response: httpx.Response, size: int, what: str,
                           transfer: _Transfer) -> None:
        """Hand exactly `size` body bytes to the sink: fewer is transient (the next attempt
        resumes), more is a broken server."""
        assert transfer.sink is not None
        limit = self.options.low_speed
        window_bytes = limit.bytes_per_s * limit.time_s
        received = in_window = 0
        with trio.CancelScope(deadline=trio.current_time() + limit.time_s) as window:
            async for piece in response.aiter_bytes():
                if received + len(piece) > size:
                    raise FetchError(f"{what}: body longer than the {size} bytes requested")
                received += len(piece)
                in_window += len(piece)
                self.stats.bytes_fetched += len(piece)
                transfer.delivered += len(piece)
                if in_window >= window_bytes:
                    in_window = 0
                    window.deadline = trio.current_time() + limit.time_s
                waited = trio.current_time()
                await transfer.sink(piece)  # time the consumer holds it back is not the link's
                window.deadline += trio.current_time() - waited
        if window.cancelled_caught:
            raise Transient(f"slower than {limit.bytes_per_s} bytes/s for "
                             f"{limit.time_s:g} s ({received} of {size} bytes)")
        if received < size:
            raise Transient(f"short body: {received} of {size} bytes")

    def _check_total(self, total: int, what: str) -> None:
        """The blob size an answer named must be the one promised or seen. Raises
        BlobChangedError."""
        if self._size is not None and total != self._size:
            if not self._size_confirmed:
                raise BlobChangedError(f"{what}: blob is {total} bytes, expected {self._size}")
            raise BlobChangedError(f"{what}: blob is now {total} bytes, was {self._size} at open")

    def _check_content_range(
        self, response: httpx.Response, start: int, end: int, what: str, clip: bool = False
    ) -> tuple[int, int]:
        """Return the blob size and the last byte sent, from Content-Range, which must match
        the request exactly (with `clip`, it may end early at the end of the blob)."""
        content_range = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.fullmatch(content_range.strip())
        if match is None or match.group(3) == "*":
            raise FetchError(f"{what}: 206 with unusable Content-Range {content_range!r}")
        got_start, got_end, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
        self._check_total(total, what)
        clipped = clip and got_start == start and got_end == total - 1 and got_end < end
        if (got_start, got_end) != (start, end) and not clipped:
            raise FetchError(
                f"{what}: server sent Content-Range {content_range!r} for a different range"
            )
        self._size_confirmed = True
        return total, got_end
