"""Random access to a remote blob with HTTP Range requests.

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

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx
import trio

from lazyfs.fetch.base import (
    FetchStats,
    ReaderOptions,
    SpeedLimit,
    backoff_delay_s,
    byte_range,
    check_read_args,
)
from lazyfs.fetch.body import read_capped
from lazyfs.fetch.errors import (
    BlobChangedError,
    FetchError,
    RangeNotSupportedError,
    SourceUnreachableError,
)
from lazyfs.fetch.tls import LazyCAContext, tls_context

if TYPE_CHECKING:
    from lazyfs.fetch.head_start import PrimedAnswers

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0
_RETRY_AFTER_CAP_S = 10.0
_MAX_REDIRECTS = 10
# Error and redirect bodies are read up to this much so the connection can be reused.
_DRAIN_CAP_BYTES = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# What an expired or revoked signed URL answers.
_EXPIRED_STATUSES = frozenset({401, 403, 404, 410})
# Attempts in a row that found nobody to connect to before the source counts as down: a
# server that refuses twice is not listening, and every read would pay the whole backoff.
UNREACHABLE_AFTER_ATTEMPTS = 2
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
T = TypeVar("T")


class _Transient(Exception):
    """An attempt failed in a way that another attempt may not."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


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
        self.source = _redacted(parts)
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
        self._client = _client(options, transport, options.max_connections,
                               https=parts.scheme == "https")
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

    async def aclose(self) -> None:
        await self._client.aclose()

    def _fail(self, exc: FetchError) -> None:
        # Counted, not logged: the caller reports the error (once) with what it was for.
        self.stats.failures += 1

    async def _fetch(self, start: int, end: int, *, probe: bool,
                     transfer: _Transfer | None = None) -> tuple[bytes, int]:
        """Fetch bytes start..end (inclusive) with bounded retries: (body, blob size).
        With a sink, the body goes there instead and each attempt resumes after what it took."""
        what = f"{self.source} {byte_range(start, end - start + 1)}"
        transfer = transfer or _Transfer()
        primed = None if self._primed is None or probe else self._primed.take_range(
            start, end, whole=transfer.sink is None)
        if primed is not None:
            # A head start's answer, checked as a network answer is; for a stream, the bytes
            # it holds go first and the rest is fetched from where they end.
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

        async def attempt() -> tuple[bytes, int]:
            return await self._attempt(start + transfer.delivered, end, probe, what, transfer)

        return await _with_retries(what, self.options, end - start + 1, attempt,
                                   self._limiter, self.stats)

    async def _attempt(
        self, start: int, end: int, probe: bool, what: str, transfer: _Transfer
    ) -> tuple[bytes, int]:
        """One attempt: try the remembered redirect target, else resolve through the origin."""
        remembered = self._resolved_url
        if remembered is not None:
            trusted = _same_origin(remembered, self._url)
            response = await self._get(remembered, start, end, trusted=trusted)
            if response.status_code not in _EXPIRED_STATUSES | _REDIRECT_STATUSES:
                return await self._accept(response, start, end, probe, what, transfer)
            # An expired signed URL: not a failure, the origin hands out a fresh one.
            log.debug(
                "%s: %s answered %d, asking the origin again",
                what,
                remembered.host,
                response.status_code,
            )
            await _drain(response)
            if self._resolved_url == remembered:
                self._resolved_url = None
        url = self._url
        for _ in range(_MAX_REDIRECTS + 1):
            response = await self._get(url, start, end, trusted=_same_origin(url, self._url))
            location = response.headers.get("Location")
            if response.status_code not in _REDIRECT_STATUSES or location is None:
                result = await self._accept(response, start, end, probe, what, transfer)
                self._resolved_url = None if url == self._url else url
                return result
            await _drain(response)
            url = response.url.join(location)
        raise FetchError(f"{what}: more than {_MAX_REDIRECTS} redirects")

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
        raise _Transient(f"no answer within {self.options.low_speed.time_s:g} s")

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
            await _drain(response)
            if status == 429 or status >= 500:
                raise _Transient(_status_text(response), _retry_after_s(response))
            empty = _UNSATISFIED_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if probe and status == 416 and empty and int(empty.group(1)) == 0:
                return b"", 0
            if status in _EXPIRED_STATUSES and response.url != self._url:
                raise FetchError(f"{what}: {_status_text(response)} from {response.url.host}")
            raise FetchError(f"{what}: {_status_text(response)}")
        try:
            total, end = self._check_content_range(response, start, end, what, transfer.clip)
            encoding = response.headers.get("Content-Encoding", "identity").lower()
            if encoding != "identity":
                raise FetchError(f"{what}: body is {encoding}-encoded; expected raw bytes")
            if transfer.sink is not None:
                await self._stream_body(response, end - start + 1, what, transfer)
                return b"", total
            body = await _read_body(response, end - start + 1, what, self.options.low_speed)
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
            raise _Transient(f"slower than {limit.bytes_per_s} bytes/s for "
                             f"{limit.time_s:g} s ({received} of {size} bytes)")
        if received < size:
            raise _Transient(f"short body: {received} of {size} bytes")

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


async def get_small(
    url: str,
    max_bytes: int,
    options: ReaderOptions | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    shared_client: httpx.AsyncClient | None = None,
) -> bytes | None:
    """GET a small whole resource (a descriptor) with the deadline and retries of range reads;
    its body is read at most `max_bytes`. Redirects are followed; headers and auth go to the
    origin only. Returns None on 404. `shared_client` (left open) lends its connections.

    Raises BodyTooLargeError, FetchError naming the URL and the last status or error (or that
    it is not an http(s) URL).
    """
    options = options or ReaderOptions()
    parts = urlsplit(url)
    what = _redacted(parts)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"{what}: not an http(s) URL")
    origin = httpx.URL(url)

    async def attempt(client: httpx.AsyncClient) -> bytes | None:
        target = origin
        for _ in range(_MAX_REDIRECTS + 1):
            trusted = _same_origin(target, origin)
            request = client.build_request(
                "GET", target, headers=options.headers if trusted else None
            )
            response = await client.send(
                request, auth=options.auth if trusted else None, stream=True,
                follow_redirects=False,
            )
            location = response.headers.get("Location")
            if response.status_code in _REDIRECT_STATUSES and location is not None:
                await _drain(response)
                target = response.url.join(location)
                continue
            try:
                if response.status_code == 404:
                    return None
                if response.status_code == 429 or response.status_code >= 500:
                    raise _Transient(_status_text(response), _retry_after_s(response))
                if response.status_code != 200:
                    raise FetchError(f"{what}: {_status_text(response)}")
                return await read_capped(response, max_bytes, what)
            finally:
                await response.aclose()
        raise FetchError(f"{what}: more than {_MAX_REDIRECTS} redirects")

    async with contextlib.AsyncExitStack() as stack:
        client = shared_client
        if client is None:
            client = await stack.enter_async_context(
                _client(options, transport, 1, https=parts.scheme == "https"))
        return await _with_retries(what, options, max_bytes, lambda: attempt(client),
                                   trio.CapacityLimiter(1), None)


async def _with_retries(
    what: str,
    options: ReaderOptions,
    size_bytes: int,
    attempt: Callable[[], Awaitable[T]],
    limiter: trio.CapacityLimiter,
    stats: FetchStats | None,
) -> T:
    """Run `attempt` holding `limiter`, under a deadline (waiting for the limiter is not
    counted against it), retrying transient faults `options.max_retries` times
    with jittered backoff. Raises FetchError naming `what` and the last fault, or
    SourceUnreachableError when no attempt got a connection."""
    deadline_s = options.attempt_deadline_s(size_bytes)
    last = ""
    retry_after_s: float | None = None
    unconnected = 0
    for number in range(options.max_retries + 1):
        if number:
            if stats is not None:
                stats.retries += 1
            delay_s = backoff_delay_s(number, options.backoff_base_s, retry_after_s,
                                      max_s=_MAX_BACKOFF_S, retry_after_cap_s=_RETRY_AFTER_CAP_S)
            log.debug("%s: %s; retry %d of %d in %.2f s", what, last, number,
                      options.max_retries, delay_s)
            await trio.sleep(delay_s)
        retry_after_s = None
        try:
            async with limiter:
                with trio.fail_after(deadline_s):
                    return await attempt()
        except _Transient as exc:
            last, retry_after_s = exc.reason, exc.retry_after_s
        except trio.TooSlowError:
            last = f"no complete answer within {deadline_s:.1f} s"
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Refused, unresolvable, unroutable: nothing of this source answers.
            last = _describe(exc)
            unconnected += 1
            if unconnected == number + 1 >= UNREACHABLE_AFTER_ATTEMPTS:
                raise SourceUnreachableError(
                    f"{what}: no connection in {unconnected} attempts; last: {last}"
                ) from exc
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            last = _describe(exc)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise FetchError(f"{what}: {_describe(exc)}") from exc
    message = f"{what}: failed after {options.max_retries + 1} attempts; last: {last}"
    if unconnected == options.max_retries + 1:  # fewer attempts than UNREACHABLE_AFTER_...
        raise SourceUnreachableError(message)
    raise FetchError(message)


def _client(options: ReaderOptions, transport: httpx.AsyncBaseTransport | None,
            max_connections: int, *, https: bool) -> httpx.AsyncClient:
    """A pooled client with the timeouts of `options`; redirects are followed by hand. The
    process's TLS context is shared (its CAs start loading now for an `https` origin)."""
    verify = tls_context(options.verify_tls)
    if https and isinstance(verify, LazyCAContext):
        verify.start_loading()
    connect_s, read_s = options.connect_timeout_s, options.read_timeout_s
    return httpx.AsyncClient(
        transport=transport,
        verify=verify,
        http1=True,
        http2=False,
        follow_redirects=False,
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        timeout=httpx.Timeout(connect=connect_s, read=read_s, write=read_s,
                              pool=connect_s + read_s),
    )


def _redacted(parts: SplitResult) -> str:
    """The URL without credentials, for messages."""
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


async def _read_body(response: httpx.Response, size: int, what: str,
                     limit: SpeedLimit) -> bytes:
    """Read exactly `size` body bytes: fewer is transient, more is a broken server.

    The low-speed limit: each window of `limit.time_s` must bring the limit's worth of
    bytes (or the rest of the body), else the attempt is a transient fault."""
    window_s = limit.time_s
    window_bytes = limit.bytes_per_s * window_s
    body = bytearray()
    received = 0
    with trio.CancelScope(deadline=trio.current_time() + window_s) as window:
        async for chunk in response.aiter_bytes():
            body += chunk
            received += len(chunk)
            if len(body) > size:
                raise FetchError(f"{what}: body longer than the {size} bytes requested")
            if received >= window_bytes:
                received = 0
                window.deadline = trio.current_time() + window_s
    if window.cancelled_caught:
        raise _Transient(f"slower than {limit.bytes_per_s} bytes/s for "
                         f"{window_s:g} s ({len(body)} of {size} bytes)")
    if len(body) < size:
        raise _Transient(f"short body: {len(body)} of {size} bytes")
    return bytes(body)


async def _drain(response: httpx.Response) -> None:
    """Read a small unwanted body so the connection stays reusable; close a large one."""
    try:
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            if received > _DRAIN_CAP_BYTES:
                break
    except httpx.HTTPError:
        pass  # the connection is closed below; the status has been seen already
    finally:
        await response.aclose()


def _same_origin(url: httpx.URL, origin: httpx.URL) -> bool:
    return (url.scheme, url.host, url.port) == (origin.scheme, origin.host, origin.port)


def _status_text(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def _retry_after_s(response: httpx.Response) -> float | None:
    """Retry-After as seconds (either delta-seconds or an HTTP date), if present."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
