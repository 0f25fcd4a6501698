"""How each HTTP request of lazyfs is made and given up on: bounded retries with jittered
backoff under a deadline (a source that cannot be connected to is reported unreachable
early), the pooled client, small whole GETs (descriptors), and reading answers. The range
requests built on these are `http.HttpRangeReader`'s.
"""

from __future__ import annotations

import contextlib
import logging
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
    SpeedLimit,
    backoff_delay_s,
)
from lazyfs.fetch.body import read_capped
from lazyfs.fetch.errors import FetchError, SourceUnreachableError
from lazyfs.fetch.tls import LazyCAContext, tls_context

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 10.0
RETRY_AFTER_CAP_S = 10.0
MAX_REDIRECTS = 10
# Error and redirect bodies are read up to this much so the connection can be reused.
DRAIN_CAP_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# What an expired or revoked signed URL answers.
EXPIRED_STATUSES = frozenset({401, 403, 404, 410})
# Attempts in a row that found nobody to connect to before the source counts as down: a
# server that refuses twice is not listening, and every read would pay the whole backoff.
UNREACHABLE_AFTER_ATTEMPTS = 2
T = TypeVar("T")


class Transient(Exception):
    """An attempt failed in a way that another attempt may not."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


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
    what = redacted(parts)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(f"{what}: not an http(s) URL")
    origin = httpx.URL(url)

    async def attempt(client: httpx.AsyncClient) -> bytes | None:
        target = origin
        for _ in range(MAX_REDIRECTS + 1):
            trusted = same_origin(target, origin)
            request = client.build_request(
                "GET", target, headers=options.headers if trusted else None
            )
            response = await client.send(
                request, auth=options.auth if trusted else None, stream=True,
                follow_redirects=False,
            )
            location = response.headers.get("Location")
            if response.status_code in REDIRECT_STATUSES and location is not None:
                await drain(response)
                target = response.url.join(location)
                continue
            try:
                if response.status_code == 404:
                    return None
                if response.status_code == 429 or response.status_code >= 500:
                    raise Transient(status_text(response), retry_after_s(response))
                if response.status_code != 200:
                    raise FetchError(f"{what}: {status_text(response)}")
                return await read_capped(response, max_bytes, what)
            finally:
                await response.aclose()
        raise FetchError(f"{what}: more than {MAX_REDIRECTS} redirects")

    async with contextlib.AsyncExitStack() as stack:
        client = shared_client
        if client is None:
            client = await stack.enter_async_context(
                pooled_client(options, transport, 1, https=parts.scheme == "https"))
        return await with_retries(what, options, max_bytes, lambda: attempt(client),
                                   trio.CapacityLimiter(1), None)


async def with_retries(
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
                                      max_s=MAX_BACKOFF_S, retry_after_cap_s=RETRY_AFTER_CAP_S)
            log.debug("%s: %s; retry %d of %d in %.2f s", what, last, number,
                      options.max_retries, delay_s)
            await trio.sleep(delay_s)
        retry_after_s = None
        try:
            async with limiter:
                with trio.fail_after(deadline_s):
                    return await attempt()
        except Transient as exc:
            last, retry_after_s = exc.reason, exc.retry_after_s
        except trio.TooSlowError:
            last = f"no complete answer within {deadline_s:.1f} s"
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # Refused, unresolvable, unroutable: nothing of this source answers.
            last = describe(exc)
            unconnected += 1
            if unconnected == number + 1 >= UNREACHABLE_AFTER_ATTEMPTS:
                raise SourceUnreachableError(
                    f"{what}: no connection in {unconnected} attempts; last: {last}"
                ) from exc
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            last = describe(exc)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise FetchError(f"{what}: {describe(exc)}") from exc
    message = f"{what}: failed after {options.max_retries + 1} attempts; last: {last}"
    if unconnected == options.max_retries + 1:  # fewer attempts than UNREACHABLE_AFTER_...
        raise SourceUnreachableError(message)
    raise FetchError(message)


def pooled_client(options: ReaderOptions, transport: httpx.AsyncBaseTransport | None,
            max_connections: int, *, https: bool) -> httpx.AsyncClient:
    """A pooled client with the timeouts of `options`; redirects are followed by hand. The
    process's TLS context is shared (its CAs start loading now for an `https` origin). Its
    connections read bodies in large pieces (`lazyfs.fetch.large_reads`) unless `transport`
    is given."""
    from lazyfs.fetch.large_reads import large_read_transport  # imports httpcore: not before

    verify = start_tls(options, https=https)
    connect_s, read_s = options.connect_timeout_s, options.read_timeout_s
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_connections)
    return httpx.AsyncClient(
        transport=transport or large_read_transport(verify, limits),
        verify=verify,
        http1=True,
        http2=False,
        follow_redirects=False,
        limits=limits,
        timeout=httpx.Timeout(connect=connect_s, read=read_s, write=read_s,
                              pool=connect_s + read_s),
    )


def start_tls(options: ReaderOptions, *, https: bool) -> ssl.SSLContext | bool:
    """The process's TLS context for `options`; its CAs start loading now (in the background)
    for an `https` origin."""
    verify = tls_context(options.verify_tls)
    if https and isinstance(verify, LazyCAContext):
        verify.start_loading()
    return verify


def redacted(parts: SplitResult) -> str:
    """The URL without credentials, for messages."""
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


async def read_body(response: httpx.Response, size: int, what: str,
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
        raise Transient(f"slower than {limit.bytes_per_s} bytes/s for "
                         f"{window_s:g} s ({len(body)} of {size} bytes)")
    if len(body) < size:
        raise Transient(f"short body: {len(body)} of {size} bytes")
    return bytes(body)


async def drain(response: httpx.Response) -> None:
    """Read a small unwanted body so the connection stays reusable; close a large one."""
    try:
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            if received > DRAIN_CAP_BYTES:
                break
    except httpx.HTTPError:
        pass  # the connection is closed below; the status has been seen already
    finally:
        await response.aclose()


def same_origin(url: httpx.URL, origin: httpx.URL) -> bool:
    return (url.scheme, url.host, url.port) == (origin.scheme, origin.host, origin.port)


def status_text(response: httpx.Response) -> str:
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def retry_after_s(response: httpx.Response) -> float | None:
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


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
