"""Random access to a remote blob with HTTP Range requests.

One pooled keep-alive client per blob. Every attempt runs under a trio deadline; transient
faults (connection and read errors, timeouts, 5xx, 429, short bodies) are retried a bounded
number of times with jittered exponential backoff, anything else fails at once. A redirect
target (object storage, a CDN) is remembered and asked directly, without the credentials meant
for the origin; when it stops accepting (an expired signed URL) the origin is asked again.
"""

from __future__ import annotations

import functools
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx
import trio

from lazyfs.fetch.base import (
    FetchStats,
    ReaderOptions,
    backoff_delay_s,
    byte_range,
    check_read_args,
)
from lazyfs.fetch.body import read_capped
from lazyfs.fetch.errors import BlobChangedError, FetchError, RangeNotSupportedError

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0
_RETRY_AFTER_CAP_S = 10.0
_MAX_REDIRECTS = 10
# Error and redirect bodies are read up to this much so the connection can be reused.
_DRAIN_CAP_BYTES = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# What an expired or revoked signed URL answers.
_EXPIRED_STATUSES = frozenset({401, 403, 404, 410})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")
T = TypeVar("T")


class _Transient(Exception):
    """An attempt failed in a way that another attempt may not."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class HttpRangeReader:
    """A BlobReader over an http(s) URL; the server must honour Range requests."""

    def __init__(
        self,
        url: str,
        options: ReaderOptions | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
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
        self._size: int | None = None
        self._etag: str | None = None
        # Where the origin last redirected to; asked directly until it refuses.
        self._resolved_url: httpx.URL | None = None
        self._client = _client(options, transport, options.max_connections)

    @property
    def size(self) -> int | None:
        """The blob size seen by `open`, or None before it."""
        return self._size

    async def __aenter__(self) -> HttpRangeReader:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def open(self) -> int:
        """Probe with a one-byte range; return the blob size and remember it and the ETag.

        Raises RangeNotSupportedError if the server ignores Range, BlobChangedError if the
        size differs from `expected_size`, FetchError for anything else.
        """
        async with self._open_lock:
            if self._size is not None:
                return self._size
            try:
                _, total, etag = await self._fetch(0, 0, probe=True)
                expected = self.options.expected_size
                if expected is not None and total != expected:
                    raise BlobChangedError(
                        f"{self.source}: blob is {total} bytes, expected {expected}"
                    )
            except FetchError as exc:
                self._fail(exc)
                raise
            self._size, self._etag = total, etag
            return total

    async def read(self, offset: int, size: int) -> bytes:
        """Return exactly `size` bytes at `offset` (opening first if needed).

        Raises BlobChangedError if the blob's size or ETag changed since `open`,
        RangeNotSupportedError, or FetchError naming URL, range and the last status or error.
        """
        blob_size = await self.open() if self._size is None else self._size
        check_read_args(self.source, offset, size, blob_size)
        if size == 0:
            return b""
        try:
            body, _, _ = await self._fetch(offset, offset + size - 1, probe=False)
        except FetchError as exc:
            self._fail(exc)
            raise
        return body

    async def aclose(self) -> None:
        await self._client.aclose()

    def _fail(self, exc: FetchError) -> None:
        # Counted, not logged: the caller reports the error (once) with what it was for.
        self.stats.failures += 1

    async def _fetch(self, start: int, end: int, *, probe: bool) -> tuple[bytes, int, str | None]:
        """Fetch bytes start..end (inclusive) with bounded retries: (body, blob size, ETag)."""
        what = f"{self.source} {byte_range(start, end - start + 1)}"

        async def attempt() -> tuple[bytes, int, str | None]:
            return await self._attempt(start, end, probe, what)

        return await _with_retries(what, self.options, end - start + 1, attempt,
                                   self._limiter, self.stats)

    async def _attempt(
        self, start: int, end: int, probe: bool, what: str
    ) -> tuple[bytes, int, str | None]:
        """One attempt: try the remembered redirect target, else resolve through the origin."""
        remembered = self._resolved_url
        if remembered is not None:
            trusted = _same_origin(remembered, self._url)
            response = await self._get(remembered, start, end, trusted=trusted)
            if response.status_code not in _EXPIRED_STATUSES | _REDIRECT_STATUSES:
                return await self._accept(response, start, end, probe, what)
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
                result = await self._accept(response, start, end, probe, what)
                self._resolved_url = None if url == self._url else url
                return result
            await _drain(response)
            url = response.url.join(location)
        raise FetchError(f"{what}: more than {_MAX_REDIRECTS} redirects")

    async def _get(self, url: httpx.URL, start: int, end: int, *, trusted: bool) -> httpx.Response:
        """Send one GET; headers and auth only to the origin, never to another host."""
        headers = {"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
        if trusted:
            headers = {**self.options.headers, **headers}
        request = self._client.build_request("GET", url, headers=headers)
        self.stats.requests += 1
        return await self._client.send(
            request, auth=self.options.auth if trusted else None, stream=True,
            follow_redirects=False,
        )

    async def _accept(
        self, response: httpx.Response, start: int, end: int, probe: bool, what: str
    ) -> tuple[bytes, int, str | None]:
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
                return b"", 0, response.headers.get("ETag")
            if status in _EXPIRED_STATUSES and response.url != self._url:
                raise FetchError(f"{what}: {_status_text(response)} from {response.url.host}")
            raise FetchError(f"{what}: {_status_text(response)}")
        try:
            etag = response.headers.get("ETag")
            if self._etag is not None and etag is not None and _weak(etag) != _weak(self._etag):
                raise BlobChangedError(f"{what}: ETag is now {etag}, was {self._etag} at open")
            total = self._check_content_range(response, start, end, what)
            encoding = response.headers.get("Content-Encoding", "identity").lower()
            if encoding != "identity":
                raise FetchError(f"{what}: body is {encoding}-encoded; expected raw bytes")
            body = await _read_body(response, end - start + 1, what)
        finally:
            await response.aclose()
        self.stats.bytes_fetched += len(body)
        return body, total, etag

    def _check_content_range(
        self, response: httpx.Response, start: int, end: int, what: str
    ) -> int:
        """Return the blob size from Content-Range, which must match the request exactly."""
        content_range = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.fullmatch(content_range.strip())
        if match is None or match.group(3) == "*":
            raise FetchError(f"{what}: 206 with unusable Content-Range {content_range!r}")
        got_start, got_end, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
        if self._size is not None and total != self._size:
            raise BlobChangedError(f"{what}: blob is now {total} bytes, was {self._size} at open")
        if (got_start, got_end) != (start, end):
            raise FetchError(
                f"{what}: server sent Content-Range {content_range!r} for a different range"
            )
        return total


async def get_small(
    url: str,
    max_bytes: int,
    options: ReaderOptions | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes | None:
    """GET a small whole resource (a descriptor) with the deadline and retries of range reads;
    its body is read at most `max_bytes`. Redirects are followed; headers and auth go to the
    origin only. Returns None on 404.

    Raises BodyTooLargeError, FetchError naming the URL and the last status or error (or that
    it is not an http(s) URL).
    """
    options = options or ReaderOptions()
    parts = urlsplit(url)
    what = _redacted(parts)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"{what}: not an http(s) URL")
    origin = httpx.URL(url)

    async def attempt() -> bytes | None:
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

    async with _client(options, transport, 1) as client:
        return await _with_retries(what, options, max_bytes, attempt,
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
    with jittered backoff. Raises FetchError naming `what` and the last fault."""
    deadline_s = options.attempt_deadline_s(size_bytes)
    last = ""
    retry_after_s: float | None = None
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
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            last = _describe(exc)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise FetchError(f"{what}: {_describe(exc)}") from exc
    raise FetchError(f"{what}: failed after {options.max_retries + 1} attempts; last: {last}")


@functools.lru_cache(maxsize=8)
def tls_context(verify_tls: bool | str) -> ssl.SSLContext | bool:
    """One TLS context per setting, shared by every client: loading the CA bundle takes tens
    of milliseconds each time, on the event loop, for every layer a mount opens."""
    if verify_tls is False:
        return False
    if isinstance(verify_tls, str):
        return ssl.create_default_context(cafile=verify_tls)
    return httpx.create_ssl_context()


def _client(options: ReaderOptions, transport: httpx.AsyncBaseTransport | None,
            max_connections: int) -> httpx.AsyncClient:
    """A pooled client with the timeouts of `options`; redirects are followed by hand."""
    connect_s, read_s = options.connect_timeout_s, options.read_timeout_s
    return httpx.AsyncClient(
        transport=transport,
        verify=tls_context(options.verify_tls),
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


async def _read_body(response: httpx.Response, size: int, what: str) -> bytes:
    """Read exactly `size` body bytes: fewer is transient, more is a broken server."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > size:
            raise FetchError(f"{what}: body longer than the {size} bytes requested")
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


def _weak(etag: str) -> str:
    """Compare ETags ignoring weakness: proxies may weaken an ETag they pass on."""
    return etag.removeprefix("W/")


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
